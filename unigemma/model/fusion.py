"""Fewer, larger kernels for GPU decoding: fused projection weights and compiled element-wise pieces.

A batch-1 decode step reads every weight once and does almost no arithmetic, so on a GPU its time is the weight
bytes over the memory bandwidth *plus* one launch gap per kernel. Eager PyTorch runs ~48 kernels a layer (each
RMSNorm, RoPE's rotate-half, every residual add and cast is its own kernel). Two inference-only changes bring a
layer to ~15 kernels without changing what is computed:

1. Fused projections (`fuse_projections`): the q/k/v weights of an attention layer are stored as row blocks of
   one (Nq + Nk + Nv, H) tensor, and gate/up of an MLP as one (2I, H) tensor; the modules' own `weight`
   Parameters become views of those blocks (no extra memory; checkpoint names, state dicts and training see the
   same tensors). One matrix product then reads all of them:

       x (B, T, H) ── F.linear(x, W_qkv) ──► (B, T, Nq + Nk + Nv) ── split ──► q, k, v
       x (B, T, H) ── F.linear(x, W_gate_up) ──► (B, T, 2I) ── chunk ──► gate, up

2. Compiled element-wise pieces (`fusable`): the small functions a layer calls between its matrix products
   (norm + RoPE of q and k, residual + norm, masked softmax, gelu · up, softcap) are plain PyTorch, written as
   the math; inside `active()` they run through `torch.compile` (inductor), which emits one Triton kernel per
   function instead of one kernel per operation. CUDA-graph capture happens after the runner's warm-up
   forwards, so no compilation runs inside a capture.

The runner fuses the weights and runs its steps (prefill chunks, decode, verification) inside `active()` on CUDA
unless told not to. Outside `active()` — plain `model(...)` calls, training, the CPU path — both changes are off:
separate products and op-by-op pieces, bit-identical to the reference. (A fused product is the same sum, but
cuBLAS picks other kernels for the wider matrix, so bf16 results can differ in the last bit.)
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F

_STATE = {"active": False}


def configure() -> None:
    """Room for one compiled entry per (function, shape signature) — two layer types, batch buckets, draft
    lengths — before dynamo falls back to eager (process-wide)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))


@contextlib.contextmanager
def active(on: bool = True):
    """Inside: `fusable` functions run compiled (the runner's decode and verification steps). Outside (prefill,
    training, CPU inference by default): as written, op by op."""
    prev = _STATE["active"]
    _STATE["active"] = bool(on)
    try:
        yield
    finally:
        _STATE["active"] = prev


def fusable(fn):
    """fn as written, or through torch.compile (one graph; a dimension that changes between calls becomes
    symbolic, so batch buckets, draft lengths and attention lengths share a few compiled versions) inside
    `active()`."""
    compiled = None
    proven = False  # a compiled call has succeeded: later errors are real errors, not a broken compiler

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled, proven
        if _STATE["active"]:
            if compiled is None:
                compiled = torch.compile(fn, fullgraph=True)
            if proven:
                return compiled(*args)
            try:
                out = compiled(*args)
            except Exception as e:  # no working compiler here (e.g. no C compiler, an unsupported GPU)
                warnings.warn(f"unigemma: compiling {fn.__name__} failed ({type(e).__name__}: {e}); running it op by "
                              "op", RuntimeWarning, stacklevel=2)
                compiled = fn
                out = fn(*args)
            proven = True
            return out
        return fn(*args)

    wrapper.eager = fn
    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# the element-wise pieces (spec/unified-model.md §5–9; the same formulas as layers.py, in the same order)
# ---------------------------------------------------------------------------------------------------------------
def rms_formula(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x²) + eps) [· weight] in float32, returned in x's dtype, op by op as the reference
    rounds it (pow(−0.5), the plain weight — not 1 + weight)."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # The formula everywhere, as the reference rounds it: F.rms_norm (one kernel instead of nine, eagerly on CUDA)
    # rounds its rsqrt differently, which moved bf16 top-1 agreement with the reference from 100% to 89% on random
    # 12B weights. Speed comes from compiling (decode steps), where the formula is one kernel anyway.
    return rms_formula(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, h, d), cos/sin (B, T, d): x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁] (pairs j, j + d/2)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms(x, weight, eps)


