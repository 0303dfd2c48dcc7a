"""The mixture-of-experts block of the family's 26B-A4B: a router and experts stored as 3-D tensors.

    residual h (N, H) ─► router: rms(h) · scale · H^−½ ─► proj ─► softmax (fp32) ─► top-k ─► renormalise
                                                                                   · per_expert_scale[i]
    rms(h, pre_feedforward_layernorm_2) ─► experts: Σ_k w_k · down_e(gelu(gate_e x) · up_e x),  e = i_k

The block sits beside the dense MLP of the same layer (text.py adds the two, each with its own post-norm).
Parameter names are the checkpoint's: `router.{proj.weight, scale, per_expert_scale}`,
`experts.{gate_up_proj (E, 2I, H), down_proj (E, H, I)}`.

The experts run in one of four ways (`Experts.forward`, `choose_path`):
  gathered  index the 3-D tensors with the (N, k) choices and run batched products: reads only the chosen
            experts' slices, static shapes, no host sync (CUDA-graph safe); CUDA steps of a few tokens (decode).
  grouped   sort the N·k (token, expert) pairs by expert and run one product per touched expert over views of
            its weights (no copy); reads only the touched experts, but needs the per-expert counts on the host,
            so it runs where a sync is free (the CPU, always) or cheap next to the work (CUDA prefill).
  all       every expert on every token, weighted by the (N, E) routing weights (zero where not chosen):
            static shapes, each weight read once; for CUDA-graph capture of larger decode batches, where the
            chosen experts cover most of them anyway (batch 32, top-8 of 128: ~112 distinct experts per layer)
            and gathering a copy per (token, expert) pair would read and write far more.
  grouped_mm  the grouped path with no host sync: pairs sorted by expert on the device, per-expert offsets by a
            search, two `F.grouped_mm` products over the 3-D weights (each touched expert read once, its rows only);
            inside `graph_safe()` (DiffusionGemma's captured denoiser: a canvas of 256 tokens × top-8 is 2,048
            pairs, where `all` would do 16× the products of 128 experts). Float weights; on CUDA bfloat16 only
            (the fused kernel's dtype), otherwise `all`.
Quantized experts (`unigemma.quant.QuantExperts`, int8 / int4 weight-only) take the place of a 3-D tensor: the
three paths read their weights through `_chosen` (the chosen experts' weights, dequantized), `_every` and `_linear`
(one expert's product, a weight-only kernel where one applies), so the math below is the same code for both.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from . import fusion


_static = threading.local()

# F.grouped_mm is public in recent torch; older builds have only the private torch._grouped_mm (same arguments).
# Neither: graph-safe steps take the `all` path.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@contextlib.contextmanager
def graph_safe():
    """Within: the experts take a path with static shapes and no host sync (`grouped_mm`, else `all`), also outside
    a capture — for a CUDA graph's warm-up runs and capture alike, and for CPU checks of what a graph would run."""
    before = getattr(_static, "on", False)
    _static.on = True
    try:
        yield
    finally:
        _static.on = before


def _graph_safe() -> bool:
    return getattr(_static, "on", False)


