"""The Gemma 4 unified text decoder: embeddings → N decoder layers → final norm.

    input ids ──embed_tokens × bf16-rounded √H──► h ──► [DecoderLayer × N] ──► norm ──► hidden (B, T, H)
                 (soft tokens overwrite placeholder rows before the layers; see unified.py)

    DecoderLayer:  h = h + post_attention_layernorm(self_attn(input_layernorm(h)))
                   h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
                   h = h · layer_scalar                       (the whole residual stream)

Module and parameter names are the checkpoint's, so a state dict loads with no renaming. The LM head and the
multimodal embedders live in unified.py; this module maps embeddings + positions (+ cache) to hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .attention import Attention, AttentionPlan, build_plan, finish_plan
from . import fusion
from .cache import KVCache, make_cache
from .layers import MLP, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(h, config.layer_intermediate_size(layer_idx))
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # persistent: loaded from the checkpoint

    def forward(self, h: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        eps = self.input_layernorm.eps
        a = self.self_attn(self.input_layernorm(h), plan)
        # h + post_attention_layernorm(a), and pre_feedforward_layernorm of that, in one piece (fusion.py)
        h, x = fusion.add_norm(h, a, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
                               eps)
        return fusion.add_norm_scale(h, self.mlp(x), self.post_feedforward_layernorm.weight, self.layer_scalar, eps)


class TextModel(nn.Module):
    """`model.language_model` in checkpoints: embed_tokens, layers.{i}, norm (+ rotary tables, not stored)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self._embed_scale: dict[torch.dtype, float] = {}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        # √H is rounded to the weight dtype before the multiply (bf16: 62.0 for H = 3840), as the reference does.
        # A Python float (exactly that rounded value) keeps the step free of host→device copies (CUDA graphs).
        scale = self._embed_scale.get(w.dtype)
        if scale is None:
            scale = self._embed_scale[w.dtype] = float(torch.tensor(self.config.embed_scale, dtype=w.dtype))
        return self.embed_tokens(ids) * scale

    def make_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, spare: int = 32) -> KVCache:
        w = self.embed_tokens.weight
        return make_cache(self.config, slots, max_len, dtype or w.dtype, device or w.device, spare)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, *,
                block_ids: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None,
                kv_len: int | None = None, return_plan: bool = False):
        plan = build_plan(self.config, positions, self.rotary_emb, inputs_embeds.dtype, block_ids,
                          key_valid, cache, slots, kv_len)
        h = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, plan, use_reentrant=False)
            else:
                h = layer(h, plan)
        finish_plan(plan)
        h = self.norm(h)
        return (h, plan) if return_plan else h
