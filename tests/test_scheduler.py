"""Continuous batching: results independent of batch composition, joins and cancellations mid-flight, slot
compaction, prefill interleaved with decoding."""

from __future__ import annotations

import pytest
import torch

import unigemma
from mock_model import EOS, IMG, ByteTokenizer, MockModel
from refmodels import make_reference
from unigemma.engine.generate import Engine, Request
from unigemma.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


TOK = ByteTokenizer()


def workload(prompt_fn):
    """(prompt, params, join step, cancel step or None) per request: greedy and seeded-sampling rows with
    different lengths and settings."""
    return [
        (prompt_fn(0, 5), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), 0, None),
        (prompt_fn(1, 30), SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=15, ignore_eos=True), 0, None),
        (prompt_fn(2, 12), SamplingParams(temperature=0.0, max_tokens=25, repetition_penalty=1.3), 0, 6),
        (prompt_fn(3, 9), SamplingParams(temperature=1.2, top_p=0.8, seed=5, max_tokens=18,
                                         presence_penalty=0.5, ignore_eos=True), 3, None),
        (prompt_fn(4, 21), SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), 4, None),
        (prompt_fn(5, 14), SamplingParams(temperature=0.7, min_p=0.05, seed=2, max_tokens=22), 9, None),
    ]


def run_batched(make_engine, work):
    eng = make_engine(3)
    ids: dict[int, str] = {}
    step = 0
    while step < 200 and (len(ids) < len(work) or eng.has_work):
        for i, (p, sp, join, cancel) in enumerate(work):
            if join == step:
                ids[i] = eng.add(Request(p, sp))
            if cancel == step and i in ids:
                eng.cancel(ids[i])
        eng.step()
        # invariant: active sequences sit in slots 0..n-1
        assert [s.slot for s in eng.scheduler.slots] == list(range(len(eng.scheduler.slots)))
        step += 1
    return {i: eng.output(rid) for i, rid in ids.items()}


def run_single(make_engine, p, sp, cancel_after=None):
    eng = make_engine(1)
    rid = eng.add(Request(p, sp))
    return eng.run_until_done()[rid]


def check_equal(make_engine, work):
    batched = run_batched(make_engine, work)
    for i, (p, sp, join, cancel) in enumerate(work):
        got = batched[i]
        if cancel is not None:
            assert got.finish_reason == "cancelled"
            single = run_single(make_engine, p, sp)
            # what it produced before the cancel is a prefix of the uninterrupted run
            assert single.token_ids[: len(got.token_ids)] == got.token_ids
            continue
        single = run_single(make_engine, p, sp)
        assert got.token_ids == single.token_ids, f"request {i}"
        assert got.finish_reason == single.finish_reason


def mock_prompt(i, n):
    g = torch.Generator().manual_seed(i)
    return [2] + (torch.randint(0, 200, (n,), generator=g) + 6).tolist()


def test_mock_batched_equals_single_with_joins_and_cancels():
    m = MockModel(window=8, sharpness=2.0)

    def make(slots):
        return Engine(m, TOK, [EOS], max_slots=slots, max_model_len=128, prefill_chunk=6, speculative=None)

    check_equal(make, workload(mock_prompt))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_reference("kvshare", path, seed=1)
    return unigemma.load(path, device="cpu", dtype="float32")


def test_real_batched_equals_single_with_joins_and_cancels(tiny):
    def make(slots):
        return Engine(tiny.model, None, [1], max_slots=slots, max_model_len=96, prefill_chunk=8, speculative=None)

    def prompt(i, n):
        g = torch.Generator().manual_seed(100 + i)
        return [2] + torch.randint(8, 99, (n,), generator=g).tolist()

    check_equal(make, workload(prompt))


def test_compaction_moves_live_sequences():
    """Finishing the request in slot 0 moves the one in the highest slot there; the mock checks that every
    query still finds its full history and sliding window in the new slot."""
    m = MockModel(window=8, sharpness=3.0)
    eng = Engine(m, TOK, [EOS], max_slots=3, max_model_len=128, prefill_chunk=64, speculative=None)
    short = eng.add(Request(mock_prompt(0, 10), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
    mid = eng.add(Request(mock_prompt(1, 10), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)))
    long = eng.add(Request(mock_prompt(2, 25), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
    moved = False
    while eng.has_work:
        eng.step()
        seqs = {s.id: s.slot for s in eng.scheduler.slots}
        if short not in seqs and long in seqs and seqs[long] == 0:
            moved = True
    assert moved
    outs = {rid: eng.output(rid).token_ids for rid in (short, mid, long)}
    assert outs[long] == m.reference_greedy(mock_prompt(2, 25), 40, eos=None)
    assert outs[mid] == m.reference_greedy(mock_prompt(1, 10), 30, eos=None)


def test_prefill_is_chunked_between_decode_steps():
    m = MockModel(window=8)
    eng = Engine(m, TOK, [EOS], max_slots=2, max_model_len=256, prefill_chunk=10, speculative=None)
    a = eng.add(Request(mock_prompt(0, 4), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)))
    eng.step()
    b = eng.add(Request(mock_prompt(1, 60), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
    steps_until_b = 0
    a_tokens_meanwhile = 0
    while True:
        evs = eng.step()
        steps_until_b += 1
        if any(e.request_id == b for e in evs):
            break
        a_tokens_meanwhile += sum(e.request_id == a for e in evs)
    # 61 prompt tokens at 10 per step: b's first token comes on the 7th step, and a kept decoding meanwhile
    assert steps_until_b == 7 and a_tokens_meanwhile == 6
    eng.run_until_done()
    assert eng.output(b).token_ids == m.reference_greedy(mock_prompt(1, 60), 3, eos=None)


def test_batched_media_requests():
    m = MockModel(sharpness=3.0)
    prompt = TOK.encode("img", add_bos=True) + [IMG] * 4 + TOK.encode("?")
    media = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.5, 0.6, 0.7, 0.8]), None]
    single = []
    for md in media:
        eng = Engine(m, TOK, [EOS], max_slots=1, max_model_len=64, speculative=None)
        rid = eng.add(Request(prompt if md is not None else prompt[:3], SamplingParams(temperature=0, max_tokens=8),
                              media=None if md is None else {"pixel_values": md}))
        single.append(eng.run_until_done()[rid].token_ids)
    eng = Engine(m, TOK, [EOS], max_slots=3, max_model_len=64, prefill_chunk=3, speculative=None)
    ids = [eng.add(Request(prompt if md is not None else prompt[:3], SamplingParams(temperature=0, max_tokens=8),
                           media=None if md is None else {"pixel_values": md})) for md in media]
    outs = eng.run_until_done()
    assert [outs[i].token_ids for i in ids] == single
    assert single[0] != single[1]
