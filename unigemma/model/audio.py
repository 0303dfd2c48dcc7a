"""Encoder-free audio: raw 16 kHz waveform frames (640 samples = 40 ms each) → soft tokens. No audio tower.

    input_features (N, F, 640) ─► RMSNorm over the 640 samples (no weight) ─► embedding_projection ─► (N, F, H)

Each frame is normalised by its own RMS, so absolute loudness is discarded (an all-zero frame maps to 0).
Checkpoint name: `model.embed_audio.embedding_projection.weight` [H, 640].
"""

from __future__ import annotations

from ..config import AudioConfig
from .vision import MultimodalEmbedder


class AudioEmbedder(MultimodalEmbedder):
    def __init__(self, config: AudioConfig, text_hidden: int):
        super().__init__(config.audio_embed_dim, text_hidden, config.rms_norm_eps)
