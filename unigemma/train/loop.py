"""The training loop: fine-tuning (full or LoRA) and, through a task object, drafter distillation.

    Task (FinetuneTask here, DrafterTask in drafter.py)
        .module        parameters being trained          .loss_module(batch) → (Σ loss over targets, #targets)
        .save(dir)     a checkpoint `unigemma.load` reads  .restore(dir, state)  trained weights back for a resume
    train(cfg)
        data (ChatDataset → LengthGroupedBatchSampler → DataLoader workers) → grad_accum micro-batches
        → Σloss / #targets of the whole step (so accumulation equals one big batch) → backward → clip → AdamW
        → lr(step) (warm-up, then cosine / linear / constant) → [DDP all-reduce inside backward | DiLoCo sync]
        → log line (loss, lr, tokens/s, bytes sent) → eval → checkpoint

Checkpoints (`output_dir/checkpoint-NNNNNN/`, and `output_dir/final/`) hold the model in the published
safetensors layout (+ config.json and tokenizer files), plus the training state without pickle:
`trainer_state.json` (step, data position, config) and per rank `rank{r}.safetensors` (optimizer tensors, RNG
states, DiLoCo/LoRA tensors) with `rank{r}.json` (optimizer hyper-parameters, Python RNG). Resuming restores all
of it, so the losses after a resume are those of an uninterrupted run.

The loss never materialises (batch, seq, vocab) logits: the hidden states of the trained positions are gathered
and projected to the vocabulary in chunks under activation checkpointing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TrainConfig
from .data import (IGNORE, ChatDataset, LengthGroupedBatchSampler, MediaIds, chat_template_for, make_loader,
                   model_inputs, to_device)
from .diloco import DiLoCo, DistContext, Link, ddp_comm_hook, init_distributed
from .report import Reporter, eval_prompts, format_eta, generate_samples, peak_memory_mb

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


# --- small pieces --------------------------------------------------------------------------------------------

def lr_at(step: int, lr: float, steps: int, warmup: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to lr, then decay to lr·min_lr_ratio."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "cosine":
        factor = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1 - (1 - min_lr_ratio) * progress
    return lr * factor


def precision_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for matrices and embeddings; q_norm / k_norm scales head_dim^-1/4; other norms and layer
    scalars keep their ones.

    Gemma 4 attention has no 1/sqrt(head_dim) factor: logits = (q_norm(q) · k_norm(k)) with scale 1, so the two
    norm scales carry the softmax temperature. Left at one, the logits of unit-RMS q and k have a standard
    deviation of sqrt(head_dim) (8 for 64-wide heads) from the first step: every head is one-hot, its gradient
    through the saturated softmax is ~0, and attention freezes on positions instead of learning to read content
    (a model trained so learns answer formats but never copies a name or digit from the prompt). Scales of
    head_dim^-1/4 make the product head_dim^-1/2, the usual temperature; training is free to sharpen it.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(p.numel() ** -0.25)
            elif p.dim() >= 2:
                p.normal_(0.0, std)


def chunked_ce(h: torch.Tensor, y: torch.Tensor, head, chunk: int = 4096) -> torch.Tensor:
    """Σ cross-entropy of head(h) against y, `chunk` rows at a time; under grad each chunk is recomputed in
    backward, so at most one chunk of (rows, vocab) logits is alive."""
    total = h.new_zeros((), dtype=torch.float32)

    def piece(hc, yc):
        return F.cross_entropy(head(hc).float(), yc, reduction="sum")

    for i in range(0, h.shape[0], chunk):
        hc, yc = h[i:i + chunk], y[i:i + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(piece, hc, yc, use_reentrant=False)
        else:
            total = total + piece(hc, yc)
    return total


class CausalLMLoss(nn.Module):
    """(Σ next-token cross-entropy over the labelled positions, number of labelled positions)."""

    def __init__(self, model: nn.Module, chunk: int = 4096):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.run(batch["input_ids"], compute_logits=False, **model_inputs(batch))
        labels = batch["labels"]
        sel = labels != IGNORE
        return chunked_ce(out.hidden[sel], labels[sel], self.model.logits_from_hidden, self.chunk), sel.sum()


class _StateView:
    """What `save_model` needs from a model (`config`, `state_dict()`), for a state dict made elsewhere."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def load_weights(module: nn.Module, path: str | Path, allow_missing: tuple[str, ...] = ("lm_head.weight",)) -> None:
    """Load a checkpoint folder's safetensors into an already built module (exact values, module's dtype)."""
    from ..checkpoint import weight_files

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        state.update(load_file(str(f)))
    own = module.state_dict()
    missing = [k for k in own if k not in state and k not in allow_missing]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    check_shapes(Path(path), state, own, [])
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def copy_tokenizer_files(src: str | Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, dst / name)


