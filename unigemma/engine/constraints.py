"""Structured output: grammar constraints that mask logits, backed by llguidance.

A request may ask for JSON (a JSON Schema, or any JSON object), text matching a regex, text in a Lark grammar
(llguidance's dialect), or forced tool calls in the Gemma 4 wire format. The engine sees one small interface:

    ConstraintSpec ──compile_constraint(spec, tokenizer)──▶ CompiledGrammar (cached: compiling is the costly part)
                                                              │ .new_state()       (one per request, cheap)
                                                              ▼
    logits [B, V] ◀── apply_masks(logits, states) ◀── ConstraintState: fill_mask / advance / validate_drafts /
                                                                         rollback / is_finished / reset

Tool calls (`kind="tool_call"`) are compiled to a Lark grammar generated here from each tool's JSON-schema
`parameters`: `<|tool_call>call:NAME{key:value,...}<tool_call|>` repeated, then `<|tool_response>` (or `<eos>`).
Special tokens are matched by id (`<[id]>`), never as their text pieces, and free strings may contain neither
special tokens nor the quote text `<|"|>`. Keys come in the order the chat template renders them (sorted,
case-insensitive); required keys are mandatory and optional ones may be left out.

With `thinking=True` the grammar first allows an optional thought channel, `<|channel>thought\\n` … `<channel|>`,
whose text is free except for special tokens and the literal `<channel|>`; the constraint starts after it. So a
schema does not suppress reasoning, and reasoning cannot smuggle tokens past the schema.

What this module does not do: sampling, penalties, stop-token handling, or parsing the output back into
OpenAI objects (outputs/parser.py); it knows token ids and masks, not HTTP or chat messages.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import llguidance as llg
import torch

from unigemma.inputs.tokenizer import Tokenizer

__all__ = [
    "ConstraintSpec", "CompiledGrammar", "ConstraintState", "compile_constraint", "apply_masks",
    "spec_from_openai", "tool_call_lark", "KINDS",
]

KINDS = ("json_schema", "json_object", "regex", "lark", "tool_call")

# Free text inside a wire-format string or a thought: any UTF-8 text (special tokens are not UTF-8 in
# llguidance, so they are excluded by construction) that does not spell a delimiter with plain tokens —
# otherwise a text-level parser would cut the value there.
_QUOTE_TEXT = '<|"|>'
_NO_QUOTE = r'/(?s:.*)/ & ~/(?s:.*)<\|"\|>(?s:.*)/'
_NO_CHANNEL_CLOSE = r"/(?s:.*)/ & ~/(?s:.*)<channel\|>(?s:.*)/"
_JSON_WS = "[\\x20\\x0A\\x0D\\x09]"
# Wire-format numbers are JSON numbers (Python str()/repr() of ints and floats).
_WINT = r"/-?(0|[1-9][0-9]*)/"
_WNUM = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/"
_GRAMMAR_CACHE_SIZE = 64
# Masks and errors: error messages from llguidance may otherwise include the whole grammar (the user's schema
# is echoed back to them anyway, but a server log should not fill up with it).
_LIMITS = llg.LLParserLimits(verbose_errors=False)


# ─── spec ────────────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class ConstraintSpec:
    """What the user asked for.

    kind: "json_schema" (payload: schema dict or JSON text), "json_object" (payload ignored), "regex" (payload:
      pattern, full match), "lark" (payload: llguidance Lark grammar with a `start` rule), "tool_call" (payload:
      {"tools": [OpenAI tools], "tool_choice": "required" | {"type": "function", "function": {"name": ...}} |
      "auto", "content_schema": schema for a non-call answer (required with "auto")}).
    strict: JSON Schema only — objects without `additionalProperties` get `false` (OpenAI strict semantics) and
      unsupported keywords/formats are errors; non-strict follows JSON Schema (extra keys allowed) and ignores
      what llguidance cannot enforce.
    thinking: allow an optional `<|channel>thought\\n…<channel|>` block before the constrained output.
    thinking_open: the prompt already ends inside an open thought channel (post-tool thinking turn): the output
      must first close it with `<channel|>`. Implies thinking.
    parallel_tool_calls: tool_call only — 1..n calls when true, exactly one when false.
    max_whitespace: JSON only — longest whitespace run between tokens (0: compact JSON; None: unbounded).
      Bounded by default because an unconstrained whitespace run is a classic way for a model to never finish.
    """

    kind: str
    payload: Any = None
    strict: bool = False
    thinking: bool = False
    thinking_open: bool = False
    parallel_tool_calls: bool = True
    max_whitespace: int | None = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.max_whitespace is not None and self.max_whitespace < 0:
            raise ValueError(f"max_whitespace must be >= 0 or None, got {self.max_whitespace}")

    def __hash__(self) -> int:  # payloads are dicts: hash the canonical text instead of the fields
        return hash(self.cache_key())

    def cache_key(self) -> str:
        """A stable text key. Dict order is kept (not sorted): llguidance emits properties in schema order."""
        try:
            payload = json.dumps(self.payload, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"constraint payload for kind {self.kind!r} is not JSON-serialisable: {e}") from None
        return json.dumps([self.kind, payload, self.strict, self.thinking or self.thinking_open,
                           self.thinking_open, self.parallel_tool_calls, self.max_whitespace])


def spec_from_openai(response_format: dict | None = None, tools: list | None = None,
                     tool_choice: Any = None, parallel_tool_calls: bool = True,
                     enable_thinking: bool = False, thinking_open: bool = False) -> ConstraintSpec | None:
    """Map OpenAI chat-completion request fields to a spec; None when nothing constrains the output.

    A forced tool choice ("required" or a named function) wins over `response_format`, as in the OpenAI API
    (the answer then is the call). With tools and `tool_choice` "auto"/absent, a `response_format` gives "calls
    or a formatted answer"; with "none" (or no tools) it applies alone.
    """
    forced = tool_choice == "required" or isinstance(tool_choice, dict)
    common = dict(thinking=enable_thinking or thinking_open, thinking_open=thinking_open)
    if forced:
        if not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs a non-empty `tools` list")
        return ConstraintSpec("tool_call", {"tools": tools, "tool_choice": tool_choice},
                              parallel_tool_calls=parallel_tool_calls, **common)
    if tool_choice not in (None, "auto", "none"):
        raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or "
                         f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError(f"response_format must be an object with a 'type', got {response_format!r}")
    rtype = response_format["type"]
    if rtype == "text":
        return None
    if rtype == "json_object":
        schema: Any = {"type": "object"}
        strict = False
    elif rtype == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise ValueError("response_format.json_schema must be an object with a 'schema' field")
        schema, strict = js["schema"], bool(js.get("strict", False))
    else:
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {rtype!r}")
    if tools and tool_choice in (None, "auto"):
        # The model may still call a tool; if it answers instead, the answer follows the format.
        return ConstraintSpec("tool_call", {"tools": tools, "tool_choice": "auto", "content_schema": schema},
                              strict=strict, parallel_tool_calls=parallel_tool_calls, **common)
    if rtype == "json_object":
        return ConstraintSpec("json_object", None, **common)
    return ConstraintSpec("json_schema", schema, strict=strict, **common)


# ─── tokenizer bridge ────────────────────────────────────────────────────────────────────────────────
class _TokenizerEntry:
    """The llguidance view of one of our tokenizers, plus its compiled-grammar cache."""

    def __init__(self, tok: Tokenizer):
        data = json.loads(tok.backend.to_str())
        # Padding/truncation settings would leak into llguidance's own tokenisation of grammar literals.
        data["padding"] = None
        data["truncation"] = None
        eos = [tok.special_ids[n] for n in ("eos_token", "eot_token") if n in tok.special_ids]
        if not eos:
            raise ValueError(f"tokenizer {tok.source} has no eos_token/eot_token: constrained output needs "
                             "a stop token to end on")
        self.lltok = llg.LLTokenizer(json.dumps(data), eos_token=eos)
        self.vocab_size: int = self.lltok.vocab_size
        self.ids = dict(tok.special_ids)
        self.cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self.lock = threading.Lock()


_ENTRIES: "weakref.WeakKeyDictionary[Tokenizer, _TokenizerEntry]" = weakref.WeakKeyDictionary()
_ENTRIES_LOCK = threading.Lock()


def _entry(tok: Tokenizer) -> _TokenizerEntry:
    with _ENTRIES_LOCK:
        e = _ENTRIES.get(tok)
        if e is None:  # building the token trie costs 2-3 s for a 262k vocabulary: once per tokenizer
            e = _ENTRIES[tok] = _TokenizerEntry(tok)
        return e


def _special(ids: dict[str, int], name: str, why: str) -> str:
    if name not in ids:
        raise ValueError(f"{why} needs the tokenizer's {name} (a Gemma 4 tokenizer has it); this one lacks it")
    return f"<[{ids[name]}]>"


# ─── compiled grammar and per-request state ──────────────────────────────────────────────────────────
@dataclass
class CompiledGrammar:
    """A grammar checked against one tokenizer; `new_state()` gives a fresh matcher for a request."""

    spec: ConstraintSpec
    grammar: str                     # llguidance grammar JSON
    lark: str | None                 # the generated top-level Lark text, when there is one (for inspection)
    vocab_size: int                  # tokenizer vocabulary the masks cover
    stop_ids: frozenset[int]         # stop tokens the grammar allows once complete (<eos>, <turn|>)
    _template: llg.LLMatcher = field(repr=False)

    def new_state(self) -> "ConstraintState":
        return ConstraintState(self)


class ConstraintState:
    """One request's position in its grammar.

    Masks are bitmasks in llguidance's layout: int32 words, bit i of word w allows token 32·w + i. `fill_mask`
    writes one row of a [B, ceil(V/32)] CPU tensor so the engine can mask a whole batch in one op (apply_masks).
    """

    def __init__(self, compiled: CompiledGrammar):
        self.compiled = compiled
        self.vocab_size = compiled.vocab_size
        self._m = compiled._template.deep_copy()  # shares the compiled lexer; far cheaper than recompiling
        self.num_tokens = 0                       # tokens consumed (what rollback can undo)
        self._tail_stops = 0                      # stop tokens taken after the grammar finished
        self._eos = compiled.stop_ids

    # --- masks -----------------------------------------------------------------------------------------
    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def fill_mask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed-next-token bits into `bitmask[row]` (int32, CPU, contiguous rows)."""
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or bitmask.dim() != 2:
            raise ValueError(f"bitmask must be a 2-D int32 CPU tensor, got {bitmask.dtype} {tuple(bitmask.shape)} "
                             f"on {bitmask.device}")
        if bitmask.shape[1] != self.mask_words:
            raise ValueError(f"bitmask rows must have {self.mask_words} words, got {bitmask.shape[1]}")
        r = bitmask[row]
        assert r.is_contiguous()
        self._m.unsafe_compute_mask_ptr(r.data_ptr(), r.numel() * 4)

    def allowed_mask(self) -> torch.Tensor:
        """Bool [V]: True where the token may come next."""
        bm = torch.empty((1, self.mask_words), dtype=torch.int32)
        self.fill_mask(bm)
        return unpack_bitmask(bm, self.vocab_size)[0]

    # --- state -----------------------------------------------------------------------------------------
    # Once a grammar has nothing left to match (e.g. after the closing `}`), llguidance reports it "stopped":
    # its mask allows only the stop tokens, but it will not take them through try_consume/validate. We accept
    # them here without touching the matcher, and count them so rollback stays exact.
    def _stop_ok(self, token_id: int) -> bool:
        return self._m.is_stopped() and not self._m.is_error() and token_id in self._eos

    def advance(self, token_id: int) -> bool:
        """Consume a sampled token. False (state unchanged) if the grammar rejects it."""
        return self.advance_many([token_id]) == 1

    def advance_many(self, token_ids: Sequence[int]) -> int:
        """Consume the longest accepted prefix of `token_ids`; returns its length."""
        ids = [int(t) for t in token_ids]
        n = 0 if self._tail_stops else self._m.try_consume_tokens(ids)
        while n < len(ids) and self._stop_ok(ids[n]):
            self._tail_stops += 1
            n += 1
        self.num_tokens += n
        return n

    def validate_drafts(self, token_ids: Sequence[int]) -> int:
        """How many leading draft tokens the grammar accepts from here. Does not change the state."""
        ids = [int(t) for t in token_ids]
        if not ids:
            return 0
        if self._m.is_stopped():
            return int(self._stop_ok(ids[0]) and not self._tail_stops)
        return self._m.validate_tokens(ids)

    def fill_draft_masks(self, bitmask: torch.Tensor, row: int, draft_ids: Sequence[int]) -> int:
        """Masks for verifying k draft tokens in one forward pass: row+i gets the mask after drafts[:i].

        Fills rows row .. row+n where n is the number of accepted drafts (stops at the first rejected one);
        returns n. The state is the same afterwards as before.
        """
        self.fill_mask(bitmask, row)
        n = 0
        for t in draft_ids:
            if not self.advance(t):
                break
            n += 1
            self.fill_mask(bitmask, row + n)
        self.rollback(n)
        return n

    def rollback(self, n: int) -> None:
        """Undo the last n consumed tokens (rejected speculative tokens, or a stop string cut back)."""
        if n < 0 or n > self.num_tokens:
            raise ValueError(f"cannot roll back {n} tokens: {self.num_tokens} consumed")
        tail = min(n, self._tail_stops)
        self._tail_stops -= tail
        if n - tail and not self._m.rollback(n - tail):
            raise RuntimeError(f"grammar rollback of {n - tail} tokens failed: {self._m.get_error()}")
        self.num_tokens -= n

    def is_finished(self) -> bool:
        """True when nothing but a stop token may follow (or a stop token was consumed): end the request."""
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        """True when the output so far is complete (a stop token is allowed now)."""
        return self._m.is_accepting()

    def reset(self) -> None:
        self._m.reset()
        self.num_tokens = 0
        self._tail_stops = 0

    def error(self) -> str:
        return self._m.get_error()


