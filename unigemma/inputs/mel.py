"""Log-mel features for the family's audio encoder (E2B / E4B), as transformers' `Gemma4AudioFeatureExtractor`.

One 16 kHz mono clip (inputs/audio.py decodes, mixes to mono, resamples and cuts clips of at most 30 s):

    samples ─► zero-pad the end to a multiple of 128 samples (the reference pads every batch so) and
               frame_length/2 zeros in front (semicausal framing)
        ─► frames of frame_length + 1 samples every hop (20 ms / 10 ms → 321 / 160 at 16 kHz)
        ─► [pre-emphasis] or drop the last sample ─► × periodic Hann(frame_length) ─► |rFFT| (n = next power of 2)
        ─► @ HTK mel filter bank (triangles in Hz, no area normalisation) ─► log(x + mel_floor)
        ─► [(x − per_bin_mean) / per_bin_stddev] ─► float32, frames past the real samples zeroed and masked off

dtypes follow the reference step for step (float32 frames and FFT, float64 filter bank and log), so the features
are equal to its outputs bit for bit (tests/test_family_audio.py compares them live: the extractor is pure numpy).
The encoder turns every 4 frames into one soft token: `num_mel_tokens` counts them from the mask.

What this module does not do: decode or resample (inputs/audio.py), or run the encoder (model/encoders/audio.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

PAD_MULTIPLE = 128  # samples: the reference feature extractor's default pad_to_multiple_of


@dataclass
class MelSettings:
    """The feature extractor's settings (checkpoint: processor_config.json "feature_extractor" or
    preprocessor_config.json); defaults are the reference's."""

    feature_size: int = 128
    sampling_rate: int = 16_000
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "MelSettings":
        if d.get("dither", 0.0):
            raise ValueError(f"feature extractor: dither = {d['dither']!r} adds random noise to every clip; unigemma "
                             "supports dither 0 only (deterministic features)")
        known = {f.name for f in fields(cls)}
        s = cls(**{k: v for k, v in d.items() if k in known})
        for name in ("per_bin_mean", "per_bin_stddev"):
            v = getattr(s, name)
            if v is not None:
                if len(v) != s.feature_size:
                    raise ValueError(f"feature extractor: {name} has {len(v)} values, expected feature_size = "
                                     f"{s.feature_size}")
                setattr(s, name, tuple(float(x) for x in v))
        return s

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "MelSettings":
        """Read the checkpoint's own settings (other runtimes' audio broke when they used defaults instead)."""
        path = Path(path)
        for name, key in (("processor_config.json", "feature_extractor"), ("preprocessor_config.json", None)):
            f = path / name
            if f.is_file():
                d = json.loads(f.read_text(encoding="utf-8"))
                d = d.get(key) if key else d
                if isinstance(d, dict) and ("feature_size" in d or "frame_length_ms" in d or key is None):
                    return cls.from_dict(d)
        return cls()

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return 2 * n if self.fft_overdrive else n


_BANKS: dict[tuple, np.ndarray] = {}


