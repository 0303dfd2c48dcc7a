"""The top-level Gemma 4 unified model: soft tokens spliced into the token stream, decoder, tied LM head.

    input_ids ─(placeholders → pad id)─► embed × √H ─┐
    pixel_values ─► vision_embedder ─► embed_vision ─┤ scatter into <|image|> rows   (valid patches, in order)
    pixel_values_videos ─► (same two modules) ───────┤ scatter into <|video|> rows
    input_features ─► embed_audio ───────────────────┘ scatter into <|audio|> rows   (frames where mask is True)
        ─► language_model (masks: causal / window / padding / bidirectional vision blocks) ─► norm
        ─► lm_head (= embed_tokens.weight when tied) ─► cap·tanh(logits / cap)

State-dict keys equal the on-disk names written by transformers 5.24.0 (spec/unified-model.md §12.2):
`model.language_model.*`, `model.vision_embedder.*`, `model.embed_vision.embedding_projection.weight`,
`model.embed_audio.embedding_projection.weight`, and `lm_head.weight` only when untied.

This module maps inputs (+ cache) to logits and does nothing else: no tokenizer, no sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import UnifiedConfig
from .attention import AttentionPlan, vision_block_ids
from .audio import AudioEmbedder
from .cache import KVCache
from .encoders.audio import AudioTower
from .encoders.vision import VisionTower
from .layers import softcap
from .text import TextModel
from .vision import MultimodalEmbedder, VisionEmbedder


class _Body(nn.Module):
    """The `model.` prefix of checkpoints."""

    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.language_model = TextModel(config.text)
        H = config.text.hidden_size
        self.vision_tower = None
        if config.vision is not None:
            self.vision_embedder = VisionEmbedder(config.vision)
            self.embed_vision = MultimodalEmbedder(config.vision.output_proj_dims, H, config.vision.rms_norm_eps)
        elif config.vision_tower is not None:  # the family: an encoder, then the same projection
            vt = config.vision_tower
            self.vision_embedder = None
            self.vision_tower = VisionTower(vt)
            self.embed_vision = MultimodalEmbedder(vt.hidden_size, H, vt.rms_norm_eps)
        else:
            self.vision_embedder = self.embed_vision = None
        self.embed_audio = AudioEmbedder(config.audio, H) if config.audio is not None else None
        self.audio_tower = None
        if config.audio_tower is not None:  # the family: a conformer, then the same projection
            at = config.audio_tower
            self.audio_tower = AudioTower(at)
            self.embed_audio = MultimodalEmbedder(at.output_proj_dims, H, at.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None            # (B, T', V): T' = positions kept
    hidden: torch.Tensor                    # (B, T, H) post-final-norm hidden states (what MTP drafters read)
    plan: AttentionPlan                     # masks / shared K/V of this forward (store-layer K/V for drafters)


class Gemma4Unified(nn.Module):
    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        t = config.text
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # --- pieces --------------------------------------------------------------------------------------
    @property
    def language_model(self) -> TextModel:
        return self.model.language_model

    def make_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, spare: int = 32) -> KVCache:
        """The cache this model needs: full layers preallocated to max_len, sliding layers a ring buffer."""
        return self.language_model.make_cache(slots, max_len, dtype, device, spare)

    def image_features(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Unified: (N, P, 6912), (N, P, 2) → (total valid patches, H): padding slots dropped, slot order kept.
        Family: (N, 9·P, 768), (N, 9·P, 2) → (total soft tokens, H): the encoder pools 3×3 patches per token."""
        if self.model.vision_tower is not None:
            return self.model.embed_vision(self.model.vision_tower(pixel_values, position_ids))
        if self.model.vision_embedder is None:
            raise ValueError(self._no_tower("vision_config", "images or video"))
        x = self.model.embed_vision(self.model.vision_embedder(pixel_values, position_ids))
        return x[(position_ids != -1).all(dim=-1)]

    def _no_tower(self, key: str, what: str) -> str:
        if key in self.config.skipped_towers:
            return (f"this {self.config.model_type} checkpoint's {key.split('_')[0]} encoder is not supported by "
                    f"unigemma yet (its tensors were skipped on load): it runs text only and cannot take {what}")
        return f"this checkpoint has no {key}: it cannot take {what}"

    def audio_features(self, input_features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unified: (N, F, 640) waveform frames, (N, F) bool → (real frames, H).
        Family: (N, F, 128) mel frames, (N, F) bool → (real soft tokens, H), one per 4 frames (the conformer's)."""
        if self.model.audio_tower is not None:
            hidden, valid = self.model.audio_tower(input_features, mask)
            return self.model.embed_audio(hidden)[valid]
        if self.model.embed_audio is None:
            raise ValueError(self._no_tower("audio_config", "audio"))
        return self.model.embed_audio(input_features)[mask.bool()]

    def text_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids with image / video / audio placeholders replaced by the pad id (what the token tables see)."""
        c = self.config
        is_mm = (input_ids == c.image_token_id) | (input_ids == c.video_token_id) | (input_ids == c.audio_token_id)
        return torch.where(is_mm, torch.full_like(input_ids, c.text.pad_token_id), input_ids)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_position_ids=None,
              pixel_values_videos=None, video_position_ids=None, num_frames_per_video=None,
              input_features=None, input_features_mask=None,
              audio_encoder_outputs=None) -> torch.Tensor:
        """Token embeddings with image / video / audio soft tokens written into their placeholder rows.

        audio_encoder_outputs (n, output_proj_dims): family models only — audio encoder rows computed ahead (live
        audio: `encoders.audio.AudioStream`), projected here like the one-shot encoder's."""
        c = self.config
        lm = self.language_model
        placeholder = {"image": c.image_token_id, "video": c.video_token_id, "audio": c.audio_token_id}
        is_mm = torch.zeros_like(input_ids, dtype=torch.bool)
        for tid in placeholder.values():
            is_mm |= input_ids == tid
        h = lm.embed(torch.where(is_mm, torch.full_like(input_ids, c.text.pad_token_id), input_ids))

        feats: list[tuple[str, torch.Tensor]] = []
        if pixel_values is not None:
            if image_position_ids is None:
                raise ValueError("pixel_values needs image_position_ids (the processor returns both)")
            feats.append(("image", self.image_features(pixel_values, image_position_ids)))
        if pixel_values_videos is not None:
            if video_position_ids is None or num_frames_per_video is None:
                raise ValueError("pixel_values_videos needs video_position_ids and num_frames_per_video")
            n_frames = int(torch.as_tensor(num_frames_per_video).sum())
            if n_frames != pixel_values_videos.shape[0]:
                raise ValueError(f"num_frames_per_video sums to {n_frames} but pixel_values_videos has "
                                 f"{pixel_values_videos.shape[0]} frames")
            feats.append(("video", self.image_features(pixel_values_videos, video_position_ids)))
        if input_features is not None and input_features_mask is not None:
            feats.append(("audio", self.audio_features(input_features, input_features_mask)))
        if audio_encoder_outputs is not None:
            if self.model.audio_tower is None:
                raise ValueError("audio_encoder_outputs are a family audio encoder's rows; this model has none")
            feats.append(("audio", self.model.embed_audio(audio_encoder_outputs)))
        for kind, f in feats:
            where = input_ids == placeholder[kind]
            n = int(where.sum())
            if n != f.shape[0]:
                raise ValueError(f"{kind}: the prompt has {n} <{kind}> placeholder tokens but the {kind} inputs give "
                                 f"{f.shape[0]} soft tokens; they must be equal")
            h = h.masked_scatter(where.unsqueeze(-1), f.to(h.dtype))
        return h

    def block_ids(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None):
        """Bidirectional vision blocks, from placeholder ids (or the processor's mm_token_type_ids when given)."""
        if self.config.text.use_bidirectional_attention != "vision":
            return None
        if mm_token_type_ids is not None:
            is_vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
        else:
            is_vision = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        return vision_block_ids(is_vision)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(hidden), self.config.text.final_logit_softcapping)

    # --- forward -------------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, *, attention_mask=None, position_ids=None, mm_token_type_ids=None,
            inputs_embeds: torch.Tensor | None = None, cache: KVCache | None = None,
            slots: torch.Tensor | None = None, kv_len: int | None = None,
            logits_to_keep: int | torch.Tensor | None = None, compute_logits: bool = True,
            segment_ids: torch.Tensor | None = None, **media) -> ModelOutput:
        """The full forward with everything the engine needs.

        positions: `position_ids` (B, T) if given, else 0..T−1 (no cache). With a cache, position_ids are required
        (absolute positions; −1 marks padding tokens, which are neither attended nor cached).
        logits_to_keep: int k → the last k positions; a (B, k) index tensor → those positions per row.
        segment_ids (B, T): packed training rows, attention kept inside each segment (with per-segment position_ids).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, **media)
        if position_ids is None:
            if cache is not None:
                raise ValueError("a cached forward needs explicit position_ids")
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        lm_ids = self.text_ids(input_ids) if self.config.text.hidden_size_per_layer_input else None
        hidden, plan = self.language_model(
            inputs_embeds, position_ids, block_ids=self.block_ids(input_ids, mm_token_type_ids),
            key_valid=attention_mask, cache=cache, slots=slots, kv_len=kv_len, return_plan=True, input_ids=lm_ids,
            segment_ids=segment_ids)
        logits = None
        if compute_logits:
            h = hidden
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                h = hidden[:, -logits_to_keep:]
            elif isinstance(logits_to_keep, torch.Tensor):
                h = torch.gather(hidden, 1, logits_to_keep[..., None].expand(-1, -1, hidden.shape[-1]))
            logits = self.logits_from_hidden(h)
        return ModelOutput(logits, hidden, plan)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values=None, image_position_ids=None, input_features=None, input_features_mask=None,
                pixel_values_videos=None, video_position_ids=None, num_frames_per_video=None,
                mm_token_type_ids=None, position_ids=None, logits_to_keep: int | None = None,
                **ignored) -> torch.Tensor:
        """logits (B, T, V). Argument names follow the reference processor's outputs, which can be passed in
        directly (extra processor outputs such as `token_type_ids` are ignored)."""
        out = self.run(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       mm_token_type_ids=mm_token_type_ids, logits_to_keep=logits_to_keep,
                       pixel_values=pixel_values, image_position_ids=image_position_ids,
                       pixel_values_videos=pixel_values_videos, video_position_ids=video_position_ids,
                       num_frames_per_video=num_frames_per_video, input_features=input_features,
                       input_features_mask=input_features_mask)
        return out.logits
