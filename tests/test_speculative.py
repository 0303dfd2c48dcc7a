"""Speculative decoding: prompt lookup and MTP drafts are lossless (greedy identical, seeded sampling identical,
sampled distribution unchanged), the MTP drafter reads clean K/V, and the draft length adapts to costs."""

from __future__ import annotations

import pytest
import torch

import unigemma
from mock_model import EOS, ByteTokenizer, MockModel, make_drafter
from refmodels import make_reference
from unigemma.config import FULL, SLIDING
from unigemma.engine.generate import Engine, Request
from unigemma.engine.sampling import SamplingParams
from unigemma.engine.runner import packing_available
from unigemma.engine.speculative import DraftController, NgramIndex, SpecStats, expected_tokens

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tiny_with_drafter(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    make_reference("kvshare", root / "t", seed=2)
    make_drafter(root / "d", "kvshare")
    return unigemma.load(root / "t", device="cpu", dtype="float32", drafter=root / "d")


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(8, 99, (n,), generator=g).tolist()


def run(engine: Engine, requests: list[Request]):
    ids = [engine.add(r) for r in requests]
    outs = engine.run_until_done()
    return [outs[i] for i in ids]


# --- prompt lookup -------------------------------------------------------------------------------------------

def test_ngram_index_proposes_latest_continuation():
    idx = NgramIndex(1, 3)
    toks = [5, 6, 7, 8, 5, 6, 9, 1, 5, 6]
    assert idx.propose(toks, 3) == [9, 1, 5]          # latest (5, 6) was followed by 9, 1, 5
    assert idx.propose(toks + [9], 2) == [1, 5]       # the index is extended incrementally
    assert idx.propose([1, 2, 3], 4) == []
    # a repeating run is continued periodically past the end of the sequence
    assert NgramIndex(1, 2).propose([3, 4, 3, 4, 3, 4], 5) == [3, 4, 3, 4, 3]


def test_prompt_lookup_greedy_identical_and_accepted():
    phrase = TOK.encode("the cat sat on the mat. ")
    m = MockModel(period=len(phrase), copy_bonus=9.0, sharpness=2.0)
    p = [2] + phrase * 3
    plain = run(Engine(m, TOK, [EOS], max_slots=2, speculative=None), [Request(p, SamplingParams(0.0, max_tokens=60))])
    spec_eng = Engine(m, TOK, [EOS], max_slots=2, speculative="lookup", adaptive=False, num_draft_tokens=5)
    spec = run(spec_eng, [Request(p, SamplingParams(0.0, max_tokens=60))])
    assert spec[0].token_ids == plain[0].token_ids
    u = spec[0].usage
    assert u.drafted_tokens > 20 and u.acceptance_rate > 0.5 and u.mean_accepted_length > 1.5
    assert spec_eng.scheduler.steps < 0.6 * 60  # several tokens per step


def test_seeded_sampling_identical_with_and_without_speculation():
    """Coupled acceptance: each position's token is the very draw plain decoding makes from the request's
    generator, so seeds reproduce exactly, whatever the draft lengths and batch."""
    phrase = TOK.encode("abc def ")
    m = MockModel(period=len(phrase), copy_bonus=8.0, sharpness=1.5)
    reqs = lambda: [Request([2] + phrase * 2, SamplingParams(temperature=t, top_p=tp, seed=s, max_tokens=40,
                                                             ignore_eos=True))
                    for t, tp, s in [(1.0, 1.0, 1), (0.7, 0.9, 2), (1.3, 1.0, 3)]]
    plain = run(Engine(m, TOK, [EOS], max_slots=1, speculative=None), reqs())
    spec = run(Engine(m, TOK, [EOS], max_slots=3, speculative="lookup", adaptive=False, num_draft_tokens=4), reqs())
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert all(o.usage.drafted_tokens > 0 and o.usage.accepted_tokens > 0 for o in spec)
    assert any(o.usage.accepted_tokens < o.usage.drafted_tokens for o in spec)  # rejections happened too


class FixedProposer:
    """Always drafts the same tokens (deterministic drafts, as MTP and prompt lookup make them)."""

    name = "fixed"

    def __init__(self, drafts):
        self.drafts = drafts

    def propose(self, seqs, k):
        return [self.drafts[:k] for _ in seqs]


@pytest.mark.parametrize("drafts", [[10, 11, 10], [13, 13, 12]])
def test_speculative_sampling_matches_target_distribution(drafts):
    """Fixed next-token distribution p; with likely and unlikely drafts, every generated position must still be
    distributed as p, independently of the previous one (chi-square, p-value 1e-3 thresholds)."""
    p = torch.zeros(TOK.__len__())
    p[10:14] = torch.tensor([0.5, 0.3, 0.15, 0.05])
    m = MockModel(fixed_probs=p)
    torch.manual_seed(0)
    eng = Engine(m, TOK, [EOS], max_slots=8, speculative=FixedProposer(drafts), adaptive=False, num_draft_tokens=3)
    N = 400
    outs = run(eng, [Request([2, 20, 21], SamplingParams(temperature=1.0, max_tokens=4)) for _ in range(N)])
    seqs = torch.tensor([o.token_ids for o in outs]) - 10
    assert seqs.shape == (N, 4) and bool(((seqs >= 0) & (seqs < 4)).all())
    probs = p[10:14]
    for j in range(4):
        counts = torch.bincount(seqs[:, j], minlength=4).float()
        chi2 = float(((counts - N * probs) ** 2 / (N * probs)).sum())
        assert chi2 < 16.27, f"position {j}: counts {counts.tolist()}"        # 3 dof, p = 0.001
    joint = torch.bincount(seqs[:, 1] * 4 + seqs[:, 2], minlength=16).float()
    expect = N * torch.outer(probs, probs).flatten()
    assert float(((joint - expect) ** 2 / expect).sum()) < 37.7                 # 15 dof, p = 0.001
    drafted = sum(o.usage.drafted_tokens for o in outs)
    accepted = sum(o.usage.accepted_tokens for o in outs)
    assert drafted > N and 0 < accepted < drafted


# --- MTP --------------------------------------------------------------------------------------------------------

def test_mtp_and_lookup_greedy_identical_to_plain(tiny_with_drafter):
    llm = tiny_with_drafter
    reqs = lambda: [Request(prompt(20, s), SamplingParams(0.0, max_tokens=30)) for s in (1, 2, 3)]
    base = [o.token_ids for o in run(Engine(llm.model, None, llm.eos_token_ids, max_slots=3, max_model_len=96,
                                            speculative=None), reqs())]
    for spec in ("mtp", "lookup"):
        eng = Engine(llm.model, None, llm.eos_token_ids, llm.drafter, max_slots=3, max_model_len=96,
                     speculative=spec, adaptive=False, num_draft_tokens=3, prefill_chunk=7)
        outs = run(eng, reqs())
        assert [o.token_ids for o in outs] == base, spec
        if spec == "mtp":
            assert all(o.usage.drafted_tokens > 0 for o in outs)


def test_mtp_seeded_sampling_identical(tiny_with_drafter):
    llm = tiny_with_drafter
    reqs = lambda: [Request(prompt(15, s), SamplingParams(0.8, seed=s, max_tokens=20)) for s in (4, 5)]
    base = run(Engine(llm.model, None, llm.eos_token_ids, max_slots=1, max_model_len=96, speculative=None), reqs())
    spec = run(Engine(llm.model, None, llm.eos_token_ids, llm.drafter, max_slots=2, max_model_len=96,
                      speculative="mtp", adaptive=False, num_draft_tokens=2), reqs())
    assert [o.token_ids for o in spec] == [o.token_ids for o in base]


def test_mtp_drafter_reads_clean_kv(tiny_with_drafter):
    """The proposer's drafts equal a direct drafter loop (spec §4.2) fed from a cache-free forward of the
    sequence: full-layer keys at positions < p, sliding keys at p−W−1 … p−1, hidden of position p−1."""
    llm = tiny_with_drafter
    eng = Engine(llm.model, None, llm.eos_token_ids, llm.drafter, max_slots=2, max_model_len=96,
                 speculative="mtp", adaptive=False, num_draft_tokens=3, prefill_chunk=6)
    eng.add(Request(prompt(25, 9), SamplingParams(0.0, max_tokens=40, ignore_eos=True)))
    seq = eng.scheduler.seqs[next(iter(eng.scheduler.seqs))]
    while len(seq.output_ids) < 4:  # prefill in chunks of 6, then a few verify steps (with rollbacks)
        eng.step()
    got = eng.scheduler.proposer.propose([seq], 3)[0]

    toks = seq.tokens
    P = len(toks) - 1
    out = llm.model.run(torch.tensor([toks[:P]]))
    W = llm.drafter.config.text.sliding_window
    kv = {t: out.plan.shared[t] for t in (SLIDING, FULL)}
    pos = torch.arange(P)
    masks = {FULL: torch.ones(1, P, dtype=torch.bool), SLIDING: (pos >= P - W - 1)[None]}
    g = out.hidden[:, -1:]
    tok = torch.tensor([[toks[-1]]])
    expected = []
    for _ in range(3):
        x = torch.cat([llm.model.language_model.embed(tok), g], -1)
        logits, g = llm.drafter(x, torch.tensor([[P]]), kv, masks)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        expected.append(int(tok))
    assert got == expected


# --- adaptivity ----------------------------------------------------------------------------------------------

def test_expected_tokens():
    assert expected_tokens(0.5, 0) == 1.0
    assert abs(expected_tokens(0.5, 3) - 1.875) < 1e-12
    assert expected_tokens(1.0, 4) == 5.0


def test_controller_stops_drafting_when_it_does_not_pay():
    c = DraftController(max_draft=6)
    c.observe_step(1, 1, 0.010)
    for T in range(2, 8):
        c.observe_step(1, T, 0.010 * (1 + 0.9 * (T - 1)))   # compute-bound: every extra token costs 90%
    assert c.choose([0.3], [6], rows=1) == 0
    cheap = DraftController(max_draft=6)
    cheap.observe_step(1, 1, 0.010)
    for T in range(2, 8):
        cheap.observe_step(1, T, 0.0102 * (1 + 0.01 * (T - 1)))  # memory-bound: drafts are nearly free
    assert cheap.choose([0.9], [6], rows=1) == 6
    assert cheap.choose([0.9], [2], rows=1) == 2                # never more than the proposals
    assert 1 <= cheap.choose([0.5], [6], rows=1) <= 6
    # a drafter call costing as much as a step makes long drafts pointless
    cheap.draft_cost = 0.010
    assert cheap.choose([0.5], [6], rows=1) <= 1


def test_acceptance_estimate_tracks_and_recovers():
    s = SpecStats(alpha=0.6)
    for _ in range(20):
        s.observe(4, 0)
    assert s.alpha < 0.1 and s.acceptance_rate == 0.0
    c = DraftController(4, prior_alpha=0.6)
    for _ in range(200):
        c.idle(s)
    assert s.alpha > 0.5  # drifts back, so drafting is retried later


def test_adaptive_engine_drafts_little_without_repetition():
    """Random text: prompt lookup rarely finds anything, the estimate falls, and output stays identical."""
    m = MockModel(sharpness=3.0)
    p = TOK.encode("no repetition here at all", add_bos=True)
    plain = run(Engine(m, TOK, [EOS], speculative=None), [Request(p, SamplingParams(0.0, max_tokens=40))])
    spec = run(Engine(m, TOK, [EOS], speculative="lookup"), [Request(p, SamplingParams(0.0, max_tokens=40))])
    assert spec[0].token_ids == plain[0].token_ids
    assert spec[0].usage.drafted_tokens < 15


# --- packed CPU weights, rejections, the sliding window, the controller's warm-up ------------------------------

@pytest.fixture(scope="module")
def packed_pair(tmp_path_factory):
    """Its own target + drafter (packing changes the modules in place, so other tests' models stay plain)."""
    root = tmp_path_factory.mktemp("packed")
    make_reference("kvshare", root / "t", seed=2)
    make_drafter(root / "d", "kvshare")
    return unigemma.load(root / "t", device="cpu", dtype="float32", drafter=root / "d")


class CorruptedOracle:
    """Drafts what plain decoding produced next, with every `bad`-th position (absolute) made wrong: drafts are
    accepted up to a planted error and rejected there, so steps mix acceptances, rejections and rollbacks."""

    name = "oracle"

    def __init__(self, sequences: list[list[int]], vocab: int, bad: int = 4):
        self.sequences, self.vocab, self.bad = sequences, vocab, bad

    def propose(self, seqs, k):
        out = []
        for s in seqs:
            L = len(s.tokens)
            full = next((f for f in self.sequences if f[:L] == s.tokens), None)
            d = [] if full is None else list(full[L:L + k])
            out.append([(t + 1) % self.vocab if (L + j) % self.bad == 0 else t for j, t in enumerate(d)])
        return out


def _engine(llm, spec, **kw):
    kw.setdefault("max_slots", 3)
    return Engine(llm.model, None, llm.eos_token_ids, llm.drafter if spec == "mtp" else None, max_model_len=96,
                  speculative=spec, cpu_packed=True, **kw)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_packed_speculation_identical_across_the_window_and_after_rejections(packed_pair, sampled):
    """With oneDNN-packed weights (verify steps of several tokens) and a tight ring (spare 6), speculative output ==
    plain output for lookup, MTP and an oracle with planted errors, well past the window of 8, greedy and seeded;
    every verification writes into the ring first (T <= spare: never the concatenating path)."""
    llm = packed_pair
    W = llm.config.text.sliding_window

    def reqs():
        return [Request(prompt(20, s), SamplingParams(0.9 if sampled else 0.0, seed=s if sampled else None,
                                                     max_tokens=40, ignore_eos=True)) for s in (1, 2, 3)]

    plain_eng = _engine(llm, None)
    plain = run(plain_eng, reqs())
    assert (plain_eng.runner.packed > 0) == packing_available()  # cpu_packed=True packs wherever the build can
    assert 20 + 40 > 5 * W
    full = [r.prompt_ids + o.token_ids for r, o in zip(reqs(), plain)]
    for spec in ("lookup", "mtp", CorruptedOracle(full, llm.config.text.vocab_size)):
        eng = _engine(llm, spec, adaptive=False, num_draft_tokens=5, spare=6, prefill_chunk=7)
        assert eng.scheduler.controller.max_draft + 1 <= eng.cache.spare
        steps = []
        decode = eng.runner.decode

        def spy(tokens, positions, kv_len, _decode=decode):
            steps.append(tokens.shape[1])
            return _decode(tokens, positions, kv_len)

        eng.runner.decode = spy
        outs = run(eng, reqs())
        name = getattr(spec, "name", spec)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain], name
        assert max(steps) <= eng.cache.spare, name
        if name in ("mtp", "oracle"):  # (sampled text rarely repeats itself: lookup may find nothing to draft)
            assert max(steps) == eng.scheduler.controller.max_draft + 1 == 5, name
            assert all(o.usage.drafted_tokens > 0 for o in outs), name
        if name == "oracle":
            assert all(0 < o.usage.accepted_tokens < o.usage.drafted_tokens for o in outs)


