"""Chunks a lagging stream writer folds (server/service.py `_coalesce`): only text of one kind for one choice, so the
deltas a client concatenates say the same thing, in the same order, and nothing else is merged."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from unigemma.server.service import _coalesce


def chunk(i, delta, finish=None, logprobs=None):
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                         "logprobs": {"content": logprobs} if logprobs is not None else None}]}


deltas = st.one_of(
    st.builds(lambda t: {"content": t}, st.text(max_size=3)),
    st.builds(lambda t: {"reasoning_content": t}, st.text(max_size=3)),
    st.just({"role": "assistant", "content": ""}),
    st.builds(lambda a: {"tool_calls": [{"index": 0, "function": {"arguments": a}}]}, st.text(max_size=3)),
)
items = st.lists(st.tuples(st.integers(0, 1), deltas, st.sampled_from([None, None, None, "stop"]),
                           st.sampled_from([None, None, [{"token": "x", "logprob": -1.0}]])), max_size=12)


def folded(seq):
    """The consumer loop: each item may absorb the ones queued after it."""
    out, q = [], list(seq)
    while q:
        item = q.pop(0)
        while q and _coalesce(item, q[0]):
            q.pop(0)
        out.append(item)
    return out


def per_choice_text(seq):
    acc = {}
    for c in seq:
        ch = c["choices"][0]
        for k, v in ch["delta"].items():
            if k in ("content", "reasoning_content"):
                acc.setdefault((ch["index"], k), []).append(v)
    return {k: "".join(v) for k, v in acc.items()}


def shape(seq):
    """Everything but the text: the order of non-text events, finishes and logprobs per choice."""
    out = []
    for c in seq:
        ch = c["choices"][0]
        keys = tuple(sorted(ch["delta"]))
        if keys in (("content",), ("reasoning_content",)) and not ch["finish_reason"] and not ch["logprobs"]:
            if out and out[-1] == (ch["index"], keys, None, None):
                continue  # consecutive text of one kind: one or several events, same meaning
            out.append((ch["index"], keys, None, None))
        else:
            out.append((ch["index"], keys, ch["finish_reason"], repr(ch["logprobs"]), repr(ch["delta"])))
    return out


@given(items)
def test_folding_keeps_what_clients_reassemble(raw):
    import copy

    seq = [chunk(i, dict(d), f, lp) for i, d, f, lp in raw]
    out = folded(copy.deepcopy(seq))
    assert per_choice_text(out) == per_choice_text(seq)
    assert shape(out) == shape(seq)
    assert len(out) <= len(seq)


def test_what_folds_and_what_does_not():
    a = chunk(0, {"content": "Hel"})
    assert _coalesce(a, chunk(0, {"content": "lo"})) and a["choices"][0]["delta"] == {"content": "Hello"}
    assert not _coalesce(a, chunk(1, {"content": "x"}))                      # another choice
    assert not _coalesce(a, chunk(0, {"reasoning_content": "x"}))            # another kind of text
    assert not _coalesce(a, chunk(0, {"content": "x"}, logprobs=[{}]))      # logprobs are per token
    assert not _coalesce(a, chunk(0, {}, finish="stop"))                     # the finish stays its own event
    assert not _coalesce(a, None) and not _coalesce(a, ValueError("x"))      # sentinels and errors pass through
    assert a["choices"][0]["delta"] == {"content": "Hello"}
