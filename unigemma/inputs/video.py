"""Video → soft-token inputs: PyAV decoding, uniform frame sampling, "mm:ss" timestamps, per-frame patches.

Pipeline (spec/preprocessing.md §3):

    source ──PyAV──▶ total frame count T and frame rate (container metadata, as the reference reads them)
        ──sample_indices(T, num_frames | fps)──▶ indices i·T // n
        ──decode those frames as RGB──▶ uint8 [F, H, W, 3]
        ──per frame, the image rules with P = 70 (resize to target_size, 48×48 patches, positions)
        ──÷ 255 (true division: the video processor fuses rescale with an identity normalise)──▶ VideoFeatures

Each sampled frame becomes `"mm:ss " + BOI + VIDEO × N + EOI` in the prompt (inputs/prompt.py does that;
this module gives it the timestamps and N).

Choices where the reference raises or is silent (documented in `load_video`):
- A video with fewer frames than requested uses all of its frames (the reference raises).
- An explicit `num_frames` above `max_frames` is an error; an fps-derived count is clamped to `max_frames`
  (a rate is a request for coverage, so uniform sampling over the clamp keeps that).
- Unknown frame rate: timestamps use 24 fps (as the reference's prompt builder does); fps-based sampling
  needs the rate and raises.

What this module does not do: decode the audio track (use inputs/audio.py on the same file), fetch URLs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .image import (
    FAMILY_PATCH_SIZE,
    PATCH_SIZE,
    check_budget,
    grid_positions,
    pad_rows,
    patchify,
    resize_uint8,
    target_size,
)
from .media import MediaError, MediaSource, describe_source, read_source

__all__ = [
    "DEFAULT_NUM_FRAMES",
    "DEFAULT_VIDEO_SOFT_TOKENS",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_FPS_IF_UNKNOWN",
    "VideoFeatures",
    "VideoInput",
    "sample_indices",
    "format_timestamp",
    "decode_video",
    "preprocess_frames",
    "load_video",
    "batch_videos",
]

DEFAULT_NUM_FRAMES = 32
DEFAULT_VIDEO_SOFT_TOKENS = 70
DEFAULT_MAX_FRAMES = 128  # 128 frames × (70 + 2) tokens ≈ 9k prompt tokens: a sane ceiling per video
DEFAULT_MAX_SECONDS = 1800.0  # frames are decoded in order, so very long videos cost decode time
DEFAULT_MAX_FRAME_PIXELS = 3840 * 2160  # 4K UHD
DEFAULT_FPS_IF_UNKNOWN = 24.0
# FFmpeg demuxers we open (names as PyAV reports them). Keeping a list narrows what untrusted bytes can
# reach inside FFmpeg; MP4/MOV, WebM/Matroska, AVI, MPEG-TS and animated GIF cover real use.
_ALLOWED_DEMUXERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "gif"})

# An encoded source, or already decoded frames: uint8 [F, H, W, 3] alone (fps unknown) or (frames, fps).
VideoInput = Union[MediaSource, np.ndarray, "tuple[np.ndarray, float]"]


@dataclass
class VideoFeatures:
    """One preprocessed video.

    pixel_values: float32 [F, P, 6912] (frame f, patch slot n); slots >= num_tokens_per_frame are 0.0.
    position_ids: int64 [F, P, 2], (x, y) per patch, (−1, −1) for padding slots.
    timestamps: "mm:ss" of each sampled frame (index / fps, truncated).
    frame_indices: the sampled frame numbers in the source video.
    fps: the source frame rate, or None when unknown (timestamps then assume 24).
    total_frames: frames in the source.
    size: (H', W') every frame was resized to.
    """

    pixel_values: torch.Tensor
    position_ids: torch.Tensor
    timestamps: list[str]
    num_tokens_per_frame: int
    frame_indices: list[int]
    fps: float | None
    total_frames: int
    size: tuple[int, int]

    @property
    def num_frames(self) -> int:
        return self.pixel_values.shape[0]


def sample_indices(
    total_frames: int,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> list[int]:
    """Frame indices to keep: n uniform picks `i · total // n` for i < n.

    n is `num_frames` (default 32), or `max(1, int(total / video_fps · fps))` when `fps` is given.
    Fewer frames than n: every frame is used. An explicit n over `max_frames` raises; an fps-derived n is
    clamped to `max_frames`.
    """
    if total_frames <= 0:
        raise MediaError("video has no frames")
    if num_frames is not None and fps is not None:
        raise ValueError("num_frames and fps are mutually exclusive; pass only one")
    if max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    if fps is not None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        if not video_fps:
            raise MediaError("cannot sample by fps: the video's frame rate is unknown; pass num_frames instead")
        n = min(max(1, int(total_frames / video_fps * fps)), max_frames)
    else:
        n = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        if n > max_frames:
            raise MediaError(f"num_frames={n} is over the limit of {max_frames} frames per video")
    if n >= total_frames:
        return list(range(total_frames))
    return [i * total_frames // n for i in range(n)]


def format_timestamp(seconds: float) -> str:
    """Seconds → "mm:ss", both parts truncated; minutes are not folded into hours (75 min → "75:00")."""
    minutes, secs = int(seconds // 60), int(seconds % 60)
    return f"{minutes:02d}:{secs:02d}"


# ---------------------------------------------------------------------------------------------------------
# Decoding


def decode_video(
    src: MediaSource,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
) -> tuple[np.ndarray, list[int], float | None, int]:
    """Decode the sampled frames of an encoded video.

    Returns (frames uint8 [F, H, W, 3], frame indices, source fps or None, total frames). The frame count
    and rate come from the container (`frames`, `average_rate`) as in the reference; when the container
    does not record a count, packets are counted, and when it overstates it, sampling is redone over the
    frames that actually decode.
    """
    data = read_source(src, what="video")
    label = describe_source(src)
    try:
        total, video_fps = _probe(data, label, max_seconds, max_frame_pixels)
        indices = sample_indices(total, num_frames=num_frames, fps=fps, video_fps=video_fps, max_frames=max_frames)
        frames, decoded = _decode_frames(data, indices)
        if len(frames) < len(indices):
            # The container claimed more frames than it holds: sample again over what really decodes.
            total = decoded
            indices = sample_indices(total, num_frames=num_frames, fps=fps, video_fps=video_fps, max_frames=max_frames)
            frames, _ = _decode_frames(data, indices)
    except MediaError:
        raise
    except Exception as exc:  # noqa: BLE001 - FFmpeg errors come in many types; all mean unreadable input
        raise MediaError(f"video {label}: cannot decode ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise MediaError(f"video {label}: no frame could be decoded")
    return np.stack(frames), indices, video_fps, total


def _open(data: Path | bytes):
    import av

    return av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data), mode="r")


def _probe(data: Path | bytes, label: str, max_seconds: float, max_frame_pixels: int) -> tuple[int, float | None]:
    import av

    try:
        container = _open(data)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"video {label}: not a readable video file ({exc})") from None
    with container:
        if container.format.name not in _ALLOWED_DEMUXERS:
            raise MediaError(
                f"video {label}: container {container.format.name!r} is not supported; use MP4, MOV, WebM/MKV, AVI"
            )
        if not container.streams.video:
            raise MediaError(f"video {label}: the file has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise MediaError(f"video {label}: frame size {width}×{height} is not valid")
        if width * height > max_frame_pixels:
            raise MediaError(
                f"video {label}: frames of {width}×{height} are over the limit of {max_frame_pixels} pixels"
            )
        video_fps = float(stream.average_rate) if stream.average_rate else None
        total = int(stream.frames or 0)
        if total <= 0:
            # Matroska/WebM usually store no frame count: count the video packets instead.
            total = sum(1 for packet in container.demux(stream) if packet.size > 0)
    if total <= 0:
        raise MediaError(f"video {label}: the video stream holds no frames")
    if video_fps and total / video_fps > max_seconds:
        raise MediaError(f"video {label}: {total / video_fps:.1f} s is longer than the limit of {max_seconds:g} s")
    return total, video_fps


def _decode_frames(data: Path | bytes, indices: list[int]) -> tuple[list[np.ndarray], int]:
    """RGB frames at `indices` (sorted) in decode order, and how many frames were decoded."""
    wanted = set(indices)
    last = indices[-1]
    frames: list[np.ndarray] = []
    count = 0
    with _open(data) as container:
        for i, frame in enumerate(container.decode(video=0)):
            count = i + 1
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= last:
                break
    return frames, count


# ---------------------------------------------------------------------------------------------------------
# Frames → patches


def preprocess_frames(
    frames: np.ndarray | torch.Tensor, max_soft_tokens: int = DEFAULT_VIDEO_SOFT_TOKENS, patch_size: int = PATCH_SIZE
) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
    """uint8 frames [F, H, W, 3] → (pixel_values [F, P·r, 3·s²], position_ids [F, P·r, 2], N soft tokens per frame,
    (H', W')). s = patch_size: 48 for gemma4_unified (r = 1), 16 for the family's vision encoder (r = 9 patches
    per soft token, as transformers' `Gemma4VideoProcessor` cuts them)."""
    check_budget(max_soft_tokens)
    if patch_size not in (PATCH_SIZE, FAMILY_PATCH_SIZE):
        raise ValueError(f"patch_size must be {PATCH_SIZE} or {FAMILY_PATCH_SIZE}, got {patch_size}")
    per_token = (PATCH_SIZE // patch_size) ** 2
    if isinstance(frames, np.ndarray):
        # torch refuses to share read-only memory: copy those arrays.
        t = torch.from_numpy(np.ascontiguousarray(frames) if frames.flags.writeable else np.array(frames))
    else:
        t = frames.detach().cpu()
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise MediaError(f"video frames must be uint8 [frames, height, width, 3], got {t.dtype} {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0 or t.shape[2] == 0:
        raise MediaError(f"video frames must be non-empty, got shape {tuple(t.shape)}")
    video = t.permute(0, 3, 1, 2).contiguous()  # (F, 3, H, W)
    new_h, new_w = target_size(video.shape[2], video.shape[3], max_soft_tokens)
    patches = patchify(resize_uint8(video, new_h, new_w), patch_size)  # (F, N·r, 3·s²) uint8
    values = patches.to(torch.float32) / 255.0  # true division, unlike images (spec §3)
    n = patches.shape[1] // per_token
    positions = grid_positions(new_h // patch_size, new_w // patch_size).expand(video.shape[0], -1, -1)
    values, positions = pad_rows(values, positions, max_soft_tokens * per_token)
    return values.contiguous(), positions.contiguous(), n, (new_h, new_w)


def load_video(
    src: VideoInput,
    num_frames: int | None = None,
    fps: float | None = None,
    max_soft_tokens: int = DEFAULT_VIDEO_SOFT_TOKENS,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
    patch_size: int = PATCH_SIZE,
) -> VideoFeatures:
    """Decode, sample and preprocess a video (MP4, MOV, WebM/MKV, AVI via PyAV) or decoded frames.

    src: a path, bytes, data URI or base64 of a video file; or uint8 frames [T, H, W, 3], alone (fps
    unknown) or as `(frames, fps)`. Sampling: `num_frames` uniform frames (default 32) or `fps` frames per
    second (mutually exclusive). A video shorter than the request uses all its frames; an explicit
    `num_frames` over `max_frames` raises MediaError while an fps-derived count is clamped to it.
    Each frame is preprocessed like an image at budget `max_soft_tokens` (default 70) with x / 255 scaling.

    Raises MediaError for unreadable or unsupported files, no video stream, frames over
    `max_frame_pixels`, or videos longer than `max_seconds`.
    """
    check_budget(max_soft_tokens)
    if isinstance(src, tuple) or isinstance(src, (np.ndarray, torch.Tensor)):
        arr, video_fps = src if isinstance(src, tuple) else (src, None)
        if video_fps is not None and not video_fps > 0:
            raise MediaError(f"video fps must be positive, got {video_fps!r}")
        arr = np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr)
        if arr.ndim != 4:
            raise MediaError(f"video frames must be uint8 [frames, height, width, 3], got shape {arr.shape}")
        if arr.shape[1] * arr.shape[2] > max_frame_pixels:
            raise MediaError(
                f"video frames of {arr.shape[2]}×{arr.shape[1]} are over the limit of {max_frame_pixels} pixels"
            )
        total = arr.shape[0]
        indices = sample_indices(total, num_frames=num_frames, fps=fps, video_fps=video_fps, max_frames=max_frames)
        frames = arr[indices]
        video_fps = float(video_fps) if video_fps is not None else None
    else:
        frames, indices, video_fps, total = decode_video(
            src,
            num_frames=num_frames,
            fps=fps,
            max_frames=max_frames,
            max_seconds=max_seconds,
            max_frame_pixels=max_frame_pixels,
        )
    values, positions, n, size = preprocess_frames(frames, max_soft_tokens, patch_size)
    rate = video_fps or DEFAULT_FPS_IF_UNKNOWN
    stamps = [format_timestamp(i / rate) for i in indices]
    return VideoFeatures(values, positions, stamps, n, list(indices), video_fps, total, size)


def batch_videos(videos: Sequence[VideoFeatures]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Concatenate videos along the frame axis, as the reference processor does.

    Returns pixel_values_videos float32 [ΣF, P, 6912], video_position_ids int64 [ΣF, P, 2] and
    num_frames_per_video (which the model needs to split them again). All videos must share P.
    """
    if len(videos) == 0:
        raise ValueError("batch_videos needs at least one video")
    slots = {v.pixel_values.shape[1] for v in videos}
    if len(slots) != 1:
        raise ValueError(f"all videos must use the same max_soft_tokens, got {sorted(slots)}")
    values = torch.cat([v.pixel_values for v in videos], dim=0)
    positions = torch.cat([v.position_ids for v in videos], dim=0)
    return values, positions, [v.num_frames for v in videos]
