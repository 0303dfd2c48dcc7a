"""The `unigemma` command line. Each subcommand is a thin adapter over the Python API.

Errors at the user boundary print one clear line (no traceback) and exit with status 2; Ctrl-C exits with 130,
quietly. Heavy modules (torch, FastAPI) are imported by the subcommand that needs them, not at start-up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def _cmd_inspect(args) -> int:
    from .inspect import format_plan, format_report, inspect_config, plan_memory, resolve

    cfg, path = resolve(args.model)
    info = inspect_config(cfg, path, dtype=args.dtype)
    if args.quantize or args.context is not None:
        info = plan_memory(info, cfg, path, dtype=args.dtype, quantize=_quant_config(args), context=args.context,
                           kv_dtype=args.kv_dtype, chunk=args.prefill_chunk)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_report(info))
        extra = format_plan(info)
        if extra:
            print(extra)
    return 0


def _quant_config(args):
    from .quant import QuantConfig

    name = getattr(args, "quantize", None) or (f"int{args.bits}" if getattr(args, "bits", None) else None)
    if name is None:
        return None
    bits = int(name[3:])
    return QuantConfig(bits=bits, group_size=args.group_size if bits == 4 else 32,
                       zero_point=bool(args.zero_point), embeddings=args.embeddings)


def _cmd_quantize(args) -> int:
    from .quant import quantize_checkpoint

    qc = _quant_config(args)
    last = [-1]

    def progress(i: int, n: int) -> None:
        pct = 100 * i // max(1, n)
        if pct != last[0] and sys.stderr.isatty():
            last[0] = pct
            print(f"\rquantizing {pct:3d}%", end="", file=sys.stderr, flush=True)

    out = quantize_checkpoint(args.model, args.out, qc, max_shard_bytes=int(args.shard_size_mb) << 20,
                              progress=progress)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} (int{qc.bits}, {size / 2**30:.2f} GiB of weights)")
    return 0


def _add_quant_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256],
                   help="int4: input columns per scale (default 32)")
    s.add_argument("--zero-point", action="store_true", help="int4: asymmetric groups with a zero point")
    s.add_argument("--embeddings", default="int8", choices=["int8", "float"],
                   help="the embedding / LM head table: int8 with per-row scales (default) or float")


def _cmd_train(args) -> int:
    from .train.cli import main as train_main

    return train_main(args.args) or 0


def _cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:  # the server extra is not installed
        return _missing_extra("serve", "server", e)
    from .server.run import serve

    return serve(args) or 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="unigemma", description="Run Gemma 4 unified (encoder-free) models locally.")
    p.add_argument("--version", action="version", version=f"unigemma {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="architecture, parameters, weight bytes, KV-cache bytes per token/context")
    s.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder or config.json, or a published geometry by name: gemma4-12b, gemma4-e2b, "
                        "gemma4-e4b, gemma4-26b-a4b, gemma4-31b; default: demo")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype assumed for weights and KV cache when the folder has no weights")
    s.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="report weight bytes as quantized (weight-only; see `unigemma quantize`)")
    _add_quant_flags(s)
    s.add_argument("--context", type=int, default=None,
                   help="plan a run at this context: KV cache + prefill activations + weights = total")
    s.add_argument("--kv-dtype", default=None, choices=["bf16", "fp16", "fp32", "fp8"],
                   help="KV-cache dtype for --context (default: --dtype)")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk for the activation estimate")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("quantize", help="write a weight-only int8 / int4 copy of a checkpoint that load() reads")
    s.add_argument("--model", required=True, help="float checkpoint folder")
    s.add_argument("--out", required=True, help="folder to write (created)")
    s.add_argument("--bits", type=int, required=True, choices=[8, 4])
    _add_quant_flags(s)
    s.add_argument("--shard-size-mb", type=int, default=4096, help="largest safetensors shard (MiB)")
    s.set_defaults(func=_cmd_quantize)

    s = sub.add_parser("train", help="fine-tune, distil a drafter, DDP/DiLoCo (torchrun for several workers)",
                       description="unigemma train CONFIG [--set KEY=VALUE] [--resume [CKPT]] [--overwrite] "
                                   "[--skip-bad-records]  |  unigemma train export CHECKPOINT [--merge] --out DIR",
                       add_help=False)
    s.add_argument("args", nargs=argparse.REMAINDER,
                   help="CONFIG and options (`unigemma train --help`), or `export ...`")
    s.set_defaults(func=_cmd_train)

    from .interactive import add_model_flags, cmd_bench, cmd_chat, cmd_generate

    s = sub.add_parser("chat", help="interactive, streaming chat: /image PATH, /audio PATH, /think on|off, /reset")
    add_model_flags(s)
    s.add_argument("--max-tokens", type=int, default=512)
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--think", action="store_true", help="start with thinking on")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("generate", help="one answer to one prompt (chat template applied unless --raw)")
    add_model_flags(s)
    s.add_argument("--prompt", required=True)
    s.add_argument("--image", action="append", help="image file (repeatable)")
    s.add_argument("--audio", action="append", help="audio file (repeatable)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--json-schema", default=None, help="JSON Schema file the answer must satisfy")
    s.add_argument("--think", action="store_true", help="thinking on")
    s.add_argument("--raw", action="store_true", help="no chat template: continue the text as it is")
    s.add_argument("--json", action="store_true", help="print one JSON object (content, reasoning, usage, ...)")
    g = s.add_argument_group("DiffusionGemma checkpoints (default: the checkpoint's generation_config.json)")
    g.add_argument("--max-denoising-steps", type=int, default=None)
    g.add_argument("--t-min", type=float, default=None, help="temperature at the last denoising step")
    g.add_argument("--t-max", type=float, default=None, help="temperature at the first denoising step")
    g.add_argument("--entropy-bound", type=float, default=None)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("bench", help="prefill / decode tokens per second and peak memory")
    add_model_flags(s)
    s.add_argument("--prompt-tokens", type=int, default=512)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--json", action="store_true", help="JSON lines (DESIGN.md §6)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (127.0.0.1 unless told otherwise)")
    from .server.run import add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(func=_cmd_serve)
    return p


def _missing_extra(cmd: str, extra: str, err: Exception) -> int:
    print(f"unigemma {cmd}: needs the [{extra}] extra (pip install 'unigemma[{extra}]'): {err}", file=sys.stderr)
    return 2


def _import_torch_holding_ctrl_c() -> None:
    """Import torch with SIGINT held back. torch's native start-up cannot take a KeyboardInterrupt: a Ctrl-C landing
    inside it aborts the process ("terminate called after throwing an instance of 'pybind11::error_already_set'",
    status −6). Held back, a Ctrl-C meanwhile arrives right after the import, as an ordinary KeyboardInterrupt."""
    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        import torch  # noqa: F401
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Ctrl-C anywhere (start-up, loading, generating) ends it quietly with status 130."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        if argv[:1] == ["train"]:  # its own parser (options, `train export ...`): hand over everything after it
            from .train.cli import main as train_main

            _import_torch_holding_ctrl_c()
            return train_main(argv[1:]) or 0
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        _import_torch_holding_ctrl_c()  # every subcommand computes with torch
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError, OSError) as e:
            print(f"unigemma {args.command}: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        # a second Ctrl-C while the interpreter winds down (torch's threads, atexit) would print a traceback
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return 130


if __name__ == "__main__":
    sys.exit(main())
