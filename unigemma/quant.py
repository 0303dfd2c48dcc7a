"""Weight-only quantization: int8 / int4 linear layers, quantize-on-load, quantized checkpoints, KV dtypes.

    float weight (N, K) ─quantize (row chunks)─► canonical tensors ─prepare()─► kernel layout (CPU / CUDA)
                                                    │                            │
                          save (unigemma quantize) ◄┘      forward: few rows  ─► torch's int8 / int4 matmul ops
                                                                    many rows ─► dequantize, then F.linear

Canonical tensors (the on-disk format, `quant_method: "unigemma"` in config.json):
    int8   qweight int8 (N, K)          scales (N,)            w = q · s            (per output channel, symmetric)
    int4   qweight uint8 (N, K/2)       scales (N, K/g)        w = (u − z) · s      (group-wise along K)
           low nibble = column 2i, high nibble = column 2i+1;  zeros uint8 (N, K/g) when zero_point, else z = 8
The tied embedding / LM head table can be int8 with one scale per row: that is per-row for the lookup and per
output channel for the LM head, so one table serves both.

Also read: the published "compressed-tensors" `pack-quantized` format (int32 words holding eight 4-bit values,
first value in the lowest bits, offset by 8; `weight_packed`, `weight_scale`, `weight_shape`, optional packed
`weight_zero_point`), converted to the canonical form on load.

Kernels are PyTorch's own weight-only ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`,
`_weight_int4pack_mm`), and on CUDA for int8 the Triton kernels of `unigemma.kernels_triton` when Triton is
installed (torch's CUDA int8 op made decode 4× slower than bf16); used only for bfloat16 / float16 compute, and
each is checked once per process against the plain dequantize-then-matmul path before it is trusted (older torch
builds or GPUs without the op fall back).
This module does not do activation quantization or calibration (GPTQ / AWQ): weights are rounded to nearest.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (CheckpointError, _assign, _resolve_dtype, canonical_name, checkpoint_dtype, iter_tensors,
                         read_header, skipped_tensor, weight_files)
from .config import AssistantConfig, UnifiedConfig, load_config

GROUP_SIZES = (32, 64, 128, 256)
# Decoder linears, by their module path (checkpoint names): these are quantized (and the MoE experts, EXPERTS
# below); norms, routers, per-layer input tables, vision/audio embedders and the layer scalars stay in float.
DECODER_LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
# The mixture-of-experts tensors (3-D, E experts × (N, K)), by their parameter path: quantized like the linears.
EXPERTS = re.compile(r"^model\.language_model\.layers\.\d+\.experts\.(gate_up_proj|down_proj)$")
EMBED = "model.language_model.embed_tokens"
# Rows (tokens × batch) up to which the fused weight-only ops beat dequantize + a dense matmul on CPU (measured
# crossover: ~64–256 rows for a 768 × 3072 layer); above it (prefill) the dense matmul wins and the
# dequantization is amortised over many rows. The CUDA int4 layout always uses its op.
KERNEL_MAX_ROWS = 64
# The CUDA int4 kernel tried first: "int4-cuda" (torch's tinygemm op, its own packed layout) or "int4-triton"
# (unigemma.kernels_triton: canonical layout, so q/k/v and gate/up fuse into one product each). Measured on an H200
# (12B geometry, batch-1 decode, benchmarks/results/2026-12-04-h200-gpu-3-confirm.jsonl): tinygemm 158.6 tok/s,
# the Triton kernel 143.2 (it reads int4 weights at ~28% of the bandwidth). The other is the fallback when the first
# fails its probe.
INT4_CUDA_KERNEL = "int4-cuda"
_CHUNK_ELEMENTS = 1 << 20  # float32 temporaries of quantization stay ≤ 4 MB each (cache-sized, and small peaks)


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. `unigemma.load(quantize="int4")` means QuantConfig(bits=4)."""

    bits: int = 4                 # 8: per output channel, symmetric; 4: group-wise along the input dimension
    group_size: int = 32          # int4 only: 32, 64, 128 or 256 input columns share one scale (and zero)
    zero_point: bool = False      # int4 only: asymmetric groups (a uint8 zero per group) instead of symmetric
    embeddings: str = "int8"      # "int8": the embedding / LM head table as int8 with per-row scales; "float"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits!r} is not supported (accepted: 8 or 4)")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size!r} is not supported "
                             f"(accepted: {', '.join(map(str, GROUP_SIZES))})")
        if self.bits == 8 and self.zero_point:
            raise ValueError("zero_point=True is for int4 only: int8 is symmetric per output channel")
        if self.embeddings not in ("int8", "float"):
            raise ValueError(f"embeddings={self.embeddings!r} is not supported (accepted: 'int8', 'float')")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def parse(cls, value) -> "QuantConfig | None":
        """None | "int8" | "int4" | QuantConfig | dict of QuantConfig fields → QuantConfig or None."""
        if value is None or isinstance(value, QuantConfig):
            return value
        if isinstance(value, str):
            if value == "int8":
                return cls(bits=8)
            if value == "int4":
                return cls(bits=4)
        if isinstance(value, dict):
            unknown = set(value) - {"bits", "group_size", "zero_point", "embeddings"}
            if unknown:
                raise ValueError(f"quantize: unknown fields {sorted(unknown)} (accepted: bits, group_size, "
                                 "zero_point, embeddings)")
            return cls(**value)
        raise ValueError(f"quantize={value!r} is not supported (accepted: None, 'int8', 'int4' or a QuantConfig)")

    def to_json(self) -> dict:
        return {"quant_method": "unigemma", "format_version": 1, **asdict(self)}


# ---------------------------------------------------------------------------------------------------------------
# quantize / pack / dequantize (canonical form)
# ---------------------------------------------------------------------------------------------------------------
def _row_step(k: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, k))


