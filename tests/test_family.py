"""The Gemma 4 family's text stacks (`gemma4`, `gemma4_text`) vs the reference (transformers 5.24.0) on tiny
random checkpoints saved in the published format (refmodels.FAMILY):

    e      E2B / E4B style: per-layer input embeddings, KV sharing, double-wide MLP; vision and audio towers (tested
           in test_family_vision.py / test_family_audio.py)
    moe    26B-A4B style: router + 3-D experts beside the dense MLP, k_eq_v (a `gemma4_text` checkpoint)
    dense  31B style: dense, k_eq_v, untied LM head

fp32: max |Δlogit| ≤ 1e-4 (absolute) without the cache, through the cache (chunked prefill, decode
past the sliding window, a batch of mixed lengths through the runner), and greedy generations through the engine
identical to the reference's `generate` for 32 tokens.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

import unigemma
from refmodels import AUD, FAMILY, make_family_reference
from unigemma.config import ConfigError, UnifiedConfig
from unigemma.engine.generate import Engine, Request
from unigemma.engine.runner import ModelRunner
from unigemma.engine.sampling import SamplingParams
from unigemma.model import moe as moe_module
from unigemma.model.moe import graph_safe

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    made = {}
    for i, name in enumerate(FAMILY):
        ref = make_family_reference(name, root / name, seed=20 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            llm = unigemma.load(root / name, device="cpu", dtype="float32")
        made[name] = (ref, llm, root / name)
    return made


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(8, 99, (n - 1,), generator=g).tolist()


def close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """max |a − b| ≤ 1e-4, absolute (these models' logits stay below ~10)."""
    d = (a - b).abs().max().item()
    return d <= 1e-4, d


def experts_paths(llm, path):
    for layer in llm.model.language_model.layers:
        if getattr(layer, "has_moe", False):
            layer.experts.path = path


@pytest.mark.parametrize("name", list(FAMILY))
def test_fp32_logits_mixed_batch_past_window(family, name):
    """A left-padded batch of a 40-token and a 23-token prompt (window 8): every real position agrees."""
    ref, llm, _ = family[name]
    rows = [ids_of(40, 1), ids_of(23, 2)]
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    expected = ref(input_ids=ids, attention_mask=mask).logits
    paths = ["grouped", "gathered", "all", "grouped_mm"] if name == "moe" else [None]
    for p in paths:
        experts_paths(llm, p)
        ours = llm.model(ids, attention_mask=mask)
        ok, d = close(ours[mask.bool()], expected[mask.bool()])
        assert ok, f"{name} (experts {p}): max |Δ| = {d:.3g}"
    experts_paths(llm, None)


@pytest.mark.parametrize("name", list(FAMILY))
@pytest.mark.parametrize("bounds", [[0, 40], [0, 7, 17, 30, 31, 32, 36, 40], [0, 25] + list(range(26, 41))])
def test_cached_chunks_and_decode_equal_reference(family, name, bounds):
    """Prefill in chunks, then one-token steps past the window, through the cache into slot 1 of 3."""
    ref, llm, _ = family[name]
    ids = torch.tensor([ids_of(40, 3)])
    expected = ref(input_ids=ids).logits
    m = llm.model
    cache = m.make_cache(slots=3, max_len=64, spare=4)
    outs = [m.run(ids[:, a:b], position_ids=torch.arange(a, b)[None], cache=cache, slots=torch.tensor([1])).logits
            for a, b in zip(bounds[:-1], bounds[1:])]
    ok, d = close(torch.cat(outs, 1), expected)
    assert ok, f"{name} {bounds}: max |Δ| = {d:.3g}"


@pytest.mark.parametrize("name", list(FAMILY))
def test_runner_batched_decode_of_mixed_lengths(family, name):
    """Two sequences prefilled into their slots by the runner, then decoded together as one batch (rows at
    different positions) for 12 steps past the window; each row's logits equal the reference's."""
    ref, llm, _ = family[name]
    a, b = ids_of(36, 4), ids_of(21, 5)
    runner = ModelRunner(llm.model, max_slots=2, max_model_len=64, spare=4)
    runner.prefill_chunk(0, a, 0, 24)
    runner.prefill_chunk(1, b, 0, 9)
    got = [[], []]
    for s in range(12):
        tokens = torch.tensor([[a[24 + s]], [b[9 + s]]])
        pos = torch.tensor([[24 + s], [9 + s]])
        logits, _ = runner.decode(tokens, pos, kv_len=24 + s + 1)
        got[0].append(logits[0, -1]), got[1].append(logits[1, -1])
    for row, seq, start in ((0, a, 24), (1, b, 9)):
        expected = ref(input_ids=torch.tensor([seq])).logits[0, start:start + 12]
        ok, d = close(torch.stack(got[row]), expected)
        assert ok, f"{name} row {row}: max |Δ| = {d:.3g}"


@pytest.mark.parametrize("name", list(FAMILY))
def test_greedy_identical_to_reference_generate(family, name):
    """The engine (continuous batching, two prompts at once, chunked prefill) vs the reference's greedy
    `generate`, 32 new tokens each (far past the window of 8)."""
    ref, llm, _ = family[name]
    prompts = [ids_of(9, 6), ids_of(23, 7)]
    eng = Engine(llm.model, None, llm.eos_token_ids, max_slots=2, max_model_len=96, speculative=None,
                 prefill_chunk=8)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    rids = [eng.add(Request(p, params)) for p in prompts]
    outs = eng.run_until_done()
    for rid, p in zip(rids, prompts):
        expected = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None)
        assert outs[rid].token_ids == expected[0, len(p):].tolist(), name


