"""Golden outputs of the family's image and video processors (transformers 5.24.0 `Gemma4ImageProcessor` /
`Gemma4VideoProcessor`, the torchvision backends that `AutoProcessor` picks) → tests/fixtures/golden/
family_images.npz and family_video.npz.

Runs in the reference venv described in scripts/make_golden_fixtures.py (torchvision does not import beside the
main environment's CPU torch):

    /tmp/refenv/bin/python scripts/make_family_golden.py

The inputs are the image cases of make_golden_fixtures.image_cases() (odd sizes, extreme aspect ratios, palette /
alpha / 16-bit / array inputs), each at every budget (70, 140, 280, 560, 1120), plus one batched call. Stored per
case and budget: the soft-token count, the resized size, and SHA-256 digests of the exact float32 `pixel_values`
and int64 `image_position_ids` arrays (padding included), so the test is bit-exact while the file stays small;
for the cases of a few patches the full uint8 patches are stored too, to show where a difference is.
Video: the small synthetic MP4 of make_golden_fixtures.make_video_bytes(), sampled by transformers' `load_video`
(PyAV) for each of its VIDEO_CONFIGS, then the video processor at its default budget (70): sampled indices,
timestamps, soft tokens per frame and digests of `pixel_values_videos` / `video_position_ids`.
Regenerating gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "tests" / "fixtures" / "golden" / "family_images.npz"
OUT_VIDEO = OUT.with_name("family_video.npz")
BUDGETS = (70, 140, 280, 560, 1120)
FULL_CASES = ("rgb_1x1",)  # uint8 patches stored in full at budget 70 (a flat colour: compresses to little)
BATCH_CASES = ("rgb_640x480", "rgb_1x1", "la", "array_rgb_chw")
BATCH_BUDGET = 140


def _generator():
    spec = importlib.util.spec_from_file_location("make_golden_fixtures", HERE / "make_golden_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def main() -> None:
    from transformers import Gemma4ImageProcessor

    gen = _generator()
    cases = gen.image_cases()
    proc = Gemma4ImageProcessor()
    out: dict[str, np.ndarray] = {}
    for name, build in cases.items():
        for p in BUDGETS:
            res = proc(images=[build()], max_soft_tokens=p, return_tensors="np")
            pv = res["pixel_values"].astype(np.float32)[0]
            pos = res["image_position_ids"].astype(np.int64)[0]
            n = int(res["num_soft_tokens_per_image"][0])
            assert pv.shape == (9 * p, 768) and pos.shape == (9 * p, 2), (pv.shape, pos.shape)
            real = 9 * n
            grid_w = int(pos[:real, 0].max()) + 1
            key = f"{name}|{p}"
            out[f"{key}|num"] = np.array(n)
            out[f"{key}|size"] = np.array([(real // grid_w) * 16, grid_w * 16])
            out[f"{key}|pixel_sha"] = np.array(sha(pv))
            out[f"{key}|pos_sha"] = np.array(sha(pos))
            if p == 70 and name in FULL_CASES:
                out[f"{key}|patches"] = np.rint(pv[:real].astype(np.float64) * 255).astype(np.uint8)
        print("family image", name, "done", file=sys.stderr)
    res = proc(images=[cases[c]() for c in BATCH_CASES], max_soft_tokens=BATCH_BUDGET, return_tensors="np")
    out["batch|num"] = np.array(res["num_soft_tokens_per_image"])
    out["batch|shape"] = np.array(res["pixel_values"].shape)
    out["batch|pixel_sha"] = np.array(sha(res["pixel_values"].astype(np.float32)))
    out["batch|pos_sha"] = np.array(sha(res["image_position_ids"].astype(np.int64)))
    np.savez_compressed(OUT, **out)
    print("wrote", OUT, OUT.stat().st_size, "bytes", file=sys.stderr)
    _video(gen)


def _video(gen) -> None:
    import tempfile

    from transformers import Gemma4VideoProcessor
    from transformers.video_utils import load_video

    out: dict[str, np.ndarray] = {}
    data = gen.make_video_bytes()
    out["file_sha"] = np.array(hashlib.sha256(data).hexdigest())
    proc = Gemma4VideoProcessor()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "golden.mp4"
        path.write_bytes(data)
        for name, kw in gen.VIDEO_CONFIGS.items():
            frames, meta = load_video(str(path), backend="pyav", **kw)
            res = proc(videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="np")
            pv = res["pixel_values_videos"].astype(np.float32)
            pos = res["video_position_ids"].astype(np.int64)
            out[f"{name}|indices"] = np.asarray(meta.frames_indices, dtype=np.int64)
            out[f"{name}|timestamps"] = np.array([f"{int(t // 60):02d}:{int(t % 60):02d}" for t in meta.timestamps])
            out[f"{name}|num"] = np.array(int(res["num_soft_tokens_per_video"][0]))
            out[f"{name}|shape"] = np.array(pv.shape)
            out[f"{name}|pixel_sha"] = np.array(sha(pv))
            out[f"{name}|pos_sha"] = np.array(sha(pos))
    np.savez_compressed(OUT_VIDEO, **out)
    print("wrote", OUT_VIDEO, OUT_VIDEO.stat().st_size, "bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