def _scale_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.is_floating_point() and w.element_size() >= 2 else torch.float32


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → (q int8 (N, K), scales (N,)), symmetric per row: q = round(w / s), s = max|w| / 127."""
    N, K = w.shape
    sd = scale_dtype or _scale_dtype(w)
    q = torch.empty(N, K, dtype=torch.int8, device=w.device)
    scales = torch.empty(N, dtype=sd, device=w.device)
    tiny = torch.finfo(sd).tiny
    step = _row_step(K)
    for a in range(0, N, step):
        x = w[a:a + step].to(torch.float32, copy=True)  # a private copy: the steps below work in place
        # The scale is rounded to its storage dtype first, so q is the best integer for the scale actually stored.
        s = (x.abs().amax(1) / 127).clamp_(min=tiny).to(sd)
        q[a:a + step] = x.div_(s.float()[:, None]).round_().clamp_(-127, 127)
        scales[a:a + step] = s
    return q, scales


_LITTLE = sys.byteorder == "little"


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 (any int dtype) → uint8 (N, K/2): column 2i in the low nibble, 2i+1 in the high."""
    u = u.to(torch.uint8).contiguous()
    if _LITTLE:  # each pair of bytes read as one int16 is lo | hi << 8: two contiguous passes, no strided gathers
        v = u.view(torch.int16)
        return (v | (v >> 4)).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) → uint8 (N, K), the inverse of pack_int4."""
    if _LITTLE:
        v = p.to(torch.int16)
        return ((v & 15) | ((v >> 4) << 8)).view(torch.uint8)
    return torch.stack([p & 15, p >> 4], dim=-1).view(p.shape[0], p.shape[1] * 2)


def quantize_int4(w: torch.Tensor, group_size: int, zero_point: bool = False,
                  scale_dtype: torch.dtype | None = None):
    """(N, K) float → (packed uint8 (N, K/2), scales (N, K/g), zeros uint8 (N, K/g) or None).

    symmetric:   s = max|w| / 7.5 per group, u = clamp(round(w / s), −8, 7) + 8   (all 16 levels in use)
    zero_point:  s = (max − min) / 15, z = clamp(round(−min / s), 0, 15), u = clamp(round(w / s) + z, 0, 15)
    """
    N, K = w.shape
    g = group_size
    if K % g or K % 2:
        raise ValueError(f"int4 needs the input dimension ({K}) to be a multiple of group_size ({g})")
    G = K // g
    sd = scale_dtype or _scale_dtype(w)
    tiny = torch.finfo(sd).tiny
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, G, dtype=sd, device=w.device)
    zeros = torch.empty(N, G, dtype=torch.uint8, device=w.device) if zero_point else None
    step = _row_step(K)
    for a in range(0, N, step):
        x = w[a:a + step].to(torch.float32, copy=True).view(-1, G, g)  # (rows, G, g), private: used in place
        if zero_point:
            lo, hi = x.amin(-1), x.amax(-1)
            s = ((hi - lo) / 15).clamp_(min=tiny).to(sd)
            sf = s.float()
            z = torch.round(-lo / sf).clamp_(0, 15)
            u = x.div_(sf[..., None]).round_().add_(z[..., None]).clamp_(0, 15)
            zeros[a:a + step] = z.to(torch.uint8)
        else:
            s = (x.abs().amax(-1) / 7.5).clamp_(min=tiny).to(sd)
            u = x.div_(s.float()[..., None]).round_().clamp_(-8, 7).add_(8)
        scales[a:a + step] = s
        packed[a:a + step] = pack_int4(u.view(-1, K))
    return packed, scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Canonical int4 → (N, K) float in `dtype` (default: the scales' dtype). (u − z) is a small exact integer,
    so computing in the target dtype rounds once, like computing in float32 and casting."""
    dtype = dtype or scales.dtype
    N, G = scales.shape
    u = unpack_int4(packed).view(N, G, -1).to(dtype)
    z = zeros.to(dtype) if zeros is not None else torch.full((), 8, dtype=dtype, device=packed.device)
    z = z[..., None] if z.dim() else z
    return ((u - z) * scales.to(dtype)[..., None]).view(N, -1)


# ---------------------------------------------------------------------------------------------------------------
# kernels: torch's weight-only ops, each verified once against the dequantize path
# ---------------------------------------------------------------------------------------------------------------
def _op(name: str):
    return getattr(torch.ops.aten, name, None)


def _kernel_group(g: int) -> int | None:
    """A group size the int4 ops accept that divides g (a coarser group is the same scale repeated)."""
    for k in (256, 128, 64, 32):
        if g % k == 0:
            return k
    return None


