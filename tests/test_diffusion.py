"""DiffusionGemma (`diffusion_gemma`) against transformers 5.24.0's DiffusionGemmaForBlockDiffusion (test-only).

A tiny random checkpoint (refmodels.make_diffusion_reference: MoE in every layer, k_eq_v full layers, window 8, canvas
8) is loaded by `unigemma.load`; its encoder and denoiser logits are compared in float32, and seeded `llm.generate`
is compared token for token with the reference's `generate` after `torch.manual_seed(seed)`.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import unigemma
from refmodels import DIFFUSION_GENERATION, make_diffusion_reference
from unigemma.config import ConfigError, DiffusionConfig
from unigemma.engine.diffusion import DiffusionOptions
from unigemma.model.layers import softcap

pytestmark = pytest.mark.usefixtures("no_grad")

L = 8  # canvas_length


@pytest.fixture(scope="module")
def diff(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusion") / "dg"
    ref = make_diffusion_reference(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = unigemma.load(path, device="cpu")
    return ref, llm, path


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [2] + torch.randint(3, 128, (n - 1,), generator=g).tolist()


def test_loads_as_diffusion_with_checkpoint_names(diff):
    ref, llm, path = diff
    assert isinstance(llm.config, DiffusionConfig) and llm.config.canvas_length == L
    t = llm.config.text
    assert t.enable_moe_block and t.attention_k_eq_v and t.layer_head_dim == [16, 32, 16, 32]
    assert t.layer_kv_heads == [2, 1, 2, 1] and t.final_logit_softcapping == 30.0
    # the encoder's own layer scalars were loaded (they differ from the decoder's in this random checkpoint)
    enc = [m.layer_scalar.item() for m in llm.model.model.encoder.language_model.layers]
    dec = [layer.layer_scalar.item() for layer in llm.model.model.decoder.layers]
    ref_enc = [layer.layer_scalar.item() for layer in ref.model.encoder.language_model.layers]
    assert enc == ref_enc and enc != dec
    assert llm.model.lm_head.weight is llm.model.model.decoder.embed_tokens.weight


@pytest.mark.parametrize("prompt_len", [5, 13])  # inside and past the sliding window (8)
def test_encoder_and_denoiser_logits_match_reference(diff, prompt_len):
    ref, llm, _ = diff
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.tensor([prompt(prompt_len, 0), prompt(prompt_len, 1)])
    canvas = torch.randint(0, 128, (2, L), generator=g)
    sc = torch.randn(2, L, 128, generator=g) * 4
    m = llm.model
    # encoder: final hidden states and the logits the LM head makes of them
    enc_ref = ref.model.encoder(input_ids=ids).last_hidden_state
    cache = m.make_cache(2, prompt_len + L)
    enc = m.encode(ids, torch.arange(prompt_len)[None].expand(2, -1), cache)
    enc_logits_ref = softcap(ref.lm_head(enc_ref), 30.0)
    assert (enc - enc_ref).abs().max().item() <= 1e-4
    assert (softcap(m.lm_head(enc), 30.0) - enc_logits_ref).abs().max().item() <= 1e-4
    # denoiser: first step (no self-conditioning) and a later one, through `llm.model(...)` as the reference's forward
    for scl in (None, sc):
        want = ref(input_ids=ids, decoder_input_ids=canvas, self_conditioning_logits=scl).logits
        got = m(ids, canvas, scl)
        assert got.dtype == torch.float32 and got.shape == (2, L, 128)
        assert (got - want).abs().max().item() <= 1e-4
    # the cache-reading denoise equals the one-shot forward, and leaves the cache as it was
    before = [lk.k.clone() for lk in cache.layers]
    got = m.denoise(canvas, torch.arange(prompt_len, prompt_len + L)[None].expand(2, -1), cache, prompt_len, sc)
    assert torch.equal(got, m(ids, canvas, sc))
    assert all(torch.equal(a, lk.k) for a, lk in zip(before, cache.layers))
    # one row at a time (as generate runs), bit-identical: the same keys in the same order as the reference's
    # cache (attention.build_prefix_plan). The batch above is not: the reference runs an expert on the tokens of
    # the whole batch at once, unigemma on each row's apart (moe.Experts.forward), and CPU products round rows
    # differently when an expert gets only one or two.
    for b in range(2):
        assert torch.equal(m.encode(ids[b:b + 1], torch.arange(prompt_len)[None], m.make_cache(1, prompt_len + L)),
                           ref.model.encoder(input_ids=ids[b:b + 1]).last_hidden_state)
        for scl in (None, sc[b:b + 1]):
            want = ref(input_ids=ids[b:b + 1], decoder_input_ids=canvas[b:b + 1], self_conditioning_logits=scl).logits
            assert torch.equal(m(ids[b:b + 1], canvas[b:b + 1], scl), want)


def _reference_tokens(ref, ids: list[int], max_new: int, seed: int) -> list[int]:
    """The reference's new tokens after torch.manual_seed(seed), cut after the first EOS (it pads the rest)."""
    torch.manual_seed(seed)
    out = ref.generate(torch.tensor([ids]), max_new_tokens=max_new).sequences[0, len(ids):].tolist()
    eos = DIFFUSION_GENERATION["eos_token_id"]
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def test_seeded_generate_equals_reference_generate(diff):
    # The checkpoint's self-conditioning is at full random scale, so its denoising chain is chaotic (each step
    # feeds its logits back and amplifies a difference of one ulp about 20x): equal tokens need bit-identical
    # forwards, not close ones.
    ref, llm, _ = diff
    multi = 0
    for seed in range(8):
        ids = prompt(11, seed)
        want = _reference_tokens(ref, ids, 3 * L, seed)
        res = llm.generate(ids, max_tokens=3 * L, seed=seed)
        assert res.token_ids == want, f"seed {seed}"
        assert res.finish_reason == ("stop" if want[-1] in DIFFUSION_GENERATION["eos_token_id"] else "length")
        multi += len(want) > L
    assert multi >= 2  # at least two seeds ran past the first canvas (two or more canvases compared)
    # the same seed twice gives the same tokens; another seed other tokens
    a = llm.generate(prompt(11, 0), max_tokens=2 * L, seed=5, ignore_eos=True).token_ids
    assert a == llm.generate(prompt(11, 0), max_tokens=2 * L, seed=5, ignore_eos=True).token_ids
    assert a != llm.generate(prompt(11, 0), max_tokens=2 * L, seed=6, ignore_eos=True).token_ids


