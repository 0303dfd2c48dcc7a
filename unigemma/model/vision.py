"""Encoder-free vision: raw 48×48 RGB patches → language-model soft tokens. There is no vision tower.

    pixel patches (N, P, 6912) ─► patch_ln1 ─► patch_dense (+bias) ─► patch_ln2
        ─► + pos_embedding[x, 0] + pos_embedding[y, 1]   (factorised 2-D table; padding slots (−1, −1) add 0)
        ─► pos_norm ─► [embed_vision] RMSNorm (no weight) ─► embedding_projection ─► (N, P, H)

Checkpoint names (on disk): `model.vision_embedder.{patch_ln1, patch_dense, patch_ln2, pos_embedding, pos_norm}`
and `model.embed_vision.embedding_projection` — this module is the first part; `MultimodalEmbedder` the second.
The three LayerNorms use torch's default eps (1e-5); the RMSNorm uses the vision config's eps.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from .layers import RMSNorm


class VisionEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.mm_embed_dim
        self.patch_ln1 = nn.LayerNorm(config.patch_dim)
        self.patch_dense = nn.Linear(config.patch_dim, d)
        self.patch_ln2 = nn.LayerNorm(d)
        self.pos_embedding = nn.Parameter(torch.zeros(config.mm_posemb_size, 2, d))  # [coordinate, axis(x=0,y=1), d]
        self.pos_norm = nn.LayerNorm(d)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, P, 6912), position_ids (N, P, 2) as (x, y) → (N, P, mm_embed_dim)."""
        x = pixel_values.to(self.patch_dense.weight.dtype)
        x = self.patch_ln2(self.patch_dense(self.patch_ln1(x)))
        valid = (position_ids != -1).to(self.pos_embedding.dtype).unsqueeze(-1)  # (N, P, 2, 1)
        pos = position_ids.clamp(min=0).long()
        axes = torch.arange(2, device=pos.device)
        # The two axis embeddings are summed first and then added (order matters in bf16).
        pe = (self.pos_embedding[pos, axes] * valid).sum(-2)  # (N, P, d)
        return self.pos_norm(x + pe)


class MultimodalEmbedder(nn.Module):
    """RMSNorm without weight → Linear (no bias): the last step for vision and the whole audio embedder."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