def _cpu_pack(canonical: torch.Tensor, K: int) -> torch.Tensor:
    """Canonical uint8 (N, K/2) → the layout of `_weight_int4pack_mm_for_cpu`. Converted in row chunks that are
    multiples of the op's 64-row blocks (so chunks convert independently), small enough that the int32 input the
    op wants stays ≈ 4 MB."""
    N = canonical.shape[0]
    out = torch.empty(N, K // 2, dtype=torch.uint8)
    step = max(64, (_CHUNK_ELEMENTS // K) // 64 * 64)
    for a in range(0, N, step):
        u = unpack_int4(canonical[a:a + step]).to(torch.int32)
        out[a:a + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
    return out


def _cpu_unpack(p: torch.Tensor) -> torch.Tensor:
    """Inverse of the CPU op's layout (N a multiple of 64): byte [block, k, j] holds row 64·block + j in its low
    nibble and row 64·block + 32 + j in its high nibble. Checked against the op in `_probe`."""
    N, half = p.shape
    K = half * 2
    v = p.view(N // 64, K, 32)
    u = torch.cat([v & 15, v >> 4], dim=2)  # (blocks, K, 64)
    return u.permute(0, 2, 1).reshape(N, K)


def _cuda_pack(canonical: torch.Tensor, inner: int) -> torch.Tensor:
    """Canonical → `_convert_weight_to_int4pack` (tinygemm) layout, in row chunks (multiples of its 8-row tiles);
    that op wants column 2i in the HIGH nibble."""
    step = max(8, (_CHUNK_ELEMENTS // (canonical.shape[1] * 2)) // 8 * 8)
    chunks = []
    for a in range(0, canonical.shape[0], step):
        c = canonical[a:a + step]
        chunks.append(torch.ops.aten._convert_weight_to_int4pack(((c & 15) << 4) | (c >> 4), inner))
    return torch.cat(chunks, 0) if len(chunks) > 1 else chunks[0]


def _scale_zeros(scales: torch.Tensor, zeros: torch.Tensor | None, group: int, kg: int, dtype) -> torch.Tensor:
    """(N, K/g) scales / zeros → (K/kg, N, 2) [scale, offset] with w = (u − 8)·scale + offset (the ops' form)."""
    s = scales.float()
    z = zeros.float() if zeros is not None else torch.full_like(s, 8.0)
    off = (8.0 - z) * s
    rep = group // kg
    if rep > 1:
        s, off = s.repeat_interleave(rep, 1), off.repeat_interleave(rep, 1)
    return torch.stack([s.t(), off.t()], dim=-1).to(dtype).contiguous()


_PROBED: dict[tuple, bool] = {}


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed (the CPU build), or broken
        return False
    return True


def _probe(kind: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Run kernel `kind` once on a small random layer and compare with the dequantize path; cache the verdict."""
    key = (kind, device.type, dtype)
    if key in _PROBED:
        return _PROBED[key]
    ok, why = False, ""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(128, 256, generator=g)
        x = torch.randn(3, 256, generator=g).to(dtype).to(device)
        bits = 8 if kind.startswith("int8") else 4
        for zp in ((False,) if bits == 8 else (False, True)):
            ref = QuantLinear.from_float(w.to(dtype), bits, 64, zp).to(device)
            fast = QuantLinear.from_float(w.to(dtype), bits, 64, zp).to(device)
            fast.prepare(kernels=True, _force=kind)
            if fast.kernel != kind:
                raise RuntimeError("the op could not be set up")
            if kind == "int4-cpu":  # the inverse layout must be exact, or dequantize / state_dict would be wrong
                if not torch.equal(_cpu_unpack(fast.qweight.cpu()), unpack_int4(ref.qweight.cpu())):
                    raise RuntimeError("unexpected packed layout")
            y_ref = F.linear(x.float(), ref.dequantize(torch.float32))
            for rows in (1, 3):  # kernels may have a separate single-row (decode) path
                y = fast(x[:rows]).float()
                err = (y - y_ref[:rows]).abs().max().item()
                if not err <= 0.02 * y_ref[:rows].abs().max().item() + 1e-3:
                    raise RuntimeError(f"results differ from the dequantize path by {err:.3g} ({rows} rows)")
        ok = True
    except Exception as e:  # an op missing in this torch build, or not built for this GPU
        why = f"{type(e).__name__}: {e}"
    if not ok:
        warnings.warn(f"unigemma.quant: the {kind} kernel is not usable on {device.type} / {dtype} ({why}); using "
                      "the next kernel that is, or dequantize + matmul (correct, slower)", RuntimeWarning,
                      stacklevel=3)
    _PROBED[key] = ok
    return ok


# ---------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """y = x · dequant(W)ᵀ (+ bias) with W stored as int8 (per output channel) or int4 (per group).

    Buffers hold the canonical form until `prepare()` moves them to a kernel's layout (`layout` says which:
    "int8" | "int4" canonical, "int4-cpu" | "int4-cuda" packed for an op). `state_dict()` always writes the
    canonical form (except from "int4-cuda", whose layout cannot be read back).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 zero_point: bool = False, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits!r} is not supported (accepted: 8 or 4)")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if bits == 8 else int(group_size or 32)
        self.zero_point = bool(zero_point) and bits == 4
        if bits == 4 and (in_features % self.group_size or in_features % 2):
            raise ValueError(f"int4: in_features {in_features} must be a multiple of group_size {self.group_size}")
        N, K = out_features, in_features
        kw = dict(device=device)
        if bits == 8:
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, **kw))
            self.register_buffer("scales", torch.empty(N, dtype=dtype, **kw))
        else:
            G = K // self.group_size
            self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, **kw))
            self.register_buffer("scales", torch.empty(N, G, dtype=dtype, **kw))
            if self.zero_point:
                self.register_buffer("zeros", torch.empty(N, G, dtype=torch.uint8, **kw))
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype, **kw), requires_grad=False) if bias else None
        self.layout = f"int{bits}"
        self.kernel: str | None = None    # the op used for small batches, None: dequantize + matmul always
        self._kgroup = self.group_size

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int | None = 32, zero_point: bool = False,
                   bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> "QuantLinear":
        """Quantize a float (N, K) weight. Scales are kept in `dtype` (default: the weight's float dtype)."""
        N, K = weight.shape
        sd = dtype or _scale_dtype(weight)
        m = cls(K, N, bits, group_size, zero_point, bias is not None, sd, device="meta")
        if bits == 8:
            q, s = quantize_int8(weight, sd)
            m._set(qweight=q, scales=s)
        else:
            q, s, z = quantize_int4(weight, m.group_size, zero_point, sd)
            m._set(qweight=q, scales=s, zeros=z)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(sd), requires_grad=False)
        return m

    @classmethod
    def tied_to(cls, emb: "QuantEmbedding") -> "QuantLinear":
        """The LM head that shares an int8 embedding table (same tensors, no copy)."""
        V, H = emb.qweight.shape
        m = cls(H, V, 8, dtype=emb.scales.dtype, device="meta")
        m._set(qweight=emb.qweight, scales=emb.scales)
        return m

    def _set(self, **tensors) -> None:
        for k, v in tensors.items():
            if v is not None:
                self._buffers[k] = v

    # --- math -----------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (N, K) float weight this module computes with."""
        dtype = dtype or self.compute_dtype
        if self.layout == "int8":
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        if self.layout == "int4":
            return dequantize_int4(self.qweight, self.scales, getattr(self, "zeros", None), dtype)
        if self.layout == "int4-cpu":
            sz = self.scale_zeros  # (K/kg, N, 2)
            N, K, kg = self.out_features, self.in_features, self._kgroup
            u = _cpu_unpack(self.qweight).view(N, K // kg, kg).to(dtype)
            s, off = sz[..., 0].t().to(dtype)[..., None], sz[..., 1].t().to(dtype)[..., None]
            return ((u - 8) * s + off).view(N, K)
        raise ValueError(f"layout {self.layout!r} cannot be dequantized outside its kernel")

    @property
    def compute_dtype(self) -> torch.dtype:
        return (self.scale_zeros if self.layout in ("int4-cpu", "int4-cuda") else self.scales).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kernel is not None and (x2.shape[0] <= KERNEL_MAX_ROWS or self.layout == "int4-cuda"):
            kd = self.compute_dtype
            y = self._kernel_mm(x2.to(kd).contiguous()).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def _kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8":
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        if self.kernel == "int8-triton":
            from .kernels_triton import w8_linear

            return w8_linear(x, self.qweight, self.scales)
        if self.kernel == "int4-triton":
            from .kernels_triton import w4_linear

            return w4_linear(x, self.qweight, self.scales, self._buffers.get("zeros"), self.group_size)
        if self.kernel == "int4-cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self._kgroup, self.scale_zeros)
        return torch.ops.aten._weight_int4pack_mm(x, self.qweight, self._kgroup, self.scale_zeros)

    # --- kernels --------------------------------------------------------------------------------------------
    def prepare(self, kernels: bool = True, _force: str | None = None) -> "QuantLinear":
        """Pick the fast op for this module's device and dtype (bfloat16 / float16 compute only) and repack the
        weights for it. Idempotent; leaves the canonical form when no op applies or `kernels` is False."""
        if self.kernel is not None or not kernels or self.layout not in ("int8", "int4"):
            return self
        dev, dt = self.qweight.device, self.scales.dtype
        N, K = self.out_features, self.in_features
        candidates = []  # in order of preference; the first that passes its probe is used
        if dt in (torch.bfloat16, torch.float16) and dev.type in ("cpu", "cuda"):
            if self.bits == 8 and dev.type == "cuda" and _has_triton():
                candidates.append("int8-triton")  # torch's CUDA int8 op reads weights far below the bandwidth
            if self.bits == 8 and _op("_weight_int8pack_mm") is not None:
                candidates.append("int8")
            if self.bits == 4 and _kernel_group(self.group_size):
                if dev.type == "cpu" and N % 64 == 0 and _op("_weight_int4pack_mm_for_cpu") is not None:
                    candidates.append("int4-cpu")
                cuda4 = []
                if dev.type == "cuda" and _has_triton() and self.group_size in (32, 64, 128, 256):
                    cuda4.append("int4-triton")  # canonical layout (row views: fused projections)
                if dev.type == "cuda" and dt == torch.bfloat16 and N % 8 == 0 and K % 32 == 0:
                    cuda4.append("int4-cuda")
                candidates += sorted(cuda4, key=lambda k: k != INT4_CUDA_KERNEL)
        if _force is not None:  # the probe and benchmarks: exactly this kernel (set-up errors propagate)
            kind = _force
        else:
            kind = next((c for c in candidates if _probe(c, dev, dt)), None)
        if kind is None:
            return self
        if kind in ("int8", "int8-triton", "int4-triton"):
            if kind.endswith("-triton"):
                from . import kernels_triton  # noqa: F401  (ImportError without triton)
            self.kernel = kind
            return self
        kg = _kernel_group(self.group_size)
        zeros = self._buffers.pop("zeros", None)
        sz = _scale_zeros(self.scales, zeros, self.group_size, kg, dt)
        if kind == "int4-cpu":
            packed = _cpu_pack(self.qweight, K)
        else:
            inner = 8 if K % 128 == 0 else (4 if K % 64 == 0 else 2)
            packed = _cuda_pack(self.qweight, inner)
        del self._buffers["scales"]
        self._buffers["qweight"] = packed
        self.register_buffer("scale_zeros", sz)
        self.layout = self.kernel = kind
        self._kgroup = kg
        return self

    # --- state dict: always the canonical form -----------------------------------------------------------------
    def canonical(self) -> dict[str, torch.Tensor]:
        """{qweight, scales[, zeros]} in the canonical (on-disk) form, whatever the current layout."""
        if self.layout in ("int8", "int4"):
            out = {"qweight": self.qweight, "scales": self.scales}
            if self.zero_point:
                out["zeros"] = self.zeros
            return out
        if self.layout == "int4-cuda":
            raise ValueError("a QuantLinear packed for the CUDA int4 kernel cannot be written back; save from a "
                             "model loaded with kernels off, or use `unigemma quantize` on the float checkpoint")
        sz = self.scale_zeros.float()
        s, off = sz[..., 0].t(), sz[..., 1].t()  # (N, K/kg)
        rep = self.group_size // self._kgroup
        s, off = s[:, ::rep], off[:, ::rep]
        out = {"qweight": pack_int4(_cpu_unpack(self.qweight)), "scales": s.to(self.compute_dtype)}
        if self.zero_point:
            z = torch.where(s > 0, 8 - off / s.clamp(min=1e-30), torch.full_like(s, 8.0))
            out["zeros"] = torch.round(z).clamp(0, 15).to(torch.uint8)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, v in self.canonical().items():
            destination[prefix + k] = v if keep_vars else v.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}, zero_point={self.zero_point}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}, "
                f"layout={self.layout}, kernel={self.kernel}")


