"""`unigemma serve`: load a checkpoint and run the OpenAI-compatible app under uvicorn.

`serve(args)` takes the parsed argparse namespace of the `serve` subcommand (flags: `add_serve_arguments`).
Safety defaults (DESIGN.md §7): binds 127.0.0.1, the API key comes from --api-key or UNIGEMMA_API_KEY, no
remote media, no local media paths unless --media-root is given. SIGTERM / Ctrl-C: uvicorn stops accepting
connections, waits up to --graceful-timeout seconds for in-flight requests, then the app's shutdown cancels
what is left (streams end cleanly) and the engine thread stops.

What this module does not do: routing or request handling (app.py, service.py).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the CLI reads this module's flags without importing FastAPI
    from .service import ServerSettings


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `unigemma serve` flags (the CLI calls this on its subparser)."""
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    from ..interactive import ADAPTER_HELP, DRAFTER_HELP

    p.add_argument("--drafter", default=None, help=DRAFTER_HELP)
    p.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model id(s) clients send: the first is the served id, the others aliases (default: the "
                        "folder name)")
    p.add_argument("--accept-any-model-name", action="store_true",
                   help="take any `model` value in requests as this server's one model (off: unknown names get 404)")
    p.add_argument("--max-model-len", type=int, default=None, help="context per request (default: model's, ≤ 8192)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get 429")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' or an 'api-key: KEY' header "
                                                   "(or set UNIGEMMA_API_KEY)")
    p.add_argument("--media-root", default=None, help="allow local media paths, only under this folder")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media URLs")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB")
    # limits (README "Limits and safety"); each violation is a 4xx for that request alone
    p.add_argument("--max-prompt-chars", type=int, default=1_000_000,
                   help="characters of text in one request, checked before templating and tokenizing")
    p.add_argument("--max-stop-chars", type=int, default=1024, help="characters in one stop string")
    p.add_argument("--max-json-depth", type=int, default=64, help="nesting depth of a request's JSON body")
    p.add_argument("--max-image-pixels", type=int, default=50_000_000, help="width × height of one image")
    p.add_argument("--max-image-side", type=int, default=16_384, help="longer side of one image, in pixels")
    p.add_argument("--max-image-decoded-mb", type=float, default=256.0,
                   help="decoded size of one image in MiB (width × height × bytes per pixel), from its header")
    p.add_argument("--max-audio-seconds", type=float, default=600.0, help="length of one audio clip")
    p.add_argument("--max-video-seconds", type=float, default=600.0, help="length of one video")
    p.add_argument("--max-video-frames", type=int, default=32, help="frames sampled from one video")
    p.add_argument("--max-realtime-turns", type=int, default=None,
                   help="open /v1/realtime turns holding a slot at once (default: half of --max-concurrency)")
    p.add_argument("--allowed-origin", "--allowed-origins", dest="allowed_origin", action="append", nargs="+",
                   default=None, metavar="ORIGIN",
                   help="browser origin(s) (http(s)://host[:port]) besides the server's own that may call the API "
                        "(CORS) and open /v1/realtime; repeat or list several, '*' for any (default: none)")
    p.add_argument("--max-stored-responses", type=int, default=256,
                   help="/v1/responses kept in memory for retrieval and previous_response_id (oldest dropped)")
    p.add_argument("--max-embedding-inputs", type=int, default=256, help="inputs in one /v1/embeddings request")
    p.add_argument("--max-embedding-tokens", type=int, default=65_536,
                   help="tokens over all inputs of one /v1/embeddings request")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on SIGTERM")
    p.add_argument("--log-level", default="info")


def settings_from_args(args: argparse.Namespace, default_name: str) -> ServerSettings:
    from .service import ServerSettings

    def get(name, default=None):
        return getattr(args, name, default)

    for name in ("max_concurrency", "max_queue", "max_model_len"):
        v = get(name)
        if v is not None and v < (0 if name == "max_queue" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_queue' else 1}, got {v}")
    root = get("media_root")
    return ServerSettings(
        model_name=(get("served_model_name") or [default_name])[0],
        model_aliases=tuple((get("served_model_name") or [])[1:]),
        accept_any_model_name=bool(get("accept_any_model_name", False)),
        api_key=get("api_key") or os.environ.get("UNIGEMMA_API_KEY") or None,
        max_concurrency=get("max_concurrency", 8) or 8,
        max_queue=get("max_queue", 64) if get("max_queue") is not None else 64,
        max_model_len=get("max_model_len"),
        max_body_bytes=int((get("max_body_mb", 32.0) or 32.0) * 1024 * 1024),
        media_root=Path(root) if root else None,
        allow_remote_media=bool(get("allow_remote_media", False)),
        max_prompt_chars=get("max_prompt_chars") or 1_000_000,
        max_stop_chars=get("max_stop_chars") or 1024,
        max_json_depth=get("max_json_depth") or 64,
        max_image_pixels=get("max_image_pixels") or 50_000_000,
        max_image_side=get("max_image_side") or 16_384,
        max_image_decoded_bytes=int((get("max_image_decoded_mb") or 256.0) * 1024 * 1024),
        max_audio_seconds=get("max_audio_seconds") or 600.0,
        max_video_seconds=get("max_video_seconds") or 600.0,
        max_video_frames=get("max_video_frames") or 32,
        max_realtime_turns=get("max_realtime_turns"),
        allowed_origins=tuple(o for group in get("allowed_origin") or () for o in
                              ([group] if isinstance(group, str) else group)),
        max_stored_responses=get("max_stored_responses") or 256,
        max_embedding_inputs=get("max_embedding_inputs") or 256,
        max_embedding_tokens=get("max_embedding_tokens") or 65_536,
    )


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    import unigemma

    from .app import create_app

    logging.basicConfig(level=getattr(logging, str(get_level(args)).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..interactive import LoadProgress, drafter_arg

    bar = LoadProgress("quantizing weights" if getattr(args, "quantize", None) else "loading weights")
    try:
        llm = unigemma.load(args.model, device=getattr(args, "device", "auto"), dtype=getattr(args, "dtype", None),
                            quantize=getattr(args, "quantize", None),
                            drafter=drafter_arg(getattr(args, "drafter", None)), progress=bar,
                            adapter=getattr(args, "adapter", None))
    finally:
        bar.close()
    settings = settings_from_args(args, Path(str(llm.path)).name or "unigemma")
    app = create_app(llm, settings)
    host = getattr(args, "host", "127.0.0.1")
    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        logging.getLogger("unigemma.server").warning(
            "serving on %s without an API key: anyone who can reach this address can use the model", host)
    config = uvicorn.Config(app, host=host, port=getattr(args, "port", 8000), log_level=get_level(args),
                            timeout_graceful_shutdown=getattr(args, "graceful_timeout", 30.0))
    # uvicorn installs SIGINT/SIGTERM handlers: stop accepting, drain, then run the app's shutdown
    uvicorn.Server(config).run()


def get_level(args) -> str:
    return str(getattr(args, "log_level", "info") or "info").lower()


def main(argv: list[str] | None = None) -> None:
    """`python -m unigemma.server.run ...`: the serve command without the main CLI."""
    p = argparse.ArgumentParser(prog="unigemma serve", description="OpenAI-compatible server for Gemma 4 unified")
    add_serve_arguments(p)
    serve(p.parse_args(argv))


if __name__ == "__main__":
    main()
