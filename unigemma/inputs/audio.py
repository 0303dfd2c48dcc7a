"""Audio → soft-token inputs: decoding, mono 16 kHz float waveforms, 640-sample frames, 30 s segments.

Pipeline (spec/preprocessing.md §2):

    source ──load_audio──▶ float32 mono waveform at 16 kHz, values nominally in [−1, 1]
        ──split_segments (≤ 750 frames = 30 s each)──▶ one waveform per audio item in the prompt
        ──audio_frames──▶ features [n, 640] float32 (last frame zero-padded), mask [n] all True
        ──batch_audio──▶ input_features [B, F, 640], input_features_mask [B, F] (False = batch padding)

Decoding: soundfile (libsndfile: WAV 8/16/24/32-bit PCM and float, FLAC, OGG Vorbis/Opus, MP3 and more),
with PyAV (FFmpeg) as the fallback for whatever libsndfile cannot read (AAC/M4A, WebM audio, the audio
track of a video, ...). Integer PCM becomes float by dividing by 2^(bits−1); channels are averaged;
other rates go through soxr's high-quality resampler.

The framing matches the reference feature extractor (transformers `Gemma4UnifiedAudioFeatureExtractor`)
exactly; the reference does no decoding, scaling, mixing or resampling itself, so those steps are ours.
Splitting into 30 s segments is also ours: the reference has no cap (spec §2.2) but the model was built
for segments of at most 750 tokens.

What this module does not do: put audio tokens into the prompt (inputs/prompt.py), fetch remote audio.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .media import MediaError, MediaSource, describe_source, read_source

__all__ = [
    "SAMPLE_RATE",
    "FRAME_SAMPLES",
    "SEGMENT_FRAMES",
    "DEFAULT_MAX_SECONDS",
    "AudioInput",
    "load_audio",
    "waveform_from_array",
    "audio_frames",
    "split_segments",
    "load_audio_segments",
    "num_audio_tokens",
    "batch_audio",
]

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 640  # 40 ms at 16 kHz: one soft token
SEGMENT_FRAMES = 750  # 30 s: the longest audio item the model is fed at once
DEFAULT_MAX_SECONDS = 600.0
_RESAMPLE_QUALITY = "HQ"
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")

# (waveform, sample_rate) as a tuple, or an encoded source; a bare array is taken to be 16 kHz already
# (as the reference feature extractor assumes).
AudioInput = Union[MediaSource, np.ndarray, torch.Tensor, "tuple[np.ndarray | torch.Tensor, int]"]


def load_audio(
    src: AudioInput,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    format: str | None = None,
) -> np.ndarray:
    """Decode any audio input into a float32 mono waveform at 16 kHz.

    src: a path, bytes, data URI or base64 string of an audio file; `(waveform, sample_rate)`; or a bare
    1-D waveform taken to be 16 kHz. `format` ("wav", "mp3", ...) is only a hint for error messages and
    for choosing the decoder order; the container is detected from the data.

    Raises MediaError for empty, corrupt or unsupported audio, or audio longer than `max_seconds`.
    Silence is valid (all zeros).
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")
    if isinstance(src, tuple):
        if len(src) != 2:
            raise MediaError(f"audio tuple must be (waveform, sample_rate), got {len(src)} items")
        wave, rate = src
        return waveform_from_array(wave, rate, max_seconds=max_seconds)
    if isinstance(src, (np.ndarray, torch.Tensor)):
        return waveform_from_array(src, SAMPLE_RATE, max_seconds=max_seconds)
    data = read_source(src, what="audio")
    label = describe_source(src)
    wave, rate = _decode(data, label, max_seconds, format)
    return _finish(wave, rate, max_seconds, label)