def full_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths for lora.modules_to_save entries (a path, or its last parts: `norm`, `embed_tokens`); their
    parameters become trainable."""
    found = []
    all_names = [n for n, _ in model.named_modules() if n]
    for entry in names:
        hits = [n for n in all_names if n == entry or n.endswith("." + entry)]
        if not hits:
            raise ValueError(f"lora.modules_to_save: {entry!r} names no module (e.g. embed_tokens, "
                             "model.language_model.norm, input_layernorm)")
        for n in hits:
            params = list(model.get_submodule(n).parameters())
            if not params or any(not p.is_floating_point() for p in params):
                raise ValueError(f"lora.modules_to_save: {n} has no float weights to train (int8 / int4 base?)")
            for p in params:
                p.requires_grad_(True)
            found.append(n)
    return sorted(set(found))


# --- the fine-tuning task ------------------------------------------------------------------------------------

class FinetuneTask:
    """The model itself is trained: from a checkpoint or a random init, fully or through LoRA adapters."""

    name = "finetune"

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from ..checkpoint import build_model
        from ..config import UnifiedConfig, read_config_json
        from ..inputs.tokenizer import Tokenizer
        from ..model.unified import Gemma4Unified
        from .lora import apply_lora

        from .. import quant

        m = cfg.model
        self.cfg = cfg
        dtype = precision_dtype(m.precision)
        stored = quant.stored_quantization(m.checkpoint) if m.checkpoint is not None else None
        self.quantized = stored is not None or m.quantize is not None
        if stored is not None and not cfg.lora.enabled:
            raise ValueError(f"model.checkpoint {m.checkpoint} is quantized (int{stored['bits']}): its weights cannot "
                             "be trained directly; enable lora (QLoRA), or train the float checkpoint")
        if stored is not None:
            if m.quantize is not None and m.quantize != f"int{stored['bits']}":
                raise ValueError(f"model.quantize = {m.quantize!r}, but {m.checkpoint} is already "
                                 f"int{stored['bits']}")
            # kernels off: the dequantize-then-matmul path, which autograd differentiates with respect to x
            self.model, self.model_config = quant.load_quantized(m.checkpoint, dtype=dtype, device=device,
                                                                 kernels=False)
            self.config_dict = dict(self.model_config.raw)
        elif m.quantize is not None:
            self.model, self.model_config = quant.build_quantized(m.checkpoint, quant.QuantConfig.parse(m.quantize),
                                                                  dtype=dtype, device=device, kernels=False)
            self.config_dict = dict(self.model_config.raw)
        elif m.checkpoint is not None:
            self.model, self.model_config = build_model(m.checkpoint, dtype=dtype, device=device)
            self.config_dict = dict(self.model_config.raw)
        else:
            self.config_dict = read_config_json(m.config)
            self.model_config = UnifiedConfig.from_dict(self.config_dict, m.config)
            torch.manual_seed(cfg.seed)
            with torch.device(device):
                self.model = Gemma4Unified(self.model_config)
            init_weights(self.model, m.init_std)
            self.model.to(dtype)
        self.config_dict["dtype"] = "bfloat16" if dtype == torch.bfloat16 else "float32"
        self.tokenizer_dir = cfg.data.tokenizer or m.checkpoint
        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        self.template = chat_template_for(self.tokenizer)
        self.media_ids = MediaIds.from_model(self.model_config, self.tokenizer)
        self.pad_id = self.model_config.text.pad_token_id
        self.lora = cfg.lora.enabled
        self.modules_to_save: list[str] = []
        if self.lora:
            apply_lora(self.model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
            self.modules_to_save = full_modules(self.model, cfg.lora.modules_to_save)
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.model.language_model.gradient_checkpointing = m.gradient_checkpointing
        self.model.train()
        self.module = self.model
        self.loss_module = CausalLMLoss(self.model)

    @property
    def keeps_trainable_in_state(self) -> bool:
        """LoRA adapters cannot be recovered from merged weights, so they go into the training state."""
        return self.lora

    def save(self, path: Path, final: bool = False) -> None:
        """LoRA: the adapter (PEFT's layout) in every checkpoint, and in final/ also the merged model (float base,
        lora.save_merged). Full fine-tuning: the model."""
        from ..checkpoint import save_model
        from .lora import merged_state_dict, save_adapter

        if self.lora:
            lc = self.cfg.lora
            save_adapter(self.model, path, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout,
                         base=self.cfg.model.checkpoint, modules_to_save=self.modules_to_save)
            if not (final and lc.save_merged and not self.quantized):
                return
        state = merged_state_dict(self.model) if self.lora else self.model.state_dict()
        save_model(_StateView(self.model_config, state), path, self.config_dict,
                   max_shard_bytes=self.cfg.checkpoint.max_shard_bytes)
        copy_tokenizer_files(self.tokenizer_dir, path)

    def restore(self, path: Path) -> None:
        if not self.lora:
            load_weights(self.model, path)

    def count(self, batch: dict) -> float:
        """The loss normaliser of a batch, known before the forward (so accumulation is exact)."""
        return float(batch["num_targets"])

    def on_start(self, eval_data, resumed: bool) -> None:
        pass

    def report(self, eval_data) -> dict:
        return {}


# --- state files ---------------------------------------------------------------------------------------------

def optimizer_state(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{names[idx]}.{k}"] = v.detach().clone().contiguous().cpu()
            else:
                scalars[f"{names[idx]}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "names": names}


def load_optimizer_state(opt: torch.optim.Optimizer, names: list[str], tensors: dict, meta: dict) -> None:
    if meta["names"] != names:
        raise ValueError("the checkpoint's optimizer was built over different parameters (did lora / the model "
                         "change since it was written?)")
    state: dict[int, dict] = {}
    for i, n in enumerate(names):
        st = {k[len(f"opt.{n}."):]: v for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
        st.update({k[len(n) + 1:]: v for k, v in meta["scalars"].items() if k.startswith(f"{n}.")})
        if st:
            state[i] = st
    groups = [dict(g, params=list(range(len(names)))) for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state(device: torch.device) -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    v, internal, gauss = random.getstate()
    return tensors, {"python_random": [v, list(internal), gauss]}


def set_rng_state(tensors: dict, meta: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    v, internal, gauss = meta["python_random"]
    random.setstate((v, tuple(internal), gauss))


# --- which run an output folder holds ------------------------------------------------------------------------

# Keys that do not change what is trained (where it is written, how often it logs / evaluates / checkpoints, how
# many loader workers): a run resumed with other values of these follows the same trajectory.
_NOT_TRAJECTORY = ("output_dir", "checkpoint.", "log.", "eval.", "data.eval", "data.train", "data.num_workers",
                   "data.prefetch_factor", "data.pin_memory", "model.device", "lora.save_merged",
                   "drafter.acceptance_")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_fingerprint(cfg: TrainConfig) -> dict:
    """What makes two runs the same training: the trajectory-relevant config keys and the training data's bytes
    (data.train's path is left out so a moved file still matches)."""
    conf = {k: v for k, v in _flat(cfg.to_dict()).items() if not k.startswith(_NOT_TRAJECTORY)}
    return {"config": conf, "data_sha256": file_sha256(cfg.data.train)}


def fingerprint_changes(old: dict | None, new: dict) -> list[str]:
    """Human-readable differences ("optim.steps: 300 -> 100", "data.train: contents changed")."""
    if not old:
        return []
    a, b = old.get("config", {}), new["config"]
    out = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
           if a.get(k) != b.get(k)]
    if old.get("data_sha256") and old["data_sha256"] != new["data_sha256"]:
        out.append("data.train: contents changed")
    return out


