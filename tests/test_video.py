"""Video preprocessing: golden conformance with the reference video processor, sampling, containers, errors.

tests/fixtures/golden/video.npz holds the reference outputs (scripts/make_golden_fixtures.py) for a small
synthetic MP4 that this test re-encodes with PyAV from the same deterministic frames.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from unigemma.inputs.media import MediaError
from unigemma.inputs.video import (
    DEFAULT_MAX_FRAMES,
    VideoFeatures,
    batch_videos,
    format_timestamp,
    load_video,
    preprocess_frames,
    sample_indices,
)

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "video.npz"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_golden_fixtures", ROOT / "scripts" / "make_golden_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return gen.make_video_bytes()


def _uint8(feat: VideoFeatures) -> np.ndarray:
    n = feat.num_tokens_per_frame
    u8 = torch.round(feat.pixel_values[:, :n] * 255).to(torch.uint8)
    assert torch.equal(u8.to(torch.float32) / 255, feat.pixel_values[:, :n])  # true division
    return u8.numpy()


# ---------------------------------------------------------------------------------------------------------
# Golden conformance


def test_encoded_input_is_reproducible(mp4, golden):
    # If PyAV/FFmpeg encode differently here, the golden comparison below would test other frames.
    assert hashlib.sha256(mp4).hexdigest() == str(golden["file_sha"])


@pytest.mark.parametrize("config", list(gen.VIDEO_CONFIGS))
def test_matches_reference_processor(config, mp4, golden):
    feat = load_video(mp4, **gen.VIDEO_CONFIGS[config])
    assert feat.frame_indices == golden[f"{config}|indices"].tolist()
    assert feat.timestamps == golden[f"{config}|timestamps"].tolist()
    assert feat.fps == float(golden[f"{config}|fps"])
    assert feat.total_frames == int(golden[f"{config}|total"])
    assert feat.num_tokens_per_frame == int(golden[f"{config}|num"])
    frames = len(feat.frame_indices)
    assert feat.pixel_values.shape == (frames, 70, 6912) and feat.pixel_values.dtype == torch.float32
    assert feat.position_ids.shape == (frames, 70, 2) and feat.position_ids.dtype == torch.int64
    for f in range(frames):
        assert np.array_equal(feat.position_ids[f].numpy(), golden[f"{config}|pos"])
    assert not feat.pixel_values[:, feat.num_tokens_per_frame :].any()
    u8 = _uint8(feat)
    if hashlib.sha256(u8.tobytes()).hexdigest() != str(golden[f"{config}|sha"]):
        ref = gen.delta_decode(golden["n8|frame0"])
        diff = np.abs(ref.astype(int) - _uint8(load_video(mp4, num_frames=8))[0].astype(int))
        pytest.fail(f"{config}: frames differ from the reference; frame 0 max |diff| {diff.max()}")
    if config == "n8":
        assert np.array_equal(u8[0], gen.delta_decode(golden["n8|frame0"]))


def test_video_scaling_is_true_division(golden):
    values, _, n, _ = preprocess_frames(np.asarray(gen.image_cases()["value_ramp"]())[None], 70)
    u8 = np.rint(values[0, :n].numpy() * 255).astype(np.int64)
    table = golden["divide_table"]
    assert np.array_equal(values[0, :n].numpy(), table[u8])
    assert not np.array_equal(table, np.arange(256, dtype=np.float32) * np.float32(1 / 255))


# ---------------------------------------------------------------------------------------------------------
# Sampling and timestamps


def test_sampling_spec_example():
    idx = sample_indices(100, num_frames=32)
    assert idx[:10] == [0, 3, 6, 9, 12, 15, 18, 21, 25, 28] and idx[-2:] == [93, 96]
    stamps = [format_timestamp(i / 25) for i in idx]
    assert stamps == ["00:00"] * 8 + ["00:01"] * 8 + ["00:02"] * 8 + ["00:03"] * 8
    assert sample_indices(100, fps=2, video_fps=25) == [i * 100 // 8 for i in range(8)]
    assert sample_indices(3, fps=0.01, video_fps=25) == [0]  # at least one frame
    assert format_timestamp(4500) == "75:00" and format_timestamp(59.99) == "00:59" and format_timestamp(61) == "01:01"


def test_short_videos_use_all_frames_and_limits():
    assert sample_indices(10, num_frames=32) == list(range(10))
    assert sample_indices(40, fps=100, video_fps=25) == list(range(40))
    # an fps-derived count is clamped to max_frames, still spread over the whole video
    idx = sample_indices(4000, fps=20, video_fps=25, max_frames=128)
    assert len(idx) == 128 and idx[-1] > 3900
    with pytest.raises(MediaError, match="over the limit"):
        sample_indices(4000, num_frames=DEFAULT_MAX_FRAMES + 1)
    with pytest.raises(ValueError, match="mutually exclusive"):
        sample_indices(100, num_frames=8, fps=1, video_fps=25)
    with pytest.raises(MediaError, match="frame rate is unknown"):
        sample_indices(100, fps=1, video_fps=None)
    with pytest.raises(ValueError, match="num_frames"):
        sample_indices(100, num_frames=0)


def test_decoded_arrays_match_file(mp4):
    frames = np.stack([f.to_ndarray(format="rgb24") for f in av.open(io.BytesIO(mp4)).decode(video=0)])
    from_file = load_video(mp4, num_frames=8)
    from_array = load_video((frames, 25.0), num_frames=8)
    assert from_array.frame_indices == from_file.frame_indices
    assert from_array.timestamps == from_file.timestamps
    assert torch.equal(from_array.pixel_values, from_file.pixel_values)
    # without a frame rate the timestamps assume 24 fps
    unknown = load_video(frames, num_frames=2)
    assert unknown.fps is None and unknown.frame_indices == [0, 20] and unknown.timestamps == ["00:00", "00:00"]
    assert format_timestamp(20 / 24) == "00:00"


def test_sources_and_batching(mp4, tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(mp4)
    b64 = base64.b64encode(mp4).decode()
    base = load_video(mp4, num_frames=4)
    for src in (str(path), path, b64, f"data:video/mp4;base64,{b64}"):
        assert torch.equal(load_video(src, num_frames=4).pixel_values, base.pixel_values)
    other = load_video(mp4, num_frames=3)
    values, positions, counts = batch_videos([base, other])
    assert values.shape == (7, 70, 6912) and positions.shape == (7, 70, 2) and counts == [4, 3]
    assert torch.equal(values[4:], other.pixel_values)
    big = load_video(mp4, num_frames=2, max_soft_tokens=140)
    assert big.num_tokens_per_frame == 130 and big.size == (480, 624)  # 160×120 frames at P=140
    with pytest.raises(ValueError, match="same max_soft_tokens"):
        batch_videos([base, big])


@pytest.mark.parametrize("codec, container", [("libvpx-vp9", "webm"), ("mpeg4", "mov"), ("libx264", "mp4")])
def test_other_containers(codec, container):
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # an FFmpeg build without this encoder cannot make the input file
        pytest.skip(f"this PyAV build has no {codec} encoder")
    frames = gen.video_frames()[:12, :64, :96]
    data = gen.make_video_bytes(codec=codec, container=container, frames=frames, fps=10)
    feat = load_video(data, num_frames=4)
    assert feat.total_frames == 12  # WebM records no frame count: counted from packets
    assert feat.frame_indices == [0, 3, 6, 9] and feat.fps == 10.0
    assert feat.timestamps == ["00:00", "00:00", "00:00", "00:00"]
    # content survives the codec: compare with the processed source frames
    ref, _, _, _ = preprocess_frames(frames[[0, 3, 6, 9]], 70)
    assert (feat.pixel_values - ref).abs().mean() < 0.05


def test_truncated_file_uses_the_frames_that_decode(tmp_path):
    # moov atom first ("faststart"), so a cut-off file still opens but claims 40 frames it does not hold.
    path = tmp_path / "fs.mp4"
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for arr in gen.video_frames():
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    feat = load_video(data[: len(data) // 2], num_frames=4)
    assert 0 < feat.total_frames < 40
    assert feat.frame_indices == sample_indices(feat.total_frames, num_frames=4)
    assert feat.pixel_values.shape[0] == len(feat.frame_indices)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def _audio_only_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_bad_inputs_raise_media_error(mp4):
    cases = [
        (b"not a video" * 100, "not a readable video|cannot decode"),
        (mp4[: len(mp4) // 3][:2000], "cannot decode|not a readable|no frame|no frames"),
        (_png_bytes(), "not supported"),
        (_audio_only_mp4(), "no video stream"),
        (b"", "empty"),
        ("data:video/mp4;base64,%%%", "invalid base64"),
        ("/no/such/video.mp4", "no such file"),
        (np.zeros((0, 8, 8, 3), np.uint8), "no frames"),
        (np.zeros((4, 8, 8), np.uint8), "uint8 \\[frames"),
        (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
        ((np.zeros((4, 8, 8, 3), np.uint8), 0), "fps must be positive"),
    ]
    for src, match in cases:
        with pytest.raises(MediaError, match=match):
            load_video(src, num_frames=2)
    with pytest.raises(MediaError, match="over the limit"):
        load_video(mp4, num_frames=2, max_frame_pixels=100)
    with pytest.raises(MediaError, match="longer than the limit"):
        load_video(mp4, num_frames=2, max_seconds=1.0)
    with pytest.raises(MediaError, match="max_soft_tokens"):
        load_video(mp4, num_frames=2, max_soft_tokens=64)
    with pytest.raises(MediaError, match="over the limit"):
        load_video(mp4, num_frames=500)
