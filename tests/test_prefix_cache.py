"""Prefix cache: hits skip prefill and change nothing (also past the sliding window), LRU eviction under a budget,
media identity, and reuse of earlier answers in a multi-turn conversation."""

from __future__ import annotations

import pytest
import torch

import unigemma
from mock_model import EOS, IMG, ByteTokenizer, MockModel
from refmodels import make_reference
from unigemma.engine.generate import Engine, Request
from unigemma.engine.prefix_cache import BlockKeys, media_runs
from unigemma.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


TOK = ByteTokenizer()


def greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def prefilled(model) -> int:
    """Tokens the mock has been run on in single-row forwards (prefill chunks, and decode steps at batch 1)."""
    return sum(t for kind, b, t in model.calls if b == 1)


def test_hit_skips_prefill_and_output_is_identical():
    system = TOK.encode("You are a helpful assistant. Answer briefly and precisely.", add_bos=True)  # 59 tokens
    q1, q2 = TOK.encode(" Q: one?"), TOK.encode(" Q: two?")
    m = MockModel(window=8, sharpness=3.0)
    eng = Engine(m, TOK, [EOS], max_slots=2, speculative=None, prefill_chunk=16)
    a = eng.add(Request(system + q1, greedy(12)))
    eng.run_until_done()
    m.calls.clear()
    b = eng.add(Request(system + q2, greedy(12)))
    out = eng.run_until_done()[b]
    assert out.usage.cached_tokens == 48                      # 3 whole blocks of 16 inside the shared 59 tokens
    assert prefilled(m) - 11 == len(system + q2) - 48         # only the rest was prefilled (+ 11 decode steps)
    fresh = Engine(m, TOK, [EOS], speculative=None, prefix_cache=False)
    rid = fresh.add(Request(system + q2, greedy(12)))
    assert fresh.run_until_done()[rid].token_ids == out.token_ids
    assert eng.output(a).usage.cached_tokens == 0


