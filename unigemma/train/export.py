"""`unigemma train export`: an adapter from a training run, alone or merged into its base model.

    unigemma train export runs/lora                      --out my-adapter    the adapter folder (PEFT layout)
    unigemma train export runs/lora/checkpoint-000200    --out my-adapter
    unigemma train export runs/lora --merge [--base DIR] --out merged        a full checkpoint unigemma.load reads

A run folder means its final/ (or, before the run has finished, its latest checkpoint). `--merge` loads the float
base (default: the checkpoint the adapter was trained on, from adapter_config.json), folds the adapter into its
weights and writes config.json, safetensors and the tokenizer files. This module only moves files and calls the
adapter and checkpoint code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..adapters import CONFIG_FILE, WEIGHTS_FILE, apply_adapter, is_adapter_dir


def find_adapter(path: Path) -> Path:
    """The adapter folder `path` names: itself, its final/, or its latest checkpoint-*."""
    if is_adapter_dir(path):
        return path
    if is_adapter_dir(path / "final"):
        return path / "final"
    cands = sorted(p for p in path.glob("checkpoint-*") if is_adapter_dir(p))
    if cands:
        return cands[-1]
    raise FileNotFoundError(f"{path}: no LoRA adapter here ({CONFIG_FILE}), nor in final/ or a checkpoint-*/ "
                            "folder (only LoRA runs write adapters; a full fine-tune's final/ is already a model)")


def export(src: str | Path, out: str | Path, merge: bool = False, base: str | Path | None = None,
           dtype=None) -> Path:
    from ..checkpoint import build_model, save_model
    from ..quant import stored_quantization
    from .loop import copy_tokenizer_files

    adapter = find_adapter(Path(src))
    out = Path(out)
    if out.resolve() == adapter.resolve():
        raise ValueError(f"--out {out} is the adapter folder itself; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    if not merge:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(adapter / name, out / name)
        return out
    config = json.loads((adapter / CONFIG_FILE).read_text(encoding="utf-8"))
    base = base or config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"--merge needs the base checkpoint the adapter was trained on: adapter_config.json "
                                f"names {config.get('base_model_name_or_path')!r}, which is not a checkpoint folder "
                                "here; pass --base DIR")
    if stored_quantization(base) is not None:
        raise ValueError(f"{base} is int8 / int4: an adapter merges only into float weights; pass the float "
                         "checkpoint with --base")
    model, cfg = build_model(base, dtype=dtype)
    apply_adapter(model, adapter, merge=True)
    save_model(model, out, dict(cfg.raw))
    copy_tokenizer_files(base, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="unigemma train export",
                                description="Copy a run's LoRA adapter (PEFT layout), or merge it into its base.")
    p.add_argument("checkpoint", help="a run folder (output_dir), or one of its checkpoint folders")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--merge", action="store_true", help="write the base model with the adapter merged in")
    p.add_argument("--base", default=None, help="float base checkpoint (default: the one in adapter_config.json)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default: the base's)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.merge, args.base, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"unigemma train export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({'merged model' if args.merge else 'adapter'})")
    return 0
