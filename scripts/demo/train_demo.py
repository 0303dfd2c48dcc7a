"""Build the bundled demo model from nothing: data → tokenizer → model config → `unigemma train` → shipped folder.

    python scripts/demo/train_demo.py all --work build/demo            every stage below, in order
    python scripts/demo/train_demo.py data | tokenizer | convert | config | train | export | report
    python scripts/demo/train_demo.py drafter | export-drafter                the MTP drafter of a trained target

Stages (all outputs under --work, git-ignored, except `export`, which writes unigemma/demo/model/):
    data       scripts/demo/make_data.py (train/val/test splits, fixed seed)
    tokenizer  scripts/demo/make_tokenizer.py → tokenizer/ and special_ids.json
    convert    the dataset lines carry id/split/task/answer/meta/...; `unigemma train` reads only
               messages/tools/enable_thinking, so each split is rewritten as `<split>.train.jsonl` beside the
               original (same folder, so relative media paths still resolve)
    config     model_config.json: `gemma4_unified` scaled down (sliding + full layers with k_eq_v, vision and
               audio embedders), token ids from the tokenizer's special_ids.json
    train      unigemma's own training loop (`unigemma.train.loop.train`) on scripts/demo/demo.yaml, with
               audio augmentation drawn fresh every time a clip is used (see AugmentedChatDataset); `--init
               FOLDER` starts from an exported model's weights and tokenizer (a continuation stage)
    export     the final checkpoint (float32, or --dtype bfloat16), tokenizer, template and generation config, into
               unigemma/demo/model/ (what `unigemma.load(None)` opens)
    report     unigemma/demo/TRAINING.md from the run's metrics (and demo_eval.py lines, --eval-lines)
    drafter    the MTP drafter (`gemma4_unified_assistant`) distilled against a frozen target (--target, default
               the shipped unigemma/demo/model) by the same loop with task `drafter` (scripts/demo/drafter.yaml):
               drafter/config.json sized by `drafter_config`, drafter/{train,val}.jsonl = the text-only
               conversations of data/{train,val}.train.jsonl (the long answers drafting pays on), drafter/run/
    export-drafter  its final checkpoint → unigemma/demo/drafter/ (config, weights, generation_config.json with
               num_assistant_tokens), which `unigemma.load(None)` loads beside the demo model

Reproducible runs use a fixed `optim.steps` (demo.yaml / drafter.yaml, or --steps). `--deadline HH:MM` instead fits
the run (train or drafter) to a wall-clock budget: it trains in chunks (each one resumes the previous checkpoint
exactly) and after each chunk re-plans the total step count from the measured speed, so the cosine schedule still
ends at the deadline. That makes the step count depend on the machine's load; the run's TRAINING.md records the
steps actually taken.

What this script does not do: evaluate generation or drafting speed (benchmarks/demo_eval.py does).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))  # augment.py
sys.path.insert(0, str(REPO))

DEFAULT_SIZES = {"train": 8000, "val": 300, "test": 600}
LOADER_KEYS = ("messages", "tools", "enable_thinking")
SHIP_DIR = REPO / "unigemma" / "demo" / "model"
DEMO_IMAGE_TOKENS = 70  # make_data.MAX_SOFT_TOKENS and demo.yaml data.image_soft_tokens
DRAFTER_DIR = REPO / "unigemma" / "demo" / "drafter"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# --- data, tokenizer, conversion -------------------------------------------------------------------------

def stage_data(work: Path, sizes: dict[str, int], seed: int, train_weights: str | None = None) -> None:
    cmd = [sys.executable, str(HERE / "make_data.py"), "--out", str(work / "data"), "--seed", str(seed)]
    if train_weights:
        cmd += ["--train-weights", train_weights]
    for split, n in sizes.items():
        cmd += [f"--{split}", str(n)]
    subprocess.run(cmd, check=True)


def stage_tokenizer(work: Path) -> None:
    with open(work / "special_ids.json", "w", encoding="utf-8") as fh:
        subprocess.run([sys.executable, str(HERE / "make_tokenizer.py"), "--data", str(work / "data"), "--out",
                        str(work / "tokenizer"), "--vocab-size", "4096"], check=True, stdout=fh)


def loader_record(rec: dict) -> dict:
    """A dataset line reduced to the keys the training loader accepts."""
    return {k: rec[k] for k in LOADER_KEYS if k in rec and rec[k] is not None}


def stage_convert(work: Path) -> dict[str, int]:
    counts = {}
    for split in ("train", "val", "test"):
        src = work / "data" / f"{split}.jsonl"
        if not src.is_file():
            continue
        n = 0
        with open(src, encoding="utf-8") as fi, open(work / "data" / f"{split}.train.jsonl", "w",
                                                     encoding="utf-8") as fo:
            for line in fi:
                if line.strip():
                    fo.write(json.dumps(loader_record(json.loads(line)), ensure_ascii=False) + "\n")
                    n += 1
        counts[split] = n
    return counts


# --- the model config --------------------------------------------------------------------------------------

def model_config(ids: dict, hidden: int = 256, layers: int = 6, intermediate: int = 1024, heads: int = 4,
                 window: int = 128, mm_embed_dim: int = 128, posemb: int = 64, max_len: int = 2048) -> dict:
    """A scaled-down gemma4_unified config.json. Layer pattern: two sliding layers then one full layer
    (the last layer is full); full layers use k_eq_v with one K/V head and a wider (partially rotated) head."""
    if layers < 2:
        raise ValueError(f"layers must be >= 2 (sliding and full), got {layers}")
    vocab = -(-int(ids["vocab_size"]) // 64) * 64  # pad: aligned matmuls, and room for a few more tokens
    types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(layers)]
    types[-1] = "full_attention"
    text = dict(model_type="gemma4_unified_text", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads, global_head_dim=2 * hidden // heads,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=window, layer_types=types,
                final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                max_position_embeddings=max_len, tie_word_embeddings=True, use_bidirectional_attention="vision",
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0,
                                                    "partial_rotary_factor": 0.25}},
                pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    return {"architectures": ["Gemma4UnifiedForConditionalGeneration"], "model_type": "gemma4_unified",
            "text_config": text,
            "vision_config": dict(model_type="gemma4_unified_vision", patch_size=16, pooling_kernel_size=3,
                                  mm_embed_dim=mm_embed_dim, output_proj_dims=mm_embed_dim, mm_posemb_size=posemb,
                                  rms_norm_eps=1e-6),
            "audio_config": dict(model_type="gemma4_unified_audio", audio_embed_dim=640, rms_norm_eps=1e-6),
            "image_token_id": ids["image_token_id"], "audio_token_id": ids["audio_token_id"],
            "video_token_id": ids["video_token_id"], "boi_token_id": ids["boi_token_id"],
            "eoi_token_id": ids["eoi_token_id"], "boa_token_id": ids["boa_token_id"],
            "eoa_token_index": ids["eoa_token_index"], "tie_word_embeddings": True, "dtype": "float32"}


DRAFTER_COPY = ("vocab_size", "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
                "attention_k_eq_v", "sliding_window", "hidden_activation", "rms_norm_eps", "max_position_embeddings",
                "rope_parameters", "pad_token_id", "bos_token_id", "eos_token_id")


def drafter_config(target: dict, layers: int = 1, hidden: int = 256, intermediate: int = 1024,
                   heads: int | None = None) -> dict:
    """A `gemma4_unified_assistant` config.json for the MTP drafter of `target` (a gemma4_unified config dict).

    The drafter has no K/V of its own: each layer reads the K/V of the target's last layer of its type, so the
    head geometry (head_dim per layer type, K/V heads, k_eq_v), window, RoPE and vocabulary are copied from the
    target (the keys it states; unstated ones take the same defaults in both); only the width, MLP, query heads
    (default: the target's) and depth are the drafter's. The last layer is full attention (as every decoder's is);
    with two or more layers the others are sliding. No centroid head: the demo vocabulary is small enough for a
    dense one. The defaults are sized for speed (scripts/demo/drafter.yaml has the measured costs)."""
    from unigemma.config import UnifiedConfig

    t = target["text_config"]
    tc = UnifiedConfig.from_dict(target, "target config").text
    if layers < 1:
        raise ValueError(f"drafter layers must be >= 1, got {layers}")
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    missing = sorted(set(types) - set(tc.layer_types))
    if missing:
        raise ValueError(f"the target has no {missing} layers for a {layers}-layer drafter to read K/V from")
    heads = heads or tc.num_attention_heads
    for lt in set(types):
        kv = tc.layer_kv_heads[tc.store_layer(lt)]
        if heads % kv:
            raise ValueError(f"drafter heads {heads} must be a multiple of the target's {kv} K/V heads on {lt} "
                             "layers")
    text = {"model_type": "gemma4_unified_text", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "layer_types": types,
            "tie_word_embeddings": True, "use_bidirectional_attention": None}
    text.update({k: json.loads(json.dumps(t[k])) for k in DRAFTER_COPY if k in t})
    return {"architectures": ["Gemma4UnifiedAssistantForCausalLM"], "model_type": "gemma4_unified_assistant",
            "text_config": text, "backbone_hidden_size": tc.hidden_size, "use_ordered_embeddings": False,
            "tie_word_embeddings": True, "dtype": "float32"}


def stage_config(work: Path, **sizes: Any) -> dict:
    ids = json.loads((work / "special_ids.json").read_text(encoding="utf-8"))
    cfg = model_config(ids, **sizes)
    (work / "model_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return cfg


# --- training --------------------------------------------------------------------------------------------

def _augmented_dataset_class(train_path: Path, seed: int, generation: int):
    """A ChatDataset whose training items get a fresh audio augmentation each time they are read.

    The loader decodes media inside `build_example`; the waveform is augmented before that, so the audio
    soft-token count follows the augmented (longer) clip. The draw is seeded by (seed, generation, item, use
    count): deterministic for a given run plan, different on every reuse of a clip. `generation` (the first step
    of a resumed chunk) separates the chunks of one run (use counts restart with each chunk's fresh dataset).
    """
    from augment import augment_waveform

    from unigemma.inputs.audio import load_audio
    from unigemma.train.data import ChatDataset, MediaRef, build_example

    target = str(train_path.resolve())

    class AugmentedChatDataset(ChatDataset):
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            self.augment = str(Path(path).resolve()) == target
            self.uses: collections.Counter = collections.Counter()

        def __getitem__(self, i: int) -> dict:
            tok = self.items[i]
            if self.augment and any(m.kind == "audio" for m in tok.media):
                rng = np.random.default_rng([seed, generation, i, self.uses[i]])
                self.uses[i] += 1
                media = [MediaRef("audio", augment_waveform(load_audio(m.source, format=m.fmt), rng))
                         if m.kind == "audio" else m for m in tok.media]
                tok = dataclasses.replace(tok, media=media)
            return build_example(tok, self.ids, self.max_seq_len, self.image_soft_tokens)

    return AugmentedChatDataset


def _deadline_ts(text: str) -> float:
    now = dt.datetime.now()
    h, m = (int(x) for x in text.split(":"))
    t = now.replace(hour=h, minute=m, second=0, microsecond=0)
    if t < now - dt.timedelta(hours=1):
        t += dt.timedelta(days=1)
    return t.timestamp()


def _resume_step(cfg) -> int:
    from unigemma.train.loop import find_resume

    found = find_resume(cfg)
    if found is None:
        return 0
    return int(json.loads((found / "trainer_state.json").read_text(encoding="utf-8"))["step"])


def init_overrides(init: Path, work: Path) -> list[str]:
    """`train --init FOLDER`: continue training an exported model (a new stage from the shipped weights).

    The weights and architecture come from FOLDER (model.checkpoint; no model.config), and so does the tokenizer:
    its files are copied to WORK/tokenizer, which the run and a later `export` of this --work folder use."""
    init = init.resolve()
    if not (init / "config.json").is_file():
        raise SystemExit(f"--init {init}: not a model folder (no config.json)")
    tok = work / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        (tok / name).write_bytes((init / name).read_bytes())
    return [f"model.checkpoint={init}", "model.config=null", f"data.tokenizer={tok}"]


def stage_train(config: Path, overrides: list[str], deadline: str | None = None, chunk: int = 100,
                reserve_s: float = 90.0, max_steps: int = 20000, fresh: bool = True) -> dict:
    """Run `unigemma train` on `config` with per-use audio augmentation; returns a summary for TRAINING.md."""
    from unigemma.train import loop
    from unigemma.train.cli import load_with_overrides

    cfg = load_with_overrides(str(config), overrides)
    if fresh:  # a stale run in output_dir would otherwise be resumed (checkpoint.resume: auto)
        import shutil

        shutil.rmtree(cfg.output_dir, ignore_errors=True)
    else:  # continue the run in output_dir, whose optim.steps an earlier deadline re-plan may have changed
        cfg.checkpoint.resume = "force"
    original = loop.ChatDataset
    t0 = time.time()
    end = _deadline_ts(deadline) if deadline else None
    history = []
    start_step = _resume_step(cfg)
    run_s, run_steps = 0.0, 0
    try:
        while True:
            # The chunk's first step names its augmentation stream: unique per chunk, and the same on a rerun
            # of the same plan.
            loop.ChatDataset = _augmented_dataset_class(Path(cfg.data.train), cfg.seed, start_step)
            c0 = time.time()
            res = loop.train(cfg, stop_after=chunk if end is not None else None)
            took = time.time() - c0
            history.append({"from_step": start_step, "to_step": res.steps, "planned_steps": cfg.optim.steps,
                            "seconds": round(took, 1)})
            if res.steps >= cfg.optim.steps:
                break
            # Re-plan: the steps that fit before the deadline, less `reserve_s` for the final save and
            # evaluation, at the slower of the mean speed so far and the last chunk's (chunk start-up included;
            # a shared machine's speed changes, and overshooting the deadline is worse than ending early).
            # Chunks of ~5 minutes keep start-up (dataset rendering, model build) small and re-plans frequent.
            run_s, run_steps = run_s + took, run_steps + (res.steps - start_step)
            per_step = max(run_s / max(1, run_steps), took / max(1, res.steps - start_step))
            left = end - time.time() - reserve_s
            planned = res.steps + max(1, int(left / per_step))
            cfg.optim.steps = int(min(max_steps, max(res.steps + 1, planned)))
            cfg.checkpoint.resume = "force"  # the re-plan changes optim.steps: continue this run deliberately
            chunk = int(min(400, max(25, 300 / per_step)))
            start_step = res.steps
            print(f"[train_demo] step {res.steps}: {per_step:.2f} s/step, {left:.0f} s left → total "
                  f"{cfg.optim.steps} steps", file=sys.stderr, flush=True)
    finally:
        loop.ChatDataset = original
    final = Path(cfg.output_dir) / "final"
    report = json.loads((final / "train_report.json").read_text(encoding="utf-8"))
    metrics = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if x]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {"final": str(final), "steps": res.steps, "seconds": round(time.time() - t0, 1),
            "eval_loss": report.get("eval_loss"), "last_train_losses": losses[-5:], "chunks": history,
            "tokens": report.get("tokens"), "config": cfg.to_dict()}


# --- export --------------------------------------------------------------------------------------------

def stage_export(final: Path, tokenizer: Path, out: Path = SHIP_DIR, dtype: str = "float32") -> int:
    """The trained checkpoint → a shipped folder in `dtype`; returns its size in bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    from unigemma.checkpoint import weight_files

    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((final / "config.json").read_text(encoding="utf-8"))
    cfg["dtype"] = dtype
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    state: dict = {}
    for f in weight_files(final):
        state.update(load_file(str(f)))
    state = {k: v.to(tdtype).contiguous() for k, v in state.items()}
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for name in TOKENIZER_FILES:
        (out / name).write_bytes((tokenizer / name).read_bytes())
    text = cfg["text_config"]
    eos = text["eos_token_id"]
    gen = {"bos_token_id": text["bos_token_id"], "pad_token_id": text["pad_token_id"],
           "eos_token_id": eos if isinstance(eos, list) else [eos], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    # The image budget the demo was trained at: requests that name none (CLI, server, API) use it.
    proc = {"image_processor": {"max_soft_tokens": DEMO_IMAGE_TOKENS}}
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n", encoding="utf-8")
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


# --- the MTP drafter ------------------------------------------------------------------------------------------

def text_only(src: Path, dst: Path) -> int:
    """Copy the conversations of `src` (loader JSONL) that carry no image / audio part; returns how many."""
    n = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8") as fi, open(dst, "w", encoding="utf-8") as fo:
        for line in fi:
            if not line.strip():
                continue
            rec = json.loads(line)
            if any(isinstance(m.get("content"), list) and any(p.get("type") in ("image", "audio", "video")
                                                              for p in m["content"]) for m in rec["messages"]):
                continue
            fo.write(line if line.endswith("\n") else line + "\n")
            n += 1
    return n


def stage_drafter(work: Path, config: Path, target: Path, overrides: list[str], sizes: dict, data: Path,
                  all_data: bool = False, deadline: str | None = None, chunk: int = 100, fresh: bool = True) -> dict:
    """Distil the drafter of `target` with unigemma's loop (task: drafter); returns the run summary.

    Writes work/drafter/config.json (checked against the target by `unigemma.train.drafter.check_geometry`
    before any training), the training files and work/drafter/run. `overrides` (--set, --steps) come last."""
    from unigemma.config import AssistantConfig, load_config
    from unigemma.train.drafter import check_geometry

    target = target.resolve()
    if not (target / "config.json").is_file():
        raise SystemExit(f"--target {target}: no config.json; give the trained demo model's folder (the shipped "
                         "unigemma/demo/model, or a run's final/ checkpoint)")
    d = work / "drafter"
    d.mkdir(parents=True, exist_ok=True)
    cfg = drafter_config(json.loads((target / "config.json").read_text(encoding="utf-8")), **sizes)
    check_geometry(load_config(target), AssistantConfig.from_dict(cfg, "drafter config"))
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    files = {}
    for split in ("train", "val"):
        src = data / f"{split}.train.jsonl"
        if not src.is_file():
            if split == "train":
                raise SystemExit(f"{src}: no converted training split; run the data and convert stages first "
                                 "(or pass --drafter-data FOLDER holding train.train.jsonl)")
            continue
        if all_data:
            files[split] = src.resolve()
        else:
            files[split] = d / f"{split}.jsonl"
            print(f"[train_demo] drafter {split}: {text_only(src, files[split])} text-only conversations",
                  file=sys.stderr, flush=True)
    base = [f"drafter.target={target}", f"drafter.init={d / 'config.json'}", f"output_dir={d / 'run'}",
            f"data.train={files['train']}"]
    base += [f"data.eval={files['val']}"] if "val" in files else ["data.eval=null"]
    summary = stage_train(config, base + overrides, deadline, chunk, fresh=fresh)
    report = json.loads((Path(summary["final"]) / "train_report.json").read_text(encoding="utf-8"))
    summary["acceptance"] = {k: report[k] for k in ("acceptance_rate", "acceptance_rate_initial",
                                                    "tokens_per_round", "k") if k in report}
    summary["target"] = str(target)
    return summary


def stage_export_drafter(final: Path, out: Path = DRAFTER_DIR, dtype: str = "float32") -> int:
    """The drafter's final checkpoint → `out` (config.json, model.safetensors, generation_config.json)."""
    import torch
    from safetensors.torch import load_file, save_file

    from unigemma.checkpoint import weight_files

    cfg = json.loads((final / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") != "gemma4_unified_assistant":
        raise SystemExit(f"{final} holds a {cfg.get('model_type')!r} checkpoint, not the MTP drafter "
                         "(gemma4_unified_assistant); run the drafter stage first")
    gen_f = final / "generation_config.json"
    gen = json.loads(gen_f.read_text(encoding="utf-8")) if gen_f.is_file() else {}
    if not gen.get("num_assistant_tokens"):
        raise SystemExit(f"{gen_f}: no num_assistant_tokens (the drafter task writes it); re-run the drafter stage")
    out.mkdir(parents=True, exist_ok=True)
    cfg["dtype"] = dtype
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    state: dict = {}
    for f in weight_files(final):
        state.update(load_file(str(f)))
    state = {k: (v.to(tdtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    gen = {"num_assistant_tokens": int(gen["num_assistant_tokens"]),
           "num_assistant_tokens_schedule": gen.get("num_assistant_tokens_schedule", "constant")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


# --- the training log -----------------------------------------------------------------------------------

def _drafter_line(work: Path) -> str:
    # the drafter runs in the general run's folder; a focus run's folder lies inside it
    f = next((d / "drafter_summary.json" for d in (work, work.parent) if (d / "drafter_summary.json").is_file()),
             work / "drafter_summary.json")
    if not f.is_file():
        return "- no MTP drafter in this run (unigemma/demo/drafter/ comes from the drafter stage)"
    s = json.loads(f.read_text(encoding="utf-8"))
    cfg = json.loads((Path(s["final"]) / "config.json").read_text(encoding="utf-8"))["text_config"]
    acc = s.get("acceptance", {})
    rate = f", acceptance {acc['acceptance_rate']:.3f} at k={acc.get('k')} on held-out prompts" \
        if "acceptance_rate" in acc else ""
    return (f"- MTP drafter (unigemma/demo/drafter, `gemma4_unified_assistant`): {cfg['num_hidden_layers']} layer(s) "
            f"({', '.join(t.split('_')[0] for t in cfg['layer_types'])}), hidden {cfg['hidden_size']}, MLP "
            f"{cfg['intermediate_size']}; distilled for {s['steps']} steps in {s['seconds'] / 60:.0f} min{rate}")


def stage_report(work: Path, eval_lines: Path | None, out: Path, notes: str = "") -> str:
    """unigemma/demo/TRAINING.md: what was trained, on what, for how long, and the final metrics."""
    summary = json.loads((work / "train_summary.json").read_text(encoding="utf-8"))
    final = Path(summary["final"])
    cfg = json.loads((final / "config.json").read_text(encoding="utf-8"))
    text = cfg["text_config"]
    manifest = json.loads((work / "data" / "manifest.json").read_text(encoding="utf-8"))
    run = Path(summary["config"]["output_dir"])
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x]
    steps = [m for m in metrics if "loss" in m]
    tail = steps[-20:]
    from safetensors import safe_open

    n_params = 0
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n_params += int(np.prod(f.get_slice(k).get_shape()))
    o = summary["config"]["optim"]
    d = summary["config"]["data"]
    lines = [
        "# The bundled demo model: training log", "",
        "Built by `scripts/demo/train_demo.py` (`make -f Makefile.demo demo-model`); evaluated by "
        "`benchmarks/demo_eval.py`. Written by `train_demo.py report`.", "",
        "## Model", "",
        f"- `gemma4_unified`, {n_params / 1e6:.2f} M parameters (float32): {text['num_hidden_layers']} layers "
        f"({', '.join(t.split('_')[0] for t in text['layer_types'])}), hidden {text['hidden_size']}, MLP "
        f"{text['intermediate_size']}, {text['num_attention_heads']} heads (sliding: head {text['head_dim']}, "
        f"{text['num_key_value_heads']} K/V heads, window {text['sliding_window']}; full: head "
        f"{text['global_head_dim']}, k_eq_v with {text['num_global_key_value_heads']} K/V head), vocab "
        f"{text['vocab_size']}",
        f"- vision embedder: patch 16, pooling 3, mm_embed_dim {cfg['vision_config']['mm_embed_dim']}, position "
        f"table {cfg['vision_config']['mm_posemb_size']}; audio embedder: 640-sample frames → hidden",
        _drafter_line(work), "",
        "## Data", "",
        f"- `make_data.py --seed {manifest['seed']}`: " + ", ".join(
            f"{s} {sum(c.values())}" for s, c in manifest["counts"].items()) + " conversations",
        "- train tasks: " + ", ".join(f"{t} {n}" for t, n in manifest["counts"]["train"].items()),
        "- audio augmentation (time shift, gain, noise; scripts/demo/augment.py) drawn fresh every time a clip "
        "is read", "",
        "## Run", "",
        f"- {summary['steps']} optimizer steps of {d['batch_size']} conversations (about "
        f"{summary['steps'] * d['batch_size'] / max(1, sum(manifest['counts']['train'].values())):.1f} epochs), "
        f"{summary.get('tokens') or 0:,} tokens; AdamW lr {o['lr']}, betas {o['betas']}, warm-up "
        f"{o['warmup_steps']}, {o['schedule']} to {o['min_lr_ratio']}×, grad clip {o['grad_clip']}",
        f"- final train loss (mean of the last {len(tail)} logged steps): "
        f"{sum(m['loss'] for m in tail) / max(1, len(tail)):.4f}; validation loss: "
        f"{summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else "(no validation split)",
    ]
    if notes:
        lines += ["", notes.strip()]
    if eval_lines is not None and eval_lines.is_file():
        lines += ["", "## Evaluation (benchmarks/demo_eval.py, test split, greedy)", "",
                  "| task | metric | subset | value | n |", "|---|---|---|---|---|"]
        for line in eval_lines.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("unit") == "fraction":
                lines.append(f"| {r['task']} | {r['metric']} | {r.get('subset', 'all')} | {r['value']:.3f} | "
                             f"{r['n']} |")
    md = "\n".join(lines) + "\n"
    out.write_text(md, encoding="utf-8")
    return md


# --- command line ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["all", "data", "tokenizer", "convert", "config", "train", "export", "report",
                                      "drafter", "export-drafter"])
    p.add_argument("--work", default=str(REPO / "build" / "demo"), help="folder for intermediate files")
    p.add_argument("--config", default=str(HERE / "demo.yaml"), help="training config (paths relative to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=DEFAULT_SIZES["train"])
    p.add_argument("--val", type=int, default=DEFAULT_SIZES["val"])
    p.add_argument("--test", type=int, default=DEFAULT_SIZES["test"])
    p.add_argument("--train-weights", default=None, metavar="TASK=W,...",
                   help="data: task mix of the train split (make_data.py --train-weights)")
    p.add_argument("--steps", type=int, default=None, help="override optim.steps")
    p.add_argument("--deadline", default=None, help="HH:MM: fit the schedule to end by then (non-reproducible)")
    p.add_argument("--chunk", type=int, default=100, help="steps per resumable chunk with --deadline")
    p.add_argument("--eval-lines", default=None, help="report: demo_eval.py output (JSON lines) to include")
    p.add_argument("--notes", default="", help="report: free text appended to the run section")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir (default: start afresh)")
    p.add_argument("--init", default=None, metavar="FOLDER",
                   help="train: start from this model folder's weights (e.g. the shipped unigemma/demo/model) with "
                        "a fresh optimizer; its tokenizer files are copied to WORK/tokenizer and used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", default=str(SHIP_DIR), help="export: shipped model folder")
    p.add_argument("--target", default=str(SHIP_DIR),
                   help="drafter: the frozen target model folder (default: the shipped demo model)")
    p.add_argument("--drafter-config", default=str(HERE / "drafter.yaml"),
                   help="drafter: training config (task: drafter; paths relative to it)")
    p.add_argument("--drafter-data", default=None,
                   help="drafter: folder with {train,val}.train.jsonl (default: WORK/data, the convert stage's)")
    p.add_argument("--drafter-all-data", action="store_true",
                   help="drafter: train on every conversation, not only the text-only ones")
    p.add_argument("--drafter-layers", type=int, default=1)
    p.add_argument("--drafter-hidden", type=int, default=256)
    p.add_argument("--drafter-intermediate", type=int, default=1024)
    p.add_argument("--drafter-out", default=str(DRAFTER_DIR), help="export-drafter: shipped drafter folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="export: weight dtype (float32 fits the 40 MB budget without a drafter and keeps CPU "
                        "inference in fp32; bfloat16 halves the size)")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = ["data", "tokenizer", "convert", "config", "train", "export"] if a.stage == "all" else [a.stage]
    summary_path = work / "train_summary.json"
    for stage in stages:
        t = time.time()
        if stage == "data":
            stage_data(work, {"train": a.train, "val": a.val, "test": a.test}, a.seed, a.train_weights)
        elif stage == "tokenizer":
            stage_tokenizer(work)
        elif stage == "convert":
            print(json.dumps(stage_convert(work)))
        elif stage == "config":
            stage_config(work)
        elif stage == "train":
            w = work.resolve()  # demo.yaml names build/demo; --work moves every path (a --set still wins)
            where = [f"output_dir={w / 'run'}", f"model.config={w / 'model_config.json'}",
                     f"data.train={w / 'data' / 'train.train.jsonl'}", f"data.eval={w / 'data' / 'val.train.jsonl'}",
                     f"data.tokenizer={w / 'tokenizer'}"]
            if a.init:
                where += init_overrides(Path(a.init), w)
            overrides = where + list(a.set) + ([f"optim.steps={a.steps}"] if a.steps else []) + [f"seed={a.seed}"]
            summary = stage_train(Path(a.config), overrides, a.deadline, a.chunk, fresh=not a.resume)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        elif stage == "export":
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            size = stage_export(Path(summary["final"]), work / "tokenizer", Path(a.out), a.dtype)
            print(f"exported {a.out}: {size / 1e6:.1f} MB")
        elif stage == "drafter":
            overrides = list(a.set) + ([f"optim.steps={a.steps}"] if a.steps else []) + [f"seed={a.seed}"]
            sizes = {"layers": a.drafter_layers, "hidden": a.drafter_hidden, "intermediate": a.drafter_intermediate}
            data = Path(a.drafter_data) if a.drafter_data else work / "data"
            summary = stage_drafter(work, Path(a.drafter_config), Path(a.target), overrides, sizes, data,
                                    a.drafter_all_data, a.deadline, a.chunk, fresh=not a.resume)
            (work / "drafter_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            print(json.dumps({"steps": summary["steps"], "seconds": summary["seconds"],
                              "eval_loss": summary["eval_loss"], **summary["acceptance"]}))
        elif stage == "export-drafter":
            if not (work / "drafter_summary.json").is_file():
                raise SystemExit(f"{work / 'drafter_summary.json'}: no drafter run in this --work folder; run the "
                                 "drafter stage first (with the same --work)")
            summary = json.loads((work / "drafter_summary.json").read_text(encoding="utf-8"))
            size = stage_export_drafter(Path(summary["final"]), Path(a.drafter_out), a.dtype)
            print(f"exported {a.drafter_out}: {size / 1e6:.1f} MB")
        elif stage == "report":
            stage_report(work, Path(a.eval_lines) if a.eval_lines else None,
                         Path(a.out).parent / "TRAINING.md", a.notes)
        print(f"[train_demo] {stage}: {time.time() - t:.1f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
