"""Grammar constraints (unigemma.engine.constraints): random-logit generation under masks must always yield
outputs that parse and validate — JSON schemas, regex, Lark, Gemma 4 tool calls, the thinking gate — plus draft
validation, rollback, batch masking and clear errors for bad specs.

The "model" is seeded random logits over a tiny BPE vocabulary (with a few padded ids past the tokenizer, as a
real checkpoint has); after a number of steps the logits lean towards closing tokens so every run terminates.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from unigemma.engine.constraints import (
    ConstraintSpec, apply_masks, compile_constraint, spec_from_openai, unpack_bitmask,
)
from unigemma.inputs.tokenizer import Tokenizer
from unigemma.testing import write_tiny_tokenizer

try:  # the project's own wire-format decoder, when present: it must read our outputs with no repairs
    from unigemma.inputs.wire import parse_wire_arguments
except ImportError:  # written in parallel with this module; the local parser below covers the format alone
    parse_wire_arguments = None

_CORPUS = [
    '{"name": "Alice", "age": 30, "tags": ["a", "b"], "ok": true, "x": null}',
    '{"user": {"id": 12, "email": "bob@example.com"}, "items": [1, 2.5, -3], "price": 19.99}',
    '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:2,unit:<|"|>c<|"|>}<tool_call|><|tool_response>',
    "<|channel>thought\nLet me think about the answer first.<channel|>",
    "The quick brown fox jumps over the lazy dog. 0123456789 true false null",
    "2024-01-31 abc-123 hello world {}[],:",
] * 30
_EXTRA_IDS = 7  # model vocabulary larger than the tokenizer's, like padded embedding tables


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d, corpus=_CORPUS, vocab_size=600)
    return Tokenizer.from_dir(d)


def _closers(tok: Tokenizer) -> list[int]:
    """Ids that end things: quote/brace/bracket pieces and the format's closing special tokens."""
    ids = [i for i in range(tok.vocab_size)
           if (t := tok.decode([i])).strip() and set(t.strip()) <= set('"}]')]
    for name in ("escape_token", "etc_token", "str_token", "eoc_token", "eot_token", "eos_token"):
        ids.append(tok.id_of(name))
    return ids


def _generate(tok: Tokenizer, spec: ConstraintSpec, seed: int, greedy: bool, max_steps: int = 600,
              push_after: int = 40, prefix: tuple[int, ...] = ()) -> list[int]:
    state = compile_constraint(spec, tok).new_state()
    assert state.advance_many(prefix) == len(prefix)
    gen = torch.Generator().manual_seed(seed)
    closers = torch.tensor(_closers(tok))
    stops = {tok.id_of("eos_token"), tok.id_of("eot_token"), tok.id_of("str_token")}
    out: list[int] = list(prefix)
    for step in range(max_steps):
        if state.is_finished():
            break
        logits = torch.randn(1, tok.vocab_size + _EXTRA_IDS, generator=gen)
        if step >= push_after:
            logits[0, closers] += 0.5 * (step - push_after + 1)
        apply_masks(logits, [state])
        assert torch.isinf(logits[0, tok.vocab_size:]).all(), "padded ids must be masked"
        if greedy:
            t = int(logits.argmax(-1))
        else:
            t = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen))
        assert state.advance(t), f"masked sampling produced a rejected token {t}"
        out.append(t)
        if t in stops:
            break
    else:
        raise AssertionError(f"no termination in {max_steps} steps: {tok.decode(out)!r}")
    return out


def _strip_stop(tok: Tokenizer, ids: list[int]) -> str:
    stops = {tok.id_of("eos_token"), tok.id_of("eot_token"), tok.id_of("str_token")}
    return tok.decode([i for i in ids if i not in stops])