class QuantExperts(nn.Module):
    """One projection of E experts, weight-only int8 / int4: the stand-in for a 3-D float tensor
    `experts.gate_up_proj` (E, 2I, H) or `experts.down_proj` (E, H, I), read by model/moe.py through `chosen`,
    `every` and `linear`.

    Canonical tensors are QuantLinear's with a leading expert dimension (on disk `<proj>.qweight`, `.scales`,
    `.zeros`; each expert's rows are quantized exactly as a QuantLinear's):
        int8   qweight int8 (E, N, K)       scales (E, N)
        int4   qweight uint8 (E, N, K/2)    scales (E, N, K/g)     [zeros uint8 (E, N, K/g)]
    `prepare()` probes a kernel once (on expert 0) and every expert's product runs it on views of the stacked
    tensors; for the CPU int4 op the stack is repacked into that op's layout ("int4-cpu"). Layouts that cannot be
    read back by expert index (the CUDA tinygemm one) are not used, so `chosen` always dequantizes directly.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, bits: int,
                 group_size: int | None = None, zero_point: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        proto = QuantLinear(in_features, out_features, bits, group_size, zero_point, dtype=dtype, device="meta")
        self.num_experts, self.out_features, self.in_features, self.bits = num_experts, out_features, in_features, bits
        self.group_size, self.zero_point = proto.group_size, proto.zero_point
        for k, v in proto._buffers.items():  # the same tensors with the expert dimension in front
            self.register_buffer(k, torch.empty(num_experts, *v.shape, dtype=v.dtype, device=device))
        self.layout = f"int{bits}"
        self.kernel: str | None = None
        self._kgroup = self.group_size
        self._views: list[QuantLinear] | None = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int | None = 32, zero_point: bool = False,
                   dtype: torch.dtype | None = None) -> "QuantExperts":
        """Quantize a float (E, N, K) expert tensor (rows of all experts at once: the scales are per row / group)."""
        E, N, K = weight.shape
        sd = dtype or _scale_dtype(weight)
        m = cls(E, N, K, bits, group_size, zero_point, sd, device="meta")
        flat = weight.reshape(E * N, K)
        if bits == 8:
            q, s = quantize_int8(flat, sd)
            m._set(qweight=q.view(E, N, K), scales=s.view(E, N))
        else:
            q, s, z = quantize_int4(flat, m.group_size, zero_point, sd)
            m._set(qweight=q.view(E, N, -1), scales=s.view(E, N, -1), zeros=None if z is None else z.view(E, N, -1))
        return m

    def _set(self, **tensors) -> None:
        for k, v in tensors.items():
            if v is not None:
                self._buffers[k] = v
        self._views = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return (self.scale_zeros if self.layout == "int4-cpu" else self.scales).dtype

    def _apply(self, fn, recurse=True):
        self._views = None  # views of the old tensors
        return super()._apply(fn, recurse)

    def expert(self, e: int) -> QuantLinear:
        """Expert e as a QuantLinear over views of the stacked tensors (no copy)."""
        if self._views is None:
            self._views = [self._view(i) for i in range(self.num_experts)]
        return self._views[e]

    def _view(self, e: int) -> QuantLinear:
        m = QuantLinear(self.in_features, self.out_features, self.bits, self.group_size, self.zero_point,
                        dtype=self.compute_dtype, device="meta")
        m._buffers = {k: v[e] for k, v in self._buffers.items()}
        m.layout, m.kernel, m._kgroup = self.layout, self.kernel, self._kgroup
        return m

    # --- what model/moe.py reads ----------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x (n, K) → (n, N) through expert e's weights (its kernel for few rows, else dequantize + matmul)."""
        return self.expert(e)(x)

    def chosen(self, idx: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Experts idx (any shape) → their float weights (*idx.shape, N, K); reads only their quantized bytes."""
        dtype = dtype or self.compute_dtype
        N, K = self.out_features, self.in_features
        if self.layout == "int8":
            return self.qweight[idx].to(dtype) * self.scales[idx].to(dtype)[..., None]
        if self.layout == "int4":
            z, G = self._buffers.get("zeros"), K // self.group_size
            w = dequantize_int4(self.qweight[idx].reshape(-1, K // 2), self.scales[idx].reshape(-1, G),
                                None if z is None else z[idx].reshape(-1, G), dtype)
            return w.view(*idx.shape, N, K)
        # "int4-cpu": expert by expert through the op's layout (the CPU runs the grouped path; this serves tests)
        ws = [self.expert(e).dequantize(dtype) for e in idx.reshape(-1).tolist()]
        return torch.stack(ws).view(*idx.shape, N, K)

    def every(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts' float weights (E, N, K)."""
        return self.chosen(torch.arange(self.num_experts, device=self.qweight.device), dtype)

    # --- kernels --------------------------------------------------------------------------------------------
    def prepare(self, kernels: bool = True) -> "QuantExperts":
        """Choose one kernel for every expert (QuantLinear's choice, probed on expert 0) and lay the stack out for
        it. Idempotent; keeps the canonical form when no kernel applies or `kernels` is False."""
        if self.kernel is not None or not kernels or self.layout not in ("int8", "int4"):
            return self
        probe = self._view(0)
        probe._buffers = {k: v.clone() for k, v in probe._buffers.items()}  # prepare may repack: not in place
        kind = probe.prepare(kernels).kernel
        dev, dt = self.qweight.device, self.scales.dtype
        if kind == "int4-cuda":  # tinygemm's layout cannot be indexed by expert: its canonical-layout sibling
            kind = "int4-triton" if _has_triton() and _probe("int4-triton", dev, dt) else None
        if kind == "int4-cpu":
            kg = _kernel_group(self.group_size)
            zeros = self._buffers.pop("zeros", None)
            E, K = self.num_experts, self.in_features
            packed = torch.stack([_cpu_pack(self.qweight[e], K) for e in range(E)])
            sz = torch.stack([_scale_zeros(self.scales[e], None if zeros is None else zeros[e], self.group_size, kg,
                                           dt) for e in range(E)])
            del self._buffers["scales"]
            self._buffers["qweight"] = packed
            self.register_buffer("scale_zeros", sz)
            self.layout, self._kgroup = "int4-cpu", kg
        self.kernel = kind
        self._views = None
        return self

    # --- state dict: always the canonical form -----------------------------------------------------------------
    def canonical(self) -> dict[str, torch.Tensor]:
        if self.layout in ("int8", "int4"):
            return {k: v for k, v in self._buffers.items() if v is not None}
        per = [self.expert(e).canonical() for e in range(self.num_experts)]
        return {k: torch.stack([p[k] for p in per]) for k in per[0]}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, v in self.canonical().items():
            destination[prefix + k] = v if keep_vars else v.detach()

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}, zero_point={self.zero_point}" if self.bits == 4 else ""
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}{g}, layout={self.layout}, kernel={self.kernel}")


