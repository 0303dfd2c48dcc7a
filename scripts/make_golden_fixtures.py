"""Generate golden preprocessing fixtures from the reference processors (transformers 5.24.0).

The reference image and video processors need torchvision, which does not import beside the main
environment's CPU torch, so this script runs in a separate virtual environment:

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0 pillow numpy av soundfile
    /tmp/refenv/bin/python scripts/make_golden_fixtures.py        # writes tests/fixtures/golden/*.npz

What is stored (only reference *outputs*; the inputs are rebuilt by the tests from the builders below,
which use nothing but numpy, PIL and PyAV, so `tests/test_image.py` / `tests/test_video.py` import this
file to regenerate exactly the same inputs):

- images.npz: for every image case and budget P: resized size, soft-token count, positions [P, 2], the
  SHA-256 of the real patch rows as uint8 [N, 6912] (the reference's pixel values are exact multiples of
  1/255, checked here), and either the full uint8 patches (P = 70, most cases) or the first and last
  patch; patches are stored delta-encoded along pixel rows (`delta_encode`) because that compresses.
  Also the float32 value the reference produces for every uint8 value (x·float32(1/255)) and one batched
  call of several images.
- video.npz: for a small synthetic MP4, the sampled frame indices, timestamps, per-frame token count,
  positions, SHA-256 of all uint8 frame patches, the first frame's patches, and the x/255 float table.

Audio needs no fixture: its reference feature extractor has no torchvision dependency and is compared
live in tests/test_audio.py.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden"
BUDGETS = (70, 140, 280, 560, 1120)
FULL_PATCH_BUDGET = 70  # full uint8 patches are stored only at this budget (size limit on fixtures)
# ... and only for these cases; the others are checked by hash and sample rows only.
FULL_PATCH_SKIP = ("rgb_1920x1080", "rgb_3000x20", "rgb_7x500")

# ---------------------------------------------------------------------------------------------------------
# Deterministic inputs (imported by the tests)


def _pattern(h: int, w: int, seed: int, channels: int = 3, noise: int = 3) -> np.ndarray:
    """uint8 [h, w, channels]: gradients + a few rectangles/discs + seeded noise.

    Edges and noise exercise the resize kernel's rounding; smooth parts keep the stored fixtures small.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, channels), dtype=np.float64)
    for c in range(channels):
        a, b, phase = rng.uniform(-1, 1, size=3)
        img[..., c] = 128 + 90 * np.sin(a * 6 * xx / max(w, 1) + b * 6 * yy / max(h, 1) + phase * 3)
    for _ in range(4):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, x1 = min(h, y0 + int(rng.integers(1, h // 2 + 2))), min(w, x0 + int(rng.integers(1, w // 2 + 2)))
        img[y0:y1, x0:x1] = rng.integers(0, 256, size=channels)
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, max(h, w) / 3 + 1)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, size=channels)
    img += rng.integers(-noise, noise + 1, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def image_cases() -> dict[str, Callable[[], object]]:
    """name → builder of the input (a PIL image, or a numpy array for the array cases)."""

    def rgb(w, h, seed):
        return lambda: Image.fromarray(_pattern(h, w, seed))

    def grey():
        return Image.fromarray(_pattern(517, 333, 3, channels=1)[..., 0])  # 2-D uint8: L

    def palette():
        return Image.fromarray(_pattern(150, 200, 4)).quantize(colors=32, method=Image.Quantize.MEDIANCUT)

    def palette_transparent():
        img = Image.fromarray(_pattern(90, 70, 5)).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
        img.info["transparency"] = 3  # palette index 3 is fully transparent
        return img

    def rgba():
        arr = _pattern(300, 300, 6, channels=4)
        arr[..., 3] = np.linspace(0, 255, 300, dtype=np.float64).astype(np.uint8)[None, :]
        return Image.fromarray(arr)  # 4 channels: RGBA

    def la():
        arr = _pattern(90, 120, 7, channels=2)
        return Image.fromarray(arr)  # 2 channels: LA

    def i16():
        rng = np.random.default_rng(8)
        arr = rng.integers(0, 600, size=(80, 64)).astype(np.uint16)  # values above 255 saturate
        arr[:20] = np.arange(64, dtype=np.uint16)[None, :] * 4
        return Image.fromarray(arr)  # uint16: I;16

    def array_rgba_hwc():
        arr = _pattern(100, 130, 9, channels=4)
        arr[..., 3] = _pattern(100, 130, 10, channels=1, noise=40)[..., 0]
        return arr

    def array_rgb_chw():
        return np.ascontiguousarray(_pattern(70, 50, 11).transpose(2, 0, 1))

    def array_grey_hwc1():
        return _pattern(60, 90, 12, channels=1)

    def value_ramp():
        # 384×384 is already a 70-token grid (no resize), and every uint8 value occurs: for the float tables.
        v = (np.arange(384 * 384 * 3) % 256).astype(np.uint8)
        return Image.fromarray(v.reshape(384, 384, 3))

    return {
        "rgb_640x480": rgb(640, 480, 1),
        "rgb_1000x200": rgb(1000, 200, 2),
        "rgb_1920x1080": rgb(1920, 1080, 13),
        "rgb_224x224": rgb(224, 224, 14),
        "rgb_1x1": rgb(1, 1, 15),
        "rgb_3000x20": rgb(3000, 20, 16),
        "rgb_10000x10": rgb(10000, 10, 17),
        "rgb_7x500": rgb(7, 500, 18),
        "rgb_47x49": rgb(47, 49, 19),
        "grey_L": grey,
        "palette_P": palette,
        "palette_P_transparent": palette_transparent,
        "rgba": rgba,
        "la": la,
        "i16": i16,
        "array_rgba_hwc": array_rgba_hwc,
        "array_rgb_chw": array_rgb_chw,
        "array_grey_hwc1": array_grey_hwc1,
        "value_ramp": value_ramp,
    }


BATCH_CASES = ("rgb_640x480", "rgb_1x1", "la", "array_rgb_chw")
BATCH_BUDGET = 140

VIDEO_FRAMES, VIDEO_W, VIDEO_H, VIDEO_FPS = 40, 160, 120, 25


def video_frames() -> np.ndarray:
    """uint8 [40, 120, 160, 3]: a moving disc over drifting gradients, deterministic."""
    base = _pattern(VIDEO_H, VIDEO_W, 21, noise=4).astype(np.int16)
    yy, xx = np.mgrid[0:VIDEO_H, 0:VIDEO_W]
    frames = []
    for t in range(VIDEO_FRAMES):
        f = np.roll(base, shift=3 * t, axis=1).copy()
        f[(yy - 60) ** 2 + (xx - (10 + 3.5 * t)) ** 2 < 20**2] = (240 - 4 * t, 30 + 5 * t, 90)
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return np.stack(frames)


def make_video_bytes(codec: str = "mpeg4", container: str = "mp4", frames: np.ndarray | None = None,
                     fps: int = VIDEO_FPS) -> bytes:
    """Encode frames into an in-memory video file with PyAV (single-threaded, so the bytes are stable)."""
    import av

    frames = video_frames() if frames is None else frames
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p" if codec != "png" else "rgb24"
        stream.thread_count = 1
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


VIDEO_CONFIGS = {
    # name: kwargs for the sampler (reference: transformers.video_utils.load_video(backend="pyav", ...))
    "n32": {"num_frames": 32},
    "n8": {"num_frames": 8},
    "fps3": {"fps": 3},
}

# ---------------------------------------------------------------------------------------------------------
# Reference outputs (run in the reference venv only)


def sha256_u8(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.uint8).tobytes()).hexdigest()


def _to_uint8(values: np.ndarray, scale: str) -> np.ndarray:
    """Recover uint8 from reference floats and prove the floats are exactly the rescale of those bytes."""
    u8 = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
    if scale == "mul":
        back = u8.astype(np.float32) * np.float32(1 / 255)
    else:
        back = u8.astype(np.float32) / np.float32(255)
    assert np.array_equal(back, values), "reference pixel values are not exact rescaled uint8"
    return u8


def delta_encode(u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 6912] → differences of neighbouring pixels along each 48-px patch row, mod 256.

    Resized images are smooth, so the differences are small and compress far better than raw values.
    `delta_decode` (used by the tests) inverts it exactly.
    """
    px = u8.reshape(u8.shape[0], 48, 48, 3).astype(np.int16)
    return (np.diff(px, axis=2, prepend=0) % 256).astype(np.uint8).reshape(u8.shape)


def delta_decode(delta: np.ndarray) -> np.ndarray:
    px = delta.reshape(delta.shape[0], 48, 48, 3).astype(np.int64)
    return (np.cumsum(px, axis=2) % 256).astype(np.uint8).reshape(delta.shape)


def _sample_rows(u8: np.ndarray) -> np.ndarray:
    """The first and the last real patch (the last one shows the right/bottom edge handling)."""
    return delta_encode(np.stack([u8[0], u8[-1]]))


def _images(out: dict) -> None:
    from transformers import Gemma4UnifiedImageProcessor

    proc = Gemma4UnifiedImageProcessor()
    for name, build in image_cases().items():
        for p in BUDGETS:
            res = proc(images=[build()], max_soft_tokens=p, return_tensors="np")
            pv, pos = res["pixel_values"][0], res["image_position_ids"][0]
            n = int(res["num_soft_tokens_per_image"][0])
            assert pv.shape == (p, 6912) and pos.shape == (p, 2), (pv.shape, pos.shape)
            assert not pv[n:].any() and (pos[n:] == -1).all()
            u8 = _to_uint8(pv[:n], "mul")
            grid_w = int(pos[:n, 0].max()) + 1
            key = f"{name}|{p}"
            out[f"{key}|num"] = np.array(n)
            out[f"{key}|size"] = np.array([(n // grid_w) * 48, grid_w * 48])
            out[f"{key}|pos"] = pos.astype(np.int16)
            out[f"{key}|sha"] = np.array(sha256_u8(u8))
            if p == FULL_PATCH_BUDGET and name not in FULL_PATCH_SKIP:
                out[f"{key}|patches"] = delta_encode(u8)
            else:
                out[f"{key}|rows"] = _sample_rows(u8)
            if name == "value_ramp" and p == 70:
                table = np.zeros(256, np.float32)
                table[u8.reshape(-1)] = pv[:n].reshape(-1)
                assert n == 64 and len(np.unique(u8)) == 256
                out["rescale_table"] = table
        print("image", name, "done", file=sys.stderr)
    cases = image_cases()
    res = proc(images=[cases[c]() for c in BATCH_CASES], max_soft_tokens=BATCH_BUDGET, return_tensors="np")
    out["batch|num"] = np.array(res["num_soft_tokens_per_image"])
    out["batch|pixel_sha"] = np.array(hashlib.sha256(res["pixel_values"].astype(np.float32).tobytes()).hexdigest())
    out["batch|pos"] = res["image_position_ids"].astype(np.int16)
    out["batch|shape"] = np.array(res["pixel_values"].shape)


def _video(out: dict, tmp: Path) -> None:
    from transformers import Gemma4UnifiedVideoProcessor
    from transformers.video_utils import load_video

    data = make_video_bytes()
    path = tmp / "golden.mp4"
    path.write_bytes(data)
    out["file_sha"] = np.array(hashlib.sha256(data).hexdigest())
    proc = Gemma4UnifiedVideoProcessor()
    for name, kw in VIDEO_CONFIGS.items():
        frames, meta = load_video(str(path), backend="pyav", **kw)
        res = proc(videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="np")
        pv, pos = res["pixel_values_videos"], res["video_position_ids"]
        n = int(res["num_soft_tokens_per_video"][0])
        u8 = _to_uint8(pv[:, :n], "div")
        stamps = [f"{int(t // 60):02d}:{int(t % 60):02d}" for t in meta.timestamps]
        out[f"{name}|indices"] = np.asarray(meta.frames_indices, dtype=np.int64)
        out[f"{name}|fps"] = np.array(float(meta.fps))
        out[f"{name}|total"] = np.array(int(meta.total_num_frames))
        out[f"{name}|timestamps"] = np.array(stamps)
        out[f"{name}|num"] = np.array(n)
        out[f"{name}|pos"] = pos[0].astype(np.int16)
        out[f"{name}|sha"] = np.array(sha256_u8(u8))
        if name == "n8":
            out[f"{name}|frame0"] = delta_encode(u8[0])
    # The processor's own sampler on a decoded array (do_sample_frames=True) must pick the same frames.
    all_frames, meta = load_video(str(path), backend="pyav")
    res = proc(videos=[all_frames], video_metadata=[meta], num_frames=8, return_tensors="np", return_metadata=True)
    assert list(res["video_metadata"][0].frames_indices) == list(out["n8|indices"])
    assert sha256_u8(_to_uint8(res["pixel_values_videos"][:, : int(out["n8|num"])], "div")) == str(out["n8|sha"])
    # x/255 table for every uint8 value, from a frame that needs no resize at P=70.
    ramp = np.asarray(image_cases()["value_ramp"]())[None]
    res = proc(videos=[ramp], do_sample_frames=False, return_tensors="np")
    u8 = _to_uint8(res["pixel_values_videos"][0, :64], "div")
    table = np.zeros(256, np.float32)
    table[u8.reshape(-1)] = res["pixel_values_videos"][0, :64].reshape(-1)
    out["divide_table"] = table
    print("video done", file=sys.stderr)


def main() -> None:
    import tempfile

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    images: dict = {}
    _images(images)
    np.savez_compressed(OUT_DIR / "images.npz", **images)
    video: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        _video(video, Path(tmp))
    np.savez_compressed(OUT_DIR / "video.npz", **video)
    for f in sorted(OUT_DIR.glob("*.npz")):
        print(f"{f}: {f.stat().st_size / 1e6:.2f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
