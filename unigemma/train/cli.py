"""`unigemma train CONFIG`: run a training config (fine-tuning, drafter distillation, DDP / DiLoCo workers).

    unigemma train examples/train.yaml
    unigemma train run.yaml --set optim.lr=1e-5 --set distributed.strategy=diloco
    unigemma train run.yaml --resume | --overwrite | --skip-bad-records
    unigemma train export runs/lora/final --merge --out merged/     (see export.py)
    torchrun --nproc-per-node 4 -m unigemma.train.cli run.yaml          (one worker per process)

`--set KEY=VALUE` overrides a dotted key before validation (VALUE is read as YAML: 3, 1e-5, true, [a, b]).
Errors in the config print one line naming the key and exit with status 2. This module only parses arguments.
"""

from __future__ import annotations

import argparse
import gc
import sys

from .config import TrainConfigError


def build_parser(prog: str = "unigemma train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Fine-tune a Gemma 4 unified model, distil an MTP drafter, "
                                "or train data-parallel (DDP / DiLoCo) under torchrun.")
    p.add_argument("config", help="training config (.yaml, .yml, .toml or .json); see examples/train.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-5 (repeatable)")
    p.add_argument("--resume", nargs="?", const="force", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in output_dir even if the config or data changed "
                        "(or from the CHECKPOINT folder given); without it a changed run refuses to resume")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds a finished run or another run's checkpoints")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="leave out records with bad JSON or unreadable media (each one warned) instead of stopping")
    return p


def _parse_value(text: str):
    try:
        import yaml

        return yaml.safe_load(text)
    except Exception:  # no pyyaml, or not YAML: keep the text
        return text


def load_with_overrides(path: str, overrides: list[str]):
    from pathlib import Path

    from .config import from_dict, load_train_config

    cfg = load_train_config(path)
    if not overrides:
        return cfg
    d = cfg.to_dict()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise TrainConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-5")
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise TrainConfigError(f"--set {item!r}: {part!r} is not a config section")
            node = node[part]
        node[parts[-1]] = _parse_value(value)
    return from_dict(d, base_dir=Path.cwd())


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # let every worker finish its last transfer before connections close
        gc.collect()  # what still holds the group (DDP's reducer, finished Work) goes now, not at interpreter exit
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        from .export import main as export_main

        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        from .loop import train

        overrides = list(args.set)
        if args.resume is not None:
            overrides.append(f"checkpoint.resume={args.resume}")
        if args.overwrite:
            overrides.append("checkpoint.overwrite=true")
        if args.skip_bad_records:
            overrides.append("data.skip_bad_records=true")
        cfg = load_with_overrides(args.config, overrides)
        result = train(cfg)
        _leave_group()
        if result.interrupted:  # the shell's convention for "stopped by signal N"
            return 128 + {"SIGINT": 2, "SIGTERM": 15}.get(result.interrupted, 15)
    except (ValueError, FileNotFoundError) as e:
        print(f"unigemma train: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .decoupled import SyncerGone

        if not isinstance(e, SyncerGone):
            raise
        return 3  # decoupled learner: the syncer is gone (already said); restart the syncer, then the learners
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
