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
- Tool-call arguments stream as JSON text (OpenAI style) conservatively: only what no later text can change is
  sent early (`{`, the first key, and the start of its string value up to its first `,` `}` `]` or quote token;
  see `_ArgsJsonStream`); the rest comes when the call closes. The joined `json_text` deltas of a call always
  equal `json.dumps(arguments, ensure_ascii=False)` of its ToolCallEnd.
- Arguments are read by `unigemma.inputs.wire.parse_tool_calls`, which weighs every reading of the call text
  (the cheapest in repairs wins; the request's tool schemas count too) and names each repair; its notes become
  ParseWarnings. Near misses repaired with a ParseWarning: several calls in one block
  (`<|tool_call>call:a{..}call:b{..}<tool_call|>`), a string missing its opening or closing quote, `108.`, JSON
  or single quotes, a call closed by `<turn|>`/`<eos>`/`<|tool_response>` or by the next `<|tool_call>`, a call
  inside an unclosed thought channel, `<channel|>call:NAME{...}` without `<|tool_call>`, a missing `call:`
  prefix, a JSON-style `{"name":..., "arguments":...}` body, a namespaced name (`functions.get_weather`) for a
  declared tool.

Two rules (issue 16), so that a client never gets a confidently wrong call and always sees what was dropped:

- With `tools` given, a call to a function not among them is dropped with a ParseWarning (raw text kept), and
  no ToolCallStart is sent for it. Not returned as a call: the client would run, or fail on, a function it never
  offered (SGLang drops it too). Not returned as content: content is shown to users and fed back into the next
  prompt, where call markup becomes control tokens (chat-format.md §8 item 11). Without `tools`, any
  well-formed name is a call (a caller parsing raw output has no list to check against).
- A call that cannot be read (truncated before its arguments, unreadable structure, not the format) ends with
  `ToolCallEnd(arguments=None)` (when it was started) and a ParseWarning holding its raw text; it is not turned
  into content, for the same reason (a `<channel|>call:...` look-alike that had no markup stays content). The
  server puts every ParseWarning in the choice's `warnings` field and in its log, so an HTTP client can see
  what was dropped.

What it does not do: detokenize (outputs/detokenize.py), decide when to stop generating (engine), decode the
wire dialect itself (inputs/wire.py).
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
    TOOL_CALL_OPEN, TURN_OPEN, WireParseError, coerce_arguments, parse_tool_calls, parse_wire_value,
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
    cut_off: bool = False   # the output ended inside the call (finish(cut_off=True)): arguments is None and the
    #                         call's JSON text is only what its ToolCallArgsDeltas carried


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
_STREAM_KEY = re.compile(r"([\w.\-]+):")
_STREAM_STRING_STOP = re.compile(r'[,}\]]|<\|"\|>')
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
    """JSON text of tool-call arguments sent while the wire text arrives: only what no later text can change.

    The final arguments come from a search over the readings of the whole call (unigemma.inputs.wire): text
    that arrives later can move where an earlier string ends (a string left unclosed ends at a `,` `}` or `]`
    in it), turn a number into part of a bare string, or bring a duplicate key. What every reading shares is
    the `{`, the first key, and, when its value opens with a quote token and the tool declares it a string (or
    does not declare it), that string's text up to its first `,` `}` `]` or quote token. That much is sent
    early (the common case it serves: the long first string of a `write` or `run` call); the rest comes when
    the call closes. Everything emitted is therefore a prefix of `json.dumps(final_arguments)`.
    """

    def __init__(self, string_ok=lambda key: True) -> None:
        self.buf = ""
        self.state = "start"
        self.emitted = ""
        self.stopped = False
        self.string_ok = string_ok

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
        """Consume one element from `buf`; False when more text is needed (or streaming stopped)."""
        if self.state != "string":
            self.buf = self.buf.lstrip()
        b = self.buf
        if not b:
            return False
        if self.state == "start":
            if b[0] != "{":
                return self._stop()
            out.append("{")
            self.buf, self.state = b[1:], "key"
            return True
        if self.state == "key":
            m = _STREAM_KEY.match(b)
            if not m:
                return False if _STREAM_KEY_PART.match(b) else self._stop()
            key = m.group(1)
            if not self.string_ok(key):
                return self._stop()
            out.append(json.dumps(key, ensure_ascii=False) + ": ")
            self.buf, self.state = b[m.end():], "value"
            return True
        if self.state == "value":
            if b.startswith(QUOTE):
                out.append('"')
                self.buf, self.state = b[len(QUOTE):], "string"
                return True
            return False if QUOTE.startswith(b) else self._stop()
        # string: up to the first `,` `}` `]` or quote token, holding back a partial quote token at the end
        m = _STREAM_STRING_STOP.search(b)
        if m:
            out.append(_json_chars(b[:m.start()]))
            return self._stop()
        keep = next((n for n in range(min(len(QUOTE) - 1, len(b)), 0, -1) if QUOTE.startswith(b[-n:])), 0)
        if len(b) > keep:
            out.append(_json_chars(b[:len(b) - keep]))
            self.buf = b[len(b) - keep:]
        return False


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
    tools: the request's tools (OpenAI `{"type": "function", "function": {"name", "parameters"}}` dicts, or the
    inner function dicts). Their JSON Schemas choose among readings of broken arguments and convert values to
    the declared types; and a call to a function not among them is dropped with a warning (module docstring).
    tool_names: declared names without schemas (the same rule for undeclared names).
    Without either, any well-formed name is accepted (a caller parsing raw output without a request).
    """

    def __init__(self, start_state: str = "content", *, seed: int | None = None,
                 tool_names: Iterable[str] | None = None, tools: Iterable[dict] | None = None):
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
        self._schemas: dict[str, dict] = {}
        self._tool_names = set(tool_names or ())
        for tool in tools or ():
            fn = tool.get("function", tool) if isinstance(tool, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                self._tool_names.add(fn["name"])
                if isinstance(fn.get("parameters"), dict):
                    self._schemas[fn["name"]] = fn["parameters"]
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

    def finish(self, cut_off: bool = False) -> list[Event]:
        """End the response. cut_off: the output ended because the token budget ran out (finish_reason
        "length"). A tool call open at that point is then not repaired: it ends with
        `ToolCallEnd(index, None, cut_off=True)`, and its arguments are exactly the JSON text already sent in
        ToolCallArgsDeltas (usually incomplete), so a streaming and a whole-response client see the same call."""
        if self._finished:
            return []
        events: list[Event] = []
        self._process(events, final=True)
        if self._mode == "call" and cut_off:
            self._cut_call(events)
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
    def _cut_call(self, events: list[Event]) -> None:
        """The token budget ended the output inside a call: no repair, no further argument text."""
        call, self._call = self._call, None
        self._mode = "content"
        if call is None:
            return
        events.append(ParseWarning("tool call cut off by the token limit; its arguments are incomplete",
                                   call.raw_prefix + call.body))
        if call.index >= 0:
            events.append(ToolCallEnd(call.index, None, cut_off=True))

    def _start_call(self, events: list[Event], raw_prefix: str) -> None:
        self._content.end_segment()  # whitespace around a call is not content; text after it starts a new line
        self._call = _Call(raw_prefix=raw_prefix)
        self._mode = "call"

    def _new_id(self) -> str:
        bits = self._rng.getrandbits(96) if self._rng is not None else int(secrets.token_hex(12), 16)
        return f"call_{bits:024x}"

    def _name_ok(self, name: str) -> bool:
        """A name that may be a call: declared, or (when nothing is declared) well-formed."""
        if not name:
            return False
        if self._tool_names:
            return self._resolve(name) is not None
        return bool(_NAME.match(name))

    def _resolve(self, name: str) -> str | None:
        """The declared tool `name` means: itself, or a declared name it carries a namespace prefix for
        (`functions.get_weather`, `default_api:get_weather`), when exactly one fits."""
        if name in self._tool_names:
            return name
        fits = [t for t in self._tool_names if name.endswith(t) and name[-len(t) - 1] in ".:/"]
        return fits[0] if len(fits) == 1 else None

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
                self._rename(call, events)
                self._open_call(call, events)
                text = call.body[brace:]
            else:
                return
        if call.index >= 0:
            piece = call.stream.feed(text)
            if piece:
                events.append(ToolCallArgsDelta(call.index, piece))

    def _rename(self, call: _Call, events: list[Event]) -> None:
        """Map a namespaced name to the declared one (with a warning); set the argument stream's schema."""
        if self._tool_names and call.name not in self._tool_names:
            declared = self._resolve(call.name or "")
            events.append(ParseWarning(f"tool name {call.name!r} read as the declared {declared!r}",
                                       call.raw_prefix + call.body))
            call.name = declared
        schema = self._schemas.get(call.name or "")
        props = schema.get("properties") if isinstance(schema, dict) else None
        if isinstance(props, dict):
            call.stream.string_ok = lambda key: key in props and _declares_string(props[key])

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
        calls: list[tuple[str, dict]] = []
        more: list[tuple[str, dict]] = []   # further calls written in the same block
        problem = ""
        if call.name is None:
            head = call.body.strip()
            if head.startswith("call:"):
                head = head[len("call:"):].strip()
            if self._name_ok(head):
                call.name = head
                notes.append(f"tool call {head!r} has no argument block; read as {{}}")
                calls = [(head, {})]
                self._rename(call, events)
                self._open_call(call, events)
            elif head and _NAME.match(head):
                problem = f"call to {head!r}, which is not among the request's tools, dropped"
            else:
                problem = "empty tool call" if not head else "tool call has no '{' argument block"
        elif not call.name:
            arguments, name, problem = self._json_style(call.body[call.brace:], notes)
            if arguments is not None:
                call.name = name
                self._rename(call, events)
                if call.name in self._schemas:
                    arguments = coerce_arguments(arguments, self._schemas[call.name], notes, call.name)
                calls = [(call.name, arguments)]
                self._open_call(call, events)
        elif not call.name_ok:
            if self._tool_names and _NAME.match(call.name):
                problem = f"call to {call.name!r}, which is not among the request's tools, dropped"
                try:  # a declared call may still follow it in the block
                    more = parse_tool_calls(call.name, call.body[call.brace:], self._schemas, notes)[1:]
                except WireParseError:
                    pass
            else:
                problem = f"invalid tool name {call.name!r}"
        else:
            try:
                calls = parse_tool_calls(call.name, call.body[call.brace:], self._schemas, notes)
            except WireParseError as e:
                problem = f"arguments of tool call {call.name!r} could not be read: {e}"
        for note in notes:
            events.append(ParseWarning(f"tool call {call.name!r}: {note}", raw))
        if not calls:
            events.append(ParseWarning(problem or "tool call could not be read", raw))
            if not call.raw_prefix and "<" not in call.body:
                self._emit_content(call.body, events)  # recovered text that was not a call after all
            if call.index >= 0:
                events.append(ToolCallEnd(call.index, None))
        else:
            (_, arguments), more = calls[0], calls[1:]
            final = json.dumps(arguments, ensure_ascii=False)
            sent = call.stream.emitted
            if final.startswith(sent):
                if final[len(sent):]:
                    events.append(ToolCallArgsDelta(call.index, final[len(sent):]))
            else:  # by construction this should not happen; say so rather than send broken JSON silently
                events.append(ParseWarning("streamed argument text differs from the parsed arguments; "
                                           "use ToolCallEnd.arguments", sent))
            events.append(ToolCallEnd(call.index, arguments))
        for name, arguments in more:
            if not self._name_ok(name):
                events.append(ParseWarning(f"call to {name!r}, which is not among the request's tools, dropped",
                                           raw))
                continue
            extra = _Call(raw_prefix="", name=name)
            self._rename(extra, events)
            self._open_call(extra, events)
            events.append(ToolCallArgsDelta(extra.index, json.dumps(arguments, ensure_ascii=False)))
            events.append(ToolCallEnd(extra.index, arguments))

    def _json_style(self, body: str, notes: list[str]) -> tuple[dict | None, str, str]:
        """`<|tool_call>{"name": ..., "arguments": {...}}`: a JSON call where the wire form was expected."""
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            try:
                obj = parse_wire_value(body, notes)
            except WireParseError as e:
                return None, "", f"tool call without a name could not be read: {e}"
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None, "", "tool call has no name"
        if not self._name_ok(obj["name"]):
            return None, "", (f"call to {obj['name']!r}, which is not among the request's tools, dropped"
                              if self._tool_names else f"invalid tool name {obj['name']!r}")
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


