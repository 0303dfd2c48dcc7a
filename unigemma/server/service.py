"""The server's logic: OpenAI request → prompt ids + media tensors → engine requests → OpenAI response.

This is the only module that knows both shapes: the HTTP side (pydantic requests from protocol.py, OpenAI
response dicts and SSE chunks) and the engine side (token ids, tensors, SamplingParams, token events)::

    ChatCompletionRequest
      │ messages ─► ChatTemplate.render (sandboxed; tools, enable_thinking) ─► prompt text
      │ media parts ─► server/media.py (policy) ─► ImageFeatures / audio segments / VideoFeatures
      │ prompt text: each <|image|> / <|audio|> / <|video|> expanded to BOI + N soft tokens + EOI ─► token ids
      │ response_format / forced tools ─► llguidance grammar (engine/constraints.py)
      ▼
    EngineRequest × n ──► engine (continuous batching) ──► StepOutput stream per choice
      │ text deltas ─► ResponseParser (reasoning / content / tool calls)
      ▼
    chat.completion dict, or chat.completion.chunk dicts for SSE

`BatchingEngine` runs the engine (unigemma.engine.Engine: continuous batching, chunked prefill, prefix cache,
speculative decoding, grammar masks) in one worker thread; the service talks to it only through
`submit(EngineRequest) -> RequestHandle` and `stats()`.

What this module does not do: HTTP (routing, auth, limits, SSE framing: server/app.py), fetching media
(server/media.py), the model forward (model/), sampling maths (engine/sampling.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch

from unigemma.engine.sampling import SamplingParams
from unigemma.inputs.media import MediaError

from . import media as server_media
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("unigemma.server")

AUDIO, IMAGE, VIDEO = "<|audio|>", "<|image|>", "<|video|>"
_PLACEHOLDER_RE = re.compile(re.escape(IMAGE) + "|" + re.escape(AUDIO) + "|" + re.escape(VIDEO))


@dataclass
class ServerSettings:
    """Everything `unigemma serve` can be told, validated on construction (a bad value raises ValueError naming
    the field, the value and what would be accepted).

    The limits are checked before the work they protect (README "Limits and safety"): the body size before it is
    read, JSON depth before it is parsed, prompt characters before the chat template and the tokenizer run, stop
    strings before the engine sees them, image sides / pixels / decoded bytes from the file header before a pixel
    is decoded.
    """

    model_name: str = "unigemma"            # the served id (responses carry it)
    model_aliases: tuple[str, ...] = ()     # further names clients may send for it
    accept_any_model_name: bool = False     # one model is served: any name in `model` means it
    api_key: str | None = None
    max_concurrency: int = 8         # sequences decoded together (engine slots)
    max_queue: int = 64              # sequences waiting for a slot; past it: 429
    max_model_len: int | None = None  # context per sequence (None: the model's, capped at 8192)
    max_body_bytes: int = 32 * 1024 * 1024
    media_root: Path | None = None
    allow_remote_media: bool = False
    remote_timeout_s: float = 10.0
    max_media_bytes: int = server_media.DEFAULT_MAX_MEDIA_BYTES
    default_max_tokens: int | None = None  # None: until the context is full
    max_prompt_chars: int = 1_000_000       # characters of text in one request's messages / prompts
    max_stop_chars: int = 1024              # characters in one stop string (at most 4 of them)
    max_json_depth: int = 64                # nesting of the request body's JSON
    max_image_pixels: int = 50_000_000      # width × height of one image (from its header)
    max_image_side: int = 16_384            # its longer side, in pixels
    max_image_decoded_bytes: int = 256 * 1024 * 1024  # width × height × bytes per pixel once decoded
    max_audio_seconds: float = 600.0        # one audio clip (and one realtime turn's audio)
    max_video_seconds: float = 600.0        # one video
    max_video_frames: int = 32              # frames sampled from one video
    max_realtime_turns: int | None = None   # open realtime turns holding a slot (None: half the slots, >= 1)
    allowed_origins: tuple[str, ...] = ()   # browser origins besides the server's own that may open /v1/realtime
    max_stored_responses: int = 256         # /v1/responses kept in memory for retrieve / previous_response_id
    max_embedding_inputs: int = 256         # inputs in one /v1/embeddings request
    max_embedding_tokens: int = 65_536      # tokens over all inputs of one /v1/embeddings request

    def __post_init__(self) -> None:
        positive = ("max_concurrency", "max_body_bytes", "max_media_bytes", "max_prompt_chars", "max_stop_chars",
                    "max_json_depth", "max_image_pixels", "max_image_side", "max_image_decoded_bytes",
                    "max_video_frames", "max_stored_responses", "max_embedding_inputs", "max_embedding_tokens")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServerSettings.{name}={v!r}: expected an integer >= 1")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"ServerSettings.max_queue={self.max_queue!r}: expected an integer >= 0")
        for name in ("max_model_len", "default_max_tokens", "max_realtime_turns"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ServerSettings.{name}={v!r}: expected None or an integer >= 1")
        if self.max_realtime_turns is not None and self.max_realtime_turns > self.max_concurrency:
            raise ValueError(f"ServerSettings.max_realtime_turns={self.max_realtime_turns} is more than "
                             f"max_concurrency={self.max_concurrency}: realtime turns would leave no slot to HTTP "
                             "requests; use at most max_concurrency")
        for name in ("remote_timeout_s", "max_audio_seconds", "max_video_seconds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"ServerSettings.{name}={v!r}: expected a number of seconds > 0")
        if isinstance(self.model_aliases, str):
            self.model_aliases = (self.model_aliases,)
        self.model_aliases = tuple(a for a in self.model_aliases if a != self.model_name)
        for a in (self.model_name, *self.model_aliases):
            if not isinstance(a, str) or not a.strip():
                raise ValueError(f"ServerSettings model name {a!r}: expected a non-empty string")
        if isinstance(self.allowed_origins, str):
            self.allowed_origins = (self.allowed_origins,)
        self.allowed_origins = tuple(self.allowed_origins)
        for o in self.allowed_origins:
            if not (isinstance(o, str) and (o == "*" or o.startswith(("http://", "https://")))):
                raise ValueError(f"ServerSettings.allowed_origins: {o!r} is not an origin; expected "
                                 "'http(s)://host[:port]' or '*'")

    @property
    def realtime_turns(self) -> int:
        """Open realtime turns allowed at once: the rest of the slots stay for HTTP requests."""
        if self.max_realtime_turns is not None:
            return self.max_realtime_turns
        return max(1, self.max_concurrency // 2)

    def media_policy(self) -> server_media.MediaPolicy:
        return server_media.MediaPolicy(media_root=self.media_root, allow_remote=self.allow_remote_media,
                                        remote_timeout_s=self.remote_timeout_s, max_bytes=self.max_media_bytes,
                                        max_pixels=self.max_image_pixels, max_side=self.max_image_side,
                                        max_decoded_bytes=self.max_image_decoded_bytes,
                                        max_audio_seconds=self.max_audio_seconds,
                                        max_video_seconds=self.max_video_seconds,
                                        max_video_frames=self.max_video_frames)


# --- engine side ---------------------------------------------------------------------------------------------

@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    media: dict[str, Any] = field(default_factory=dict)   # model.run keyword tensors
    constraint: Any = None                                 # engine.constraints.CompiledGrammar or None
    reusable_prefix: int | None = None                     # tokens before the first media token (prefix reuse)
    skip_special_tokens: bool = False


@dataclass
class StepOutput:
    token_id: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    error_status: int = 400    # 400: the request was refused; 500: the engine failed on it (logged)


class RequestHandle:
    """One engine request as the async side sees it: an async iterator of StepOutput, and `cancel()`."""

    def __init__(self, engine: "BatchingEngine", req: EngineRequest, loop: asyncio.AbstractEventLoop):
        self.id = uuid.uuid4().hex
        self.engine = engine
        self.req = req
        self.loop = loop
        self.queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self.cancelled = False
        self.cached_tokens = 0
        self.num_generated = 0
        self.done = False

    def _emit(self, out: StepOutput) -> None:  # worker thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            self.cancelled = True

    def _emit_many(self, outs: list[StepOutput]) -> None:  # worker thread
        """One step's outputs in one callback, so the stream sees them together (a DiffusionGemma canvas, a run
        of accepted drafts) and folds their text into one event."""
        try:
            self.loop.call_soon_threadsafe(self._put_all, outs)
        except RuntimeError:
            self.cancelled = True

    def _put_all(self, outs: list[StepOutput]) -> None:
        for out in outs:
            self.queue.put_nowait(out)

    def cancel(self) -> None:
        if not self.done:
            self.cancelled = True
            self.engine.wake()

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[StepOutput]:
        while True:
            out = await self.queue.get()
            yield out
            if out.finished:
                self.done = True
                return


class BatchingEngine:
    """The engine (unigemma.engine.Engine: continuous batching, prefix cache, speculative decoding, grammar masks)
    driven by one worker thread; the async side talks to it through RequestHandles.

    The Engine is not thread-safe, so every call into it (add, step, cancel) happens on the worker: submit() and
    cancel() only queue work and wake the worker. A cancelled request leaves the engine (and frees its cache slot)
    at the worker's next turn, before the next decode step.
    """

    def __init__(self, llm, max_slots: int, max_model_len: int, eos_token_ids: list[int]):
        from unigemma.engine.generate import Engine

        self.llm = llm
        self.max_slots = max_slots
        self.max_model_len = max_model_len
        from unigemma.engine.diffusion import DiffusionEngine, is_diffusion

        if is_diffusion(llm):  # block diffusion: the same interface, one canvas per step
            self.engine = DiffusionEngine(llm.model, llm.tokenizer, list(eos_token_ids), max_slots=max_slots,
                                          max_model_len=max_model_len,
                                          generation_config=getattr(llm, "generation_config", None))
        else:
            self.engine = Engine(llm.model, llm.tokenizer, list(eos_token_ids), getattr(llm, "drafter", None),
                                 max_slots=max_slots, max_model_len=max_model_len,
                                 dtype=getattr(llm, "kv_dtype", None))
        self.device = next(llm.model.parameters()).device
        self.pending: collections.deque[RequestHandle] = collections.deque()
        self.active: dict[str, RequestHandle] = {}
        self.cv = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.dead: str | None = None   # why the worker thread died (then /health answers 503)
        # counters read by /metrics
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.generated_tokens_total = 0
        self.drafted_tokens_total = 0
        self.accepted_tokens_total = 0

    # --- control (any thread) ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="unigemma-engine", daemon=True)
            self.thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel everything in flight (each stream ends with finish_reason "abort") and stop the worker."""
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def wake(self) -> None:
        with self.cv:
            self.cv.notify_all()

    @property
    def healthy(self) -> bool:
        return self.dead is None and (self.thread is None or self.thread.is_alive() or self.stopping)

    def submit(self, req: EngineRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        if not self.healthy:
            raise APIError(503, f"the engine has stopped ({self.dead or 'worker thread not running'}); the "
                                "server must be restarted", type="server_error", code="engine_dead")
        if len(req.prompt_ids) >= self.max_model_len:
            raise APIError(400, f"the prompt is {len(req.prompt_ids)} tokens, but this server's context is "
                                f"{self.max_model_len} tokens; shorten the prompt", param="messages",
                           code="context_length_exceeded")
        h = RequestHandle(self, req, loop)
        with self.cv:
            if self.stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            self.pending.append(h)
            self.cv.notify_all()
        return h

    def stats(self) -> dict[str, float]:
        sched = self.engine.scheduler
        used = sum(len(s.tokens) for s in sched.slots)
        return {"running": len(sched.slots), "queued": len(self.pending) + len(sched.waiting),
                "kv_used_tokens": used, "kv_capacity_tokens": self.max_slots * self.max_model_len,
                "free_slots": self.max_slots - len(sched.slots)}

    # --- worker --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        """The worker. Per-request failures are isolated inside the engine's step; should the worker itself
        fail, every stream ends with an error, the failure is logged, and `healthy` turns false (/health: 503)
        so a supervisor can restart the process."""
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - MemoryError and the like: report, never hang clients
            self.dead = f"{type(e).__name__}: {e}"
            log.critical("the engine worker died: %s; failing %d active and %d queued requests", self.dead,
                         len(self.active), len(self.pending), exc_info=e)
            with self.cv:
                handles = list(self.active.values()) + list(self.pending)
                self.active.clear()
                self.pending.clear()
            for h in handles:
                self._end(h, StepOutput(-1, "", finished=True, finish_reason="error", error_status=500,
                                        error=f"the engine failed ({self.dead}); see the server log"))

    def _serve(self) -> None:
        from unigemma.engine.scheduler import Request

        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not self.stopping and not self.pending and not self.active:
                    self.cv.wait(timeout=1.0)
                if self.stopping:
                    break
                admit = list(self.pending)
                self.pending.clear()
            for h in admit:
                if h.cancelled:
                    self._end(h, StepOutput(-1, "", finished=True, finish_reason="abort"))
                    continue
                r = h.req
                try:
                    self.engine.add(Request(list(r.prompt_ids), r.params, media=r.media or None,
                                            request_id=h.id, constraint=r.constraint))
                except ValueError as e:
                    self._end(h, StepOutput(-1, "", finished=True, finish_reason="error", error=str(e)))
                    continue
                except Exception as e:  # e.g. MemoryError building its state: this request alone fails
                    log.error("request %s could not be added to the engine: %s: %s", h.id, type(e).__name__, e,
                              exc_info=e)
                    self._end(h, StepOutput(-1, "", finished=True, finish_reason="error", error_status=500,
                                            error=f"the engine could not take this request ({type(e).__name__})"))
                    continue
                self.active[h.id] = h
            for rid, h in list(self.active.items()):
                if h.cancelled:
                    self.engine.cancel(rid)
            if not self.engine.has_work:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug outside any one request (they are isolated in the step): fail all
                log.error("engine step failed: %s: %s; failing requests %s", type(e).__name__, e,
                          ", ".join(self.active), exc_info=e)
                failed = list(self.active.items())
                self.active.clear()
                for rid, h in failed:
                    self.engine.cancel(rid)
                    self._end(h, StepOutput(-1, "", finished=True, finish_reason="error", error_status=500,
                                            error=f"the engine failed: {type(e).__name__}; see the server log"))
                try:
                    self.engine.step()  # drain the cancellation events
                except Exception:  # noqa: BLE001 - already reported above
                    log.exception("draining the engine after a failed step failed too")
                for rid, _ in failed:
                    self.engine.forget(rid)
                continue
            batches: dict[str, tuple[RequestHandle, list[StepOutput]]] = {}
            for ev in events:
                h = self.active.get(ev.request_id)
                if h is None:
                    continue
                if ev.token_id is not None:
                    h.num_generated += 1
                    self.generated_tokens_total += 1
                reason = "abort" if ev.finish_reason == "cancelled" else ev.finish_reason
                out = StepOutput(ev.token_id if ev.token_id is not None else -1, ev.text, ev.logprob,
                                 list(ev.top_logprobs or []), ev.finished, reason, ev.stop_reason)
                if getattr(ev, "error", None):  # the engine failed on this request alone (logged there)
                    out.error = f"the engine failed on this request ({ev.error}); the server log has the " \
                                f"details under request id {h.id}"
                    out.error_status = 500
                if ev.finished:
                    if ev.usage is not None:
                        h.cached_tokens = ev.usage.cached_tokens
                        self.prompt_tokens_total += ev.usage.prompt_tokens
                        self.cached_tokens_total += ev.usage.cached_tokens
                        self.drafted_tokens_total += ev.usage.drafted_tokens
                        self.accepted_tokens_total += ev.usage.accepted_tokens
                    del self.active[ev.request_id]
                    self.engine.forget(ev.request_id)
                    h.done = True
                batches.setdefault(h.id, (h, []))[1].append(out)
            for h, outs in batches.values():
                h._emit_many(outs)
        # shutdown: end every stream
        for rid, h in list(self.active.items()):
            self._end(h, StepOutput(-1, "", finished=True, finish_reason="abort"))
        while self.pending:
            self._end(self.pending.popleft(), StepOutput(-1, "", finished=True, finish_reason="abort"))

    @staticmethod
    def _end(h: RequestHandle, out: StepOutput) -> None:
        h.done = True
        h._emit(out)


# --- the service: HTTP shapes ↔ engine shapes ------------------------------------------------------------------

@dataclass
class Prepared:
    prompt_text: str
    prompt_ids: list[int]
    media: dict[str, Any]
    reusable_prefix: int
    start_state: str = "content"
    tool_names: list[str] = field(default_factory=list)
    constraint: Any = None
    tools: list[dict] = field(default_factory=list)   # the request's tools: the parser reads calls by their schemas


class Observer:
    """Hooks the app uses for metrics; the default does nothing."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None: ...


def _coalesce(chunk: dict, nxt) -> bool:
    """Fold the queued chunk `nxt` into `chunk` when both carry only text of one kind for the same choice (no
    logprobs, tool calls, role or finish): clients concatenate deltas, so one event says what two did. Used only
    when a stream's writer falls behind its engine (many clients on few cores), where it saves a write and a parse
    per token; returns whether it folded."""
    if not isinstance(nxt, dict) or len(chunk["choices"]) != 1 or len(nxt.get("choices", ())) != 1:
        return False
    a, b = chunk["choices"][0], nxt["choices"][0]
    if a["index"] != b["index"] or a["finish_reason"] or b["finish_reason"] or a["logprobs"] or b["logprobs"]:
        return False
    (ka, va), = a["delta"].items() if len(a["delta"]) == 1 else ((None, None),)
    (kb, vb), = b["delta"].items() if len(b["delta"]) == 1 else ((None, None),)
    if ka not in ("content", "reasoning_content") or ka != kb or set(a) != set(b):
        return False
    a["delta"][ka] = va + vb
    return True


def _now() -> int:
    return int(time.time())


class Service:
    def __init__(self, llm, settings: ServerSettings, observer: Observer | None = None):
        if llm.tokenizer is None:
            raise ValueError(f"{llm.path} has no tokenizer.json: the server needs the checkpoint's tokenizer")
        self.llm = llm
        self.settings = settings
        self.tok = llm.tokenizer
        self.observer = observer or Observer()
        self.policy = settings.media_policy()
        self.created = _now()
        ctx = getattr(llm.config.text, "max_position_embeddings", None) or 8192
        self.max_model_len = settings.max_model_len or min(ctx, 8192)
        eos = list(llm.eos_token_ids)
        # a turn ends at <turn|> or <|tool_response>, whatever generation_config says (chat-format.md §4-§6)
        for name in ("eot_token", "str_token", "eos_token"):
            tid = self.tok.special_ids.get(name)
            if tid is not None and tid not in eos:
                eos.append(tid)
        self.eos_ids = eos
        self._template = None
        self._max_token_chars: int | None = None
        self.engine = BatchingEngine(llm, settings.max_concurrency, self.max_model_len, eos)
        self.in_flight = 0

    # --- lifecycle / admission -----------------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def admit(self, n: int) -> None:
        """Reserve room for n sequences or raise 429: running + queued stays within slots + queue."""
        cap = self.settings.max_concurrency + self.settings.max_queue
        if n > cap:  # waiting cannot help: say so instead of "retry shortly"
            raise APIError(400, f"this request asks for {n} sequences (prompts × n), but this server holds at most "
                                f"{cap} at once (--max-concurrency + --max-queue); send fewer prompts or a smaller n",
                           param="n", code="too_many_sequences")
        if self.in_flight + n > cap:
            raise APIError(429, f"the server is busy ({self.in_flight} sequences in flight, limit {cap}); retry "
                                "shortly", type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight -= n

    @property
    def template(self):
        if self._template is None:
            from unigemma.inputs.template import ChatTemplate
            self._template = (ChatTemplate.from_tokenizer(self.tok) if self.tok.chat_template
                              else ChatTemplate.bundled(self.tok.specials))
        return self._template

    # --- limits checked before any work ------------------------------------------------------------------------
    @property
    def max_chars_per_token(self) -> int:
        """The longest vocabulary entry in characters: no token covers more text, so a prompt of C characters is
        at least C / this many tokens (a lower bound that needs no tokenizing)."""
        if self._max_token_chars is None:
            try:
                vocab = self.tok.backend.get_vocab()
                self._max_token_chars = max(1, max((len(k) for k in vocab), default=1))
            except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary view: no estimate
                self._max_token_chars = 1 << 30
        return self._max_token_chars

    def check_request(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        """Limits that need no template, tokenizer or media: stop strings and the prompt's size. Cheap; run on
        the event loop before admission, so an oversized request costs nothing and waits for nothing."""
        limit = self.settings.max_stop_chars
        for i, stop in enumerate(req.stop_list()):
            if len(stop) > limit:
                raise APIError(400, f"stop[{i}] is {len(stop)} characters, over the limit of {limit} "
                                    "(--max-stop-chars)", param="stop", code="stop_too_long")
        if isinstance(req, CompletionRequest):
            chars = sum(len(p) for p in req.prompts() if isinstance(p, str))
            param = "prompt"
        else:
            chars = _text_chars([m.model_dump(exclude_none=True) for m in req.messages])
            chars += _text_chars([t.model_dump(exclude_none=True) for t in req.tools or []])
            param = "messages"
        if chars > self.settings.max_prompt_chars:
            raise APIError(400, f"the request holds {chars} characters of text, over this server's limit of "
                                f"{self.settings.max_prompt_chars} (--max-prompt-chars)", param=param,
                           code="prompt_too_long")
        # no token is longer than max_chars_per_token characters, so this many characters cannot fit the context
        fewest = chars // self.max_chars_per_token
        if fewest >= self.max_model_len:
            raise APIError(400, f"the prompt is at least {fewest} tokens ({chars} characters), but this server's "
                                f"context is {self.max_model_len} tokens; shorten the prompt", param=param,
                           code="context_length_exceeded")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.settings.model_name, *self.settings.model_aliases)

    def check_model(self, name: str) -> None:
        """The request's `model` must be a served name, unless --accept-any-model-name (one model, any name)."""
        if name in self.model_names or self.settings.accept_any_model_name:
            return
        names = ", ".join(repr(n) for n in self.model_names)
        raise APIError(404, f"the model {name!r} does not exist; this server serves {names} (start it with "
                            "--accept-any-model-name to take any name)", param="model", code="model_not_found")

    # --- prompts -------------------------------------------------------------------------------------------
    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        """Render, load media, expand placeholders, tokenize, build the grammar. Blocking: run in a thread."""
        from unigemma.outputs.parser import start_state_for_prompt

        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        images, audios, videos = [], [], []
        for i, m in enumerate(req.messages):
            if not isinstance(m.content, list):
                continue
            for j, part in enumerate(m.content):
                where = f"messages[{i}].content[{j}]"
                try:
                    if part.type == "image_url":
                        images.append(self._image(part, req, where))
                    elif part.type == "input_audio":
                        self._needs("audio_config", where)
                        audios.append(server_media.load_audio(part.input_audio.data, part.input_audio.format,
                                                              self.policy, what=where))
                    elif part.type == "video_url":
                        self._needs("vision_config", where)
                        from unigemma.inputs.image import model_image_spec
                        videos.append(server_media.load_video(part.video_url.url, self.policy, what=where,
                                                              patch_size=model_image_spec(self.llm.config)[0]))
                except (MediaError, ValueError) as e:
                    raise APIError(400, str(e), param=where, code="invalid_media") from None
                if part.type == "video_url":  # the template knows the part as `video`
                    messages[i]["content"][j] = {"type": "video"}
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" \
            else None
        kwargs = dict(req.chat_template_kwargs or {})
        kwargs.pop("enable_thinking", None)
        thinking = req.enable_thinking
        try:
            from unigemma.inputs.template import normalize_messages
            text = self.template.render(normalize_messages(messages), tools=tools, add_generation_prompt=True,
                                        enable_thinking=thinking, **kwargs)
        except ValueError as e:
            raise APIError(400, f"messages could not be rendered: {e}", param="messages") from None
        ids, media, first_media = self._expand(text, images, audios, videos)
        start = start_state_for_prompt(text)
        prep = Prepared(text, ids, media, first_media, start, [t["function"]["name"] for t in tools or []])
        prep.constraint = self._constraint(req, tools, thinking, start == "reasoning")
        prep.tools = tools or []
        return prep

    def _needs(self, sub: str, where: str) -> None:
        cfg = self.llm.config
        have = getattr(cfg, sub.replace("_config", ""), None) is not None
        if getattr(cfg, sub.replace("_config", "_tower"), None) is not None:  # the family's encoders
            have = True
        if not have:
            kind = "images or video" if sub == "vision_config" else "audio"
            if sub in getattr(cfg, "skipped_towers", ()):
                raise MediaError(f"{where}: this {cfg.model_type} checkpoint's {sub.split('_')[0]} encoder is not "
                                 f"supported by unigemma yet: it cannot take {kind}")
            raise MediaError(f"{where}: this model has no {sub} and cannot take {kind}")

    def _image(self, part, req: ChatCompletionRequest, where: str):
        from unigemma.inputs.image import budget_for_detail, check_budget

        self._needs("vision_config", where)
        if part.image_url.max_soft_tokens is not None:
            budget = check_budget(part.image_url.max_soft_tokens)
        elif req.max_soft_tokens is not None:
            budget = check_budget(req.max_soft_tokens)
        else:
            detail = "high" if part.image_url.detail == "original" else part.image_url.detail  # the largest budget
            budget = budget_for_detail(detail, getattr(self.llm, "default_image_tokens", 280))
        from unigemma.inputs.image import check_positions, model_image_spec
        patch_size, table = model_image_spec(self.llm.config)
        feats = server_media.load_image(part.image_url.url, budget, self.policy, what=where, patch_size=patch_size)
        check_positions(feats, table, where)
        return feats

    def _expand(self, text: str, images: list, audios: list, videos: list):
        """Replace each placeholder with its BOI/BOA + soft tokens + EOI/EOA run; build the media tensors."""
        sp = self.tok.specials
        pieces, counts = [], {IMAGE: 0, AUDIO: 0, VIDEO: 0}
        segments: list = []
        last = 0
        first_media: int | None = None
        for m in _PLACEHOLDER_RE.finditer(text):
            pieces.append(text[last:m.start()])
            if first_media is None:
                first_media = len("".join(pieces))
            kind = m.group(0)
            k = counts[kind]
            counts[kind] += 1
            if kind == IMAGE:
                if k >= len(images):
                    raise APIError(400, "the chat template produced more image placeholders than images given")
                pieces.append(sp["boi_token"] + sp["image_token"] * images[k].num_tokens + sp["eoi_token"])
            elif kind == AUDIO:
                if k >= len(audios):
                    raise APIError(400, "the chat template produced more audio placeholders than clips given")
                from unigemma.inputs.audio import num_audio_tokens
                from unigemma.inputs.mel import log_mel, num_mel_tokens
                mel = getattr(self.llm, "mel_settings", None)
                for seg in audios[k]:
                    if getattr(self.llm.config, "audio_tower", None) is not None:  # family: mel features
                        seg = log_mel(seg, mel)
                        n = num_mel_tokens(seg[1])
                        if n == 0:
                            raise APIError(400, f"an audio clip of {audios[k][0].size} samples is too short to make "
                                                "a soft token (at least ~25 ms is needed)", code="invalid_media")
                    else:
                        n = num_audio_tokens(seg.size)
                    segments.append(seg)
                    pieces.append(sp["boa_token"] + sp["audio_token"] * n + sp["eoa_token"])
            else:
                if k >= len(videos):
                    raise APIError(400, "the chat template produced more video placeholders than videos given")
                v = videos[k]
                frames = [f"{ts} " + sp["boi_token"] + sp["video_token"] * v.num_tokens_per_frame + sp["eoi_token"]
                          for ts in v.timestamps]
                pieces.append(" ".join(frames))
            last = m.end()
        pieces.append(text[last:])
        for kind, given in ((IMAGE, images), (AUDIO, audios), (VIDEO, videos)):
            if counts[kind] != len(given):
                raise APIError(400, f"{len(given)} {kind} items were given but the chat template placed "
                                    f"{counts[kind]}; the template must render every media part")
        full = "".join(pieces)
        ids = self.tok.encode(full, add_bos=False)
        reusable = len(self.tok.encode(full[:first_media], add_bos=False)) if first_media is not None else len(ids)
        media: dict[str, Any] = {}
        dev = self.engine.device
        dtype = next(self.llm.model.parameters()).dtype
        if images:
            from unigemma.inputs.image import pad_rows
            slots = max(f.pixel_values.shape[0] for f in images)
            padded = [pad_rows(f.pixel_values, f.position_ids, slots) for f in images]
            media["pixel_values"] = torch.stack([v for v, _ in padded]).to(dev, dtype)
            media["image_position_ids"] = torch.stack([p for _, p in padded]).to(dev)
        if segments:
            from unigemma.inputs.audio import batch_audio
            from unigemma.inputs.mel import batch_mel
            feats, mask = (batch_mel if isinstance(segments[0], tuple) else batch_audio)(segments)
            media["input_features"] = feats.to(dev, dtype)
            media["input_features_mask"] = mask.to(dev)
        if videos:
            from unigemma.inputs.video import batch_videos
            values, pos, nf = batch_videos(videos)
            media["pixel_values_videos"] = values.to(dev, dtype)
            media["video_position_ids"] = pos.to(dev)
            media["num_frames_per_video"] = torch.tensor(nf)
        if len(ids) >= self.max_model_len:
            raise APIError(400, f"the prompt is {len(ids)} tokens, but this server's context is "
                                f"{self.max_model_len} tokens; shorten the prompt", param="messages",
                           code="context_length_exceeded")
        return ids, media, min(reusable, len(ids))

    def _constraint(self, req: ChatCompletionRequest, tools, thinking: bool, thinking_open: bool):
        if req.response_format is None and req.tool_choice not in ("required",) \
                and not hasattr(req.tool_choice, "function"):
            return None
        from unigemma.engine.diffusion import is_diffusion

        if is_diffusion(self.llm):
            rf = req.response_format is not None and getattr(req.response_format, "type", None) != "text"
            if rf or req.tool_choice == "required" or hasattr(req.tool_choice, "function"):
                raise APIError(400, "structured output (response_format json_object / json_schema, or a forced "
                                    "tool call) is not supported for this DiffusionGemma model: a grammar needs "
                                    "left-to-right sampling and a canvas is denoised all at once; describe the "
                                    "format in the prompt instead",
                               param="response_format" if rf else "tool_choice")
            return None
        from unigemma.engine.constraints import compile_constraint, spec_from_openai

        rf = req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None
        choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        try:
            spec = spec_from_openai(rf, tools, choice, req.parallel_tool_calls, thinking, thinking_open)
            return compile_constraint(spec, self.tok) if spec is not None else None
        except ValueError as e:
            param = "response_format" if rf and choice in (None, "auto", "none") else "tool_choice"
            raise APIError(400, str(e), param=param) from None

    def sampling(self, req, max_tokens: int | None, logprobs: bool, top_logprobs: int, seed_offset: int):
        seed = req.seed + seed_offset if req.seed is not None else None
        temperature = 1.0 if req.temperature is None else req.temperature
        try:
            params = SamplingParams(
                temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0, min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()}, seed=seed,
                max_tokens=max_tokens or self.settings.default_max_tokens, stop=req.stop_list(),
                stop_token_ids=req.stop_token_ids or [], logprobs=logprobs, top_logprobs=top_logprobs,
                ignore_eos=req.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return self._check_diffusion(params)

    def _check_diffusion(self, params: SamplingParams) -> SamplingParams:
        """DiffusionGemma samples by its block-diffusion schedule: autoregressive options are a 400, not ignored."""
        from unigemma.engine.diffusion import autoregressive_options_set, is_diffusion

        if is_diffusion(self.llm):
            bad = autoregressive_options_set(params)
            if bad:
                raise APIError(400, f"{bad} are autoregressive sampling options; this DiffusionGemma model samples "
                                    "with its block-diffusion schedule (generation_config.json)", param=bad[0])
        return params

    def _check_bias(self, params: SamplingParams) -> None:
        vocab = self.llm.config.text.vocab_size
        for tid in params.logit_bias:
            if tid >= vocab:
                raise APIError(400, f"logit_bias token id {tid} is out of range (vocabulary: 0..{vocab - 1})",
                               param="logit_bias")

    # --- running -------------------------------------------------------------------------------------------
    def _submit(self, prep_ids, media, reusable, constraint, params, skip_special=False) -> RequestHandle:
        req = EngineRequest(prep_ids, params, media, constraint, reusable, skip_special)
        return self.engine.submit(req, asyncio.get_running_loop())

    def _token_text(self, tid: int) -> str:
        return self.tok.decode([tid], skip_special_tokens=False)

    def _lp_entry(self, tid: int, lp: float, top: list[tuple[int, float]]) -> dict:
        t = self._token_text(tid)
        return {"token": t, "logprob": wire_logprob(lp), "bytes": list(t.encode("utf-8")),
                "top_logprobs": [{"token": (x := self._token_text(i)), "logprob": wire_logprob(v),
                                  "bytes": list(x.encode())} for i, v in top]}

    async def _steps(self, h: RequestHandle) -> AsyncIterator[StepOutput]:
        """StepOutputs of one handle with timing hooks; cancels the engine request if the consumer goes away."""
        t0 = time.perf_counter()
        last = None
        try:
            async for out in h:
                now = time.perf_counter()
                if out.token_id >= 0:
                    if last is None:
                        self.observer.first_token(now - t0)
                    else:
                        self.observer.inter_token(now - last)
                    last = now
                if out.error is not None:
                    raise APIError(out.error_status, out.error,
                                   type="server_error" if out.error_status >= 500 else "invalid_request_error",
                                   code="engine_error" if out.error_status >= 500 else None)
                yield out
        finally:
            h.cancel()

    def _stop_text(self, out: StepOutput) -> str:
        # a stop *token* ends the turn; the parser wants to see which one (tool_response vs turn end)
        return self._token_text(out.stop_reason) if isinstance(out.stop_reason, int) else ""

    def chat_handles(self, req: ChatCompletionRequest, prep: Prepared) -> list[RequestHandle]:
        handles = []
        try:
            for i in range(req.n):
                params = self.sampling(req, req.token_limit, req.logprobs, req.top_logprobs or 0, i)
                self._check_bias(params)
                handles.append(self._submit(prep.prompt_ids, prep.media, prep.reusable_prefix, prep.constraint,
                                            params))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    def _parser(self, prep: Prepared):
        from unigemma.outputs.parser import ResponseParser
        return ResponseParser(prep.start_state, tool_names=prep.tool_names, tools=prep.tools)

    @staticmethod
    def _warnings(warnings: list, request_id: str, choice: int) -> list[dict]:
        """Parser warnings (repaired, ambiguous or dropped tool calls, stray markup) as the choice's `warnings`
        field, and in the server log. OpenAI clients ignore the unknown field; a client that looks can see
        what was repaired or dropped, with the raw text."""
        import logging
        for w in warnings:
            logging.getLogger("unigemma.server").warning("%s choice %d: %s | raw text: %r", request_id, choice,
                                                         w.message, w.raw[:2000])
        return [{"message": w.message, "raw": w.raw} for w in warnings]

    async def chat(self, req: ChatCompletionRequest, prep: Prepared) -> dict:
        from unigemma.outputs.parser import collect

        handles = self.chat_handles(req, prep)
        cid = f"chatcmpl-{uuid.uuid4().hex}"

        async def one(i: int, h: RequestHandle) -> tuple[dict, int]:
            parser = self._parser(prep)
            events, lps, reason, n = [], [], None, 0
            async for out in self._steps(h):
                if out.token_id >= 0:
                    n += 1  # the stop token counts as generated, as it does for OpenAI and vLLM
                    if out.logprob is not None and not (out.finished and isinstance(out.stop_reason, int)):
                        lps.append(self._lp_entry(out.token_id, out.logprob, out.top))
                events += parser.feed(out.text + (self._stop_text(out) if out.finished else ""))
                reason = out.finish_reason
            events += parser.finish(cut_off=reason == "length")
            parsed = collect(events, parser.stopped_by)
            finish = finish_reason(reason, bool(parsed.tool_calls))
            msg: dict[str, Any] = {"role": "assistant", "content": parsed.content if not parsed.tool_calls
                                   else (parsed.content or None)}
            if parsed.reasoning:
                msg["reasoning_content"] = parsed.reasoning
            if parsed.tool_calls:
                msg["tool_calls"] = parsed.tool_calls
            choice = {"index": i, "message": msg, "finish_reason": finish,
                      "logprobs": {"content": lps} if req.logprobs else None}
            if parsed.warnings:
                choice["warnings"] = self._warnings(parsed.warnings, cid, i)
            return choice, n

        try:
            results = await asyncio.gather(*(one(i, h) for i, h in enumerate(handles)))
        finally:
            for h in handles:
                h.cancel()
        completion = sum(n for _, n in results)
        usage = self._usage(len(prep.prompt_ids), completion, handles[0].cached_tokens)
        choices = [c for c, _ in results]
        if req.legacy_functions:
            for c in choices:
                _legacy_function_call(c, "message")
        return {"id": cid, "object": "chat.completion", "created": _now(),
                "model": self.settings.model_name, "choices": choices, "usage": usage,
                "system_fingerprint": None}

    def _usage(self, prompt: int, completion: int, cached: int) -> dict:
        self.observer.finished(prompt, completion, cached)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def chat_stream(self, req: ChatCompletionRequest, prep: Prepared) -> AsyncIterator[dict]:
        """chat.completion.chunk dicts; choices of n > 1 interleave as their tokens arrive. The engine requests
        are made here, before the response starts, so that refusals still get their own status code."""
        chunks = self._chat_stream(req, prep, self.chat_handles(req, prep))
        return _legacy_stream(chunks) if req.legacy_functions else chunks

    async def _chat_stream(self, req: ChatCompletionRequest, prep: Prepared,
                           handles: list[RequestHandle]) -> AsyncIterator[dict]:
        from unigemma.outputs.parser import (ContentDelta, ParseWarning, ReasoningDelta, ToolCallArgsDelta,
                                             ToolCallEnd, ToolCallStart)

        cid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        queue: asyncio.Queue = asyncio.Queue()
        counts = [0] * len(handles)

        def chunk(i: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.settings.model_name,
                    "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                 "logprobs": {"content": logprobs} if logprobs is not None else None}]}

        async def one(i: int, h: RequestHandle) -> None:
            try:
                parser = self._parser(prep)
                await queue.put(chunk(i, {"role": "assistant", "content": ""}))
                reason, called, warnings = None, False, []
                async for out in self._steps(h):
                    if out.token_id >= 0:
                        counts[i] += 1
                    events = parser.feed(out.text + (self._stop_text(out) if out.finished else ""))
                    if out.finished:
                        reason = out.finish_reason
                        events += parser.finish(cut_off=reason == "length")
                    lps = None
                    if req.logprobs and out.logprob is not None and not (out.finished and
                                                                         isinstance(out.stop_reason, int)):
                        lps = [self._lp_entry(out.token_id, out.logprob, out.top)]
                    deltas = []
                    for ev in events:
                        if isinstance(ev, ContentDelta):
                            deltas.append({"content": ev.text})
                        elif isinstance(ev, ReasoningDelta):
                            deltas.append({"reasoning_content": ev.text})
                        elif isinstance(ev, ParseWarning):
                            warnings.append(ev)
                        elif isinstance(ev, ToolCallEnd):
                            # a call dropped after its start is not a call; one cut off by the budget is
                            called = called or ev.arguments is not None or ev.cut_off
                        elif isinstance(ev, ToolCallStart):
                            deltas.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                           "function": {"name": ev.name, "arguments": ""}}]})
                        elif isinstance(ev, ToolCallArgsDelta):
                            deltas.append({"tool_calls": [{"index": ev.index,
                                                           "function": {"arguments": ev.json_text}}]})
                    if not deltas and lps:
                        deltas.append({})
                    for k, d in enumerate(deltas):
                        await queue.put(chunk(i, d, logprobs=lps if k == 0 else None))
                last = chunk(i, {}, finish_reason(reason, called))
                if warnings:   # on the last chunk: by then every call is read or dropped
                    last["choices"][0]["warnings"] = self._warnings(warnings, cid, i)
                await queue.put(last)
            except APIError as e:
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(one(i, h)) for i, h in enumerate(handles)]
        try:
            nothing = object()
            live, held = len(tasks), nothing
            while live:
                item, held = (held, nothing) if held is not nothing else (await queue.get(), nothing)
                if item is None:  # one choice's task is done
                    live -= 1
                    continue
                if isinstance(item, APIError):
                    raise item
                while held is nothing and not queue.empty():  # the writer fell behind: fold text chunks
                    nxt = queue.get_nowait()
                    if not _coalesce(item, nxt):
                        held = nxt
                yield item
            if req.stream_options is not None and req.stream_options.include_usage:
                yield {"id": cid, "object": "chat.completion.chunk", "created": created,
                       "model": self.settings.model_name, "choices": [],
                       "usage": self._usage(len(prep.prompt_ids), sum(counts), handles[0].cached_tokens)}
            else:
                self.observer.finished(len(prep.prompt_ids), sum(counts), handles[0].cached_tokens)
        finally:
            for t in tasks:
                t.cancel()
            for h in handles:
                h.cancel()

    # --- legacy completions --------------------------------------------------------------------------------
    def prepare_completion(self, req: CompletionRequest) -> list[list[int]]:
        out = []
        vocab = self.llm.config.text.vocab_size
        for p in req.prompts():
            ids = self.tok.encode(p, add_bos=True) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab - 1}]", param="prompt")
            if len(ids) >= self.max_model_len:
                raise APIError(400, f"the prompt is {len(ids)} tokens, but this server's context is "
                                    f"{self.max_model_len} tokens; shorten the prompt", param="prompt",
                               code="context_length_exceeded")
            out.append(ids)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        return out

    def completion_handles(self, req: CompletionRequest, prompts: list[list[int]]) -> list[tuple[int, RequestHandle]]:
        handles = []
        try:
            for pi, ids in enumerate(prompts):
                for i in range(req.n):
                    lp = req.logprobs is not None
                    params = self.sampling(req, req.max_tokens, lp, req.logprobs or 0, i)
                    self._check_bias(params)
                    handles.append((pi, self._submit(ids, {}, len(ids), None, params, skip_special=True)))
        except BaseException:
            for _, h in handles:
                h.cancel()
            raise
        return handles

    def _completion_lp(self, entries: list[tuple[int, float, list]], offset: int) -> dict:
        tokens, lps, tops, offs = [], [], [], []
        for tid, lp, top in entries:
            t = self._token_text(tid)
            tokens.append(t)
            lps.append(wire_logprob(lp))
            tops.append({self._token_text(i): wire_logprob(v) for i, v in top})
            offs.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    async def completion(self, req: CompletionRequest, prompts: list[list[int]]) -> dict:
        handles = self.completion_handles(req, prompts)

        async def one(pi: int, h: RequestHandle):
            text, n, reason, entries = "", 0, None, []
            async for out in self._steps(h):
                if out.token_id >= 0:
                    n += 1
                    if out.logprob is not None and not (out.finished and isinstance(out.stop_reason, int)):
                        entries.append((out.token_id, out.logprob, out.top))
                text += out.text
                reason = out.finish_reason
            prefix = self.tok.decode(prompts[pi], skip_special_tokens=True) if req.echo else ""
            return prefix + text, n, "length" if reason == "length" else "stop", entries

        try:
            results = await asyncio.gather(*(one(pi, h) for pi, h in handles))
        finally:
            for _, h in handles:
                h.cancel()
        choices = [{"index": k, "text": text, "finish_reason": fin,
                    "logprobs": self._completion_lp(ent, 0) if req.logprobs is not None else None}
                   for k, (text, _, fin, ent) in enumerate(results)]
        usage = self._usage(sum(len(p) for p in prompts), sum(r[1] for r in results), handles[0][1].cached_tokens)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": _now(),
                "model": self.settings.model_name, "choices": choices, "usage": usage}

    def completion_stream(self, req: CompletionRequest, prompts: list[list[int]]) -> AsyncIterator[dict]:
        return self._completion_stream(req, prompts, self.completion_handles(req, prompts))

    async def _completion_stream(self, req: CompletionRequest, prompts: list[list[int]],
                                 handles: list[tuple[int, RequestHandle]]) -> AsyncIterator[dict]:
        cid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        queue: asyncio.Queue = asyncio.Queue()
        counts = [0] * len(handles)

        def chunk(k: int, text: str, finish: str | None = None, lp: dict | None = None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": self.settings.model_name,
                    "choices": [{"index": k, "text": text, "finish_reason": finish, "logprobs": lp}]}

        async def one(k: int, pi: int, h: RequestHandle) -> None:
            try:
                if req.echo:
                    await queue.put(chunk(k, self.tok.decode(prompts[pi], skip_special_tokens=True)))
                reason = None
                async for out in self._steps(h):
                    if out.token_id >= 0:
                        counts[k] += 1
                    lp = None
                    if out.logprob is not None and req.logprobs is not None and \
                            not (out.finished and isinstance(out.stop_reason, int)):
                        lp = self._completion_lp([(out.token_id, out.logprob, out.top)], 0)
                    if out.text or lp:
                        await queue.put(chunk(k, out.text, lp=lp))
                    reason = out.finish_reason
                await queue.put(chunk(k, "", "length" if reason == "length" else "stop"))
            except APIError as e:
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(one(k, pi, h)) for k, (pi, h) in enumerate(handles)]
        try:
            live = len(tasks)
            while live:
                item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                if isinstance(item, APIError):
                    raise item
                yield item
            usage = self._usage(sum(len(p) for p in prompts), sum(counts), handles[0][1].cached_tokens)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield {"id": cid, "object": "text_completion", "created": created,
                       "model": self.settings.model_name, "choices": [], "usage": usage}
        finally:
            for t in tasks:
                t.cancel()
            for _, h in handles:
                h.cancel()


