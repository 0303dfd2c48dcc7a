"""The Triton weight-only int8 kernels (unigemma/kernels_triton.py) and the few-query attention formula of the CUDA
decode path, checked here on the CPU: Triton's interpreter (TRITON_INTERPRET=1) runs the same kernel code on CPU
tensors. The interpreter has no bfloat16 matrix product, so float16 / float32 stand in; on a GPU
`unigemma.quant` checks the kernels once more against the dequantizing path (bfloat16) before using them."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # on a GPU the kernels compile for real (and torch.compile needs real Triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: its decorator reads it
import torch.nn.functional as F  # noqa: E402

from unigemma.model.attention import _attend_matmul  # noqa: E402
from unigemma.quant import QuantLinear, quantize_int8  # noqa: E402

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

interpreted = pytest.mark.skipif(
    not HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
    reason="needs triton (.ci/run installs it) and runs the kernels in its CPU interpreter")


def _rel(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K", [(1, 100, 300), (1, 9000, 64), (1, 66000, 40),   # one row: each N class
                                   (3, 70, 200), (17, 130, 520), (2, 9000, 64)])  # few rows: both tile sizes
def test_int8_kernel_matches_dequantized_product(dtype, M, N, K):
    from unigemma.kernels_triton import w8_linear

    g = torch.Generator().manual_seed(M * N + K)
    q, s = quantize_int8(torch.randn(N, K, generator=g).to(dtype))
    x = torch.randn(M, K, generator=g).to(dtype)
    ref = (x.float() @ q.float().t()) * s.float()
    assert _rel(w8_linear(x, q, s), ref) < (1e-5 if dtype == torch.float32 else 2e-3)


@interpreted
@pytest.mark.parametrize("bits,kind", [(8, "int8-triton")])
def test_quantlinear_runs_the_triton_kernel_for_small_batches(bits, kind):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g).half()
    ref = QuantLinear.from_float(w, bits, 64)
    fast = QuantLinear.from_float(w, bits, 64).prepare(_force=kind)
    assert fast.kernel == kind and fast.layout == f"int{bits}"  # the canonical layout: state_dict unchanged
    x = torch.randn(5, 256, generator=g).half()
    y_ref = F.linear(x.float(), ref.dequantize(torch.float32))
    for rows in (1, 5):
        assert _rel(fast(x[:rows]), y_ref[:rows]) < 2e-3
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("R,S", [(1, 50), (16, 300), (6, 1056)])
def test_few_query_attention_formula_equals_sdpa(R, S):
    # the CUDA decode path's attention (two matmuls around a float32 softmax) against SDPA, fully masked rows aside
    g = torch.Generator().manual_seed(R + S)
    q, k, v = (torch.randn(2, 3, n, 32, generator=g) for n in (R, S, S))
    mask = torch.rand(2, 1, R, S, generator=g) > 0.4
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    assert torch.allclose(_attend_matmul(q, k, v, mask), ref, atol=1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,group,zp", [(1, 100, 256, 32, False), (1, 72, 320, 32, True),  # K not a tile multiple
                                            (1, 9000, 64, 64, False), (3, 70, 256, 32, True),
                                            (17, 130, 512, 128, False), (2, 40, 768, 256, True)])
def test_int4_kernel_matches_dequantized_product(dtype, M, N, K, group, zp):
    from unigemma.kernels_triton import w4_linear
    from unigemma.quant import dequantize_int4, quantize_int4

    g = torch.Generator().manual_seed(M * N + K)
    q, s, z = quantize_int4(torch.randn(N, K, generator=g).to(dtype), group, zp, dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    ref = x.float() @ dequantize_int4(q, s, z, torch.float32).t()
    assert _rel(w4_linear(x, q, s, z, group), ref) < (1e-5 if dtype == torch.float32 else 2e-3)


@interpreted
@pytest.mark.parametrize("bits,kind,zp", [(4, "int4-triton", False), (4, "int4-triton", True), (8, "int8-triton", False)])
def test_fused_quantized_projections_equal_separate_ones(bits, kind, zp):
    """gate/up as one QuantLinear whose buffers the two modules view (fusion.fuse_projections): same outputs, same
    state dict, no copy kept."""
    from unigemma.model import fusion
    from unigemma.model.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(64, 96).half()
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name)
        setattr(mlp, name, QuantLinear.from_float(lin.weight.detach(), bits, 32, zp).prepare(_force=kind))
    x = torch.randn(3, 64).half()
    with torch.no_grad():
        want = [mlp(x[:r]).float() for r in (1, 3)]
        sd = {k: v.clone() for k, v in mlp.state_dict().items()}
        assert fusion.fuse_projections(mlp) == 1
        fused = mlp.__dict__["_gate_up"]
        assert fused.kernel == kind and fused.out_features == 192
        assert mlp.gate_proj.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
        got = [mlp(x[:r]).float() for r in (1, 3)]
    for a, b in zip(got, want):
        assert _rel(a, b) < 2e-3
    assert all(torch.equal(sd[k], v) for k, v in mlp.state_dict().items())
