"""Image preprocessing: golden conformance with the reference processor, loading, layout, bad inputs.

The golden outputs in tests/fixtures/golden/images.npz come from transformers' Gemma4UnifiedImageProcessor
(scripts/make_golden_fixtures.py, run in a torchvision venv); the inputs are rebuilt here from the same
deterministic builders, so nothing but reference outputs is committed.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unigemma.inputs.image import (
    PATCH_DIM,
    SOFT_TOKEN_BUDGETS,
    ImageFeatures,
    batch_images,
    budget_for_detail,
    check_budget,
    load_image,
    num_image_tokens,
    preprocess_image,
    target_size,
    to_rgb_tensor,
)
from unigemma.inputs.media import MediaError

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "images.npz"


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


def _uint8_rows(feat: ImageFeatures) -> np.ndarray:
    """The real rows as uint8, after proving the floats are exactly uint8 × float32(1/255)."""
    n = feat.num_tokens
    u8 = torch.round(feat.pixel_values[:n] * 255).to(torch.uint8)
    assert torch.equal(u8.to(torch.float32) * torch.tensor(1 / 255, dtype=torch.float32), feat.pixel_values[:n])
    return u8.numpy()


# ---------------------------------------------------------------------------------------------------------
# Golden conformance


@pytest.mark.parametrize("case", list(gen.image_cases()))
def test_matches_reference_processor(case, golden):
    build = gen.image_cases()[case]
    for p in gen.BUDGETS:
        key = f"{case}|{p}"
        feat = preprocess_image(build(), p)
        assert feat.pixel_values.shape == (p, PATCH_DIM) and feat.pixel_values.dtype == torch.float32
        assert feat.position_ids.shape == (p, 2) and feat.position_ids.dtype == torch.int64
        assert feat.num_tokens == int(golden[f"{key}|num"]), key
        assert list(feat.size) == golden[f"{key}|size"].tolist(), key
        assert np.array_equal(feat.position_ids.numpy(), golden[f"{key}|pos"]), key
        # padding slots: zero pixels
        assert not feat.pixel_values[feat.num_tokens :].any()
        u8 = _uint8_rows(feat)
        if hashlib.sha256(u8.tobytes()).hexdigest() != str(golden[f"{key}|sha"]):
            # Not bit-exact: report how far off, from whatever reference pixels are stored.
            if f"{key}|patches" in golden:
                ref, ours = gen.delta_decode(golden[f"{key}|patches"]), u8
            else:
                ref, ours = gen.delta_decode(golden[f"{key}|rows"]), u8[[0, -1]]
            diff = np.abs(ref.astype(int) - ours.astype(int))
            pytest.fail(
                f"{key}: pixels differ from the reference: max |diff| {diff.max()} (uint8) "
                f"in {np.count_nonzero(diff)} values"
            )


def test_rescale_is_float32_multiply(golden):
    # Every uint8 value, through the whole pipeline (no resize at P=70), equals the reference's float.
    feat = preprocess_image(gen.image_cases()["value_ramp"](), 70)
    u8 = _uint8_rows(feat).astype(np.int64)
    table = golden["rescale_table"]
    assert np.array_equal(feat.pixel_values[: feat.num_tokens].numpy(), table[u8])
    # ... and the multiply differs from a division for some values: the test can tell them apart.
    assert not np.array_equal(table, np.arange(256, dtype=np.float32) / np.float32(255))


def test_batch_matches_reference(golden):
    cases = gen.image_cases()
    values, positions, counts = batch_images([cases[c]() for c in gen.BATCH_CASES], gen.BATCH_BUDGET)
    assert list(values.shape) == golden["batch|shape"].tolist()
    assert counts == golden["batch|num"].tolist()
    assert np.array_equal(positions.numpy(), golden["batch|pos"])
    assert hashlib.sha256(values.numpy().tobytes()).hexdigest() == str(golden["batch|pixel_sha"])
    # Mixing already-preprocessed features gives the same batch.
    pre = preprocess_image(cases[gen.BATCH_CASES[0]](), gen.BATCH_BUDGET)
    again, _, _ = batch_images([pre] + [cases[c]() for c in gen.BATCH_CASES[1:]], gen.BATCH_BUDGET)
    assert torch.equal(again, values)
    with pytest.raises(ValueError, match="slots"):
        batch_images([pre], 70)


# ---------------------------------------------------------------------------------------------------------
# Size rule and layout


@pytest.mark.parametrize(
    "w, h, p, expect_w, expect_h, tokens",
    [
        (640, 480, 70, 432, 336, 63),
        (640, 480, 140, 624, 480, 130),
        (640, 480, 280, 912, 672, 266),
        (640, 480, 560, 1296, 960, 540),
        (640, 480, 1120, 1824, 1344, 1064),
        (1000, 200, 280, 1776, 336, 259),
        (480, 640, 280, 672, 912, 266),
        (224, 224, 280, 768, 768, 256),
        (48, 48, 280, 768, 768, 256),
        (1, 1, 70, 384, 384, 64),
        (1920, 1080, 1120, 2112, 1200, 1100),
        (4000, 50, 70, 3360, 48, 70),
        (4000, 50, 560, 10128, 96, 422),
        (10000, 10, 280, 13440, 48, 280),  # a side rounds to zero: the fallback branch
        (10, 10000, 280, 48, 13440, 280),
    ],
)
def test_target_size_spec_examples(w, h, p, expect_w, expect_h, tokens):
    assert target_size(h, w, p) == (expect_h, expect_w)
    assert num_image_tokens(h, w, p) == tokens


def test_token_count_never_exceeds_budget():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in np.exp(rng.uniform(0, np.log(20000), size=2)).round() + 1)
        for p in SOFT_TOKEN_BUDGETS:
            th, tw = target_size(h, w, p)
            assert th % 48 == 0 and tw % 48 == 0 and th > 0 and tw > 0
            assert (th // 48) * (tw // 48) <= p


def test_patch_layout_is_plain_crop_and_positions_are_xy():
    arr = gen._pattern(336, 432, seed=6)  # 7 × 9 = 63 tokens: the P=70 target of a 4:3 image, no resize
    assert target_size(336, 432, 70) == (336, 432)
    feat = preprocess_image(arr, 70)
    gh, gw = 7, 9
    assert feat.num_tokens == gh * gw
    rows = np.rint(feat.pixel_values.numpy() * 255).astype(np.uint8)
    for n in range(feat.num_tokens):
        x, y = feat.position_ids[n].tolist()
        assert n == y * gw + x  # raster order, (x, y) = (column, row)
        assert np.array_equal(rows[n], arr[48 * y : 48 * y + 48, 48 * x : 48 * x + 48].reshape(-1))
    assert feat.position_ids[10].tolist() == [1, 1]
    assert feat.position_ids[62].tolist() == [8, 6]
    assert (feat.position_ids[63:] == -1).all() and not feat.pixel_values[63:].any()


def test_budgets_and_detail():
    for p in SOFT_TOKEN_BUDGETS:
        assert check_budget(p) == p
    for bad in (0, 100, 281, True, "280"):
        with pytest.raises(MediaError, match="max_soft_tokens must be one of"):
            check_budget(bad)
    with pytest.raises(MediaError, match="max_soft_tokens"):
        preprocess_image(np.zeros((8, 8, 3), np.uint8), 300)
    assert budget_for_detail("low") == 70
    assert budget_for_detail("auto") == 280
    assert budget_for_detail(None) == 280
    assert budget_for_detail("HIGH") == 1120
    with pytest.raises(ValueError, match="detail"):
        budget_for_detail("medium")


# ---------------------------------------------------------------------------------------------------------
# Loading and colour conversion


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample():
    return Image.fromarray(gen._pattern(37, 53, seed=30))


def test_sources_agree(sample, tmp_path):
    data = _encode(sample, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    expected = np.array(sample)
    for src in (str(path), path, data, bytearray(data), b64, f"data:image/png;base64,{b64}", f"file://{path}", sample):
        got = to_rgb_tensor(src).permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), type(src)
    assert np.array_equal(to_rgb_tensor(expected).permute(1, 2, 0).numpy(), expected)  # HWC array
    assert np.array_equal(to_rgb_tensor(expected.transpose(2, 0, 1)).permute(1, 2, 0).numpy(), expected)  # CHW
    assert np.array_equal(to_rgb_tensor(torch.from_numpy(expected)).permute(1, 2, 0).numpy(), expected)
    grey = expected[..., 0]
    assert np.array_equal(to_rgb_tensor(grey).numpy(), np.stack([grey] * 3))  # 2-D = greyscale
    assert isinstance(load_image(expected), Image.Image)


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("GIF", {})])
def test_lossless_formats_round_trip(sample, fmt, kw):
    src = sample.quantize(64).convert("RGB") if fmt == "GIF" else sample
    got = to_rgb_tensor(_encode(src, fmt, **kw)).permute(1, 2, 0).numpy()
    assert np.array_equal(got, np.asarray(src))


def test_jpeg_and_lossy_webp(sample):
    for fmt in ("JPEG", "WEBP"):
        got = to_rgb_tensor(_encode(sample, fmt, quality=95)).permute(1, 2, 0).numpy().astype(int)
        assert got.shape == (37, 53, 3)
        assert np.abs(got - np.asarray(sample).astype(int)).mean() < 6


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    got = to_rgb_tensor(buf.getvalue())
    assert got[:, 0, 0].tolist() == [255, 0, 0] and (got == got[:, :1, :1]).all()


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = _encode(img, "JPEG", exif=exif, quality=98)
    loaded = load_image(data)
    assert loaded.size == (20, 40)  # portrait after transposition
    rgb = to_rgb_tensor(data).numpy().astype(int)  # (3, 40, 20)
    top, bottom = rgb[:, 5, 10], rgb[:, 35, 10]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    # Without the tag nothing rotates.
    assert load_image(_encode(img, "JPEG")).size == (40, 20)


def test_colour_conversions():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 40))
    assert to_rgb_tensor(rgba)[:, 0, 0].tolist() == [217, 218, 220]  # composited on white (spec §1.2)
    la = Image.new("LA", (2, 2), (77, 40))
    assert to_rgb_tensor(la)[:, 0, 0].tolist() == [227, 227, 227]
    assert to_rgb_tensor(Image.new("L", (2, 2), 9))[:, 1, 1].tolist() == [9, 9, 9]
    i16 = Image.fromarray(np.array([[1000, 3]], dtype=np.uint16))
    assert to_rgb_tensor(i16)[:, 0, :].tolist() == [[255, 3]] * 3  # 16-bit saturates
    opaque = np.full((2, 2, 4), 255, np.uint8)
    opaque[..., :3] = (1, 128, 254)
    assert to_rgb_tensor(opaque)[:, 0, 0].tolist() == [1, 128, 254]
    clear = np.zeros((2, 2, 4), np.uint8)
    assert to_rgb_tensor(clear)[:, 0, 0].tolist() == [255, 255, 255]


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "src, match",
    [
        (b"not an image at all" * 10, "not a readable image"),
        (_png_header_only(100_000, 100_000), "too many pixels|over the limit"),  # PIL's own bomb error
        (_png_header_only(12_000, 10_000), "over the limit"),  # under PIL's limit, over ours
        (b"", "empty"),
        ("data:image/png;base64,@@@@", "invalid base64"),
        ("bm90IGFuIGltYWdl!!", "no such file|base64"),
        ("/no/such/dir/image.png", "no such file"),
        ("https://example.com/cat.png", "remote URLs"),
        (np.zeros((0, 10, 3), np.uint8), "zero-size"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((10, 10, 7), np.uint8), "channel axis"),
        (np.zeros((2, 10, 10, 3), np.uint8), "2-D .* or 3-D"),
        (12345, "unsupported source type"),
    ],
)
def test_bad_inputs_raise_media_error(src, match):
    with pytest.raises(MediaError, match=match):
        preprocess_image(src)


def test_truncated_and_unsupported_formats(sample):
    png = _encode(sample, "PNG")
    with pytest.raises(MediaError, match="corrupt|truncated|cannot open"):
        preprocess_image(png[: len(png) // 2])
    tiff = _encode(sample, "TIFF")
    with pytest.raises(MediaError, match="supported formats"):
        preprocess_image(tiff)
    with pytest.raises(MediaError, match="over the limit"):
        load_image(png, max_pixels=100)
    with pytest.raises(MediaError, match="over the limit"):
        preprocess_image(sample, max_pixels=100)
    assert isinstance(MediaError("x"), ValueError)
