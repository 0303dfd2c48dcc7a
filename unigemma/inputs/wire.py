"""Gemma 4 wire format: the format's token strings, and the `key:value` encoding of JSON values.

Gemma 4 does not write JSON inside tool calls. It writes its own dialect (chat-format.md §4.2)::

    <|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:2,flags:[true,null]}<tool_call|>

keys are bare, strings sit raw between `<|"|>` quote tokens (nothing inside is escaped), numbers are Python's
`str`/`repr`, and the literals are `true`, `false` and `null`. Object keys are sorted case-insensitively, as
the chat template's `dictsort` does, so `encode_wire_value` writes exactly what the template renders.

This module holds:

- the format's token strings and the stop strings, in one place for the template, parser and engine;
- `encode_wire_value` / `format_tool_call` / `format_tool_response`: JSON value → wire text;
- `parse_wire_value` / `parse_wire_arguments`: wire text → JSON value. The decoder is forgiving, because
  models drift from the grammar (chat-format.md §8 items 1–3): it repairs near misses when the reading is
  unambiguous and records every repair in a `warnings` list; it raises `WireParseError` otherwise.

What it does not do: split a whole model response into reasoning / content / calls (outputs/parser.py), or
render prompts (inputs/template.py).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# --- token strings (chat-format.md §1) ---------------------------------------------------------------------
BOS = "<bos>"
EOS = "<eos>"
PAD = "<pad>"
UNK = "<unk>"
MASK = "<mask>"
TURN_OPEN = "<|turn>"
TURN_CLOSE = "<turn|>"
CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
THOUGHT_LABEL = "thought\n"          # follows CHANNEL_OPEN; not a special token but part of the opener
THINK = "<|think|>"
TOOL_DECL_OPEN = "<|tool>"
TOOL_DECL_CLOSE = "<tool|>"
TOOL_CALL_OPEN = "<|tool_call>"
TOOL_CALL_CLOSE = "<tool_call|>"
TOOL_RESPONSE_OPEN = "<|tool_response>"
TOOL_RESPONSE_CLOSE = "<tool_response|>"
QUOTE = '<|"|>'
IMAGE_START = "<|image>"
IMAGE_END = "<image|>"
IMAGE = "<|image|>"
AUDIO_START = "<|audio>"
AUDIO_END = "<audio|>"
AUDIO = "<|audio|>"
VIDEO = "<|video|>"

# Every string the tokenizer turns into a format token. Used to neutralise user text and to keep markup out
# of parsed content.
FORMAT_TOKENS: tuple[str, ...] = (
    BOS, EOS, PAD, UNK, MASK, TURN_OPEN, TURN_CLOSE, CHANNEL_OPEN, CHANNEL_CLOSE, THINK,
    TOOL_DECL_OPEN, TOOL_DECL_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE,
    QUOTE, IMAGE_START, IMAGE_END, IMAGE, AUDIO_START, AUDIO_END, AUDIO, VIDEO,
)

# generation_config.json eos ids [1, 106, 50] as text. `<|tool_response>` after calls means "run the tools"
# (finish_reason "tool_calls"); the other two mean "stop".
STOP_STRINGS: tuple[str, ...] = (TURN_CLOSE, TOOL_RESPONSE_OPEN, EOS)


class WireParseError(ValueError):
    """Wire text that cannot be read as a value, even with the repairs `parse_wire_value` knows."""

    def __init__(self, message: str, text: str = "", position: int = 0):
        self.text = text
        self.position = position
        if text:
            snippet = text[max(0, position - 20):position + 20]
            message = f"{message} (at offset {position}, near {snippet!r})"
        super().__init__(message)


# --- encoding ------------------------------------------------------------------------------------------------

# Keys the template writes bare and the decoder reads back unchanged. Anything else (delimiters, quotes,
# surrounding spaces) is wrapped in quote tokens by `encode_wire_value` so that it survives a round trip.
_SAFE_KEY = re.compile(r"[^\s:,{}\[\]=<>\"']([^:,{}\[\]=<>]*[^\s:,{}\[\]=<>])?\Z")


def _sort_key(item: tuple[str, Any]) -> str:
    # jinja's dictsort: case-insensitive, stable (Python's sort), so "B" and "b" keep insertion order
    return item[0].lower()


def encode_wire_value(value: Any, *, escape_keys: bool = False) -> str:
    """Encode a JSON-like value the way the Gemma 4 chat template does.

    dict keys are written bare (quoted with `<|"|>` when `escape_keys`, or when a key could not be read back
    bare: empty, containing `:`, `,`, brackets, `=`, `<`, `>`, or surrounding spaces). Floats use `repr`, so
    they round-trip exactly; NaN and infinities are written `nan`, `inf`, `-inf` as the template writes them.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, dict):
        parts = []
        for key, item in sorted(value.items(), key=_check_key):
            if escape_keys or not _SAFE_KEY.match(key):
                key = QUOTE + key + QUOTE
            parts.append(f"{key}:{encode_wire_value(item, escape_keys=escape_keys)}")
        return "{" + ",".join(parts) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(encode_wire_value(v, escape_keys=escape_keys) for v in value) + "]"
    raise ValueError(f"cannot encode a {type(value).__name__} ({value!r}) as a Gemma 4 wire value; "
                     "expected dict, list, str, int, float, bool or None")


