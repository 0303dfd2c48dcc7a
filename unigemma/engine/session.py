"""Streaming input on one engine: a request whose prompt grows while it is being prefilled (`LiveRequest`).

    LiveRequest(engine, ids, params, media)   → Request(open=True) added; its tokens prefill on the next steps
        .rewind(n)                             drop the last n prompt tokens (a re-tokenized text tail)
        .extend(ids, media=None)               more prompt tokens (+ media kwargs for their placeholders), prefilled
                                               at once (prefill=True) so the cache is current when the user stops
        .close(ids) → iterator of TokenEvents  the closing tokens; generation starts from the final prompt
        .cancel()                              frees the cache slot

The scheduler does the work (`Request.open`, `Scheduler.extend`): an open sequence holds its slot, is prefilled
chunk by chunk as tokens arrive, and samples nothing until it is closed. Closing prefills only what was appended
last, which is what makes the end-of-speech → first-token time small.

This helper drives `engine.step()` itself, so it is for an engine that only this thread uses and that has no
other requests (the Python `unigemma.realtime.Session` gives each session its own one-slot engine). The server
instead runs extends on its engine worker (server/realtime_ws.py). What this module does not do: chat templates,
audio framing, response parsing (unigemma/realtime.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .sampling import SamplingParams
from .scheduler import DONE, PREFILL, WAITING, Request, TokenEvent

__all__ = ["LiveRequest"]


class LiveRequest:
    """One open request on `engine` (see the module docstring)."""

    def __init__(self, engine, prompt_ids: list[int], params: SamplingParams, media: dict[str, Any] | None = None,
                 *, constraint: Any = None, prefill: bool = True):
        self.engine = engine
        self.request = Request(list(prompt_ids), params, media=media or None, open=True, constraint=constraint)
        self.id = engine.add(self.request)
        self.closed = False
        if prefill:
            self.prefill()

    @property
    def seq(self):
        return self.engine.scheduler.seqs[self.id]

    @property
    def num_tokens(self) -> int:
        return len(self.seq.tokens)

    @property
    def computed(self) -> int:
        return self.seq.computed

    def prefill(self) -> None:
        """Step the engine until every appended token is in the KV cache."""
        seq = self.seq
        while seq.status in (WAITING, PREFILL) and seq.computed < len(seq.tokens) and self.request.open:
            before = seq.computed
            events = self.engine.step()
            assert not any(e.request_id == self.id for e in events), "an open request emitted a token"
            if seq.status == WAITING and not self.engine.scheduler.slots:
                raise RuntimeError("the live request could not get a cache slot")
            if seq.computed == before and seq.status == PREFILL:
                raise RuntimeError("prefill made no progress")

    def extend(self, ids: list[int], media: dict[str, Any] | None = None, prefill: bool = True) -> None:
        if self.closed:
            raise ValueError("this live request is closed: start a new one for the next turn")
        if not ids:
            return
        self.engine.scheduler.extend(self.id, ids, media)
        if prefill:
            self.prefill()

    def rewind(self, n: int) -> None:
        """Drop the last n prompt tokens (see Scheduler.rewind)."""
        if self.closed:
            raise ValueError("this live request is closed")
        if n:
            self.engine.scheduler.rewind(self.id, n)

    def close(self, ids: list[int], media: dict[str, Any] | None = None) -> Iterator[TokenEvent]:
        """Append the last tokens and generate: yields this request's events until it finishes. Stopping the
        iteration early cancels the request."""
        if self.closed:
            raise ValueError("this live request is already closed")
        self.engine.scheduler.extend(self.id, ids, media, close=True)
        self.closed = True
        return self._events()

    def _events(self) -> Iterator[TokenEvent]:
        eng = self.engine
        try:
            while True:
                evs = [e for e in eng.step() if e.request_id == self.id]
                yield from evs
                if evs and evs[-1].finished:
                    return
                if not eng.has_work:
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the request (if it still runs), free its slot and drop its record."""
        eng = self.engine
        seq = eng.scheduler.seqs.get(self.id)
        if seq is None:
            return
        if seq.status != DONE:
            eng.cancel(self.id)
        eng.scheduler.pending = [e for e in eng.scheduler.pending if e.request_id != self.id]
        eng.forget(self.id)
        self.closed = True