def _declares_string(schema: Any) -> bool:
    """A property whose value, when quoted, is kept as the string it is (no conversion to stream around)."""
    if not isinstance(schema, dict):
        return False
    ty = schema.get("type")
    types = ty if isinstance(ty, list) else [ty]
    return any(isinstance(t, str) and t.lower() == "string" for t in types) and "enum" not in schema


# --- whole responses ----------------------------------------------------------------------------------------------

@dataclass
class ParsedResponse:
    content: str
    reasoning: str
    tool_calls: list[dict]          # OpenAI shape: {"id", "type": "function", "function": {"name", "arguments"}}
    warnings: list[ParseWarning]
    stopped_by: str | None = None   # "<turn|>", "<|tool_response>", "<eos>" or None (output just ended)
    cut_off: bool = False           # the last call in tool_calls was cut off by the token budget (partial JSON)

    @property
    def finish_reason(self) -> str:
        """"length" when a call was cut off, "tool_calls" when calls were read, "stop" at a stop string,
        "length" when the output just ended.

        Only meaningful when the stop string's text was fed to the parser; an engine that strips stop tokens
        before parsing knows the reason better itself."""
        if self.cut_off:
            return "length"
        if self.tool_calls:
            return "tool_calls"
        return "stop" if self.stopped_by is not None else "length"


def collect(events: Iterable[Event], stopped_by: str | None = None) -> ParsedResponse:
    """Fold a list of events into a ParsedResponse. A call cut off by the token budget (ToolCallEnd.cut_off) is
    kept with the argument text it got, as a stream would have shown it."""
    content, reasoning, warnings = [], [], []
    calls: dict[int, dict] = {}
    done: list[int] = []
    cut_off = False
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
        elif isinstance(ev, ToolCallEnd) and (ev.arguments is not None or ev.cut_off):
            done.append(ev.index)
            cut_off = cut_off or ev.cut_off
    return ParsedResponse("".join(content), "".join(reasoning), [calls[i] for i in done], warnings, stopped_by,
                          cut_off)


def parse_response(text: str, start_state: str = "content", *, seed: int | None = None,
                   tool_names: Iterable[str] | None = None, tools: Iterable[dict] | None = None) -> ParsedResponse:
    """Parse a whole response (decoded with special tokens kept). `tools`: the request's tools (see
    ResponseParser)."""
    parser = ResponseParser(start_state, seed=seed, tool_names=tool_names, tools=tools)
    events = parser.feed(text) + parser.finish()
    return collect(events, parser.stopped_by)