# ─── JSON schemas ────────────────────────────────────────────────────────────────────────────────────
SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
               "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                          "city": {"type": "string"}},
                        "required": ["zip"]}},
                 "required": ["name", "address"]}}, "required": ["user"]},
    "string_array": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
    "bounded_int_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                          "minItems": 2, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "exclusive_int": {"type": "integer", "exclusiveMinimum": -5, "exclusiveMaximum": 40},
    "bounded_number": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
                       "required": ["x"]},
    "optional_fields": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                                         "c": {"type": "boolean"}}, "required": ["b"]},
    "string_lengths": {"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 5}},
                       "required": ["code"]},
    "bool_null": {"type": "object", "properties": {"flag": {"type": "boolean"}, "nothing": {"type": "null"}},
                  "required": ["flag", "nothing"]},
    "any_of_scalar": {"type": "object", "properties": {"v": {"anyOf": [{"type": "string", "maxLength": 4},
                                                                       {"type": "integer"}]}}, "required": ["v"]},
    "any_of_objects": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}},
         "required": ["kind", "side"], "additionalProperties": False}]},
    "nullable": {"type": "object", "properties": {"note": {"type": ["string", "null"]}}, "required": ["note"]},
    "array_of_objects": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "label": {"type": "string"}},
        "required": ["id"]}},
    "mixed_enum": {"enum": [1, "two", 3.5, None, True]},
    "const": {"const": {"version": 2}},
    "email_pattern": {"type": "object", "properties": {
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}, "required": ["email"]},
    "refs": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                              "required": ["x", "y"]}},
             "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
             "required": ["a", "b"]},
    "int_map": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "multiple_of": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 95},
    "date_format": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
                    "required": ["day"]},
    "deep": {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object",
             "properties": {"c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
             "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    "one_of_disjoint": {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_always_validate(tok, name):
    schema = SCHEMAS[name]
    spec = ConstraintSpec("json_schema", schema)
    for seed, greedy in ((0, True), (1, False), (2, False)):
        text = _strip_stop(tok, _generate(tok, spec, seed, greedy))
        value = json.loads(text)
        jsonschema.validate(value, schema)
        if name == "date_format":
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", value["day"]), value


def test_strict_closes_objects_and_json_object(tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    for seed in range(3):
        v = json.loads(_strip_stop(tok, _generate(tok, ConstraintSpec("json_schema", schema, strict=True),
                                                  seed, False)))
        assert set(v) <= {"a", "b"}
        jsonschema.validate(v, {**schema, "additionalProperties": False})
        obj = json.loads(_strip_stop(tok, _generate(tok, ConstraintSpec("json_object"), seed, False)))
        assert isinstance(obj, dict)


def test_compact_whitespace(tok):
    spec = ConstraintSpec("json_schema", SCHEMAS["person"], max_whitespace=0)
    for seed in range(3):
        text = _strip_stop(tok, _generate(tok, spec, seed, False))
        outside = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)  # whitespace outside strings only
        assert not re.search(r"\s", outside), text


# ─── regex and Lark ──────────────────────────────────────────────────────────────────────────────────
def test_regex_outputs_match(tok):
    pattern = r"(yes|no) [0-9]{2,4}-[a-f]{3}"
    spec = ConstraintSpec("regex", pattern)
    for seed, greedy in ((0, True), (1, False), (2, False), (3, False)):
        assert re.fullmatch(pattern, _strip_stop(tok, _generate(tok, spec, seed, greedy)))


def test_lark_outputs_match(tok):
    grammar = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]{1,3}/'
    spec = ConstraintSpec("lark", grammar)
    for seed, greedy in ((0, True), (1, False), (2, False), (3, False)):
        text = _strip_stop(tok, _generate(tok, spec, seed, greedy))
        # Reduce innermost parenthesised sums to a number until one flat sum is left: that is the grammar.
        flat = text
        while "(" in flat:
            reduced = re.sub(r"\([0-9]{1,3}(?:[+-][0-9]{1,3})*\)", "0", flat)
            assert reduced != flat, text
            flat = reduced
        assert re.fullmatch(r"[0-9]{1,3}(?:[+-][0-9]{1,3})*", flat), text


# ─── tool calls ──────────────────────────────────────────────────────────────────────────────────────
Q = '<|"|>'


def _parse_wire(s: str, i: int = 0):
    """Minimal recursive-descent parser for Gemma 4 wire values; returns (value, next index)."""
    if s.startswith(Q, i):
        j = s.index(Q, i + len(Q))
        return s[i + len(Q):j], j + len(Q)
    if s[i] == "{":
        out, i = {}, i + 1
        while s[i] != "}":
            k = s.index(":", i)
            key = s[i:k]
            out[key], i = _parse_wire(s, k + 1)
            if s[i] == ",":
                i += 1
        return out, i + 1
    if s[i] == "[":
        arr, i = [], i + 1
        while s[i] != "]":
            v, i = _parse_wire(s, i)
            arr.append(v)
            if s[i] == ",":
                i += 1
        return arr, i + 1
    m = re.compile(r"true|false|null|-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?").match(s, i)
    assert m and m.group(0), f"bad wire value at {s[i:i + 20]!r}"
    tokn = m.group(0)
    value = {"true": True, "false": False, "null": None}.get(tokn, None)
    if tokn not in ("true", "false", "null"):
        value = float(tokn) if any(c in tokn for c in ".eE") else int(tokn)
    return value, m.end()


def _parse_calls(text: str) -> list[tuple[str, dict]]:
    calls = []
    for m in re.finditer(r"<\|tool_call>call:([^{]+)", text):
        args, end = _parse_wire(text, m.end())
        assert text.startswith("<tool_call|>", end), text
        if parse_wire_arguments is not None:
            warnings: list[str] = []
            assert parse_wire_arguments(text[m.end():end], warnings) == args and not warnings, (text, warnings)
        calls.append((m.group(1), args))
    return calls


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {
            "city": {"type": "string", "description": "City"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"type": "string", "enum": ["c", "f"]},
            "Detailed": {"type": "boolean"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {
            "query": {"type": "string", "maxLength": 12},
            "filters": {"type": "object", "properties": {"lang": {"type": ["string", "null"]},
                                                         "max_results": {"type": "number", "minimum": 0}},
                        "required": ["lang"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
            "mode": {"anyOf": [{"type": "integer"}, {"enum": ["fast", "slow"]}]}},
        "required": ["query", "tags"]}}},
    {"type": "function", "function": {"name": "ping"}},
    {"type": "function", "function": {"name": "book_flight", "parameters": {
        "type": "object", "$defs": {"leg": {"type": "object", "properties": {
            "from": {"type": "string", "pattern": "^[A-Z]{3}$"}, "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "date": {"type": "string", "minLength": 2, "maxLength": 6}}, "required": ["from", "to"]}},
        "properties": {"legs": {"type": "array", "items": {"$ref": "#/$defs/leg"}, "minItems": 1, "maxItems": 2},
                       "seats": {"type": "integer", "multipleOf": 2, "minimum": 2, "maximum": 8},
                       "class": {"enum": ["economy", "business", None]}},
        "required": ["legs", "class"]}}},
]
_PARAMS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {},
                                                                   "additionalProperties": False})
           for t in TOOLS}


@pytest.mark.parametrize("choice", ["required", "get_weather", "search", "ping", "book_flight"])
def test_forced_tool_calls_parse_and_validate(tok, choice):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    for parallel in (True, False):
        spec = spec_from_openai(tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel)
        for seed, greedy in ((0, True), (1, False), (2, False)):
            ids = _generate(tok, spec, seed, greedy)
            assert ids[-1] in (tok.id_of("str_token"), tok.id_of("eos_token"), tok.id_of("eot_token"))
            assert ids[0] == tok.id_of("stc_token")  # no stray text before the call
            text = tok.decode(ids)
            calls = _parse_calls(text)
            assert calls and text.count("<|tool_call>") == len(calls)
            if not parallel:
                assert len(calls) == 1
            for name, args in calls:
                assert choice in ("required", name)
                jsonschema.validate(args, _PARAMS[name])
                # Keys come in the template's order (case-insensitive sort).
                assert list(args) == sorted(args, key=str.lower)


def test_tool_call_special_tokens_are_token_ids(tok):
    """The call opener and the string quote must be the special ids, never spelled with plain tokens."""
    state = compile_constraint(spec_from_openai(tools=TOOLS, tool_choice="required"), tok).new_state()
    allowed = state.allowed_mask()
    assert allowed.nonzero().flatten().tolist() == [tok.id_of("stc_token")]
    spelled = [i for i in range(tok.vocab_size) if tok.decode([i]) == "<" and i not in tok.all_special_ids]
    assert spelled and not allowed[spelled].any()
    # Inside a string, the quote text cannot be spelled out with plain pieces.
    prefix = tok.encode('<|tool_call>call:get_weather{city:<|"|>ab')
    assert state.advance_many(prefix) == len(prefix)
    plain = tok.encode("<|") + tok.encode('"|') + tok.encode(">")
    assert all(i not in tok.all_special_ids for i in plain)
    assert state.validate_drafts(plain) < len(plain)


def test_auto_tool_choice_with_response_format(tok):
    """tool_choice "auto" + a response format: either tool calls or a JSON answer, nothing else."""
    schema = SCHEMAS["person"]
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    spec = spec_from_openai(response_format=rf, tools=TOOLS[:2], tool_choice="auto")
    assert spec.kind == "tool_call"
    assert spec_from_openai(response_format=rf, tools=TOOLS, tool_choice="none").kind == "json_schema"
    state = compile_constraint(spec, tok).new_state()
    call = tok.encode('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>')
    answer = tok.encode('{"name": "x", "age": 3}')
    assert state.validate_drafts(call) == len(call)
    assert state.validate_drafts(answer) == len(answer)
    assert state.validate_drafts(tok.encode("Hello")) == 0
    stc = tok.id_of("stc_token")
    for seed in range(4):
        called = _generate(tok, spec, seed, False, prefix=(stc,))
        for name, args in _parse_calls(tok.decode(called)):
            jsonschema.validate(args, _PARAMS[name])
        assert _parse_calls(tok.decode(called))
        answered = _generate(tok, spec, seed, False, prefix=tuple(tok.encode("{")))
        jsonschema.validate(json.loads(_strip_stop(tok, answered)), schema)
    # With thinking on, a thought may come first, then either branch.
    spec = spec_from_openai(response_format=rf, tools=TOOLS[:2], tool_choice="auto", enable_thinking=True)
    state = compile_constraint(spec, tok).new_state()
    thought = tok.encode("<|channel>thought\nmaybe a call<channel|>")
    assert state.validate_drafts(thought + call) == len(thought + call)
    assert state.validate_drafts(thought + answer) == len(thought + answer)


# ─── thinking gate ───────────────────────────────────────────────────────────────────────────────────
def test_thinking_gate_lets_reasoning_through_then_enforces_schema(tok):
    spec = ConstraintSpec("json_schema", SCHEMAS["person"], thinking=True)
    state = compile_constraint(spec, tok).new_state()
    thought = tok.encode("<|channel>thought\nThe user wants {not json} and [brackets]: fine.")
    assert state.advance_many(thought) == len(thought)
    # Inside the thought: special tokens other than the closer are refused (reasoning cannot escape).
    allowed = state.allowed_mask()
    assert allowed[tok.id_of("eoc_token")]
    assert not allowed[tok.id_of("stc_token")] and not allowed[tok.id_of("eot_token")]
    assert state.advance(tok.id_of("eoc_token"))
    # After the channel closes, the schema applies.
    assert state.validate_drafts(tok.encode("Sure!")) == 0
    assert state.validate_drafts(tok.encode('{"name": "x", "age": 3}')) == len(tok.encode('{"name": "x", "age": 3}'))

    # Random generation: the channel is sometimes opened, the answer always validates.
    saw_thought = False
    for seed in range(6):
        ids = _generate(tok, spec, seed, False)
        text = _strip_stop(tok, ids)
        if text.startswith("<|channel>"):
            saw_thought = True
            assert ids[0] == tok.id_of("soc_token")
            assert text.startswith("<|channel>thought\n") and text.count("<channel|>") == 1
            text = text.split("<channel|>", 1)[1]
        jsonschema.validate(json.loads(text), SCHEMAS["person"])
    assert saw_thought  # these seeds open the channel in some runs and not in others


def test_thinking_open_and_no_thinking(tok):
    # Prompt already ends inside the channel: must close it first, then a tool call.
    spec = spec_from_openai(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}},
                            enable_thinking=True, thinking_open=True)
    state = compile_constraint(spec, tok).new_state()
    assert not state.allowed_mask()[tok.id_of("soc_token")]
    seq = tok.encode("still thinking<channel|><|tool_call>call:ping{}<tool_call|><|tool_response>")
    assert state.advance_many(seq) == len(seq) and state.is_finished()
    # Without thinking a channel cannot be opened.
    state = compile_constraint(ConstraintSpec("json_schema", SCHEMAS["person"]), tok).new_state()
    assert not state.allowed_mask()[tok.id_of("soc_token")]


