"""The model's KV cache: chunked cached forwards equal one whole forward (past the sliding window, with vision
blocks and KV sharing), rollback, slots, padding rows."""

import pytest
import torch

import unigemma
from refmodels import IMG, make_reference

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module", params=["keqv", "kvshare"])
def llm(request, tmp_path_factory):
    p = tmp_path_factory.mktemp("cache") / request.param
    make_reference(request.param, p, seed=11)
    return unigemma.load(p, device="cpu", dtype="float32")


def _prompt(n=40, img_at=10, img_len=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 99, (1, n), generator=g)
    ids[0, img_at:img_at + img_len] = IMG
    pv = torch.rand(1, 8, 6912, generator=g)
    pos = torch.tensor([[[x, y] for y in range(2) for x in range(3)] + [[-1, -1]] * 2])
    return ids, dict(pixel_values=pv, image_position_ids=pos)


@pytest.mark.parametrize("bounds", [[0, 7, 17, 30, 31, 32, 33, 34, 36, 40], [0, 40], [0, 25, 40],
                                    [0] + list(range(16, 41))])
def test_chunked_prefill_and_decode_equal_whole_forward(llm, bounds):
    m = llm.model
    ids, media = _prompt()
    whole = m(ids, **media)
    emb = m.embed(ids, **media)
    cache = m.make_cache(slots=3, max_len=64, spare=4)
    outs = [m.run(ids[:, a:b], inputs_embeds=emb[:, a:b], position_ids=torch.arange(a, b)[None], cache=cache,
                  slots=torch.tensor([2])).logits for a, b in zip(bounds[:-1], bounds[1:])]
    assert (torch.cat(outs, 1) - whole).abs().max() < 1e-4 * max(1, whole.abs().max())


def test_rollback_then_continue(llm):
    m = llm.model
    ids, media = _prompt()
    whole = m(ids, **media)
    emb = m.embed(ids, **media)
    cache = m.make_cache(slots=1, max_len=64, spare=4)
    m.run(ids[:, :30], inputs_embeds=emb[:, :30], position_ids=torch.arange(30)[None], cache=cache)
    for junk_len in (3, 4):  # rejected speculative drafts (up to `spare` tokens), written then rolled back
        m.run(torch.tensor([[5] * junk_len]), position_ids=torch.arange(30, 30 + junk_len)[None], cache=cache)
        cache.truncate(0, 30)
        assert cache.ring_view_ok(0, 30)
    steps = [m.run(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), cache=cache).logits for t in range(30, 40)]
    assert (torch.cat(steps, 1) - whole[:, 30:40]).abs().max() < 1e-4 * max(1, whole.abs().max())


def test_batched_decode_rows_with_different_lengths(llm):
    """Two rows at different positions decode together; padding tokens (position −1) are neither cached nor seen."""
    m = llm.model
    a, _ = _prompt(30, img_at=0, img_len=0, seed=1)
    b, _ = _prompt(22, img_at=0, img_len=0, seed=2)
    cache = m.make_cache(slots=2, max_len=64, spare=4)
    m.run(a[:, :25], position_ids=torch.arange(25)[None], cache=cache, slots=torch.tensor([0]))
    m.run(b[:, :17], position_ids=torch.arange(17)[None], cache=cache, slots=torch.tensor([1]))
    got_a, got_b = [], []
    for s in range(5):
        ids = torch.tensor([[a[0, 25 + s]], [b[0, 17 + s]]])
        pos = torch.tensor([[25 + s], [17 + s]])
        lg = m.run(ids, position_ids=pos, cache=cache).logits
        got_a.append(lg[0:1]), got_b.append(lg[1:2])
    ref_a = m(a)[:, 25:30]
    ref_b = m(b)[:, 17:22]
    assert (torch.cat(got_a, 1) - ref_a).abs().max() < 1e-4 * max(1, ref_a.abs().max())
    assert (torch.cat(got_b, 1) - ref_b).abs().max() < 1e-4 * max(1, ref_b.abs().max())


def test_padding_positions_are_ignored(llm):
    m = llm.model
    a, _ = _prompt(20, img_at=0, img_len=0, seed=3)
    cache = m.make_cache(slots=1, max_len=32, spare=4)
    ids = torch.cat([a[:, :12], torch.zeros(1, 3, dtype=torch.long)], 1)
    pos = torch.cat([torch.arange(12), torch.full((3,), -1)])[None]
    lg = m.run(ids, position_ids=pos, cache=cache).logits
    m.run(a[:, 12:20], position_ids=torch.arange(12, 20)[None], cache=cache)
    whole = m(a)
    assert (lg[:, :12] - whole[:, :12]).abs().max() < 1e-4 * max(1, whole.abs().max())
    assert torch.isfinite(lg).all()


def test_cache_memory_is_bounded_by_the_window(llm):
    c = llm.config.text
    small = llm.model.make_cache(slots=1, max_len=64, spare=4)
    big = llm.model.make_cache(slots=1, max_len=4096, spare=4)
    sliding = [i for i, (t, mo) in enumerate(zip(c.layer_types, c.kv_sharing_modes))
               if t == "sliding_attention" and mo != "reuse"]
    for i in sliding:
        assert big.layers[i].k.shape[2] == small.layers[i].k.shape[2] == c.sliding_window - 1 + 4 + 1
    reuse = [i for i, mo in enumerate(c.kv_sharing_modes) if mo == "reuse"]
    assert all(big.layers[i] is None for i in reuse)
    with pytest.raises(ValueError, match="beyond the cache"):
        llm.model.run(torch.tensor([[1]]), position_ids=torch.tensor([[64]]), cache=small)