def waveform_from_array(
    wave: np.ndarray | torch.Tensor | Sequence[float], sample_rate: int, *, max_seconds: float = DEFAULT_MAX_SECONDS
) -> np.ndarray:
    """An in-memory waveform at `sample_rate` → float32 mono 16 kHz.

    1-D arrays are mono. 2-D arrays are (samples, channels) as soundfile returns them, unless the first
    axis is short (≤ 8) and the second long, which is read as (channels, samples) as torchaudio returns
    them. Integer samples are scaled by 2^(bits−1) (uint8 is offset-binary, centred on 128).
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise MediaError(f"audio sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    arr = np.asarray(wave)
    if arr.ndim == 2:
        if arr.shape[0] <= 8 and arr.shape[1] > arr.shape[0]:
            arr = arr.T  # (channels, samples) → (samples, channels)
    elif arr.ndim == 1:
        arr = arr[:, None]
    else:
        raise MediaError(f"audio waveform must be 1-D (samples) or 2-D (samples, channels), got shape {arr.shape}")
    return _finish(_to_float(arr, "audio array"), int(sample_rate), max_seconds, "array")


def _to_float(arr: np.ndarray, label: str) -> np.ndarray:
    """Integer PCM → float in [−1, 1); floats pass through as float32."""
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    if arr.dtype in (np.int8, np.int16, np.int32):
        return (arr.astype(np.float64) / float(2 ** (8 * arr.dtype.itemsize - 1))).astype(np.float32)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    raise MediaError(f"{label}: unsupported sample dtype {arr.dtype}; use float32 in [-1, 1] or int16 PCM")


def _finish(samples: np.ndarray, rate: int, max_seconds: float, label: str) -> np.ndarray:
    """(samples, channels) float at `rate` → float32 mono 16 kHz, with the empty / length / finite checks."""
    if samples.shape[0] == 0 or samples.size == 0:
        raise MediaError(f"audio {label}: contains no samples (empty audio)")
    seconds = samples.shape[0] / rate
    if seconds > max_seconds:
        raise MediaError(f"audio {label}: {seconds:.1f} s is longer than the limit of {max_seconds:g} s")
    if not np.isfinite(samples).all():
        raise MediaError(f"audio {label}: contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != SAMPLE_RATE:
        import soxr

        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality=_RESAMPLE_QUALITY).astype(np.float32, copy=False)
        if mono.size == 0:  # e.g. a single sample at 48 kHz rounds to nothing at 16 kHz
            raise MediaError(f"audio {label}: too short to resample ({samples.shape[0]} samples at {rate} Hz)")
    return mono


# ---------------------------------------------------------------------------------------------------------
# Decoders


def _decode(data: Path | bytes, label: str, max_seconds: float, fmt: str | None) -> tuple[np.ndarray, int]:
    errors = []
    # libsndfile first: exact PCM handling and no FFmpeg surprises; PyAV reads what it cannot.
    for decoder in (_decode_soundfile, _decode_pyav):
        try:
            return decoder(data, label, max_seconds)
        except MediaError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "try the next one"
            reason = _BUFFER_REPR.sub("the data", str(exc)).strip()
            errors.append(f"{decoder.__name__[8:]}: {reason or type(exc).__name__}")
    hint = f" (declared format {fmt!r})" if fmt else ""
    raise MediaError(
        f"audio {label}{hint}: not a readable audio file, or corrupt ({'; '.join(errors)[:300]}). "
        "Supported: WAV, FLAC, OGG (Vorbis/Opus), MP3, and what FFmpeg decodes (AAC/M4A, WebM, ...)"
    )


def _decode_soundfile(data: Path | bytes, label: str, max_seconds: float) -> tuple[np.ndarray, int]:
    import soundfile as sf

    fp = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with sf.SoundFile(fp) as f:
        rate = int(f.samplerate)
        if rate <= 0:
            raise ValueError(f"bad sample rate {rate}")
        # The header's frame count lets us refuse long audio before decoding it (compressed formats may
        # report an estimate; the decoded length is checked again in _finish).
        if f.frames > 0 and f.frames / rate > max_seconds * 1.01 + 1:
            raise MediaError(f"audio {label}: {f.frames / rate:.1f} s is longer than the limit of {max_seconds:g} s")
        samples = f.read(dtype="float32", always_2d=True)
    return samples, rate


def _decode_pyav(data: Path | bytes, label: str, max_seconds: float) -> tuple[np.ndarray, int]:
    import av

    fp = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with av.open(fp, mode="r") as container:
        if not container.streams.audio:
            raise MediaError(f"audio {label}: the file has no audio stream")
        stream = container.streams.audio[0]
        # Planar float keeps the channel layout and rate; down-mixing and resampling are done by us.
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        total, rate = 0, 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                arr = out.to_ndarray()  # (channels, n)
                rate = rate or int(out.sample_rate)
                chunks.append(arr.T)
                total += arr.shape[1]
            if rate and total / rate > max_seconds * 1.01 + 1:
                raise MediaError(f"audio {label}: longer than the limit of {max_seconds:g} s")
        for out in resampler.resample(None):
            arr = out.to_ndarray()
            rate = rate or int(out.sample_rate)
            chunks.append(arr.T)
    if not chunks:
        raise MediaError(f"audio {label}: the audio stream decodes to no samples (empty audio)")
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False), rate


# ---------------------------------------------------------------------------------------------------------
# Framing, segments, batching


def num_audio_tokens(num_samples: int) -> int:
    """Soft tokens (= 640-sample frames) for a 16 kHz waveform of `num_samples` samples."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return math.ceil(num_samples / FRAME_SAMPLES)