# ─── drafts, rollback, reset, batching ───────────────────────────────────────────────────────────────
def test_validate_drafts_rollback_and_reset(tok):
    spec = ConstraintSpec("json_schema", SCHEMAS["person"])
    state = compile_constraint(spec, tok).new_state()
    good = tok.encode('{"name": "Al", "age": 41}')
    bad = tok.encode('{"name": "Al", "age": "x"}')
    before = state.allowed_mask().clone()
    assert state.validate_drafts(good) == len(good)
    k = state.validate_drafts(bad)
    assert 0 < k < len(bad)
    assert torch.equal(state.allowed_mask(), before) and state.num_tokens == 0  # no state change

    assert state.advance_many(good[:5]) == 5
    mid = state.allowed_mask().clone()
    assert state.advance_many(good[5:9]) == 4
    state.rollback(4)
    assert torch.equal(state.allowed_mask(), mid) and state.num_tokens == 5
    assert state.advance_many(good[5:]) == len(good) - 5
    assert state.is_finished()
    with pytest.raises(ValueError, match="roll back"):
        state.rollback(len(good) + 1)
    state.reset()
    assert state.num_tokens == 0 and torch.equal(state.allowed_mask(), before)

    # A rejected token leaves the state usable.
    assert not state.advance(tok.id_of("stc_token"))
    assert state.advance_many(good) == len(good)


