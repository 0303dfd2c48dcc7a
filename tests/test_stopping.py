"""Tests for unigemma.engine.stopping: stop strings across deltas, overlaps, token stops, length limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unigemma.engine.sampling import SamplingParams
from unigemma.engine.stopping import StopChecker, StopStringMatcher

GEMMA_EOS = {1, 106, 50}


def run(checker: StopChecker, deltas, token_ids=None):
    """Feed deltas (token ids default to 1000+i) until finished; returns (emitted text, last result)."""
    out, res = [], None
    for i, d in enumerate(deltas):
        res = checker.step(token_ids[i] if token_ids else 1000 + i, d)
        out.append(res.text)
        if res.finished:
            break
    return "".join(out), res


def test_stop_string_split_across_tokens_never_leaks():
    c = StopChecker(stop=["END"])
    r1 = c.step(7, "Hello E")
    assert r1.text == "Hello " and not r1.finished  # "E" held back: it may begin "END"
    r2 = c.step(8, "ND and more")
    assert r2.text == "" and r2.finished and r2.finish_reason == "stop" and r2.stop_reason == "END"
    assert c.step(9, "x").text == ""  # finished: nothing more


def test_held_back_prefix_is_released_when_it_does_not_match():
    text, res = run(StopChecker(stop=["END"], max_tokens=10), ["ab E", "N", "x", "yz"])
    assert text == "ab ENxyz" and not res.finished
    c = StopChecker(stop=["END"], max_tokens=2)
    assert c.step(1, "E").text == ""
    r = c.step(2, "N")  # length limit: held text is flushed, not lost
    assert r.finished and r.finish_reason == "length" and r.text == "EN"


def test_stop_at_very_first_token():
    text, res = run(StopChecker(stop=["<stop>"]), ["<stop>tail"])
    assert text == "" and res.finish_reason == "stop" and res.stop_reason == "<stop>"


@pytest.mark.parametrize("stops,deltas,text,matched", [
    (["abc", "b"], ["abc"], "a", "b"),              # "b" completes first
    (["abc", "b"], ["a", "b", "c"], "a", "b"),
    (["ab", "abc"], ["xabc"], "x", "ab"),           # same start, the shorter completes first
    (["bcd", "abcx"], ["abcd"], "a", "bcd"),
    (["abcx", "bcd"], ["ab", "cx"], "", "abcx"),    # abcx completes at 4, bcd never
    (["aa"], ["a", "a", "a"], "", "aa"),
    (["xyz"], ["xxy", "z!"], "x", "xyz"),           # the held tail is "xy", not the first x
])
def test_overlapping_stop_strings(stops, deltas, text, matched):
    got, res = run(StopChecker(stop=stops), deltas)
    assert (got, res.stop_reason) == (text, matched)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abcE ND", max_size=30),
       stops=st.lists(st.text(alphabet="abcEND", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_result_independent_of_chunking(text, stops, cuts):
    """Any split of the same text gives the same output as char-by-char streaming, and no stop text leaks."""
    def stream(pieces):
        m = StopStringMatcher(stops)
        out, matched = [], None
        for p in pieces:
            t, matched = m.feed(p)
            out.append(t)
            if matched:
                break
        if not matched:
            out.append(m.flush())
        return "".join(out), matched

    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert stream(pieces) == stream(list(text))
    out, matched = stream(pieces)
    if matched is None:
        assert out == text and not any(s in text for s in stops)
    else:
        assert text.startswith(out) and text[len(out):].startswith(matched)
        # nothing before the cut contains a complete stop string
        assert not any(s in out for s in stops)


def test_include_stop_str_in_output():
    m = StopStringMatcher(["END"], include_stop_str_in_output=True)
    assert m.feed("aE") == ("a", None)
    assert m.feed("NDb") == ("END", "END")


def test_eos_and_stop_token_ids():
    c = StopChecker(stop=["ZZ"], eos_token_ids=GEMMA_EOS)
    assert c.step(5, "hi Z").text == "hi "
    r = c.step(106, "<turn|>")
    # the EOS token's text is dropped; held-back "Z" can no longer become "ZZ" and is released
    assert r.finished and r.finish_reason == "stop" and r.stop_reason == 106 and r.text == "Z"

    text, res = run(StopChecker(stop_token_ids=[42], eos_token_ids=GEMMA_EOS), ["a", "b", "c"], [3, 42, 4])
    assert text == "a" and res.stop_reason == 42

    text, res = run(StopChecker(eos_token_ids=GEMMA_EOS, ignore_eos=True, max_tokens=3),
                    ["a", "<eos>", "b"], [3, 1, 4])
    assert text == "a<eos>b" and res.finish_reason == "length"


def test_length_limits():
    text, res = run(StopChecker(max_tokens=3), ["a", "b", "c", "d"])
    assert text == "abc" and res.finish_reason == "length" and res.stop_reason is None
    c = StopChecker(max_context=10, prompt_len=8)
    assert c.remaining == 2
    assert not c.step(1, "x").finished
    r = c.step(2, "y")
    assert r.finished and r.finish_reason == "length"
    # a stop string completing on the last allowed token wins over the length limit
    text, res = run(StopChecker(stop=["ab"], max_tokens=2), ["a", "b"])
    assert text == "" and res.finish_reason == "stop"
    with pytest.raises(ValueError, match="context"):
        StopChecker(max_context=8, prompt_len=8)
    with pytest.raises(ValueError, match="max_tokens"):
        StopChecker(max_tokens=0)


def test_from_params_and_flush():
    p = SamplingParams(stop=["###"], stop_token_ids=[9], max_tokens=5, ignore_eos=False)
    c = StopChecker.from_params(p, eos_token_ids=GEMMA_EOS, max_context=100, prompt_len=10)
    assert c.remaining == 5
    assert c.step(3, "x #").text == "x "
    assert c.flush() == "#"  # client went away: the held "#" is released
    assert c.step(1, "").stop_reason == 1


def test_with_detokenizer_and_tiny_tokenizer(tmp_path):
    from unigemma.inputs.tokenizer import Tokenizer
    from unigemma.outputs.detokenize import IncrementalDetokenizer
    from unigemma.testing import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    det = IncrementalDetokenizer(tok)
    checker = StopChecker(stop=["fox jumps"], eos_token_ids=GEMMA_EOS)
    pieces = [det.add(i) for i in ids]
    assert sum(1 for p in pieces if p) > 3  # the stop string really arrives over several tokens
    text, res = run(checker, pieces, ids)
    assert text == "The quick brown " and res.stop_reason == "fox jumps"
