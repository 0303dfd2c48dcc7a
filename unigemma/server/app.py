"""The HTTP layer: the FastAPI app (`create_app`), its routes, SSE streaming, errors, auth, limits and metrics.

    request ─► ASGI guard (API key, constant-time; body size → 413; status counting)
            ─► route: JSON → protocol.py model (400 / 422) → model name (404) → admission (429 + Retry-After)
            ─► service.py: prepare (thread pool: template, media, tokens) → engine → response
            ─► JSON, or SSE `data: {chunk}\\n\\n` … `data: [DONE]\\n\\n`

Every failure, including unknown routes and bugs, answers with the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`. A client that disconnects cancels its generation: SSE
streams are cancelled by the server when the socket closes; non-streaming requests are watched for a
disconnect while they wait.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health,
GET /metrics (Prometheus text format, one registry per app); POST /v1/audio/transcriptions (transcription.py);
POST /v1/responses, GET / DELETE /v1/responses/{id} (responses.py); POST /v1/embeddings (embeddings.py).

What this module does not do: request → engine translation (server/service.py), schemas (server/protocol.py),
starting uvicorn (server/run.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, error_body,
                       parse_request)
from .service import Observer, ServerSettings, Service, count_sequences

log = logging.getLogger("unigemma.server")

_TYPE_FOR_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                    422: "invalid_request_error", 429: "rate_limit_error"}


def _error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                    code: str | None = None, headers: dict | None = None) -> JSONResponse:
    type = type or _TYPE_FOR_STATUS.get(status, "server_error")
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


# --- metrics ---------------------------------------------------------------------------------------------------

class Metrics(Observer):
    """Prometheus metrics in a registry of their own (several apps may live in one process, e.g. in tests)."""

    def __init__(self, service_stats):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("unigemma_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("unigemma_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("unigemma_prompt_cached_tokens", "prompt tokens served from the prefix cache",
                                     registry=r)
        self.generated = Counter("unigemma_generation_tokens", "generated tokens of finished requests", registry=r)
        buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("unigemma_time_to_first_token_seconds", "time from submission to the first token",
                              buckets=buckets, registry=r)
        self.itl = Histogram("unigemma_inter_token_latency_seconds", "time between consecutive tokens",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.latency = Histogram("unigemma_request_duration_seconds", "end-to-end request time",
                                 buckets=buckets, registry=r)
        stats = service_stats
        for name, doc, key in (("unigemma_requests_running", "sequences being decoded", "running"),
                               ("unigemma_requests_queued", "sequences waiting for a slot", "queued"),
                               ("unigemma_kv_cache_used_tokens", "tokens held in the KV cache by running sequences",
                                "kv_used_tokens"),
                               ("unigemma_kv_cache_capacity_tokens", "tokens the KV cache can hold",
                                "kv_capacity_tokens")):
            Gauge(name, doc, registry=r).set_function(lambda key=key: stats()[key])
        Gauge("unigemma_kv_cache_usage_ratio", "fraction of the KV cache in use", registry=r).set_function(
            lambda: stats()["kv_used_tokens"] / max(1, stats()["kv_capacity_tokens"]))
        Gauge("unigemma_prefix_cache_hit_rate", "cached prompt tokens / prompt tokens since start",
              registry=r).set_function(lambda: stats()["cached_tokens_total"] / max(1, stats()["prompt_tokens_total"]))
        Gauge("unigemma_in_flight_sequences", "admitted sequences (running + queued + being prepared)",
              registry=r).set_function(lambda: stats()["in_flight"])
        Gauge("unigemma_spec_decode_acceptance_rate", "accepted / drafted speculative tokens since start",
              registry=r).set_function(lambda: stats()["accepted_tokens_total"] / max(1, stats()["drafted_tokens_total"]))
        Gauge("unigemma_spec_decode_drafted_tokens", "speculative draft tokens verified since start",
              registry=r).set_function(lambda: stats()["drafted_tokens_total"])

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)


# --- ASGI guard: auth, body size, status counting ---------------------------------------------------------------

class _Guard:
    """Runs before routing, so unknown routes are also behind the key and every response is counted."""

    # The web page and its static files load before a browser can send a key; the page then sends it on every
    # API call (and the WebSocket checks it itself).
    OPEN_PATHS = ("/health", "/")
    OPEN_PREFIXES = ("/static/",)

    def __init__(self, app, settings: ServerSettings, metrics: Metrics):
        self.app = app
        self.key = settings.api_key.encode() if settings.api_key else None
        self.max_body = settings.max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status_box = {"status": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if self.key is not None and path not in self.OPEN_PATHS and not path.startswith(self.OPEN_PREFIXES):
                auth = headers.get("authorization", "")
                given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
                # Azure-style clients send the key as `api-key: KEY`
                given = given or headers.get("api-key", "").strip().encode()
                # compare_digest takes the same time wherever the first difference is
                if not given or not hmac.compare_digest(given, self.key):
                    resp = _error_response(401, "Incorrect or missing API key; send 'Authorization: Bearer KEY' "
                                                "or 'api-key: KEY'",
                                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                    return await resp(scope, receive, counting_send)
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                resp = _error_response(413, f"request body of {length} bytes is over the limit of {self.max_body} "
                                            "bytes", code="request_too_large")
                return await resp(scope, receive, counting_send)
            seen = 0

            async def limited_receive():
                # chunked bodies carry no length: count what arrives
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise APIError(413, f"request body is over the limit of {self.max_body} bytes",
                                       code="request_too_large")
                return message

            await self.app(scope, limited_receive, counting_send)
        finally:
            route = path if path in _KNOWN_ROUTES else "other"
            self.metrics.requests.labels(route, str(status_box["status"])).inc()


_KNOWN_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                 "/v1/audio/transcriptions", "/v1/responses", "/v1/embeddings"}


# --- the app ---------------------------------------------------------------------------------------------------

def create_app(llm, settings: ServerSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app over a loaded `unigemma.LLM`. The engine thread starts with the app's lifespan."""
    from contextlib import asynccontextmanager

    settings = settings or ServerSettings()
    service = Service(llm, settings)

    def stats() -> dict[str, Any]:
        s = service.engine.stats()
        s.update(prompt_tokens_total=service.engine.prompt_tokens_total,
                 cached_tokens_total=service.engine.cached_tokens_total, in_flight=service.in_flight,
                 drafted_tokens_total=service.engine.drafted_tokens_total,
                 accepted_tokens_total=service.engine.accepted_tokens_total)
        return s

    metrics = Metrics(stats)
    service.observer = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.shutdown)

    app = FastAPI(title="unigemma", version=_version(), lifespan=lifespan)
    app.state.service = service
    app.state.metrics = metrics
    app.state.settings = settings
    app.add_middleware(_Guard, settings=settings, metrics=metrics)
    if settings.allowed_origins:
        # outside the guard (added last = outermost): a browser's preflight carries no key and must be answered
        # here; the real request that follows carries it. The server's own page is same-origin and needs none.
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=[IGNORED_HEADER], max_age=600)

    # --- errors ---
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        return _error_response(exc.status_code, msg, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        return _error_response(422, f"{'.'.join(map(str, e['loc']))}: {e['msg']}")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    async def read_json(request: Request) -> Any:
        body = await request.body()
        # no deeper than the number of openers: most bodies are settled by two C-speed counts
        depth = json_depth(body) if body.count(b"[") + body.count(b"{") > settings.max_json_depth else 0
        if depth > settings.max_json_depth:  # before parsing: deep nesting costs recursion in every later stage
            raise APIError(400, f"the request body's JSON is nested {depth} levels deep, over the limit of "
                                f"{settings.max_json_depth} (--max-json-depth)", code="json_too_deep")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body's JSON is nested too deeply", code="json_too_deep") from None

    # --- routes ---
    @app.get("/health")
    async def health():
        if not service.engine.healthy:  # the worker died: a supervisor should restart the process
            return JSONResponse({"status": "unhealthy", "model": settings.model_name,
                                 "reason": service.engine.dead or "the engine worker is not running"},
                                status_code=503)
        return {"status": "ok", "model": settings.model_name}

    @app.get("/metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=service.created, max_model_len=service.max_model_len)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[card(name) for name in service.model_names])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(model_id: str):
        service.check_model(model_id)
        return card(model_id if model_id in service.model_names else settings.model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(ChatCompletionRequest, await read_json(request))
        service.check_model(req.model)
        service.check_request(req)
        return await _run(request, req, lambda: service.prepare_chat(req),
                          lambda prep: service.chat_stream(req, prep), lambda prep: service.chat(req, prep))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(CompletionRequest, await read_json(request))
        service.check_model(req.model)
        service.check_request(req)
        return await _run(request, req, lambda: service.prepare_completion(req),
                          lambda prep: service.completion_stream(req, prep),
                          lambda prep: service.completion(req, prep))

    def _chat_frame(chunk: dict) -> bytes:
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def _chat_error(e: APIError) -> bytes:  # the status line is already sent: report in-band, as OpenAI does
        return b"data: " + json.dumps(error_body(e.message, e.type, e.param, e.code)).encode() + b"\n\n"

    async def _run(request: Request, req, prepare, stream, whole, frame=_chat_frame, error_frame=_chat_error,
                   done: bytes = b"data: [DONE]\n\n", ignored: list[str] | None = None):
        """Admission, preparation in a thread, then the whole response as JSON or the chunks as SSE (each chunk
        through `frame`; an error after the status line through `error_frame`; `done` last). Responses API
        streams pass their own framing (named events, no [DONE])."""
        n = count_sequences(req)
        service.admit(n)
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                service.release(n)

        t0 = time.perf_counter()
        handed_off = False  # once the SSE generator exists, it releases the admission when it ends
        extra_headers = ignored_header(req, ignored)
        try:
            prep = await run_in_threadpool(prepare)
            if req.stream:
                chunks = stream(prep)
                handed_off = True

                async def sse() -> AsyncIterator[bytes]:
                    try:
                        async for chunk in chunks:
                            # json.dumps ASCII-escapes: no raw U+2028 / U+0085 in an event, which line splitters
                            # that follow str.splitlines (many SSE clients) would cut in the middle of the JSON
                            yield frame(chunk)
                    except APIError as e:
                        yield error_frame(e)
                    finally:
                        await chunks.aclose()
                        metrics.latency.observe(time.perf_counter() - t0)
                        release()
                    if done:
                        yield done

                return StreamingResponse(sse(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                  **extra_headers})
            result = await _until_disconnect(request, whole(prep))
            metrics.latency.observe(time.perf_counter() - t0)
            return JSONResponse(result, headers=extra_headers)
        finally:
            if not handed_off:
                release()

    app.state.run = _run            # for the routes other modules install (responses.py)
    app.state.read_json = read_json
    from .realtime_ws import install_realtime  # /v1/realtime (streaming-input sessions) and the web page at /
    install_realtime(app)
    from .transcription import install_transcriptions  # /v1/audio/transcriptions (multipart, Whisper's shape)
    install_transcriptions(app)
    from .responses import install_responses  # /v1/responses (create, retrieve, delete)
    install_responses(app)
    from .embeddings import install_embeddings  # /v1/embeddings (pooled final hidden states)
    install_embeddings(app)
    return app


IGNORED_HEADER = "x-unigemma-ignored-fields"


def ignored_header(req, names: list[str] | None = None) -> dict[str, str]:
    """The request policy's report: fields the request set that a local model ignores, as a response header
    (and a log line), so a client can see they had no effect."""
    if names is None:
        names = req.ignored_fields() if hasattr(req, "ignored_fields") else []
    if not names:
        return {}
    log.info("request fields ignored (no effect on a local model): %s", ", ".join(names))
    return {IGNORED_HEADER: ", ".join(names)}


async def _until_disconnect(request: Request, coro) -> Any:
    """Await `coro`, cancelling it (and so its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected", code="client_closed")
    finally:
        if not task.done():
            task.cancel()


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # unrolled: a 30 MB string in ~0.1 s


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, without parsing it (strings are skipped, so brackets
    inside them do not count). Linear and in C: a regex drops the strings, numpy counts the brackets."""
    import numpy as np

    if b"[" not in body and b"{" not in body:
        return 0
    skeleton = np.frombuffer(_STRING.sub(b"", body), dtype=np.uint8)
    step = np.zeros(256, dtype=np.int64)
    step[ord("[")] = step[ord("{")] = 1
    step[ord("]")] = step[ord("}")] = -1
    moves = step[skeleton]
    return int(np.cumsum(moves).max(initial=0))


def _version() -> str:
    from unigemma import __version__
    return __version__
