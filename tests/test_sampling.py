"""Tests for unigemma.engine.sampling: settings validation, each processor's formula, the sampler (greedy,
seeds, batch independence, logprobs) and lossless speculative acceptance (statistical tests with a power check).
"""

from __future__ import annotations

import math

import pytest
import torch

from unigemma.engine.sampling import (
    PenaltyState, Sampler, SamplingBatch, SamplingParams, apply_logit_bias, apply_min_p, apply_penalties,
    apply_temperature, apply_top_k, apply_top_k_top_p, apply_top_p, make_generator, sample_from_probs,
    speculative_accept, speculative_accept_batch,
)

# chi-square critical values at p = 1e-6 (scipy.stats.chi2.isf(1e-6, df)); a correct sampler exceeds them
# with probability one in a million, and every test is seeded, so a failure means a real bias.
CHI2_CRIT_1E6 = {5: 35.89, 7: 40.52}


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson statistic of integer samples against expected probabilities (cells with p=0 must be empty)."""
    n = samples.numel()
    counts = torch.bincount(samples.flatten(), minlength=probs.numel()).double()
    expected = probs.double() * n
    zero = expected == 0
    assert counts[zero].sum() == 0, f"sampled impossible tokens: {counts[zero]}"
    return float((((counts - expected) ** 2)[~zero] / expected[~zero]).sum())


# ---------------------------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2.5), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("seed", 1.5), ("max_tokens", 0),
    ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("logprobs", 1), ("top_logprobs", 21),
    ("ignore_eos", "yes"),
])
def test_params_validation_names_the_field(field, value):
    kwargs = {field: value}
    if field == "top_logprobs":
        kwargs["logprobs"] = True
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_validation_logit_bias_and_conversions():
    p = SamplingParams(logit_bias={"7": 3, 2: -100}, stop="END")
    assert p.logit_bias == {7: 3.0, 2: -100.0}
    assert p.stop == ["END"]
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1})
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=3)  # needs logprobs=True
    with pytest.raises(ValueError, match="out of range"):
        SamplingBatch.build([SamplingParams(logit_bias={10: 1})], vocab_size=10)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(temperature=0.01).greedy


# ---------------------------------------------------------------------------------------------------------
# Processors: exact formulas
# ---------------------------------------------------------------------------------------------------------

def test_penalties_exact_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    # token 0 in the prompt; output: 1 twice, 2 once; tokens 3 and 4 unseen
    state = PenaltyState.from_token_ids([[0]], [[1, 1, 2]], vocab_size=5)
    out = apply_penalties(logits, state, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    expected = torch.tensor([[
        2.0 / 2,                       # prompt token, positive: divided; no output count
        -1.0 * 2 - 0.25 * 2 - 0.5,     # output x2, negative: multiplied; frequency 2, presence
        0.5 / 2 - 0.25 * 1 - 0.5,      # output x1, positive: divided
        3.0, -2.0,                     # unseen: untouched
    ]])
    torch.testing.assert_close(out, expected)
    assert logits[0, 0] == 2.0  # input left alone


def test_penalties_match_reference_repetition_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    history = torch.randint(0, 50, (3, 12), generator=g)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    state = PenaltyState.from_token_ids(history[:, :5].tolist(), None, 50)
    state.update(history[:, 5:])  # the rest counted as output: same "seen" set
    ours = apply_penalties(logits, state, torch.full((3,), 1.3), torch.zeros(3), torch.zeros(3))
    torch.testing.assert_close(ours, ref)


def test_penalty_state_incremental_select_concat():
    prompts, outputs = [[1, 2], [3], [4, 4]], [[5, 5], [], [6]]
    s = PenaltyState.from_token_ids(prompts, [[] for _ in prompts], 8)
    s.update(torch.tensor([5, 0, 6]), valid=torch.tensor([True, False, True]))
    s.update(torch.tensor([[5], [7], [7]]), valid=torch.tensor([[True], [False], [False]]))  # [B, n] form
    ref = PenaltyState.from_token_ids(prompts, outputs, 8)
    assert torch.equal(s.output_counts, ref.output_counts) and torch.equal(s.prompt_mask, ref.prompt_mask)
    sub = s.select([2, 0])
    assert torch.equal(sub.output_counts, ref.output_counts[[2, 0]])
    both = PenaltyState.concat([sub, s.select([1])])
    assert torch.equal(both.prompt_mask, ref.prompt_mask[[2, 0, 1]])


def test_logit_bias_adds_and_bans():
    logits = torch.zeros(2, 4)
    b = SamplingBatch.build([SamplingParams(logit_bias={1: 2.5, 3: -100}), SamplingParams(logit_bias={0: -1})], 4)
    out = apply_logit_bias(logits, b.bias_rows, b.bias_ids, b.bias_vals)
    assert out[0].tolist() == [0.0, 2.5, 0.0, -math.inf]
    assert out[1].tolist() == [-1.0, 0.0, 0.0, 0.0]


def test_temperature_divides():
    out = apply_temperature(torch.tensor([[2.0, 4.0], [2.0, 4.0]]), torch.tensor([2.0, 0.5]))
    assert out.tolist() == [[1.0, 2.0], [4.0, 8.0]]


def test_top_k_keeps_exactly_k_highest():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=g)
    ks = torch.tensor([1, 5, 37, 100])
    out = apply_top_k(logits, ks)
    for r, k in enumerate(ks.tolist()):
        kept = torch.isfinite(out[r]).nonzero().flatten()
        assert kept.numel() == k
        assert set(kept.tolist()) == set(logits[r].topk(k).indices.tolist())
        torch.testing.assert_close(out[r, kept], logits[r, kept])
    # exactly k even with ties
    tied = apply_top_k(torch.zeros(1, 10), torch.tensor([3]))
    assert torch.isfinite(tied).sum() == 3


def test_top_p_keeps_smallest_set_reaching_p():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 60, generator=g) * 2
    ps = torch.tensor([0.05, 0.3, 0.5, 0.9, 1.0])
    out = apply_top_p(logits, ps)
    for r, p in enumerate(ps.tolist()):
        probs = logits[r].softmax(-1).sort(descending=True).values
        m = int(torch.isfinite(out[r]).sum())
        assert probs[:m].sum() >= p - 1e-6
        if m > 1:
            assert probs[:m - 1].sum() < p
    # the kept set is a prefix of the descending order
    for r in range(5):
        kept = torch.isfinite(out[r])
        assert logits[r][kept].min() > logits[r][~kept].max() if (~kept).any() else True


def test_top_k_top_p_min_p_match_reference_warpers():
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 200, generator=g) * 2
    for p in (0.2, 0.75, 0.95):
        ref = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(torch.isfinite(apply_top_p(logits, torch.full((3,), p))), torch.isfinite(ref))
    for k in (1, 10, 150):
        ref = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(torch.isfinite(apply_top_k(logits, torch.full((3,), k))), torch.isfinite(ref))
    for mp in (0.01, 0.1, 0.5):
        ref = MinPLogitsWarper(mp)(None, logits.clone())
        assert torch.equal(torch.isfinite(apply_min_p(logits, torch.full((3,), mp))), torch.isfinite(ref))


def test_top_k_selection_path_equals_full_sort_path():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 300, generator=g) * 2
    ks = torch.tensor([1, 7, 20, 64, 64, 3])
    ps = torch.tensor([0.9, 0.5, 1.0, 0.95, 0.2, 1.0])
    for top_p in (None, ps):
        full = apply_top_k_top_p(logits, ks, top_p)
        fast = apply_top_k_top_p(logits, ks, top_p, max_k=64)
        assert torch.equal(torch.isfinite(full), torch.isfinite(fast))
        torch.testing.assert_close(fast[torch.isfinite(fast)], logits[torch.isfinite(fast)])
    b = SamplingBatch.build([SamplingParams(top_k=5), SamplingParams(top_k=9), SamplingParams(temperature=0)], 300)
    assert b.max_top_k == 9  # the greedy row does not count
    assert SamplingBatch.build([SamplingParams(top_k=5), SamplingParams()], 300).max_top_k == 300


def test_min_p_formula():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, torch.tensor([0.5]))  # threshold 0.25: keeps 0.5, 0.3
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


def test_combined_top_k_top_p_is_top_p_of_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # top-k 2 renormalises to 4/7, 3/7; top-p 0.5 then keeps only the first
    out = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


# ---------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------

def _logits(b=4, v=64, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_and_input_untouched():
    logits = _logits()
    before = logits.clone()
    out = Sampler()(logits, [SamplingParams(temperature=0)] * 4)
    assert torch.equal(out.tokens, logits.argmax(-1))
    assert torch.equal(logits, before)
    assert out.logprobs is None


def test_low_temperature_limit_is_argmax():
    logits = _logits(b=8)
    sampler = Sampler()
    for seed in range(5):
        params = [SamplingParams(temperature=1e-3, seed=seed * 10 + r) for r in range(8)]
        assert torch.equal(sampler(logits, params).tokens, logits.argmax(-1))


def test_mixed_batch_greedy_rows_and_bf16_input():
    logits = _logits(v=32).to(torch.bfloat16)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=5.0, seed=1),
              SamplingParams(temperature=0, top_k=3), SamplingParams(temperature=1.0, top_p=0.5, seed=2)]
    out = Sampler()(logits, params)
    assert out.tokens[0] == logits[0].float().argmax() and out.tokens[2] == logits[2].float().argmax()
    assert out.tokens.dtype == torch.int64 and out.tokens.shape == (4,)


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0), dict(temperature=2.0), dict(temperature=0.7, top_k=3),
    dict(temperature=1.0, top_p=0.6), dict(temperature=1.0, min_p=0.2),
])
def test_sampled_distribution_matches_processed_softmax(settings):
    # one row replicated many times: the per-row tokens are i.i.d. draws from the processed distribution
    base = torch.log(torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01]))
    n = 20000
    params = SamplingParams(**settings)
    batch = SamplingBatch.build([params] * n, 8)
    torch.manual_seed(1234)
    tokens = Sampler()(base.expand(n, 8), batch).tokens
    x = apply_temperature(base[None], torch.tensor([params.temperature]))
    if params.top_k or params.top_p < 1:
        x = apply_top_k_top_p(x, torch.tensor([params.top_k or 8]), torch.tensor([params.top_p]))
    x = apply_min_p(x, torch.tensor([params.min_p]))
    expected = x.softmax(-1)[0]
    assert chi_square(tokens, expected) < CHI2_CRIT_1E6[7]


def test_sample_from_probs_never_picks_zero_probability():
    probs = torch.zeros(2000, 50)
    probs[:, 7] = 0.5
    probs[:, 11] = 0.5
    tok = sample_from_probs(probs, torch.Generator().manual_seed(0))
    assert set(tok.unique().tolist()) == {7, 11}


def test_logit_bias_ban_and_force():
    logits = _logits(b=1, v=16)
    top = int(logits.argmax())
    sampler = Sampler()
    assert sampler(logits, [SamplingParams(temperature=0, logit_bias={top: -100})]).tokens[0] != top
    banned = SamplingParams(temperature=3.0, logit_bias={top: -100})
    toks = sampler(logits.expand(3000, 16), [banned] * 3000).tokens
    assert top not in toks.tolist()
    forced = SamplingParams(temperature=1.0, logit_bias={5: 100})
    assert set(sampler(logits.expand(500, 16), [forced] * 500).tokens.tolist()) == {5}


def test_sampler_requires_penalty_state_and_applies_it():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    p = SamplingParams(temperature=0, presence_penalty=0.5)
    with pytest.raises(ValueError, match="PenaltyState"):
        Sampler()(logits, [p])
    state = PenaltyState.from_token_ids([[]], [[0]], 3)
    assert Sampler()(logits, [p], penalties=state).tokens.tolist() == [1]


def _decode_steps(sampler, params_rows, steps, v=40, gens=None):
    """Sample `steps` tokens for each row (logits change every step); returns [steps, B]."""
    batch = SamplingBatch.build(params_rows, v, generators=gens)
    out = []
    for s in range(steps):
        logits = _logits(b=1, v=v, seed=100 + s).expand(len(params_rows), v)
        out.append(sampler(logits, batch).tokens)
    return torch.stack(out)


def test_seed_reproducible_and_batch_independent():
    sampler = Sampler()
    target = SamplingParams(temperature=1.5, top_k=20, seed=42)
    alone = _decode_steps(sampler, [target], steps=12)[:, 0]
    again = _decode_steps(sampler, [target], steps=12)[:, 0]
    assert torch.equal(alone, again)
    others = [SamplingParams(temperature=1.5, seed=7), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0)]  # the last one uses the global generator
    for pos in range(4):
        rows = others[:pos] + [target] + others[pos:]
        torch.manual_seed(pos)  # disturb the global generator too
        batched = _decode_steps(sampler, rows, steps=12)[:, pos]
        assert torch.equal(batched, alone), pos
    different = _decode_steps(sampler, [SamplingParams(temperature=1.5, top_k=20, seed=43)], steps=12)[:, 0]
    assert not torch.equal(different, alone)


def test_generators_persist_across_rebuilds():
    sampler = Sampler()
    p = SamplingParams(temperature=1.0, seed=5)
    one_batch = _decode_steps(sampler, [p], steps=6)[:, 0]
    gens = [make_generator(5)]
    rebuilt = torch.cat([_decode_steps(sampler, [p], steps=3, gens=gens)[:, 0],
                         _decode_steps(sampler, [p], steps=6, gens=gens)[3:, 0]])
    # the second call restarts the logits schedule at step 0, so compare only the first three
    assert torch.equal(rebuilt[:3], one_batch[:3])
    fresh_each_time = _decode_steps(sampler, [p], steps=3)[:, 0]
    assert torch.equal(fresh_each_time, one_batch[:3])


def test_logprobs_processed_raw_sampled():
    logits = _logits(b=3, v=30)
    params = [SamplingParams(temperature=2.0, top_k=5, seed=1, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0, logprobs=True, top_logprobs=5),
              SamplingParams(temperature=1.0, seed=2, logprobs=False)]
    out = Sampler()(logits, params)
    processed = (logits / torch.tensor([2.0, 1.0, 1.0])[:, None]).log_softmax(-1)
    torch.testing.assert_close(out.logprobs, processed.gather(-1, out.tokens[:, None])[:, 0])
    vals, ids = processed.topk(5, dim=-1)
    assert torch.equal(out.top_ids, ids)
    torch.testing.assert_close(out.top_logprobs, vals)
    rows = out.tolist(params)
    assert len(rows[0][2]) == 3 and len(rows[1][2]) == 5 and rows[2][1] is None and rows[2][2] == []
    assert rows[1][0] == int(logits[1].argmax()) and rows[1][2][0][0] == rows[1][0]
    assert math.isclose(rows[0][1], float(processed[0, rows[0][0]]), rel_tol=1e-5)

    raw = Sampler("raw")(logits, params)
    torch.testing.assert_close(raw.logprobs, logits.log_softmax(-1).gather(-1, raw.tokens[:, None])[:, 0])
    sampled = Sampler("sampled")(logits, params)
    # row 0: only 5 tokens survive top-k; their logprobs are renormalised over those 5
    finite = torch.isfinite(sampled.top_logprobs[0])
    assert finite.all()  # top 3 of 5 kept tokens
    kept = apply_top_k(logits[:1] / 2.0, torch.tensor([5])).log_softmax(-1)
    torch.testing.assert_close(sampled.logprobs[0], kept[0, sampled.tokens[0]])
    with pytest.raises(ValueError, match="logprobs_mode"):
        Sampler("final")


# ---------------------------------------------------------------------------------------------------------
# Speculative acceptance
# ---------------------------------------------------------------------------------------------------------

def test_speculative_greedy():
    v = 10
    target = torch.full((4, v), -5.0)
    best = [3, 1, 4, 1]
    for i, t in enumerate(best):
        target[i, t] = 5.0
    assert speculative_accept(target, [3, 1, 4], greedy=True) == (3, 1)
    assert speculative_accept(target, [3, 2, 4], greedy=True) == (1, 1)
    assert speculative_accept(target, [0, 1, 4], greedy=True) == (0, 3)
    assert speculative_accept(target[:1], [], greedy=True) == (0, 3)
    # batched, with padding: row 1 has one real draft
    n, nxt = speculative_accept_batch(torch.stack([target, target]), torch.tensor([[3, 1, 4], [3, -1, -1]]),
                                      greedy=True, num_drafts=torch.tensor([3, 1]))
    assert n.tolist() == [3, 1] and nxt.tolist() == [1, 1]


def _peaked_p_q(v=8):
    p = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
    q = torch.tensor([0.05, 0.40, 0.10, 0.05, 0.20, 0.05, 0.10, 0.05])  # drafter disagrees with p
    return p, q


def _emitted(n, nxt, drafts):
    """All tokens a round emits (drafts[:n] + [next]) across a batch of independent rounds."""
    out = [nxt]
    k = drafts.shape[1]
    for i in range(k):
        out.append(drafts[:, i][n > i])
    return torch.cat(out)


def test_speculative_sampling_with_draft_distribution_is_lossless():
    p, q = _peaked_p_q()
    trials, k = 30000, 3
    g = torch.Generator().manual_seed(0)
    drafts = torch.multinomial(q, trials * k, replacement=True, generator=g).view(trials, k)
    target = p.expand(trials, k + 1, 8)
    n, nxt = speculative_accept_batch(target, drafts, q.expand(trials, k, 8), generators=g)
    # each emitted token (accepted drafts and the final one) is a draw from p
    assert chi_square(_emitted(n, nxt, drafts), p) < CHI2_CRIT_1E6[7]
    # first-position acceptance rate = sum(min(p, q))
    rate = (n > 0).double().mean()
    assert abs(rate - torch.minimum(p, q).sum()) < 0.02


def test_speculative_sampling_with_argmax_drafts_is_lossless():
    p, q = _peaked_p_q()
    trials, k = 30000, 3
    g = torch.Generator().manual_seed(1)
    drafts = torch.full((trials, k), int(q.argmax()))  # deterministic drafts, as an MTP drafter makes them
    n, nxt = speculative_accept_batch(p.expand(trials, k + 1, 8), drafts, None, generators=g)
    assert chi_square(_emitted(n, nxt, drafts), p) < CHI2_CRIT_1E6[7]
    assert abs((n > 0).double().mean() - p[drafts[0, 0]]) < 0.02

    # power check: treating the argmax drafts as if sampled from q (HF's rule, mtp-drafting.md §7 trap 2) is
    # biased, and the same statistic rejects it overwhelmingly
    n_bad, nxt_bad = speculative_accept_batch(p.expand(trials, k + 1, 8), drafts, q.expand(trials, k, 8),
                                              generators=g)
    assert chi_square(_emitted(n_bad, nxt_bad, drafts), p) > 50 * CHI2_CRIT_1E6[7]


def test_speculative_edge_cases():
    g = torch.Generator().manual_seed(2)
    # target certain of the draft: always accepted; bonus from the last position
    p = torch.zeros(3, 5)
    p[0, 2] = p[1, 4] = p[2, 1] = 1.0
    for _ in range(20):
        assert speculative_accept(p, [2, 4], generator=g) == (2, 1)
        assert speculative_accept(p, [2, 4], p[:2].clone(), generator=g) == (2, 1)
    # target gives the draft zero probability: always rejected, replacement from p
    assert speculative_accept(p, [3, 4], generator=g) == (0, 2)
    q = torch.zeros(2, 5)
    q[:, 3] = 1.0
    assert speculative_accept(p, [3, 4], q, generator=g) == (0, 2)
    # p == q exactly: the residual vanishes, yet a token must still come out (from p)
    pq = torch.full((2, 5), 0.2)
    n, t = speculative_accept(pq, [1], pq[:1].clone(), generator=g)
    assert n == 1 and 0 <= t < 5
    with pytest.raises(ValueError, match="target"):
        speculative_accept_batch(torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long))


def test_speculative_seeded_rows_are_batch_independent():
    p, q = _peaked_p_q()
    k = 2
    drafts = torch.tensor([[1, 4], [0, 0], [4, 1]])
    alone = [speculative_accept_batch(p.expand(1, k + 1, 8), drafts[2:], q.expand(1, k, 8),
                                      generators=[make_generator(s)]) for s in range(10)]
    for s in range(10):
        n, t = speculative_accept_batch(p.expand(3, k + 1, 8), drafts, q.expand(3, k, 8),
                                        generators=[make_generator(99), None, make_generator(s)])
        assert (n[2], t[2]) == (alone[s][0][0], alone[s][1][0])


# ---------------------------------------------------------------------------------------------------------
# CUDA: no host syncs in the sampling path; seeded rows identical across batch compositions
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampler_is_sync_free_and_seeded():
    dev = torch.device("cuda")
    v = 262144
    logits = torch.randn(4, v, device=dev)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1, logprobs=True, top_logprobs=5),
              SamplingParams(temperature=0), SamplingParams(temperature=1.0, min_p=0.05, seed=3),
              SamplingParams(temperature=0.7, presence_penalty=0.5, frequency_penalty=0.3,
                             repetition_penalty=1.1, logit_bias={5: 2.0})]
    batch = SamplingBatch.build(params, v, dev)
    state = PenaltyState.from_token_ids([[1, 2, 3]] * 4, None, v, dev)
    sampler = Sampler()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, batch, penalties=state)
        state.update(out.tokens)
        n, t = speculative_accept_batch(logits[:, None].expand(4, 3, v).softmax(-1),
                                        torch.zeros(4, 2, dtype=torch.long, device=dev),
                                        generators=batch.generators)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.tokens[1].item() == logits[1].argmax().item()
    assert out.logprobs.shape == (4,) and out.top_ids.shape == (4, 5) and n.shape == t.shape == (4,)
    # the seeded row 0 gives the same first token alone (fresh generator) as in the batch (fresh generator)
    alone = sampler(logits[:1], [params[0]]).tokens
    batched = sampler(logits, params, penalties=PenaltyState.from_token_ids([[1, 2, 3]] * 4, None, v, dev)).tokens
    assert torch.equal(batched[:1], alone) and torch.equal(out.tokens[:1], alone)