def audio_frames(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-D 16 kHz waveform → (features float32 [n, 640], mask bool [n] all True), n = ceil(len/640).

    Frames are contiguous and non-overlapping; the last one is zero-padded at the end.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise MediaError(f"audio waveform must be 1-D mono, got shape {wave.shape}; load it with load_audio()")
    if wave.size == 0:
        raise MediaError("audio waveform is empty (0 samples)")
    n = num_audio_tokens(wave.size)
    features = np.zeros((n, FRAME_SAMPLES), dtype=np.float32)
    features.reshape(-1)[: wave.size] = wave
    return features, np.ones(n, dtype=bool)


def split_segments(wave: np.ndarray, max_frames: int = SEGMENT_FRAMES) -> list[np.ndarray]:
    """Cut a waveform into consecutive pieces of at most `max_frames` × 640 samples (the last may be shorter).

    Each piece becomes its own audio item (its own BOA … EOA in the prompt). Cuts fall on frame
    boundaries, so the frames of the pieces are exactly the frames of the whole.
    """
    if max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.size == 0:
        raise MediaError(f"audio waveform must be a non-empty 1-D array, got shape {wave.shape}")
    step = max_frames * FRAME_SAMPLES
    return [wave[i : i + step] for i in range(0, wave.size, step)]


def load_audio_segments(
    src: AudioInput,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_frames: int = SEGMENT_FRAMES,
    format: str | None = None,
) -> list[np.ndarray]:
    """`load_audio` followed by `split_segments`: the audio items one source becomes."""
    return split_segments(load_audio(src, max_seconds=max_seconds, format=format), max_frames)


def batch_audio(
    waves: Sequence[np.ndarray], *, max_frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame and right-pad a batch: input_features float32 [B, F, 640], input_features_mask bool [B, F].

    F is the longest item's frame count; shorter items get all-zero frames with mask False. `max_frames`
    truncates every item to that many frames (the reference's `max_length`); it does not pad up to it.
    """
    if len(waves) == 0:
        raise ValueError("batch_audio needs at least one waveform")
    framed = [audio_frames(w)[0] for w in waves]
    if max_frames is not None:
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        framed = [f[:max_frames] for f in framed]
    longest = max(f.shape[0] for f in framed)
    features = np.zeros((len(framed), longest, FRAME_SAMPLES), dtype=np.float32)
    mask = np.zeros((len(framed), longest), dtype=bool)
    for i, f in enumerate(framed):
        features[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
    return torch.from_numpy(features), torch.from_numpy(mask)