def mel_filter_bank(s: MelSettings) -> np.ndarray:
    """float64 (fft_length/2 + 1, feature_size): HTK-mel-spaced triangles over the FFT bin frequencies."""
    key = (s.fft_length, s.feature_size, s.min_frequency, s.max_frequency, s.sampling_rate)
    bank = _BANKS.get(key)
    if bank is None:
        def to_mel(f):
            return 2595.0 * np.log10(1.0 + (f / 700.0))

        mels = np.linspace(to_mel(s.min_frequency), to_mel(s.max_frequency), s.feature_size + 2)
        edges = 700.0 * (np.power(10, mels / 2595.0) - 1.0)  # (M + 2,) Hz: left, centre, right of each triangle
        bins = np.linspace(0, s.sampling_rate // 2, s.fft_length // 2 + 1)
        width = np.diff(edges)
        rel = edges[None, :] - bins[:, None]  # (bins, M + 2)
        rising = -rel[:, :-2] / width[:-1]
        falling = rel[:, 2:] / width[1:]
        bank = _BANKS[key] = np.maximum(np.zeros(1), np.minimum(rising, falling))
    return bank


def log_mel(wave: np.ndarray, s: MelSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One clip of float32 samples → (features float32 (F, M), mask bool (F,)) as the reference computes them."""
    s = s or MelSettings()
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    n = wave.size
    padded = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
    L, hop = s.frame_length, s.hop_length
    front = L // 2
    x = np.zeros(front + padded, dtype=np.float32)
    x[front:front + n] = wave
    real = np.zeros(front + padded, dtype=bool)
    real[front:front + n] = True
    span = L + 1
    count = max(0, (x.size - span) // hop + 1)
    feats = _frame_features(x, 0, count, s)
    mask = real[np.arange(count) * hop + span - 1]  # a frame is real when its last sample is
    feats = feats.astype(np.float32) * mask[:, None]
    return feats, mask


def _frame_features(x: np.ndarray, first: int, count: int, s: MelSettings) -> np.ndarray:
    """float64 log-mel rows of frames first … first + count − 1 of the front-padded samples x."""
    L, hop, span = s.frame_length, s.hop_length, s.frame_length + 1
    if s.input_scale_factor != 1.0:
        x = x * s.input_scale_factor  # zeros stay zero: scaling before or after the padding is the same
    idx = (first + np.arange(count))[:, None] * hop + np.arange(span)[None, :]
    frames = x[idx]  # (F, L + 1)
    if s.preemphasis > 0.0:
        if s.preemphasis_htk_flavor:
            frames = np.concatenate([frames[:, :1] * (1.0 - s.preemphasis),
                                     frames[:, 1:-1] - s.preemphasis * frames[:, :-2]], axis=-1)
        else:
            frames = frames[:, 1:] - s.preemphasis * frames[:, :-1]
    else:
        frames = frames[:, :-1]
    hann = np.hanning(L + 1)[:-1].astype(np.float32)  # periodic Hann of L samples
    spec = np.abs(np.fft.rfft(frames * hann, n=s.fft_length, axis=-1))
    feats = np.log(spec @ mel_filter_bank(s) + np.array(s.mel_floor, dtype=np.float64))
    if s.per_bin_mean is not None:
        feats = feats - np.array(s.per_bin_mean).reshape(1, -1)
    if s.per_bin_stddev is not None:
        feats = feats / np.array(s.per_bin_stddev).reshape(1, -1)
    return feats


class MelStream:
    """`log_mel` for audio that arrives in pieces: each frame is computed once its samples are all in, with the
    same arithmetic, so the frames equal the one-shot frames. `finish` pads the end as `log_mel` does and returns
    the remaining frames with their mask (frames reaching past the audio are masked and zero)."""

    def __init__(self, s: MelSettings | None = None):
        self.s = s or MelSettings()
        self.front = self.s.frame_length // 2
        self.x = np.zeros(self.front, dtype=np.float32)  # the semicausal front padding, then the samples
        self.n = 0
        self.done = 0  # frames returned

    def push(self, wave: np.ndarray) -> np.ndarray:
        """float32 samples → the float32 frames (k, M) that became complete."""
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        self.x = np.concatenate([self.x, wave])
        self.n += wave.size
        span, hop = self.s.frame_length + 1, self.s.hop_length
        ready = max(0, (self.x.size - span) // hop + 1)
        out = _frame_features(self.x, self.done, ready - self.done, self.s).astype(np.float32)
        self.done = ready
        return out

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        padded = -(-self.n // PAD_MULTIPLE) * PAD_MULTIPLE
        x = np.zeros(self.front + padded, dtype=np.float32)
        x[: self.x.size] = self.x
        span, hop = self.s.frame_length + 1, self.s.hop_length
        count = max(0, (x.size - span) // hop + 1)
        rest = max(0, count - self.done)
        feats = _frame_features(x, self.done, rest, self.s).astype(np.float32)
        mask = (self.done + np.arange(rest)) * hop + span - 1 < self.front + self.n
        self.done = count
        return feats * mask[:, None], mask


def num_mel_tokens(mask: np.ndarray) -> int:
    """Soft tokens the encoder makes from these frames: the mask after two stride-2 subsamplings."""
    return int(np.asarray(mask)[::2][::2].sum())


def batch_mel(clips: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(features, mask)] → input_features (N, F_max, M) float32, input_features_mask (N, F_max) bool, zero-padded
    (what the reference returns for the clips in one call)."""
    longest = max(f.shape[0] for f, _ in clips)
    M = clips[0][0].shape[1]
    feats = torch.zeros(len(clips), longest, M, dtype=torch.float32)
    mask = torch.zeros(len(clips), longest, dtype=torch.bool)
    for i, (f, m) in enumerate(clips):
        feats[i, : f.shape[0]] = torch.from_numpy(f)
        mask[i, : m.shape[0]] = torch.from_numpy(m)
    return feats, mask