def test_options_override_generation_config_like_the_reference(diff):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    ref, llm, _ = diff
    ids = prompt(9, 3)
    kw = dict(max_denoising_steps=3, t_min=0.2, t_max=1.1, entropy_bound=1.5, stability_threshold=0)
    torch.manual_seed(7)
    want = ref.generate(torch.tensor([ids]), max_new_tokens=2 * L, **{k: v for k, v in kw.items()
                                                                      if k != "entropy_bound"},
                        sampler_config=EntropyBoundSamplerConfig(entropy_bound=1.5))
    want = want.sequences[0, len(ids):].tolist()
    got = llm.generate(ids, max_tokens=2 * L, seed=7, ignore_eos=True, **kw).token_ids
    assert got == want


def test_max_tokens_stop_strings_and_stream_chunks_per_canvas(diff):
    _, llm, _ = diff
    ids = prompt(11, 2)
    full = llm.generate(ids, max_tokens=3 * L, seed=1, ignore_eos=True)
    assert len(full.token_ids) == 3 * L and full.finish_reason == "length"
    cut = llm.generate(ids, max_tokens=L + 3, seed=1, ignore_eos=True)
    assert cut.token_ids == full.token_ids[: L + 3] and cut.finish_reason == "length"
    chunks = list(llm.generate(ids, max_tokens=3 * L, seed=1, ignore_eos=True, stream=True))
    assert [len(c.token_ids) for c in chunks] == [L, L, L]  # one chunk per finished canvas
    assert sum((c.token_ids for c in chunks), []) == full.token_ids and chunks[-1].finish_reason == "length"
    stop_at = full.token_ids[L + 2]
    res = llm.generate(ids, max_tokens=3 * L, seed=1, ignore_eos=True, stop_token_ids=[stop_at])
    assert res.token_ids == full.token_ids[: full.token_ids.index(stop_at) + 1] and res.finish_reason == "stop"


