"""Gemma 4 wire values: encoding as the template writes it, decoding with repairs, round trips."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unigemma.inputs.wire import (
    FORMAT_TOKENS, QUOTE, STOP_STRINGS, WireParseError, encode_wire_value, format_tool_call,
    format_tool_response, parse_wire_arguments, parse_wire_value,
)

Q = QUOTE


def _no_tokens(s: str) -> bool:
    return not any(t in s for t in FORMAT_TOKENS)


# Text that a tokenizer could carry as plain text: anything but the format-token strings. The alphabet leans
# on the characters that matter to the format so the interesting cases come up often.
_text = st.text(alphabet=st.one_of(st.sampled_from('<|>"{}[]:,= \n\'\\abcxyzé🙂'), st.characters()),
                max_size=12).filter(_no_tokens)
_keys = _text
_scalars = st.one_of(st.none(), st.booleans(), st.integers(),
                     st.floats(allow_nan=False), _text)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=12,
)
json_objects = st.dictionaries(_keys, json_values, max_size=5)


def test_spec_example_call():
    args = {"city": "Paris", "days": 2, "flag": True, "x": None, "l": [1, 2.5, "s"], "o": {"B": 1, "a": "q"}}
    assert format_tool_call("get_weather", args) == (
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2,flag:true,l:[1,2.5,<|"|>s<|"|>],'
        'o:{a:<|"|>q<|"|>,B:1},x:null}<tool_call|>')


def test_scalar_encodings():
    assert encode_wire_value(10**21) == "1000000000000000000000"
    assert encode_wire_value(1.0) == "1.0"
    assert encode_wire_value(1e-05) == "1e-05"
    assert encode_wire_value(float("inf")) == "inf"
    assert encode_wire_value(False) == "false"
    assert encode_wire_value('say "hi", {ok}\n') == Q + 'say "hi", {ok}\n' + Q
    assert encode_wire_value({"k": [1]}, escape_keys=True) == "{" + Q + "k" + Q + ":[1]}"


def test_unsafe_keys_are_quoted_and_survive():
    value = {"a b": 1, "x:y": 2, "": 3, " pad": 4, "ok": 5}
    text = encode_wire_value(value)
    assert "ok:5" in text and Q + "x:y" + Q + ":2" in text and "a b:1" in text
    assert parse_wire_value(text) == value


def test_encoder_rejects_non_json():
    with pytest.raises(ValueError, match="set"):
        encode_wire_value({1, 2})
    with pytest.raises(ValueError, match="str keys"):
        encode_wire_value({1: "a"})
    with pytest.raises(ValueError, match="tool name"):
        format_tool_call("bad{name", {})
    with pytest.raises(ValueError, match="dict"):
        format_tool_call("f", [1])


def test_tool_response_format():
    assert format_tool_response("w", "-3C") == '<|tool_response>response:w{value:<|"|>-3C<|"|>}<tool_response|>'
    assert format_tool_response("w", {"t": 1}) == "<|tool_response>response:w{t:1}<tool_response|>"
    assert format_tool_response("w", 5) == "<|tool_response>response:w{value:5}<tool_response|>"


def test_stop_strings():
    assert STOP_STRINGS == ("<turn|>", "<|tool_response>", "<eos>")


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_round_trip_any_value(value):
    warnings = []
    assert parse_wire_value(encode_wire_value(value), warnings) == value
    assert warnings == []


@settings(max_examples=100, deadline=None)
@given(st.floats(allow_nan=False))
def test_floats_round_trip_exactly(x):
    back = parse_wire_value(encode_wire_value(x))
    assert type(back) is float and back == x and math.copysign(1, back) == math.copysign(1, x)


def test_nan_round_trips_as_nan():
    assert math.isnan(parse_wire_value(encode_wire_value(float("nan"))))


# --- interior quote tokens ------------------------------------------------------------------------------------

@pytest.mark.parametrize("inner, warned", [
    ('x = {' + Q + 'key' + Q + ': ' + Q + 'v' + Q + '}', True),              # a dict literal in code
    ('def f():\n    ' + Q * 3 + 'doc' + Q * 3 + '\n    pass', False),        # triple quotes
    ('f(' + Q + 'x' + Q + ', y=2)', True),                                   # quote then comma
    ('a' + Q + ']', True),                                                   # quote then bracket
    ('print(' + Q + 'hi' + Q + ')', False),
])
def test_interior_quote_tokens(inner, warned):
    # read right; where a quote token sits next to structure, a lost quote would read the same: a warning says so
    text = "{code:" + Q + inner + Q + ",n:1}"
    warnings = []
    assert parse_wire_value(text, warnings) == {"code": inner, "n": 1}
    assert [w.split(" (")[0] for w in warnings] == (["string holds quote tokens next to ',:{}[]'"] if warned else [])


def test_first_plausible_close_wins_when_the_rest_fits():
    assert parse_wire_value("[" + Q + "a" + Q + "," + Q + "b" + Q + "]") == ["a", "b"]


# --- repairs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected, fragment", [
    ("{a:'x'}", {"a": "x"}, "single-quoted string"),
    ("{'a':1}", {"a": 1}, "single-quoted key"),
    ('{a:"y\\n"}', {"a": "y\n"}, "JSON double-quoted string"),
    ('{"a": 1}', {"a": 1}, "written as JSON"),
    ("{city:Oslo}", {"city": "Oslo"}, "unquoted string"),
    ("{q:hello world}", {"q": "hello world"}, "unquoted string"),
    ("{a=1}", {"a": 1}, "key=value"),
    ("{a:1 b:2}", {"a": 1, "b": 2}, "missing comma between object members"),
    ("{a:" + Q + "x" + Q + "b:" + Q + "y" + Q + "}", {"a": "x", "b": "y"}, "missing comma between object"),
    ("[1 2]", [1, 2], "missing comma between array items"),
    ("[" + Q + "a" + Q + "{b:1}]", ["a", {"b": 1}], "missing comma between array items"),
    ("{a:1", {"a": 1}, "missing '}'"),
    ("{a:[1,2", {"a": [1, 2]}, "missing ']'"),
    ("{a:1,}", {"a": 1}, "trailing comma"),
    ("{a:True,b:None}", {"a": True, "b": None}, "Python literal"),
    ("{a:1,a:2}", {"a": 1}, "duplicate key"),     # the first: it may have been streamed already
])
def test_each_repair_is_recorded(text, expected, fragment):
    warnings = []
    assert parse_wire_value(text, warnings) == expected
    assert warnings and any(fragment in w for w in warnings), warnings


def test_full_json_object_is_read():
    warnings = []
    assert parse_wire_value('{"a": "b", "c": [1, 2.5e3, null, true]}', warnings) == \
        {"a": "b", "c": [1, 2500.0, None, True]}
    assert warnings


@pytest.mark.parametrize("text", ["{a:}", "{a", "{,}", "{a:1}}", "", "[1,,2]"])
def test_unrepairable_raises(text):
    with pytest.raises(WireParseError):
        parse_wire_value(text)


def test_error_names_position():
    with pytest.raises(WireParseError) as err:
        parse_wire_value("{a:1}}")
    assert err.value.position == 5 and "offset 5" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_arguments_tolerate_trailing_text():
    warnings = []
    assert parse_wire_arguments("{a:1} oops", warnings) == {"a": 1}
    assert any("ignored text" in w for w in warnings)
    with pytest.raises(WireParseError):
        parse_wire_arguments("[1]")


@settings(max_examples=150, deadline=None)
@given(json_objects)
def test_json_dialect_of_the_same_object_is_read_back(obj):
    # A model that writes plain JSON instead of the wire format is repaired to the same value. (Floats are
    # excluded from equality only in their JSON spelling: json writes repr too, so they match.)
    import json
    if any(isinstance(v, float) and math.isinf(v) for v in _leaves(obj)):
        return  # JSON has no spelling for infinities
    if any(not _json_string_ok(s) for s in _strings(obj)):
        return
    assert parse_wire_value(json.dumps(obj)) == obj


def _leaves(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _leaves(x)
    elif isinstance(v, list):
        for x in v:
            yield from _leaves(x)
    else:
        yield v


def _strings(v):
    if isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)
    elif isinstance(v, str):
        yield v


def _json_string_ok(s: str) -> bool:
    # lone surrogates do not survive json.dumps → loads unchanged in every case; keep the property about syntax
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