class Router(nn.Module):
    """(N, H) residual → top-k expert weights (N, k) float32 and indices (N, k)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        H = config.hidden_size
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root = H ** -0.5
        self.proj = nn.Linear(H, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.proj(fusion.router_input(h, self.scale, self.root, self.eps))  # (N, E)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """E gated-GELU experts as 3-D tensors; `forward(x, idx, w)` = Σ_k w_k · expert_{idx_k}(x) per token."""

    def __init__(self, config: TextConfig):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.intermediate = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.path: str | None = None  # "gathered" / "grouped" / "all" forces one (tests, benchmarks); None: auto

    def choose_path(self, x: torch.Tensor, pairs: int) -> str:
        if self.path is not None:
            return self.path
        if _graph_safe():
            float_weights = isinstance(self.gate_up_proj, torch.Tensor) and isinstance(self.down_proj, torch.Tensor)
            ok = _GROUPED_MM is not None and float_weights and (not x.is_cuda or x.dtype == torch.bfloat16)
            return "grouped_mm" if ok else "all"
        if not x.is_cuda:
            return "grouped"  # a host sync costs nothing here, and views avoid copying the chosen weights
        if pairs <= max(1, self.num_experts // 4):
            return "gathered"
        return "all" if torch.cuda.is_current_stream_capturing() else "grouped"

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, sequences: int = 1) -> torch.Tensor:
        """x (N, H), idx (N, k) int64, w (N, k) float32 → (N, H) in x's dtype.

        sequences: x holds that many sequences of N / sequences tokens each; the grouped path then runs each
        sequence's tokens through an expert in their own product, so a sequence's result does not depend on the
        others in the batch (a CPU product rounds a row differently when it has only one or two rows: MKL's
        small-M kernels). DiffusionGemma's batched denoiser asks for this (attention.build_prefix_plan)."""
        path = self.choose_path(x, idx.numel())
        if path == "gathered":
            return self._gathered(x, idx, w)
        if path == "all":
            return self._all(x, idx, w)
        if path == "grouped_mm":
            return self._grouped_mm(x, idx, w)
        return self._grouped(x, idx, w, sequences)

    # --- weights: a float 3-D tensor, or a quantized stand-in with the same indexing ----------------------------
    @staticmethod
    def _chosen(p, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """p (E, N, K) at expert indices idx (any shape) → (*idx.shape, N, K) float."""
        return p[idx] if isinstance(p, torch.Tensor) else p.chosen(idx, dtype)

    @staticmethod
    def _every(p, dtype: torch.dtype) -> torch.Tensor:
        """Every expert's weight, (E, N, K) float."""
        return p if isinstance(p, torch.Tensor) else p.every(dtype)

    @staticmethod
    def _linear(p, x: torch.Tensor, e: int) -> torch.Tensor:
        """x (n, K) · p[e]ᵀ → (n, N)."""
        return F.linear(x, p[e]) if isinstance(p, torch.Tensor) else p.linear(x, e)

    def _all(self, x, idx, w):
        N, K = idx.shape
        y = torch.matmul(x, self._every(self.gate_up_proj, x.dtype).transpose(1, 2))  # (E, N, 2I): x over experts
        gate, up = y.chunk(2, dim=-1)
        o = torch.matmul(fusion.gelu_mul(gate, up), self._every(self.down_proj, x.dtype).transpose(1, 2))  # (E, N, H)
        dense = torch.zeros(N, self.num_experts, dtype=w.dtype, device=w.device).scatter(1, idx, w)  # (N, E)
        return fusion.weighted_sum(o.transpose(0, 1), dense)

    def _gathered(self, x, idx, w):
        N, K = idx.shape
        gu = self._chosen(self.gate_up_proj, idx, x.dtype)             # (N, k, 2I, H): the chosen experts only
        y = torch.matmul(gu, x[:, None, :, None]).squeeze(-1)          # (N, k, 2I)
        gate, up = y.chunk(2, dim=-1)                                  # 2 × (N, k, I)
        a = fusion.gelu_mul(gate, up)
        o = torch.matmul(self._chosen(self.down_proj, idx, x.dtype), a[..., None]).squeeze(-1)  # (N, k, H)
        return fusion.weighted_sum(o, w)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on rows x (n, H), reading views of its weights."""
        gate, up = self._linear(self.gate_up_proj, x, e).chunk(2, dim=-1)
        return self._linear(self.down_proj, fusion.gelu_mul(gate, up), e)

    def _grouped(self, x, idx, w, sequences: int = 1):
        N, K = idx.shape
        E = self.num_experts
        if N == 1:  # one token (CPU decode at batch 1): its k experts in turn, no sorting
            o = [self._expert(x, e) for e in idx[0].tolist()]
            return fusion.weighted_sum(torch.stack(o, dim=1), w)
        flat = idx.reshape(-1)                                         # (N·k,) expert of each (token, slot) pair
        if sequences > 1:  # group by (sequence, expert): key = sequence · E + expert
            flat = flat + torch.arange(N * K, device=flat.device) // (K * (N // sequences)) * E
        order = torch.argsort(flat, stable=True)
        tok = order // K                                               # token of each pair, grouped by expert
        # the touched groups and their pair counts, on the host (bincount, a scatter, took ms on a busy CPU)
        groups, counts = torch.unique_consecutive(flat[order], return_counts=True)
        xs = x[tok]                                                    # (N·k, H)
        rows = torch.empty_like(xs)
        start = 0
        for g, n in zip(groups.tolist(), counts.tolist()):
            rows[start:start + n] = self._expert(xs[start:start + n], g % E)
            start += n
        # back to (token, slot) order by a gather (index_add_, a scatter, took ms per call on a busy CPU)
        o = rows[torch.argsort(order)].view(N, K, -1)                 # (N, k, H)
        return fusion.weighted_sum(o, w)

    def _grouped_mm(self, x, idx, w):
        N, K = idx.shape
        E = self.num_experts
        flat = idx.reshape(-1)                                         # (N·k,) expert of each (token, slot) pair
        order = torch.argsort(flat, stable=True)                       # pairs grouped by expert
        experts = torch.arange(1, E + 1, device=flat.device, dtype=flat.dtype)
        offs = torch.searchsorted(flat[order], experts, out_int32=True)  # (E,) end of expert e's rows
        xs = x[order // K]                                             # (N·k, H)
        y = _GROUPED_MM(xs, self.gate_up_proj.transpose(1, 2), offs=offs)   # (N·k, 2I): (E, H, 2I) views
        gate, up = y.chunk(2, dim=-1)
        o = _GROUPED_MM(fusion.gelu_mul(gate, up), self.down_proj.transpose(1, 2), offs=offs)  # (N·k, H)
        o = o[torch.argsort(order)].view(N, K, -1)                     # back to (token, slot) order
        return fusion.weighted_sum(o, w)