def test_options_resolution_and_errors(diff, tmp_path):
    _, llm, _ = diff
    o = DiffusionOptions.resolve(llm.generation_config)
    assert (o.max_denoising_steps, o.entropy_bound, o.t_min, o.t_max) == (6, 0.5, 0.4, 0.8)
    assert DiffusionOptions.resolve({}) == DiffusionOptions()  # the reference's defaults: 48 steps, 0.8 → 0.4, ...
    assert DiffusionOptions.resolve({}, t_max=1.0).t_max == 1.0
    with pytest.raises(ValueError, match="t_max"):
        llm.generate([2, 5], max_tokens=4, t_min=0.9, t_max=0.5)
    with pytest.raises(ValueError, match="max_denoising_steps"):
        llm.generate([2, 5], max_tokens=4, max_denoising_steps=0)
    with pytest.raises(ValueError, match="unknown diffusion option"):
        DiffusionOptions.resolve({}, steps=3)
    with pytest.raises(ValueError, match="temperature.*block-diffusion"):
        llm.generate([2, 5], max_tokens=4, temperature=0.5)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate([2, 5], max_tokens=4, logprobs=True)
    with pytest.raises(ValueError, match="text only"):
        llm.model(torch.tensor([[2, 5]]), pixel_values=torch.zeros(1, 4, 768))
    with pytest.raises(ValueError, match="DiffusionGemma.*drafter"):
        unigemma.load(diff[2], device="cpu", drafter=tmp_path)


def test_config_validation():
    base = {"model_type": "diffusion_gemma", "canvas_length": 8,
            "text_config": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "top_k_experts": 2,
                            "moe_intermediate_size": 16}}
    c = DiffusionConfig.from_dict(base)
    assert c.text.layer_head_dim == [16, 512] and c.text.sliding_window == 512
    with pytest.raises(ConfigError, match="num_experts"):
        DiffusionConfig.from_dict({**base, "text_config": {**base["text_config"], "num_experts": None}})
    with pytest.raises(ConfigError, match="canvas_length"):
        DiffusionConfig.from_dict({**base, "canvas_length": 0})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        DiffusionConfig.from_dict({**base, "tie_word_embeddings": False})
    with pytest.raises(ConfigError, match="diffusion_gemma"):
        from unigemma.config import UnifiedConfig

        UnifiedConfig.from_dict({"model_type": "llama"})


# --- chat, server, CLI: a tiny diffusion checkpoint with the tiny tokenizer -------------------------------------

@pytest.fixture(scope="module")
def chat_diff(tmp_path_factory):
    import copy
    import json

    from refmodels import DIFFUSION_TEXT, randomize
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from unigemma.inputs.tokenizer import Tokenizer
    from unigemma.testing import write_tiny_tokenizer

    path = tmp_path_factory.mktemp("diffusion_chat") / "dg"
    ids = write_tiny_tokenizer(path)
    text = {**copy.deepcopy(DIFFUSION_TEXT), "vocab_size": len(Tokenizer.from_dir(path)),
            "pad_token_id": ids["pad_token"], "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"]}
    torch.manual_seed(0)
    ref = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=None,
                                                               canvas_length=L)).eval()
    randomize(ref, 0)
    ref.save_pretrained(str(path))
    gen = {**DIFFUSION_GENERATION, "eos_token_id": [ids["eos_token"], ids["eot_token"], ids["str_token"]]}
    (path / "generation_config.json").write_text(json.dumps(gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unigemma.load(path, device="cpu"), path


def test_chat_and_its_refusals(chat_diff):
    llm, _ = chat_diff
    msgs = [{"role": "user", "content": "hello there"}]
    a = llm.chat(msgs, max_tokens=2 * L, seed=3, ignore_eos=True)
    b = llm.chat(msgs, max_tokens=2 * L, seed=3, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 2 * L and (a.content, a.reasoning) == (b.content,
                                                                                                   b.reasoning)
    chunks = list(llm.chat(msgs, max_tokens=2 * L, seed=3, ignore_eos=True, stream=True))
    assert "".join(c.content for c in chunks) == a.content and chunks[-1].finish_reason == a.finish_reason
    other = llm.chat(msgs, max_tokens=2 * L, seed=3, ignore_eos=True, max_denoising_steps=2, entropy_bound=2.0)
    assert other.token_ids != a.token_ids  # the options reach the sampler
    with pytest.raises(ValueError, match="response_format.*DiffusionGemma"):
        llm.chat(msgs, response_format={"type": "json_object"})


def test_server_chunk_per_canvas_and_400s(chat_diff):
    import openai

    from test_server import LiveServer
    from unigemma.server import ServerSettings

    llm, _ = chat_diff
    settings = ServerSettings(model_name="dg", max_model_len=256, max_concurrency=2)
    with LiveServer(llm, settings) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "hello"}]
        kw = dict(model="dg", messages=msgs, max_tokens=3 * L, seed=4, extra_body={"ignore_eos": True})
        full = client.chat.completions.create(**kw)
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 3 * L
        chunks = list(client.chat.completions.create(stream=True, **kw))
        texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(texts) == full.choices[0].message.content
        assert 1 <= len(texts) <= 3  # one content chunk per finished canvas (a canvas of special tokens shows none)
        for bad in (dict(response_format={"type": "json_object"}), dict(temperature=0.3)):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="dg", messages=msgs, max_tokens=4, **bad)
            assert "DiffusionGemma" in str(e.value)