def _read_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def _stored_fingerprint(state: dict) -> dict | None:
    """The fingerprint a checkpoint was written with; checkpoints from before fingerprints carry only the config."""
    if "fingerprint" in state:
        return state["fingerprint"]
    if "config" in state:
        return {"config": {k: v for k, v in _flat(state["config"]).items() if not k.startswith(_NOT_TRAJECTORY)}}
    return None


class RunConflict(ValueError):
    """The output folder holds a finished run, or checkpoints of a different run, and nothing said to replace or
    continue them."""


def find_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint a run of `cfg` would resume from (None: a fresh start); see `resume_plan`."""
    return resume_plan(cfg)[0]


def resume_plan(cfg: TrainConfig, fingerprint: dict | None = None) -> tuple[Path | None, list[str]]:
    """(checkpoint to resume from or None, config/data changes since it was written).

    auto: the latest checkpoint-* in output_dir, only when its fingerprint matches (otherwise RunConflict);
    force: the latest, whatever changed; never: none; a folder: that checkpoint. A finished run (final/) is
    never continued or replaced without checkpoint.overwrite; with overwrite, nothing is resumed.
    """
    out, r = Path(cfg.output_dir), cfg.checkpoint.resume
    fingerprint = fingerprint or run_fingerprint(cfg)
    final = out / "final"
    if cfg.checkpoint.overwrite and r in ("auto", "force", "never"):
        return None, []  # start over (the loop clears the folder)
    if final.is_dir() and any(final.iterdir()) and not cfg.checkpoint.overwrite:
        done = f" at step {_read_state(final)['step']}" if (final / "trainer_state.json").is_file() else ""
        raise RunConflict(f"{out} already holds a finished run (final/{done}); re-running would replace it. Pass "
                          "--overwrite (checkpoint.overwrite: true) to train again from scratch, or use another "
                          "output_dir")
    if r == "never":
        return None, []
    if r not in ("auto", "force"):
        p = Path(r)
        if not (p / "trainer_state.json").is_file():
            raise ValueError(f"checkpoint.resume = {r!r}: not a training checkpoint (no trainer_state.json)")
        if cfg.checkpoint.overwrite and p.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"checkpoint.resume = {r!r} is inside output_dir, which --overwrite clears; copy it "
                             "elsewhere or drop one of the two")
        return p, fingerprint_changes(_stored_fingerprint(_read_state(p)), fingerprint)
    cands = sorted(p for p in out.glob("checkpoint-*")
                   if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file())
    if not cands:
        return None, []
    latest = cands[-1]
    changes = fingerprint_changes(_stored_fingerprint(_read_state(latest)), fingerprint)
    if changes and r == "auto":
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise RunConflict(f"{latest} was written by a different run ({shown}); resuming would mix two trainings. "
                          "Use another output_dir, --overwrite (checkpoint.overwrite: true) to start this run over, "
                          "or --resume (checkpoint.resume: force) to continue from it anyway")
    return latest, changes


def clear_run(out: Path) -> None:
    """Remove what a previous run left in `out` (checkpoints, final/, logs): --overwrite."""
    for p in [*out.glob("checkpoint-*"), out / "final", out / "tensorboard"]:
        shutil.rmtree(p, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def check_shapes(where: Path, saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                 changes: list[str]) -> None:
    """A clear error instead of copy_'s size mismatch when the model or LoRA geometry changed since `where`."""
    for k, v in saved.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            why = "; ".join(changes) if changes else "the model or lora settings changed"
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} "
                             f"in this run ({why}); resume with the config it was written with, or start over with "
                             "--overwrite or another output_dir")


