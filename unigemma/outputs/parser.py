"""Streaming response parser: Gemma 4 output text → reasoning, content and tool calls, as events.

Input is generated text decoded with special tokens KEPT (`<|"|>`, `<|tool_call>`, ... are the format; with
them skipped, `city:<|"|>Oslo<|"|>` becomes `city:Oslo`). Feed it in deltas of any size::

    p = ResponseParser(start_state="content")          # or ResponseParser.from_prompt(prompt_text)
    for delta in stream: handle(p.feed(delta))
    handle(p.finish())

Events: ReasoningDelta(text), ContentDelta(text), ToolCallStart(index, id, name),
ToolCallArgsDelta(index, json_text), ToolCallEnd(index, arguments), ParseWarning(message, raw).
`parse_response(text)` runs the same machine over a whole text and returns a `ParsedResponse` with OpenAI-shaped
`tool_calls`.

How it reads a response (chat-format.md §4, §6)::

    content ──<|channel>thought\\n──▶ reasoning ──<channel|>──▶ content
    content / reasoning ──<|tool_call>──▶ call: "call:NAME{args}" ──<tool_call|>──▶ content
    any ──<turn|> | <|tool_response> | <eos>──▶ done   (`stopped_by` tells which)

- The start state comes from the prompt, not the output: after a thinking-on tool-response prompt the model is
  already inside a thought channel (`start_state_for_prompt`).
- A delta may end in the middle of a delimiter; any suffix that could begin one is held back until the next
  delta (or `finish`) decides. Events do not depend on how the text was split, except that text deltas may be
  cut differently: joining adjacent deltas of a kind gives the same sequence for every split.
- Markup never reaches content or reasoning: stray format tokens are removed with a ParseWarning. Leading and
  trailing whitespace of content and of each reasoning segment is dropped (trailing whitespace is held until
  more text shows it is inner whitespace).
- Tool-call arguments stream as JSON text (OpenAI style) conservatively: only what cannot change is sent
  early (the arguments up to the first closing-quote candidate, whose meaning depends on the text after it);
  the rest comes when the call closes. The joined `json_text` deltas of a call always equal
  `json.dumps(arguments, ensure_ascii=False)` of its ToolCallEnd.
- Near misses are repaired with a ParseWarning: a call closed by `<turn|>`/`<eos>`/`<|tool_response>` or by
  the next `<|tool_call>`, a call inside an unclosed thought channel, `<channel|>call:NAME{...}` without
  `<|tool_call>`, a missing `call:` prefix, a JSON-style `{"name":..., "arguments":...}` body, and the value
  repairs of `unigemma.inputs.wire.parse_wire_value`. A call that cannot be read ends with
  `ToolCallEnd(arguments=None)` (when it was started) and a ParseWarning holding its raw text: never dropped
  silently.

What it does not do: detokenize (outputs/detokenize.py), decide when to stop generating (engine), coerce
argument types by tool schema.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

from unigemma.inputs.wire import (
    CHANNEL_CLOSE, CHANNEL_OPEN, FORMAT_TOKENS, QUOTE, STOP_STRINGS, THOUGHT_LABEL, TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN, TURN_OPEN, WireParseError, parse_wire_arguments, parse_wire_value,
)

__all__ = [
    "ReasoningDelta", "ContentDelta", "ToolCallStart", "ToolCallArgsDelta", "ToolCallEnd", "ParseWarning",
    "Event", "ResponseParser", "ParsedResponse", "parse_response", "start_state_for_prompt", "STOP_STRINGS",
]


# --- events -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    index: int
    json_text: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    arguments: dict | None  # None: the call could not be read (a ParseWarning with its raw text came first)


@dataclass(frozen=True)
class ParseWarning:
    message: str
    raw: str = ""


Event = Union[ReasoningDelta, ContentDelta, ToolCallStart, ToolCallArgsDelta, ToolCallEnd, ParseWarning]

START_STATES = ("content", "reasoning", "channel")


def start_state_for_prompt(prompt: str) -> str:
    """Where generation starts, from the prompt's tail (chat-format.md §6).

    "reasoning" when the prompt ends inside an open thought channel (`...<|channel>thought\\n`), "channel" when
    it ends right after `<|channel>` (the label is still to come), else "content" (also after the closed, empty
    channel of a thinking-off prompt).
    """
    opened = prompt.rfind(CHANNEL_OPEN)
    if opened < 0 or opened < prompt.rfind(CHANNEL_CLOSE) or opened < prompt.rfind(TURN_OPEN):
        return "content"
    return "channel" if opened + len(CHANNEL_OPEN) == len(prompt) else "reasoning"


# --- helpers ----------------------------------------------------------------------------------------------------

def _token_regex(tokens: Iterable[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


_ALL_TOKENS = tuple(FORMAT_TOKENS)
_CALL_TERMINATORS = (TOOL_CALL_CLOSE, TOOL_CALL_OPEN) + STOP_STRINGS
_ANY_RE = _token_regex(_ALL_TOKENS)
_CALL_END_RE = _token_regex(_CALL_TERMINATORS)
_NAME = re.compile(r"[\w.\-:]+\Z")
_STRICT_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?\Z")
_STREAM_KEY = re.compile(r"([\w.\-]+):")
_STREAM_KEY_PART = re.compile(r"[\w.\-]*\Z")
_BARE_CALL = re.compile(r"call:[\w.\-:]+\{")
_BARE_CALL_PART = re.compile(r"(c(a(l(l(:[\w.\-:]*)?)?)?)?)?\Z")


def _holdback(buf: str, tokens: Iterable[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of one of `tokens` (all start with '<')."""
    i = buf.find("<", max(0, len(buf) - 24))
    while i >= 0:
        tail = buf[i:]
        if any(len(tail) < len(t) and t.startswith(tail) for t in tokens):
            return len(buf) - i
        i = buf.find("<", i + 1)
    return 0


