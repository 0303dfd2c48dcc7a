"""Tool calls from real model output (issue 16): never a silently wrong call; recover what other runtimes recover.

Each example of the issue is parsed in one piece and streamed in 1-, 3- and 7-character pieces and in the demo
tokenizer's tokens; every way must give the same calls and warnings. Then a property test: random arguments
rendered by the chat template, broken in the ways the issue lists, must parse back to the same calls or come
with a warning.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unigemma.inputs.template import ChatTemplate
from unigemma.inputs.tokenizer import Tokenizer
from unigemma.inputs.wire import FORMAT_TOKENS, QUOTE
from unigemma.outputs.detokenize import IncrementalDetokenizer
from unigemma.outputs.parser import (
    ParseWarning, ResponseParser, ToolCallArgsDelta, ToolCallEnd, ToolCallStart, collect,
)

Q = QUOTE
DEMO = Path(__file__).resolve().parents[1] / "unigemma" / "demo" / "model"


def tool(name, **props):
    """An OpenAI tool whose parameters have the given JSON Schema types ("string", "number", ...)."""
    properties = {k: ({"type": v} if isinstance(v, str) else v) for k, v in props.items()}
    return {"type": "function", "function": {"name": name, "description": "",
                                             "parameters": {"type": "object", "properties": properties}}}


TOOLS = [
    tool("glob", pattern="string"),
    tool("search", query={"type": "array", "items": {"type": "string"}}),
    tool("example", first="string", second="string"),
    tool("grep", include="string", output_mode="string", path="string", pattern="string"),
    tool("web_search", query="string", limit="integer"),
    tool("bash", command="string"),
    tool("get_weather", city="string"),
    tool("calc", left="number", right="number", op="string"),
    tool("configure", settings="object"),
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(DEMO)


def token_pieces(tok, text):
    """The text deltas a server sees for `text`: tokenized, then detokenized one token at a time."""
    det = IncrementalDetokenizer(tok, skip_special_tokens=False)
    pieces = [det.add(i) for i in tok.encode(text, add_bos=False)] + [det.finish()]
    assert "".join(pieces) == text
    return pieces


def parse(pieces, tools):
    p = ResponseParser("content", seed=0, tools=tools)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    return events + p.finish()


def summary(events):
    """What a client ends with: content, the calls (name, arguments; streamed JSON checked) and warnings."""
    r = collect(events)
    calls = []
    for c in r.tool_calls:
        calls.append((c["function"]["name"], json.loads(c["function"]["arguments"])))
    ends = {e.index: e.arguments for e in events if isinstance(e, ToolCallEnd)}
    for e in events:   # what was streamed for a call is exactly the JSON of its final arguments
        if isinstance(e, ToolCallStart) and ends.get(e.index) is not None:
            streamed = "".join(d.json_text for d in events if isinstance(d, ToolCallArgsDelta) and d.index == e.index)
            assert streamed == json.dumps(ends[e.index], ensure_ascii=False)
    return r.content, calls, [w.message for w in r.warnings]


def all_ways(tok, text, tools):
    """The summary of `text` parsed whole; asserts that every chunking gives the same."""
    whole = summary(parse([text], tools))
    for n in (1, 3, 7):
        assert summary(parse([text[i:i + n] for i in range(0, len(text), n)], tools)) == whole, n
    assert summary(parse(token_pieces(tok, text), tools)) == whole, "tokens"
    return whole


REGEX_CALL = (f"call:grep{{include:{Q}*.py{Q},output_mode:{Q}content{Q},path:{Q}/data/robotics/experiment1{Q},"
              f"pattern:':\\s*\\w+'{Q}}}")

# (id, model output, expected calls, a fragment every warning list must hold (None: no warnings))
EXAMPLES = [
    ("two calls in one block",
     f"<|tool_call>call:glob{{pattern:{Q}README*.md{Q}}}call:glob{{pattern:{Q}CONTRIBUTING.md{Q}}}<tool_call|>",
     [("glob", {"pattern": "README*.md"}), ("glob", {"pattern": "CONTRIBUTING.md"})], "in the same <|tool_call>"),
    ("array item missing its opening quote",
     f"<|tool_call>call:search{{query:[{Q}a{Q},b{Q}]}}<tool_call|>",
     [("search", {"query": ["a", "b"]})], "has no opening"),
    ("string not closed before the next member",
     f"<|tool_call>call:example{{first:{Q}one,second:{Q}two{Q}}}<tool_call|>",
     [("example", {"first": "one", "second": "two"})], "string not closed"),
    ("single-quoted regex with a stray quote token (ollama #15315)",
     f"<|tool_call>{REGEX_CALL}<tool_call|>",
     [("grep", {"include": "*.py", "output_mode": "content", "path": "/data/robotics/experiment1",
                "pattern": r":\s*\w+"})], "single-quoted"),
    ("second call of another tool in the same block",
     f"<|tool_call>call:get_weather{{city:{Q}Oslo{Q}}}call:calc{{left:1,right:2}}<tool_call|>",
     [("get_weather", {"city": "Oslo"}), ("calc", {"left": 1, "right": 2})], "in the same <|tool_call>"),
    ("value missing its opening quote",
     f"<|tool_call>call:web_search{{query:weather in Tokyo{Q}}}<tool_call|>",
     [("web_search", {"query": "weather in Tokyo"})], "has no opening"),
    ("value with a comma missing its opening quote",
     f"<|tool_call>call:web_search{{query:Paris, France{Q},limit:5}}<tool_call|>",
     [("web_search", {"query": "Paris, France", "limit": 5})], "has no opening"),
    ("string never closed before }",
     f"<|tool_call>call:bash{{command:{Q}ls}}<tool_call|>",
     [("bash", {"command": "ls"})], "string not closed"),
    ("string never closed before <tool_call|>",
     f"<|tool_call>call:get_weather{{city:{Q}Beijing<tool_call|>",
     [("get_weather", {"city": "Beijing"})], "string not closed"),
    ("number written 108.",
     f"<|tool_call>call:calc{{left:108.,op:{Q}+{Q},right:2}}<tool_call|>",
     [("calc", {"left": 108.0, "op": "+", "right": 2})], "'108.' read as 108.0"),
    ("strings holding every delimiter (canonical: no warning)",
     f"<|tool_call>call:bash{{command:{Q}echo \"a, b\" {{c}} [d]: 'e' \\n\\\\ é 🙂\nnext{Q}}}<tool_call|>",
     [("bash", {"command": "echo \"a, b\" {c} [d]: 'e' \\n\\\\ é 🙂\nnext"})], None),
    ("arrays of strings with delimiters (canonical: no warning)",
     f"<|tool_call>call:search{{query:[{Q}x,y{Q},{Q}}}{Q},{Q}a:{Q}]}}<tool_call|>",
     [("search", {"query": ["x,y", "}", "a:"]})], None),
    ("nested objects and arrays (canonical: no warning)",
     f"<|tool_call>call:configure{{settings:{{flag:true,list:[1,2.5,{{deep:[{Q}x{Q},null]}}],name:{Q}a{{b}}{Q},"
     f"sub:{{}}}}}}<tool_call|>",
     [("configure", {"settings": {"flag": True, "list": [1, 2.5, {"deep": ["x", None]}], "name": "a{b}",
                                  "sub": {}}})], None),
]


@pytest.mark.parametrize("with_tools", [True, False], ids=["schemas", "no-schemas"])
@pytest.mark.parametrize("name, text, calls, fragment", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_issue_examples(tok, name, text, calls, fragment, with_tools):
    content, got, warnings = all_ways(tok, text, TOOLS if with_tools else None)
    assert got == calls
    assert content == ""
    if fragment is None:
        assert warnings == []
    else:
        assert any(fragment in w for w in warnings), warnings


def test_schema_converts_declared_types_with_a_warning(tok):
    text = f"<|tool_call>call:web_search{{query:42,limit:{Q}5{Q}}}<tool_call|>"
    content, calls, warnings = all_ways(tok, text, TOOLS)
    assert calls == [("web_search", {"query": "42", "limit": 5})]
    assert sum("converted to" in w for w in warnings) == 2
    # without schemas the values stay as written
    assert all_ways(tok, text, None)[1] == [("web_search", {"query": 42, "limit": "5"})]


# --- design points ------------------------------------------------------------------------------------------------

def test_undeclared_tool_is_dropped_with_a_warning(tok):
    # With `tools` given, a call to a function not among them never reaches the client as a call, nor as content
    # (markup in content would be fed back as control tokens); the warning carries the raw text.
    for text in ("<|tool_call>garbage{x:1}<tool_call|>", "<|tool_call>call:garbage{x:1}<tool_call|>",
                 '<|tool_call>{"name": "garbage", "arguments": {"x": 1}}<tool_call|>'):
        events = parse([text], TOOLS)
        content, calls, warnings = all_ways(tok, text, TOOLS)
        assert (content, calls) == ("", [])
        dropped = [e for e in events if isinstance(e, ParseWarning) and "not among the request's tools" in e.message]
        assert dropped and dropped[0].raw == text.replace("<tool_call|>", "")
        assert not any(isinstance(e, ToolCallStart) for e in events)   # nothing was streamed for it
    # a second call in a block is held to the same rule
    text = f"<|tool_call>call:bash{{command:{Q}ls{Q}}}call:rm_rf{{path:{Q}/{Q}}}<tool_call|>"
    content, calls, warnings = all_ways(tok, text, TOOLS)
    assert calls == [("bash", {"command": "ls"})]
    assert any("'rm_rf', which is not among the request's tools" in w for w in warnings)
    # and a declared call after an undeclared one in the same block is kept
    text = f"<|tool_call>call:rm_rf{{path:{Q}/{Q}}}call:bash{{command:{Q}ls{Q}}}<tool_call|>"
    content, calls, warnings = all_ways(tok, text, TOOLS)
    assert calls == [("bash", {"command": "ls"})]
    assert any("'rm_rf', which is not among the request's tools" in w for w in warnings)


def test_namespaced_name_maps_to_the_declared_tool(tok):
    content, calls, warnings = all_ways(tok, "<|tool_call>call:functions.calc{left:1}<tool_call|>", TOOLS)
    assert calls == [("calc", {"left": 1})] and any("read as the declared 'calc'" in w for w in warnings)


def test_without_tools_any_well_formed_name_is_a_call(tok):
    assert all_ways(tok, "<|tool_call>call:garbage{x:1}<tool_call|>", None)[1] == [("garbage", {"x": 1})]


@pytest.mark.parametrize("text", [
    "<|tool_call>call:calc{left:",                                  # truncated mid-call
    "<|tool_call>call:calc{left:}<tool_call|>",                     # no value
    "<|tool_call>call:calc{left:1}}}<tool_call|>",                  # structure that cannot be read
    "<|tool_call>call:calc(left=1)<tool_call|>",                    # not the format at all
])
def test_unreadable_calls_are_dropped_with_their_raw_text(tok, text):
    content, calls, warnings = all_ways(tok, text, TOOLS)
    events = parse([text], TOOLS)
    raws = [e.raw for e in events if isinstance(e, ParseWarning)]
    assert text.replace("<tool_call|>", "") in raws or calls
    if not calls:
        assert content == "" and warnings
        for start in (e for e in events if isinstance(e, ToolCallStart)):
            assert ToolCallEnd(start.index, None) in events    # a started call is ended as failed


def test_content_around_calls_is_kept(tok):
    text = f"Checking both.<|tool_call>call:bash{{command:{Q}ls}}<tool_call|><|tool_response>"
    content, calls, warnings = all_ways(tok, text, TOOLS)
    assert content == "Checking both." and calls == [("bash", {"command": "ls"})]


def test_arguments_stream_early_only_where_no_later_text_can_change_them():
    p = ResponseParser(seed=0, tools=TOOLS)
    events = p.feed(f"<|tool_call>call:example{{first:{Q}one")
    assert "".join(e.json_text for e in events if isinstance(e, ToolCallArgsDelta)) == '{"first": "one'
    # a comma may end a string that was never closed: nothing more until the call is read
    assert not [e for e in p.feed(f",second:{Q}two") if isinstance(e, ToolCallArgsDelta)]
    events = p.feed(f"{Q}}}<tool_call|>")
    assert [e for e in events if isinstance(e, ToolCallEnd)] == [ToolCallEnd(0, {"first": "one", "second": "two"})]
    # a value the schema does not declare a string is never streamed early (it may be converted)
    p = ResponseParser(seed=0, tools=TOOLS)
    events = p.feed(f"<|tool_call>call:calc{{left:{Q}12")
    assert "".join(e.json_text for e in events if isinstance(e, ToolCallArgsDelta)) == "{"


def test_canonical_text_is_read_as_written_even_with_quote_tokens_inside():
    # interior quote tokens (code) that pair up: read as written. Where one sits next to `,:{}[]`, a lost quote
    # would give the same text, so a warning says the string was read whole.
    for code, warned in ((f"x = {{{Q}key{Q}: {Q}v{Q}}}", True), (f"print({Q}hi{Q})", False)):
        text = f"<|tool_call>call:bash{{command:{Q}{code}{Q}}}<tool_call|>"
        r = collect(parse([text], TOOLS))
        assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {"command": code}
        assert [("quote tokens next to" in w.message) for w in r.warnings] == ([True] if warned else [])


# --- property: rendered by the chat template, then broken ------------------------------------------------------

_text = st.text(alphabet=st.one_of(st.sampled_from('<|>"{}[]:,= \n\'\\abé🙂'), st.characters(codec="utf-8")),
                max_size=8).filter(lambda s: not any(t in s for t in FORMAT_TOKENS))
_keys = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=False, allow_infinity=False, width=32), _text, st.just([]), st.just({}))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, min_size=1, max_size=3),
                                                         st.dictionaries(_keys, inner, min_size=1, max_size=3)),
                       max_leaves=8)
_args = st.dictionaries(_keys, _values, min_size=1, max_size=4)
_names = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)

_TEMPLATE = ChatTemplate.bundled()


def _rendered(calls):
    """The call blocks the chat template writes for an assistant message with these calls."""
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
                for i, (n, a) in enumerate(calls)]}]
    text = _TEMPLATE.render(msgs, add_generation_prompt=False)
    return text[text.index("<|tool_call>"):text.rindex("<tool_call|>") + len("<tool_call|>")]


def _schema_type(v):
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}[type(v)]


def _tools_for(calls):
    out = {}
    for name, args in calls:
        out[name] = tool(name, **{k: _schema_type(v) for k, v in args.items()})
    return list(out.values())


BREAKS = ["none", "one_block", "drop_open_quote", "drop_close_quote", "truncate", "number_dot"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.lists(st.tuples(_names, _args), min_size=1, max_size=2, unique_by=lambda c: c[0]),
       st.sampled_from(BREAKS),
       st.booleans())
def test_broken_calls_are_recovered_or_warned(data, calls, how, with_schemas):
    text = _rendered(calls)
    if how == "one_block":
        text = text.replace("<tool_call|><|tool_call>", "")
    elif how in ("drop_open_quote", "drop_close_quote"):
        quotes = [i for i in range(len(text)) if text.startswith(Q, i)]
        # strings hold no quote tokens here, so the quotes alternate: opener, closer, opener, ...
        picks = quotes[0::2] if how == "drop_open_quote" else quotes[1::2]
        if picks:
            i = data.draw(st.sampled_from(picks))
            text = text[:i] + text[i + len(Q):]
    elif how == "truncate":
        text = text[:data.draw(st.integers(len("<|tool_call>call:"), len(text) - 1))]
    elif how == "number_dot":
        text = text.replace(".0,", ".,").replace(".0}", ".}").replace(".0]", ".]")
    tools = _tools_for(calls) if with_schemas else None
    whole = summary(parse([text], tools))
    for n in (1, 3, 7):
        assert summary(parse([text[i:i + n] for i in range(0, len(text), n)], tools)) == whole
    content, got, warnings = whole
    rest = text[text.rfind("<tool_call|>") + len("<tool_call|>"):] if "<tool_call|>" in text else None
    if how == "truncate" and rest is not None and "<|tool_call>".startswith(rest):
        # cut between two blocks (maybe inside the next opener, which is then text): nothing says more was to come
        calls = calls[:text.count("<tool_call|>")]
        content = content[len(rest):] if content == rest else content
    if how in ("none", "number_dot"):
        assert got == list(calls)            # canonical text, and `N.` for N.0, are always read back
    if got != list(calls) or content:
        assert warnings, (text, got)           # never different calls without a warning
    if how == "none":
        assert warnings == []


# --- the HTTP API: warnings reach the response (a field OpenAI clients ignore) and the log ---------------------

class _Handle:
    cached_tokens = 0

    def cancel(self):
        pass


def _service(pieces):
    """A Service whose engine 'generates' `pieces` (text deltas; the last one finishes with a stop string)."""
    from unigemma.server.service import Observer, Service, ServerSettings, StepOutput

    svc = object.__new__(Service)
    svc.settings, svc.observer = ServerSettings(model_name="m"), Observer()
    svc.chat_handles = lambda req, prep: [_Handle()]

    async def steps(h):
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            yield StepOutput(k, piece, finished=last, finish_reason="stop" if last else None)

    svc._steps = steps
    return svc


def _request(stream):
    from unigemma.server.protocol import ChatCompletionRequest
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}], tools=TOOLS, stream=stream)


def _prepared():
    from unigemma.server.service import Prepared
    return Prepared("", [1], {}, 0, "content", [t["function"]["name"] for t in TOOLS], tools=TOOLS)


SERVED = (f"<|tool_call>call:get_weather{{city:{Q}Beijing<tool_call|>"
          f"<|tool_call>call:garbage{{x:1}}<tool_call|><|tool_response>")


def test_http_response_carries_parser_warnings_and_logs_them(caplog):
    import asyncio
    svc = _service([SERVED[i:i + 5] for i in range(0, len(SERVED), 5)])
    with caplog.at_level("WARNING", logger="unigemma.server"):
        out = asyncio.run(svc.chat(_request(False), _prepared()))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]] \
        == [("get_weather", {"city": "Beijing"})]
    messages = [w["message"] for w in choice["warnings"]]
    assert any("string not closed" in m for m in messages)
    dropped = [w for w in choice["warnings"] if "'garbage', which is not among the request's tools" in w["message"]]
    assert dropped and dropped[0]["raw"] == "<|tool_call>call:garbage{x:1}"
    assert any("garbage" in r.getMessage() and out["id"] in r.getMessage() for r in caplog.records)


def test_http_stream_carries_parser_warnings_on_the_last_chunk():
    import asyncio

    async def collect_chunks():
        svc = _service([SERVED[i:i + 3] for i in range(0, len(SERVED), 3)])
        return [c async for c in svc.chat_stream(_request(True), _prepared())]

    chunks = asyncio.run(collect_chunks())
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    assert any("not among the request's tools" in w["message"] for w in last["warnings"])
    assert not any("warnings" in c["choices"][0] for c in chunks[:-1])
    args = "".join(tc["function"]["arguments"] for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", []))
    assert json.loads(args) == {"city": "Beijing"}