def test_adaptive_keeps_drafting_when_drafts_are_good(packed_pair):
    """speculative with the adaptive controller (the default): drafts that are always right keep being verified at
    the longest length, on measured costs of the packed CPU model."""
    llm = packed_pair
    req = lambda: Request(prompt(20, 7), SamplingParams(0.0, max_tokens=60, ignore_eos=True))
    plain = run(_engine(llm, None), [req()])[0]
    eng = _engine(llm, CorruptedOracle([req().prompt_ids + plain.token_ids], llm.config.text.vocab_size, bad=10**9),
                  num_draft_tokens=4)
    for _ in range(2):  # the second request starts with measured costs (and a warmed-up controller)
        out = run(eng, [req()])[0]
        assert out.token_ids == plain.token_ids
        assert out.usage.acceptance_rate == 1.0 and out.usage.drafted_tokens >= 0.7 * 60  # at most 4 of every 5
        assert out.usage.mean_accepted_length > 3


def test_controller_ignores_warmup_steps_and_stalls():
    """The first step of each shape (kernel builds, graph captures) is not a cost sample, and one stalled step
    moves an estimate by at most 2x: otherwise a draft length that happened to look dear once is never tried
    again, and its estimate never recovers."""
    c = DraftController(max_draft=4, warmup=1)
    c.observe_step(1, 1, 0.050)
    c.observe_step(1, 5, 0.050)   # first plain and first verify step: one-time costs, ignored
    assert c.step_cost == {}
    c.observe_step(1, 1, 0.010)
    c.observe_step(1, 5, 0.012)
    assert c.choose([0.8], [4], rows=1) == 4
    c.observe_step(1, 5, 0.500)   # one step stalled by another process
    assert c.step_cost[(1, 5)] < 0.012 * 1.25
    assert c.choose([0.8], [4], rows=1) == 4
    c.observe_draft(4, 0.040)     # the first drafter call (lazy tables): ignored too
    assert c.draft_cost == 0.0
    c.observe_draft(4, 0.004)
    assert c.draft_cost == pytest.approx(0.001)
    # without warm-up the first verify sample would have ruled the longest drafts out
    naive = DraftController(max_draft=4)
    naive.observe_step(1, 1, 0.010)
    naive.observe_step(1, 5, 0.050)
    assert naive.choose([0.8], [4], rows=1) < 4
    with pytest.raises(ValueError, match="warmup"):
        DraftController(4, warmup=-1)