def _check_key(item: tuple[Any, Any]) -> str:
    if not isinstance(item[0], str):
        raise ValueError(f"object key {item[0]!r} is a {type(item[0]).__name__}; wire objects need str keys")
    return _sort_key(item)


def format_tool_call(name: str, arguments: dict) -> str:
    """`<|tool_call>call:NAME{...}<tool_call|>`, as the template renders an assistant tool call."""
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments must be a dict, got {type(arguments).__name__}")
    if not name or any(c in name for c in "{}<>") or name != name.strip():
        raise ValueError(f"tool name {name!r} cannot be written in a call (no braces, angle brackets, "
                         "surrounding spaces)")
    return f"{TOOL_CALL_OPEN}call:{name}{encode_wire_value(arguments)}{TOOL_CALL_CLOSE}"


def format_tool_response(name: str, response: Any) -> str:
    """`<|tool_response>response:NAME{...}<tool_response|>`: mappings are encoded as objects, anything else
    (a string result, a number, ...) as `{value:...}`, as the template does."""
    body = encode_wire_value(response) if isinstance(response, dict) else \
        "{value:" + encode_wire_value(response) + "}"
    return f"{TOOL_RESPONSE_OPEN}response:{name}{body}{TOOL_RESPONSE_CLOSE}"


# --- decoding ------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?\Z")
_SPECIAL_FLOATS = {"nan": math.nan, "NaN": math.nan, "inf": math.inf, "-inf": -math.inf,
                   "Infinity": math.inf, "-Infinity": -math.inf}
_LITERALS = {"true": True, "false": False, "null": None}
_PY_LITERALS = {"True": True, "False": False, "None": None}
# A key that starts the next pair when the comma before it was left out: `{a:1 b:2}`.
_KEY_AHEAD = re.compile(r'\s*(?:[\w.\-]+|<\|"\|>[^<>]*?<\|"\|>|"[^"\\]*")\s*[:=]')
_BARE_SPLIT = re.compile(r"\s+(?=[\w.\-]+\s*[:=])")
_WS = " \t\r\n"


def _literal(token: str) -> tuple[bool, Any]:
    """(True, value) when `token` is a number or a JSON literal."""
    if token in _LITERALS:
        return True, _LITERALS[token]
    m = _NUMBER.match(token)
    if m:
        return True, (float(token) if m.group(1) or m.group(2) else int(token))
    if token in _SPECIAL_FLOATS:
        return True, _SPECIAL_FLOATS[token]
    return False, None


def _structure_ok(text: str, stack: list[str]) -> tuple[bool, int]:
    """Does `text` (what follows a candidate closing quote) close the open containers in `stack` sensibly?

    Returns (ok, number of containers left open at the end). Quote tokens are paired naively and brackets
    inside them ignored; this is only a plausibility check used to choose among closing-quote candidates.
    """
    depth = list(stack)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if not depth:
            if c not in _WS:
                return False, 0  # text after the outermost container closed
        elif text.startswith(QUOTE, i):
            j = text.find(QUOTE, i + len(QUOTE))
            if j < 0:
                return False, 0
            i = j + len(QUOTE)
            continue
        elif c in "{[":
            depth.append("}" if c == "{" else "]")
        elif c in "}]":
            if depth[-1] != c:
                return False, 0
            depth.pop()
        i += 1
    return True, len(depth)


