"""Fused projections and compiled element-wise pieces (unigemma/model/fusion.py): what the GPU decode path runs,
checked on the CPU — fusing changes no value, no state-dict key and no memory; compiled pieces (inductor's C++
backend here, Triton on a GPU) give the same greedy tokens as the op-by-op model; fused weights are dropped when
the modules are replaced (quantization)."""

from __future__ import annotations

import copy

import pytest
import torch

from unigemma.config import UnifiedConfig
from unigemma.engine.runner import ModelRunner
from unigemma.model import fusion
from unigemma.model.attention import Attention
from unigemma.model.layers import MLP
from unigemma.model.unified import Gemma4Unified
from unigemma.quant import QuantLinear, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, k_eq_v=True, kv_shared=0) -> Gemma4Unified:
    torch.manual_seed(seed)
    cfg = UnifiedConfig.from_dict({"model_type": "gemma4_unified", "text_config": {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
        "num_global_key_value_heads": 1, "attention_k_eq_v": k_eq_v, "sliding_window": 8,
        "num_kv_shared_layers": kv_shared, "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}})
    cfg.vision = cfg.audio = None
    m = Gemma4Unified(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
    return m


def _groups(m):
    return [mod for mod in m.modules() if isinstance(mod, (Attention, MLP))]


@pytest.mark.parametrize("kv_shared", [0, 2])
def test_fusing_changes_no_value_key_or_memory(kv_shared):
    m = tiny(kv_shared=kv_shared)
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        before = m(ids)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    n_params = sum(p.numel() for p in m.parameters())
    n = fusion.fuse_projections(m)
    reuse = sum(isinstance(g, Attention) and g.is_reuse for g in _groups(m))
    assert n == len(_groups(m)) - reuse  # every storing attention layer and every MLP
    assert fusion.fuse_projections(m) == 0  # idempotent
    after_sd = m.state_dict()
    assert list(after_sd) == list(sd) and all(torch.equal(sd[k], after_sd[k]) for k in sd)
    assert sum(p.numel() for p in m.parameters()) == n_params
    for g in _groups(m):
        if isinstance(g, Attention) and not g.is_reuse:
            projs = [g.q_proj, g.k_proj] + ([g.v_proj] if g.v_proj is not None else [])
            # each weight is a row block of the fused tensor: the same storage, no copy kept
            assert all(p.weight.untyped_storage().data_ptr() == g._qkv.untyped_storage().data_ptr() for p in projs)
            assert g._qkv.shape[0] == sum(p.out_features for p in projs)
    with torch.no_grad():
        after = m(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_fused_weights_follow_training_updates_and_stay_trainable():
    m = tiny()
    with torch.inference_mode():
        fusion.fuse_projections(m)  # as a runner built under inference mode does
    attn = m.model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.requires_grad and not attn.q_proj.weight.is_inference()
    x = torch.randn(1, 3, 64)
    plan_free = m.model.language_model  # a plain forward: the fused product must see the new values
    with torch.no_grad():
        attn.q_proj.weight.mul_(2.0)
    assert torch.equal(attn._qkv[: attn.q_proj.out_features], attn.q_proj.weight)
    loss = plan_free(x, torch.arange(3)[None]).square().mean()
    loss.backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0


def test_replaced_modules_are_not_read_through_a_stale_fused_weight():
    m = tiny()
    ref = copy.deepcopy(m)
    fusion.fuse_projections(m)
    quantize_model(m, "int8", kernels=False)
    quantize_model(ref, "int8", kernels=False)
    assert all(g.__dict__.get("_qkv") is None and g.__dict__.get("_gate_up") is None for g in _groups(m))
    assert isinstance(m.model.language_model.layers[0].self_attn.q_proj, QuantLinear)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref(ids))
    # a module swapped behind fusion's back (no unfuse): the fused product is not used
    m2 = tiny()
    fusion.fuse_projections(m2)
    layer = m2.model.language_model.layers[1].mlp
    new = torch.nn.Linear(64, 128, bias=False)
    with torch.no_grad():
        new.weight.copy_(layer.up_proj.weight * 3)
    layer.up_proj = new
    x = torch.randn(1, 2, 64)
    with torch.no_grad():
        expect = layer.down_proj(torch.nn.functional.gelu(layer.gate_proj(x), approximate="tanh") * new(x))
        torch.testing.assert_close(layer(x), expect)


def _greedy(runner, prompt, steps, batch):
    P = len(prompt)
    for b in range(batch):
        runner.prefill_chunk(b, prompt, 0, P, need_logits=False)
    tok = torch.full((batch, 1), 7)
    pos = torch.full((batch, 1), P)
    out, logits_seen = [], []
    for i in range(steps):
        logits, _ = runner.decode(tok, pos + i, P + i + 1)
        logits_seen.append(logits.clone())
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    # a verification-shaped step (T = 3) at the end
    ver, _ = runner.decode(torch.cat([tok, tok, tok], 1), (pos + steps) + torch.arange(3)[None], P + steps + 3)
    return torch.cat(out, 1), torch.cat(logits_seen, 1), ver.clone()


@pytest.mark.slow
def test_compiled_pieces_give_the_eager_tokens():
    """The runner with fuse=True on the CPU: fused products and the pieces compiled by inductor (C++ here) —
    greedy tokens equal to the op-by-op runner at batch 1 and 2, past the sliding window, and a 3-token step."""
    torch._dynamo.reset()
    m = tiny(seed=3)
    prompt = torch.randint(10, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        for batch in (1, 2):
            eager = ModelRunner(m, batch, 64, fuse=False, cpu_column_major=False, cpu_packed=False)
            want = _greedy(eager, prompt, 12, batch)
            fast = ModelRunner(m, batch, 64, fuse=True, cpu_column_major=False, cpu_packed=False)
            assert fast.compiled
            got = _greedy(fast, prompt, 12, batch)
            assert torch.equal(got[0], want[0])
            torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4)


def test_compile_failure_falls_back_to_the_formula(monkeypatch):
    calls = []

    def broken_compile(fn, **kw):
        def run(*a):
            calls.append(fn.__name__)
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)

    @fusion.fusable
    def double(x):
        return x * 2

    x = torch.randn(3)
    with fusion.active():
        with pytest.warns(RuntimeWarning, match="compiling double failed"):
            assert torch.equal(double(x), x * 2)
        assert torch.equal(double(x), x * 2)  # falls back once, then stays on the formula
    assert calls == ["double"]
    assert torch.equal(double(x), x * 2)
