"""DiffusionGemma (`diffusion_gemma`): one Gemma 4 text stack used twice — as a causal encoder of the prompt that
fills a KV cache, and as a bidirectional denoiser of a canvas of `canvas_length` tokens that reads that cache.

    prompt ids ──embed──► [DecoderLayer × N, encoder layer scalars] ──► cache (causal, sliding window)
                                                                          │ read only
    canvas ids ──embed──┐                                                 ▼
    previous step's ─► softmax · E · √H ─► self_conditioning ─► + ─► [DecoderLayer × N] ─► norm ─► lm_head ─► softcap
    logits (or none)                      (rms → gated MLP → add → weightless rms)          logits (B, L, V) fp32

The two passes share every weight except the layers' `layer_scalar` (the checkpoint stores the shared weights once,
under `model.decoder.*`, and the encoder's scalars under `model.encoder.language_model.layers.{i}.layer_scalar`),
so this module builds the decoder stack once (text.py's `TextModel`, the same layer code as every other Gemma 4
model) and runs it with the encoder's scalars for the prompt. Every layer carries the MoE block; full layers are
k_eq_v (config.DiffusionConfig). The canvas attends with no mask among itself and to the cached prefix
(attention.build_canvas_plan); both passes lay their keys out as the reference's cache does
(attention.build_prefix_plan), so on the CPU in float32 their results are bit-identical to the reference's.

This module maps inputs + cache to logits and nothing else; the denoising loop is engine/diffusion.py's. The
checkpoint's vision tower is not built (its tensors are skipped on load; image inputs are refused).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DiffusionConfig
from . import fusion
from .attention import build_canvas_plan, build_prefix_plan
from .cache import KVCache
from .layers import RMSNorm, softcap
from .text import TextModel


class SelfConditioning(nn.Module):
    """post_norm(embeds + down(gelu(gate(x)) · up(x))), x = pre_norm(soft embeddings of the previous logits)."""

    def __init__(self, hidden: int, intermediate: int, eps: float):
        super().__init__()
        self.pre_norm = RMSNorm(hidden, eps)
        self.post_norm = RMSNorm(hidden, eps, with_scale=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        if soft is None:
            # No previous logits: the reference feeds zeros, and the block maps zeros to exactly zero
            # (rms(0) = 0, gelu(0)·0 = 0), so only the weightless post-norm remains.
            return self.post_norm(embeds)
        x = self.pre_norm(soft)
        return self.post_norm(embeds + self.down_proj(fusion.gelu_mul(self.gate_proj(x), self.up_proj(x))))


class Decoder(TextModel):
    """`model.decoder`: the shared text stack (embed_tokens, layers, norm) plus `self_conditioning`."""

    def __init__(self, config: DiffusionConfig):
        super().__init__(config.text)
        t = config.text
        self.self_conditioning = SelfConditioning(t.hidden_size, t.intermediate_size, t.rms_norm_eps)


class _EncoderScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("layer_scalar", torch.ones(1))


class _EncoderLM(nn.Module):
    """`model.encoder.language_model`: only what the encoder does not share with the decoder."""

    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(_EncoderScalar() for _ in range(n))


class _Encoder(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.language_model = _EncoderLM(n)


class _Body(nn.Module):
    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.encoder = _Encoder(config.text.num_hidden_layers)
        self.decoder = Decoder(config)


class DiffusionGemma(nn.Module):
    """`DiffusionGemmaForBlockDiffusion`'s tensors; `encode` fills a cache, `denoise` maps a canvas to logits."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        t = config.text
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.lm_head.weight = self.model.decoder.embed_tokens.weight  # tied (config refuses untied)
        self._soft_scale: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def stack(self) -> Decoder:
        return self.model.decoder

    def make_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, spare: int = 32) -> KVCache:
        return self.stack.make_cache(slots, max_len, dtype, device, spare)

    def _encoder_scalars(self) -> list[torch.Tensor]:
        return [m.layer_scalar for m in self.model.encoder.language_model.layers]

    def encode(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt (or a finished canvas) (B, T) at consecutive absolute `positions` (B, T), right after what the
        cache holds for the row → written to `cache` (causal, with the sliding window). Returns the encoder's final
        hidden states (B, T, H); generation ignores them."""
        d = self.stack
        x = d.embed(input_ids)
        plan = build_prefix_plan(d.config, positions, d.rotary_emb, x.dtype, cache, slots, causal=True)
        return d(x, positions, plan=plan, layer_scalars=self._encoder_scalars())

    def soft_embeddings(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits → softmax(fp32) · E · √H (the scale rounded to E's dtype, as the reference does)."""
        w = self.stack.embed_tokens.weight
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(w.dtype)
        key = (w.device, w.dtype)
        scale = self._soft_scale.get(key)
        if scale is None:  # made once per device and dtype: no host-to-device copy inside a CUDA graph's capture
            scale = self._soft_scale[key] = torch.tensor(self.config.text.embed_scale,
                                                         dtype=torch.float32).to(w.dtype).to(w.device)
        return torch.matmul(probs, w) * scale

    def denoise(self, canvas_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                kv_len: int | torch.Tensor, self_conditioning_logits: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, prefix_len: int | None = None) -> torch.Tensor:
        """Canvas (B, L) at `positions` (B, L), the cache holding positions [0, kv_len) (one length, or one per row
        (B,)) in `slots` (None: rows 0..B−1) → logits (B, L, V) float32.

        self_conditioning_logits: the previous denoising step's (temperature-scaled) logits, None at the first
        step of a canvas. The cache is only read. prefix_len: a fixed prefix width ≥ every kv_len, for a
        static-shape forward with no host sync (a CUDA graph's; attention.build_prefix_plan)."""
        d = self.stack
        soft = None if self_conditioning_logits is None else self.soft_embeddings(self_conditioning_logits)
        x = d.self_conditioning(d.embed(canvas_ids), soft)
        plan = build_canvas_plan(d.config, positions, d.rotary_emb, x.dtype, cache, kv_len, slots, prefix_len)
        h = d(x, positions, plan=plan)
        return softcap(self.lm_head(h).float(), self.config.text.final_logit_softcapping)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                self_conditioning_logits: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **media) -> torch.Tensor:
        """One block-diffusion forward as the reference's: encode `input_ids` (B, T) into a fresh cache, then
        denoise `decoder_input_ids` (B, L) (default: a canvas of pad ids; the reference draws a random one) placed
        right after the prompt → canvas logits (B, L, V) float32."""
        if media:
            raise ValueError(f"DiffusionGemma: {sorted(media)} given, but unigemma runs this model text only (its "
                             "vision tower is not built)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("DiffusionGemma forward: padded prompts (an attention_mask with zeros) are not "
                             "supported; pass unpadded rows of equal length")
        B, T = input_ids.shape
        L = self.config.canvas_length
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((B, L), self.config.text.pad_token_id, dtype=torch.long,
                                           device=input_ids.device)
        L = decoder_input_ids.shape[1]
        dev = input_ids.device
        cache = self.make_cache(B, T + L, device=dev)
        pos = torch.arange(T, device=dev)[None].expand(B, T)
        self.encode(input_ids, pos, cache)
        cpos = torch.arange(T, T + L, device=dev)[None].expand(B, L)
        return self.denoise(decoder_input_ids, cpos, cache, T, self_conditioning_logits)
