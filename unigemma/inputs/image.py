"""Images → soft-token inputs: loading, RGB conversion, budget-filling resize, 48×48 patches and positions.

Pipeline for one image (spec/preprocessing.md §1):

    source ──load_image──▶ PIL image ──to_rgb_tensor──▶ uint8 [3, H, W]
        ──target_size(H, W, P)──▶ (H', W'), multiples of 48 filling the budget of P soft tokens
        ──resize_uint8 (antialiased bicubic, uint8 → uint8)──▶ uint8 [3, H', W']
        ──patchify──▶ uint8 [N, 6912]  (48×48×3 crops in raster order, each flattened (row, col, channel))
        ──× float32(1/255), pad to P rows──▶ ImageFeatures(pixel_values [P, 6912], position_ids [P, 2], N)

The output matches the reference processor (transformers `Gemma4UnifiedImageProcessor`) bit for bit:
the resize is the same torch kernel torchvision calls for uint8 CPU images, and the golden tests in
tests/test_image.py check that against stored reference outputs.

What this module does not do: embed patches (model/vision.py), insert placeholder tokens into the prompt
(inputs/prompt.py), or fetch remote images (server/media.py).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .media import MediaError, MediaSource, describe_source, read_source

__all__ = [
    "SOFT_TOKEN_BUDGETS",
    "DEFAULT_MAX_SOFT_TOKENS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "DEFAULT_MAX_DECODED_BYTES",
    "check_positions",
    "PATCH_SIZE",
    "PATCH_DIM",
    "ImageFeatures",
    "ImageInput",
    "check_budget",
    "budget_for_detail",
    "load_image",
    "to_rgb_tensor",
    "target_size",
    "num_image_tokens",
    "resize_uint8",
    "patchify",
    "grid_positions",
    "preprocess_image",
    "batch_images",
    "model_image_spec",
    "FAMILY_PATCH_SIZE",
]

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_MAX_SOFT_TOKENS = 280
# One soft token = a 3×3 group of 16-px teacher patches = a 48×48 pixel crop.
_TEACHER_PATCH = 16
_POOL = 3
PATCH_SIZE = _TEACHER_PATCH * _POOL  # 48
PATCH_DIM = PATCH_SIZE * PATCH_SIZE * 3  # 6912
# The family's vision encoders (gemma4 vision_config) take the 16-px patches themselves and pool 3×3 of them into
# one soft token: the same resized image, cut finer (transformers `Gemma4ImageProcessor`).
FAMILY_PATCH_SIZE = _TEACHER_PATCH
# 50 megapixels: above any phone camera's default output, far below what would exhaust memory while
# decoding (50 MP RGB is 150 MB as uint8). Decompression bombs (tiny files claiming huge sizes) are
# refused from the header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 50_000_000
# A side limit and a decoded-size limit, both read from the header: a 1×49,000,000 PNG is under the pixel
# limit and ~95 KB on disk, but decoding and resizing it took >10 GB and most of a minute.
DEFAULT_MAX_SIDE = 16_384
DEFAULT_MAX_DECODED_BYTES = 256 * 1024 * 1024
# Bytes per pixel of PIL modes once decoded (unknown modes count as 4, the widest common one).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
               "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}
# Formats we decode; everything PIL could open beyond these (e.g. PSD, EPS via ghostscript) is refused
# to keep the attack surface small (multi-picture JPEGs from cameras open through the JPEG plugin).
_ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB"})
# float32(1/255): the reference rescales with a float32 multiply, not a division (spec §1.4).
_RESCALE = torch.tensor(1.0 / 255.0, dtype=torch.float32)

ImageInput = Union[MediaSource, Image.Image, np.ndarray, torch.Tensor]


@dataclass
class ImageFeatures:
    """One preprocessed image.

    pixel_values: float32 [P·r, 3·s²] for s-px patches (unified: s = 48, r = 1 → [P, 6912]; family: s = 16,
        r = 9 → [9P, 768]); rows past the real patches are 0.0.
    position_ids: int64 [P·r, 2], (x, y) = (column, row) of each patch; padding rows are (-1, -1).
    num_tokens: real soft tokens (N <= P); the prompt gets BOI + N × IMAGE + EOI.
    size: (H', W') the image was resized to.
    rows_per_token: r, patches per soft token (the family's encoder pools 3×3 patches into one token).
    """

    pixel_values: torch.Tensor
    position_ids: torch.Tensor
    num_tokens: int
    size: tuple[int, int]
    rows_per_token: int = 1


def check_budget(max_soft_tokens: int) -> int:
    """Return `max_soft_tokens` if it is one of the supported budgets, else raise MediaError (a ValueError)."""
    if isinstance(max_soft_tokens, bool) or max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise MediaError(f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens!r}")
    return int(max_soft_tokens)


_DETAIL_BUDGETS = {"low": 70, "auto": DEFAULT_MAX_SOFT_TOKENS, "high": 1120}


def budget_for_detail(detail: str | None, default: int = DEFAULT_MAX_SOFT_TOKENS) -> int:
    """Map the OpenAI `image_url.detail` field to a soft-token budget: low 70, high 1120, auto/None `default` (the
    model's own default: its processor config's max_soft_tokens, else 280)."""
    if detail is None:
        return default
    key = str(detail).lower()
    if key not in _DETAIL_BUDGETS:
        raise ValueError(f"image detail must be one of 'low', 'auto', 'high', got {detail!r}")
    return default if key == "auto" else _DETAIL_BUDGETS[key]


# ---------------------------------------------------------------------------------------------------------
# Loading and colour conversion


def load_image(src: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
               max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Image.Image:
    """Open an image from a path, bytes, data URI, base64 string, PIL image or uint8 array.

    Encoded sources must be PNG, JPEG, WebP, GIF (first frame) or BMP; their EXIF orientation is applied.
    In-memory PIL images are used as given (the reference processor does not rotate them either).
    Arrays are converted with `Image.fromarray` after the same checks `to_rgb_tensor` makes; pass arrays
    straight to `preprocess_image` to keep the reference's array handling exactly.

    Raises MediaError for unreadable/corrupt data, an unsupported format, a zero-size image, or more than
    `max_pixels` pixels (checked from the header before decoding, which stops decompression bombs).
    """
    if isinstance(src, Image.Image):
        _check_pixels(src.width, src.height, max_pixels)
        return src
    if isinstance(src, (np.ndarray, torch.Tensor)):
        chw = _array_to_chw(src, max_pixels)
        hwc = chw.permute(1, 2, 0).numpy()
        return Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    data = read_source(src, what="image")
    label = describe_source(src)
    fp = io.BytesIO(data) if isinstance(data, bytes) else data
    with warnings.catch_warnings():
        # PIL warns (and past 2× its own limit, raises) on huge images; we apply our own limit instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp, formats=sorted(_ALLOWED_FORMATS))
        except Image.DecompressionBombError as exc:
            raise MediaError(f"image {label}: too many pixels ({exc}); the limit is {max_pixels}") from None
        except UnidentifiedImageError:
            raise MediaError(
                f"image {label}: not a readable image, or not one of the supported formats "
                "(PNG, JPEG, WebP, GIF, BMP)"
            ) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise MediaError(f"image {label}: cannot open ({exc})") from None
        with img:  # closes the file; the result below is a new image
            _check_pixels(img.width, img.height, max_pixels, label)
            _check_header(img, max_side, max_decoded_bytes, label)
            try:
                img.seek(0)  # animated GIF / WebP: the first frame
                img.load()
                # A new image, rotated per the EXIF orientation tag (or a plain copy without one).
                out = ImageOps.exif_transpose(img)
            except Image.DecompressionBombError as exc:
                raise MediaError(f"image {label}: too many pixels ({exc}); the limit is {max_pixels}") from None
            except (OSError, ValueError, SyntaxError, EOFError, KeyError, TypeError, struct.error) as exc:
                # Truncated data, bad chunks, malformed EXIF: PIL reports them through all of these.
                raise MediaError(f"image {label}: corrupt or truncated image data ({exc})") from None
    return out


def _check_pixels(width: int, height: int, max_pixels: int, label: str = "") -> None:
    where = f"image {label}: " if label else "image: "
    if width <= 0 or height <= 0:
        raise MediaError(f"{where}zero-size image ({width}×{height}); width and height must be at least 1")
    if width * height > max_pixels:
        raise MediaError(
            f"{where}{width}×{height} = {width * height} pixels is over the limit of {max_pixels} "
            "(raise max_pixels if this image is legitimate)"
        )


def _check_header(img: Image.Image, max_side: int, max_decoded_bytes: int, label: str = "") -> None:
    """Limits read from an opened (not yet decoded) image's header: its longer side and its decoded size."""
    where = f"image {label}: " if label else "image: "
    if max(img.width, img.height) > max_side:
        raise MediaError(f"{where}{img.width}×{img.height} has a side over the limit of {max_side} pixels "
                         "(resize it first; the model sees at most a few thousand pixels a side anyway)")
    decoded = img.width * img.height * _MODE_BYTES.get(img.mode, 4)
    if decoded > max_decoded_bytes:
        raise MediaError(f"{where}{img.width}×{img.height} in mode {img.mode} decodes to {decoded} bytes, over the "
                         f"limit of {max_decoded_bytes} bytes")


def check_positions(features: "ImageFeatures", table_size: int, what: str = "image") -> None:
    """Refuse an image whose patch grid is wider or taller than the model's position-embedding table.

    Very elongated images (e.g. 50000×1) become a one-patch-high strip of up to `max_soft_tokens` patches; a
    model whose table is shorter than that (small or custom configs) cannot embed them. A clear 400 here
    instead of an IndexError in the vision embedder."""
    if features.num_tokens == 0:
        return
    grid = features.position_ids[: features.num_tokens * features.rows_per_token]
    longest = int(grid.max()) + 1
    if longest > table_size:
        h, w = features.size
        raise MediaError(f"{what}: resized to {h}×{w} pixels it is {longest} patches along one side, but this model "
                         f"embeds at most {table_size} patch positions per side; use a less elongated image or a "
                         "smaller max_soft_tokens")


def to_rgb_tensor(img: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
                  max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> torch.Tensor:
    """Any image input → contiguous uint8 [3, H, W] RGB, converted exactly as the reference does.

    PIL images: transparency (an alpha band or a `transparency` entry) is composited onto white with PIL's
    integer alpha compositing; everything else goes through PIL's own RGB conversion (greyscale is
    replicated, palettes expanded, 16-bit "I;16" saturates at 255).
    Arrays / tensors (uint8, HWC or CHW with 1, 3 or 4 channels, or 2-D greyscale): one channel is
    replicated, four channels are alpha-composited onto white in float32 as torchvision does.
    """
    if isinstance(img, (np.ndarray, torch.Tensor)):
        return _array_to_chw(img, max_pixels, composite=True)
    pil = load_image(img, max_pixels=max_pixels, max_side=max_side, max_decoded_bytes=max_decoded_bytes)
    try:
        if "A" in pil.getbands() or pil.info.get("transparency") is not None:
            rgba = pil.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = pil.convert("RGB")
        hwc = np.asarray(rgb)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MediaError(f"image: cannot convert mode {pil.mode!r} to RGB ({exc})") from None
    return torch.from_numpy(hwc.copy()).permute(2, 0, 1).contiguous()


def _array_to_chw(arr: np.ndarray | torch.Tensor, max_pixels: int, composite: bool = False) -> torch.Tensor:
    if isinstance(arr, np.ndarray):
        # torch refuses to share read-only memory (e.g. np.asarray of a PIL image): copy those.
        arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr, order="C")
        t = torch.from_numpy(arr)
    else:
        t = arr.detach().cpu()
    if t.dtype != torch.uint8:
        raise MediaError(
            f"image array must have dtype uint8 (values 0..255), got {t.dtype}; "
            "convert floats with (x * 255).round().astype(np.uint8)"
        )
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise MediaError(f"image array must be 2-D (H, W) or 3-D (H, W, C) / (C, H, W), got shape {tuple(t.shape)}")
    # Channel axis as the reference infers it: the first axis wins when both ends could be channels.
    if t.shape[0] in (1, 3, 4):
        chw = t
    elif t.shape[-1] in (1, 3, 4):
        chw = t.permute(2, 0, 1)
    else:
        raise MediaError(
            f"image array of shape {tuple(t.shape)} has no channel axis of size 1, 3 or 4 at either end"
        )
    _check_pixels(chw.shape[2], chw.shape[1], max_pixels)
    chw = chw.contiguous()
    if not composite:
        return chw
    if chw.shape[0] == 1:
        return chw.expand(3, -1, -1).contiguous()
    if chw.shape[0] == 4:
        # Straight alpha over white, in float32: rgb·a + (1 − a); back to uint8 by scaling with 255.999
        # and truncating (torchvision's float→uint8 rule, which the reference uses for arrays).
        x = chw.to(torch.float32).mul_(1.0 / 255.0)
        rgb, alpha = x[:3], x[3:]
        out = rgb * alpha + (1 - alpha)
        return out.mul(255.0 + 1.0 - 1e-3).to(torch.uint8).contiguous()
    return chw


# ---------------------------------------------------------------------------------------------------------
# Size rule, resize, patches


def target_size(height: int, width: int, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS) -> tuple[int, int]:
    """The (H', W') an H×W image is resized to: aspect kept, multiples of 48, ≤ P soft tokens (spec §1.3).

    The scale factor fills the pixel budget P·9·16² as closely as whole 48-px patches allow, up or down.
    A side that would round to zero becomes one patch, and the other side then follows the integer aspect
    ratio (capped at P patches).
    """
    check_budget(max_soft_tokens)
    if height <= 0 or width <= 0:
        raise MediaError(f"image size must be positive, got {height}×{width} (H×W)")
    max_patches = max_soft_tokens * _POOL * _POOL
    target_px = max_patches * _TEACHER_PATCH * _TEACHER_PATCH
    scale = math.sqrt(target_px / (height * width))
    new_h = math.floor(scale * height / PATCH_SIZE) * PATCH_SIZE
    new_w = math.floor(scale * width / PATCH_SIZE) * PATCH_SIZE
    longest = max_soft_tokens * PATCH_SIZE
    if new_h == 0 and new_w == 0:  # impossible: scale²·H·W = target_px ≥ 48²
        raise MediaError(f"image {height}×{width} cannot be resized to a non-empty patch grid")
    if new_h == 0:
        new_h, new_w = PATCH_SIZE, min((width // height) * PATCH_SIZE, longest)
    elif new_w == 0:
        new_h, new_w = min((height // width) * PATCH_SIZE, longest), PATCH_SIZE
    assert new_h * new_w <= target_px, (height, width, new_h, new_w)
    return new_h, new_w


def num_image_tokens(height: int, width: int, max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS) -> int:
    """Soft tokens an H×W image becomes at budget P (without BOI/EOI)."""
    new_h, new_w = target_size(height, width, max_soft_tokens)
    return (new_h // PATCH_SIZE) * (new_w // PATCH_SIZE)


def resize_uint8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 [..., C, H, W] to [..., C, height, width], uint8 out.

    torch's CPU kernel for uint8 antialiased bicubic rounds and clamps internally; it is the kernel
    torchvision's `resize(..., BICUBIC, antialias=True)` dispatches to for uint8 CPU tensors, hence the
    bit-exact match with the reference. (On other devices torchvision goes through float32, so we always
    resize on the CPU.) Same size in and out returns the input untouched, as the reference does.
    """
    *lead, c, h, w = images.shape
    if (h, w) == (height, width):
        return images
    flat = images.detach().cpu().reshape(-1, c, h, w).contiguous()  # (B, C, H, W)
    out = F.interpolate(flat, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    return out.reshape(*lead, c, height, width)


def patchify(images: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """uint8 or float [..., 3, H, W] (H, W multiples of s = patch_size) → [..., N, 3·s²] in raster order.

    Row n = Y·(W/s) + X holds the s×s crop at (row Y, column X), flattened (row, column, channel).
    """
    *lead, c, h, w = images.shape
    s = patch_size
    assert h % s == 0 and w % s == 0 and c == 3, images.shape
    gh, gw = h // s, w // s
    x = images.reshape(*lead, c, gh, s, gw, s)  # (..., C, Y, r, X, c)
    nd = len(lead)
    perm = [*range(nd), nd + 1, nd + 3, nd + 2, nd + 4, nd]  # (..., Y, X, r, c, C)
    return x.permute(*perm).reshape(*lead, gh * gw, 3 * s * s)


def grid_positions(grid_h: int, grid_w: int) -> torch.Tensor:
    """int64 [grid_h·grid_w, 2] of (x, y) in raster order: (0,0), (1,0), …, (grid_w−1, grid_h−1)."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1).to(torch.int64)


def pad_rows(values: torch.Tensor, positions: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [..., N, D] values with zeros and [..., N, 2] positions with −1 up to `slots` rows."""
    missing = slots - values.shape[-2]
    assert missing >= 0, (values.shape, slots)
    if missing:
        values = F.pad(values, (0, 0, 0, missing), value=0.0)
        positions = F.pad(positions, (0, 0, 0, missing), value=-1)
    return values, positions


def preprocess_image(
    img: ImageInput,
    max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    patch_size: int = PATCH_SIZE,
) -> ImageFeatures:
    """Any image input → ImageFeatures padded to `max_soft_tokens` soft tokens (see the module docstring).

    patch_size 48: the unified model's patches (one per soft token). patch_size 16 (`FAMILY_PATCH_SIZE`): the
    family's encoder input — the same resized image in 16-px patches, 9 per soft token, padded to 9·P rows, as
    transformers' `Gemma4ImageProcessor` makes it (golden test: tests/test_family_vision.py)."""
    check_budget(max_soft_tokens)
    if patch_size not in (PATCH_SIZE, FAMILY_PATCH_SIZE):
        raise ValueError(f"patch_size must be {PATCH_SIZE} (gemma4_unified) or {FAMILY_PATCH_SIZE} (gemma4), "
                         f"got {patch_size}")
    per_token = (PATCH_SIZE // patch_size) ** 2
    chw = to_rgb_tensor(img, max_pixels=max_pixels, max_side=max_side, max_decoded_bytes=max_decoded_bytes)
    new_h, new_w = target_size(chw.shape[1], chw.shape[2], max_soft_tokens)
    resized = resize_uint8(chw, new_h, new_w)
    patches = patchify(resized, patch_size)  # (N·r, 3·s²) uint8
    values = patches.to(torch.float32) * _RESCALE
    positions = grid_positions(new_h // patch_size, new_w // patch_size)
    n = values.shape[0] // per_token
    values, positions = pad_rows(values, positions, max_soft_tokens * per_token)
    return ImageFeatures(values.contiguous(), positions.contiguous(), n, (new_h, new_w), per_token)


def model_image_spec(config) -> tuple[int, int]:
    """(patch_size, position-table size) of a model's image input: 48 and `mm_posemb_size` for gemma4_unified,
    16 and `position_embedding_size` for a family model's vision encoder. MediaError for a model without vision."""
    tower = getattr(config, "vision_tower", None)
    if tower is not None:
        if (tower.patch_size, tower.pooling_kernel_size) != (FAMILY_PATCH_SIZE, _POOL):
            raise MediaError(f"this model's vision encoder uses {tower.patch_size}-px patches pooled "
                             f"{tower.pooling_kernel_size}×{tower.pooling_kernel_size}; the image processor supports "
                             f"{FAMILY_PATCH_SIZE}-px patches pooled {_POOL}×{_POOL} (the published geometry) only")
        return FAMILY_PATCH_SIZE, tower.position_embedding_size
    if getattr(config, "vision", None) is None:
        raise MediaError("this model has no vision_config: it cannot take images or video")
    return PATCH_SIZE, config.vision.mm_posemb_size


def batch_images(
    images: Sequence[ImageInput | ImageFeatures],
    max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_size: int = PATCH_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Preprocess and stack images like the reference processor's batched output.

    Returns pixel_values float32 [N, P, 6912], image_position_ids int64 [N, P, 2] and the soft-token count
    of each image. Already preprocessed ImageFeatures may be mixed in; all must share the budget P.
    """
    check_budget(max_soft_tokens)
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image")
    feats = [
        f if isinstance(f, ImageFeatures)
        else preprocess_image(f, max_soft_tokens, max_pixels=max_pixels, patch_size=patch_size)
        for f in images
    ]
    for i, f in enumerate(feats):
        if f.pixel_values.shape[0] != max_soft_tokens * f.rows_per_token:
            raise ValueError(f"image {i} was preprocessed with {f.pixel_values.shape[0] // f.rows_per_token} "
                             f"soft-token slots, expected {max_soft_tokens}")
    pixel_values = torch.stack([f.pixel_values for f in feats])
    position_ids = torch.stack([f.position_ids for f in feats])
    return pixel_values, position_ids, [f.num_tokens for f in feats]
