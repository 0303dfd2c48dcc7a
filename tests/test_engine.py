"""Engine basics: cache vs recompute, chunked prefill, stops, streaming text, finish reasons, cancel, logprobs.

Most tests use the scripted mock model (tests/mock_model.py), which checks its cache contents on every query;
the tiny random reference checkpoint covers the real model's cache (sliding ring past the window).
"""

from __future__ import annotations

import pytest
import torch

import unigemma
from mock_model import BOS, EOS, IMG, ByteTokenizer, MockModel
from refmodels import make_reference
from unigemma.engine.generate import Engine, Request
from unigemma.engine.runner import ModelRunner
from unigemma.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


TOK = ByteTokenizer()


def greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)


def mock_engine(model=None, **kw):
    kw.setdefault("speculative", None)
    kw.setdefault("max_model_len", 256)
    return Engine(model or MockModel(), TOK, [EOS], **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint (window 8, KV sharing, untied head) whose greedy text does not collapse."""
    path = tmp_path_factory.mktemp("tiny")
    make_reference("kvshare", path, seed=0)
    return unigemma.load(path, device="cpu", dtype="float32")


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(8, 99, (n - 1,), generator=g).tolist()


# --- cache correctness ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_mock_greedy_equals_full_recompute(chunk):
    m = MockModel(window=8, sharpness=4.0)
    prompt = TOK.encode("a prompt longer than the sliding window", add_bos=True)
    expected = m.reference_greedy(prompt, 40)
    eng = mock_engine(m, prefill_chunk=chunk)
    rid = eng.add(Request(prompt, greedy(40)))
    out = eng.run_until_done()[rid]
    assert out.token_ids == expected
    assert len(prompt) + len(expected) > 3 * 8  # well past the window


def test_real_cache_vs_no_cache_past_window(tiny):
    """Greedy with the KV cache (ring of window-8 sliding layers) == recomputing the whole sequence each step."""
    ids = prompt_ids(12)
    eng = Engine(tiny.model, None, [], max_slots=2, max_model_len=96, prefill_chunk=5, speculative=None)
    rid = eng.add(Request(ids, greedy(30)))
    got = eng.run_until_done()[rid].token_ids
    seq = list(ids)
    for _ in range(30):
        seq.append(int(tiny.model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(ids):]
    assert len(set(got)) > 5  # a real sequence, not one repeated token


def test_chunked_prefill_equals_whole(tiny):
    ids = prompt_ids(37, seed=3)
    whole = tiny.model(torch.tensor([ids]))[0, -1]
    for chunk in (4, 9, 37):
        r = ModelRunner(tiny.model, 1, 64)
        for s in range(0, len(ids), chunk):
            e = r.chunk_end(ids, s, chunk)
            out = r.prefill_chunk(0, ids, s, e, need_logits=e == len(ids))
        assert (out.logits[0, -1] - whole).abs().max() < 1e-4
        # and one decode step on top matches the whole forward of the longer sequence
        nxt = int(whole.argmax())
        logits, _ = r.decode(torch.tensor([[nxt]]), torch.tensor([[len(ids)]]), len(ids) + 1)
        full = tiny.model(torch.tensor([ids + [nxt]]))[0, -1]
        assert (logits[0, -1] - full).abs().max() < 1e-4


def test_chunks_never_split_a_vision_block(tiny):
    r = ModelRunner(tiny.model, 1, 64)
    img = tiny.config.image_token_id
    ids = [2, 5, 6] + [img] * 6 + [7, 8]
    assert r.chunk_end(ids, 0, 4) == 9          # would cut the run at 4: extended to its end
    assert r.chunk_end(ids, 0, 3) == 3          # ends right before the run: fine
    assert r.chunk_end(ids, 9, 4) == 11


# --- stops, text, finish reasons -----------------------------------------------------------------------------

def test_stop_string_spanning_tokens_never_leaks():
    m = MockModel(sharpness=4.0)
    prompt = TOK.encode("stop strings", add_bos=True)
    text = TOK.decode(m.reference_greedy(prompt, 30, eos=None), skip_special_tokens=True)
    # a 3-byte stop string is always spread over 3 byte tokens
    stop = next(text[i:i + 3] for i in range(5, len(text)) if "\ufffd" not in text[i:i + 3] and len(text[i:i + 3]) == 3)
    eng = mock_engine(m)
    events = list(eng.generate_stream(Request(prompt, greedy(30, stop=[stop])), forget=False))
    out = eng.output(events[-1].request_id)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and text.startswith(out.text)
    assert "".join(e.text for e in events) == out.text
    assert out.text == text[: text.index(stop)]


def test_streaming_text_is_utf8_safe_and_equals_full_decode():
    phrase = "héllo wörld テスト 🙂 "
    m = MockModel(period=len(phrase.encode()), copy_bonus=30.0, sharpness=1.0)
    prompt = TOK.encode(phrase * 2, add_bos=True)
    eng = mock_engine(m)
    events = list(eng.generate_stream(Request(prompt, greedy(40)), forget=False))
    out = eng.output(events[-1].request_id)
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == TOK.decode(out.token_ids) == out.text
    assert any(len(e.text.encode()) > 1 for e in events)  # multi-byte characters were assembled
    assert "テスト" in out.text


def test_finish_reasons_and_usage():
    m = MockModel()
    prompt = TOK.encode("abc", add_bos=True)
    eng = mock_engine(m, max_model_len=20)
    a = eng.add(Request(prompt, greedy(5, ignore_eos=True)))
    b = eng.add(Request(prompt, greedy(None, ignore_eos=True)))         # runs into the context limit
    first = m.reference_greedy(prompt, 1)[0]
    c = eng.add(Request(prompt, greedy(10, stop_token_ids=[first])))    # stops on its first token
    outs = eng.run_until_done()
    assert outs[a].finish_reason == "length" and outs[a].usage.completion_tokens == 5
    assert outs[b].finish_reason == "length" and len(prompt) + len(outs[b].token_ids) == 20
    assert outs[c].finish_reason == "stop" and outs[c].token_ids == [first] and outs[c].text == ""
    u = outs[a].usage
    assert (u.prompt_tokens, u.total_tokens, u.cached_tokens) == (len(prompt), len(prompt) + 5, 0)


def test_eos_from_eos_ids():
    p = torch.full((TOK.__len__(),), 1e-6)
    p[EOS] = 1.0
    eng = mock_engine(MockModel(fixed_probs=p / p.sum()))
    rid = eng.add(Request([BOS, 10, 11], greedy(10)))
    out = eng.run_until_done()[rid]
    assert out.token_ids == [EOS] and out.finish_reason == "stop" and out.stop_reason == EOS


def test_cancel_frees_slot_and_reports():
    eng = mock_engine(max_slots=2)
    a = eng.add(Request(TOK.encode("one", add_bos=True), greedy(50, ignore_eos=True)))
    b = eng.add(Request(TOK.encode("two", add_bos=True), greedy(50, ignore_eos=True)))
    for _ in range(3):
        eng.step()
    assert len(eng.scheduler.slots) == 2
    assert eng.cancel(a)
    assert len(eng.scheduler.slots) == 1 and eng.scheduler.slots[0].id == b and eng.scheduler.slots[0].slot == 0
    evs = eng.step()
    final = [e for e in evs if e.request_id == a]
    assert len(final) == 1 and final[0].finish_reason == "cancelled" and final[0].token_id is None
    assert not eng.cancel(a)
    out = eng.run_until_done()
    assert out[b].finish_reason == "length" and len(out[b].token_ids) == 50


def test_logprobs_match_model_distribution():
    m = MockModel(sharpness=2.0)
    prompt = TOK.encode("logprobs", add_bos=True)
    eng = mock_engine(m)
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=6, logprobs=True, top_logprobs=3)
    events = list(eng.generate_stream(Request(prompt, params)))
    seq = list(prompt)
    for ev in events:
        lp = (m.run(torch.tensor([seq])).logits[0, -1] / 0.7).log_softmax(-1)
        assert abs(ev.logprob - float(lp[ev.token_id])) < 1e-4
        top = lp.topk(3)
        assert [t for t, _ in ev.top_logprobs] == top.indices.tolist()
        assert all(abs(a - b) < 1e-4 for (_, a), b in zip(ev.top_logprobs, top.values.tolist()))
        seq.append(ev.token_id)


def test_request_validation():
    eng = mock_engine(max_model_len=16)
    with pytest.raises(ValueError, match="non-empty"):
        eng.add(Request([]))
    with pytest.raises(ValueError, match="does not fit"):
        eng.add(Request([BOS] * 16))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add(Request([BOS, 10_000]))
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(MockModel(), None, [EOS], speculative=None).add(Request([BOS], SamplingParams(stop=["x"])))
    with pytest.raises(ValueError, match="speculative"):
        mock_engine(speculative="bogus")
    with pytest.raises(ValueError, match="needs a drafter"):
        mock_engine(speculative="mtp")


def test_media_prompt_through_engine():
    """Placeholders take their soft tokens from the request's media; the embedded prompt is prefilled in chunks."""
    m = MockModel(sharpness=4.0)
    prompt = TOK.encode("look:", add_bos=True) + [IMG] * 5 + TOK.encode(" now")
    outs = []
    for pix in (torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])):
        eng = mock_engine(m, prefill_chunk=4)
        rid = eng.add(Request(prompt, greedy(12), media={"pixel_values": pix}))
        outs.append(eng.run_until_done()[rid].token_ids)
        # the reference: one stateless forward per step with the same media
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(m.run(torch.tensor([seq]), pixel_values=pix).logits[0, -1].argmax()))
        assert outs[-1] == seq[len(prompt):]
    assert outs[0] != outs[1]