class QuantEmbedding(nn.Module):
    """An int8 embedding table with one scale per row (row = token): lookup = q[ids] · s[ids].

    `weight` is an empty float parameter that only carries the compute dtype and device: code that reads
    `embed_tokens.weight.dtype` / `.device` keeps working, and indexing it fails loudly instead of silently.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=dtype, device=device))
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> "QuantEmbedding":
        V, H = weight.shape
        sd = dtype or _scale_dtype(weight)
        m = cls(V, H, sd, device="meta")
        q, s = quantize_int8(weight, sd)
        m._buffers["qweight"], m._buffers["scales"] = q, s
        m.weight = nn.Parameter(torch.empty(0, dtype=sd, device=weight.device), requires_grad=False)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.scales.dtype
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "qweight"] = self.qweight if keep_vars else self.qweight.detach()
        destination[prefix + "scales"] = self.scales if keep_vars else self.scales.detach()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


# ---------------------------------------------------------------------------------------------------------------
# quantizing models: in place, or while loading a float checkpoint
# ---------------------------------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _set_experts(model: nn.Module, name: str, q: "QuantExperts") -> nn.Module:
    """Put quantized experts in place of the 3-D parameter `name`; returns the owning Experts module."""
    owner_name, _, attr = name.rpartition(".")
    return _swap_experts(model.get_submodule(owner_name), attr, q)


def _swap_experts(owner: nn.Module, attr: str, q: "QuantExperts") -> nn.Module:
    owner._parameters.pop(attr, None)
    owner.add_module(attr, q)
    return owner


def _tie_head(model: nn.Module) -> None:
    """After the embedding became int8: the tied LM head shares its table."""
    emb = model.get_submodule(EMBED)
    if isinstance(emb, QuantEmbedding) and model.config.tie_word_embeddings:
        model.lm_head = QuantLinear.tied_to(emb).prepare()


def quantize_model(model: nn.Module, config: "QuantConfig | str", kernels: bool = True) -> nn.Module:
    """Quantize a loaded float `Gemma4Unified` in place (decoder linears and MoE experts; embeddings per config)
    and return it."""
    qc = QuantConfig.parse(config)
    from .model.fusion import unfuse

    unfuse(model)  # a fused float copy (fusion.fuse_projections) must not outlive the float weights
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and DECODER_LINEAR.match(name):
            q = QuantLinear.from_float(mod.weight.detach(), qc.bits, qc.group_size, qc.zero_point)
            _set_module(model, name, q.prepare(kernels))
    for name, p in list(model.named_parameters()):
        if EXPERTS.match(name):
            q = QuantExperts.from_float(p.detach(), qc.bits, qc.group_size, qc.zero_point)
            _set_experts(model, name, q.prepare(kernels))
    emb = model.get_submodule(EMBED)
    if qc.embeddings == "int8" and isinstance(emb, nn.Embedding):
        _set_module(model, EMBED, QuantEmbedding.from_float(emb.weight.detach()))
        if model.config.tie_word_embeddings:
            _tie_head(model)
        else:
            model.lm_head = QuantLinear.from_float(model.lm_head.weight.detach(), 8).prepare(kernels)
    return model


def load_transform(config: QuantConfig, kernels: bool = True, release: bool = False) -> Callable:
    """The `transform` hook for `checkpoint.build_model`: each decoder Linear weight is quantized the moment it is
    read, so its float copy is dropped at once (peak host memory ≈ quantized model + the tensors in flight).

    release=True also frees the float tensor's storage after quantizing it: the loader holds its last tensor until
    the next one is read, which would otherwise keep two float tensors alive. Only for tensors nobody else holds
    (the loader's own freshly read ones)."""
    def transform(name: str, tensor: torch.Tensor, module: nn.Module):
        mod_name, _, attr = name.rpartition(".")
        if EXPERTS.match(name):  # the owning Experts module comes back with this tensor quantized in it
            q = QuantExperts.from_float(tensor, config.bits, config.group_size, config.zero_point).prepare(kernels)
            out = _swap_experts(module, attr, q)
        elif attr != "weight":
            return None
        elif isinstance(module, nn.Linear) and DECODER_LINEAR.match(mod_name):
            out = QuantLinear.from_float(tensor, config.bits, config.group_size, config.zero_point).prepare(kernels)
        elif config.embeddings == "int8" and mod_name == EMBED:
            out = QuantEmbedding.from_float(tensor)
        elif config.embeddings == "int8" and mod_name == "lm_head":  # untied head (a tied one is not on disk)
            out = QuantLinear.from_float(tensor, 8).prepare(kernels)
        else:
            return None
        if release:
            with torch.no_grad():
                tensor.set_()  # points the caller's tensor at an empty storage: the float data is freed now
        return out
    return transform


def build_quantized(path: str | Path, config: QuantConfig, dtype=None, device: str | torch.device = "cpu",
                    progress=None, kernels: bool = True):
    """(model, config) for a float checkpoint, quantized while it streams from disk."""
    from .checkpoint import build_model

    cfg = load_config(path)
    if isinstance(cfg, AssistantConfig):
        raise ValueError(f"{path} holds an MTP drafter; quantization applies to the target model")
    model, cfg = build_model(path, dtype=dtype, device=device, progress=progress,
                             transform=load_transform(config, kernels, release=True))
    _tie_head(model)
    return model, cfg


# ---------------------------------------------------------------------------------------------------------------
# quantized checkpoints: write (unigemma format) and read (unigemma / compressed-tensors pack-quantized)
# ---------------------------------------------------------------------------------------------------------------
_COPY_SKIP = re.compile(r"^(config\.json|model.*\.safetensors(\.index\.json)?|.*\.(bin|pt|pth|safetensors))$")


def quantize_checkpoint(src: str | Path, dst: str | Path, config: QuantConfig | str,
                        max_shard_bytes: int = 4 << 30, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a quantized copy of the float checkpoint `src` to `dst` (safetensors shards + config.json with a
    `quantization_config`; tokenizer, template and generation files copied). Streams one tensor at a time."""
    from safetensors.torch import save_file

    qc = QuantConfig.parse(config)
    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    if isinstance(cfg, AssistantConfig):
        raise ValueError(f"{src} holds an MTP drafter; `quantize` applies to the target model")
    if "quantization_config" in cfg.raw:
        raise ValueError(f"{src} is already quantized ({cfg.raw['quantization_config'].get('quant_method')}); "
                         "quantize the float checkpoint")
    if dst.resolve() == src.resolve():
        raise ValueError(f"--out {dst} is the source folder; choose a new folder")
    files = weight_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    for old in list(dst.glob("model*.safetensors")) + list(dst.glob("model.safetensors.index.json")):
        old.unlink()
    text_only = getattr(cfg, "is_text_only", False)
    shards: list[str] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    n_total = sum(len(read_header(f)[0]) for f in files)

    def flush():
        nonlocal current, size
        if current:
            name = f"part-{len(shards):05d}.safetensors"
            save_file(current, str(dst / name), metadata={"format": "pt", "quantization": qc.name})
            shards.append(name)
            weight_map.update({k: name for k in current})
        current, size = {}, 0

    for i, (_, raw, load) in enumerate(iter_tensors(files)):
        name = canonical_name(raw, text_only)
        mod_name, _, attr = name.rpartition(".")
        raw_base = raw[: -len(".weight")] if raw.endswith(".weight") else raw
        t = load()
        out: dict[str, torch.Tensor]
        if EXPERTS.match(name):  # (E, N, K): the same tensors as QuantExperts keeps, under the parameter's name
            out = {f"{raw}.{k}": v for k, v in
                   QuantExperts.from_float(t, qc.bits, qc.group_size, qc.zero_point).canonical().items()}
        elif attr == "weight" and DECODER_LINEAR.match(mod_name):
            if qc.bits == 8:
                q, s = quantize_int8(t)
                out = {f"{raw_base}.qweight": q, f"{raw_base}.scales": s}
            else:
                q, s, z = quantize_int4(t, qc.group_size, qc.zero_point)
                out = {f"{raw_base}.qweight": q, f"{raw_base}.scales": s}
                if z is not None:
                    out[f"{raw_base}.zeros"] = z
        elif attr == "weight" and qc.embeddings == "int8" and mod_name in (EMBED, "lm_head"):
            q, s = quantize_int8(t)
            out = {f"{raw_base}.qweight": q, f"{raw_base}.scales": s}
        else:
            out = {raw: t}
        del t
        nbytes = sum(v.numel() * v.element_size() for v in out.values())
        if current and size + nbytes > max_shard_bytes:
            flush()
        current.update(out)
        size += nbytes
        total += nbytes
        if progress is not None:
            progress(i + 1, n_total)
    flush()
    # final names: model.safetensors, or model-0000i-of-0000n.safetensors + index (the published layout)
    if len(shards) == 1:
        (dst / shards[0]).rename(dst / "model.safetensors")
    else:
        renamed = {}
        for i, s in enumerate(shards):
            new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            (dst / s).rename(dst / new)
            renamed[s] = new
        wm = {k: renamed[v] for k, v in weight_map.items()}
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2), encoding="utf-8")
    raw_cfg = dict(cfg.raw)
    raw_cfg["quantization_config"] = qc.to_json()
    (dst / "config.json").write_text(json.dumps(raw_cfg, indent=2), encoding="utf-8")
    for f in src.iterdir():
        if f.is_file() and not _COPY_SKIP.match(f.name):
            shutil.copy2(f, dst / f.name)
    return dst


def quantization_config(raw: dict) -> dict | None:
    qc = raw.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def stored_quantization(path: str | Path) -> dict | None:
    """The quantization a checkpoint folder is stored with ({"quant_method", "bits", ...}), None when it holds
    float weights or has no config.json (the regular loader reports that)."""
    from .config import read_config_json

    if not (Path(path) / "config.json").is_file():
        return None
    qc = quantization_config(read_config_json(path))
    if qc is None:
        return None
    where = str(Path(path) / "config.json")
    if qc.get("quant_method") not in ("unigemma", "compressed-tensors"):
        raise ValueError(f"{where}: quant_method {qc.get('quant_method')!r} is not supported (accepted: 'unigemma', "
                         "'compressed-tensors' with format 'pack-quantized')")
    if qc.get("quant_method") == "compressed-tensors":
        w = _ct_scheme(qc, where)
        return {"quant_method": "compressed-tensors", "bits": int(w["num_bits"]), "group_size": w.get("group_size"),
                "zero_point": not w.get("symmetric", True), "strategy": w.get("strategy")}
    return dict(qc)


@dataclass
class _Spec:
    """How one module is stored: which tensor parts, and the numbers needed to rebuild it."""

    kind: str                   # "linear" | "embedding"
    bits: int
    group_size: int | None
    zero_point: bool
    parts: set


def _ct_scheme(qc: dict, where: str) -> dict:
    """Validate a compressed-tensors config and return its weight arguments (one scheme for all layers)."""
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}: quantization_config.config_groups is missing or empty")
    weights = []
    for gname, g in groups.items():
        w = (g or {}).get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise ValueError(f"{where}: config_groups.{gname} has no 'weights' arguments")
        if (g.get("format") or fmt) != "pack-quantized":
            raise ValueError(f"{where}: compressed-tensors format {g.get('format') or fmt!r} is not supported "
                             "(accepted: 'pack-quantized')")
        if g.get("input_activations"):
            raise ValueError(f"{where}: config_groups.{gname} quantizes activations; only weight-only is supported")
        if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
            raise ValueError(f"{where}: config_groups.{gname}.weights: type {w.get('type')!r} / num_bits "
                             f"{w.get('num_bits')!r} is not supported (accepted: int, 4 or 8 bits)")
        if w.get("strategy") not in ("group", "channel"):
            raise ValueError(f"{where}: config_groups.{gname}.weights.strategy {w.get('strategy')!r} is not "
                             "supported (accepted: 'group', 'channel')")
        if w.get("actorder") not in (None, "static", False):
            raise ValueError(f"{where}: activation-order ('actorder': {w.get('actorder')!r}) is not supported")
        weights.append(w)
    key = {(w.get("num_bits"), w.get("strategy"), w.get("group_size"), bool(w.get("symmetric", True)))
           for w in weights}
    if len(key) > 1:
        raise ValueError(f"{where}: mixed quantization schemes {sorted(map(str, key))} are not supported")
    return weights[0]


_UG_PARTS = {"qweight", "scales", "zeros"}
_CT_PARTS = {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"}


def _plan(model: nn.Module, files: list[Path], text_only: bool, qc: dict, where: str) -> dict[str, _Spec]:
    """From the safetensors headers alone: which modules are stored quantized, and how."""
    method = qc.get("quant_method")
    parts: dict[str, dict[str, tuple]] = {}
    known = _UG_PARTS if method == "unigemma" else _CT_PARTS
    for f in files:
        entries, _ = read_header(f)
        for raw, (dt, shape, _, _) in entries.items():
            base, _, part = canonical_name(raw, text_only).rpartition(".")
            if part in known:
                parts.setdefault(base, {})[part] = (dt, shape, f)
    plan: dict[str, _Spec] = {}
    if method == "unigemma":
        bits, g, zp = qc.get("bits"), qc.get("group_size"), bool(qc.get("zero_point", False))
        if bits not in (4, 8) or (bits == 4 and g not in GROUP_SIZES):
            raise ValueError(f"{where}: quantization_config bits={bits!r} group_size={g!r} is not supported")
        for base, p in parts.items():
            if EXPERTS.match(base):
                bits_e = 8 if p.get("qweight", (None,))[0] == torch.int8 else 4
                plan[base] = _Spec("experts", bits_e, None if bits_e == 8 else g, zp and bits_e == 4,
                                   {"qweight", "scales"} | ({"zeros"} if zp and bits_e == 4 else set()))
                continue
            mod = _get(model, base, where, next(iter(p.values()))[2])
            if base == EMBED or (isinstance(mod, nn.Embedding)):
                plan[base] = _Spec("embedding", 8, None, False, {"qweight", "scales"})
            elif base == "lm_head" or p.get("qweight", (None,))[0] == torch.int8:
                plan[base] = _Spec("linear", 8, None, False, {"qweight", "scales"})
            else:
                plan[base] = _Spec("linear", 4, g, zp, {"qweight", "scales"} | ({"zeros"} if zp else set()))
    else:
        w = _ct_scheme(qc, where)
        bits, sym = int(w["num_bits"]), bool(w.get("symmetric", True))
        if bits == 8 and (not sym or w["strategy"] != "channel"):
            raise ValueError(f"{where}: 8-bit compressed-tensors weights are supported per channel, symmetric only")
        for base, p in parts.items():
            mod = _get(model, base, where, next(iter(p.values()))[2])
            if "weight_g_idx" in p:
                raise ValueError(f"{where}: {base}.weight_g_idx (activation order) is not supported")
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"{where}: {base} is stored quantized but is not a linear layer here")
            K = mod.in_features
            g = K if w["strategy"] == "channel" else int(w.get("group_size") or 0)
            if g <= 0 or K % g:
                raise ValueError(f"{where}: {base}: group_size {g} does not divide in_features {K}")
            need = {"weight_packed", "weight_scale"} | ({"weight_shape"} if "weight_shape" in p else set())
            if "weight_zero_point" in p:
                need.add("weight_zero_point")
            elif not sym:
                raise ValueError(f"{where}: {base}: asymmetric scheme but no weight_zero_point tensor")
            plan[base] = _Spec("linear", bits, g, not sym, need)
    for base, spec in plan.items():
        missing = spec.parts - set(parts[base])
        if missing:
            raise CheckpointError(f"{where}: {base} is missing quantized tensors {sorted(missing)}")
    return plan


def _get(model: nn.Module, name: str, where: str, f) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{f}: quantized tensors for {name!r}, which is no module of a model built from this "
                              "config.json") from None


def _ct_unpack(packed: torch.Tensor, bits: int, K: int, view: bool | None = None) -> torch.Tensor:
    """int32 words (N, ceil(K / per)) → unsigned values. int4: the canonical packed uint8 (N, K/2); int8: uint8
    (N, K). Value i of a word sits in bits [bits·i, bits·(i+1)), so on a little-endian host the words' bytes are
    already the canonical layout (low nibble first) and a zero-copy view suffices."""
    N = packed.shape[0]
    per = 32 // bits
    if view is None:
        view = sys.byteorder == "little" and K % per == 0
    if view:
        b = packed.contiguous().view(torch.uint8)
        return b if bits == 8 else b[:, : K // 2]
    out = torch.empty(N, K if bits == 8 else K // 2, dtype=torch.uint8)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    step = _row_step(K)
    for a in range(0, N, step):
        u = ((packed[a:a + step, :, None] >> shifts) & ((1 << bits) - 1)).reshape(-1, packed.shape[1] * per)[:, :K]
        out[a:a + step] = u if bits == 8 else pack_int4(u)
    return out


def _from_ct(spec: _Spec, t: dict[str, torch.Tensor], mod: nn.Linear, dtype, where: str) -> QuantLinear:
    """compressed-tensors pack-quantized → canonical QuantLinear (buffers on the CPU, bias still to come)."""
    N, K = mod.out_features, mod.in_features
    packed, scale = t["weight_packed"], t["weight_scale"]
    if "weight_shape" in t and [int(x) for x in t["weight_shape"].tolist()] != [N, K]:
        raise CheckpointError(f"{where}: weight_shape {t['weight_shape'].tolist()} != expected {[N, K]}")
    per = 32 // spec.bits
    if packed.dtype != torch.int32 or tuple(packed.shape) != (N, -(-K // per)):
        raise CheckpointError(f"{where}: weight_packed must be int32 of shape {(N, -(-K // per))}, got "
                              f"{packed.dtype} {tuple(packed.shape)}")
    G = K // spec.group_size
    if scale.numel() != N * G or scale.shape[0] != N:
        raise CheckpointError(f"{where}: weight_scale shape {tuple(scale.shape)} != expected {(N, G)}")
    scale = scale.reshape(N, G).to(dtype).contiguous()
    u = _ct_unpack(packed, spec.bits, K)
    m = QuantLinear(K, N, spec.bits, spec.group_size, spec.zero_point, False, dtype, device="meta")
    if spec.bits == 8:  # signed = unsigned − 128
        m._set(qweight=(u.to(torch.int16) - 128).to(torch.int8), scales=scale[:, 0].contiguous())
        return m
    zeros = None
    if "weight_zero_point" in t:
        zp = t["weight_zero_point"]
        if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-N // 8), G):   # packed along the rows (dim 0)
            z = _ct_unpack(zp.t().contiguous(), 4, zp.shape[0] * 8, view=False)
            z = unpack_int4(z)[:, :N].t().to(torch.int16)  # unsigned = signed zero point + 8 = the canonical z
        elif zp.numel() == N * G:
            z = zp.reshape(N, G).to(torch.int16) + 8
        else:
            raise CheckpointError(f"{where}: weight_zero_point has shape {tuple(zp.shape)}, expected "
                                  f"{(-(-N // 8), G)} (packed) or {(N, G)}")
        if spec.zero_point:
            zeros = z.clamp(0, 15).to(torch.uint8).contiguous()
        elif bool((z != 8).any()):
            raise CheckpointError(f"{where}: symmetric scheme but non-zero weight_zero_point")
    m._set(qweight=u.contiguous(), scales=scale, zeros=zeros)
    return m


def load_quantized(path: str | Path, dtype=None, device: str | torch.device = "cpu", progress=None,
                   kernels: bool = True):
    """(model, config) for a checkpoint whose config.json has a `quantization_config` (unigemma or
    compressed-tensors pack-quantized). Quantized modules are built from their packed tensors directly."""
    from .model.unified import Gemma4Unified

    path = Path(path)
    cfg = load_config(path)
    where = str(path / "config.json")
    qc = quantization_config(cfg.raw)
    if qc is None:
        raise ValueError(f"{where}: no quantization_config")
    if qc.get("quant_method") not in ("unigemma", "compressed-tensors"):
        raise ValueError(f"{where}: quant_method {qc.get('quant_method')!r} is not supported (accepted: 'unigemma', "
                         "'compressed-tensors' with format 'pack-quantized')")
    if isinstance(cfg, AssistantConfig):
        raise ValueError(f"{path} holds an MTP drafter; quantized drafters are not supported")
    torch_dtype = _resolve_dtype(dtype) or checkpoint_dtype(path, cfg.raw)
    device = torch.device(device)
    files = weight_files(path)
    text_only = cfg.is_text_only
    with torch.device("meta"):
        model = Gemma4Unified(cfg)
    plan = _plan(model, files, text_only, qc, where)
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update(dict(model.named_buffers(remove_duplicate=False)))
    tied_alias = "lm_head.weight" if cfg.tie_word_embeddings else None
    pending: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    done = 0
    for f, raw, load in iter_tensors(files):
        name = canonical_name(raw, text_only)
        base, _, part = name.rpartition(".")
        if base in plan and part in plan[base].parts | _UG_PARTS | _CT_PARTS:
            if part not in plan[base].parts:
                raise CheckpointError(f"{f}: unexpected tensor {raw!r}")
            got = pending.setdefault(base, {})
            got[part] = load()
            if len(got) == len(plan[base].parts):
                _install(model, base, plan[base], pending.pop(base), torch_dtype, device, kernels, f"{f}: {base}")
                done += 1
            continue
        if name not in expected and skipped_tensor(name, cfg):  # encoders not built yet, unused reuse-layer K/V
            continue
        if name not in expected:
            raise CheckpointError(f"{f}: unexpected tensor {raw!r} (no such parameter in a model built from this "
                                  "config.json)")
        t = load()
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{f}: tensor {raw!r} has shape {tuple(t.shape)}, but config.json implies "
                                  f"{tuple(expected[name].shape)}")
        if t.is_floating_point():
            t = t.to(torch_dtype)
        _assign(model, name, t.to(device))
        seen.add(name)
        if progress is not None:
            progress(len(seen) + done, len(expected))
    # the float weights of modules stored quantized are not expected (their biases are)
    missing = [n for n in expected if n not in seen and n != tied_alias and n not in plan
               and not (n.rpartition(".")[0] in plan and n.endswith(".weight"))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{more}")
    if tied_alias is not None:
        emb = model.get_submodule(EMBED)
        if isinstance(emb, QuantEmbedding):
            _tie_head(model)
        else:
            model.lm_head.weight = emb.weight
    model.eval()
    return model, cfg


def _install(model, base: str, spec: _Spec, t: dict, dtype, device, kernels: bool, where: str) -> None:
    if spec.kind == "experts":
        owner_name, _, attr = base.rpartition(".")
        E, N, K = model.get_submodule(owner_name)._parameters[attr].shape
        m = QuantExperts(E, N, K, spec.bits, spec.group_size, spec.zero_point, dtype, device="meta")
        for k, v in t.items():
            want = m._buffers[k]
            bad_dtype = v.dtype != want.dtype if k != "scales" else not v.is_floating_point()
            if tuple(v.shape) != tuple(want.shape) or bad_dtype:
                raise CheckpointError(f"{where}.{k}: expected {want.dtype if k != 'scales' else 'float'} "
                                      f"{tuple(want.shape)}, got {v.dtype} {tuple(v.shape)}")
        m._set(**{k: (v.to(dtype) if k == "scales" else v).to(device) for k, v in t.items()})
        _set_experts(model, base, m.prepare(kernels))
        return
    mod = model.get_submodule(base)
    if spec.kind == "embedding":
        q, s = t["qweight"], t["scales"]
        V, H = mod.weight.shape
        if q.dtype != torch.int8 or tuple(q.shape) != (V, H) or tuple(s.shape) != (V,):
            raise CheckpointError(f"{where}: expected qweight int8 {(V, H)} and scales {(V,)}, got "
                                  f"{q.dtype} {tuple(q.shape)} / {tuple(s.shape)}")
        m = QuantEmbedding(V, H, dtype, device="meta")
        m._buffers["qweight"], m._buffers["scales"] = q.to(device), s.to(dtype).to(device)
        m.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        _set_module(model, base, m)
        return
    if "weight_packed" in t:
        m = _from_ct(spec, t, mod, dtype, where)
    else:
        N, K = mod.out_features, mod.in_features
        m = QuantLinear(K, N, spec.bits, spec.group_size, spec.zero_point, False, dtype, device="meta")
        G = K // m.group_size
        want = {"qweight": ((N, K), torch.int8) if spec.bits == 8 else ((N, K // 2), torch.uint8),
                "scales": ((N,), None) if spec.bits == 8 else ((N, G), None), "zeros": ((N, G), torch.uint8)}
        for k, v in t.items():
            shape, dt = want[k]
            bad_dtype = v.dtype != dt if dt is not None else not v.is_floating_point()
            if tuple(v.shape) != shape or bad_dtype:
                raise CheckpointError(f"{where}.{k}: expected {dt or 'float'} {shape}, got {v.dtype} {tuple(v.shape)}")
        m._set(qweight=t["qweight"], scales=t["scales"].to(dtype), zeros=t.get("zeros"))
    for k, v in list(m._buffers.items()):
        m._buffers[k] = v.to(device)
    b = getattr(mod, "bias", None)
    if b is not None:
        # A float bias is a regular tensor of the checkpoint: keep it if it was read already, else keep the meta
        # placeholder for the loader to fill when it arrives.
        m.bias = b
    _set_module(model, base, m.prepare(kernels))


# ---------------------------------------------------------------------------------------------------------------
# sizes (inspect) and KV-cache dtypes
# ---------------------------------------------------------------------------------------------------------------
def quantized_weight_bytes(cfg: UnifiedConfig, config: QuantConfig | str, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of the quantized model by part, from a meta-device build (exact for the canonical format):
    decoder linears (packed weights, scales, zeros), embeddings (int8 table + row scales, or float), the rest
    (norms, vision / audio embedders) in float."""
    from .model.unified import Gemma4Unified

    qc = QuantConfig.parse(config)
    with torch.device("meta"):
        model = Gemma4Unified(cfg)
    out = {"linear_weights": 0, "linear_scales": 0, "embeddings": 0, "other": 0}
    for name, p in model.named_parameters():  # a tied head is yielded once (with the embedding)
        mod_name = name.rpartition(".")[0]
        if DECODER_LINEAR.match(mod_name) or EXPERTS.match(name):
            N, K = p.shape[-2:]
            E = p.shape[0] if p.dim() == 3 else 1
            if qc.bits == 8:
                out["linear_weights"] += E * N * K
                out["linear_scales"] += E * N * dtype_bytes
            else:
                G = K // qc.group_size
                out["linear_weights"] += E * N * K // 2
                out["linear_scales"] += E * N * G * (dtype_bytes + (1 if qc.zero_point else 0))
        elif mod_name in (EMBED, "lm_head"):
            V, H = p.shape
            out["embeddings"] += V * H + V * dtype_bytes if qc.embeddings == "int8" else V * H * dtype_bytes
        else:
            out["other"] += p.numel() * dtype_bytes
    # layer scalars are float32 buffers on disk
    out["other"] += sum(b.numel() * 4 for n, b in model.named_buffers() if n.endswith("layer_scalar"))
    out["total"] = sum(out.values())
    return out


_KV_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
              "half": "float16", "fp32": "float32", "float32": "float32", "fp8": "float8_e4m3fn",
              "fp8_e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2",
              "float8_e5m2": "float8_e5m2"}


def resolve_kv_dtype(value, default: torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """KV-cache storage dtype: None / "auto" → `default` (the model's); bf16 / fp16 / fp32 / fp8 (e4m3) or a
    torch.dtype. fp8 entries are stored as is and upcast to the query dtype when attention reads them; a device
    or torch build that cannot store / convert them is refused here with a clear error."""
    if value is None or value == "auto":
        return default
    if isinstance(value, torch.dtype):
        dt = value
    else:
        key = _KV_DTYPES.get(str(value).lower())
        if key is None or not hasattr(torch, key):
            raise ValueError(f"kv_dtype={value!r} is not supported (accepted: 'auto', 'bf16', 'fp16', 'fp32', 'fp8')")
        dt = getattr(torch, key)
    if not dt.is_floating_point:
        raise ValueError(f"kv_dtype={value!r}: the KV cache needs a floating-point dtype")
    if dt.itemsize == 1:
        up = default or torch.float32
        try:  # the operations the cache performs: zeros, indexed write with conversion, indexed read + upcast
            c = torch.zeros(2, 3, 4, dtype=dt, device=device)
            c[torch.tensor([1], device=device), :, torch.tensor([2], device=device)] = torch.ones(
                1, 3, dtype=up, device=device).to(dt)
            ok = float(c[torch.tensor([1], device=device)].to(up).sum()) == 3.0
        except Exception as e:  # noqa: BLE001 - any failure means this build cannot hold an fp8 cache
            raise ValueError(f"kv_dtype={value!r}: {dt} is not usable on {device} with torch {torch.__version__} "
                             f"({type(e).__name__}: {e}); use 'bf16' or 'fp16'") from None
        if not ok:
            raise ValueError(f"kv_dtype={value!r}: {dt} round trip failed on {device}; use 'bf16' or 'fp16'")
    return dt