@pytest.mark.parametrize("shared", [17, 40, 64])
def test_every_block_boundary_rebuilds_the_ring(shared):
    """Prefixes far longer than the window (8), cut at several block boundaries: the mock checks the ring on
    every query, and the output equals a cache-free engine's."""
    m = MockModel(window=8, sharpness=3.0)
    base = (TOK.encode("x" * 100, add_bos=True))[:shared]
    p1 = base + TOK.encode("AAAA")
    p2 = base + TOK.encode("BBBBBB")
    eng = Engine(m, TOK, [EOS], max_slots=1, speculative=None, prefill_chunk=10, prefix_block_size=8)
    eng.add(Request(p1, greedy(10)))
    eng.run_until_done()
    rid = eng.add(Request(p2, greedy(20)))
    out = eng.run_until_done()[rid]
    assert out.usage.cached_tokens == (shared // 8) * 8
    assert out.token_ids == m.reference_greedy(p2, 20, eos=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_reference("kvshare", path, seed=3)
    return unigemma.load(path, device="cpu", dtype="float32")


def test_real_model_prefix_longer_than_window(tiny):
    g = torch.Generator().manual_seed(0)
    system = [2] + torch.randint(8, 99, (49,), generator=g).tolist()   # 50 shared tokens, window 8
    p1, p2 = system + [10, 11, 12], system + [20, 21, 22, 23]
    eng = Engine(tiny.model, None, [], max_slots=2, max_model_len=96, speculative=None, prefill_chunk=12)
    plain = Engine(tiny.model, None, [], max_slots=1, max_model_len=96, speculative=None, prefix_cache=False)
    cached = []
    for p in (p1, p2):
        rid = eng.add(Request(p, greedy(16)))
        got = eng.run_until_done()[rid]
        ref_id = plain.add(Request(p, greedy(16)))
        assert got.token_ids == plain.run_until_done()[ref_id].token_ids
        cached.append(got.usage.cached_tokens)
    assert cached == [0, 48]  # three whole blocks of the shared prefix, six windows long


def test_multi_turn_reuses_the_previous_answer():
    m = MockModel(window=8, sharpness=3.0)
    eng = Engine(m, TOK, [EOS], max_slots=1, speculative=None, prefix_block_size=8)
    turn1 = TOK.encode("user: hi there, how are you?\nmodel:", add_bos=True)
    a = eng.add(Request(turn1, greedy(30)))
    answer = eng.run_until_done()[a].token_ids
    turn2 = turn1 + answer + TOK.encode("\nuser: and then?\nmodel:")
    b = eng.add(Request(turn2, greedy(5)))
    out = eng.run_until_done()[b]
    # blocks completed while the answer was being generated are reused too (the answer's last token was
    # never fed to the cache, so the reusable prefix ends at a block boundary before it)
    assert out.usage.cached_tokens == ((len(turn1) + len(answer) - 1) // 8) * 8 > len(turn1)
    assert out.token_ids == m.reference_greedy(turn2, 5, eos=None)


def test_lru_eviction_under_budget():
    m = MockModel(window=8)
    block_bytes = 2 * 2 * (8 * 2 * 4)        # 2 layers × (k, v) × (1 head × 8 positions × 2 dims × fp32)
    eng = Engine(m, TOK, [EOS], max_slots=1, speculative=None, prefix_block_size=8,
                 prefix_cache_bytes=6 * block_bytes)
    pc = eng.prefix_cache
    prompts = [TOK.encode(c * 40, add_bos=True) for c in "abc"]
    for p in prompts:
        eng.add(Request(p, greedy(2)))
        eng.run_until_done()
        assert pc.nbytes <= pc.max_bytes
    assert pc.evictions > 0 and len(pc.blocks) == 6
    # the oldest prompt's blocks went first: no hit for it, a full hit for the newest
    r_old = eng.add(Request(prompts[0], greedy(1)))
    eng.run_until_done()
    assert eng.output(r_old).usage.cached_tokens == 0
    r_new = eng.add(Request(prompts[2], greedy(1)))
    eng.run_until_done()
    assert eng.output(r_new).usage.cached_tokens > 0


def test_same_placeholders_different_media_never_match():
    m = MockModel(window=8, sharpness=3.0)
    eng = Engine(m, TOK, [EOS], max_slots=1, speculative=None, prefix_block_size=8)
    head = TOK.encode("describe the picture below", add_bos=True)     # 27 tokens: 3 blocks before the image
    prompt = head + [IMG] * 12 + TOK.encode(" in detail please")
    pix_a, pix_b = torch.linspace(0, 1, 12), torch.linspace(1, 2, 12)
    outs = {}
    for name, pix in (("a", pix_a), ("b", pix_b), ("a2", pix_a)):
        rid = eng.add(Request(prompt, greedy(8), media={"pixel_values": pix}))
        outs[name] = eng.run_until_done()[rid]
    assert outs["b"].usage.cached_tokens == 24               # the text before the image only
    assert outs["a2"].usage.cached_tokens > len(head) + 12    # same image: reused past it
    assert outs["a"].token_ids == outs["a2"].token_ids != outs["b"].token_ids
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(m.run(torch.tensor([seq]), pixel_values=pix_b).logits[0, -1].argmax()))
    assert outs["b"].token_ids == seq[len(prompt):]


def test_block_keys_cover_whole_media_runs():
    tokens = [10, 11, 12, IMG, IMG, IMG, IMG, 13, 14]
    assert media_runs(tokens, {IMG}) == [(3, 7)]
    e1 = torch.zeros(9, 2)
    e2 = e1.clone()
    e2[6, 1] = 1.0  # differs only in the run's last soft token, which lies in the second block
    k1 = BlockKeys(4, {IMG}, tokens, e1).extend(tokens, 9)
    k2 = BlockKeys(4, {IMG}, tokens, e2).extend(tokens, 9)
    assert len(k1) == 2
    # block 0 holds the run's first tokens, whose K/V (bidirectional) depend on the last one: keys differ
    assert k1[0] != k2[0] and k1[1] != k2[1]
    plain = [10, 11, 12, 9, 9, 9, 9, 13, 14]
    k3 = BlockKeys(4, {IMG}, plain).extend(plain, 9)
    assert k3[0] != k1[0]


def test_prefix_cache_with_speculative_rollbacks():
    """Blocks stored while drafts are verified and rolled back hold only accepted tokens."""
    phrase = TOK.encode("one two three. ")
    m = MockModel(window=8, period=len(phrase), copy_bonus=6.0, sharpness=2.0)
    eng = Engine(m, TOK, [EOS], max_slots=2, speculative="lookup", adaptive=False, num_draft_tokens=4,
                 prefix_block_size=8)
    p1 = [2] + phrase * 3
    a = eng.add(Request(p1, SamplingParams(temperature=1.0, seed=1, max_tokens=40, ignore_eos=True)))
    out1 = eng.run_until_done()[a]
    assert 0 < out1.usage.accepted_tokens < out1.usage.drafted_tokens  # rollbacks happened
    p2 = p1 + out1.token_ids + phrase
    b = eng.add(Request(p2, greedy(12)))
    out2 = eng.run_until_done()[b]
    assert out2.usage.cached_tokens >= len(p1) + 24
    assert out2.token_ids == m.reference_greedy(p2, 12, eos=None)
