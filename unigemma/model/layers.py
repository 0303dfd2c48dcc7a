"""Building blocks of the Gemma 4 unified decoder: RMSNorm, rotary embeddings, gated MLP, logit softcap.

Formulas and operation order follow spec/unified-model.md §5–9; the order matters for bit-level agreement in
bfloat16 (e.g. RMSNorm computes in float32 and multiplies by the *plain* weight, not 1 + weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RopeParams, TextConfig
from . import fusion


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) [* weight], computed in float32, returned in x's dtype.

    `with_scale=False` is the weightless variant (v_norm, and the multimodal embedders' pre-projection norm).
    """

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fusion.rms_norm(x, self.weight if self.with_scale else None, self.eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm exactly as the reference rounds it (float32, pow(-0.5)), op by op, on any device."""
    return fusion.rms_formula(x, weight, eps)


def rope_inv_freq(params: RopeParams, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, always on the CPU (also under a meta-device build).

    default:      1 / θ^(2i/d) for all d/2 pairs.
    proportional: the first int(p·d/2) pairs rotate with exponent denominator d (the FULL head dim), the rest get
                  frequency 0 (cos 1, sin 0: those dims pass through unchanged).
    """
    if params.rope_type == "default":
        inv = 1.0 / (params.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        return inv
    n_rot = int(params.partial_rotary_factor * head_dim // 2)
    inv = 1.0 / (params.rope_theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    inv = inv / params.factor
    return torch.cat([inv, torch.zeros(head_dim // 2 - n_rot, device="cpu")])


class RotaryEmbedding(nn.Module):
    """cos/sin tables per layer type, computed from absolute positions: (B, T) → (B, T, d) each.

    The inverse frequencies are plain float32 tensors, not module buffers: they must stay float32 when the model
    is cast to bf16 and they must exist after a meta-device build (checkpoint.py), so they are made on first use
    on each device.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        self.layer_types = sorted(set(config.layer_types))
        self._inv_cpu = {t: rope_inv_freq(config.rope_parameters[t],
                                          config.layer_head_dim[config.layer_types.index(t)])
                         for t in self.layer_types}
        self._inv_dev: dict[tuple[str, torch.device], torch.Tensor] = {}

    def inv_freq(self, layer_type: str, device: torch.device) -> torch.Tensor:
        key = (layer_type, device)
        inv = self._inv_dev.get(key)
        if inv is None:
            inv = self._inv_dev[key] = self._inv_cpu[layer_type].to(device)
        return inv

    def forward(self, positions: torch.Tensor, layer_type: str, dtype: torch.dtype):
        inv = self.inv_freq(layer_type, positions.device)
        freqs = positions[..., None].float() * inv  # (B, T, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, d): pairs are (j, j + d/2)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, d); cos/sin: (B, T, d). x·cos + rotate_half(x)·sin, pairs (j, j + d/2)."""
    return fusion.rope(x, cos, sin)


class MLP(nn.Module):
    """down_proj(gelu_tanh(gate_proj(x)) * up_proj(x)); no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

        self._gate_up = None  # gate/up as one (2I, H) weight (fusion.fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fusion.fused_linear(self._gate_up, (self.gate_proj, self.up_proj), x)
        if y is not None:
            gate, up = y.chunk(2, dim=-1)  # (B, T, 2I) → 2 × (B, T, I)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(fusion.gelu_mul(gate, up))


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(logits / cap), in the logits' dtype; identity when cap is None."""
    if cap is None:
        return logits
    return fusion.softcap(logits, cap)


class ClippableLinear(nn.Module):
    """A bias-free Linear, optionally clamping its input and output to ranges stored in the checkpoint.

    The family's encoders wrap every projection this way (checkpoint names `<name>.linear.weight`, and with
    `use_clipped_linears` the scalar buffers `<name>.{input_min, input_max, output_min, output_max}`), because
    their weights were trained with activation clipping; without clipping it is a plain Linear.
    """

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.clipped = clipped
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(float("inf") if name.endswith("max") else float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        y = self.linear(x)
        if self.clipped:
            y = torch.clamp(y, self.output_min, self.output_max)
        return y