class _Reader:
    """Recursive-descent reader over one wire text. `stack` holds the closers of the open containers."""

    def __init__(self, text: str, warnings: list[str] | None):
        self.text = text
        self.pos = 0
        self.stack: list[str] = []
        self.warnings = warnings if warnings is not None else []

    # -- helpers --
    def warn(self, message: str, at: int | None = None) -> None:
        self.warnings.append(f"{message} (offset {self.pos if at is None else at})")

    def fail(self, message: str, at: int | None = None) -> WireParseError:
        return WireParseError(message, self.text, self.pos if at is None else at)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def key_ahead(self, at: int) -> bool:
        return self.stack[-1:] == ["}"] and bool(_KEY_AHEAD.match(self.text, at))

    # -- values --
    def value(self) -> Any:
        self.skip_ws()
        if self.at_end():
            raise self.fail("expected a value, found the end of the text")
        t, p = self.text, self.pos
        if t.startswith(QUOTE, p):
            return self.delimited(QUOTE, key=False)
        c = t[p]
        if c == "{":
            return self.obj()
        if c == "[":
            return self.arr()
        if c == '"':
            self.warn('repaired: JSON double-quoted string "..."')
            return self.json_string(key=False)
        if c == "'":
            self.warn("repaired: single-quoted string '...'")
            return self.delimited("'", key=False)
        return self.bare()

    def obj(self) -> dict:
        start = self.pos
        self.pos += 1
        self.stack.append("}")
        out: dict = {}
        while True:
            self.skip_ws()
            if self.at_end():
                self.warn("repaired: missing '}' at end of text", start)
                break
            if self.text[self.pos] == "}":
                self.pos += 1
                break
            key = self.key()
            value = self.value()
            if key in out:
                self.warn(f"duplicate key {key!r}; the last value is kept")
            out[key] = value
            if self.after_item("}"):
                break
        self.stack.pop()
        return out

    def arr(self) -> list:
        start = self.pos
        self.pos += 1
        self.stack.append("]")
        out: list = []
        while True:
            self.skip_ws()
            if self.at_end():
                self.warn("repaired: missing ']' at end of text", start)
                break
            if self.text[self.pos] == "]":
                self.pos += 1
                break
            out.append(self.value())
            if self.after_item("]"):
                break
        self.stack.pop()
        return out

    def after_item(self, closer: str) -> bool:
        """Consume the separator after an item. True when the container ended (or the text did)."""
        self.skip_ws()
        if self.at_end():
            self.warn(f"repaired: missing {closer!r} at end of text")
            return True
        c = self.text[self.pos]
        if c == ",":
            self.pos += 1
            self.skip_ws()
            if not self.at_end() and self.text[self.pos] == closer:
                self.warn("repaired: trailing comma")
            return False
        if c == closer:
            return False  # the caller's loop consumes it
        if closer == "}" and self.key_ahead(self.pos):
            self.warn("repaired: missing comma between object members")
            return False
        if closer == "]" and (c in "{[-" or c.isdigit() or self.text.startswith(QUOTE, self.pos)):
            self.warn("repaired: missing comma between array items")
            return False
        raise self.fail(f"expected ',' or {closer!r}")

    def key(self) -> str:
        self.skip_ws()
        t, p = self.text, self.pos
        if t.startswith(QUOTE, p):
            key = self.delimited(QUOTE, key=True)
        elif t[p] == '"':
            self.warn('repaired: JSON double-quoted key "..."')
            key = self.json_string(key=True)
        elif t[p] == "'":
            self.warn("repaired: single-quoted key '...'")
            key = self.delimited("'", key=True)
        else:
            end = p
            while end < len(t) and t[end] not in ":=" and t[end] not in ",{}[]" \
                    and not t.startswith(QUOTE, end):
                end += 1
            key = t[p:end].strip()
            if not key:
                raise self.fail("expected an object key")
            self.pos = end
        self.skip_ws()
        if self.at_end() or self.text[self.pos] not in ":=":
            raise self.fail(f"expected ':' after key {key!r}")
        if self.text[self.pos] == "=":
            self.warn("repaired: key=value instead of key:value")
        self.pos += 1
        return key

    def delimited(self, delim: str, key: bool) -> str:
        """A string between `delim` marks. The close is the first candidate that is followed by what may
        follow a string here (`:` for keys; `,` `}` `]` or the end for values, or the next `key:` when a
        comma was left out) and after which the rest of the text still closes the open containers. This
        reads interior quote tokens (e.g. Python triple quotes inside code) correctly."""
        t = self.text
        start = self.pos + len(delim)
        candidates = []
        j = t.find(delim, start)
        while j >= 0:
            candidates.append(j)
            j = t.find(delim, j + len(delim))
        if not candidates:
            raise self.fail(f"unterminated string (no closing {delim!r})")
        plausible = []
        for c in candidates:
            after = c + len(delim)
            k = after
            while k < len(t) and t[k] in _WS:
                k += 1
            if key:
                good = k < len(t) and t[k] in ":="
            else:
                # (a missing comma is also accepted: `key:` next in an object, a bracket next in an array)
                good = k >= len(t) or t[k] in ",}]" or self.key_ahead(k) \
                    or (self.stack[-1:] == ["]"] and t[k] in "{[")
            if good:
                plausible.append(c)
                ok, left_open = _structure_ok(t[after:], self.stack)
                if ok and left_open == 0:
                    return self._take(start, c, delim)
        for c in plausible:  # accept a text that ends early (missing closers) before giving up on structure
            ok, _ = _structure_ok(t[c + len(delim):], self.stack)
            if ok:
                return self._take(start, c, delim)
        if plausible:
            return self._take(start, plausible[0], delim)
        raise self.fail(f"cannot find where the string opened here ends (no closing {delim!r} followed by "
                        f"{'a colon' if key else 'a comma, bracket or the end'})")

    def _take(self, start: int, close: int, delim: str) -> str:
        self.pos = close + len(delim)
        return self.text[start:close]

    def json_string(self, key: bool) -> str:
        t = self.text
        p = self.pos
        j = p + 1
        while j < len(t):
            if t[j] == "\\":
                j += 2
                continue
            if t[j] == '"':
                break
            j += 1
        else:
            raise self.fail('unterminated JSON string (no closing ")')
        self.pos = j + 1
        try:
            return json.loads(t[p:j + 1], strict=False)
        except json.JSONDecodeError:
            return t[p + 1:j]  # invalid escapes: keep the raw text rather than fail

    def bare(self) -> Any:
        """An unquoted scalar: a number, a literal, or (repair) a bare-word string."""
        t, p = self.text, self.pos
        end = p
        while end < len(t) and t[end] not in ",}]" and not t.startswith(QUOTE, end):
            end += 1
        run = t[p:end]
        in_obj = self.stack[-1:] == ["}"]
        if in_obj:
            m = _BARE_SPLIT.search(run)
            if m and run[:m.start()].strip():
                run = run[:m.start()]  # `{a:1 b:2}`: the value stops before the next key
        elif self.stack[-1:] == ["]"]:
            words = run.split()
            if len(words) > 1 and all(_literal(w)[0] for w in words):
                run = run[:run.index(words[0]) + len(words[0])]  # `[1 2 3]`: one item at a time
        token = run.strip()
        if not token:
            raise self.fail("expected a value")
        self.pos = p + len(run)
        ok, value = _literal(token)
        if ok:
            return value
        if token in _PY_LITERALS:
            self.warn(f"repaired: Python literal {token} read as {json.dumps(_PY_LITERALS[token])}", p)
            return _PY_LITERALS[token]
        if token[0] in "{[":
            raise self.fail("unexpected bracket")
        self.warn(f"repaired: unquoted string {token!r}", p)
        return token