def test_stream_closed_early_frees_the_slot():
    eng = mock_engine(max_slots=2)
    stream = eng.generate_stream(Request(TOK.encode("early", add_bos=True), greedy(50, ignore_eos=True)), False)
    first = [next(stream) for _ in range(3)]
    assert len(eng.scheduler.slots) == 1
    stream.close()
    assert eng.scheduler.slots == [] and not eng.has_work
    assert eng.output(first[0].request_id).finish_reason == "cancelled"


# --- packed CPU weights (multi-token steps) ------------------------------------------------------------------

def test_packed_linear_matches_linear_and_follows_its_weight():
    """PackedLinear: the packed copy serves 2+ rows without grad, F.linear the rest; results equal nn.Linear's; a
    weight changed in place or replaced is repacked; copies, pickles and state dicts are those of an nn.Linear."""
    import copy
    import io

    import torch.nn.functional as F

    from unigemma.engine.runner import PackedLinear, pack_linear_weights, packing_available

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Linear(40, 24, bias=False))
    keys = list(net.state_dict())
    if not packing_available():  # a torch build without oneDNN: nothing is packed, the model is untouched
        assert pack_linear_weights(net) == 0 and type(net[0]) is torch.nn.Linear
        return
    assert pack_linear_weights(net, min_size=40 * 48 + 1) == 0  # only weights of at least min_size elements
    assert pack_linear_weights(net, max_bytes=100) == 0         # the copies would exceed the budget
    assert type(net[0]) is torch.nn.Linear
    assert pack_linear_weights(net) == 2
    assert isinstance(net[0], PackedLinear) and isinstance(net[0], torch.nn.Linear) and list(net.state_dict()) == keys

    def ref(x):
        return F.linear(F.linear(x, net[0].weight, net[0].bias), net[1].weight)

    for shape in [(1, 48), (2, 48), (5, 48), (9, 48), (1, 7, 48), (3, 4, 48), (48,)]:
        x = torch.randn(shape)
        assert torch.allclose(net(x), ref(x), atol=1e-5), shape
    # routing: a stand-in packed copy (of 2·W) shows which path each call takes
    lin = net[1]
    lin.repack()
    real, key = lin._packed, lin._packed_key
    lin._packed = torch.ops.mkldnn._reorder_linear_weight(2 * lin.weight.detach(), 8)
    x = torch.randn(4, 40)
    assert torch.allclose(lin(x), 2 * F.linear(x, lin.weight), atol=1e-5)   # several rows: the packed copy
    assert torch.allclose(lin(x[:1]), F.linear(x[:1], lin.weight))          # one row: the weight itself
    with torch.enable_grad():
        w_grad = lin(x.requires_grad_()).sum()
        assert torch.allclose(w_grad, F.linear(x, lin.weight).sum(), atol=1e-4)  # grad mode: the weight itself
        w_grad.backward()
        assert lin.weight.grad is not None
    lin.weight.grad = None
    lin._packed, lin._packed_key = real, key
    # the weight changes in place (load_state_dict, optimizer steps) or is replaced: the copy follows
    with torch.no_grad():
        lin.weight.mul_(-3.0)
    x = torch.randn(6, 40)
    assert torch.allclose(lin(x), F.linear(x, lin.weight), atol=1e-5)
    lin.weight.data = torch.randn(24, 40).t().contiguous().t()
    assert torch.allclose(lin(x), F.linear(x, lin.weight), atol=1e-5)
    # deep copies and pickles carry the weights, not the opaque packed copy (rebuilt on first use)
    x = torch.randn(3, 48)
    twin = copy.deepcopy(net)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert torch.allclose(other(x), net(x), atol=1e-6)