@pytest.mark.parametrize("name", ["e", "moe"])
def test_speculative_verification_is_lossless(family, name):
    """Prompt-lookup speculation (verification steps of 1 + k tokens, rollback of rejected drafts in the ring
    and past KV-shared / MoE layers) on a repetitive prompt gives the reference's greedy tokens."""
    ref, llm, _ = family[name]
    p = ids_of(6, 13) * 4
    eng = Engine(llm.model, None, llm.eos_token_ids, max_slots=1, max_model_len=96, speculative="lookup",
                 num_draft_tokens=3, adaptive=False)
    rid = eng.add(Request(p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)))
    out = eng.run_until_done()[rid]
    expected = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert out.token_ids == expected[0, len(p):].tolist()
    assert out.usage.drafted_tokens > 0


def test_moe_paths_agree_and_read_only_chosen_experts(family):
    """The expert paths give the same outputs; gathered and grouped read only the chosen experts."""
    _, llm, _ = family["moe"]
    layer = next(l for l in llm.model.language_model.layers if l.has_moe)
    x = torch.randn(5, layer.experts.gate_up_proj.shape[-1])
    w, idx = layer.router(x)
    assert idx.shape == (5, 2) and torch.allclose(w.sum(-1) / 1, w.sum(-1))
    a = layer.experts._grouped(x, idx, w)
    b = layer.experts._gathered(x, idx, w)
    c = layer.experts._all(x, idx, w)
    d = layer.experts._grouped_mm(x, idx, w)
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5 and (a - d).abs().max() < 1e-5
    # an expert no token chose may hold anything (NaN here) without touching the result
    unused = sorted(set(range(layer.experts.num_experts)) - set(idx.flatten().tolist()))
    saved = layer.experts.gate_up_proj.data.clone()
    layer.experts.gate_up_proj.data[unused] = float("nan")
    try:
        assert torch.isfinite(layer.experts._gathered(x, idx, w)).all()
        assert torch.isfinite(layer.experts._grouped(x, idx, w)).all()
        assert torch.isfinite(layer.experts._grouped_mm(x, idx, w)).all()
        choose = layer.experts.choose_path
        assert choose(x, 2) == "grouped"  # on the CPU, whatever the size
        with graph_safe():  # what a CUDA graph runs: static shapes, no host sync
            assert choose(x, 2) == "grouped_mm" and choose(x.double(), 2) == "grouped_mm"
            with mock.patch.object(moe_module, "_GROUPED_MM", None):  # a torch without the op: the `all` path
                assert choose(x, 2) == "all"
        if hasattr(torch, "_grouped_mm"):  # a torch with only the private op computes the same products
            with mock.patch.object(moe_module, "_GROUPED_MM", torch._grouped_mm):
                assert (layer.experts._grouped_mm(x, idx, w) - d).abs().max() < 1e-6
    finally:
        layer.experts.gate_up_proj.data.copy_(saved)


