"""Triton kernels for weight-only int8 matmuls on CUDA, reading the canonical (on-disk) int8 layout once.

PyTorch's own CUDA ops for these read the weights at a fraction of the card's bandwidth for the small-batch shapes
of decoding (H100, 12B geometry, one token: `_weight_int8pack_mm` 4-8 % of the bandwidth, int8 decode 0.23× bf16;
the int4 tinygemm op 13-38 % on the layer shapes), so on CUDA `unigemma.quant` uses these when Triton is
importable, after checking them against the dequantizing path once per process. (An int4 kernel written the
same way read the weights at 8-25 % of the bandwidth, below tinygemm: int4 stays on torch's op.)

    x (M, K) bf16/fp16 · W (N, K) int8 · scale (N,) → y (M, N) in x's dtype, accumulated in float32

- M == 1 (batch-1 decode, the case that is bound by reading W): `_w8_gemv`, one program per BLOCK_N output
  rows, each streaming its rows of W in BLOCK_K-wide int8 tiles into a float32 (BLOCK_N, BLOCK_K) accumulator
  that is reduced over K once at the end.
- 1 < M ≤ 64 (batched decode, speculative verification): `_w8_mm`, tiles of 16 × BLOCK_N on the tensor cores
  (W converted to x's dtype in registers, never in memory).

Importing this module needs `triton`; nothing else in unigemma does (the CPU build never loads it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _w8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC_2D: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)            # (BLOCK_N,) output rows of this program
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    if ACC_2D:  # a (BLOCK_N, BLOCK_K) accumulator reduced over K once, after the loop
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:       # a (BLOCK_N,) accumulator, reduced every tile
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)                       # (BLOCK_K,)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :],                         # (BLOCK_N, BLOCK_K)
                    mask=n_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)
        if ACC_2D:
            acc2 += w * x[None, :]
        else:
            acc += tl.sum(w * x[None, :], axis=1)
    if ACC_2D:
        acc = tl.sum(acc2, axis=1)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, (acc * s).to(y_ptr.dtype.element_ty), mask=n_ok)


# (BLOCK_N, BLOCK_K, ACC_2D, num_warps) of the one-row kernel by output rows N; `benchmarks/gpu_profile.py
# --sections gemv` times the candidates; these were the fastest on an H100 (12B shapes: 12-layer int8 decode 322 tok/s,
# against 253 with (16, 512, False) / (32, 512, False) and 234 in bf16)
GEMV_CONFIGS = {"small": (4, 1024, True, 4), "mid": (16, 256, False, 4), "large": (16, 256, False, 4)}


def gemv_config(N: int) -> tuple[int, int, bool, int]:
    return GEMV_CONFIGS["small" if N <= 8192 else ("mid" if N <= 65536 else "large")]


def w8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, config=None) -> torch.Tensor:
    """One row: x (1, K) · qweight (N, K) int8 · scales (N,) → (1, N), with `config` or gemv_config(N)."""
    N, K = qweight.shape
    block_n, block_k, acc_2d, warps = config or gemv_config(N)
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    _w8_gemv[(triton.cdiv(N, block_n),)](x, qweight, scales, y, N, K, qweight.stride(0),
                                         BLOCK_N=block_n, BLOCK_K=block_k, ACC_2D=acc_2d, num_warps=warps)
    return y


@triton.jit
def _w8_mm(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))                                          # (BLOCK_M, BLOCK_N)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = acc * s[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def w8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) · qweight (N, K) int8 · scales (N,) → (M, N) in x's dtype. x and qweight contiguous."""
    M, K = x.shape
    N = qweight.shape[0]
    if M == 1:
        return w8_gemv(x, qweight, scales)
    return w8_mm(x, qweight, scales)


# (BLOCK_N, BLOCK_K, num_warps) of the few-row kernel for N ≤ 8192 / larger (fastest at 8 rows on an H100)
MM_CONFIGS = {"small": (16, 256, 4), "large": (32, 128, 4)}


