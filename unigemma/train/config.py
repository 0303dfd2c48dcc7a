"""Training configuration: dataclasses read from a YAML or TOML file, validated with errors that name the field.

    task: finetune | drafter          what is trained (the model itself, or an MTP drafter against a frozen target)
    model / lora / data / optim / eval / checkpoint / log / drafter / distributed   one section each

Every section is a dataclass whose field names are the file's keys; unknown keys, wrong types and values out of
range raise `TrainConfigError` (a ValueError) with the dotted key and what would be accepted, so a typo never
silently falls back to a default. Relative paths are resolved against the config file's folder.

`examples/train.yaml` documents every key. This module only parses and checks; it builds nothing.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrainConfigError(ValueError):
    """A training config key is missing, unknown, of the wrong type or out of range."""


@dataclass
class ModelSection:
    checkpoint: str | None = None          # folder of a gemma4_unified checkpoint to start from
    config: str | None = None              # config.json for a randomly initialised model (instead of checkpoint)
    init_std: float = 0.02                 # std of the normal init used with `config`
    precision: str = "fp32"                # fp32 | bf16 (weights and optimizer in bf16) | bf16-mixed (autocast)
    gradient_checkpointing: bool = False
    quantize: str | None = None            # int8 | int4: frozen base quantized on load (QLoRA; needs lora.enabled)
    device: str = "auto"                   # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)


@dataclass
class LoRASection:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])
    modules_to_save: list[str] = field(default_factory=list)  # trained in full, e.g. [embed_tokens] or [norm]
    save_merged: bool = True               # final/ also holds the merged model (float bases), beside the adapter


@dataclass
class DataSection:
    train: str | None = None               # JSONL of {"messages": [...], "tools": [...]?}
    eval: str | None = None
    tokenizer: str | None = None           # folder with tokenizer.json; default: the model checkpoint's
    max_seq_len: int = 2048
    batch_size: int = 4                    # sequences per micro-batch
    group_by_length: bool = True           # batches of similar length (less padding)
    group_size: int = 64                   # batches per length-sorted group
    prefill_empty_thought: bool = True     # thinking-off prefill `<|channel>thought\n<channel|>` (untrained)
    image_soft_tokens: int = 280           # soft-token budget per image (70, 140, 280, 560, 1120)
    packing: bool = False                  # pack each micro-batch's sequences into rows of max_seq_len tokens
                                           # (attention stays inside each sequence): no compute spent on padding
    train_on: str = "all_turns"            # all_turns (every assistant turn) | last_turn (only the final one)
    skip_bad_records: bool = False         # leave out records with bad JSON / media (warned) instead of stopping
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool = True                # used only when training on CUDA


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    schedule: str = "cosine"               # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1              # final lr = lr × min_lr_ratio (cosine, linear)
    steps: int = 1000                      # optimizer steps (each = grad_accum micro-batches)
    grad_accum: int = 1


@dataclass
class EvalSection:
    every: int = 0                         # optimizer steps between evaluations; 0: only at the end
    max_batches: int | None = None
    prompts: str | None = None             # chat JSONL: at each eval, greedy answers to these conversations (their
                                           # last assistant message is the expected answer) are logged
    max_prompts: int = 8
    max_new_tokens: int = 64


@dataclass
class CheckpointSection:
    every: int = 0                         # optimizer steps between checkpoints; 0: only at the end
    keep: int = 2                          # step checkpoints kept (older ones are deleted); the final one stays
    resume: str = "auto"                   # auto (latest in output_dir, only when config and data are unchanged)
                                           # | force (latest, even if they changed) | never | a checkpoint folder
    overwrite: bool = False                # replace a finished run (final/) or checkpoints from another run
    max_shard_bytes: int = 2 << 30


@dataclass
class LogSection:
    every: int = 10                        # optimizer steps per log record (its loss: the mean over those steps)
    progress: str = "auto"                 # auto (a progress bar with ETA when stderr is a terminal) | bar | lines
    report_to: list[str] = field(default_factory=list)  # tensorboard (output_dir/tensorboard) | wandb (if installed)
    wandb_project: str = "unigemma"


@dataclass
class DrafterSection:
    target: str | None = None              # frozen target checkpoint (gemma4_unified)
    init: str | None = None                # drafter checkpoint folder, or a drafter config.json (random init)
    draft_steps: int = 3                   # k chained draft steps trained per position
    step_weight_decay: float = 1.0         # weight of step j is decay^(j-1)
    loss: str = "kl"                       # kl (to the target's distribution) | ce (the target's argmax)
    positions: str = "assistant"           # assistant (drafts of model turns) | all (every text position)
    acceptance_prompts: int = 8            # held-out prompts for the acceptance measurement (0: skip)
    acceptance_new_tokens: int = 32


@dataclass
class DistributedSection:
    strategy: str = "none"                 # none | ddp | diloco | decoupled (see train/decoupled.py)
    backend: str = "auto"                  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    inner_steps: int = 50                  # DiLoCo H
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    fragments: int = 1                     # streaming DiLoCo: parameter fragments synced at staggered steps
    overlap_steps: int = 0                 # inner steps a fragment's all-reduce may run behind compute
    mix: float = 0.5                       # with overlap: local ← mix·local + (1−mix)·global after the sync
    compression: str = "none"              # none | bf16 | int8 | int4 (outer gradients; fp32 accumulation)
    quant_block: int = 1024                # elements per quantization scale
    link_mbps: float | None = None         # simulate a slow link: sleep bytes / bandwidth per collective
    link_latency_ms: float = 0.0
    # decoupled DiLoCo: one syncer, `learners` learners on their own clocks (under torchrun: rank 0 is the syncer,
    # rank r the learner r − 1; or each started on its own with role / learner_id set)
    role: str = "auto"                     # auto | syncer | learner
    syncer: str | None = None              # HOST:PORT of the syncer (default: $MASTER_ADDR or 127.0.0.1, port 29600)
    learners: int | None = None            # default under torchrun: WORLD_SIZE − 1
    learner_id: int | None = None          # 0 … learners − 1; default under torchrun: RANK − 1
    quorum: int | None = None              # K: pushes of a fragment that allow a merge (default ⌈learners / 2⌉)
    grace_fraction: float = 0.5            # wait for learners expected within this × the round's median interval
    blocking: bool = False                 # learners wait for each merge (with quorum = learners: synchronous DiLoCo)
    token_budget: int | None = None        # stop after this many tokens; default optim.steps × learners steps


@dataclass
class TrainConfig:
    task: str = "finetune"                 # finetune | drafter
    seed: int = 0
    output_dir: str = "runs/train"
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    drafter: DrafterSection = field(default_factory=DrafterSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- parsing ---------------------------------------------------------------------------------------------

_PATH_KEYS = {"output_dir", "model.checkpoint", "model.config", "data.train", "data.eval", "data.tokenizer", "eval.prompts",
              "drafter.target", "drafter.init"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against a simple type hint (int, float, bool, str, X | None, list[X])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads `2e-5` (no dot) as a string; accept numeric strings rather than fail on a common spelling.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TrainConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp}")  # pragma: no cover - a bug in the dataclasses


def _build(cls: type, d: Any, where: str) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise TrainConfigError(f"{where or 'config'} must be a mapping of keys to values, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        prefix = where + "." if where else ""
        raise TrainConfigError(f"{prefix}{unknown[0]}: unknown key (accepted: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, d[name], key)
        else:
            kwargs[name] = _coerce(d[name], tp, key)
    return cls(**kwargs)


def _choice(value: str, accepted: tuple[str, ...], where: str) -> None:
    if value not in accepted:
        raise TrainConfigError(f"{where} = {value!r} is not supported (accepted: {', '.join(accepted)})")


def _positive(value, where: str, zero_ok: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not zero_ok):
        raise TrainConfigError(f"{where} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks. Raises TrainConfigError; returns cfg."""
    _choice(cfg.task, ("finetune", "drafter"), "task")
    m, d, o, dist = cfg.model, cfg.data, cfg.optim, cfg.distributed
    _choice(m.precision, ("fp32", "bf16", "bf16-mixed"), "model.precision")
    if cfg.task == "finetune":
        if (m.checkpoint is None) == (m.config is None):
            raise TrainConfigError("model: give exactly one of model.checkpoint (fine-tune a checkpoint) or "
                                   "model.config (random init from a config.json)")
        if m.config is not None and d.tokenizer is None:
            raise TrainConfigError("data.tokenizer: a randomly initialised model (model.config) needs a tokenizer "
                                   "folder (tokenizer.json)")
        if cfg.lora.enabled and m.checkpoint is None:
            raise TrainConfigError("lora.enabled: LoRA adapts a pretrained model; set model.checkpoint")
        if m.quantize is not None:
            _choice(m.quantize, ("int8", "int4"), "model.quantize")
            if not cfg.lora.enabled:
                raise TrainConfigError(f"model.quantize = {m.quantize!r}: int8 / int4 weights cannot be trained "
                                       "directly; enable lora (QLoRA: adapters on the frozen quantized base)")
    else:
        if cfg.drafter.target is None or cfg.drafter.init is None:
            raise TrainConfigError("drafter: task 'drafter' needs drafter.target (target checkpoint) and "
                                   "drafter.init (drafter checkpoint or config.json)")
        if cfg.lora.enabled:
            raise TrainConfigError("lora.enabled: LoRA is for task 'finetune'; a drafter is small, train it fully")
        _positive(cfg.drafter.draft_steps, "drafter.draft_steps")
        _choice(cfg.drafter.loss, ("kl", "ce"), "drafter.loss")
        _choice(cfg.drafter.positions, ("assistant", "all"), "drafter.positions")
        _positive(cfg.drafter.acceptance_prompts, "drafter.acceptance_prompts", zero_ok=True)
        _positive(cfg.drafter.acceptance_new_tokens, "drafter.acceptance_new_tokens")
    if d.train is None:
        raise TrainConfigError("data.train: the training JSONL file is required")
    if cfg.lora.enabled:
        _positive(cfg.lora.rank, "lora.rank")
        if not 0.0 <= cfg.lora.dropout < 1.0:
            raise TrainConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
        if not cfg.lora.targets:
            raise TrainConfigError("lora.targets must name at least one linear layer (e.g. q_proj)")
    _positive(d.max_seq_len, "data.max_seq_len")
    _choice(d.train_on, ("all_turns", "last_turn"), "data.train_on")
    if d.packing and cfg.task != "finetune":
        raise TrainConfigError("data.packing: packing is for task 'finetune' (drafter distillation runs unpacked)")
    _positive(d.batch_size, "data.batch_size")
    _positive(d.group_size, "data.group_size")
    _positive(d.num_workers, "data.num_workers", zero_ok=True)
    _positive(d.prefetch_factor, "data.prefetch_factor")
    if d.image_soft_tokens not in (70, 140, 280, 560, 1120):
        raise TrainConfigError(f"data.image_soft_tokens = {d.image_soft_tokens} (accepted: 70, 140, 280, 560, 1120)")
    _positive(o.lr, "optim.lr")
    _positive(o.weight_decay, "optim.weight_decay", zero_ok=True)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise TrainConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    _positive(o.eps, "optim.eps")
    _positive(o.grad_clip, "optim.grad_clip")
    _choice(o.schedule, ("cosine", "linear", "constant"), "optim.schedule")
    _positive(o.warmup_steps, "optim.warmup_steps", zero_ok=True)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise TrainConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _positive(o.steps, "optim.steps")
    _positive(o.grad_accum, "optim.grad_accum")
    _positive(cfg.eval.every, "eval.every", zero_ok=True)
    _positive(cfg.eval.max_batches, "eval.max_batches")
    _positive(cfg.checkpoint.every, "checkpoint.every", zero_ok=True)
    _positive(cfg.checkpoint.keep, "checkpoint.keep")
    _positive(cfg.log.every, "log.every")
    _choice(cfg.log.progress, ("auto", "bar", "lines"), "log.progress")
    for i, r in enumerate(cfg.log.report_to):
        _choice(r, ("tensorboard", "wandb"), f"log.report_to[{i}]")
    _positive(cfg.eval.max_prompts, "eval.max_prompts")
    _positive(cfg.eval.max_new_tokens, "eval.max_new_tokens")
    if cfg.eval.prompts is not None and cfg.task != "finetune":
        raise TrainConfigError("eval.prompts: generation samples are for task 'finetune' (a drafter reports its "
                               "acceptance rate instead)")
    _choice(dist.strategy, ("none", "ddp", "diloco", "decoupled"), "distributed.strategy")
    _choice(dist.role, ("auto", "syncer", "learner"), "distributed.role")
    _positive(dist.learners, "distributed.learners")
    _positive(dist.quorum, "distributed.quorum")
    _positive(dist.token_budget, "distributed.token_budget")
    _positive(dist.learner_id, "distributed.learner_id", zero_ok=True)
    if not 0 < dist.grace_fraction <= 10:
        raise TrainConfigError(f"distributed.grace_fraction must be in (0, 10], got {dist.grace_fraction}")
    if dist.learners is not None and dist.quorum is not None and dist.quorum > dist.learners:
        raise TrainConfigError(f"distributed.quorum ({dist.quorum}) must be <= distributed.learners "
                               f"({dist.learners})")
    if dist.learners is not None and dist.learner_id is not None and dist.learner_id >= dist.learners:
        raise TrainConfigError(f"distributed.learner_id ({dist.learner_id}) must be < distributed.learners "
                               f"({dist.learners})")
    if dist.syncer is not None:
        from .decoupled import parse_address

        try:
            parse_address(dist.syncer)
        except ValueError as e:
            raise TrainConfigError(f"distributed.syncer: {e}") from None
    _choice(dist.backend, ("auto", "gloo", "nccl"), "distributed.backend")
    _choice(dist.compression, ("none", "bf16", "int8", "int4"), "distributed.compression")
    _positive(dist.inner_steps, "distributed.inner_steps")
    _positive(dist.outer_lr, "distributed.outer_lr")
    if not 0.0 <= dist.outer_momentum < 1.0:
        raise TrainConfigError(f"distributed.outer_momentum must be in [0, 1), got {dist.outer_momentum}")
    _positive(dist.fragments, "distributed.fragments")
    if dist.fragments > dist.inner_steps:
        raise TrainConfigError(f"distributed.fragments ({dist.fragments}) must be <= distributed.inner_steps "
                               f"({dist.inner_steps}): each fragment syncs once per H steps at its own offset")
    _positive(dist.overlap_steps, "distributed.overlap_steps", zero_ok=True)
    if dist.overlap_steps >= dist.inner_steps:
        raise TrainConfigError(f"distributed.overlap_steps ({dist.overlap_steps}) must be < inner_steps "
                               f"({dist.inner_steps}) so a fragment's sync ends before its next one starts")
    if not 0.0 <= dist.mix <= 1.0:
        raise TrainConfigError(f"distributed.mix must be in [0, 1], got {dist.mix}")
    _positive(dist.quant_block, "distributed.quant_block")
    _positive(dist.link_mbps, "distributed.link_mbps")
    _positive(dist.link_latency_ms, "distributed.link_latency_ms", zero_ok=True)
    return cfg


