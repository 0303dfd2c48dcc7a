"""Gemma 4 wire format: the format's token strings, and the `key:value` encoding of JSON values.

Gemma 4 does not write JSON inside tool calls. It writes its own dialect (chat-format.md §4.2)::

    <|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:2,flags:[true,null]}<tool_call|>

keys are bare, strings sit raw between `<|"|>` quote tokens (nothing inside is escaped), numbers are Python's
`str`/`repr`, and the literals are `true`, `false` and `null`. Object keys are sorted case-insensitively, as
the chat template's `dictsort` does, so `encode_wire_value` writes exactly what the template renders.

This module holds:

- the format's token strings and the stop strings, in one place for the template, parser and engine;
- `encode_wire_value` / `format_tool_call` / `format_tool_response`: JSON value → wire text;
- `parse_wire_value` / `parse_wire_arguments` / `parse_tool_calls`: wire text → JSON values. The decoder is
  forgiving, because models drift from the grammar (chat-format.md §8 items 1–4): it weighs the readings of
  the whole text, keeps the one that needs the fewest repairs (with the tool's JSON Schema, when known, as
  evidence), records every repair and every unresolved ambiguity in a `warnings` list, and raises
  `WireParseError` when no reading exists. See "decoding" below for the rules.

What it does not do: split a whole model response into reasoning / content / calls (outputs/parser.py), or
render prompts (inputs/template.py).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any, Iterator

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
#
# Models drift from the grammar (chat-format.md §8 items 1-4), and the drift is often ambiguous: `<|"|>` both
# opens and closes strings, strings are raw (they may hold `,` `}` `:` and even `<|"|>`), and a string whose
# close was left out runs into the next member. A reader that decides each string's end locally (first quote,
# last quote, first quote followed by `}`) returns a confidently wrong call for some input. So the decoder
# searches: it enumerates the readings of the whole text (each string may end at any closing-quote candidate,
# or, as a repair, where it was left unclosed; each bare word may or may not be a string missing its quotes)
# and keeps the cheapest, where
#
#   cost = repairs, each one a warning (1; 0.5 for a Python literal, `108.` or a single-quoted string; 0.2 for
#          a JSON-quoted one, the commonest drift, which quotes every string of a call)
#        + 1 for a string whose interior `<|"|>` sits next to structure (`,` `:` `{` `}` `[` `]`: it looks like a
#          close or an open; also a warning, since a lost quote gives the same text)
#        + 1 for a repaired string that holds `, key:` and a value's start (a member it may have swallowed)
#        + 1 for each mismatch with the tool's JSON Schema, if given (a type, an undeclared or missing key)
#
# ties go to the reading with more values (the model's `<|"|>` are more likely structure than text), then to
# the earliest string ends. A tie that is still a tie between different values is reported ("ambiguous").
# Canonical text (what the template writes) always has exactly one reading of cost 0, so it is read as
# written and the search stops at the first reading. Broken text is searched under rising cost bounds
# (0, 1, 2, 3, 5, ...; dearer partial readings are cut), so the cheapest reading is found after little work,
# and a budget of values read bounds the worst case (with a warning when it cuts the comparison short).
# Text that is plain JSON is read as JSON in one step.

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?\Z")
_LOOSE_NUMBER = re.compile(r"-?(?:\d+\.|\.\d+)([eE][+-]?\d+)?\Z")      # `108.`, `.5`: Python spellings
_SPECIAL_FLOATS = {"nan": math.nan, "NaN": math.nan, "inf": math.inf, "-inf": -math.inf,
                   "Infinity": math.inf, "-Infinity": -math.inf}
_LITERALS = {"true": True, "false": False, "null": None}
_PY_LITERALS = {"True": True, "False": False, "None": None}
# A key that starts the next pair when the comma before it was left out: `{a:1 b:2}`.
_KEY_AHEAD = re.compile(r'\s*(?:[\w.\-]+|<\|"\|>[^<>]*?<\|"\|>|"[^"\\]*")\s*[:=]')
_CALL_AHEAD = re.compile(r"\s*call:([\w.\-:]+)\s*(?=\{)")
_BARE_END = re.compile(r'[,}\]]|<\|"\|>')
_UNCLOSED_END = re.compile(r"[,}\]]")
_WS_KEY_END = re.compile(r"\s+(?=[\w.\-]+\s*[:=])")
_WS_ITEM_END = re.compile(r"\s+(?=[-\d])")
# `, key:` and the start of a wire value: inside a string, the mark of a member it swallowed
_MEMBER_INSIDE = re.compile(r'[,{]\s*(?:[\w.\-]+|<\|"\|>[^<>]*?<\|"\|>)\s*:\s*(?:<\|"\|>|[\[{]|-?\d|true\b|false\b|null\b)')
_STRUCT_BEFORE = "[{,:="
_STRUCT_AFTER = ",}]:="
_WS = " \t\r\n"
SEARCH_BUDGET = 4000   # values read per decode; canonical text needs one per value, broken text a few per value


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


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "array": (list,), "object": (dict,), "null": (type(None),)}


def _declared_types(schema: Any) -> list[str]:
    ty = schema.get("type") if isinstance(schema, dict) else None
    types = ty if isinstance(ty, list) else [ty] if ty else []
    return [t.lower() for t in types if isinstance(t, str) and t.lower() in _JSON_TYPES]


def _fits(value: Any, schema: Any) -> bool:
    """Does `value` have a type the JSON Schema allows? (Only `type`, and `enum` on strings: what disambiguates.)"""
    types = _declared_types(schema)
    if not types:
        return True
    for t in types:
        if isinstance(value, _JSON_TYPES[t]) and not (isinstance(value, bool) and t in ("integer", "number")):
            if t == "string" and isinstance(schema.get("enum"), list) and value not in schema["enum"]:
                continue
            return True
        if t == "integer" and isinstance(value, float) and value.is_integer():
            return True
    return False


class _OutOfBudget(Exception):
    pass


# A reading of a piece of text: (value, end offset, cost, notes, number of values). Notes are the repair
# warnings, already formatted.
_Alt = tuple


class _Search:
    """Enumerates the readings of one text, cheapest first where that is cheap to know, and keeps the best."""

    def __init__(self, text: str, budget: int = SEARCH_BUDGET):
        self.t = text
        self.n = len(text)
        self.budget = budget
        self.steps = 0
        self.bound = math.inf     # cost of the best complete reading so far; dearer partial readings are cut
        self.far = 0              # the furthest offset a value was read at (for error messages)
        self.multi = True         # `}call:NAME{` after the arguments starts another call

    # -- helpers --
    def ws(self, p: int) -> int:
        t, n = self.t, self.n
        while p < n and t[p] in _WS:
            p += 1
        return p

    def key_ahead(self, p: int, stack: tuple) -> bool:
        return stack[-1:] == ("}",) and bool(_KEY_AHEAD.match(self.t, p))

    def follows(self, p: int, stack: tuple) -> bool:
        """Can a value end at `p`: is it followed by what may follow a value here?"""
        q = self.ws(p)
        if q >= self.n:
            return True
        c = self.t[q]
        if not stack:
            return False
        if c == "," or (c in "}]" and c in stack):
            return True
        if stack[-1] == "}":
            return self.key_ahead(q, stack)
        return c in "{[" or self.t.startswith(QUOTE, q)

    def interior_cost(self, start: int, end: int) -> int:
        """1 when the string t[start:end] holds a quote token that looks like structure (see the top)."""
        t = self.t
        i = t.find(QUOTE, start, end)
        while i >= 0:
            b = i - 1           # neighbours on the same line (code puts quotes after indentation, not structure)
            while b >= start and t[b] in " \t":
                b -= 1
            a = i + len(QUOTE)
            while a < self.n and t[a] in " \t":
                a += 1
            if (b >= start and t[b] in _STRUCT_BEFORE) or a >= self.n or t[a] in _STRUCT_AFTER:
                return 1
            i = t.find(QUOTE, i + len(QUOTE), end)
        return 0

    @staticmethod
    def swallow_cost(value: str) -> int:
        """1 when a repaired string (no quotes bound it) holds `, key:`: it may have swallowed a member."""
        return 1 if _MEMBER_INSIDE.search(value) else 0

    def note(self, message: str, at: int) -> tuple:
        return (f"{message} (offset {at})",)

    # -- values --
    def value(self, p: int, stack: tuple, schema: Any, base: float) -> Iterator[_Alt]:
        self.steps += 1
        if self.steps > self.budget:
            raise _OutOfBudget
        p = self.ws(p)
        if p >= self.n:
            return
        self.far = max(self.far, p)
        t = self.t
        c = t[p]
        if t.startswith(QUOTE, p):
            alts = self.quoted(p, stack, base)
        elif c == "{":
            alts = self.obj(p, stack, schema, base)
        elif c == "[":
            alts = self.arr(p, stack, schema, base)
        elif c == '"':
            alts = self.json_string(p, stack, key=False)   # or, when it has no closing '"', a bare word
            first = next(alts, None)
            alts = itertools.chain([first], alts) if first is not None else self.bare(p, stack, base)
        elif c == "'":
            alts = itertools.chain(self.single_quoted(p, stack, key=False), self.bare(p, stack, base))
        else:
            alts = self.bare(p, stack, base)
        for v, end, cost, notes, k in alts:
            if schema is not None and not _fits(v, schema):
                cost += 1
            if base + cost <= self.bound:
                yield v, end, cost, notes, k

    def quoted(self, p: int, stack: tuple, base: float) -> Iterator[_Alt]:
        t, s = self.t, p + len(QUOTE)
        j = t.find(QUOTE, s)
        while j >= 0:      # every closing-quote candidate followed by what may follow a value
            if self.follows(j + len(QUOTE), stack):
                cost, notes = self.interior_cost(s, j), ()
                if cost:
                    cost += self.swallow_cost(t[s:j])
                    # the reading chosen may be the only one, but a lost quote produces the same text: say so
                    notes = self.note(f"string holds quote tokens next to ',:{{}}[]' ({t[s:j][:60]!r}); read as "
                                      "one string", p)
                yield t[s:j], j + len(QUOTE), cost, notes, 1
            j = t.find(QUOTE, j + len(QUOTE))
        # repair: the string was never closed; it ends before a `,` `}` `]` or at the end of the text. (The
        # costs that grow with the end, a structural quote or a `, key:` inside, are found once.)
        if base + 1 > self.bound:
            return
        member = _MEMBER_INSIDE.search(t, s)
        member_end = member.end() if member else math.inf
        quote_end, q = math.inf, t.find(QUOTE, s)
        while q >= 0:
            if self.interior_cost(s, q + len(QUOTE) + 1):
                quote_end = q + len(QUOTE)
                break
            q = t.find(QUOTE, q + len(QUOTE))
        for m in itertools.chain(_UNCLOSED_END.finditer(t, s), [None]):
            if base + 1 > self.bound:
                return
            e = m.start() if m else self.n
            if m and not (t[e] == "," or t[e] in stack):
                continue
            yield (t[s:e], e, 1 + (e >= quote_end) + (e >= member_end),
                   self.note(f"repaired: string not closed by {QUOTE}; it ends "
                             + ("at the end of the text" if m is None else f"before {t[e]!r}"), p), 1)

    def single_quoted(self, p: int, stack: tuple, key: bool) -> Iterator[_Alt]:
        t = self.t
        j = t.find("'", p + 1)
        while j >= 0:
            after = j + 1
            if key:
                q = self.ws(after)
                if q < self.n and t[q] in ":=":
                    yield t[p + 1:j], after, 0.5, self.note("repaired: single-quoted key '...'", p), 1
            elif self.follows(after, stack):
                yield (t[p + 1:j], after, 0.5 + self.swallow_cost(t[p + 1:j]),
                       self.note("repaired: single-quoted string '...'", p), 1)
            elif t.startswith(QUOTE, after) and self.follows(after + len(QUOTE), stack):
                yield (t[p + 1:j], after + len(QUOTE), 1 + self.swallow_cost(t[p + 1:j]),
                       self.note(f"repaired: single-quoted string '...' followed by a stray {QUOTE}", p), 1)
            j = t.find("'", j + 1)

    def json_string(self, p: int, stack: tuple, key: bool) -> Iterator[_Alt]:
        t, j = self.t, p + 1
        while j < self.n:
            if t[j] == "\\":
                j += 2
                continue
            if t[j] == '"':
                break
            j += 1
        else:
            return
        try:
            s = json.loads(t[p:j + 1], strict=False)
        except json.JSONDecodeError:
            s = t[p + 1:j]  # invalid escapes: keep the raw text rather than fail
        what = "key" if key else "string"
        # JSON is the commonest drift, and a JSON call quotes every string: each costs little
        yield s, j + 1, 0.2, self.note(f'repaired: JSON double-quoted {what} "..."', p), 1

    def bare(self, p: int, stack: tuple, base: float) -> Iterator[_Alt]:
        """An unquoted scalar: a number or literal; or (repairs) a bare-word string, possibly running over
        commas and brackets, or a string whose opening quote is missing (`query:weather in Tokyo<|"|>`)."""
        t = self.t
        in_obj, in_arr = stack[-1:] == ("}",), stack[-1:] == ("]",)
        ws_re = _WS_KEY_END if in_obj else _WS_ITEM_END if in_arr else None
        member = _MEMBER_INSIDE.search(t, p)
        member_end = member.end() if member else math.inf
        depth: list[str] = []       # brackets open in the word so far, checked as the word grows
        done, prev_char, last = p, "", -1
        for e, at_ws in self._bare_ends(p, ws_re):   # candidate ends in order, up to the first quote token
            if e == last:
                continue
            last = e
            for c in t[done:e]:
                if c in "{[":
                    depth.append("}" if c == "{" else "]")
                elif c in "}]" and (not depth or depth.pop() != c):
                    return          # the word closes what it did not open, and so does every longer word
                elif c == "," and prev_char == ",":
                    return          # an empty item: no longer word is a value either
                if c not in " \t\r\n":
                    prev_char = c
            done = e
            token = t[p:e].strip()
            if t.startswith(QUOTE, e):
                if token and token[0] not in "{[,}]" and not depth and base + 1 <= self.bound \
                        and self.follows(e + len(QUOTE), stack):
                    yield (token, e + len(QUOTE), 1 + (e >= member_end),
                           self.note(f"repaired: string {token!r} has no opening {QUOTE}", p), 1)
                return
            if not token or token[0] in "{[,}]" or token[-1] == ",":
                if token[:1] in ("}", "]", ","):
                    return
                continue
            if depth or (at_ws and in_arr and not _literal(token)[0]):
                continue
            ok, value = _literal(token)
            if ok:
                yield value, e, 0, (), 1
            elif base + 0.5 > self.bound:
                return              # every repair from here on costs more than the bound allows
            elif _LOOSE_NUMBER.match(token):
                yield float(token), e, 0.5, self.note(f"repaired: number {token!r} read as {float(token)!r}", p), 1
            elif token in _PY_LITERALS:
                lit = _PY_LITERALS[token]
                yield lit, e, 0.5, self.note(f"repaired: Python literal {token} read as {json.dumps(lit)}", p), 1
            elif base + 1 <= self.bound:
                yield (token, e, 1 + (e >= member_end), self.note(f"repaired: unquoted string {token!r}", p), 1)

    def _bare_ends(self, p: int, ws_re) -> Iterator[tuple[int, bool]]:
        """(offset, at whitespace) of each place a bare word starting at `p` may end, in order, lazily."""
        prev = p
        for m in itertools.chain(_BARE_END.finditer(self.t, p), [None]):
            e = m.start() if m else self.n
            if ws_re is not None:
                for w in ws_re.finditer(self.t, prev, e):
                    yield w.start(), True
            yield e, False
            prev = e

    # -- containers --
    def obj(self, p: int, stack: tuple, schema: Any, base: float) -> Iterator[_Alt]:
        props = schema.get("properties") if isinstance(schema, dict) else None
        props = props if isinstance(props, dict) else None
        inner = stack + ("}",)

        def member(q: int, b: float) -> Iterator[_Alt]:
            for key, vstart, kcost, knotes in self.key(q, inner):
                sub = props.get(key) if props is not None else None
                for v, end, vcost, vnotes, k in self.value(vstart, inner, sub, b + kcost):
                    yield (key, v, q), end, kcost + vcost, knotes + vnotes, k

        for items, end, cost, notes, k in self.seq(p + 1, inner, "}", base, member):
            out: dict = {}
            dups = []
            for key, v, at in items:
                if key in out:
                    dups.append((key, at))
                else:
                    out[key] = v
            if dups:
                cost += len(dups)
                if base + cost > self.bound:
                    continue
                notes += tuple(f"duplicate key {key!r}; the first value is kept (offset {at})" for key, at in dups)
            if props is not None:
                if not (isinstance(schema, dict) and schema.get("additionalProperties")):
                    cost += sum(1 for key in out if key not in props)
                required = schema.get("required") if isinstance(schema.get("required"), list) else []
                cost += sum(1 for key in required if key not in out)
            if base + cost <= self.bound:
                yield out, end, cost, notes, k + 1

    def arr(self, p: int, stack: tuple, schema: Any, base: float) -> Iterator[_Alt]:
        items_schema = schema.get("items") if isinstance(schema, dict) else None
        inner = stack + ("]",)

        def item(q: int, b: float) -> Iterator[_Alt]:
            yield from self.value(q, inner, items_schema, b)

        for items, end, cost, notes, k in self.seq(p + 1, inner, "]", base, item):
            yield items, end, cost, notes, k + 1

    def key(self, p: int, stack: tuple) -> Iterator[tuple]:
        """(key, offset of its value, cost, notes) for each reading of the key at `p` and its `:`."""
        t = self.t
        p = self.ws(p)
        if p >= self.n:
            return
        if t.startswith(QUOTE, p):
            s = p + len(QUOTE)
            j = t.find(QUOTE, s)
            reads = []
            while j >= 0:
                reads.append((t[s:j], j + len(QUOTE), 0, ()))
                j = t.find(QUOTE, j + len(QUOTE))
        elif t[p] == '"':
            reads = [(k, e, c, n) for k, e, c, n, _ in self.json_string(p, stack, key=True)]
        elif t[p] == "'":
            reads = [(k, e, c, n) for k, e, c, n, _ in self.single_quoted(p, stack, key=True)]
        else:
            end = p
            while end < self.n and t[end] not in ":=,{}[]" and not t.startswith(QUOTE, end):
                end += 1
            reads = [(t[p:end].strip(), end, 0, ())] if t[p:end].strip() else []
        for key, end, cost, notes in reads:
            q = self.ws(end)
            if q >= self.n or t[q] not in ":=":
                continue
            if t[q] == "=":
                cost, notes = cost + 1, notes + self.note("repaired: key=value instead of key:value", q)
            yield key, q + 1, cost, notes

    def seq(self, p: int, stack: tuple, closer: str, base: float, item_fn) -> Iterator[_Alt]:
        """The readings of the items of a container whose opener is just before `p`, up to its closer.

        Depth-first over each item's readings, iteratively (a long array must not deepen the Python stack).
        Yields (list of items, offset after the closer, cost, notes, number of values)."""
        path: list[tuple] = []                 # the item reading chosen from each generator below
        gens = [self.step(p, stack, closer, False, base, item_fn)]
        costs = [0]                            # cost of `path` before each generator
        while gens:
            out = next(gens[-1], None)
            if out is None:
                gens.pop()
                costs.pop()
                continue
            del path[len(gens) - 1:]
            if out[0] == "close":
                _, end, c, notes = out
                total = costs[-1] + c
                if base + total <= self.bound:
                    yield self._items(path, end, total, notes)
                continue
            _, (item, icost, inotes, ik), then, q, c, snotes = out
            total = costs[-1] + icost + c
            if base + total > self.bound:
                continue
            path.append((item, inotes + snotes, ik))
            if then == "close":
                yield self._items(path, q, total, ())
            else:
                gens.append(self.step(q, stack, closer, then == "comma", base + total, item_fn))
                costs.append(total)

    @staticmethod
    def _items(path: list, end: int, cost: float, notes: tuple) -> _Alt:
        return ([x[0] for x in path], end, cost, tuple(itertools.chain.from_iterable(x[1] for x in path)) + notes,
                sum(x[2] for x in path))

    def step(self, p: int, stack: tuple, closer: str, after_comma: bool, base: float, item_fn):
        """What may come at `p` in a container: its closer, or an item and what follows the item."""
        t = self.t
        p = self.ws(p)
        if p >= self.n:
            yield "close", p, 1, self.note(f"repaired: missing {closer!r} at end of text", p)
            return
        c = t[p]
        if c == closer:
            yield "close", p + 1, int(after_comma), self.note("repaired: trailing comma", p) if after_comma else ()
            return
        if c in "}]" and c in stack:
            yield "close", p, 1, self.note(f"repaired: missing {closer!r} before {c!r}", p)
            return
        for item, end, icost, inotes, ik in item_fn(p, base):
            for then, q, c2, snotes in self.after(end, stack, closer):
                yield "item", (item, icost, inotes, ik), then, q, c2, snotes

    def after(self, end: int, stack: tuple, closer: str) -> list[tuple]:
        t = self.t
        q = self.ws(end)
        if q >= self.n:
            return [("close", q, 1, self.note(f"repaired: missing {closer!r} at end of text", q))]
        c = t[q]
        if c == ",":
            return [("comma", q + 1, 0, ())]
        if c == closer:
            return [("close", q + 1, 0, ())]
        if c in "}]" and c in stack:
            return [("close", q, 1, self.note(f"repaired: missing {closer!r} before {c!r}", q))]
        if closer == "}" and self.key_ahead(q, stack):
            return [("next", q, 1, self.note("repaired: missing comma between object members", q))]
        if closer == "]" and (c in "{[-" or c.isdigit() or t.startswith(QUOTE, q)):
            return [("next", q, 1, self.note("repaired: missing comma between array items", q))]
        self.far = max(self.far, q)
        return []

    # -- whole texts --
    def calls(self, p: int, name: str, schemas: dict, base: float) -> Iterator[_Alt]:
        """`{args}` for the call `name`, then more `call:NAME{args}` (several calls in one block), then the end
        of the text; stray text is ignored, as a repair."""
        schema = schemas.get(name)
        for args, end, cost, notes, k in self.obj(p, (), schema, base):
            q = self.ws(end)
            m = _CALL_AHEAD.match(self.t, q) if self.multi else None
            if q >= self.n:
                yield [(name, args)], q, cost, notes, k
            elif m:
                nxt = m.group(1)
                more = self.note(f"another call ({nxt!r}) in the same {TOOL_CALL_OPEN} block", q)
                for rest, e2, c2, n2, k2 in self.calls(m.end(), nxt, schemas, base + cost):
                    yield [(name, args)] + rest, e2, cost + c2, notes + more + n2, k + k2
            elif base + cost + 2 <= self.bound:
                # dropping text is worse than a local repair: it costs 2
                yield ([(name, args)], self.n, cost + 2,
                       notes + self.note(f"ignored text after the arguments: {self.t[q:]!r}", q), k)

    def best(self, readings, what: str) -> tuple[Any, list[str]]:
        """The cheapest reading (ties: more values, then the first found) and its notes.

        `readings()` makes a fresh enumeration. It runs under rising cost bounds (iterative deepening): with
        every dearer partial reading cut, the first bound that admits a reading finds the cheapest one after
        little work, where one unbounded depth-first pass could wander among absurd readings of a long text."""
        best, best_key, rivals, cut = None, None, [], False
        try:
            for bound in _BOUNDS:
                self.bound = bound
                for alt in readings():
                    key = (alt[2], -alt[4])
                    if best_key is None or key < best_key:
                        best, best_key, rivals = alt, key, []
                        self.bound = alt[2]
                        if alt[2] == 0:
                            break  # a reading that needs nothing is the only one of its cost (see the top)
                    elif key == best_key and _canon(alt[0]) != _canon(best[0]) and len(rivals) < 3:
                        rivals.append(alt)
                if best is not None:
                    break
        except _OutOfBudget:
            cut = True
        if best is None:
            raise WireParseError(f"cannot read {what}" + (" (too many readings to try)" if cut else ""),
                                 self.t, self.far)
        notes = list(best[3])
        for r in rivals:
            notes.append(f"ambiguous: the text can also be read as {_canon(r[0], 300)}; chose "
                         f"{_canon(best[0], 300)}")
        if cut and best[2] > 0:
            notes.append(f"stopped comparing readings after {self.budget} steps; the reading chosen may not be "
                         "the best")
        return best[0], notes


_BOUNDS = (0, 1, 2, 3, 5, 8, 13, math.inf)


def _canon(value: Any, limit: int | None = None) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def _json_fast(text: str, warnings: list[str] | None) -> tuple[Any] | None:
    """A value written as plain JSON (a common drift), read in one step: every string of it is JSON-quoted, a
    repair the search would weigh one string at a time. Wire text never holds `"` outside strings, so a text
    that json.loads reads and that has a `"` is JSON."""
    if '"' not in text or QUOTE in text:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    _record(["repaired: value written as JSON"], warnings)
    return (value,)


def _record(notes: list[str], warnings: list[str] | None) -> None:
    if warnings is not None:
        warnings.extend(notes)


def parse_wire_value(text: str, warnings: list[str] | None = None) -> Any:
    """Decode one wire value (`{...}`, `[...]`, `<|"|>...<|"|>`, a number or a literal).

    Repairs, each appended to `warnings` when a list is given: single-quoted and JSON double-quoted strings
    and keys, unquoted bare-word strings, strings missing their opening or closing quote, `108.`-style numbers,
    `key=value`, Python `True/False/None`, missing or trailing commas, missing closing brackets. Ambiguous
    text is read as the cheapest reading (see the comment above) with a warning. Raises `WireParseError` when
    the text cannot be read or has text left after the value.
    """
    fast = _json_fast(text, warnings)
    if fast is not None:
        return fast[0]
    search = _Search(text)

    def readings() -> Iterator[_Alt]:
        for alt in search.value(0, (), None, 0):
            end = search.ws(alt[1])
            if end >= search.n:
                yield alt
            search.far = max(search.far, end)

    value, notes = search.best(readings, "a wire value")
    _record(notes, warnings)
    return value


def parse_wire_arguments(text: str, warnings: list[str] | None = None, schema: dict | None = None) -> dict:
    """Decode the `{...}` arguments of a tool call into a dict.

    Like `parse_wire_value`; also tolerates (with a warning) stray text after the closing brace, which models
    sometimes emit before `<tool_call|>`. `schema`: the tool's JSON Schema `parameters`, used to choose among
    readings and to convert values to the declared types (each conversion is a warning).
    """
    calls = parse_tool_calls("", text, {"": schema} if schema else None, warnings, single=True)
    return calls[0][1]


def parse_tool_calls(name: str, text: str, schemas: dict[str, dict] | None = None,
                     warnings: list[str] | None = None, *, single: bool = False) -> list[tuple[str, dict]]:
    """Decode the arguments `{...}` of the call `name`, and any further `call:NAME{...}` in the same block.

    `text` starts at the first call's `{`. `schemas` maps tool names to their JSON Schema `parameters`.
    Returns [(name, arguments), ...]; raises `WireParseError` when the first call's arguments cannot be read.
    With `single`, text after the first call's arguments is never read as another call.
    """
    schemas = schemas or {}
    fast = _json_fast(text, None)
    if fast is not None and isinstance(fast[0], dict):
        notes = ["repaired: arguments written as JSON"]
        args = coerce_arguments(fast[0], schemas[name], notes, name) if name in schemas else fast[0]
        _record(notes, warnings)
        return [(name, args)]
    search = _Search(text)
    p = search.ws(0)
    if p >= search.n or text[p] != "{":
        raise WireParseError("tool call arguments must start with '{'", text, p)
    search.multi = not single
    calls, notes = search.best(lambda: search.calls(p, name, schemas, 0), "the tool call arguments")
    out = []
    for call_name, args in calls:
        if call_name in schemas:
            args = coerce_arguments(args, schemas[call_name], notes, call_name)
        out.append((call_name, args))
    _record(notes, warnings)
    return out


def coerce_arguments(args: dict, schema: dict, notes: list[str], name: str = "") -> dict:
    """Convert argument values to the types the JSON Schema declares, where the conversion is exact (`"5"` →
    5 for an integer, 5 → `"5"` for a string, `"true"` → true); note each conversion, each undeclared or
    missing required argument, and each value that still does not fit."""
    where = f"{name}: " if name else ""
    out = _coerce(args, schema, notes, where + "arguments")
    if isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
        props = schema["properties"]
        for key in args:
            if key not in props and not schema.get("additionalProperties"):
                notes.append(f"{where}argument {key!r} is not declared by the tool")
        for key in schema.get("required") or []:
            if key not in args:
                notes.append(f"{where}required argument {key!r} is missing")
    return out


def _coerce(value: Any, schema: Any, notes: list[str], path: str) -> Any:
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        value = {k: _coerce(v, props.get(k), notes, f"{path}.{k}") for k, v in value.items()}
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [_coerce(v, schema["items"], notes, f"{path}[{i}]") for i, v in enumerate(value)]
    if _fits(value, schema):
        return value
    types = _declared_types(schema)
    for t in types:
        new, ok = value, False
        if isinstance(value, str) and t in ("integer", "number"):
            ok, new = _literal(value.strip())
            ok = ok and isinstance(new, (int, float)) and not isinstance(new, bool) and _fits(new, schema)
        elif isinstance(value, str) and t == "boolean" and value.strip() in ("true", "false"):
            ok, new = True, value.strip() == "true"
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and t == "string":
            ok, new = True, json.dumps(value)
        elif isinstance(value, float) and t == "integer" and value.is_integer():
            ok, new = True, int(value)
        if ok:
            notes.append(f"{path}: {json.dumps(value)} converted to {t} {json.dumps(new)}, as the tool declares")
            return new
    notes.append(f"{path}: {json.dumps(value, ensure_ascii=False, default=repr)[:80]} does not match the declared "
                 f"type {'/'.join(types) or schema.get('enum')}")
    return value
