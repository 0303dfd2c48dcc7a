"""The Gemma 4 unified text decoder: embeddings → N decoder layers → final norm.

    input ids ──embed_tokens × bf16-rounded √H──► h ──► [DecoderLayer × N] ──► norm ──► hidden (B, T, H)
                 (soft tokens overwrite placeholder rows before the layers; see unified.py)

    DecoderLayer:  h = h + post_attention_layernorm(self_attn(input_layernorm(h)))
                   f = mlp(pre_feedforward_layernorm(h))
                   [MoE]  f = post_feedforward_layernorm_1(f)
                              + post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h), router(h)))
                   h = h + post_feedforward_layernorm(f)
                   [PLE]  h = h + post_per_layer_input_norm(per_layer_projection(
                                      gelu(per_layer_input_gate(h)) · per_layer_input[layer]))
                   h = h · layer_scalar                       (the whole residual stream)

The family's switches, all in this one decoder (config.py): per-layer input embeddings [PLE] (E2B / E4B) —
a token-identity table `embed_tokens_per_layer` (V, L·P) plus a projection of the input embeddings
`per_layer_model_projection`, normed, summed and scaled, one P-vector per layer and token — and the MoE block
(26B-A4B; model/moe.py) beside the dense MLP. KV sharing, k_eq_v, layer types and RoPE are attention.py's.

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
from .moe import Experts, Router


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
        self.has_moe = config.enable_moe_block
        if self.has_moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.post_feedforward_layernorm_1 = RMSNorm(h, config.rms_norm_eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, config.rms_norm_eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, config.rms_norm_eps)
        self.has_ple = config.hidden_size_per_layer_input > 0
        if self.has_ple:
            P = config.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(h, P, bias=False)
            self.per_layer_projection = nn.Linear(P, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, plan: AttentionPlan, per_layer_input: torch.Tensor | None = None,
                layer_scalar: torch.Tensor | None = None):
        """h (B, T, H); per_layer_input (B, T, P) for PLE layers. layer_scalar: used instead of this layer's own
        (DiffusionGemma's encoder shares every weight with its denoiser except the layer scalars)."""
        scalar = self.layer_scalar if layer_scalar is None else layer_scalar
        eps = self.input_layernorm.eps
        a = self.self_attn(self.input_layernorm(h), plan)
        # h + post_attention_layernorm(a), and pre_feedforward_layernorm of that, in one piece (fusion.py)
        h, x = fusion.add_norm(h, a, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
                               eps)
        f = self.mlp(x)
        if self.has_moe:
            flat = h.reshape(-1, h.shape[-1])  # (B·T, H): the router and the experts read the residual itself
            w, idx = self.router(flat)
            e = self.experts(fusion.rms_norm(flat, self.pre_feedforward_layernorm_2.weight, eps), idx, w,
                             h.shape[0] if plan.separate_rows else 1)
            f = fusion.moe_combine(f, e.view(h.shape), self.post_feedforward_layernorm_1.weight,
                                   self.post_feedforward_layernorm_2.weight, eps)
        if not self.has_ple:
            return fusion.add_norm_scale(h, f, self.post_feedforward_layernorm.weight, scalar, eps)
        h = fusion.add_rms(h, f, self.post_feedforward_layernorm.weight, eps)
        g = fusion.gelu_mul(self.per_layer_input_gate(h), per_layer_input)
        return fusion.add_norm_scale(h, self.per_layer_projection(g), self.post_per_layer_input_norm.weight,
                                     scalar, eps)


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
        self._embed_scale: dict[tuple[str, torch.dtype], float] = {}
        P = config.hidden_size_per_layer_input
        if P:
            L = config.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, L * P)
            self.per_layer_model_projection = nn.Linear(config.hidden_size, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, config.rms_norm_eps)

    def _scaled(self, table: nn.Embedding, ids: torch.Tensor, scale: float) -> torch.Tensor:
        w = table.weight
        # The scale is rounded to the weight dtype before the multiply (bf16: 62.0 for √3840), as the reference
        # does. A Python float (exactly that rounded value) keeps the step free of host→device copies (CUDA graphs).
        key = (scale, w.dtype)
        s = self._embed_scale.get(key)
        if s is None:
            s = self._embed_scale[key] = float(torch.tensor(scale, dtype=w.dtype))
        return table(ids) * s

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._scaled(self.embed_tokens, ids, self.config.embed_scale)

    def per_layer_inputs(self, ids: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """PLE: (B, T) token ids (placeholders already replaced by the pad id) and the input embeddings (soft
        tokens in place) → (B, T, L, P), one input per decoder layer."""
        c = self.config
        B, T = ids.shape
        L, P = c.num_hidden_layers, c.hidden_size_per_layer_input
        tok = self._scaled(self.embed_tokens_per_layer, ids, P ** 0.5).view(B, T, L, P)
        proj = self.per_layer_model_projection(inputs_embeds).view(B, T, L, P)
        return fusion.per_layer_inputs(proj, tok, self.per_layer_projection_norm.weight, c.hidden_size ** -0.5,
                                       self.per_layer_projection_norm.eps)

    def make_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, spare: int = 32) -> KVCache:
        w = self.embed_tokens.weight
        return make_cache(self.config, slots, max_len, dtype or w.dtype, device or w.device, spare)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, *,
                block_ids: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                cache: KVCache | None = None, slots: torch.Tensor | None = None,
                kv_len: int | None = None, return_plan: bool = False, input_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, plan: AttentionPlan | None = None,
                layer_scalars: list[torch.Tensor] | None = None):
        """input_ids (B, T), placeholders replaced by the pad id: needed (only) by PLE models.
        plan: a prebuilt plan (DiffusionGemma's canvas plan, attention.build_canvas_plan) instead of one built
        here; layer_scalars: per-layer scalars replacing the layers' own (DecoderLayer.forward)."""
        if plan is None:
            plan = build_plan(self.config, positions, self.rotary_emb, inputs_embeds.dtype, block_ids,
                              key_valid, cache, slots, kv_len, segment_ids)
        h = inputs_embeds
        ple = None
        if self.config.hidden_size_per_layer_input:
            if input_ids is None:
                raise ValueError("this model has per-layer input embeddings (hidden_size_per_layer_input): its "
                                 "language model needs input_ids beside inputs_embeds")
            ple = self.per_layer_inputs(input_ids, inputs_embeds)
        for i, layer in enumerate(self.layers):
            p = None if ple is None else ple[:, :, i]
            s = None if layer_scalars is None else layer_scalars[i]
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, plan, p, s, use_reentrant=False)
            else:
                h = layer(h, plan, p, s)
        finish_plan(plan)
        h = self.norm(h)
        return (h, plan) if return_plan else h