def _json_chars(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


class _TextStream:
    """Content or reasoning text: drops leading/trailing whitespace, separates segments with a newline."""

    def __init__(self) -> None:
        self.started = False      # something emitted in the current segment
        self.any = False          # something emitted at all
        self.held = ""            # trailing whitespace not yet known to be inner
        self.sep_pending = False

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
            if self.sep_pending:
                text = "\n" + text
                self.sep_pending = False
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        if body:
            self.any = True
        return body

    def end_segment(self) -> None:
        if self.started:
            self.sep_pending = True
        self.started = False
        self.held = ""


class _ArgsJsonStream:
    """JSON text of tool-call arguments, produced while the wire text arrives, never ahead of certainty.

    It follows the canonical wire grammar only (bare keys, quote-token strings, JSON numbers and literals,
    nesting). At the first thing that the final parse might read differently (a closing-quote candidate, a
    repair, a duplicate key) it stops; the caller then sends the rest from the final parse. Everything emitted is
    therefore a prefix of `json.dumps(final_arguments, ensure_ascii=False)`.
    """

    def __init__(self) -> None:
        self.buf = ""
        self.state = "start"
        self.stack: list[str] = []
        self.keys: list[set[str]] = []
        self.sep = ""
        self.emitted = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buf += text
        out: list[str] = []
        while not self.stopped and self._step(out):
            pass
        piece = "".join(out)
        self.emitted += piece
        return piece

    def _stop(self) -> bool:
        self.stopped = True
        self.buf = ""
        return False

    def _step(self, out: list[str]) -> bool:
        """Consume one grammar element from `buf`; False when more text is needed (or streaming stopped)."""
        stripped = self.buf.lstrip()
        if self.state != "string":
            self.buf = stripped
        if not self.buf:
            return False
        b, state = self.buf, self.state
        if state == "start":
            if b[0] != "{":
                return self._stop()
            self._open(out, "{")
            return True
        if state == "key_or_close":
            if b[0] == "}" and not self.sep:
                return self._close(out, "}")
            m = _STREAM_KEY.match(b)
            if not m:
                if _STREAM_KEY_PART.match(b):
                    return False
                return self._stop()
            key = m.group(1)
            if key in self.keys[-1]:
                return self._stop()
            self.keys[-1].add(key)
            out.append(self.sep + json.dumps(key, ensure_ascii=False) + ": ")
            self.sep = ""
            self.buf = b[m.end():]
            self.state = "value"
            return True
        if state == "value_or_close":
            if b[0] == "]":
                return self._close(out, "]")
            self.state = "value"
            return True
        if state == "value":
            if b.startswith(QUOTE):
                out.append(self.sep + '"')
                self.sep = ""
                self.buf = b[len(QUOTE):]
                self.state = "string"
                return True
            if QUOTE.startswith(b):
                return False
            if b[0] in "{[":
                out.append(self.sep)
                self.sep = ""
                self._open(out, b[0])
                return True
            self.state = "scalar"
            return True
        if state == "string":
            end = b.find(QUOTE)
            if end >= 0:
                out.append(_json_chars(b[:end]))
                return self._stop()  # where the string ends depends on what follows: leave it to the final parse
            keep = 0
            for n in range(min(len(QUOTE) - 1, len(b)), 0, -1):
                if QUOTE.startswith(b[-n:]):
                    keep = n
                    break
            if len(b) > keep:
                out.append(_json_chars(b[:len(b) - keep]))
                self.buf = b[len(b) - keep:]
            return False
        if state == "scalar":
            m = re.search(r"[,}\]]", b)
            if not m:
                if "<" in b or "{" in b or "[" in b:
                    return self._stop()
                return False
            token = b[:m.start()].strip()
            if token in ("true", "false", "null"):
                value: Any = {"true": True, "false": False, "null": None}[token]
            else:
                num = _STRICT_NUMBER.match(token)
                if not num:
                    return self._stop()
                value = float(token) if num.group(1) or num.group(2) else int(token)
            out.append(self.sep + json.dumps(value))
            self.sep = ""
            self.buf = b[m.start():]
            self.state = "after_value"
            return True
        if state == "after_value":
            if b[0] == ",":
                self.buf = b[1:]
                self.sep = ", "
                self.state = "key_or_close" if self.stack[-1] == "}" else "value"
                return True
            if b[0] in "}]":
                return self._close(out, b[0])
            return self._stop()
        return self._stop()  # "done": text after the closing brace

    def _open(self, out: list[str], bracket: str) -> None:
        out.append(bracket)
        self.buf = self.buf[1:]
        if bracket == "{":
            self.stack.append("}")
            self.keys.append(set())
            self.state = "key_or_close"
        else:
            self.stack.append("]")
            self.state = "value_or_close"

    def _close(self, out: list[str], closer: str) -> bool:
        if not self.stack or self.stack[-1] != closer:
            return self._stop()
        out.append(closer)
        self.buf = self.buf[1:]
        self.stack.pop()
        if closer == "}":
            self.keys.pop()
        self.state = "after_value" if self.stack else "done"
        return True


@dataclass
class _Call:
    raw_prefix: str                 # "<|tool_call>" or "" when recovered from `<channel|>call:`
    body: str = ""
    name: str | None = None         # decided at the first "{"
    name_ok: bool = False
    brace: int = -1                 # offset of the first "{" in body
    index: int = -1                 # set when ToolCallStart was sent
    stream: _ArgsJsonStream = field(default_factory=_ArgsJsonStream)


# --- the parser -------------------------------------------------------------------------------------------------

class ResponseParser:
    """Incremental parser of one model response. See the module docstring for the rules.

    start_state: "content" (default; thinking off, or thinking on before any channel), "reasoning" (the prompt
    ended inside `<|channel>thought\\n`), or "channel" (the prompt ended with `<|channel>`).
    seed: tool-call ids are `call_<24 hex>`; with a seed they are reproducible (tests), else random.
    tool_names: declared tool names, accepted even where they fall outside the usual name characters.
    """

    def __init__(self, start_state: str = "content", *, seed: int | None = None,
                 tool_names: Iterable[str] | None = None):
        if start_state not in START_STATES:
            raise ValueError(f"start_state is {start_state!r}; expected one of {', '.join(START_STATES)}")
        self._mode = "label" if start_state == "channel" else start_state
        self._buf = ""
        self._label = ""
        self._content = _TextStream()
        self._reasoning = _TextStream()
        self._probe: str | None = None   # text after <channel|> that may turn out to be "call:NAME{"
        self._call: _Call | None = None
        self._ignored = ""
        self._rng = random.Random(seed) if seed is not None else None
        self._tool_names = set(tool_names or ())
        self.tool_call_count = 0
        self.stopped_by: str | None = None
        self._finished = False

    @classmethod
    def from_prompt(cls, prompt: str, **kwargs: Any) -> "ResponseParser":
        return cls(start_state_for_prompt(prompt), **kwargs)

    # -- public ---------------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise ValueError("feed() after finish(): create a new ResponseParser for a new response")
        events: list[Event] = []
        if text:
            self._buf += text
            self._process(events, final=False)
        return events

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        events: list[Event] = []
        self._process(events, final=True)
        if self._mode != "done":
            self._end_mode(events, reason="end of output")
        if self._ignored.strip():
            events.append(ParseWarning("text after the end of the turn was ignored", self._ignored))
        self._finished = True
        return events

    # -- the loop -------------------------------------------------------------------------------------------
    def _process(self, events: list[Event], final: bool) -> None:
        while self._buf:
            if self._mode == "done":
                self._ignored += self._buf
                self._buf = ""
                return
            in_call = self._mode == "call"
            m = (_CALL_END_RE if in_call else _ANY_RE).search(self._buf)
            if m:
                text, tok, self._buf = self._buf[:m.start()], m.group(0), self._buf[m.end():]
            else:
                hold = 0 if final else _holdback(self._buf, _CALL_TERMINATORS if in_call else _ALL_TOKENS)
                cut = len(self._buf) - hold
                text, tok, self._buf = self._buf[:cut], None, self._buf[cut:]
            if text:
                self._text(text, events)
            if tok is None:
                return
            if self._mode == "call" and tok not in _CALL_TERMINATORS:
                self._text(tok, events)  # the text just switched into a call: a quote token is call text
            else:
                self._token(tok, events)

    def _text(self, text: str, events: list[Event]) -> None:
        mode = self._mode
        if mode == "content":
            if self._probe is not None:
                self._probe += text
                s = self._probe.lstrip()
                bare = _BARE_CALL.match(s)
                if bare:
                    self._probe = None
                    events.append(ParseWarning("tool call written after <channel|> without <|tool_call>; "
                                               "read as a call", bare.group(0)))
                    self._start_call(events, raw_prefix="")
                    self._text(s, events)
                    return
                if _BARE_CALL_PART.match(s):
                    return
                text, self._probe = self._probe, None
            self._emit_content(text, events)
        elif mode == "reasoning":
            piece = self._reasoning.push(text)
            if piece:
                events.append(ReasoningDelta(piece))
        elif mode == "label":
            self._label += text
            if self._label.startswith(THOUGHT_LABEL):
                rest = self._label[len(THOUGHT_LABEL):]
                self._label, self._mode = "", "reasoning"
                if rest:
                    self._text(rest, events)
            elif not THOUGHT_LABEL.startswith(self._label):
                rest, self._label, self._mode = self._label, "", "reasoning"  # a channel without the label
                self._text(rest, events)
        elif mode == "call":
            self._call_text(text, events)
        else:  # done
            self._ignored += text

    def _emit_content(self, text: str, events: list[Event]) -> None:
        piece = self._content.push(text)
        if piece:
            events.append(ContentDelta(piece))

    def _flush_probe(self, events: list[Event]) -> None:
        if self._probe is not None:
            text, self._probe = self._probe, None
            self._emit_content(text, events)

    def _token(self, tok: str, events: list[Event]) -> None:
        mode = self._mode
        if tok in STOP_STRINGS:
            self._end_mode(events, reason=f"closed by {tok}")
            self.stopped_by = tok
            self._mode = "done"
            return
        if mode == "label":
            # `<|channel>thought<channel|>` or `<|channel><channel|>`: whatever came was the label
            self._label, self._mode = "", "reasoning"
            self._token(tok, events)
            return
        if mode == "call":
            if tok == TOOL_CALL_CLOSE:
                self._end_call(events, closed_by=None)
                self._mode = "content"
            else:  # TOOL_CALL_OPEN: the previous call was never closed
                self._end_call(events, closed_by=f"closed by the next {tok}")
                self._start_call(events, raw_prefix=TOOL_CALL_OPEN)
            return
        if mode == "content":
            self._flush_probe(events)
            if tok == TOOL_CALL_OPEN:
                self._start_call(events, raw_prefix=TOOL_CALL_OPEN)
            elif tok == CHANNEL_OPEN:
                self._mode = "label"
            else:
                events.append(ParseWarning(f"unexpected {tok} in content removed", tok))
            return
        # reasoning
        if tok == CHANNEL_CLOSE:
            self._reasoning.end_segment()
            self._mode = "content"
            if not self._content.any:
                self._probe = ""
        elif tok == TOOL_CALL_OPEN:
            events.append(ParseWarning("tool call inside an unclosed thought channel; channel closed", tok))
            self._reasoning.end_segment()
            self._start_call(events, raw_prefix=TOOL_CALL_OPEN)
        elif tok == CHANNEL_OPEN:
            self._mode = "label"  # a second opener (the prompt had already opened the channel)
        else:
            events.append(ParseWarning(f"unexpected {tok} in reasoning removed", tok))

    def _end_mode(self, events: list[Event], reason: str) -> None:
        """Close whatever is open at a stop string or at the end of the output."""
        if self._mode == "label":
            self._label, self._mode = "", "reasoning"
        if self._mode == "call":
            self._end_call(events, closed_by=reason)
        self._flush_probe(events)
        self._reasoning.end_segment()
        self._content.end_segment()

    # -- calls ----------------------------------------------------------------------------------------------
    def _start_call(self, events: list[Event], raw_prefix: str) -> None:
        self._content.end_segment()  # whitespace around a call is not content; text after it starts a new line
        self._call = _Call(raw_prefix=raw_prefix)
        self._mode = "call"

    def _new_id(self) -> str:
        bits = self._rng.getrandbits(96) if self._rng is not None else int(secrets.token_hex(12), 16)
        return f"call_{bits:024x}"

    def _name_ok(self, name: str) -> bool:
        return bool(name) and (name in self._tool_names or bool(_NAME.match(name)))

    def _call_text(self, text: str, events: list[Event]) -> None:
        call = self._call
        assert call is not None
        old = len(call.body)
        call.body += text
        if call.name is None:
            brace = call.body.find("{", old)
            if brace < 0:
                return
            call.brace = brace
            head = call.body[:brace].strip()
            if head.startswith("call:"):
                call.name = head[len("call:"):].strip()
            else:
                call.name = head
                if head:
                    events.append(ParseWarning(f"tool call without the 'call:' prefix: {head!r}",
                                               call.raw_prefix + call.body[:brace + 1]))
            call.name_ok = self._name_ok(call.name)
            if call.name_ok:
                self._open_call(call, events)
                text = call.body[brace:]
            else:
                return
        if call.index >= 0:
            piece = call.stream.feed(text)
            if piece:
                events.append(ToolCallArgsDelta(call.index, piece))

    def _open_call(self, call: _Call, events: list[Event]) -> None:
        call.index = self.tool_call_count
        self.tool_call_count += 1
        events.append(ToolCallStart(call.index, self._new_id(), call.name or ""))

    def _end_call(self, events: list[Event], closed_by: str | None) -> None:
        call, self._call = self._call, None
        self._mode = "content"
        if call is None:
            return
        raw = call.raw_prefix + call.body
        if closed_by is not None:
            events.append(ParseWarning(f"tool call not closed by {TOOL_CALL_CLOSE} ({closed_by})", raw))
        notes: list[str] = []
        arguments: dict | None = None
        problem = ""
        if call.name is None:
            head = call.body.strip()
            if head.startswith("call:"):
                head = head[len("call:"):].strip()
            if self._name_ok(head):
                call.name = head
                notes.append(f"tool call {head!r} has no argument block; read as {{}}")
                arguments = {}
                self._open_call(call, events)
            else:
                problem = "empty tool call" if not head else "tool call has no '{' argument block"
        elif not call.name:
            arguments, name, problem = self._json_style(call.body[call.brace:], notes)
            if arguments is not None:
                call.name = name
                self._open_call(call, events)
        elif not call.name_ok:
            problem = f"invalid tool name {call.name!r}"
        else:
            try:
                arguments = parse_wire_arguments(call.body[call.brace:], notes)
            except WireParseError as e:
                problem = f"arguments of tool call {call.name!r} could not be read: {e}"
        for note in notes:
            events.append(ParseWarning(f"tool call {call.name!r}: {note}", raw))
        if arguments is None:
            events.append(ParseWarning(problem or "tool call could not be read", raw))
            if not call.raw_prefix and "<" not in call.body:
                self._emit_content(call.body, events)  # recovered text that was not a call after all
            if call.index >= 0:
                events.append(ToolCallEnd(call.index, None))
            return
        final = json.dumps(arguments, ensure_ascii=False)
        sent = call.stream.emitted
        if final.startswith(sent):
            if final[len(sent):]:
                events.append(ToolCallArgsDelta(call.index, final[len(sent):]))
        else:  # by construction this should not happen; say so rather than send broken JSON silently
            events.append(ParseWarning("streamed argument text differs from the parsed arguments; "
                                       "use ToolCallEnd.arguments", sent))
        events.append(ToolCallEnd(call.index, arguments))

    def _json_style(self, body: str, notes: list[str]) -> tuple[dict | None, str, str]:
        """`<|tool_call>{"name": ..., "arguments": {...}}`: a JSON call where the wire form was expected."""
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            try:
                obj = parse_wire_value(body, notes)
            except WireParseError as e:
                return None, "", f"tool call without a name could not be read: {e}"
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not self._name_ok(obj["name"]):
            return None, "", "tool call has no name"
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None, "", "JSON-style tool call with unreadable arguments"
        if not isinstance(args, dict):
            return None, "", "JSON-style tool call whose arguments are not an object"
        notes.append('JSON-style call {"name": ..., "arguments": ...} read as a call')
        return args, obj["name"], ""


# --- whole responses ----------------------------------------------------------------------------------------------

@dataclass
class ParsedResponse:
    content: str
    reasoning: str
    tool_calls: list[dict]          # OpenAI shape: {"id", "type": "function", "function": {"name", "arguments"}}
    warnings: list[ParseWarning]
    stopped_by: str | None = None   # "<turn|>", "<|tool_response>", "<eos>" or None (output just ended)

    @property
    def finish_reason(self) -> str:
        """"tool_calls" when calls were read, "stop" at a stop string, "length" when the output just ended.

        Only meaningful when the stop string's text was fed to the parser; an engine that strips stop tokens
        before parsing knows the reason better itself."""
        if self.tool_calls:
            return "tool_calls"
        return "stop" if self.stopped_by is not None else "length"


def collect(events: Iterable[Event], stopped_by: str | None = None) -> ParsedResponse:
    """Fold a list of events into a ParsedResponse."""
    content, reasoning, warnings = [], [], []
    calls: dict[int, dict] = {}
    done: list[int] = []
    for ev in events:
        if isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ParseWarning):
            warnings.append(ev)
        elif isinstance(ev, ToolCallStart):
            calls[ev.index] = {"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
        elif isinstance(ev, ToolCallArgsDelta):
            calls[ev.index]["function"]["arguments"] += ev.json_text
        elif isinstance(ev, ToolCallEnd) and ev.arguments is not None:
            done.append(ev.index)
    return ParsedResponse("".join(content), "".join(reasoning), [calls[i] for i in done], warnings, stopped_by)


def parse_response(text: str, start_state: str = "content", *, seed: int | None = None,
                   tool_names: Iterable[str] | None = None) -> ParsedResponse:
    """Parse a whole response (decoded with special tokens kept)."""
    parser = ResponseParser(start_state, seed=seed, tool_names=tool_names)
    events = parser.feed(text) + parser.finish()
    return collect(events, parser.stopped_by)