def test_family_loading(family):
    _, e, path = family["e"]
    # both encoders are built (tests/test_family_vision.py, tests/test_family_audio.py); nothing is skipped
    assert e.config.model_type == "gemma4" and e.config.skipped_towers == ()
    assert e.config.vision_tower is not None and e.config.audio_tower is not None
    assert any(n.startswith("model.audio_tower.") for n, _ in e.model.named_parameters())
    with pytest.raises(ValueError, match="input_features must be"):  # 128 mel bins for an 8-channel tiny tower
        e.model(torch.tensor([[2, AUD, 5]]), input_features=torch.zeros(1, 4, 128),
                input_features_mask=torch.ones(1, 4, dtype=torch.bool))
    _, moe, _ = family["moe"]
    assert moe.config.model_type == "gemma4_text" and moe.config.is_text_only
    t = moe.config.text
    assert (t.enable_moe_block, t.num_experts, t.top_k_experts, t.moe_intermediate_size) == (True, 8, 2, 32)
    assert e.config.text.hidden_size_per_layer_input == 16


def test_family_config_errors():
    base = {"model_type": "gemma4_text", "num_hidden_layers": 2}
    with pytest.raises(ConfigError, match="num_experts"):
        UnifiedConfig.from_dict({**base, "enable_moe_block": True, "top_k_experts": 2, "moe_intermediate_size": 8})
    with pytest.raises(ConfigError, match="top_k_experts"):
        UnifiedConfig.from_dict({**base, "enable_moe_block": True, "num_experts": 2, "top_k_experts": 4,
                                 "moe_intermediate_size": 8})
    with pytest.raises(ConfigError, match="hidden_size_per_layer_input"):
        UnifiedConfig.from_dict({**base, "hidden_size_per_layer_input": "wide"})
    with pytest.raises(ConfigError, match="'gemma4_text'"):
        UnifiedConfig.from_dict({"model_type": "gemma3"})
    # the family's code defaults (a hand-written config may omit them)
    c = UnifiedConfig.from_dict(dict(base)).text
    assert (c.hidden_size_per_layer_input, c.sliding_window, c.use_bidirectional_attention) == (256, 512, None)


@pytest.mark.parametrize("path", ["grouped", "gathered", "all", "grouped_mm"])
def test_moe_runner_decode_either_expert_path(family, path):
    """The runner's batched decode through the cache with each expert path (gathered / all / grouped_mm: static
    shapes for CUDA graphs)."""
    ref, llm, _ = family["moe"]
    a, b = ids_of(30, 8), ids_of(15, 9)
    experts_paths(llm, path)
    try:
        runner = ModelRunner(llm.model, max_slots=2, max_model_len=64, spare=4)
        runner.prefill_chunk(0, a, 0, 20)
        runner.prefill_chunk(1, b, 0, 5)
        logits, _ = runner.decode(torch.tensor([[a[20]], [b[5]]]), torch.tensor([[20], [5]]), kv_len=21)
    finally:
        experts_paths(llm, None)
    for row, seq, t in ((0, a, 20), (1, b, 5)):
        expected = ref(input_ids=torch.tensor([seq])).logits[0, t]
        ok, d = close(logits[row, -1], expected)
        assert ok, f"{path} row {row}: max |Δ| = {d:.3g}"


@pytest.mark.parametrize("name", ["e", "moe"])
def test_quantize_on_load_runs(family, name):
    """int8 quantization of the decoder linears and the experts works on the family's layers; the router and the
    PLE table stay float. (Agreement is loose: these tiny random models amplify int8 rounding — the dense one
    agrees on ~90% of top-1 tokens, MoE less, since rounding flips near-ties in the router.)"""
    from unigemma.quant import QuantExperts, QuantLinear

    ref, _, path = family[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = unigemma.load(path, device="cpu", dtype="float32", quantize="int8")
    layer = q.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, QuantLinear) and isinstance(layer.self_attn.q_proj, QuantLinear)
    if name == "moe":
        assert isinstance(layer.experts.gate_up_proj, QuantExperts) and layer.experts.down_proj.bits == 8
        assert layer.router.proj.weight.dtype == torch.float32
    ids = torch.tensor([ids_of(30, 10)])
    expected = ref(input_ids=ids).logits
    got = q.model(ids)
    assert torch.isfinite(got).all()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.6


