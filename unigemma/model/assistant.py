"""The MTP drafter (`gemma4_unified_assistant`): a small decoder that reads the target's K/V (spec/mtp-drafting.md).

    [target_embed(token) × √H_target , target hidden (post-norm)]   (B, 1, 2·H_target)
        ─► pre_projection ─► layers (every one a "reuse" layer: q only, attends to the TARGET's store-layer K/V)
        ─► norm ─► h ─┬─► lm_head (tied to model.embed_tokens) or the centroid head ─► draft logits (B, 1, V)
                      └─► post_projection ─► next hidden (B, 1, H_target), chained into the next draft step

The drafter has no cache and no token embedding input of its own; the engine (engine/speculative.py) supplies
the target's K/V and decides which keys each drafter layer type may see.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import FULL, SLIDING, AssistantConfig
from .attention import AttentionPlan
from .text import TextModel


class MaskedEmbedding(nn.Module):
    """Centroid LM head: score 2048 clusters, keep the top-k, score only their tokens; others get min − 1."""

    def __init__(self, config: AssistantConfig):
        super().__init__()
        t = config.text
        self.num_centroids = config.num_centroids
        self.top_k = config.centroid_intermediate_top_k
        self.per_cluster = t.vocab_size // config.num_centroids
        self.centroids = nn.Linear(t.hidden_size, config.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(t.vocab_size, dtype=torch.long))

    def forward(self, h: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        B, L, D = h.shape
        top = torch.topk(self.centroids(h), self.top_k, dim=-1).indices                   # (B, L, k)
        table = self.token_ordering.long().view(self.num_centroids, self.per_cluster)
        cand = table[top].reshape(B, L, -1)                                                # (B, L, k·per_cluster)
        scores = (h.unsqueeze(-2) @ embed[cand.reshape(-1)].view(B, L, -1, D).transpose(-1, -2)).squeeze(-2)
        fill = scores.min() - 1.0  # one global minimum, as the reference does (kept on device: no host sync)
        out = fill.to(h.dtype).expand(B, L, embed.shape[0]).clone()
        return out.scatter_(-1, cand, scores)


class Gemma4Assistant(nn.Module):
    def __init__(self, config: AssistantConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.model = TextModel(t)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.pre_projection = nn.Linear(2 * config.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, config.backbone_hidden_size, bias=False)
        self.masked_embedding = MaskedEmbedding(config) if config.use_ordered_embeddings else None

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
                masks: dict[str, torch.Tensor | None] | None = None):
        """One draft step.

        inputs_embeds (B, 1, 2·H_target): [scaled target token embedding, target hidden]; position_ids (B, 1);
        shared_kv[type] = (K, V) of the target's store layer, (B, kv_heads, S, d); masks[type]: (B, S) bool of
        visible keys (None: all visible). Returns (logits (B, 1, V), projected hidden (B, 1, H_target)).
        """
        x = self.pre_projection(inputs_embeds.to(self.pre_projection.weight.dtype))
        B = x.shape[0]
        cos_sin = {t: self.model.rotary_emb(position_ids, t, x.dtype) for t in set(self.config.text.layer_types)}
        full_masks = {}
        for t, (k, _) in shared_kv.items():
            m = None if masks is None else masks.get(t)
            if m is None:
                m = torch.ones(B, k.shape[2], dtype=torch.bool, device=k.device)
            full_masks[t] = m[:, None, None, :]
        plan = AttentionPlan(cos_sin, full_masks, shared=dict(shared_kv))
        for layer in self.model.layers:
            x = layer(x, plan)
        h = self.model.norm(x)
        if self.masked_embedding is not None:
            logits = self.masked_embedding(h, self.lm_head.weight)
        else:
            logits = self.lm_head(h)
        return logits, self.post_projection(h)


def hf_drafter_masks(shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]], window: int,
                     attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The reference's drafter masks (spec/mtp-drafting.md §3): full layers see every key (minus padding);
    sliding layers see the last window + 1 entries *by index* of the K/V tensor."""
    out = {}
    for t, (k, _) in shared_kv.items():
        B, S = k.shape[0], k.shape[2]
        m = torch.ones(B, S, dtype=torch.bool, device=k.device)
        if t == SLIDING and S > window + 1:
            m[:, : S - (window + 1)] = False
        if attention_mask is not None:
            am = attention_mask[:, : shared_kv[FULL][0].shape[2]].bool()
            m &= am if t == FULL else am[:, -S:]
        out[t] = m
    return out