@fusable
def add_norm(h: torch.Tensor, x: torch.Tensor, w_post: torch.Tensor, w_next: torch.Tensor, eps: float):
    """h + norm(x, w_post) → (h', norm(h', w_next)): a sublayer's residual and the next sublayer's input norm."""
    h = h + _rms(x, w_post, eps)
    return h, _rms(h, w_next, eps)


@fusable
def add_norm_scale(h: torch.Tensor, x: torch.Tensor, w_post: torch.Tensor, scalar: torch.Tensor, eps: float):
    """(h + norm(x, w_post)) · layer_scalar: the end of a decoder layer."""
    return (h + _rms(x, w_post, eps)) * scalar


@fusable
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float):
    """Raw projections (B, T, h, d) → rope(q_norm(q)), rope(k_norm(k)), v_norm(v) (weightless), as (B, h, T, d)."""
    q = rope(_rms(q, wq, eps), cos, sin).transpose(1, 2)
    k = rope(_rms(k, wk, eps), cos, sin).transpose(1, 2)
    return q, k, _rms(v, None, eps).transpose(1, 2)


@fusable
def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, eps: float, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """qk_norm_rope, with K and V stored straight into the cache at [rows (B, T), :, index (B, T)] (as
    KVCache.write does); returns q (B, H, T, d)."""
    q, k, v = qk_norm_rope.eager(q, k, v, wq, wk, cos, sin, eps)
    k_cache[rows, :, index] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[rows, :, index] = v.transpose(1, 2).to(v_cache.dtype)
    return q


@fusable
def q_norm_rope(q: torch.Tensor, wq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float):
    """A KV-sharing reuse layer's query path: rope(q_norm(q)) as (B, h, T, d)."""
    return rope(_rms(q, wq, eps), cos, sin).transpose(1, 2)


@fusable
def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over keys in float32 of the scores where mask, −inf elsewhere; returned in the scores' dtype."""
    s = torch.where(mask, scores, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(scores.dtype)


@fusable
def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) · up."""
    return F.gelu(gate, approximate="tanh") * up


@fusable
def add_rms(h: torch.Tensor, x: torch.Tensor, w_post: torch.Tensor, eps: float) -> torch.Tensor:
    """h + norm(x, w_post): a sublayer's residual when something else follows before the layer scalar."""
    return h + _rms(x, w_post, eps)


@fusable
def moe_combine(dense: torch.Tensor, experts: torch.Tensor, w_dense: torch.Tensor, w_experts: torch.Tensor,
                eps: float) -> torch.Tensor:
    """norm(dense MLP out, w_dense) + norm(experts out, w_experts): the two feed-forward branches of a MoE layer."""
    return _rms(dense, w_dense, eps) + _rms(experts, w_experts, eps)


@fusable
def router_input(h: torch.Tensor, scale: torch.Tensor, root: float, eps: float) -> torch.Tensor:
    """The router's input: norm(h) (weightless) · scale · H^−½."""
    return _rms(h, None, eps) * scale * root


