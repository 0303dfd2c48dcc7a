"""The realtime WebSocket (`/v1/realtime`) and the web page (`/`): user turns prefilled while they arrive.

    client ──JSON──► session.update · input_text.append · input_audio.append · input_image.append
                     input.commit · input.clear · response.cancel
    server ──JSON──► session.created / session.updated · vad.speech_started / vad.speech_stopped
                     response.created · response.text.delta · response.reasoning.delta · response.tool_call
                     response.done (usage, status) · error (the connection stays usable)

    WebSocket handler (event loop) ── IncrementalPrompt pieces ──► RealtimeHub.tasks ──► engine worker thread:
        first piece: an open request (Request(open=True)) through BatchingEngine.submit
        later pieces: Scheduler.extend (prefilled on the worker's next steps); commit: extend(close=True)
    token events come back through the request's RequestHandle, as for /v1/chat/completions

The Engine is not thread-safe: only the BatchingEngine worker touches it. The hub wraps the worker's engine in a
thin proxy that runs queued tasks on that thread before each step and, while only open (idle) requests exist,
sleeps on the worker's condition instead of spinning. A disconnect cancels the session's request, which frees
its cache slot. `unigemma_realtime_sessions` in /metrics counts open sockets.

What this module does not do: prompt building or VAD (unigemma/realtime.py), the OpenAI routes (server/app.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import hmac
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from unigemma.engine.scheduler import PREFILL, RUNNING
from unigemma.inputs.media import MediaError

from .service import EngineRequest, RequestHandle

log = logging.getLogger("unigemma.server.realtime")

STATIC = Path(__file__).resolve().parent / "static"
MAX_FRAME_BYTES = 12 * 1024 * 1024     # one JSON frame (an image data URI is the largest thing sent)
MAX_AUDIO_CHUNK_S = 10.0               # one input_audio.append
MAX_TEXT_CHARS = 100_000
TURN_WAIT_S = 30.0                     # how long a new turn waits for a free realtime turn slot
IDLE_TURN_S = 60.0                     # an open turn with no input for this long is dropped (frees its slot)


class _Task:
    __slots__ = ("fn", "future", "rid")

    def __init__(self, rid: str, fn):
        self.rid, self.fn, self.future = rid, fn, concurrent.futures.Future()


class RealtimeHub:
    """Per app: runs session work on the engine worker, counts open sessions."""

    def __init__(self, service, max_sessions: int, max_turns: int | None = None):
        self.service = service
        self.be = service.engine
        self.tasks: collections.deque[_Task] = collections.deque()
        self.sessions = 0
        self.max_sessions = max_sessions
        # open turns hold an engine slot while the user speaks or types (possibly idle): at most this many at
        # once, so that HTTP requests always keep the other slots
        self.max_turns = max_turns if max_turns is not None else max(1, service.settings.max_concurrency // 2)
        self.open_turns = 0
        self.opening: set[str] = set()
        if not isinstance(self.be.engine, _WorkerEngine):
            self.be.engine = _WorkerEngine(self.be.engine, self)

    # --- any thread ------------------------------------------------------------------------------------
    def submit_open(self, req: EngineRequest, loop) -> RequestHandle:
        with self.be.cv:  # the worker admits under this lock: the id is registered before it can see the handle
            h = self.be.submit(req, loop)
            self.opening.add(h.id)
        return h

    def run(self, rid: str, fn) -> concurrent.futures.Future:
        t = _Task(rid, fn)
        with self.be.cv:
            self.tasks.append(t)
            self.be.cv.notify_all()
        return t.future

    # --- worker thread -----------------------------------------------------------------------------------
    def run_tasks(self, engine) -> None:
        if not self.tasks:
            return
        with self.be.cv:
            todo = list(self.tasks)
            self.tasks.clear()
            waiting = {h.id for h in self.be.pending}
        later = []
        for t in todo:
            if t.rid in waiting or any(x.rid == t.rid for x in later):
                later.append(t)  # its request is not admitted yet: keep the order, run it on a later turn
                continue
            if not t.future.set_running_or_notify_cancel():
                continue
            try:
                t.future.set_result(t.fn(engine))
            except Exception as e:  # noqa: BLE001 - any failure goes back to the session as an error event
                t.future.set_exception(e)
        if later:
            with self.be.cv:
                self.tasks.extendleft(reversed(later))

    def wait_idle(self, engine) -> None:
        """Sleep while the only work is open requests with nothing to prefill (woken by tasks, new requests,
        cancellations)."""
        s = engine.scheduler
        # waiting requests are only work when a slot is free: open requests may hold every slot for a while
        if (s.waiting and len(s.slots) < engine.runner.max_slots) or s.pending or any(q.status == RUNNING or (q.status == PREFILL and q.computed < len(q.tokens))
                                         for q in s.slots):
            return
        be = self.be
        with be.cv:
            if not self.tasks and not be.pending and not be.stopping and \
                    not any(h.cancelled for h in be.active.values()):
                be.cv.wait(timeout=0.25)


class _WorkerEngine:
    """The worker's Engine with the hub's tasks run before every step (see the module docstring)."""

    def __init__(self, engine, hub: RealtimeHub):
        self._engine = engine
        self._hub = hub

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def add(self, request) -> str:
        if request.request_id in self._hub.opening:
            self._hub.opening.discard(request.request_id)
            request.open = True
        return self._engine.add(request)

    @property
    def has_work(self) -> bool:
        self._hub.run_tasks(self._engine)
        return self._engine.has_work

    def step(self):
        self._hub.run_tasks(self._engine)
        self._hub.wait_idle(self._engine)
        self._hub.run_tasks(self._engine)
        return self._engine.step()


# ------------------------------------------------------------------------------------------------------------
# one connection
# ------------------------------------------------------------------------------------------------------------

class ClientError(ValueError):
    def __init__(self, message: str, code: str = "invalid_event"):
        super().__init__(message)
        self.code = code


class _Connection:
    def __init__(self, ws: WebSocket, hub: RealtimeHub):
        self.ws = ws
        self.hub = hub
        self.service = hub.service
        self.llm = hub.service.llm
        self.loop = asyncio.get_running_loop()
        self.config: dict[str, Any] = {"instructions": None, "thinking": False, "temperature": 0.0,
                                       "max_tokens": 512, "vad": False, "tools": None}
        self.messages: list[dict] = []
        self.prompt = None          # realtime.IncrementalPrompt of the open turn
        self.handle: RequestHandle | None = None
        self.vad = None
        self.responding: asyncio.Task | None = None
        self.responding_handle: RequestHandle | None = None
        self.send_lock = asyncio.Lock()
        self.holds_turn = False     # counted in hub.open_turns (an open turn holding an engine slot)

    async def send(self, event: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event, ensure_ascii=False))

    async def error(self, message: str, code: str = "invalid_event") -> None:
        await self.send({"type": "error", "error": {"message": message, "code": code}})

    # --- turn plumbing -------------------------------------------------------------------------------------
    def _release_turn(self) -> None:
        if self.holds_turn:
            self.holds_turn = False
            self.hub.open_turns -= 1

    def _params(self):
        from unigemma.engine.generate import sampling_params

        c = self.config
        return sampling_params(self.llm, max_tokens=c["max_tokens"], temperature=c["temperature"])

    async def _prompt(self):
        from unigemma.realtime import IncrementalPrompt

        if self.responding is not None and not self.responding.done():
            raise ClientError("a response is in progress: wait for response.done or send response.cancel",
                              "response_in_progress")
        if self.prompt is None:
            await self._acquire_turn()
            try:
                c = self.config
                self.prompt = await run_in_threadpool(
                    lambda: IncrementalPrompt(self.llm, self.messages, system=c["instructions"], tools=c["tools"],
                                              enable_thinking=c["thinking"], resolve=self._resolve,
                                              max_audio_seconds=self.service.settings.max_audio_seconds))
                pieces = [self.prompt.head()] if self.prompt.head().ids else []
                await self._apply(pieces)
            except BaseException:
                await self._drop_turn()
                raise
        return self.prompt

    async def _acquire_turn(self) -> None:
        """Wait (up to TURN_WAIT_S) until fewer than hub.max_turns turns are open, then count this one. An open
        turn holds an engine slot even while its user is silent, so only that many may be open at once: the
        other slots stay for HTTP requests however many live sessions idle."""
        deadline = self.loop.time() + TURN_WAIT_S
        while self.hub.open_turns >= self.hub.max_turns:
            if self.loop.time() >= deadline:
                raise ClientError(f"all {self.hub.max_turns} realtime turn slots stayed busy for {TURN_WAIT_S:g} s "
                                  "(the other slots are kept for HTTP requests); try again later, or raise "
                                  "--max-realtime-turns", "realtime_busy")
            await asyncio.sleep(0.02)
        self.hub.open_turns += 1
        self.holds_turn = True

    async def _apply(self, pieces, close: bool = False) -> None:
        pieces = [p for p in pieces if p.ids or p.rewind]
        if self.handle is None:
            if not pieces:
                return
            first, pieces = pieces[0], pieces[1:]
            self.handle = self.hub.submit_open(EngineRequest(first.ids, self._params(), first.media or {}),
                                               self.loop)
        rid = self.handle.id

        def apply(eng, p, last: bool) -> None:
            if p.rewind:
                eng.scheduler.rewind(rid, p.rewind)
            eng.scheduler.extend(rid, p.ids, p.media, close=last)

        for i, p in enumerate(pieces):
            last = close and i == len(pieces) - 1
            await asyncio.wrap_future(self.hub.run(rid, lambda eng, p=p, last=last: apply(eng, p, last)))
        if close and not pieces:
            await asyncio.wrap_future(self.hub.run(rid, lambda eng: eng.scheduler.extend(rid, [], None, close=True)))

    def _resolve(self, kind: str, src):
        """The server's media policy for history media: data: URIs / base64 (and --media-root paths, remote URLs
        only when the server allows them). Tuples are waveforms this connection made itself (JSON has none)."""
        from unigemma.inputs.media import decode_base64

        from .media import fetch

        if isinstance(src, tuple):
            return src
        if not isinstance(src, str):
            raise MediaError(f"{kind}: expected a data: URI (or base64 audio), got {type(src).__name__}")
        policy = self.service.policy
        if kind == "audio" and not src.startswith("data:"):
            return decode_base64(src, what="audio", max_bytes=policy.max_bytes)
        return fetch(src, policy, kind)

    async def _drop_turn(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle, self.prompt, self.vad = None, None, None
        self._release_turn()

    # --- events ----------------------------------------------------------------------------------------------
    async def handle_event(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "session.update":
            await self._update(ev.get("session"))
        elif kind == "input_text.append":
            text = ev.get("text")
            if not isinstance(text, str):
                raise ClientError("input_text.append needs 'text' (a string)")
            if len(text) > MAX_TEXT_CHARS:
                raise ClientError(f"text of {len(text)} characters is over the limit of {MAX_TEXT_CHARS}",
                                  "chunk_too_large")
            p = await self._prompt()
            await self._apply(p.append_text(text))
        elif kind == "input_audio.append":
            await self._audio(ev)
        elif kind == "input_image.append":
            image = ev.get("image")
            if not isinstance(image, str) or not image.startswith("data:image/"):
                raise ClientError("input_image.append needs 'image': a data:image/...;base64,... URI")
            budget = ev.get("max_soft_tokens")
            p = await self._prompt()
            pieces = await run_in_threadpool(p.append_image, image, budget)
            await self._apply(pieces)
        elif kind == "input.commit":
            await self.commit()
        elif kind == "input.clear":
            await self._drop_turn()
            await self.send({"type": "input.cleared"})
        elif kind == "response.cancel":
            if self.responding is None or self.responding.done():
                raise ClientError("no response is in progress", "no_response")
            self.responding_handle.cancel()
        else:
            raise ClientError(f"unknown event type {kind!r}; expected session.update, input_text.append, "
                              "input_audio.append, input_image.append, input.commit, input.clear or "
                              "response.cancel")

    async def _update(self, s) -> None:
        if not isinstance(s, dict):
            raise ClientError("session.update needs 'session': an object")
        c, messages = dict(self.config), self.messages
        checks = {"instructions": lambda v: v is None or isinstance(v, str),
                  "thinking": lambda v: isinstance(v, bool), "vad": lambda v: isinstance(v, bool),
                  "temperature": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 2,
                  "max_tokens": lambda v: isinstance(v, int) and 1 <= v <= self.service.max_model_len,
                  "tools": lambda v: v is None or isinstance(v, list)}
        for key, value in s.items():
            if key in checks and checks[key](value):
                c[key] = float(value) if key == "temperature" else value
            elif key == "messages" and isinstance(value, list):
                from unigemma.inputs.template import normalize_messages

                if self.prompt is not None or (self.responding is not None and not self.responding.done()):
                    raise ClientError("session.messages can only be replaced between turns", "turn_in_progress")
                normalize_messages(value)  # shape errors now, not at the next append
                messages = list(value)
            else:
                raise ClientError(f"session.{key}={value!r} is not valid (instructions: string, thinking / vad: "
                                  f"bool, temperature: 0..2, max_tokens: 1..{self.service.max_model_len}, "
                                  "tools: list, messages: list of chat messages)", "invalid_session")
        self.config, self.messages = c, messages  # all or nothing
        await self.send({"type": "session.updated", "session": c, "messages": len(self.messages)})

    async def _audio(self, ev: dict) -> None:
        from unigemma.realtime import EnergyVAD, pcm16_to_float

        data, fmt = ev.get("audio"), ev.get("format", "pcm16")
        if not isinstance(data, str):
            raise ClientError("input_audio.append needs 'audio': base64 PCM16 (or float32) 16 kHz mono samples")
        limit = int(MAX_AUDIO_CHUNK_S * 16000 * (2 if fmt == "pcm16" else 4) * 4 / 3) + 8
        if len(data) > limit:
            raise ClientError(f"audio chunk over the limit of {MAX_AUDIO_CHUNK_S:g} s; send smaller chunks",
                              "chunk_too_large")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("input_audio.append: 'audio' is not valid base64") from None
        if fmt == "pcm16":
            wave = pcm16_to_float(raw)
        elif fmt == "float32":
            if len(raw) % 4:
                raise ClientError("float32 audio must have a multiple of 4 bytes")
            wave = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            raise ClientError(f"audio format {fmt!r} is not supported; use 'pcm16' or 'float32' (16 kHz mono)")
        p = await self._prompt()
        await self._apply(p.append_audio(wave))
        if self.config["vad"]:
            self.vad = self.vad or EnergyVAD()
            for e in self.vad.feed(wave):
                await self.send({"type": f"vad.{e.kind}", "audio_ms": round(1000 * e.seconds)})
                if e.kind == "speech_stopped":
                    await self.commit()
                    return

    async def commit(self) -> None:
        from unigemma.outputs.parser import ResponseParser, start_state_for_prompt

        p = await self._prompt()
        await self._apply(p.close(), close=True)
        h = self.handle
        names = [t.get("function", {}).get("name") for t in (self.config["tools"] or []) if isinstance(t, dict)]
        parser = ResponseParser(start_state_for_prompt(p.rendered), tool_names=names or None)
        user, n_prompt = p.message(), len(p.ids)
        self.prompt, self.handle, self.vad = None, None, None
        self._release_turn()  # the turn now generates like any request: no longer an idle slot
        self.responding_handle = h
        await self.send({"type": "response.created", "prompt_tokens": n_prompt})
        self.responding = asyncio.create_task(self._respond(h, parser, user, n_prompt))

    async def _respond(self, h: RequestHandle, parser, user: dict, n_prompt: int) -> None:
        from unigemma.outputs.parser import ContentDelta, ReasoningDelta, ToolCallEnd, ToolCallStart

        content, reasoning, calls, names = [], [], [], {}
        reason, n = None, 0
        try:
            async for out in h:
                if out.error is not None:
                    await self.error(out.error, "engine_error")
                if out.token_id >= 0:
                    n += 1
                stop = self.service._stop_text(out) if out.finished else ""
                evs = parser.feed(out.text + stop) + (parser.finish() if out.finished else [])
                for pe in evs:
                    if isinstance(pe, ContentDelta):
                        content.append(pe.text)
                        await self.send({"type": "response.text.delta", "delta": pe.text})
                    elif isinstance(pe, ReasoningDelta):
                        reasoning.append(pe.text)
                        await self.send({"type": "response.reasoning.delta", "delta": pe.text})
                    elif isinstance(pe, ToolCallStart):
                        names[pe.index] = (pe.id, pe.name)
                    elif isinstance(pe, ToolCallEnd) and pe.arguments is not None:
                        cid, name = names.get(pe.index, (None, None))
                        call = {"id": cid, "type": "function",
                                "function": {"name": name, "arguments": json.dumps(pe.arguments, ensure_ascii=False)}}
                        calls.append(call)
                        await self.send({"type": "response.tool_call", "tool_call": call})
                if out.finished:
                    reason = out.finish_reason
        finally:
            h.cancel()
        status = "cancelled" if reason == "abort" else ("failed" if reason == "error" else "completed")
        if status == "completed":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
            if calls:
                msg["tool_calls"] = calls
            self.messages += [user, msg]
        finish = "tool_calls" if calls else ("length" if reason == "length" else reason)
        await self.send({"type": "response.done", "status": status, "finish_reason": finish,
                         "content": "".join(content), "reasoning": "".join(reasoning),
                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                                   "total_tokens": n_prompt + n}})

    async def close(self) -> None:
        if self.responding is not None and not self.responding.done():
            self.responding.cancel()
            try:
                await self.responding
            except asyncio.CancelledError:
                pass  # what close() asked for
            except Exception:  # the socket is gone: nothing to report to
                log.debug("response task ended with an error after the disconnect", exc_info=True)
        await self._drop_turn()


def _authorized(ws: WebSocket, key: str | None) -> bool:
    if not key:
        return True
    auth = ws.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else \
        (ws.headers.get("api-key", "").strip() or ws.query_params.get("api_key", ""))   # as the HTTP guard
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


def _origin_allowed(ws: WebSocket, allowed: tuple[str, ...]) -> bool:
    """No Origin (not a browser), the server's own origin (its web page), or one configured with --allowed-origin."""
    import urllib.parse

    origin = ws.headers.get("origin")
    if origin is None or "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}:
        return True
    host = ws.headers.get("host", "")
    parsed = urllib.parse.urlsplit(origin)
    return parsed.scheme in ("http", "https") and bool(host) and parsed.netloc.lower() == host.lower()


