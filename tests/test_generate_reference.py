"""Greedy generations identical to the reference's `generate` (plain and assisted with the same MTP drafter), and
the `generate(llm, prompt, ...)` API behind `llm.generate` (text prompts, streaming chunks, stops, seeds)."""

from __future__ import annotations

import pytest
import torch

import unigemma
from mock_model import make_drafter
from refmodels import make_reference, randomize, reference_config
from unigemma.engine.generate import Engine, GenerationChunk, Request, generate
from unigemma.engine.sampling import SamplingParams
from unigemma.testing import write_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference target, reference drafter, unigemma LLM with that drafter)."""
    root = tmp_path_factory.mktemp("refgen")
    ref = make_reference("kvshare", root / "t", seed=0)
    dr = make_drafter(root / "d", "kvshare", seed=11)
    llm = unigemma.load(root / "t", device="cpu", dtype="float32", drafter=root / "d")
    return ref, dr, llm


def prompts():
    g = torch.Generator().manual_seed(4)
    return [[2] + torch.randint(8, 99, (n,), generator=g).tolist() for n in (9, 23)]


def hf_greedy(ref, ids, n, **kw):
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids):].tolist()


def test_greedy_identical_to_reference_generate(pair):
    ref, _, llm = pair
    for ignore_eos in (False, True):
        eng = Engine(llm.model, None, llm.eos_token_ids, max_slots=2, max_model_len=128, speculative=None)
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=ignore_eos)
        ids = [eng.add(Request(p, params)) for p in prompts()]
        outs = eng.run_until_done()
        for rid, p in zip(ids, prompts()):
            expected = hf_greedy(ref, p, 40, **({"eos_token_id": None} if ignore_eos else {}))
            assert outs[rid].token_ids == expected
            if ignore_eos:
                assert len(p) + len(expected) > 5 * 8  # far past the sliding window
                assert len(set(expected)) > 10
            else:
                assert outs[rid].finish_reason == ("stop" if expected[-1] in llm.eos_token_ids else "length")


def test_assisted_generation_identical_to_reference(pair):
    """The reference's assisted generation with the same assistant, and ours with MTP drafts (fixed k = 3 as
    the drafter's generation_config says), both give the plain greedy tokens."""
    ref, dr, llm = pair
    for p in prompts():
        expected = hf_greedy(ref, p, 30, assistant_model=dr, eos_token_id=None)
        assert expected == hf_greedy(ref, p, 30, eos_token_id=None)
        eng = Engine(llm.model, None, llm.eos_token_ids, llm.drafter, max_slots=1, max_model_len=128,
                     speculative="mtp", adaptive=False, num_draft_tokens=3)
        rid = eng.add(Request(p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)))
        out = eng.run_until_done()[rid]
        assert out.token_ids == expected
        assert out.usage.drafted_tokens >= 3


@pytest.fixture(scope="module")
def llm_with_tokenizer(tmp_path_factory):
    """A tiny model whose vocabulary fits the tiny BPE tokenizer (512 ids), tokenizer files in its folder."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    path = tmp_path_factory.mktemp("withtok")
    cfg = reference_config("kvshare")
    cfg.text_config.vocab_size = 512
    torch.manual_seed(0)
    ref = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize(ref, 5)
    ref.save_pretrained(str(path), max_shard_size="200KB")
    write_tiny_tokenizer(path)
    return unigemma.load(path, device="cpu", dtype="float32")


def test_generate_api_text_prompt_and_stream(llm_with_tokenizer):
    llm = llm_with_tokenizer
    res = generate(llm, "The quick brown fox", max_tokens=24, temperature=0.0, ignore_eos=True)
    assert len(res.token_ids) == 24 and res.finish_reason == "length"
    assert res.text == llm.tokenizer.decode(res.token_ids)
    ids = llm.tokenizer.encode("The quick brown fox", add_bos=True)
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == 24
    # same ids as a prompt list
    assert generate(llm, ids, max_tokens=24, temperature=0.0, ignore_eos=True).token_ids == res.token_ids
    chunks = list(generate(llm, "The quick brown fox", max_tokens=24, temperature=0.0, ignore_eos=True,
                           stream=True))
    assert all(isinstance(c, GenerationChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == res.text
    assert [t for c in chunks for t in c.token_ids] == res.token_ids
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_generate_api_stop_seed_and_logprobs(llm_with_tokenizer):
    llm = llm_with_tokenizer
    full = generate(llm, "Hello", max_tokens=30, temperature=0.0, ignore_eos=True)
    stop = full.text[6:9]
    assert len(stop) == 3
    cut = generate(llm, "Hello", max_tokens=30, temperature=0.0, ignore_eos=True, stop=stop)
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    a = generate(llm, "Hello", max_tokens=12, temperature=0.9, top_k=40, seed=7, logprobs=True)
    b = generate(llm, "Hello", max_tokens=12, temperature=0.9, top_k=40, seed=7, logprobs=True)
    c = generate(llm, "Hello", max_tokens=12, temperature=0.9, top_k=40, seed=8)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.token_ids != c.token_ids
    assert len(a.logprobs) == len(a.token_ids) and all(lp <= 0 for lp in a.logprobs)
    with pytest.raises(ValueError, match="empty"):
        generate(llm, [], max_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(llm, "x", temperature=-1.0)
