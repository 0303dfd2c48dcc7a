"""Audio augmentation for demo training: time shift, gain and noise, drawn fresh for every batch.

The demo clips on disk are clean (espeak-ng speech, silence trimmed, peak 0.5). A feasibility run showed that
a small encoder-free model generalises to unseen voices only when augmentation is drawn anew each time a clip
is used; one fixed augmented copy per clip overfits. So the training step calls this on the waveforms of each
batch, with its own seeded generator:

    from augment import augment_waveform, augment_batch        # scripts/demo on sys.path
    rng = np.random.default_rng(seed)                           # one per training run (or per worker)
    wave = augment_waveform(wave, rng)                           # float32 [n] 16 kHz → float32 [n'] 16 kHz
    waves = augment_batch(list_of_waves, rng)                    # the same, for each clip of a batch

What one call does (each draw independent):
    1. time shift: 0..max_shift_s of silence before the clip and 0..max_shift_s after it (so the speech
       starts at a different 40-ms frame phase and position; the clip gets longer, never cut);
    2. gain: uniform in gain_db dB;
    3. noise (with probability p_noise): white or low-passed ("brown-ish") Gaussian noise at an SNR uniform
       in snr_db dB relative to the speech's RMS;
    4. clip to [-1, 1] (what a real recording would do).
Same rng state and input → same output. Inputs may be numpy arrays or torch tensors (1-D); the output is numpy.

What this module does not do: read or write files, resample (inputs must be 16 kHz), decide batch order.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

SAMPLE_RATE = 16_000


def augment_waveform(wave: Any, rng: np.random.Generator, *, sample_rate: int = SAMPLE_RATE,
                     max_shift_s: float = 0.3, gain_db: tuple[float, float] = (-12.0, 6.0),
                     snr_db: tuple[float, float] = (5.0, 40.0), p_noise: float = 0.8) -> np.ndarray:
    """One freshly augmented copy of a mono waveform (float32 1-D, 16 kHz); see the module docstring."""
    x = np.asarray(wave.detach().cpu().numpy() if hasattr(wave, "detach") else wave, dtype=np.float32)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"wave must be a non-empty 1-D mono waveform, got shape {x.shape}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    if max_shift_s < 0 or gain_db[0] > gain_db[1] or snr_db[0] > snr_db[1] or not 0 <= p_noise <= 1:
        raise ValueError(f"bad augmentation settings: max_shift_s={max_shift_s} (>= 0), gain_db={gain_db} and "
                         f"snr_db={snr_db} (low <= high), p_noise={p_noise} (0..1)")
    max_shift = int(max_shift_s * sample_rate)
    before, after = (int(v) for v in rng.integers(0, max_shift + 1, size=2))
    x = np.concatenate([np.zeros(before, np.float32), x, np.zeros(after, np.float32)])
    x *= np.float32(10.0 ** (rng.uniform(*gain_db) / 20.0))
    if rng.random() < p_noise:
        # SNR against the speech part only: padding silence must not lower the reference level.
        speech = x[before: x.size - after]
        rms = float(np.sqrt(np.mean(speech.astype(np.float64) ** 2)))
        noise = rng.standard_normal(x.size).astype(np.float32)
        if rng.random() < 0.5:
            # One-pole low-pass: a rumble-like noise whose energy sits low, unlike white hiss.
            alpha = rng.uniform(0.8, 0.98)
            noise = _one_pole(noise, float(alpha))
        noise_rms = float(np.sqrt(np.mean(noise.astype(np.float64) ** 2))) or 1.0
        target = rms / (10.0 ** (rng.uniform(*snr_db) / 20.0))
        x += noise * np.float32(target / noise_rms)
    return np.clip(x, -1.0, 1.0).astype(np.float32, copy=False)


def augment_batch(waves: Sequence[Any], rng: np.random.Generator, **settings: Any) -> list[np.ndarray]:
    """`augment_waveform` on each clip of a batch, in order, from one generator."""
    return [augment_waveform(w, rng, **settings) for w in waves]


def _one_pole(x: np.ndarray, alpha: float) -> np.ndarray:
    # y[t] = alpha·y[t−1] + (1 − alpha)·x[t], as a cumulative sum of scaled terms (no Python loop): with
    # y[t] = alpha^t · Σ_k (1 − alpha)·x[k]·alpha^(−k), computed in blocks so alpha^(−k) never overflows.
    out = np.empty_like(x, dtype=np.float64)
    carry = 0.0
    block = 256
    powers = alpha ** np.arange(block, dtype=np.float64)
    for start in range(0, x.size, block):
        seg = x[start: start + block].astype(np.float64) * (1.0 - alpha)
        n = seg.size
        p = powers[:n]
        y = p * (carry + np.cumsum(seg / p))
        out[start: start + n] = y
        carry = y[-1] * alpha
    return out.astype(np.float32)