def w8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, config=None) -> torch.Tensor:
    """A few rows: x (M, K) · qweight (N, K) int8 · scales (N,) → (M, N), tiles of 16 rows of x."""
    M, K = x.shape
    N = qweight.shape[0]
    block_n, block_k, warps = config or MM_CONFIGS["small" if N <= 8192 else "large"]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _w8_mm[(triton.cdiv(N, block_n), triton.cdiv(M, 16))](
        x, qweight, scales, y, M, N, K, x.stride(0), qweight.stride(0), y.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y



# ---------------------------------------------------------------------------------------------------------------
# int4, group-wise, on the canonical layout: qweight (N, K/2) uint8 with column 2i in the low nibble and 2i+1 in
# the high one; scales (N, K/g); zeros (N, K/g) uint8 or none (symmetric: 8). w[n, k] = (u[n, k] − z) · s.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _w4_gemv(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_wn, stride_sn,
             GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_Z: tl.constexpr):
    """One row. Per tile of BLOCK_K columns: Σ_k u·x per group from the two nibbles of each byte, then one
    multiply by the group's scale; the zero point comes off as z · Σ_k x per group (no per-weight subtraction):

        y[n] = Σ_g s[n, g] · (Σ_{k∈g} u[n, k]·x[k] − z[n, g] · Σ_{k∈g} x[k])
    """
    pid = tl.program_id(0)
    HK: tl.constexpr = BLOCK_K // 2        # bytes of a row per tile
    NG: tl.constexpr = BLOCK_K // GROUP    # groups per tile
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, HK)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b = k0 // 2 + rb                                                                   # (HK,) byte columns
        b_ok = b < K // 2
        p = tl.load(w_ptr + rn[:, None] * stride_wn + b[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0)
        xe = tl.load(x_ptr + 2 * b, mask=b_ok, other=0.0).to(tl.float32)                   # x[2i]
        xo = tl.load(x_ptr + 2 * b + 1, mask=b_ok, other=0.0).to(tl.float32)               # x[2i + 1]
        t = (p & 15).to(tl.float32) * xe[None, :] + (p >> 4).to(tl.float32) * xo[None, :]  # (BLOCK_N, HK)
        tg = tl.sum(tl.reshape(t, (BLOCK_N, NG, GROUP // 2)), axis=2)                      # (BLOCK_N, NG)
        xg = tl.sum(tl.reshape(xe + xo, (NG, GROUP // 2)), axis=1)                         # (NG,)
        g = k0 // GROUP + tl.arange(0, NG)
        g_ok = g * GROUP < K
        sg_mask = n_ok[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=sg_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=sg_mask, other=0).to(tl.float32)
        else:
            z = 8.0
        acc += s * (tg - z * xg[None, :])
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _w4_mm(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
           GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           HAS_Z: tl.constexpr):
    """A few rows: W's tile is unpacked and scaled to x's dtype in registers, then one tensor-core product."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    HK: tl.constexpr = BLOCK_K // 2
    NG: tl.constexpr = BLOCK_K // GROUP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, HK)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b = k0 // 2 + rb
        b_ok = b < K // 2
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        p = tl.load(w_ptr + rn[:, None] * stride_wn + b[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0)
        u = tl.reshape(tl.join(p & 15, p >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)       # columns in order
        g = k0 // GROUP + tl.arange(0, NG)
        sg_mask = n_ok[:, None] & (g * GROUP < K)[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=sg_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=sg_mask, other=0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N, NG), 8.0, tl.float32)
        w = (tl.reshape(u, (BLOCK_N, NG, GROUP)) - z[:, :, None]) * s[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_N, BLOCK_K, num_warps): the one-row kernel's default by output rows N, and the candidates it is tuned
# over on a GPU (first call per weight shape: each timed over copies of W larger than the L2 cache); the few-row
# kernel's tiles. BLOCK_K is raised to the group size when the group is larger.
W4_GEMV_CONFIGS = {"small": (8, 256, 4), "large": (16, 256, 4)}
W4_GEMV_CANDIDATES = tuple((bn, bk, w) for bn in (4, 8, 16) for bk in (256, 512) for w in (2, 4))
W4_MM_CONFIG = (32, 128, 4)
_W4_TUNED: dict[tuple, tuple[int, int, int]] = {}


def _launch_w4_gemv(x, qweight, scales, zeros, y, group, config):
    N, K = qweight.shape[0], x.shape[1]
    block_n, block_k, warps = config
    block_k = max(block_k, group)
    z = zeros if zeros is not None else scales  # unused pointer when there is no zero point
    _w4_gemv[(triton.cdiv(N, block_n),)](x, qweight, scales, z, y, N, K, qweight.stride(0), scales.stride(0),
                                         GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
                                         HAS_Z=zeros is not None, num_warps=warps)


def w4_gemv_config(x, qweight, scales, zeros, group) -> tuple[int, int, int]:
    """The one-row tile for this weight shape: measured once per (N, K, group) on a GPU outside graph capture
    (the fastest candidate over enough copies of W to miss the L2 cache), else the default by N."""
    N, K = qweight.shape[0], x.shape[1]
    key = (N, K, group, zeros is not None, x.dtype, x.device)
    cfg = _W4_TUNED.get(key)
    if cfg is not None:
        return cfg
    default = W4_GEMV_CONFIGS["small" if N <= 8192 else "large"]
    if not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return default
    from triton.testing import do_bench

    nbytes = qweight.numel() + scales.numel() * scales.element_size()
    copies = min(64, max(1, -(-(256 << 20) // max(nbytes, 1))))  # ≥ 256 MB of weights: several L2 caches
    ws = [(qweight.clone(), scales.clone(), None if zeros is None else zeros.clone()) for _ in range(copies)]
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    best, best_t = default, float("inf")
    for cfg in W4_GEMV_CANDIDATES:
        state = {"i": 0}

        def run(cfg=cfg, state=state):
            q, s_, z_ = ws[state["i"] % copies]
            state["i"] += 1
            _launch_w4_gemv(x, q, s_, z_, y, group, cfg)
        try:
            t = do_bench(run, warmup=5, rep=20, return_mode="median")
        except Exception:  # a tile this GPU cannot run (resources): not a candidate
            continue
        if t < best_t:
            best, best_t = cfg, t
    del ws
    _W4_TUNED[key] = best
    return best


def w4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group: int, config=None) -> torch.Tensor:
    """x (M, K) · dequant(qweight (N, K/2), scales (N, K/g), zeros) → (M, N) in x's dtype. x contiguous; the
    weight tensors may be row-block views (fused projections) with unit stride along K."""
    M, K = x.shape
    N = qweight.shape[0]
    if zeros is not None and zeros.stride(0) != scales.stride(0):
        raise ValueError("w4_linear: scales and zeros must share their row stride")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 1:
        _launch_w4_gemv(x, qweight, scales, zeros, y, group,
                        config or w4_gemv_config(x, qweight, scales, zeros, group))
        return y
    z = zeros if zeros is not None else scales
    block_n, block_k, warps = config or W4_MM_CONFIG
    block_k = max(block_k, group)
    _w4_mm[(triton.cdiv(N, block_n), triton.cdiv(M, 16))](
        x, qweight, scales, z, y, M, N, K, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP=group, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, HAS_Z=zeros is not None, num_warps=warps)
    return y