def from_dict(d: dict, base_dir: str | Path | None = None) -> TrainConfig:
    """Build and validate a TrainConfig from a plain dict; relative paths are resolved against base_dir."""
    cfg = _build(TrainConfig, d, "")
    if base_dir is not None:
        base = Path(base_dir)
        for key in _PATH_KEYS:
            obj, _, attr = key.rpartition(".")
            holder = getattr(cfg, obj) if obj else cfg
            value = getattr(holder, attr)
            if value is not None and not Path(value).expanduser().is_absolute():
                setattr(holder, attr, str((base / value).resolve()))
            elif value is not None:
                setattr(holder, attr, str(Path(value).expanduser()))
    return validate(cfg)


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a .yaml/.yml or .toml (or .json) training config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such training config file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:  # pragma: no cover - depends on the install
                raise TrainConfigError("YAML configs need pyyaml: pip install 'unigemma[train]'") from None
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise TrainConfigError(f"{path}: unknown config format {suffix!r} (accepted: .yaml, .yml, .toml, .json)")
    except TrainConfigError:
        raise
    except Exception as e:  # yaml / toml / json syntax errors: one line naming the file
        raise TrainConfigError(f"{path}: cannot parse: {e}") from None
    try:
        return from_dict(data or {}, base_dir=path.parent)
    except TrainConfigError as e:
        raise TrainConfigError(f"{path}: {e}") from None