def install_realtime(app: FastAPI) -> RealtimeHub:
    """Add /v1/realtime, the web page (/ and /static/...) and the sessions gauge to an app made by create_app."""
    from fastapi.staticfiles import StaticFiles
    from prometheus_client import Gauge

    service, settings, metrics = app.state.service, app.state.settings, app.state.metrics
    hub = RealtimeHub(service, max_sessions=settings.max_concurrency + settings.max_queue,
                      max_turns=settings.realtime_turns)
    app.state.realtime = hub
    Gauge("unigemma_realtime_sessions", "open /v1/realtime WebSocket sessions",
          registry=metrics.registry).set_function(lambda: hub.sessions)

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        if not _authorized(ws, settings.api_key):
            await ws.close(code=1008, reason="missing or incorrect API key")
            return
        if settings.api_key is None and not _origin_allowed(ws, settings.allowed_origins):
            # browsers send Origin on every WebSocket: without this, any web page the user visits could drive a
            # key-less local server (non-browser clients send no Origin and are not affected)
            await ws.close(code=1008, reason="this Origin may not open /v1/realtime (see --allowed-origin)")
            return
        if hub.sessions >= hub.max_sessions:
            await ws.close(code=1013, reason=f"too many realtime sessions (limit {hub.max_sessions})")
            return
        await ws.accept()
        hub.sessions += 1
        conn = _Connection(ws, hub)
        try:
            await conn.send({"type": "session.created", "session": conn.config, "model": settings.model_name})
            while True:
                try:
                    msg = await asyncio.wait_for(ws.receive(), timeout=IDLE_TURN_S if conn.prompt else None)
                except asyncio.TimeoutError:
                    # an open turn holds a cache slot: a client that went quiet must not hold it forever
                    await conn._drop_turn()
                    await conn.error(f"the open turn was dropped after {IDLE_TURN_S:g} s without input",
                                     "turn_timeout")
                    continue
                if msg["type"] == "websocket.disconnect":
                    break
                text = msg.get("text")
                if text is None:
                    text = (msg.get("bytes") or b"").decode("utf-8", "replace")
                if len(text) > MAX_FRAME_BYTES:
                    await conn.error(f"frame of {len(text)} bytes is over the limit of {MAX_FRAME_BYTES}",
                                     "frame_too_large")
                    continue
                try:
                    ev = json.loads(text)
                    if not isinstance(ev, dict):
                        raise ClientError("each frame must be a JSON object with a 'type'")
                    await conn.handle_event(ev)
                except json.JSONDecodeError as e:
                    await conn.error(f"frame is not valid JSON: {e}", "invalid_json")
                except ClientError as e:
                    await conn.error(str(e), e.code)
                except (MediaError, ValueError) as e:
                    await conn.error(str(e), "invalid_input")
                    await conn._drop_turn()  # the turn may be half-applied: start the next one clean
        except WebSocketDisconnect:
            pass
        except Exception:  # a bug: log it, free the session, close the socket
            log.exception("realtime session failed")
        finally:
            hub.sessions -= 1
            await conn.close()

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC / "index.html", media_type="text/html")

    return hub