def parse_wire_value(text: str, warnings: list[str] | None = None) -> Any:
    """Decode one wire value (`{...}`, `[...]`, `<|"|>...<|"|>`, a number or a literal).

    Repairs, each appended to `warnings` when a list is given: single-quoted and JSON double-quoted strings
    and keys, unquoted bare-word strings, `key=value`, Python `True/False/None`, missing commas, trailing
    commas, missing closing brackets at the end of the text. Raises `WireParseError` when the text cannot be
    read or has text left after the value.
    """
    reader = _Reader(text, warnings)
    value = reader.value()
    reader.skip_ws()
    if not reader.at_end():
        raise reader.fail("unexpected text after the value")
    return value


def parse_wire_arguments(text: str, warnings: list[str] | None = None) -> dict:
    """Decode the `{...}` arguments of a tool call into a dict.

    Like `parse_wire_value`, and also tolerates (with a warning) stray text after the closing brace, which
    models sometimes emit before `<tool_call|>`.
    """
    reader = _Reader(text, warnings)
    reader.skip_ws()
    if reader.at_end() or text[reader.pos] != "{":
        raise reader.fail("tool call arguments must start with '{'")
    value = reader.obj()
    reader.skip_ws()
    if not reader.at_end():
        reader.warn(f"ignored text after the arguments: {text[reader.pos:]!r}")
    return value