def test_packed_verify_step_matches_the_whole_forward(tmp_path):
    """A verification-shaped decode step (T = 1 + k tokens past the sliding window) through packed weights gives
    the logits of the plain no-cache forward computed before anything was packed; one-token steps still match."""
    from unigemma.engine.runner import PackedLinear, packing_available

    make_reference("kvshare", tmp_path, seed=4)
    llm = unigemma.load(tmp_path, device="cpu", dtype="float32")
    ids = prompt_ids(30, seed=5)
    drafts = prompt_ids(8, seed=6)[1:]
    whole = llm.model(torch.tensor([ids + drafts]))[0]           # before packing: plain nn.Linear
    r = ModelRunner(llm.model, 2, 64, cpu_packed=True)
    assert (r.packed > 0) == packing_available()
    if r.packed:
        assert isinstance(llm.model.language_model.layers[0].mlp.down_proj, PackedLinear)
    for s in range(0, len(ids) - 1, 6):
        e = min(s + 6, len(ids) - 1)
        r.prefill_chunk(1, ids, s, e, need_logits=False)
    r.cache.copy_slot(1, 0)  # decode runs over rows 0..B−1
    L = len(ids) - 1
    for T in (1, 3, 5, 8):
        toks = torch.tensor([ids[-1:] + drafts[: T - 1]])
        logits, _ = r.decode(toks, torch.arange(L, L + T)[None], L + T)
        assert (logits[0] - whole[L:L + T]).abs().max() < 1e-4, T
        r.cache.truncate(0, L)  # rejected: roll back, the next T writes the same positions again