def test_fill_draft_masks_matches_stepwise(tok):
    spec = ConstraintSpec("json_schema", SCHEMAS["optional_fields"])
    state = compile_constraint(spec, tok).new_state()
    drafts = tok.encode('{"a": 5, "b": "q"}') + [tok.id_of("stc_token")]
    bm = torch.zeros((len(drafts) + 1, state.mask_words), dtype=torch.int32)
    n = state.fill_draft_masks(bm, 0, drafts)
    assert n == len(drafts) - 1 and state.num_tokens == 0
    for i in range(n + 1):
        assert torch.equal(unpack_bitmask(bm[i:i + 1], state.vocab_size)[0], state.allowed_mask())
        if i < n:
            state.advance(drafts[i])


def test_apply_masks_batch_rows(tok):
    g1 = compile_constraint(ConstraintSpec("json_schema", SCHEMAS["person"]), tok)
    g2 = compile_constraint(ConstraintSpec("regex", "[0-9]+"), tok)
    s1, s2, s3 = g1.new_state(), g2.new_state(), g2.new_state()
    s3.advance_many(tok.encode("12"))
    logits = torch.randn(4, tok.vocab_size + _EXTRA_IDS)
    orig = logits.clone()
    apply_masks(logits, [s1, None, s2, s3])
    assert torch.equal(logits[1], orig[1])  # unconstrained row untouched
    for row, st in ((0, s1), (2, s2), (3, s3)):
        allowed = torch.cat([st.allowed_mask(), torch.zeros(_EXTRA_IDS, dtype=torch.bool)])
        assert torch.equal(torch.isfinite(logits[row]), allowed)
        assert torch.equal(logits[row][allowed], orig[row][allowed])
    # After "12" the digits continue or the output stops.
    assert torch.isfinite(logits[3, tok.id_of("eot_token")])


