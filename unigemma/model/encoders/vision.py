"""The family's vision encoder (E2B / E4B / 26B-A4B / 31B `vision_config`): 16-px patches → pooled soft tokens.

    pixel_values (N, P, 3·16²) in [0, 1], image_position_ids (N, P, 2) as (x, y); padding rows are (−1, −1)
        ─► patch_embedder: input_proj(2·v − 1) + table[0][x] + table[1][y]      (padding rows: no position term)
        ─► encoder.layers × L (bidirectional over the valid patches of each image):
               h += post_attention_layernorm(attn(input_layernorm(h)))   q, k: RMSNorm per head + 2-D RoPE
               h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))        v: RMSNorm, no weight
        ─► pool: mean of each k×k block of patches (k = pooling_kernel_size), × √hidden, in float32
        ─► valid soft tokens of all images, concatenated in order ─► [standardize: (x − std_bias) · std_scale]
        ─► (S, hidden) in the model dtype; model/vision.MultimodalEmbedder (`embed_vision`) projects it to text width

2-D RoPE: the head dim is split in two halves; the first rotates with the patch column x, the second with the
row y, each as ordinary half-split RoPE over frequencies θ^(−j/(d/4)), j = 0 … d/4 − 1. Attention is unscaled
(q and k are normed instead).

Checkpoint names under `model.vision_tower.`: `patch_embedder.input_proj.weight` [hidden, 768],
`patch_embedder.position_embedding_table` [2, position_embedding_size, hidden],
`encoder.layers.{i}.self_attn.{q,k,v,o}_proj.linear.weight`, `...self_attn.{q,k}_norm.weight` [head_dim],
`encoder.layers.{i}.mlp.{gate,up,down}_proj.linear.weight`, the four layer norms, and with `standardize`
the buffers `std_bias`, `std_scale` [hidden]; with `use_clipped_linears` each `*.linear` has clip buffers.

This module maps patches to soft tokens and nothing else: resizing and patching live in inputs/image.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import VisionTowerConfig
from ..layers import ClippableLinear, RMSNorm


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.input_proj = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(
            torch.zeros(2, config.position_embedding_size, config.hidden_size))  # [axis (x=0, y=1), coordinate, d]

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        w = self.input_proj.weight
        # The checkpoint was trained on pixels in [−1, 1]; the processor hands over [0, 1].
        h = self.input_proj((2 * (pixel_values - 0.5)).to(w.dtype))
        pos = positions.clamp(min=0).long()
        table = self.position_embedding_table
        pe = F.embedding(pos[..., 0], table[0]) + F.embedding(pos[..., 1], table[1])  # (N, P, d)
        return h + torch.where(padding.unsqueeze(-1), torch.zeros((), dtype=pe.dtype, device=pe.device), pe)


def axial_rope(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin (N, P, head_dim) for (x, y) positions (N, P, 2): [x-half | y-half], each [f, f] half-split."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32, device=positions.device)
                                / (2 * quarter)))
    ang = positions[..., None].float() * inv_freq  # (N, P, 2, d/4)
    ax, ay = ang[..., 0, :], ang[..., 1, :]
    ang = torch.cat([ax, ax, ay, ay], dim=-1)  # (N, P, d)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, P, heads, d); cos / sin (N, P, d): each half of d rotated by its own axis."""
    half = x.shape[-1] // 2
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.cat([_rotate(x[..., :half], c[..., :half], s[..., :half]),
                      _rotate(x[..., half:], c[..., half:], s[..., half:])], dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        H, D, clip = config.hidden_size, config.head_dim, config.use_clipped_linears
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.q_proj = ClippableLinear(H, self.num_heads * D, clip)
        self.k_proj = ClippableLinear(H, self.num_kv_heads * D, clip)
        self.v_proj = ClippableLinear(H, self.num_kv_heads * D, clip)
        self.o_proj = ClippableLinear(self.num_heads * D, H, clip)
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.v_norm = RMSNorm(D, config.rms_norm_eps, with_scale=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        N, P, _ = h.shape
        D = self.head_dim
        q = apply_axial_rope(self.q_norm(self.q_proj(h).view(N, P, -1, D)), cos, sin).transpose(1, 2)  # (N, h, P, D)
        k = apply_axial_rope(self.k_norm(self.k_proj(h).view(N, P, -1, D)), cos, sin).transpose(1, 2)
        v = self.v_norm(self.v_proj(h).view(N, P, -1, D)).transpose(1, 2)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        # scale 1: q and k are RMS-normed. `bias`: (N, 1, 1, P) boolean, True = may attend (valid patches).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (N, h, P, D)
        return self.o_proj(out.transpose(1, 2).reshape(N, P, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        H, I, clip = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(H, I, clip)
        self.up_proj = ClippableLinear(H, I, clip)
        self.down_proj = ClippableLinear(I, H, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)

    def forward(self, h, cos, sin, bias):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, bias))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class _Encoder(nn.Module):
    """The `encoder.` prefix of checkpoints (only its layers carry weights)."""

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTower(nn.Module):
    """`model.vision_tower`: (N, P, 768) patches + (N, P, 2) positions → (soft tokens of all images, hidden)."""

    def __init__(self, config: VisionTowerConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = _Encoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def pool(self, h: torch.Tensor, positions: torch.Tensor,
             padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over k×k blocks of the patch grid, in float32: (N, P, d) → (N, P/k², d) and its validity mask.

        Block of patch (x, y): x//k + (W/k)·(y//k), W = the image's grid width (its largest x + 1), i.e. pooled
        tokens in raster order. Padding patches are zero and add nothing."""
        c = self.config
        N, P, d = h.shape
        k = c.pooling_kernel_size
        if P % (k * k):
            raise ValueError(f"pixel_values has {P} patch rows per image; the vision encoder pools {k}×{k} blocks, so "
                             f"it needs a multiple of {k * k} (the processor pads to max_soft_tokens·{k * k})")
        L = P // (k * k)
        pos = positions.clamp(min=0).long()
        width = pos[..., 0].max(dim=-1, keepdim=True).values + 1  # (N, 1)
        block = pos[..., 0] // k + (width // k) * (pos[..., 1] // k)  # (N, P)
        if int(block.max()) >= L:
            raise ValueError(f"image_position_ids describe a grid of more than {L} {k}×{k} blocks, the soft-token "
                             f"budget these {P}-row pixel_values allow")
        h = h.masked_fill(padding.unsqueeze(-1), 0.0)
        # The average as one (L, P) @ (P, d) product of 1/k² weights: a few percent of one encoder layer's cost,
        # and the reference's summation order (the soft tokens agree to the last bits, which the decoder amplifies).
        weights = F.one_hot(block, L).float() / (k * k)  # (N, P, L)
        out = weights.transpose(1, 2) @ h.float()  # (N, L, d)
        counts = torch.zeros(N, L, device=h.device).scatter_add_(1, block, (~padding).float())
        return out, counts > 0

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != c.patch_dim:
            raise ValueError(f"pixel_values must be (images, patches, {c.patch_dim}) for {c.patch_size}-px patches, "
                             f"got shape {tuple(pixel_values.shape)}")
        padding = (position_ids == -1).all(dim=-1)  # (N, P)
        h = self.patch_embedder(pixel_values, position_ids, padding)
        cos, sin = axial_rope(position_ids, c.head_dim, c.rope_theta, h.dtype)
        # Bidirectional within each image; padding patches are never attended to.
        bias = ~padding[:, None, None, :]  # (N, 1, 1, P)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, bias)
        pooled, valid = self.pool(h, position_ids, padding)
        out = pooled[valid] * c.hidden_size ** 0.5  # (S, d), float32
        if c.standardize:
            out = (out - self.std_bias.float()) * self.std_scale.float()
        return out.to(h.dtype)