def test_packed_weights_are_packed_once_under_inference_mode(tmp_path, monkeypatch):
    """An engine built and stepped under torch.inference_mode() (as servers do) packs each weight once: the key
    taken at packing matched the key forward computes only outside inference mode, so every multi-row product
    repacked its weight (70% of a batch-8 CPU decode step went there)."""
    from unigemma.engine.runner import PackedLinear, packing_available

    if not packing_available():
        pytest.skip("this torch build has no oneDNN packing")
    make_reference("kvshare", tmp_path, seed=1)
    llm = unigemma.load(tmp_path, device="cpu", dtype="float32")
    count = {"n": 0}
    real = PackedLinear.repack

    def counted(self):
        count["n"] += 1
        real(self)

    monkeypatch.setattr(PackedLinear, "repack", counted)
    with torch.inference_mode():
        eng = Engine(llm.model, None, [], max_slots=4, max_model_len=128, speculative=None, prefix_cache=False,
                     cpu_packed=True)
        packed = eng.runner.packed
        assert packed > 0 and count["n"] == packed
        rids = [eng.add(Request(prompt_ids(12, seed=s), greedy(10, ignore_eos=True))) for s in range(4)]
        while eng.has_work:
            eng.step()
    assert all(eng.output(r).finish_reason == "length" for r in rids)
    assert count["n"] == packed  # one packing per weight, however many batched steps ran