def test_cli_generate_with_diffusion_options(chat_diff, capsys, tmp_path):
    import json

    from unigemma.cli import main

    _, path = chat_diff
    base = ["generate", "--model", str(path), "--device", "cpu", "--prompt", "hi", "--max-tokens", str(2 * L),
            "--seed", "2", "--json"]
    assert main(base + ["--max-denoising-steps", "3", "--entropy-bound", "1.0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["usage"]["completion_tokens"] <= 2 * L and out["finish_reason"] in ("stop", "length", "tool_calls")
    schema = tmp_path / "s.json"
    schema.write_text("{}")
    assert main(base + ["--json-schema", str(schema)]) != 0
    assert "not supported for DiffusionGemma" in capsys.readouterr().err


def test_batched_requests_equal_single_runs(diff):
    from unigemma.engine.diffusion import DiffusionEngine
    from unigemma.engine.sampling import SamplingParams
    from unigemma.engine.scheduler import Request

    _, llm, _ = diff
    reqs = [(prompt(11, 0), 0, {}), (prompt(5, 1), 1, {}), (prompt(14, 2), 2, {}),
            (prompt(9, 3), 3, {"max_denoising_steps": 3})]  # other options: denoised in its own batch
    single = [llm.generate(ids, max_tokens=3 * L, seed=seed, **kw).token_ids for ids, seed, kw in reqs]
    eng = DiffusionEngine(llm.model, None, llm.eos_token_ids, max_slots=3, max_model_len=128,
                          generation_config=llm.generation_config)
    rids = [eng.add(Request(ids, SamplingParams(seed=seed, max_tokens=3 * L),
                            diffusion={**kw} or None)) for ids, seed, kw in reqs]
    batch_sizes = []
    orig = eng.model.denoise

    def spy(canvas, *a, **k):
        batch_sizes.append(canvas.shape[0])
        return orig(canvas, *a, **k)

    eng.model.denoise = spy
    try:
        out = eng.run_until_done()
    finally:
        del eng.model.denoise
    assert [out[r].token_ids for r in rids] == single
    assert max(batch_sizes) == 3  # three requests shared denoiser forwards (the fourth waited for a slot)
    # a cancelled request frees its slot and ends with "cancelled"
    rid = eng.add(Request(prompt(7, 9), SamplingParams(seed=1, max_tokens=3 * L)))
    assert eng.cancel(rid) and eng.step()[0].finish_reason == "cancelled"


def test_stop_strings_cut_the_text(chat_diff):
    llm, _ = chat_diff
    full = llm.generate("hi", max_tokens=2 * L, seed=3, ignore_eos=True)
    word = full.text.strip()[3:6]
    assert len(word) == 3
    res = llm.generate("hi", max_tokens=2 * L, seed=3, ignore_eos=True, stop=[word])
    assert res.text == full.text[: full.text.index(word)] and res.finish_reason == "stop"
    assert len(res.token_ids) < len(full.token_ids)


# --- the denoiser with static shapes (what a CUDA graph captures) ------------------------------------------------

def _encoded(model, lens: list[int], room: int, dtype=None, device="cpu"):
    """A cache holding prompts of `lens` tokens in slots 0.. (random ids), ready for a canvas after each."""
    cache = model.make_cache(len(lens), room + L, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(7)
    for b, n in enumerate(lens):
        ids = torch.randint(3, 128, (1, n), generator=g).to(device)
        model.encode(ids, torch.arange(n, device=device)[None], cache, slots=torch.tensor([b], device=device))
    return cache


def test_static_denoiser_equals_the_eager_one(diff):
    """DenoiseGraphs without capture runs the forward a CUDA graph holds — rows padded to a power of two, each
    prefix front-padded to a fixed width, experts through F.grouped_mm — and gives the eager denoiser's logits
    (float32; not bit-equal: one masked attention call over padded keys rounds differently from the exact layout)."""
    from unigemma.engine.diffusion import DenoiseGraphs

    _, llm, _ = diff
    m = llm.model
    lens = [11, 5, 14]  # past the window (8) and inside it
    cache = _encoded(m, lens, room=64)
    kv = torch.tensor(lens)
    pos = kv[:, None] + torch.arange(L)[None]
    slots = torch.arange(3)
    canvas = torch.randint(0, 128, (3, L), generator=torch.Generator().manual_seed(1))
    graphs = DenoiseGraphs(m, cache, max_rows=4, capture=False)
    assert graphs.key(3, 14) == (4, 64)  # 3 rows → 4; prefix bucket 256, capped at the cache's room
    first = m.denoise(canvas, pos, cache, kv, None, slots)
    torch.testing.assert_close(graphs(canvas, pos, kv, None, slots, 14).clone(), first, atol=1e-4, rtol=0)
    sc = first / 0.7  # a self-conditioning step
    want = m.denoise(canvas, pos, cache, kv, sc, slots)
    torch.testing.assert_close(graphs(canvas, pos, kv, sc, slots, 14), want, atol=1e-4, rtol=0)
    # one row alone, in another bucket (1 row), and rows in another order
    torch.testing.assert_close(graphs(canvas[1:2], pos[1:2], kv[1:2], sc[1:2], slots[1:2], 5), want[1:2],
                               atol=1e-4, rtol=0)
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(graphs(canvas[order], pos[order], kv[order], sc[order], slots[order], 14),
                               want[order], atol=1e-4, rtol=0)
    assert set(graphs.buffers) == {4, 1}  # buffers per row count, shared by every prefix width


class _HostReads:
    """A dispatch mode recording ops that read a tensor back to the host or copy one from it (each would break a
    CUDA graph's capture, or stall it)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        class Mode(TorchDispatchMode):
            found: list

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.name()
                if name in ("aten::_local_scalar_dense", "aten::nonzero", "aten::unique_consecutive") or any(
                        isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves((args, kwargs))):
                    self.found.append(name)
                return func(*args, **kwargs)

        mode = Mode()
        mode.found = []
        return mode


def test_static_denoiser_reads_nothing_back_from_the_device(diff):
    """The captured forward, run on the meta device in bfloat16 (where any read of a value raises) under a mode
    that records host reads and host-to-device copies: none, at the first and a self-conditioning step. The eager
    denoiser, by contrast, reads the prefix lengths back (so this check can fail)."""
    import copy

    from unigemma.engine.diffusion import DenoiseGraphs

    _, llm, _ = diff
    m = copy.deepcopy(llm.model).to(device="meta", dtype=torch.bfloat16)
    cache = m.make_cache(3, 64 + L, dtype=torch.bfloat16, device="meta")
    graphs = DenoiseGraphs(m, cache, max_rows=4, capture=False)
    kv = torch.full((3,), 14, device="meta")
    canvas = torch.zeros(3, L, dtype=torch.long, device="meta")
    pos = torch.zeros(3, L, dtype=torch.long, device="meta")
    slots = torch.arange(3, device="meta")
    sc = torch.zeros(3, L, m.config.text.vocab_size, dtype=torch.bfloat16, device="meta")
    graphs(canvas, pos, kv, None, slots, 14)  # warm-up, as before a capture: lazy device tables are made here
    graphs(canvas, pos, kv, sc, slots, 14)
    with _HostReads() as mode:
        out = graphs(canvas, pos, kv, None, slots, 14)
        out = graphs(canvas, pos, kv, sc, slots, 14)
    assert out.shape == (3, L, m.config.text.vocab_size) and mode.found == []
    with pytest.raises(RuntimeError, match="meta"):
        m.denoise(canvas, pos, cache, kv, sc, slots)
    with _HostReads() as mode:
        torch.ones(2).to("meta")
    assert mode.found  # the mode sees a host-to-device copy


def test_engine_with_the_static_denoiser(diff):
    """DiffusionEngine(static_shapes=True) generates through DenoiseGraphs (no capture on the CPU): seeded runs
    repeat, batches share the padded forward, and cuda_graphs=True on the CPU is refused."""
    from unigemma.engine.diffusion import DiffusionEngine
    from unigemma.engine.sampling import SamplingParams
    from unigemma.engine.scheduler import Request

    _, llm, _ = diff

    def run():
        eng = DiffusionEngine(llm.model, None, llm.eos_token_ids, max_slots=4, max_model_len=64,
                              generation_config=llm.generation_config, static_shapes=True)
        rids = [eng.add(Request(prompt(n, s), SamplingParams(seed=s, max_tokens=2 * L, ignore_eos=True)))
                for n, s in ((11, 0), (5, 1), (14, 2))]
        out = eng.run_until_done()
        return eng, [out[r].token_ids for r in rids]

    eng, a = run()
    _, b = run()
    assert a == b and all(len(t) == 2 * L for t in a)
    assert set(eng.graphs.buffers) == {4}  # three rows padded to four
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        DiffusionEngine(llm.model, None, llm.eos_token_ids, cuda_graphs=True)


def test_engine_falls_back_to_eager_when_graphs_fail(diff, monkeypatch):
    """A graph that cannot be captured (here: one that raises) costs a warning, not the requests: the engine goes
    on eagerly, with each request's random numbers restored, so the tokens are the eager engine's."""
    from unigemma.engine import diffusion as dmod
    from unigemma.engine.sampling import SamplingParams
    from unigemma.engine.scheduler import Request

    _, llm, _ = diff

    def run(**kw):
        eng = dmod.DiffusionEngine(llm.model, None, llm.eos_token_ids, max_slots=2, max_model_len=64,
                                   generation_config=llm.generation_config, **kw)
        rids = [eng.add(Request(prompt(n, s), SamplingParams(seed=s, max_tokens=2 * L, ignore_eos=True)))
                for n, s in ((11, 0), (5, 1))]
        out = eng.run_until_done()
        return eng, [out[r].token_ids for r in rids]

    _, want = run()

    def broken(self, *a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(dmod.DenoiseGraphs, "__call__", broken)
    with pytest.warns(RuntimeWarning, match="CUDA graphs failed .*denoising eagerly"):
        eng, got = run(static_shapes=True)
    assert got == want and eng.graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_denoiser_replays_the_static_forward(diff):
    """On a GPU, bfloat16: each captured graph's logits equal the same static forward run without a graph, bit for
    bit, at the first and a self-conditioning step and for a smaller batch; the engine's default (graphs) returns
    the tokens of the engine running the same forward without capture."""
    import copy

    from unigemma.engine.diffusion import DenoiseGraphs, DiffusionEngine
    from unigemma.engine.sampling import SamplingParams
    from unigemma.engine.scheduler import Request

    _, llm, _ = diff
    dev = torch.device("cuda")
    m = copy.deepcopy(llm.model).to(device=dev, dtype=torch.bfloat16)
    lens = [11, 5, 14]
    cache = _encoded(m, lens, room=64, dtype=torch.bfloat16, device=dev)
    kv = torch.tensor(lens, device=dev)
    pos = kv[:, None] + torch.arange(L, device=dev)[None]
    slots = torch.arange(3, device=dev)
    canvas = torch.randint(0, 128, (3, L), device=dev)
    eager, graphs = DenoiseGraphs(m, cache, 4, capture=False), DenoiseGraphs(m, cache, 4, capture=True)
    want = eager(canvas, pos, kv, None, slots, 14).clone()
    assert torch.equal(graphs(canvas, pos, kv, None, slots, 14), want)
    sc = (want / 0.7).to(torch.bfloat16)
    want = eager(canvas, pos, kv, sc, slots, 14).clone()
    assert torch.equal(graphs(canvas, pos, kv, sc, slots, 14), want)
    one = eager(canvas[:1], pos[:1], kv[:1], sc[:1], slots[:1], 11).clone()
    assert torch.equal(graphs(canvas[:1], pos[:1], kv[:1], sc[:1], slots[:1], 11), one)
    assert torch.equal(graphs(canvas, pos, kv, sc, slots, 14), want)  # the 4-row graph again, after the 1-row one
    assert graphs.graph_keys == {(4, 64, True), (4, 64, False), (1, 64, False)}
    tokens = []
    for kw in ({}, {"cuda_graphs": False, "static_shapes": True}):
        eng = DiffusionEngine(m, None, llm.eos_token_ids, max_slots=3, max_model_len=64,
                              generation_config=llm.generation_config, **kw)
        rids = [eng.add(Request(prompt(n, s), SamplingParams(seed=s, max_tokens=2 * L, ignore_eos=True)))
                for n, s in ((11, 0), (5, 1), (14, 2))]
        out = eng.run_until_done()
        tokens.append([out[r].token_ids for r in rids])
        if not kw:  # the default on CUDA: graphs, captured (not fallen back to eager)
            assert eng.graphs is not None and eng.graphs.capture and eng.graphs.graph_keys
    assert tokens[0] == tokens[1]
