"""The OpenAI-compatible HTTP server: `create_app(llm, settings)` and `ServerSettings`.

protocol.py (schemas) · app.py (routes, SSE, errors, auth, limits, metrics) · service.py (requests ↔ engine)
· media.py (safe media resolution) · run.py (`serve(args)`: uvicorn with graceful shutdown).
"""

from .app import create_app
from .service import ServerSettings

__all__ = ["create_app", "ServerSettings"]