def test_quantized_family_checkpoint_roundtrip(family, tmp_path):
    """`unigemma quantize` on a `gemma4` checkpoint (towers carried along as they are) loads, skipping the
    towers again, and computes what quantize-on-load computes."""
    from unigemma.quant import quantize_checkpoint

    _, _, path = family["e"]
    quantize_checkpoint(path, tmp_path / "q", "int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = unigemma.load(tmp_path / "q", device="cpu", dtype="float32")
        on_load = unigemma.load(path, device="cpu", dtype="float32", quantize="int8")
    ids = torch.tensor([ids_of(20, 15)])
    assert torch.equal(saved.model(ids), on_load.model(ids))


def test_inspect_knows_the_family_by_name():
    from unigemma.inspect import format_report, inspect_config, resolve

    want = {"gemma4-e2b": (4.63e9, 2.28e9), "e4b": (7.46e9, 4.64e9), "gemma4-26b-a4b": (25.23e9, 3.82e9),
            "31b": (30.70e9, 30.70e9)}
    for name, (total, active) in want.items():
        cfg, path = resolve(name)
        assert path is None and cfg.model_type == "gemma4_text"
        info = inspect_config(cfg)
        assert abs(info["parameters"] - total) < 0.01e9 and abs(info["active_parameters"] - active) < 0.01e9, name
        fmt = info["weight_bytes_by_format"]
        assert fmt["bf16"] > fmt["int8"] > fmt["int4"]
        assert info["kv_bytes_per_token"]["full"] > 0
        text = format_report(info)
        assert "active per token" in text and "int4" in text
    assert inspect_config(resolve("26b-a4b")[0])["experts"] == {"num_experts": 128, "top_k": 8,
                                                                 "moe_intermediate_size": 704}
    with pytest.raises(ValueError, match="known: e2b"):
        from unigemma.config import gemma4_family_config
        gemma4_family_config("7b")


def test_fine_tune_and_lora_on_a_family_model(tmp_path):
    """Training works unchanged on the family's layers: a gemma4_text model with PLE *and* MoE (and KV sharing)
    fine-tunes (loss falls, gradients reach experts / router / per-layer inputs, gradient checkpointing gives
    the same gradients), LoRA trains and the result loads."""
    from test_train import arithmetic_jsonl, make_checkpoint, run_cfg
    from unigemma.checkpoint import build_model
    from unigemma.train.loop import CausalLMLoss, train

    torch.set_grad_enabled(True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = {"model_type": "gemma4_text", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 48,
               "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
               "global_head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 30.0, "eos_token_id": [1, 16],
               "layer_types": ["sliding_attention", "full_attention", "full_attention"], "num_kv_shared_layers": 1,
               "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 512, "enable_moe_block": True,
               "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 16}
        make_checkpoint(tmp_path / "base", cfg)
        arithmetic_jsonl(tmp_path / "train.jsonl", 32)
        arithmetic_jsonl(tmp_path / "eval.jsonl", 8, offset=100)
        r = train(run_cfg(tmp_path, "ft", optim={"steps": 20}))
        assert sum(r.losses[-4:]) < 0.8 * sum(r.losses[:4])
        unigemma.load(r.output_dir / "final", device="cpu")

        model, _ = build_model(tmp_path / "base")
        model.requires_grad_(True)
        model.train()
        ids = torch.randint(30, 500, (2, 12))
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
        grads = []
        for gc in (False, True):
            model.zero_grad()
            model.language_model.gradient_checkpointing = gc
            s, _ = CausalLMLoss(model)({"input_ids": ids, "labels": labels})
            s.backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        for key in ("experts.gate_up_proj", "router.proj.weight", "per_layer_input_gate.weight",
                    "embed_tokens_per_layer.weight"):
            assert any(key in k and g.abs().sum() > 0 for k, g in grads[0].items()), key
        for k in grads[0]:
            torch.testing.assert_close(grads[0][k], grads[1][k])

        lr = train(run_cfg(tmp_path, "lora", lora={"enabled": True, "rank": 4, "alpha": 8,
                                                   "targets": ["q_proj", "down_proj"]}, optim={"steps": 4}))
        assert len(lr.losses) == 4
        unigemma.load(lr.output_dir / "final", device="cpu")
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("name", list(FAMILY))
def test_bf16_top1_agreement(family, name):
    """bf16 weights: top-1 tokens agree with the reference's bf16 forward (from_pretrained keeps its rotary
    tables float32, as a real deployment does)."""
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    _, _, path = family[name]
    cls = Gemma4ForCausalLM if FAMILY[name][3] else Gemma4ForConditionalGeneration
    ref = cls.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = unigemma.load(path, device="cpu", dtype="bfloat16")
    ids = torch.tensor([ids_of(40, 11), ids_of(40, 12)])
    a = ref(input_ids=ids).logits.argmax(-1)
    b = llm.model(ids).argmax(-1)
    assert (a == b).float().mean() >= 0.95, f"{name}: {(a == b).float().mean():.3f}"


@pytest.mark.parametrize("name", ["e", "moe"])
def test_fused_and_compiled_runner(family, name):
    """The GPU runner's recipe on the CPU (fuse=True): q/k/v and gate/up fused, element-wise pieces (PLE, router
    input, MoE combine, weighted expert sum) compiled by inductor; experts on the gathered path (CUDA decode).
    Decode logits still equal the reference's; the family's new modules are left alone by fuse_projections."""
    from unigemma.model import fusion

    ref, llm, _ = family[name]
    torch._dynamo.reset()
    seq = ids_of(30, 14)
    experts_paths(llm, "gathered")
    try:
        with torch.inference_mode():
            runner = ModelRunner(llm.model, 1, 64, fuse=True, cpu_column_major=False, cpu_packed=False, spare=4)
            assert runner.fused > 0 and fusion.fuse_projections(llm.model) == 0
            runner.prefill_chunk(0, seq, 0, 26)
            got = [runner.decode(torch.tensor([[seq[t]]]), torch.tensor([[t]]), kv_len=t + 1)[0][0, -1]
                   for t in range(26, 30)]
    finally:
        experts_paths(llm, None)
        fusion.unfuse(llm.model)
    expected = ref(input_ids=torch.tensor([seq])).logits[0, 26:30]
    ok, d = close(torch.stack(got), expected)
    assert ok, f"{name}: max |Δ| = {d:.3g}"


# --- quantized experts (int8 / int4, weight-only) ------------------------------------------------------------------

def _float_twin(experts):
    """A float Experts module holding the dequantized weights of quantized `experts` (what they compute with)."""
    import copy

    from unigemma.model.moe import Experts

    twin = copy.copy(experts)
    twin._parameters, twin._modules = dict(experts._parameters), dict(experts._modules)
    for attr in ("gate_up_proj", "down_proj"):
        q = twin._modules.pop(attr)
        twin._parameters[attr] = torch.nn.Parameter(q.every(torch.float32), requires_grad=False)
    assert isinstance(twin, Experts)
    return twin


@pytest.mark.parametrize("quant", ["int8", "int4", {"bits": 4, "group_size": 32, "zero_point": True}])
def test_quantized_experts_compute_their_dequantized_weights_on_every_path(family, quant):
    """Each expert path on quantized experts equals the float math on the dequantized weights (fp32, exact up
    to summation order), reads only the chosen experts, and the quantization error is that of the format."""
    from unigemma.quant import QuantExperts

    _, float_llm, path = family["moe"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = unigemma.load(path, device="cpu", dtype="float32", quantize=quant)
    i = next(i for i, l in enumerate(q.model.language_model.layers) if l.has_moe)
    layer, float_layer = q.model.language_model.layers[i], float_llm.model.language_model.layers[i]
    qe = layer.experts
    assert isinstance(qe.gate_up_proj, QuantExperts) and isinstance(qe.down_proj, QuantExperts)
    twin = _float_twin(qe)
    x = torch.randn(7, qe.gate_up_proj.in_features, generator=torch.Generator().manual_seed(3))
    w, idx = layer.router(x)
    want = twin._grouped(x, idx, w)
    for run in (qe._grouped, qe._gathered, qe._all):
        torch.testing.assert_close(run(x, idx, w), want, atol=2e-5, rtol=0)
    with graph_safe():  # F.grouped_mm takes float weights only: quantized experts take the `all` path in a graph
        assert qe.choose_path(x, idx.numel()) == "all"
    # the quantization error of the weights themselves: int8 ≤ half a step per row, int4 ≤ half a step per group
    wf = float_layer.experts.gate_up_proj.detach()
    err = (qe.gate_up_proj.every(torch.float32) - wf).abs()
    step = wf.abs().amax(-1, keepdim=True) / 127 if qe.gate_up_proj.bits == 8 else None
    if step is not None:
        assert (err <= step / 2 + 1e-7).all()
    else:
        g = wf.view(*wf.shape[:-1], -1, 32)
        rng = (g.amax(-1) - g.amin(-1)) / 15 if qe.gate_up_proj.zero_point else g.abs().amax(-1) / 7.5
        assert (err.view_as(g) <= rng[..., None] * 0.5 + 1e-6).all()
    # an expert no token chose may hold anything without touching the result
    unused = sorted(set(range(qe.num_experts)) - set(idx.flatten().tolist()))
    scales = qe.gate_up_proj.scales
    saved = scales.clone()
    scales[unused] = float("nan")
    try:
        assert torch.isfinite(qe._gathered(x, idx, w)).all() and torch.isfinite(qe._grouped(x, idx, w)).all()
    finally:
        scales.copy_(saved)


@pytest.mark.parametrize("quant,kernel", [("int8", "int8"), ("int4", "int4-cpu")])
def test_quantized_experts_run_the_cpu_kernels_in_bf16(family, quant, kernel):
    """In bf16 the CPU weight-only ops serve each expert's product on views of the stacked tensors (int4: repacked
    once into the op's layout); the result agrees with the dequantized float math to bf16 rounding, the saved
    (canonical) tensors are unchanged by the repacking, and the model runs through the runner's decode."""
    from unigemma.quant import QuantExperts, quantize_model

    _, _, path = family["moe"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = unigemma.load(path, device="cpu", dtype="bfloat16")
        fast = unigemma.load(path, device="cpu", dtype="bfloat16", quantize=quant)
    quantize_model(plain.model, quant, kernels=False)
    i = next(i for i, l in enumerate(fast.model.language_model.layers) if l.has_moe)
    qe, pe = fast.model.language_model.layers[i].experts, plain.model.language_model.layers[i].experts
    assert isinstance(qe.gate_up_proj, QuantExperts)
    assert qe.gate_up_proj.kernel == kernel and qe.down_proj.kernel == kernel and pe.gate_up_proj.kernel is None
    for attr in ("gate_up_proj", "down_proj"):  # the state dict is the canonical form whatever the layout
        a, b = getattr(qe, attr).state_dict(), getattr(pe, attr).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, qe.gate_up_proj.in_features, generator=torch.Generator().manual_seed(4)).bfloat16()
    w, idx = fast.model.language_model.layers[i].router(x)
    got, want = qe._grouped(x, idx, w).float(), pe._grouped(x, idx, w).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    a = ids_of(12, 21)
    runner = ModelRunner(fast.model, max_slots=1, max_model_len=32, spare=4)
    runner.prefill_chunk(0, a, 0, 11)
    logits, _ = runner.decode(torch.tensor([[a[11]]]), torch.tensor([[11]]), kv_len=12)
    full = fast.model(torch.tensor([a])).float()[0, 11]
    assert torch.isfinite(logits).all() and logits[0, -1].float().argmax() == full.argmax()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_moe_checkpoint_roundtrip_and_bytes(family, tmp_path, quant):
    """`unigemma quantize` writes the experts quantized (`<proj>.qweight` / `.scales`), the checkpoint loads to the
    same model as quantize-on-load, and the bytes `inspect` reports are the bytes on disk."""
    from safetensors import safe_open

    from unigemma.quant import QuantConfig, QuantExperts, quantize_checkpoint, quantized_weight_bytes

    _, llm, path = family["moe"]
    quantize_checkpoint(path, tmp_path / "q", quant)
    names = {}
    for f in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    layer_i = next(i for i, l in enumerate(llm.model.language_model.layers) if l.has_moe)
    base = f"model.layers.{layer_i}.experts.gate_up_proj"
    assert names[f"{base}.qweight"] == ("I8" if quant == "int8" else "U8") and f"{base}.scales" in names
    assert base not in names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = unigemma.load(tmp_path / "q", device="cpu", dtype="float32")
        on_load = unigemma.load(path, device="cpu", dtype="float32", quantize=quant)
    assert isinstance(saved.model.language_model.layers[layer_i].experts.down_proj, QuantExperts)
    ids = torch.tensor([ids_of(20, 16)])
    assert torch.equal(saved.model(ids), on_load.model(ids))
    est = quantized_weight_bytes(llm.config, QuantConfig.parse(quant), dtype_bytes=4)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert est["total"] <= on_disk <= est["total"] * 1.05 + 64 * 1024  # headers and alignment aside


# --- the family's MTP drafters (`gemma4_assistant`) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def family_drafters(family, tmp_path_factory):
    """name → (reference drafter, LLM of the family target with that drafter); the dense target's drafter uses
    the centroid LM head."""
    from refmodels import make_family_drafter

    root = tmp_path_factory.mktemp("family-drafters")
    out = {}
    for i, name in enumerate(FAMILY):
        dr = make_family_drafter(name, root / name, seed=40 + i, ordered=name == "dense")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            llm = unigemma.load(family[name][2], device="cpu", dtype="float32", drafter=root / name)
        out[name] = (dr, llm)
    return out


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_drafter_logits_equal_reference(family_drafters, name):
    """The drafter is a function of (target embedding ⊕ target hidden, position, the target's K/V per layer type):
    fed the same inputs, logits and the chained hidden state match the reference's (fp32, ≤ 1e-4)."""
    from unigemma.config import FULL, SLIDING

    dr, llm = family_drafters[name]
    ours = llm.drafter
    assert ours.config.model_type == "gemma4_assistant"
    t = llm.config.text
    g = torch.Generator().manual_seed(5)
    B, lengths = 2, {FULL: 10, SLIDING: 6}  # the sliding keys within the window: every key visible to both
    shared = {}
    for lt, L in lengths.items():
        s = t.store_layer(lt)
        shape = (B, t.layer_kv_heads[s], L, t.layer_head_dim[s])
        shared[lt] = (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    x = torch.randn(B, 1, 2 * t.hidden_size, generator=g)
    pos = torch.tensor([[9], [9]])
    masks = {lt: torch.ones(B, L, dtype=torch.bool) for lt, L in lengths.items()}
    logits, hidden = ours(x, pos, shared, masks)
    ref = dr(inputs_embeds=x, position_ids=pos, shared_kv_states=shared)
    for got, want, what in ((logits, ref.logits, "logits"), (hidden, ref.last_hidden_state, "hidden")):
        ok, d = close(got, want)
        assert ok, f"{name} drafter {what}: max |Δ| = {d:.3g}"


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_mtp_greedy_identical_to_plain_and_reference(family, family_drafters, name):
    """Greedy MTP speculation through the engine (a batch of two, past the sliding window, fixed k = 3) gives the
    plain greedy tokens, which are the reference's `generate` tokens; the reference's own assisted generation with
    the same drafter agrees (so the drafter is one the reference accepts for this target)."""
    ref, _, _ = family[name]
    dr, llm = family_drafters[name]
    prompts = [ids_of(9, 31), ids_of(23, 32)]

    def run(spec):
        eng = Engine(llm.model, None, [], llm.drafter if spec else None, max_slots=2, max_model_len=96,
                     speculative=spec, adaptive=False, num_draft_tokens=3)
        ids = [eng.add(Request(p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))) for p in prompts]
        outs = eng.run_until_done()
        return [outs[i] for i in ids]

    plain, spec = run(None), run("mtp")
    for p, a, b in zip(prompts, plain, spec):
        expected = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert a.token_ids == expected[0, len(p):].tolist()
        assert b.token_ids == a.token_ids
        assert b.usage.drafted_tokens >= 3
    assisted = ref.generate(torch.tensor([prompts[0]]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                            assistant_model=dr)
    assert assisted[0, len(prompts[0]):].tolist() == plain[0].token_ids


def test_family_drafter_config_errors(tmp_path):
    import json

    from unigemma.config import AssistantConfig, ConfigError

    base = {"model_type": "gemma4_assistant", "backbone_hidden_size": 64,
            "text_config": {"model_type": "gemma4_text", "num_hidden_layers": 2, "hidden_size_per_layer_input": 0}}
    c = AssistantConfig.from_dict(json.loads(json.dumps(base)))
    assert c.model_type == "gemma4_assistant" and c.text.num_kv_shared_layers == 2
    for key, bad in (("enable_moe_block", True), ("hidden_size_per_layer_input", 16), ("use_double_wide_mlp", True),
                     ("num_kv_shared_layers", 1)):
        d = json.loads(json.dumps(base))
        d["text_config"][key] = bad
        with pytest.raises(ConfigError, match=key):
            AssistantConfig.from_dict(d)


# --- a smaller model of the family as draft model -------------------------------------------------------------------

def _spec_run(llm, drafter, prompts, spec, n=24, k=3, adaptive=False):
    eng = Engine(llm.model, None, [], drafter, max_slots=3, max_model_len=96, speculative=spec, adaptive=adaptive,
                 num_draft_tokens=k)
    ids = [eng.add(Request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))) for p in prompts]
    outs = eng.run_until_done()
    return [outs[i] for i in ids]


@pytest.mark.parametrize("target,draft", [("dense", "e"), ("moe", "e"), ("e", "dense")])
def test_draft_model_greedy_identical_to_plain(family, target, draft):
    """A smaller family checkpoint sharing the vocabulary drafts through its own cache (a batch of three, past the
    sliding window, many rejections: random weights): the output is the plain greedy output."""
    from unigemma.engine.speculative import DraftModelProposer

    _, llm, _ = family[target]
    _, dm, dpath = family[draft]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = unigemma.load(family[target][2], device="cpu", dtype="float32", drafter=dpath)
    assert both.drafter.config.model_type == dm.config.model_type
    prompts = [ids_of(9, 51), ids_of(23, 52), ids_of(14, 53)]
    plain = _spec_run(llm, None, prompts, None)
    eng = Engine(both.model, None, [], both.drafter, max_slots=3, max_model_len=96)
    assert isinstance(eng.scheduler.proposer, DraftModelProposer)  # "auto" picks the draft model
    spec = _spec_run(both, both.drafter, prompts, "draft")
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids
        assert b.usage.drafted_tokens > 0


def test_draft_model_oracle_is_always_accepted_and_rolls_back(family):
    """The target drafting for itself proposes exactly its own greedy tokens: every draft is accepted, so the
    draft cache followed every step (catch-up, pending token, drafts). A drafter that also sees rejections — the
    same model quantized to int4 — still gives the plain output, through rollbacks of its cache."""
    _, llm, path = family["dense"]
    prompts = [ids_of(9, 61), ids_of(23, 62)]
    plain = _spec_run(llm, None, prompts, None, n=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = unigemma.load(path, device="cpu", dtype="float32").model
        q4 = unigemma.load(path, device="cpu", dtype="float32", quantize="int4").model
    for drafter, exact in ((oracle, True), (q4, False)):
        spec = _spec_run(llm, drafter, prompts, "draft", n=30, k=4)
        for a, b in zip(plain, spec):
            assert b.token_ids == a.token_ids
            if exact:
                assert b.usage.accepted_tokens == b.usage.drafted_tokens > 0
        if not exact:
            assert any(b.usage.accepted_tokens < b.usage.drafted_tokens for b in spec)


def test_draft_model_must_share_the_vocabulary(family, tmp_path):
    import json
    import shutil

    _, _, path = family["dense"]
    other = tmp_path / "other"
    shutil.copytree(family["e"][2], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = 256
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocab_size"):
        unigemma.load(path, device="cpu", dtype="float32", drafter=other)


def test_a_shipped_assistant_is_used_automatically(family, tmp_path):
    """A checkpoint folder that ships its MTP drafter in `assistant/` gets it without asking (as the bundled model
    does); `drafter="none"` turns it off; the adaptive controller (the default) keeps the output plain greedy."""
    import shutil

    from refmodels import make_family_drafter
    from unigemma.model.assistant import Gemma4Assistant

    target = tmp_path / "dense"
    shutil.copytree(family["dense"][2], target)
    make_family_drafter("dense", target / "assistant", seed=44)
    llm = unigemma.load(target, device="cpu", dtype="float32")
    assert isinstance(llm.drafter, Gemma4Assistant)
    assert unigemma.load(target, device="cpu", dtype="float32", drafter="none").drafter is None
    prompts = [ids_of(9, 71), ids_of(23, 72)]
    plain = _spec_run(family["dense"][1], None, prompts, None)
    spec = _spec_run(llm, llm.drafter, prompts, "auto", adaptive=True)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
