"""The OpenAI-compatible HTTP server: `create_app(llm, settings)` and `ServerSettings`.

protocol.py (schemas) · app.py (routes, SSE, errors, auth, limits, metrics) · service.py (requests ↔ engine)
· media.py (safe media resolution) · run.py (`serve(args)`: uvicorn with graceful shutdown).
Both names are imported on first use, so the CLI can read run.py's flags without importing FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["create_app", "ServerSettings"]

if TYPE_CHECKING:
    from .app import create_app
    from .service import ServerSettings


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .service import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'unigemma.server' has no attribute {name!r}")
