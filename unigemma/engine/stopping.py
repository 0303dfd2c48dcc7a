"""Stop conditions for one request: EOS / stop token ids, stop strings, max_tokens and the context length.

    token id + text delta (from the incremental detokenizer)
        │
        ├─ EOS id (unless ignore_eos) or a stop token id ──► finished, "stop"; the token's text is dropped
        ├─ StopStringMatcher: hold back any tail that may begin a stop string; on a match cut the text at it
        │                                                   ──► finished, "stop" (reports which string)
        └─ max_tokens reached, or prompt + output fills the context ──► finished, "length"
        ▼
    StopResult(text safe to emit, finished, finish_reason, stop_reason)

Stop strings may span token boundaries ("END" arriving as "E", "ND") and never leak into the output: text is
released only once it can no longer be the start of a stop string. When several stop strings could match,
the one that *completes first* in the text wins (the moment a streaming reader would see it), and among those
completing at the same character the one starting earliest; the text is cut at its start. This makes the
result independent of how the text was split into deltas.

What this module does not do: decode tokens (outputs/detokenize.py), or map stop token 50 after tool calls
to "tool_calls" (the response parser does that from `stop_reason`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

FinishReason = Literal["stop", "length"]


@dataclass
class StopResult:
    text: str                              # text that may be emitted now (possibly empty)
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None   # the matched stop string, or the stop / EOS token id


class StopStringMatcher:
    """Finds stop strings in a stream of text deltas, holding back tails that could start one.

    `feed(delta)` returns (text safe to emit, matched stop string or None). After a match the matcher is
    finished and ignores further input. `flush()` releases what is held back (call it when the stream ends
    for another reason).
    """

    def __init__(self, stop: Iterable[str] = (), include_stop_str_in_output: bool = False):
        self.stop = [s for s in dict.fromkeys(stop)]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={list(stop)!r}: expected non-empty strings")
        self.include_stop = include_stop_str_in_output
        self._held = ""
        self.matched: str | None = None
        # No table of prefixes: that would be L²/2 characters per stop string (a 100k-character stop string is
        # 5 GB), built on the engine thread. The hold-back test below compares against the strings themselves.
        self._firsts = "".join(dict.fromkeys(s[0] for s in self.stop))
        self._max_hold = max((len(s) - 1 for s in self.stop), default=0)

    def feed(self, delta: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        buf = self._held + delta
        if not self.stop:
            return buf, None
        best: tuple[int, int, str] | None = None  # (end, start, string)
        for s in self.stop:
            start = buf.find(s)  # the earliest occurrence of s also ends earliest
            if start >= 0:
                cand = (start + len(s), start, s)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is not None:
            end, start, s = best
            self.matched = s
            self._held = ""
            return buf[:end] if self.include_stop else buf[:start], s
        # hold back the longest suffix that is a proper prefix of some stop string
        keep = self._hold(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], None

    def _hold(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string (0: none).

        Only positions holding a stop string's first character can start one; each candidate suffix is
        compared directly, so memory stays O(len(buf)) whatever the stop strings' length."""
        i = max(0, len(buf) - self._max_hold)
        while i < len(buf):
            if buf[i] in self._firsts:
                tail = buf[i:]
                if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                    return len(buf) - i  # the earliest start is the longest suffix
            i += 1
        return 0

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out

    @property
    def held(self) -> str:
        return self._held


class StopChecker:
    """All stop conditions of one request. Call `step(token_id, text_delta)` once per generated token.

    eos_token_ids: the checkpoint's EOS set (generation_config `eos_token_id`, e.g. {1, 106, 50} for Gemma 4);
        ignored when ignore_eos is true.
    stop_token_ids: extra ids that end generation (the request's `stop_token_ids`).
    max_tokens: generated-token limit (None: none). max_context / prompt_len: the request ends with "length"
        once prompt_len + generated tokens reaches max_context.
    A token that stops generation contributes no text; text held back for a possible stop string is released
    when generation ends for any other reason.
    """

    def __init__(self, *, stop: Iterable[str] = (), stop_token_ids: Iterable[int] = (),
                 eos_token_ids: Iterable[int] = (), ignore_eos: bool = False, max_tokens: int | None = None,
                 max_context: int | None = None, prompt_len: int = 0,
                 include_stop_str_in_output: bool = False):
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r}: expected an integer >= 1 or None")
        if max_context is not None and prompt_len >= max_context:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room in a context of {max_context} "
                             "tokens; shorten the prompt or raise the context length")
        self.matcher = StopStringMatcher(stop, include_stop_str_in_output)
        self.stop_ids = set(stop_token_ids)
        if not ignore_eos:
            self.stop_ids |= set(eos_token_ids)
        self.max_tokens = max_tokens
        self.max_context = max_context
        self.prompt_len = prompt_len
        self.num_tokens = 0
        self.result: StopResult | None = None  # the final result once finished

    @classmethod
    def from_params(cls, params, eos_token_ids: Iterable[int] = (), max_context: int | None = None,
                    prompt_len: int = 0) -> "StopChecker":
        """Build from a `SamplingParams` (stop, stop_token_ids, ignore_eos, max_tokens)."""
        return cls(stop=params.stop, stop_token_ids=params.stop_token_ids, eos_token_ids=eos_token_ids,
                   ignore_eos=params.ignore_eos, max_tokens=params.max_tokens, max_context=max_context,
                   prompt_len=prompt_len)

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def remaining(self) -> int | None:
        """How many more tokens may be generated (None: unbounded), e.g. to cap speculative drafts."""
        limits = []
        if self.max_tokens is not None:
            limits.append(self.max_tokens - self.num_tokens)
        if self.max_context is not None:
            limits.append(self.max_context - self.prompt_len - self.num_tokens)
        return max(0, min(limits)) if limits else None

    def step(self, token_id: int, text_delta: str) -> StopResult:
        if self.result is not None:
            return StopResult("", True, self.result.finish_reason, self.result.stop_reason)
        self.num_tokens += 1
        if token_id in self.stop_ids:
            return self._finish(self.matcher.flush(), "stop", token_id)
        text, matched = self.matcher.feed(text_delta)
        if matched is not None:
            return self._finish(text, "stop", matched)
        if self.remaining == 0:
            return self._finish(text + self.matcher.flush(), "length", None)
        return StopResult(text)

    def _finish(self, text: str, reason: FinishReason, stop_reason: str | int | None) -> StopResult:
        self.result = StopResult(text, True, reason, stop_reason)
        return self.result

    def flush(self) -> str:
        """Text still held back, for a stream that ends without a stop (e.g. the client aborts)."""
        return self.matcher.flush()
