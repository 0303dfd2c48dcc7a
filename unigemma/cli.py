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


def _cmd_serve(args) -> int:
    from .server.run import serve

    return serve(args) or 0


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

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (127.0.0.1 unless told otherwise)")
    try:
        from .server.run import add_serve_arguments
    except ImportError as e:  # the server extra is not installed
        s.set_defaults(func=lambda a, e=e: _missing_extra("serve", "server", e))
    else:
        add_serve_arguments(s)
        s.set_defaults(func=_cmd_serve)
    return p


def _missing_extra(cmd: str, extra: str, err: Exception) -> int:
    print(f"unigemma {cmd}: needs the [{extra}] extra (pip install 'unigemma[{extra}]'): {err}", file=sys.stderr)
    return 2


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
