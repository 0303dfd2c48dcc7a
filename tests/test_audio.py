"""Audio preprocessing: live conformance with the reference feature extractor, decoding, limits, errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf
import torch

from unigemma.inputs.audio import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    SEGMENT_FRAMES,
    audio_frames,
    batch_audio,
    load_audio,
    load_audio_segments,
    num_audio_tokens,
    split_segments,
    waveform_from_array,
)
from unigemma.inputs.media import MediaError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference():
    return transformers.Gemma4UnifiedAudioFeatureExtractor()


def _tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Conformance with transformers.Gemma4UnifiedAudioFeatureExtractor


@pytest.mark.parametrize("n", [1, 639, 640, 641, 40_000, 61 * SAMPLE_RATE])
def test_frames_match_reference(reference, n):
    wave = _noise(n, seed=n)
    feats, mask = audio_frames(wave)
    ref = reference(wave, return_tensors="np")
    assert feats.dtype == np.float32 and mask.dtype == bool
    assert np.array_equal(feats, ref["input_features"][0])
    assert np.array_equal(mask, ref["input_features_mask"][0])
    assert feats.shape == (num_audio_tokens(n), FRAME_SAMPLES)
    # the last frame holds the remainder, then zeros
    rem = n % FRAME_SAMPLES
    if rem:
        assert not feats[-1, rem:].any()


def test_batch_padding_matches_reference(reference):
    waves = [_noise(40_000, 1), _noise(16_000, 2), _noise(1, 3), _noise(641, 4)]
    values, mask = batch_audio(waves)
    ref = reference(waves, return_tensors="np")
    assert values.dtype == torch.float32 and mask.dtype == torch.bool
    assert values.shape == (4, 63, 640)
    assert np.array_equal(values.numpy(), ref["input_features"])
    assert np.array_equal(mask.numpy(), ref["input_features_mask"])
    assert mask.sum(dim=1).tolist() == [63, 25, 1, 2]
    # max_frames truncates like the reference's max_length
    values, mask = batch_audio(waves, max_frames=10)
    ref = reference(waves, max_length=10, truncation=True, return_tensors="np")
    assert np.array_equal(values.numpy(), ref["input_features"])
    assert np.array_equal(mask.numpy(), ref["input_features_mask"])


@pytest.mark.parametrize("rate", [8_000, 44_100, 48_000])
def test_resampled_input_matches_reference_framing(reference, rate):
    src = _tone(2.5, rate, freq=300.0)
    wave = load_audio((src, rate))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 40_000) <= 1
    expected = _tone(wave.size / SAMPLE_RATE, SAMPLE_RATE, freq=300.0)[: wave.size]
    # high-quality resampling: away from the edges the tone is reproduced closely
    assert np.abs(wave[400:-400] - expected[400:-400]).max() < 2e-3
    feats, mask = audio_frames(wave)
    ref = reference(wave, return_tensors="np")
    assert np.array_equal(feats, ref["input_features"][0]) and np.array_equal(mask, ref["input_features_mask"][0])


def test_token_counts_and_segments():
    assert [num_audio_tokens(n) for n in (0, 1, 640, 641, 40_000, 16_000, 960_000)] == [0, 1, 1, 2, 63, 25, 1500]
    wave = _noise(61 * SAMPLE_RATE, 5)  # 1525 frames
    segments = split_segments(wave)
    assert [num_audio_tokens(s.size) for s in segments] == [750, 750, 25]
    assert np.array_equal(np.concatenate(segments), wave)
    whole = audio_frames(wave)[0]
    parts = np.concatenate([audio_frames(s)[0] for s in segments])
    assert np.array_equal(whole, parts)  # cuts fall on frame boundaries
    assert len(split_segments(_noise(SEGMENT_FRAMES * FRAME_SAMPLES))) == 1
    assert len(split_segments(_noise(SEGMENT_FRAMES * FRAME_SAMPLES + 1))) == 2
    assert [s.size for s in split_segments(_noise(1000), max_frames=1)] == [640, 360]
    assert len(load_audio_segments((_noise(31 * SAMPLE_RATE), SAMPLE_RATE))) == 2


# ---------------------------------------------------------------------------------------------------------
# Decoding


def _write(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _aligned_error(got: np.ndarray, want: np.ndarray, max_lag: int = 400) -> float:
    """Max abs error after the best shift within ±max_lag samples (codec delay), away from the edges."""
    core = slice(max_lag + 200, want.size - max_lag - 200)
    best = np.inf
    for lag in range(-max_lag, max_lag + 1):
        seg = got[core.start + lag : core.stop + lag]
        if seg.size == want[core].size:
            best = min(best, float(np.abs(seg - want[core]).max()))
    return best


@pytest.mark.parametrize(
    "fmt, subtype, tol",
    [
        ("WAV", "PCM_U8", 1 / 128),
        ("WAV", "PCM_16", 1 / 32768),
        ("WAV", "PCM_24", 1 / 2**23),
        ("WAV", "PCM_32", 1e-7),
        ("WAV", "FLOAT", 0.0),
        ("WAV", "DOUBLE", 1e-7),
        ("FLAC", "PCM_16", 1 / 32768),
        ("FLAC", "PCM_24", 1 / 2**23),
    ],
)
def test_lossless_round_trip(fmt, subtype, tol):
    x = _tone(0.3, SAMPLE_RATE) * np.linspace(0.2, 1.0, int(0.3 * SAMPLE_RATE), dtype=np.float32)
    got = load_audio(_write(x, SAMPLE_RATE, fmt, subtype), format=fmt.lower())
    assert got.shape == x.shape and got.dtype == np.float32
    assert np.abs(got - x).max() <= tol + 1e-9


@pytest.mark.parametrize("fmt, subtype", [("OGG", "VORBIS"), ("OGG", "OPUS"), ("MP3", "MPEG_LAYER_III")])
def test_lossy_round_trip(fmt, subtype):
    x = _tone(0.5, SAMPLE_RATE, freq=440.0)
    got = load_audio(_write(x, SAMPLE_RATE, fmt, subtype))
    assert abs(got.size - x.size) < 0.05 * x.size
    assert _aligned_error(got, x) < 0.06


def test_pyav_fallback_for_aac():
    av = pytest.importorskip("av")
    x = _tone(0.5, 22_050, freq=500.0)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="adts") as out:
        stream = out.add_stream("aac", rate=22_050, layout="mono")
        frame = av.AudioFrame.from_ndarray(x[None, :], format="fltp", layout="mono")
        frame.sample_rate = 22_050
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = buf.getvalue()
    with pytest.raises(Exception):
        sf.read(io.BytesIO(data))  # libsndfile cannot read AAC: this exercises the PyAV path
    got = load_audio(data)
    want = _tone(got.size / SAMPLE_RATE, SAMPLE_RATE, freq=500.0)
    assert abs(got.size - 8000) < 2048  # AAC adds priming/padding samples
    assert _aligned_error(got, want, max_lag=1500) < 0.1


def test_sources_channels_and_int_scaling(tmp_path):
    x = _tone(0.2, SAMPLE_RATE)
    data = _write(x, SAMPLE_RATE, "WAV", "FLOAT")
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for src in (str(path), path, data, b64, f"data:audio/wav;base64,{b64}", (x, SAMPLE_RATE), x, torch.from_numpy(x)):
        assert np.array_equal(load_audio(src), x), type(src)
    # stereo: the mean of the channels, both layouts
    stereo = np.stack([x, -0.5 * x], axis=1)
    assert np.allclose(load_audio((stereo, SAMPLE_RATE)), 0.25 * x, atol=1e-7)
    assert np.allclose(load_audio((stereo.T, SAMPLE_RATE)), 0.25 * x, atol=1e-7)
    assert np.allclose(load_audio(_write(stereo, SAMPLE_RATE, "WAV", "FLOAT")), 0.25 * x, atol=1e-7)
    # integer PCM arrays are scaled to [-1, 1]
    ints = np.array([0, 16384, -32768, 32767], np.int16)
    assert waveform_from_array(ints, SAMPLE_RATE).tolist() == [0.0, 0.5, -1.0, 32767 / 32768]
    assert waveform_from_array(np.array([128, 0, 255], np.uint8), SAMPLE_RATE).tolist() == [0.0, -1.0, 127 / 128]
    assert waveform_from_array(np.array([2**30], np.int32), SAMPLE_RATE).tolist() == [0.5]
    # a 44.1 kHz file is resampled
    assert abs(load_audio(_write(_tone(1.0, 44_100), 44_100, "WAV", "PCM_16")).size - SAMPLE_RATE) <= 1


def test_silence_is_valid():
    wave = load_audio(_write(np.zeros(1000, np.float32), SAMPLE_RATE, "WAV", "PCM_16"))
    feats, mask = audio_frames(wave)
    assert feats.shape == (2, 640) and not feats.any() and mask.all()


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_media_error():
    cases = [
        (b"", "empty"),
        (b"definitely not audio" * 50, "not a readable audio file"),
        (_write(np.zeros(0, np.float32), SAMPLE_RATE, "WAV", "PCM_16"), "empty"),
        ("!!!not base64!!!", "no such file|base64"),
        ("data:audio/wav;base64,****", "invalid base64"),
        ("/no/such/file.wav", "no such file"),
        ((np.zeros(0, np.float32), SAMPLE_RATE), "empty"),
        ((np.zeros(10, np.float32), 0), "sample_rate"),
        ((np.zeros(10, np.float32), 16000.5), "sample_rate"),
        ((np.zeros((2, 2, 2), np.float32), SAMPLE_RATE), "1-D"),
        ((np.array([0.0, np.nan], np.float32), SAMPLE_RATE), "NaN"),
        ((np.zeros(10, np.complex64), SAMPLE_RATE), "dtype"),
        ((np.zeros(10, np.float32),), "tuple"),
    ]
    for src, match in cases:
        with pytest.raises(MediaError, match=match):
            load_audio(src)
    wav = _write(_tone(0.2, SAMPLE_RATE), SAMPLE_RATE, "WAV", "PCM_16")
    with pytest.raises(MediaError, match="corrupt|not a readable"):
        load_audio(wav[:30])  # header cut off
    with pytest.raises(MediaError, match="longer than the limit"):
        load_audio(_write(_tone(2.0, SAMPLE_RATE), SAMPLE_RATE, "FLAC", "PCM_16"), max_seconds=1.0)
    with pytest.raises(MediaError, match="longer than the limit"):
        load_audio((_tone(2.0, 8000), 8000), max_seconds=1.0)
    with pytest.raises(MediaError, match="empty"):
        audio_frames(np.zeros(0, np.float32))
    with pytest.raises(MediaError, match="1-D"):
        audio_frames(np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError):
        batch_audio([])