@fusable
def weighted_sum(o: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """o (N, k, H), w (N, k) float32 → Σ_k (o · w) rounded to o's dtype per term, as the experts' outputs are."""
    return (o * w[..., None]).to(o.dtype).sum(dim=1)


@fusable
def per_layer_inputs(proj: torch.Tensor, tok: torch.Tensor, w_norm: torch.Tensor, scale: float, eps: float):
    """(norm(proj · scale, w_norm) + tok) · 2^−½: the per-layer inputs from the context projection (B, T, L, P)
    and the token-identity embeddings (B, T, L, P)."""
    return (_rms(proj * scale, w_norm, eps) + tok) * (2.0 ** -0.5)


@fusable
def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


# ---------------------------------------------------------------------------------------------------------------
# fused projection weights
# ---------------------------------------------------------------------------------------------------------------
_ROW_BLOCKED = ("int8-triton", "int4-triton")  # QuantLinear kernels that read the canonical layout (row views ok)


def _fusable_float(mods) -> bool:
    if not all(type(m) is torch.nn.Linear and m.bias is None for m in mods):
        return False
    return len({(m.weight.dtype, m.weight.device, m.weight.shape[1]) for m in mods}) == 1


def _fusable_quant(mods) -> bool:
    from ..quant import QuantLinear

    if not all(type(m) is QuantLinear and m.bias is None and m.kernel in _ROW_BLOCKED for m in mods):
        return False
    return len({(m.kernel, m.bits, m.group_size, m.zero_point, m.in_features, m.scales.dtype, m.qweight.device)
                for m in mods}) == 1


def _cat_rows(tensors, views):
    """One tensor holding `tensors` as row blocks; views(i, block) re-points the i-th owner at its block."""
    t0 = tensors[0]
    with torch.inference_mode(False):  # a plain tensor even when fused under inference mode (weights stay trainable)
        return _cat_rows_into(tensors, views)


def _cat_rows_into(tensors, views):
    t0 = tensors[0]
    out = torch.empty((sum(t.shape[0] for t in tensors),) + tuple(t0.shape[1:]), dtype=t0.dtype, device=t0.device)
    a = 0
    with torch.no_grad():
        for i, t in enumerate(tensors):
            n = t.shape[0]
            out[a:a + n].copy_(t)
            views(i, out[a:a + n])
            a += n
    return out


def _fuse_float(mods) -> torch.Tensor:
    def point(i, block):
        mods[i].weight.data = block
    return _cat_rows([m.weight for m in mods], point)


def _fuse_quant(mods):
    from ..quant import QuantLinear

    m0 = mods[0]
    fused = QuantLinear(m0.in_features, sum(m.out_features for m in mods), m0.bits, m0.group_size, m0.zero_point,
                        dtype=m0.scales.dtype, device="meta")
    names = ["qweight", "scales"] + (["zeros"] if m0.zero_point else [])
    for name in names:
        def point(i, block, name=name):
            mods[i]._buffers[name] = block
        fused._buffers[name] = _cat_rows([m._buffers[name] for m in mods], point)
    fused.kernel = m0.kernel
    return fused


def _still_fused(fused, mods) -> bool:
    """True while every module still computes with its row block of `fused` (not replaced, quantized, wrapped
    or re-laid out since fusing)."""
    from ..quant import QuantLinear

    is_float = isinstance(fused, torch.Tensor)
    whole = fused if is_float else fused.qweight
    ptr, row_bytes = whole.data_ptr(), whole.stride(0) * whole.element_size()
    for m in mods:
        if type(m) is not (torch.nn.Linear if is_float else QuantLinear):
            return False
        w = m.weight if is_float else m._buffers.get("qweight")
        if w is None or w.data_ptr() != ptr or w.stride() != whole.stride():
            return False
        ptr += w.shape[0] * row_bytes
    return True


def fused_linear(fused, mods, x: torch.Tensor) -> torch.Tensor | None:
    """x · [W₁; W₂; …]ᵀ in one product when `mods` are still fused (see fuse_projections), else None."""
    if fused is None or not _STATE["active"] or not _still_fused(fused, mods):
        return None  # outside the runner's steps: the separate products, rounded as the reference rounds them
    if isinstance(fused, torch.Tensor) and torch.is_grad_enabled() and any(m.weight.requires_grad for m in mods):
        return None  # training: gradients must reach each module's own Parameter (the fused tensor has none)
    return F.linear(x, fused) if isinstance(fused, torch.Tensor) else fused(x)


def fuse_projections(model: torch.nn.Module) -> int:
    """Fuse q/k/v (q/k for k_eq_v layers) and gate/up of every decoder layer of `model` whose projections are all
    plain bias-free nn.Linear of one dtype and device, or all QuantLinear of one format on a kernel that reads
    the canonical layout (int8-triton, int4-triton); returns how many groups were fused. The modules' weights
    become row-block views of the fused tensors: no extra memory, same state dict."""
    from .attention import Attention
    from .layers import MLP

    n = 0
    for mod in model.modules():
        if isinstance(mod, Attention) and not mod.is_reuse:
            group, attr = [mod.q_proj, mod.k_proj] + ([mod.v_proj] if mod.v_proj is not None else []), "_qkv"
        elif isinstance(mod, MLP):
            group, attr = [mod.gate_proj, mod.up_proj], "_gate_up"
        else:
            continue
        current = mod.__dict__.get(attr)
        if current is not None and _still_fused(current, group):
            continue
        if _fusable_float(group):
            mod.__dict__[attr] = _fuse_float(group)
        elif _fusable_quant(group):
            mod.__dict__[attr] = _fuse_quant(group)  # kept out of _modules: not part of the state dict
        else:
            continue
        n += 1
    return n


def unfuse(model: torch.nn.Module) -> None:
    """Forget fused tensors (before the modules are replaced, e.g. quantized: the float copy must not stay)."""
    for mod in model.modules():
        for attr in ("_qkv", "_gate_up"):
            if mod.__dict__.get(attr) is not None:
                mod.__dict__[attr] = None