def _legacy_function_call(choice: dict, key: str) -> None:
    """A choice (key "message") or chunk choice (key "delta") in the legacy `functions` shape: its one tool call
    as `function_call`, finish_reason "function_call"."""
    body = choice[key]
    calls = body.pop("tool_calls", None)
    if calls:
        fn = calls[0]["function"]
        body["function_call"] = {k: v for k, v in fn.items() if k in ("name", "arguments")}
    if choice.get("finish_reason") == "tool_calls":
        choice["finish_reason"] = "function_call"


async def _legacy_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
    try:
        async for chunk in chunks:
            for c in chunk.get("choices", []):
                _legacy_function_call(c, "delta")
            yield chunk
    finally:
        await chunks.aclose()


def finish_reason(engine_reason: str | None, has_calls: bool) -> str:
    """The one rule, streamed or not: "length" whenever the token budget ended the output (even inside or just
    after a tool call: the call the client got is then cut off, its arguments possibly incomplete JSON, exactly as
    far as it was streamed), else "tool_calls" when a call was read, else "stop"."""
    if engine_reason == "length":
        return "length"
    return "tool_calls" if has_calls else "stop"


# What the OpenAI API reports for a token the sampler could not pick (masked by a grammar or logit_bias): JSON
# has no -Infinity / NaN, and a server must never send them.
MASKED_LOGPROB = -9999.0


def wire_logprob(lp: float | None) -> float | None:
    """A logprob as JSON can carry it: finite values unchanged; -inf / NaN (masked tokens) → -9999.0."""
    if lp is None:
        return None
    lp = float(lp)
    return lp if math.isfinite(lp) else MASKED_LOGPROB


_MEDIA_KEYS = frozenset({"image_url", "input_audio", "video_url"})


def _text_chars(value: Any) -> int:
    """Characters of text in a JSON-like value (strings anywhere in it, keys included; media payloads, which
    have their own limits, excluded)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                total += len(k) if isinstance(k, str) else 0
                if k not in _MEDIA_KEYS:
                    stack.append(x)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


def count_sequences(req: ChatCompletionRequest | CompletionRequest) -> int:
    if isinstance(req, CompletionRequest):
        return req.n * len(req.prompts())
    return req.n


ObserverFactory = Callable[[], Observer]