class StopSignal:
    """SIGTERM / SIGINT ask the loop to save a checkpoint after the current step and return; a second SIGINT
    stops at once (the checkpoint write is atomic, so no half-written folder is left either way)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to stop "
              "now)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# --- the loop ------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)        # per optimizer step run in this call (this rank)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    final_eval_loss: float | None = None
    bytes_sent: int = 0
    tokens: int = 0
    seconds: float = 0.0
    report: dict = field(default_factory=dict)
    interrupted: str | None = None        # "SIGTERM" / "SIGINT" when a signal stopped the run (checkpoint saved)


def make_task(cfg: TrainConfig, device: torch.device):
    if cfg.task == "drafter":
        from .drafter import DrafterTask

        return DrafterTask(cfg, device)
    return FinetuneTask(cfg, device)


def evaluate(loss_module: nn.Module, loader, device: torch.device, max_batches: int | None = None,
             autocast=contextlib.nullcontext) -> float:
    was = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with autocast():
                s, n = loss_module(to_device(batch, device))
            total += float(s)
            count += int(n)
    loss_module.train(was)
    return total / max(count, 1)


def _agree_to_stop(stopper: StopSignal, ctx: DistContext, dev: torch.device) -> bool:
    """Whether any worker got a stop signal; all workers must stop at the same step (their collectives pair up),
    so under torch.distributed this is one 1-element all-reduce per step."""
    if not ctx.active:
        return stopper.signum is not None
    flag = torch.tensor([1.0 if stopper.signum is not None else 0.0], device=dev)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def train(cfg: TrainConfig, ctx: DistContext | None = None, stop_after: int | None = None,
          handle_signals: bool = True) -> TrainResult:
    """Run (or resume) the training `cfg` describes; returns losses and where the final checkpoint is.

    stop_after: run at most this many optimizer steps in this call, then write a checkpoint and return (a job
    with a time limit; the next call resumes from it). handle_signals: SIGTERM / SIGINT (from the main thread)
    save a checkpoint after the current step and return with `result.interrupted` set.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())  # a caller under no_grad / set_grad_enabled(False) still trains
        stopper = stack.enter_context(StopSignal()) if handle_signals else None
        if cfg.distributed.strategy == "decoupled":  # a syncer or a learner, no process group (decoupled_loop.py)
            from .decoupled_loop import train_decoupled

            return train_decoupled(cfg, stopper, TrainResult(Path(cfg.output_dir), 0))
        return _train(cfg, ctx, stop_after, stopper, stack)