def test_compile_is_cached(tok):
    spec = ConstraintSpec("json_schema", SCHEMAS["nested"])
    assert compile_constraint(spec, tok) is compile_constraint(ConstraintSpec("json_schema", SCHEMAS["nested"]), tok)
    assert compile_constraint(spec, tok) is not compile_constraint(ConstraintSpec("json_schema", SCHEMAS["nested"],
                                                                                  strict=True), tok)


# ─── errors ──────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("spec, match", [
    (ConstraintSpec("json_schema", {"type": "foo"}), "foo"),
    (ConstraintSpec("json_schema", "{not json"), "not valid JSON"),
    (ConstraintSpec("json_schema", {"type": "string", "format": "weird"}, strict=True), "weird"),
    (ConstraintSpec("json_schema", {"$ref": "#/$defs/missing"}), "missing"),
    (ConstraintSpec("regex", "a(b"), "unclosed group"),
    (ConstraintSpec("lark", "start: undefined_rule"), "undefined_rule"),
    (ConstraintSpec("tool_call", {"tools": TOOLS, "tool_choice": {"type": "function",
                                                                  "function": {"name": "nope"}}}),
     "unknown tool 'nope'"),
    (ConstraintSpec("tool_call", {"tools": [], "tool_choice": "required"}), "non-empty list of tools"),
    (ConstraintSpec("tool_call", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "matrix"}}}}}],
        "tool_choice": "required"}), "unknown type 'matrix'"),
])
def test_bad_specs_raise_value_error(tok, spec, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        compile_constraint(spec, tok)


def test_spec_validation_and_openai_mapping():
    with pytest.raises(ValueError, match="kind"):
        ConstraintSpec("xml", "")
    assert spec_from_openai() is None
    assert spec_from_openai(response_format={"type": "text"}) is None
    assert spec_from_openai(response_format={"type": "json_object"}).kind == "json_object"
    s = spec_from_openai(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                                  "schema": {"type": "object"}}})
    assert s.kind == "json_schema" and s.strict
    s = spec_from_openai(response_format={"type": "json_object"}, tools=TOOLS, tool_choice="required")
    assert s.kind == "tool_call"  # a forced call wins over response_format
    assert spec_from_openai(tools=TOOLS, tool_choice="auto") is None
    with pytest.raises(ValueError, match="tool_choice"):
        spec_from_openai(tools=TOOLS, tool_choice="always")
    with pytest.raises(ValueError, match="needs a non-empty"):
        spec_from_openai(tool_choice="required")
    with pytest.raises(ValueError, match="response_format.type"):
        spec_from_openai(response_format={"type": "yaml"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_apply_masks_on_cuda_matches_cpu(tok):
    """Masks are computed on the CPU and expanded on the device: same result as the CPU path, any dtype."""
    g = compile_constraint(ConstraintSpec("json_schema", SCHEMAS["nested"]), tok)
    states = [g.new_state(), None, g.new_state()]
    states[2].advance_many(tok.encode('{"user": {"name": "'))
    for dtype in (torch.float32, torch.bfloat16):
        cpu = torch.randn(3, tok.vocab_size + _EXTRA_IDS).to(dtype)
        gpu = cpu.cuda()
        apply_masks(cpu, states)
        apply_masks(gpu, states)
        assert torch.equal(gpu.cpu(), cpu)