# ─── batch masking ───────────────────────────────────────────────────────────────────────────────────
_SHIFTS: dict[torch.device, torch.Tensor] = {}
_BIAS_LUT: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [B, W] bitmask → bool [B, vocab_size] (on the bitmask's device)."""
    dev = bitmask.device
    shifts = _SHIFTS.get(dev)
    if shifts is None:
        shifts = _SHIFTS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1          # (B, W, 32)
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _bias_from_bitmask(bitmask: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 [B, W] bitmask → additive bias [B, vocab] of 0 (allowed) / -inf (disallowed).

    A 256-entry table indexed by mask bytes: one gather instead of 32 shifts per word, ~4x cheaper on CPU
    for a 262k vocabulary. Bytes are read in memory order, so bit j of byte b is token 8·b + j (the int32
    words are little-endian on every platform torch runs on).
    """
    key = (bitmask.device, dtype)
    lut = _BIAS_LUT.get(key)
    if lut is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1          # (256, 8)
        lut = _BIAS_LUT[key] = torch.where(bits.bool(), 0.0, float("-inf")).to(bitmask.device, dtype)
    b = bitmask.shape[0]
    return lut[bitmask.view(torch.uint8).long()].view(b, -1)[:, :vocab]       # (B, W*32) → (B, vocab)


_EXECUTOR: llg.LLExecutor | None = None


def apply_masks(logits: torch.Tensor, states: Sequence[ConstraintState | None],
                bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Set disallowed logits to -inf in the rows whose state is not None (in place; returns `logits`).

    logits: [B, V_model]. Ids the tokenizer does not have (V_model > V_tok, padded embedding rows) are
    disallowed in constrained rows. `bitmask` may be a reusable int32 CPU buffer of at least [B, W].
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [B, V] with B == len(states) ({len(states)}), got {tuple(logits.shape)}")
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    first = states[rows[0]]
    assert first is not None
    vtok = first.vocab_size
    words = first.mask_words
    if bitmask is None or bitmask.shape[0] < len(rows) or bitmask.shape[1] != words:
        bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    bm = bitmask[:len(rows)]
    if len(rows) == 1:
        first.fill_mask(bm, 0)
    else:
        # Several constrained rows: llguidance computes them on its own threads, without the GIL.
        global _EXECUTOR
        if _EXECUTOR is None:
            _EXECUTOR = llg.LLExecutor()
        pairs = []
        for k, i in enumerate(rows):
            s = states[i]
            assert s is not None and s.vocab_size == vtok, "all constrained rows must share one tokenizer"
            pairs.append((s._m, k))
        _EXECUTOR.unsafe_compute_mask_ptr(pairs, bm.data_ptr(), words * 4, len(rows))
    vmodel = logits.shape[1]
    # Only the small bitmask crosses to the accelerator; the bias is expanded there.
    bias = _bias_from_bitmask(bm.to(logits.device, non_blocking=True), min(vtok, vmodel), logits.dtype)
    full = len(rows) == logits.shape[0]
    target = logits if full else logits[torch.tensor(rows, device=logits.device)]
    target[:, :bias.shape[1]] += bias
    if vmodel > vtok:
        target[:, vtok:] = float("-inf")
    if not full:
        logits[torch.tensor(rows, device=logits.device)] = target
    return logits


# ─── compilation ─────────────────────────────────────────────────────────────────────────────────────
def compile_constraint(spec: ConstraintSpec, tokenizer: Tokenizer) -> CompiledGrammar:
    """Check and compile `spec` for `tokenizer`; cached per tokenizer by the spec's key. ValueError if invalid."""
    entry = _entry(tokenizer)
    key = spec.cache_key()
    with entry.lock:
        hit = entry.cache.get(key)
        if hit is not None:
            entry.cache.move_to_end(key)
            return hit
    grammar, lark = _build_grammar(spec, entry.ids)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, entry.lltok, limits=_LIMITS)
    if is_error:
        raise ValueError(f"invalid {spec.kind} constraint: {messages[0].strip()}")
    template = llg.LLMatcher(entry.lltok, grammar, log_level=0, limits=_LIMITS)
    if template.is_error():
        raise ValueError(f"invalid {spec.kind} constraint: {template.get_error().strip()}")
    compiled = CompiledGrammar(spec, grammar, lark, entry.vocab_size, frozenset(entry.lltok.eos_tokens), template)
    with entry.lock:
        entry.cache[key] = compiled
        while len(entry.cache) > _GRAMMAR_CACHE_SIZE:
            entry.cache.popitem(last=False)
    return compiled


def _build_grammar(spec: ConstraintSpec, ids: dict[str, int]) -> tuple[str, str | None]:
    """Spec → (llguidance grammar JSON, top-level Lark text or None)."""
    thinking = spec.thinking or spec.thinking_open
    subs: list[dict] = []          # sub-grammars referenced as @name from the top-level Lark grammar
    body_lark = "body: @body"      # Lark rules defining `body`
    if spec.kind in ("json_schema", "json_object"):
        subs.append({"name": "body", "json_schema": _json_schema_payload(spec)})
    elif spec.kind == "regex":
        if not isinstance(spec.payload, str):
            raise ValueError(f"regex constraint payload must be a string, got {type(spec.payload).__name__}")
        body_lark = f"body: BODY\nBODY: /{llg.regex_to_lark(spec.payload)}/"
    elif spec.kind == "lark":
        if not isinstance(spec.payload, str) or not spec.payload.strip():
            raise ValueError("lark constraint payload must be a non-empty grammar string with a `start` rule")
        subs.append({"name": "body", "lark_grammar": spec.payload})
    elif spec.kind == "tool_call":
        body_lark = tool_call_lark(spec.payload, ids, parallel=spec.parallel_tool_calls)
        content = spec.payload.get("content_schema") if isinstance(spec.payload, dict) else None
        if content is not None:
            subs.append({"name": "content", "json_schema": _json_schema_payload(
                ConstraintSpec("json_schema", content, strict=spec.strict, max_whitespace=spec.max_whitespace))})
    if not thinking and spec.kind in ("json_schema", "json_object", "lark"):
        return json.dumps({"grammars": [{k: v for k, v in subs[0].items() if k != "name"}]}), None
    lines = []
    if thinking:
        close = _special(ids, "eoc_token", "thinking")
        if spec.thinking_open:
            lines.append(f"start: THOUGHT {close} body")
        else:
            lines.append(f'start: thought? body\nthought: {_special(ids, "soc_token", "thinking")} "thought\\n" '
                         f"THOUGHT {close}")
        lines.append(f"THOUGHT: {_NO_CHANNEL_CLOSE}")
    else:
        lines.append("start: body")
    lines.append(body_lark)
    top = "\n".join(lines) + "\n"
    return json.dumps({"grammars": [{"lark_grammar": top}, *subs]}), top


def _json_schema_payload(spec: ConstraintSpec) -> dict | bool:
    if spec.kind == "json_object":
        schema: Any = {"type": "object"}
    else:
        schema = spec.payload
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema payload is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"json_schema payload must be a JSON object (the schema), got {type(schema).__name__}")
    if isinstance(schema, bool):
        if not schema:
            raise ValueError("json_schema `false` accepts nothing")
        schema = {}
    _check_literals(schema, "json_schema")
    if not satisfiable(schema):
        raise ValueError("json_schema admits no finite value (a required property or item refers back to the "
                         "schema with no way out); make the recursive property optional or give it an alternative")
    schema = copy.deepcopy(schema)
    if spec.strict:
        _close_objects(schema)
    opts: dict[str, Any] = {} if spec.strict else {"lenient": True}
    if spec.max_whitespace == 0:
        opts["whitespace_flexible"] = False
    elif spec.max_whitespace is not None:
        opts["whitespace_pattern"] = f"{_JSON_WS}{{1,{spec.max_whitespace}}}"
    user_opts = schema.get("x-guidance")
    schema["x-guidance"] = {**opts, **(user_opts if isinstance(user_opts, dict) else {})}
    return schema