def _train(cfg: TrainConfig, ctx: DistContext | None, stop_after: int | None, stopper: StopSignal | None,
           stack: contextlib.ExitStack) -> TrainResult:
    ctx = ctx or init_distributed(cfg.distributed.backend, cfg.model.device)
    dev = ctx.device
    out = Path(cfg.output_dir)
    fingerprint = run_fingerprint(cfg)
    resume, changes = resume_plan(cfg, fingerprint)
    if ctx.is_main:
        if cfg.checkpoint.overwrite:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        state = _read_state(resume)
        if state["step"] >= cfg.optim.steps:
            raise ValueError(f"{resume} is at step {state['step']}, not before optim.steps = {cfg.optim.steps}: "
                             "nothing to train. Raise optim.steps, or start over with --overwrite")
        if ctx.is_main:
            print(f"resuming from {resume} (step {state['step']} of {cfg.optim.steps})"
                  + (f"; changed since it was written: {'; '.join(changes)}" if changes else ""),
                  file=sys.stderr, flush=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = make_task(cfg, dev)
    if resume is not None:
        task.restore(resume)
    d, o, ds = cfg.data, cfg.optim, cfg.distributed

    train_ds = ChatDataset(d.train, task.tokenizer, task.template, task.media_ids, d.max_seq_len,
                           d.prefill_empty_thought, d.image_soft_tokens, d.skip_bad_records,
                           train_on=d.train_on)
    sampler = LengthGroupedBatchSampler(train_ds.lengths, d.batch_size, cfg.seed, d.group_by_length, d.group_size,
                                        shuffle=True, rank=ctx.rank, world_size=ctx.world_size)
    pin = d.pin_memory and dev.type == "cuda"
    loader = make_loader(train_ds, sampler, task.pad_id, d.num_workers, d.prefetch_factor, pin,
                         pack_len=d.max_seq_len if d.packing else None)
    eval_loader = None
    eval_ds = None
    if d.eval is not None and ctx.is_main:
        eval_ds = ChatDataset(d.eval, task.tokenizer, task.template, task.media_ids, d.max_seq_len,
                              d.prefill_empty_thought, d.image_soft_tokens, d.skip_bad_records,
                              train_on=d.train_on)
        es = LengthGroupedBatchSampler(eval_ds.lengths, d.batch_size, 0, True, 1 << 30, shuffle=False)
        eval_loader = make_loader(eval_ds, es, task.pad_id, 0)

    names = [n for n, p in task.module.named_parameters() if p.requires_grad]
    params = [p for p in task.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    link = Link(ds.link_mbps, ds.link_latency_ms)
    ddp = diloco = None
    loss_module = task.loss_module
    if ds.strategy == "ddp" and ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Media embedders get no gradient from text-only batches; DDP must then look for unused parameters.
        mcfg = task.module.config
        unused = getattr(mcfg, "vision", None) is not None or getattr(mcfg, "audio", None) is not None
        ddp = DDP(task.loss_module, device_ids=[dev.index] if dev.type == "cuda" else None,
                  find_unused_parameters=unused)
        ddp.register_comm_hook(None, ddp_comm_hook(link))
        loss_module = ddp
    elif ds.strategy == "diloco":
        diloco = DiLoCo(task.module, inner_steps=ds.inner_steps, outer_lr=ds.outer_lr,
                        outer_momentum=ds.outer_momentum, nesterov=ds.nesterov, fragments=ds.fragments,
                        overlap_steps=ds.overlap_steps, mix=ds.mix, compression=ds.compression,
                        quant_block=ds.quant_block, link=link)

    step, epoch, pos, tokens_seen = 0, 0, 0, 0
    if resume is not None:
        st = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
        rt = load_file(str(resume / f"rank{ctx.rank}.safetensors"))
        rm = json.loads((resume / f"rank{ctx.rank}.json").read_text(encoding="utf-8"))
        if st["world_size"] != ctx.world_size:
            raise ValueError(f"{resume} was written by {st['world_size']} workers; resume it with as many "
                             f"(this run has {ctx.world_size})")
        step, epoch, pos, tokens_seen = st["step"], rm["epoch"], rm["batch_in_epoch"], rm["tokens_seen"]
        if diloco is not None:
            diloco.load_state_dict({k[len("diloco."):]: v for k, v in rt.items() if k.startswith("diloco.")})
            link.bytes_sent = rm.get("bytes_sent", 0)
        check_shapes(resume, {k[len("local."):]: v for k, v in rt.items() if k.startswith("local.")},
                     dict(zip(names, params)), changes)
        with torch.no_grad():
            for n, p in zip(names, params):
                if f"local.{n}" in rt:
                    p.copy_(rt[f"local.{n}"])
        load_optimizer_state(opt, names, rt, rm["optimizer"])
        set_rng_state(rt, rm, dev)
    sampler.set_position(epoch, pos)
    it = iter(loader)

    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if cfg.model.precision == "bf16-mixed" \
        else contextlib.nullcontext
    log = stack.enter_context(Reporter(out, ctx.is_main, o.steps, step, cfg.log.progress, cfg.log.report_to,
                                       cfg.to_dict(), cfg.log.wandb_project))
    samples = None
    if cfg.eval.prompts is not None and ctx.is_main:
        samples = eval_prompts(cfg.eval.prompts, task.template, task.tokenizer, cfg.eval.max_prompts)
    result = TrainResult(out, step)

    def next_batch() -> dict:
        nonlocal it, epoch, pos
        try:
            b = next(it)
        except StopIteration:
            epoch, pos = epoch + 1, 0
            sampler.set_position(epoch, 0)
            it = iter(loader)
            b = next(it)
        pos += 1
        return b

    def save(name: str) -> Path:
        path = out / name
        tmp = out / (name + ".tmp")
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if ctx.active:
            torch.distributed.barrier()
        with diloco.global_weights() if diloco is not None else contextlib.nullcontext():
            if ctx.is_main:
                task.save(tmp, final=name == "final")
        tensors, meta = optimizer_state(opt, names)
        rt, rm = rng_state(dev)
        tensors.update(rt)
        if diloco is not None:
            tensors.update({f"diloco.{k}": v.detach().cpu().contiguous() for k, v in diloco.state_dict().items()})
        if diloco is not None or getattr(task, "keeps_trainable_in_state", False):
            tensors.update({f"local.{n}": p.detach().cpu().contiguous() for n, p in zip(names, params)})
        save_file(tensors, str(tmp / f"rank{ctx.rank}.safetensors"))
        rm.update(optimizer=meta, epoch=epoch, batch_in_epoch=pos, tokens_seen=tokens_seen,
                  bytes_sent=link.bytes_sent)
        (tmp / f"rank{ctx.rank}.json").write_text(json.dumps(rm), encoding="utf-8")
        if ctx.active:
            torch.distributed.barrier()
        if ctx.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": step, "world_size": ctx.world_size, "task": cfg.task, "config": cfg.to_dict(),
                 "fingerprint": fingerprint},
                indent=2), encoding="utf-8")
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            kept = sorted(p for p in out.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in kept[:-cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if ctx.active:
            torch.distributed.barrier()
        return path

    def run_eval() -> float | None:
        if eval_loader is None:
            return None
        with diloco.global_weights() if diloco is not None else contextlib.nullcontext():
            return evaluate(task.loss_module, eval_loader, dev, cfg.eval.max_batches, autocast)

    def sample(rec: dict) -> str:
        """Generated answers to eval.prompts into `rec`; returns the lines that show them."""
        if not samples:
            return ""
        with diloco.global_weights() if diloco is not None else contextlib.nullcontext():
            gens = generate_samples(task.model, samples, task.tokenizer, task.model_config.text.eos_token_id,
                                    cfg.eval.max_new_tokens)
        rec["generations"] = gens
        return "".join(f"\n  {g['prompt'][:60]!r} -> {g['generated'][:80]!r} (expected {g['expected'][:40]!r})"
                       for g in gens[:3])

    task.on_start(eval_ds, resume is not None)
    last_outer = diloco.outer_steps if diloco is not None else 0
    last_bytes = link.bytes_sent
    save_pending = False
    t_log, tok_log = time.perf_counter(), 0
    interval: list[float] = []  # losses of the steps since the last log record
    t0 = time.perf_counter()
    task.loss_module.train()
    start_step = step
    while step < o.steps:
        if stop_after is not None and step - start_step >= stop_after and (diloco is None or diloco.idle):
            result.steps = step
            result.output_dir = save(f"checkpoint-{step:06d}")
            return result
        micro = [next_batch() for _ in range(o.grad_accum)]
        targets = max(1.0, sum(task.count(b) for b in micro))
        lr = lr_at(step, o.lr, o.steps, o.warmup_steps, o.schedule, o.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for i, b in enumerate(micro):
            sync = ddp.no_sync() if ddp is not None and i < len(micro) - 1 else contextlib.nullcontext()
            with sync:
                with autocast():
                    s, _ = loss_module(to_device(b, dev))
                (s / targets).backward()
            loss_sum += float(s.detach())
            tok_log += b["num_tokens"]
            tokens_seen += b["num_tokens"]
        gnorm = None
        if o.grad_clip is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss = loss_sum / targets
        result.losses.append(loss)
        interval.append(loss)
        log.step(step, f"loss {loss:.4f}")
        if diloco is not None:
            diloco.after_inner_step()
            if diloco.outer_steps > last_outer:  # one line per outer step: what it cost on the wire
                last_outer = diloco.outer_steps
                sent, last_bytes = link.bytes_sent - last_bytes, link.bytes_sent
                log({"step": step, "outer_step": last_outer, "bytes_sent_outer_step": sent, "loss": loss},
                    f"outer step {last_outer} (inner step {step}): sent {sent / 1e6:.3f} MB, loss {loss:.4f}")

        if step % cfg.log.every == 0 or step == o.steps:
            now = time.perf_counter()
            tps = tok_log * ctx.world_size / max(now - t_log, 1e-9)
            mean = sum(interval) / len(interval)
            peak, kind = peak_memory_mb(dev)
            eta = log.eta_s(step)
            rec = {"step": step, "loss": mean, "loss_last_step": loss, "lr": lr, "tokens_per_s": tps,
                   "bytes_sent": link.bytes_sent, "epoch": epoch, "peak_mem_mb": peak, "peak_mem_kind": kind,
                   "eta_s": eta}
            if gnorm is not None:
                rec["grad_norm"] = gnorm
            line = (f"step {step}/{o.steps} | loss {mean:.4f} (mean of {len(interval)}) | lr {lr:.2e} | "
                    f"{tps:,.0f} tok/s | peak {peak:,.0f} MiB | eta {'?' if eta is None else format_eta(eta)}")
            interval = []
            if ctx.active or diloco is not None:
                line += f" | sent {link.bytes_sent / 1e6:.2f} MB"
                if diloco is not None:
                    rec["outer_steps"] = diloco.outer_steps
                    line += f" (outer {diloco.outer_steps})"
            log(rec, line)
            t_log, tok_log = now, 0
        if cfg.eval.every and step % cfg.eval.every == 0 and step < o.steps:
            ev = run_eval()
            if ev is not None:
                result.eval_losses.append((step, ev))
            if ev is not None or samples:
                rec = {"step": step, "eval_loss": ev}
                shown = sample(rec)
                log(rec, f"step {step}: eval" + (f" loss {ev:.4f}" if ev is not None else "") + shown)
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < o.steps) or save_pending:
            if diloco is None or diloco.idle:
                save(f"checkpoint-{step:06d}")
                save_pending = False
            else:  # an exchange is in flight: take the checkpoint at the next quiet step (exact resume)
                save_pending = True
        if stopper is not None and step < o.steps and _agree_to_stop(stopper, ctx, dev):
            if diloco is None or diloco.idle:  # else: the next quiet step (exact resume)
                name = signal.Signals(stopper.signum).name if stopper.signum else "a signal on another worker"
                result.steps, result.interrupted = step, name
                result.output_dir = save(f"checkpoint-{step:06d}")
                log({"step": step, "interrupted": name, "checkpoint": str(result.output_dir)},
                    f"stopped by {name} at step {step}: saved {result.output_dir}; run the same command to resume")
                return result

    if diloco is not None:
        diloco.flush()
    result.steps = step
    result.seconds = time.perf_counter() - t0
    result.tokens = tokens_seen
    result.bytes_sent = link.bytes_sent
    final = save("final")
    ev = run_eval()
    result.final_eval_loss = ev
    if ctx.is_main:
        with diloco.global_weights() if diloco is not None else contextlib.nullcontext():
            result.report = task.report(eval_ds)
        summary = {"step": step, "final": str(final), "eval_loss": ev, "bytes_sent": link.bytes_sent,
                   "tokens": tokens_seen, "seconds": result.seconds, **result.report}
        shown = sample(summary)
        log(summary, f"done: {step} steps, final checkpoint {final}" +
            (f", eval loss {ev:.4f}" if ev is not None else "") + shown)
        (final / "train_report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return result
