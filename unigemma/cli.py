"""The `unigemma` command line. Each subcommand is a thin adapter over the Python API.

Errors at the user boundary print one clear line (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_inspect(args) -> int:
    from .inspect import format_report, inspect_config, resolve

    cfg, path = resolve(args.model)
    info = inspect_config(cfg, path, dtype=args.dtype)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_report(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="unigemma", description="Run Gemma 4 unified (encoder-free) models locally.")
    p.add_argument("--version", action="version", version=f"unigemma {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="architecture, parameters, weight bytes, KV-cache bytes per token/context")
    s.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder or config.json ('gemma4-12b' = the published geometry); default: demo")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype assumed for weights and KV cache when the folder has no weights")
    s.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"unigemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
