"""Weight-only quantization (issue 6): rounding bounds, every kernel path against the dequantize path, quality of
int8 / int4 models against the float model, quantize-on-load memory, quantized checkpoints (ours and the
compressed-tensors pack-quantized layout), KV-cache dtypes, and `inspect` planning figures."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import unigemma
from unigemma import quant
from unigemma.checkpoint import CheckpointError, save_model
from unigemma.config import UnifiedConfig
from unigemma.model.cache import make_cache
from unigemma.model.unified import Gemma4Unified
from unigemma.quant import QuantConfig, QuantEmbedding, QuantLinear

S, FULL = "sliding_attention", "full_attention"
HAS_INT4_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
HAS_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def config_dict(**over) -> dict:
    """A small model with the published geometry's features (k_eq_v full layers with their own head_dim and a
    single KV head, a sliding window, softcap, tied head); hidden 256 so weights have realistic row statistics."""
    t = dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
             attention_k_eq_v=True, sliding_window=16, final_logit_softcapping=30.0, layer_types=[S, S, S, FULL])
    top = {k: over.pop(k) for k in list(over) if k in ("tie_word_embeddings",)}
    t.update(over)
    return {"model_type": "gemma4_unified", "text_config": t, "dtype": "float32", **top}


def build(d: dict, seed: int = 0) -> Gemma4Unified:
    """Random weights with trained-like scales: rows ~ N(0, 1/fan_in), norms ≈ 1, and q/k norm weights of
    d^-1/4 each so attention logits have unit scale (what the 1/√d of ordinary attention gives; with scale 1.0
    and unit q/k norms a random model's attention is argmax-sharp and chaotic under any perturbation)."""
    cfg = UnifiedConfig.from_dict(d)
    with torch.device("meta"):
        m = Gemma4Unified(cfg)
    m = m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                if n.endswith(("q_norm.weight", "k_norm.weight")):
                    p.mul_(p.shape[0] ** -0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for n, b in m.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(1.0)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.language_model.embed_tokens.weight
    return m.eval()


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    """A float32 checkpoint (sharded) of the small model, plus tokenizer-side files to be copied by `quantize`."""
    path = tmp_path_factory.mktemp("q") / "float"
    d = config_dict()
    model = build(d)
    save_model(model, path, d, max_shard_bytes=2 << 20)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path, model


IDS = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(3))


# --- rounding ----------------------------------------------------------------------------------------------------
def test_rounding_error_bounds():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * torch.rand(96, 1, generator=g) * 3
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert ((q.float() * s[:, None] - w).abs() <= 0.5 * s[:, None] * 1.001 + 1e-30).all()
    assert torch.equal(q[5], torch.zeros_like(q[5]))
    for zp in (False, True):
        for gs in (32, 64, 128):
            p, s, z = quant.quantize_int4(w, gs, zp)
            assert p.shape == (96, 128) and s.shape == (96, 256 // gs) and (z is None) == (not zp)
            deq = quant.dequantize_int4(p, s, z, torch.float32).view(96, -1, gs)
            # round to nearest: half a step at most (symmetric: the top value 7.5 s is clamped to 7 s, also ½ s;
            # asymmetric: the rounded zero point can add up to another half step at the range ends)
            bound = (1.0 if zp else 0.5) * s[..., None] * 1.001 + 1e-30
            assert ((deq - w.view(96, -1, gs)).abs() <= bound).all()
            u = quant.unpack_int4(p)
            assert int(u.max()) <= 15 and (int(u.min()) == 0 if not zp else True)
    # pack / unpack are inverse, nibble order: column 2i low, 2i+1 high
    u = torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8)
    p = quant.pack_int4(u)
    assert torch.equal(p, u[:, 0::2] | (u[:, 1::2] << 4)) and torch.equal(quant.unpack_int4(p), u)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quant.quantize_int4(torch.randn(4, 48), 32)


def test_config_validation():
    assert QuantConfig.parse("int8") == QuantConfig(bits=8) and QuantConfig.parse(None) is None
    assert QuantConfig.parse({"bits": 4, "group_size": 128}).group_size == 128
    for bad, match in [("int3", "quantize='int3'"), ({"bits": 4, "group": 3}, "unknown fields"),
                       ({"bits": 4, "group_size": 48}, "group_size=48"), ({"bits": 8, "zero_point": True}, "int4 only"),
                       ({"bits": 4, "embeddings": "int4"}, "embeddings='int4'")]:
        with pytest.raises(ValueError, match=match):
            QuantConfig.parse(bad)


# --- kernels vs the dequantize path -------------------------------------------------------------------------------
CASES = [(8, None, False)] + [(4, g, zp) for g in (32, 64, 128) for zp in (False, True)]


@pytest.mark.parametrize("bits,group,zp", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_dequantize_path(bits, group, zp, dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(192, 384, generator=g) * 0.05).to(dtype)
    bias = torch.randn(192, generator=g).to(dtype)
    ref = QuantLinear.from_float(w, bits, group, zp, bias=bias)          # canonical: dequantize + matmul
    fast = QuantLinear.from_float(w, bits, group, zp, bias=bias).prepare()
    expected = "int8" if bits == 8 else "int4-cpu"
    if (bits == 8 and HAS_INT8) or (bits == 4 and HAS_INT4_CPU):
        assert fast.kernel == expected and fast.layout in ("int8", "int4-cpu")
    for rows in (1, 5, quant.KERNEL_MAX_ROWS + 7):  # decode-sized batches use the op, larger ones dequantize
        x = torch.randn(rows, 384, generator=g).to(dtype)
        want = F.linear(x.float(), ref.dequantize(torch.float32), bias.float())
        got = fast(x.view(1, rows, 384)).view(rows, -1).float()
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max() <= 0.01 * want.abs().max()
    # the packed layout reads back to exactly the canonical tensors
    a, b = ref.state_dict(), fast.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.allclose(fast.dequantize(torch.float32), ref.dequantize(torch.float32), rtol=0, atol=1e-2 * 0.2)


def test_cpu_packing_by_row_chunks_equals_whole(monkeypatch):
    if not HAS_INT4_CPU:
        pytest.skip("this torch build has no CPU int4 op (the dequantize path is used)")
    u = torch.randint(0, 16, (64 * 7, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    canon = quant.pack_int4(u)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 2)
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 64 * 256)  # 64-row chunks
    assert torch.equal(quant._cpu_pack(canon, 256), whole)
    assert torch.equal(quant._cpu_unpack(whole), u)


def test_fp32_compute_uses_exact_dequantize_path():
    w = torch.randn(128, 256) * 0.05
    m = QuantLinear.from_float(w, 4, 32).prepare()
    assert m.kernel is None and m.layout == "int4"  # fast ops are only used for bf16 / fp16 compute
    x = torch.randn(3, 256)
    assert torch.allclose(m(x), x @ m.dequantize().t(), atol=1e-6)


def test_broken_kernel_is_detected_and_avoided(monkeypatch):
    monkeypatch.setattr(quant, "_PROBED", {})
    real = QuantLinear._kernel_mm
    monkeypatch.setattr(QuantLinear, "_kernel_mm", lambda self, x: real(self, x) * 1.5)  # a wrong result
    w = (torch.randn(128, 256) * 0.05).to(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="not usable"):
        m = QuantLinear.from_float(w, 8).prepare()
    assert m.kernel is None
    monkeypatch.setattr(quant, "_op", lambda name: None)  # an older torch without the ops
    monkeypatch.setattr(quant, "_PROBED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert QuantLinear.from_float(w, 4, 32).prepare().kernel is None


# --- quality ------------------------------------------------------------------------------------------------------
def test_top1_agreement_with_float_model():
    """512 positions (2 × 256 tokens, past the sliding window) of a 4-layer hidden-256 model, float32 compute."""
    torch.manual_seed(0)
    m = build(config_dict())
    ids = torch.randint(0, 2048, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).argmax(-1)
        agree = {}
        for name, qc in [("int8", QuantConfig(8)), ("int4", QuantConfig(4, 32)),
                         ("int4-zp", QuantConfig(4, 32, zero_point=True))]:
            out = quant.quantize_model(copy.deepcopy(m), qc)(ids).argmax(-1)
            agree[name] = (out == ref).float().mean().item()
    assert agree["int8"] >= 0.99, agree
    assert agree["int4"] >= 0.95 and agree["int4-zp"] >= 0.95, agree


# --- loading ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qname", ["int8", "int4"])
def test_quantize_on_load_equals_quantizing_the_loaded_model(float_ckpt, qname):
    path, model = float_ckpt
    llm = unigemma.load(path, device="cpu", quantize=qname)
    m = llm.model
    assert isinstance(m.model.language_model.layers[0].mlp.gate_proj, QuantLinear)
    assert isinstance(m.model.language_model.embed_tokens, QuantEmbedding)
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.qweight is m.model.language_model.embed_tokens.qweight
    assert m.model.language_model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert llm.quantization["bits"] == int(qname[-1]) and llm.kv_dtype == torch.float32
    expected = quant.quantize_model(copy.deepcopy(model), qname)
    with torch.no_grad():
        assert torch.equal(m(IDS), expected(IDS))
    # bf16 compute: the fast ops serve the same weights
    b16 = unigemma.load(path, device="cpu", dtype="bfloat16", quantize=qname)
    lin = b16.model.model.language_model.layers[0].mlp.up_proj
    assert lin.kernel == ("int8" if qname == "int8" else "int4-cpu")
    with torch.no_grad():
        assert (b16.model(IDS).argmax(-1) == m(IDS).argmax(-1)).float().mean() >= 0.9


def test_quantized_checkpoint_roundtrip_and_cli(float_ckpt, tmp_path):
    path, model = float_ckpt
    out = tmp_path / "int4"
    r = subprocess.run([sys.executable, "-m", "unigemma.cli", "quantize", "--model", str(path), "--out", str(out),
                        "--bits", "4", "--group-size", "64", "--zero-point", "--shard-size-mb", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "unigemma", "format_version": 1, "bits": 4,
                                          "group_size": 64, "zero_point": True, "embeddings": "int8"}
    assert (out / "generation_config.json").is_file() and (out / "chat_template.jinja").is_file()
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    tensors = {}
    for f in out.glob("model-*.safetensors"):
        tensors.update(load_file(str(f)))
    assert not any(k.endswith("proj.weight") for k in tensors)  # no float copies of the quantized layers
    gate = "model.language_model.layers.0.mlp.gate_proj"
    assert tensors[f"{gate}.qweight"].dtype == torch.uint8 and tensors[f"{gate}.qweight"].shape == (1024, 128)
    assert tensors[f"{gate}.scales"].shape == (1024, 4) and tensors[f"{gate}.zeros"].dtype == torch.uint8
    # inspect's prediction of the quantized size is exact (float32 checkpoint: 4-byte scales)
    on_disk = sum(v.numel() * v.element_size() for v in tensors.values())
    predicted = quant.quantized_weight_bytes(UnifiedConfig.from_dict(config_dict()), QuantConfig(4, 64, True), 4)
    assert predicted["total"] == on_disk
    # loads without float weights, and computes what quantize-on-load computes
    llm = unigemma.load(out, device="cpu")
    assert llm.quantization["bits"] == 4 and llm.eos_token_ids == [1, 106]
    direct = unigemma.load(path, device="cpu", quantize=QuantConfig(4, 64, True))
    with torch.no_grad():
        assert torch.equal(llm.model(IDS), direct.model(IDS))
    with pytest.raises(ValueError, match="already quantized to int4"):
        unigemma.load(out, device="cpu", quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_checkpoint(out, tmp_path / "again", "int8")
    # the state dict of a loaded (kernel-packed) model is the checkpoint's canonical form again
    b16 = unigemma.load(out, device="cpu", dtype="bfloat16")
    sd = b16.model.state_dict()
    assert torch.equal(sd[f"{gate}.qweight"], tensors[f"{gate}.qweight"])
    assert torch.equal(sd[f"{gate}.zeros"], tensors[f"{gate}.zeros"])


def test_quantized_checkpoint_errors(float_ckpt, tmp_path):
    path, _ = float_ckpt
    out = quant.quantize_checkpoint(path, tmp_path / "int8", "int8", max_shard_bytes=1 << 40)
    assert (out / "model.safetensors").is_file()
    sd = load_file(str(out / "model.safetensors"))
    key = "model.language_model.layers.1.self_attn.o_proj.scales"
    bad = dict(sd)
    bad[key] = bad[key][:10]
    save_file(bad, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj.scales: expected float \(256,\)"):
        unigemma.load(out, device="cpu")
    bad = dict(sd)
    del bad[key]
    save_file(bad, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj is missing quantized tensors \['scales'\]"):
        unigemma.load(out, device="cpu")


def test_untied_head_and_float_embeddings(tmp_path):
    d = config_dict(num_hidden_layers=2, layer_types=[S, FULL], tie_word_embeddings=False, vocab_size=512)
    model = build(d, seed=4)
    assert not model.config.tie_word_embeddings
    save_model(model, tmp_path / "f", d)
    llm = unigemma.load(tmp_path / "f", device="cpu", quantize="int8")
    assert isinstance(llm.model.lm_head, QuantLinear) and llm.model.lm_head.out_features == 512
    assert llm.model.lm_head.qweight is not llm.model.model.language_model.embed_tokens.qweight
    keep = unigemma.load(tmp_path / "f", device="cpu", quantize=QuantConfig(4, embeddings="float"))
    emb = keep.model.model.language_model.embed_tokens
    assert isinstance(emb, torch.nn.Embedding)
    assert torch.equal(emb.weight, model.model.language_model.embed_tokens.weight)
    ids = IDS % 512
    with torch.no_grad():
        assert torch.equal(llm.model(ids), quant.quantize_model(copy.deepcopy(model), "int8")(ids))
    out = quant.quantize_checkpoint(tmp_path / "f", tmp_path / "q", "int8")
    with torch.no_grad():
        assert torch.equal(unigemma.load(out, device="cpu").model(ids), llm.model(ids))


# --- compressed-tensors pack-quantized ------------------------------------------------------------------------------
def ct_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented compressed-tensors packing, written independently of unigemma: signed values are offset by
    2^(bits−1), then every 32/bits consecutive values along the last dim go into one int32, the first in the
    lowest bits (rows padded with zeros)."""
    per = 32 // bits
    u = (values.to(torch.int64) + (1 << (bits - 1)))
    pad = (-u.shape[1]) % per
    u = F.pad(u, (0, pad)).view(u.shape[0], -1, per)
    word = (u << (torch.arange(per) * bits)).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def write_compressed_tensors(model: Gemma4Unified, d: dict, path: Path, symmetric: bool, group: int = 32):
    """Save `model` in the pack-quantized int4 layout; return the float model it represents exactly."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    exact = copy.deepcopy(model)
    for name in list(sd):
        mod = name.rpartition(".")[0]
        if not (name.endswith(".weight") and quant.DECODER_LINEAR.match(mod)):
            continue
        w = sd.pop(name)
        N, K = w.shape
        wg = w.view(N, K // group, group)
        if symmetric:
            scale = wg.abs().amax(-1) / 7
            q = torch.round(wg / scale[..., None]).clamp(-8, 7)
            zp = torch.zeros_like(scale)
        else:
            lo, hi = wg.amin(-1), wg.amax(-1)
            scale = (hi - lo) / 15
            zp = torch.round(-8 - lo / scale).clamp(-8, 7)
            q = torch.round(wg / scale[..., None] + zp[..., None]).clamp(-8, 7)
            sd[f"{mod}.weight_zero_point"] = ct_pack(zp.t().contiguous(), 4).t().contiguous()  # packed along rows
        sd[f"{mod}.weight_packed"] = ct_pack(q.view(N, K), 4)
        sd[f"{mod}.weight_scale"] = scale
        sd[f"{mod}.weight_shape"] = torch.tensor([N, K])
        exact.get_submodule(mod).weight.data = ((q - zp[..., None]) * scale[..., None]).view(N, K)
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    cfg = dict(d, quantization_config={
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group,
            "actorder": None, "observer": "minmax", "dynamic": False}, "input_activations": None}},
        "ignore": ["lm_head"]})
    (path / "config.json").write_text(json.dumps(cfg))
    return exact


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_pack_quantized(tmp_path, symmetric):
    d = config_dict(num_hidden_layers=2, layer_types=[S, FULL], vocab_size=512)
    model = build(d, seed=2)
    exact = write_compressed_tensors(model, d, tmp_path / "ct", symmetric)
    llm = unigemma.load(tmp_path / "ct", device="cpu")
    lin = llm.model.model.language_model.layers[1].mlp.down_proj
    assert isinstance(lin, QuantLinear) and lin.group_size == 32 and lin.zero_point == (not symmetric)
    assert isinstance(llm.model.model.language_model.embed_tokens, torch.nn.Embedding)  # kept float
    assert llm.quantization["quant_method"] == "compressed-tensors" and llm.quantization["bits"] == 4
    ids = IDS % 512
    with torch.no_grad():
        assert (llm.model(ids) - exact(ids)).abs().max() <= 1e-4


def test_compressed_tensors_unpacking_and_errors(tmp_path):
    g = torch.Generator().manual_seed(5)
    for bits, K in [(4, 64), (4, 36), (8, 20)]:  # 36 and 20: a padded last word
        v = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, K), generator=g)
        words = ct_pack(v, bits)
        u = (v + (1 << (bits - 1))).to(torch.uint8)
        want = u if bits == 8 else quant.pack_int4(F.pad(u, (0, K % 2)))[:, : K // 2]
        for view in ((True, False) if K % (32 // bits) == 0 else (False,)):
            assert torch.equal(quant._ct_unpack(words, bits, K, view=view), want)
    d = config_dict(num_hidden_layers=2, layer_types=[S, FULL], vocab_size=512)
    write_compressed_tensors(build(d), d, tmp_path / "ct", True)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    for edit, match in [(("format", "marlin-24"), "format 'marlin-24' is not supported"),
                        (("quant_method", "gptq"), "quant_method 'gptq' is not supported")]:
        bad = copy.deepcopy(cfg)
        bad["quantization_config"][edit[0]] = edit[1]
        (tmp_path / "ct" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            unigemma.load(tmp_path / "ct", device="cpu")


# --- memory of quantize-on-load -----------------------------------------------------------------------------------
def write_12b_geometry(path: Path, layers: int, shard_bytes: int) -> int:
    """A reduced-depth checkpoint of the published 12B geometry (vocab 8192), bf16, written shard by shard from a
    pool of random values (fast). Returns the largest shard's size."""
    cfg = {"model_type": "gemma4_unified", "dtype": "bfloat16", "text_config": {
        "vocab_size": 8192, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": layers,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 1024,
        "final_logit_softcapping": 30.0, "layer_types": [S] * (layers - 1) + [FULL]}}
    with torch.device("meta"):
        m = Gemma4Unified(UnifiedConfig.from_dict(cfg))
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    path.mkdir(parents=True)
    names, shard, size, wm = [], {}, 0, {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(path / name))
        names.append(name)
        wm.update({k: name for k in shard})
        shard, size = {}, 0
    for i, (n, p) in enumerate(m.named_parameters()):
        if p.dim() == 1:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            start = (i * 7919) % (1 << 20)
            reps = -(-(p.numel() + start) // pool.numel())
            t = (pool.repeat(reps) if reps > 1 else pool)[start:start + p.numel()].view(p.shape).clone()
        if shard and size + t.numel() * 2 > shard_bytes:
            flush()
        shard[n] = t
        size += t.numel() * 2
    for n, _ in m.named_buffers():
        if n.endswith("layer_scalar"):
            shard[n] = torch.ones(1)
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (path / "config.json").write_text(json.dumps(cfg))
    return max((path / n).stat().st_size for n in names)


@pytest.mark.slow  # 7 s on an idle 2-core machine, 20–80 s when other jobs share it (it writes and reads ~1 GB)
def test_peak_memory_of_quantize_on_load(tmp_path):
    """2 layers (one sliding, one full) of the 12B geometry: ~1 GB of bf16 in ~250 MB shards. Loading with
    quantize="int4" in a fresh process must grow RSS by less than (quantized size + largest shard) × 1.3 — the
    float model (2× the quantized size plus) never exists; each tensor is quantized as it is read."""
    ck = tmp_path / "12b-2layers"
    largest = write_12b_geometry(ck, layers=2, shard_bytes=256 << 20)
    float_bytes = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
    script = textwrap.dedent(f"""
        import gc, torch, unigemma, unigemma.quant
        from unigemma.config import load_config
        from unigemma.model.unified import Gemma4Unified
        def status(key):
            return [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key)][0]
        with torch.device('meta'):  # torch's one-time setup, so the measurement is the loader's alone
            Gemma4Unified(load_config({str(ck)!r}))
        gc.collect()
        base = status('VmRSS')
        with open('/proc/self/clear_refs', 'w') as f:  # reset the peak (VmHWM) to the current RSS
            f.write('5')
        llm = unigemma.load({str(ck)!r}, device='cpu', quantize='int4')
        peak = status('VmHWM')
        m = llm.model
        size = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
        print(base, peak, size)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    base, peak, size = map(int, out.stdout.split())
    growth = peak - base
    print(f"quantize-on-load peak growth {growth / 1e6:.0f} MB, quantized {size / 1e6:.0f} MB, largest shard "
          f"{largest / 1e6:.0f} MB, bf16 checkpoint {float_bytes / 1e6:.0f} MB")
    assert size < 0.4 * float_bytes  # int4 + int8 embeddings: about a third of bf16
    assert growth <= 1.3 * (size + largest), (
        f"peak RSS grew {growth / 1e6:.0f} MB; quantized model {size / 1e6:.0f} MB, largest shard "
        f"{largest / 1e6:.0f} MB, float checkpoint {float_bytes / 1e6:.0f} MB")


# --- KV-cache dtypes ------------------------------------------------------------------------------------------------
def _decode_logits(model, kv_dtype, prompt, steps: int = 6):
    cache = model.make_cache(1, prompt.shape[1] + steps + 4, dtype=kv_dtype)
    P = prompt.shape[1]
    out = [model.run(prompt, position_ids=torch.arange(P)[None], cache=cache).logits[0, -1]]
    tok = prompt[:, -1:]
    for i in range(steps):  # the same tokens for every dtype, so logits compare position by position
        tok = (tok * 7 + 3) % model.config.text.vocab_size
        out.append(model.run(tok, position_ids=torch.tensor([[P + i]]), cache=cache).logits[0, -1])
    return torch.stack(out)


def test_kv_dtypes_close_to_float32(float_ckpt):
    _, model = float_ckpt
    prompt = IDS[:1, :20]  # longer than the sliding window (16): the ring wraps
    with torch.no_grad():
        ref = _decode_logits(model, torch.float32, prompt)
        scale = ref.abs().max()
        for dt, tol in [(torch.bfloat16, 0.03), (torch.float16, 0.005), (torch.float8_e4m3fn, 0.15)]:
            got = _decode_logits(model, dt, prompt)
            err = (got - ref).abs().max() / scale
            assert err <= tol, (dt, err)
            assert (got.argmax(-1) == ref.argmax(-1)).all()
    cache = make_cache(model.config.text, 1, 64, torch.float8_e4m3fn)
    assert cache.layers[0].k.dtype == torch.float8_e4m3fn and cache.nbytes() < make_cache(
        model.config.text, 1, 64, torch.bfloat16).nbytes()


def test_kv_dtype_option(float_ckpt):
    path, _ = float_ckpt
    assert unigemma.load(path, device="cpu", kv_dtype="fp8").kv_dtype == torch.float8_e4m3fn
    assert unigemma.load(path, device="cpu", dtype="bfloat16").kv_dtype == torch.bfloat16
    assert quant.resolve_kv_dtype("fp16", torch.float32) == torch.float16
    with pytest.raises(ValueError, match="kv_dtype='int4' is not supported"):
        unigemma.load(path, device="cpu", kv_dtype="int4")


# --- inspect ------------------------------------------------------------------------------------------------------
def _inspect(capsys, *args) -> dict:
    from unigemma.cli import main

    capsys.readouterr()
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_quantized_12b_plan(capsys):
    int4 = _inspect(capsys, "gemma4-12b", "--quantize", "int4", "--context", "32768")
    int8 = _inspect(capsys, "gemma4-12b", "--quantize", "int8")
    assert int4["weight_bytes"] <= 7.5e9 and int8["weight_bytes"] <= 13e9
    assert int4["weight_bytes"] < int8["weight_bytes"] < 11_959_730_176 * 2
    parts = int4["weight_bytes_by_part"]
    # decoder linears: ½ byte per weight + one bf16 scale per 32 weights
    assert parts["linear_scales"] * 32 // 2 == parts["linear_weights"] * 2
    assert parts["embeddings"] == 262144 * 3840 + 262144 * 2
    plan = int4["plan"]
    from unigemma.config import gemma4_12b_config

    kv = make_cache(gemma4_12b_config().text, 1, 32768, torch.bfloat16, "meta").nbytes()
    # full layers hold every position (8 × 2 × 1 × 512 × 2 B per token); sliding ones only their ring
    assert plan["kv_bytes"] == kv and 16384 * 32768 < kv < 16384 * 32768 + 327680 * 1100 + 10 ** 6
    assert plan["total_bytes"] == plan["weight_bytes"] + plan["kv_bytes"] + plan["activation_bytes"]
    assert 0 < plan["activation_bytes"] < 4e9
    fp8 = _inspect(capsys, "gemma4-12b", "--quantize", "int4", "--context", "32768", "--kv-dtype", "fp8")["plan"]
    assert abs(fp8["kv_bytes"] * 2 - kv) < 10 ** 6  # half, but for the int64 ring positions
    from unigemma.cli import main

    assert main(["inspect", "gemma4-12b", "--quantize", "int4", "--context", "32768"]) == 0
    text = capsys.readouterr().out
    assert "int4 linears + scales" in text and "plan           context 32,768 tokens" in text
    assert main(["inspect", "gemma4-12b", "--context", "0"]) == 2 and "--context 0" in capsys.readouterr().err
