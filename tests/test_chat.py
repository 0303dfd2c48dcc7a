"""llm.generate / llm.chat end to end on a tiny random model through the real engine: constrained outputs always
parse and validate (JSON schemas, forced tool calls), also with speculative drafts; streaming equals non-streaming.

Numbers in these schemas are bounded: a random model happily writes digits forever inside an unbounded number
(which the grammar allows), so it would stop at max_tokens instead; bounded values end, as real answers do."""

import json

import jsonschema
import pytest

import unigemma
from tinyllm import make_tiny_checkpoint

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer",
     "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
     "sizes": {"type": "array", "items": {"type": "number", "minimum": -5, "maximum": 5}, "minItems": 1,
               "maxItems": 3}}, "required": ["colour", "sizes"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "pattern": "^[a-z]{1,5}$"},
     "inner": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 999}}, "required": ["x"],
               "additionalProperties": False}}, "required": ["ok", "inner"], "additionalProperties": False},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
             "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "number", "minimum": 0, "maximum": 9}}, "required": ["a", "b"]}}}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return unigemma.load(make_tiny_checkpoint(tmp_path_factory.mktemp("chat"), seed=3), device="cpu",
                         dtype="float32")


def test_generate_text_and_stream(llm):
    r = llm.generate("Hello", max_tokens=12, temperature=0)
    assert r.finish_reason in ("stop", "length") and len(r.token_ids) >= 1
    chunks = list(llm.generate("Hello", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.text for c in chunks) == r.text
    assert [t for c in chunks for t in c.token_ids] == r.token_ids


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm, i, temperature):
    rf = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}
    for seed in range(2):
        r = llm.chat([{"role": "user", "content": "Give JSON."}], response_format=rf, max_tokens=200,
                     temperature=temperature, seed=seed)
        assert r.finish_reason == "stop", r
        jsonschema.validate(json.loads(r.content), SCHEMAS[i])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_parse_and_validate(llm, choice):
    for seed in range(3):
        r = llm.chat([{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS, tool_choice=choice,
                     max_tokens=150, temperature=1.0, seed=seed)
        assert r.tool_calls and r.finish_reason == "tool_calls", r
        for call in r.tool_calls:
            fn = call["function"]
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == fn["name"])
            jsonschema.validate(json.loads(fn["arguments"]), schema)
            if isinstance(choice, dict):
                assert fn["name"] == "add"
        assert "<|" not in r.content and "|>" not in r.content


def test_constraints_with_prompt_lookup_drafts(llm):
    """Speculative drafts are checked against the grammar: the output is the same as without speculation."""
    from unigemma.engine.generate import Engine
    from unigemma.engine.scheduler import Request
    from unigemma.engine.constraints import ConstraintSpec, compile_constraint

    grammar = compile_constraint(ConstraintSpec("json_schema", SCHEMAS[1]), llm.tokenizer)
    prompt = llm.build_prompt([{"role": "user", "content": 'repeat {"colour": "red", "sizes": [1, 2]} '
                                                           '{"colour": "red", "sizes": [1, 2]}'}]).input_ids
    outs = {}
    for spec in ("lookup", None):
        eng = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, max_slots=2, max_model_len=512, speculative=spec)
        params = unigemma.engine.generate.sampling_params(llm, max_tokens=80, temperature=0)
        req = Request(list(prompt), params, constraint=grammar)
        evs = list(eng.generate_stream(req))
        outs[spec] = [e.token_id for e in evs]
        text = "".join(e.text for e in evs)
        jsonschema.validate(json.loads(text), SCHEMAS[1])
    assert outs["lookup"] == outs[None]


def test_chat_stream_equals_whole(llm):
    msgs = [{"role": "user", "content": "Hi"}]
    whole = llm.chat(msgs, max_tokens=16, temperature=0)
    parts = list(llm.chat(msgs, max_tokens=16, temperature=0, stream=True))
    assert "".join(p.content for p in parts) == whole.content
    assert parts[-1].finish_reason == whole.finish_reason
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def bounded(schema):
    """The same schema with every unbounded part bounded (string lengths, number ranges, array lengths, extra
    properties). A random model has no reason to stop a number or a string; bounded, every output terminates."""
    if isinstance(schema, list):
        return [bounded(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (bounded(v) if k in ("items", "anyOf", "oneOf", "allOf", "additionalProperties") else v)
           for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: bounded(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if "$defs" in out:
        out["$defs"] = {k: bounded(v) for k, v in out["$defs"].items()}
    types = out.get("type")
    types = types if isinstance(types, list) else [types]
    free = not any(k in out for k in ("enum", "const", "pattern", "format"))
    if "string" in types and free:
        out.setdefault("maxLength", 6)
    if ("integer" in types or "number" in types) and free:
        out.setdefault("minimum", -100)
        out.setdefault("maximum", 100)
    if "array" in types:
        out.setdefault("maxItems", 3)
    if out.get("additionalProperties") not in (None, False):
        out.setdefault("maxProperties", 3)
    return out


def test_twenty_plus_schemas_through_the_engine(llm):
    """Every schema of the constraint suite (bounded, see `bounded`), generated by the tiny random model through
    llm.chat with grammar masks: 100% finish, parse and validate against the original schema."""
    from test_constraints import SCHEMAS as ALL

    assert len(ALL) >= 20
    for name, schema in ALL.items():
        b = bounded(schema)
        rf = {"type": "json_schema", "json_schema": {"name": name, "schema": b, "strict": True}}
        for temperature in (0.0, 1.0):
            r = llm.chat([{"role": "user", "content": f"JSON for {name}"}], response_format=rf, max_tokens=400,
                         temperature=temperature, seed=1)
            assert r.finish_reason == "stop", (name, r.content[:200])
            value = json.loads(r.content)
            jsonschema.validate(value, b)
            jsonschema.validate(value, schema)