def _check_literals(schema: Any, where: str) -> None:
    """Refuse const / enum strings that contain format-token text (`<turn|>`, `<|tool_call>`, ...).

    The grammar would force the model to write that text, and the response parser reads it as markup: the JSON
    is cut at `<turn|>` (invalid output ending "stop"), or a `<|tool_call>` opens a call that never closes
    (generation runs to the length limit). Iterative, so deep schemas cannot exhaust the stack."""
    from unigemma.inputs.template import find_format_token

    stack = [(schema, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, str):
            continue
        if isinstance(node, list):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key in ("const", "enum"):
            if key in node:
                for text in _strings_in(node[key]):
                    tok = find_format_token(text)
                    if tok is not None:
                        raise ValueError(f"{at}.{key}: the string {text[:80]!r} contains {tok!r}, text of the "
                                         "model's control tokens, which its output format cannot carry; use other "
                                         "text")
        for k, v in node.items():
            if k not in ("const", "enum") and isinstance(v, (dict, list)):
                stack.append((v, f"{at}.{k}"))


def _strings_in(value: Any) -> list[str]:
    out, stack = [], [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def _close_objects(schema: Any) -> None:
    """Strict mode: an object schema that does not mention additionalProperties gets `false` (in place)."""
    if not isinstance(schema, dict):
        return
    t = schema.get("type")
    is_object = t == "object" or (isinstance(t, list) and "object" in t) or "properties" in schema
    if is_object and "additionalProperties" not in schema and "patternProperties" not in schema:
        schema["additionalProperties"] = False
    for k in _SUBSCHEMA_LISTS:
        for sub in schema.get(k) or []:
            _close_objects(sub)
    for k in _SUBSCHEMA_MAPS:
        for sub in (schema.get(k) or {}).values():
            _close_objects(sub)
    for k in _SUBSCHEMA_ONE:
        _close_objects(schema.get(k))


# ─── tool calls: JSON-schema parameters → Lark for the Gemma 4 wire format ───────────────────────────
def _lark_str(text: str) -> str:
    """A Lark string literal for `text` (llguidance reads these as JSON strings)."""
    return json.dumps(text, ensure_ascii=False)


def _wire_number(v: int | float) -> str:
    # What the template writes: Python str() for ints, repr() for floats (chat-format.md §4.2).
    return str(v) if isinstance(v, int) else repr(float(v))


class _WireGrammar:
    """Builds Lark rules for wire-format values (`<|"|>s<|"|>`, bare numbers, `{k:v}`, `[v]`)."""

    def __init__(self, quote_id: int):
        self.q = f"<[{quote_id}]>"
        self.root: Any = {}   # the schema `$ref`s resolve against (each tool's parameters in turn)
        self.rules: dict[str, str] = {}
        self.terminals: dict[str, str] = {}
        self._refs: dict[str, str] = {}
        self._n = 0

    def _new(self, prefix: str, body: str) -> str:
        self._n += 1
        name = f"{prefix}_{self._n}"
        self.rules[name] = body
        return name

    def _terminal(self, name: str, body: str) -> str:
        self.terminals.setdefault(name, body)
        return name

    # --- generic values (untyped schema, additionalProperties, ...) -----------------------------------------
    def any_value(self) -> str:
        if "w_any" not in self.rules:
            self.rules["w_any"] = "w_str | w_num | \"true\" | \"false\" | \"null\" | w_arr | w_obj"
            self.rules["w_str"] = f"{self.q} WSTR {self.q}"
            self.rules["w_num"] = "WNUM"
            self.rules["w_arr"] = '"[" (w_any ("," w_any)*)? "]"'
            self.rules["w_obj"] = '"{" (w_pair ("," w_pair)*)? "}"'
            self.rules["w_pair"] = 'WKEY ":" w_any'
            self._terminal("WSTR", _NO_QUOTE)
            self._terminal("WNUM", _WNUM)
            self._terminal("WKEY", r"/[A-Za-z_][A-Za-z0-9_.\-]{0,63}/")
        return "w_any"

    def literal(self, v: Any) -> str:
        """Lark expression for one exact JSON value (enum/const members)."""
        if v is None:
            return '"null"'
        if isinstance(v, bool):
            return '"true"' if v else '"false"'
        if isinstance(v, (int, float)):
            return _lark_str(_wire_number(v))
        if isinstance(v, str):
            if _QUOTE_TEXT in v:
                raise ValueError(f"enum/const string {v!r} contains the quote token text {_QUOTE_TEXT!r}")
            from unigemma.inputs.template import find_format_token
            tok = find_format_token(v)
            if tok is not None:
                raise ValueError(f"enum/const string {v[:80]!r} contains {tok!r}, text of the model's control "
                                 "tokens, which a tool call cannot carry")
            return f"{self.q} {_lark_str(v)} {self.q}" if v else f"{self.q} {self.q}"
        if isinstance(v, list):
            return '"[" ' + ' "," '.join(self.literal(x) for x in v) + ' "]"'
        if isinstance(v, dict):
            parts = [f"{_lark_str(str(k) + ':')} {self.literal(v[k])}" for k in sorted(v, key=lambda k: str(k).lower())]
            return '"{" ' + ' "," '.join(parts) + ' "}"'
        raise ValueError(f"enum/const value {v!r} is not a JSON value")

    # --- typed values -------------------------------------------------------------------------------------
    def value(self, schema: Any, where: str) -> str:
        """Lark expression matching a wire-format value valid for `schema` (`where` names it in errors)."""
        if schema is True or schema == {}:
            return self.any_value()
        if schema is False:
            raise ValueError(f"{where}: schema `false` accepts no value")
        if not isinstance(schema, dict):
            raise ValueError(f"{where}: a schema must be an object, got {schema!r}")
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        if "const" in schema:
            return self.literal(schema["const"])
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise ValueError(f"{where}: enum must be a non-empty list")
            alts = [self.literal(v) for v in schema["enum"]]
            return "(" + " | ".join(alts) + ")"
        for comb in ("anyOf", "oneOf"):
            if comb in schema:
                subs = schema[comb]
                if not isinstance(subs, list) or not subs:
                    raise ValueError(f"{where}: {comb} must be a non-empty list")
                rest = {k: v for k, v in schema.items() if k != comb}
                alts = [self.value({**rest, **s} if isinstance(s, dict) else s, f"{where}.{comb}[{i}]")
                        for i, s in enumerate(subs)]
                return "(" + " | ".join(alts) + ")"
        if "allOf" in schema:
            return self.value(_merge_all_of(schema, where), where)
        types = schema.get("type")
        if types is None:
            if "properties" in schema:
                types = ["object"]
            elif "items" in schema:
                types = ["array"]
            else:
                return self.any_value()
        if isinstance(types, str):
            types = [types]
        alts = [self._typed(t, schema, where) for t in types]
        if schema.get("nullable") is True and "null" not in types:  # OpenAPI-style nullable
            alts.append('"null"')
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    def _typed(self, t: str, s: dict, where: str) -> str:
        if t == "string":
            return self._string(s, where)
        if t in ("integer", "number"):
            bounds = {k: s[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
                      if k in s}
            if bounds:  # the JSON and wire spellings of numbers agree, so llguidance's numeric lexer does bounds
                return "%json " + json.dumps({"type": t, **bounds})
            if t == "integer":
                return self._terminal("WINT", _WINT)
            return self._terminal("WNUM", _WNUM)
        if t == "boolean":
            return '("true" | "false")'
        if t == "null":
            return '"null"'
        if t == "array":
            return self._array(s, where)
        if t == "object":
            return self._object(s, where)
        raise ValueError(f"{where}: unknown type {t!r} (expected string, integer, number, boolean, null, "
                         "array or object)")

    def _string(self, s: dict, where: str) -> str:
        lo, hi = s.get("minLength"), s.get("maxLength")
        pat = s.get("pattern")
        if lo is None and hi is None and pat is None:
            self._terminal("WSTR", _NO_QUOTE)
            return f"{self.q} WSTR {self.q}"
        parts = [_NO_QUOTE]
        if lo is not None or hi is not None:
            lo_i, hi_s = int(lo or 0), ("" if hi is None else str(int(hi)))
            parts.append(f"/(?s:.){{{lo_i},{hi_s}}}/")
        if pat is not None:
            if not isinstance(pat, str):
                raise ValueError(f"{where}: pattern must be a string")
            # JSON Schema patterns search (unanchored) unless anchored with ^ / $; llguidance regexes match whole.
            core = pat
            lead = core.startswith("^")
            core = core[1:] if lead else core
            trail = core.endswith("$") and not core.endswith("\\$")
            core = core[:-1] if trail else core
            body = ("" if lead else "(?s:.*)") + f"(?:{core})" + ("" if trail else "(?s:.*)")
            parts.append("/" + llg.regex_to_lark(body, "dw") + "/")
        self._n += 1
        term = self._terminal(f"STR_{self._n}", " & ".join(parts))
        return f"{self.q} {term} {self.q}"

    def _array(self, s: dict, where: str) -> str:
        item = self.value(s.get("items", True), f"{where}[]")
        lo = int(s.get("minItems", 0) or 0)
        hi = s.get("maxItems")
        if hi is not None:
            hi = int(hi)
            if hi < lo:
                raise ValueError(f"{where}: maxItems {hi} < minItems {lo}")
            if hi == 0:
                return '"[" "]"'
        it = self._new("arr_item", item)
        more_hi = "" if hi is None else str(hi - 1)
        if lo == 0:
            inner = f'({it} ("," {it}){{0,{more_hi}}})?'
        else:
            inner = f'{it} ("," {it}){{{lo - 1},{more_hi}}}'
        return self._new("arr", f'"[" {inner} "]"')

    def _object(self, s: dict, where: str) -> str:
        props = s.get("properties") or {}
        if not isinstance(props, dict):
            raise ValueError(f"{where}: properties must be an object")
        required = set(s.get("required") or [])
        keys = list(props) + [k for k in s.get("required") or [] if k not in props]
        if not keys:
            # A declared-but-empty `properties` (how a no-argument tool is usually written) means "{}": forcing
            # a call should not invite invented arguments. Only a schema that names no properties and allows
            # extra keys gets a free-form object.
            addl = s.get("additionalProperties", "properties" not in s)
            if addl is False:
                return '"{" "}"'
            val = self.value(addl, f"{where}.*")
            self.any_value()
            pair = self._new("pair", f'WKEY ":" {val}')
            return self._new("obj", f'"{{" ({pair} ("," {pair})*)? "}}"')
        # Fixed key order, as the chat template renders arguments (Jinja dictsort: case-insensitive).
        keys.sort(key=lambda k: k.lower())
        items = []
        for k in keys:
            if not re.fullmatch(r"[^\s:,{}\[\]<>]+", k):
                raise ValueError(f"{where}: property name {k!r} cannot be written as a bare wire-format key")
            sub = props.get(k, True)
            items.append((f"{_lark_str(k + ':')} {self.value(sub, f'{where}.{k}')}", k in required))
        # rest[i]: items i.. each preceded by ","; first[i]: items i.. with no item emitted yet. Linear in size,
        # and it never lets a comma dangle whatever subset of optional keys is present.
        n = len(items)
        rest: list[str] = [""] * (n + 1)
        first: list[str] = [""] * (n + 1)
        for i in range(n - 1, -1, -1):
            it, req = items[i]
            tail = rest[i + 1]
            if i > 0:  # rest[0] is never referenced
                body = f'"," {it} {tail}' if req else f'("," {it})? {tail}'
                rest[i] = self._new("rest", body.strip())
            if i == 0 or not items[i - 1][1]:  # first[i] is only reached past an optional key (or at the start)
                if req:
                    fbody = f"{it} {tail}"
                elif first[i + 1]:
                    fbody = f"{it} {tail} | {first[i + 1]}"
                else:
                    fbody = f"({it} {tail})?"
                first[i] = self._new("first", fbody.strip())
        return self._new("obj", f'"{{" {first[0]} "}}"')

    def _ref(self, ref: str, where: str) -> str:
        key = f"{id(self.root)}{ref}"
        if key in self._refs:
            return self._refs[key]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"{where}: only local $ref ('#/...') is supported, got {ref!r}")
        node: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{where}: $ref {ref!r} does not resolve")
            node = node[part]
        self._n += 1
        name = f"ref_{self._n}"
        self._refs[key] = name          # registered first, so recursive schemas terminate
        self.rules[name] = "__pending__"
        self.rules[name] = self.value(node, ref)
        return name

    def render(self) -> str:
        out = [f"{k}: {v}" for k, v in self.rules.items()]
        out += [f"{k}: {v}" for k, v in self.terminals.items()]
        return "\n".join(out)


def _merge_all_of(schema: dict, where: str) -> dict:
    """Shallow merge of allOf members (properties and required unioned): enough for tool parameters."""
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for i, sub in enumerate(schema["allOf"]):
        if not isinstance(sub, dict):
            raise ValueError(f"{where}.allOf[{i}]: must be an object schema")
        for k, v in sub.items():
            if k == "properties":
                merged["properties"] = {**merged.get("properties", {}), **v}
            elif k == "required":
                merged["required"] = list(dict.fromkeys(list(merged.get("required", [])) + list(v)))
            else:
                merged.setdefault(k, v)
    return merged


def satisfiable(schema: Any) -> bool:
    """Whether some finite JSON value is valid for `schema`, as far as recursion goes: a `$ref` cycle through
    required properties / non-empty arrays with no alternative (e.g. {"properties": {"a": {"$ref": "#"}},
    "required": ["a"]}) admits none, and a grammar built from it could never finish.

    A least fixpoint over the schema's local `$ref` targets (all start unsatisfiable; repeat until nothing
    changes), so mutual recursion is judged right. Constraints other than recursion are not analysed."""
    refs: dict[str, bool] = {}

    def resolve(ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return True  # not ours to judge: compilation reports unsupported refs
        node: Any = schema
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return True
            node = node[part]
        return node

    def ok(node: Any, depth: int = 0) -> bool:
        if depth > 200 or not isinstance(node, dict):
            return node is not False
        if "$ref" in node:
            ref = node["$ref"]
            if ref not in refs:
                refs[ref] = False  # discovered: judged in the fixpoint loop
            return refs[ref]
        if "const" in node or "enum" in node:
            return True
        for comb in ("anyOf", "oneOf"):
            if isinstance(node.get(comb), list):
                rest = {k: v for k, v in node.items() if k != comb}
                return any(ok({**rest, **alt} if isinstance(alt, dict) else alt, depth + 1) for alt in node[comb])
        if isinstance(node.get("allOf"), list):
            return all(ok(sub, depth + 1) for sub in node["allOf"]) and \
                ok({k: v for k, v in node.items() if k != "allOf"}, depth + 1)
        types = node.get("type")
        if types is None:
            types = ["object"] if "properties" in node or "required" in node else \
                (["array"] if "items" in node else ["any"])
        for t in [types] if isinstance(types, str) else list(types):
            if t == "array":
                if int(node.get("minItems", 0) or 0) == 0 or ok(node.get("items", True), depth + 1):
                    return True
            elif t == "object":
                props = node.get("properties") or {}
                if isinstance(props, dict) and all(ok(props.get(k, True), depth + 1)
                                                   for k in node.get("required") or [] if isinstance(k, str)):
                    return True
            else:
                return True
        return False

    ok(schema)
    while True:
        changed = False
        for ref in list(refs):
            if not refs[ref] and ok(resolve(ref)):
                refs[ref] = changed = True
        if not changed:
            return ok(schema)


def _tool_list(tools: Any) -> list[tuple[str, dict]]:
    if not isinstance(tools, list) or not tools:
        raise ValueError("tool_call constraint needs a non-empty list of tools")
    out: list[tuple[str, dict]] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                             f"'parameters': ...}}}}, got {t!r}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[^\s{}<>:]+", name):
            raise ValueError(f"tools[{i}].function.name must be a non-empty name without spaces, braces, "
                             f"colons or angle brackets, got {name!r}")
        if any(name == n for n, _ in out):
            raise ValueError(f"tools[{i}]: duplicate tool name {name!r}")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object, got {params!r}")
        out.append((name, params))
    return out


def tool_call_lark(payload: Any, ids: dict[str, int], parallel: bool = True) -> str:
    """Lark rules (defining `body`) for Gemma 4 tool calls; see the module docstring.

    payload: {"tools": [...], "tool_choice": "required" | {"type": "function", "function": {"name": ...}} |
    "auto", "content_schema": JSON schema (needed with "auto": the answer when the model calls nothing)}.
    """
    if not isinstance(payload, dict):
        raise ValueError("tool_call payload must be {'tools': [...], 'tool_choice': ...}")
    tools = _tool_list(payload.get("tools"))
    choice = payload.get("tool_choice", "required")
    content = payload.get("content_schema")
    if choice == "auto" and content is None:
        raise ValueError("tool_choice 'auto' constrains nothing by itself: give a 'content_schema' for the "
                         "non-call answer, or do not constrain the request")
    if choice in ("required", "auto"):
        chosen = tools
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        want = choice["function"].get("name")
        chosen = [t for t in tools if t[0] == want]
        if not chosen:
            raise ValueError(f"tool_choice names unknown tool {want!r}; declared tools: "
                             f"{', '.join(n for n, _ in tools)}")
    else:
        raise ValueError(f"tool_call constraint needs tool_choice 'required', 'auto' (with a content_schema) "
                         f"or {{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}")
    why = "a tool_call constraint"
    q = ids.get("escape_token")
    if q is None:
        _special(ids, "escape_token", why)
    stc, etc = _special(ids, "stc_token", why), _special(ids, "etc_token", why)
    # After the calls: `<|tool_response>`, or (the rule being optional) one of the tokenizer's stop tokens,
    # which llguidance allows once the grammar is complete. Stop ids must not appear in the grammar itself.
    end = _special(ids, "str_token", why)
    wg = _WireGrammar(q)  # one builder for all tools: rule names stay unique, shared rules are defined once
    fn_alts = []
    for name, params in chosen:
        if not satisfiable(params):
            raise ValueError(f"tool {name!r}: its parameters schema admits no finite value (a required property or "
                             "item refers back to the schema itself with no way out), so the forced call could "
                             "never be completed; make the recursive property optional or give it an alternative")
        wg.root = params
        args = wg.value({"type": "object", **params} if "type" not in params else params,
                        f"tool {name!r} parameters")
        fn_alts.append(f"{_lark_str('call:' + name)} {args}")
    calls = "call+" if parallel else "call"
    # tool_choice "auto" with a response format: either the calls or a JSON answer (sub-grammar @content).
    head = "body: tool_calls | content\ncontent: @content" if choice == "auto" else "body: tool_calls"
    return "\n".join([head, f"tool_calls: {calls} call_end",
                      f"call: {stc} (" + " | ".join(fn_alts) + f") {etc}",
                      f"call_end: {end}?",
                      wg.render()])

