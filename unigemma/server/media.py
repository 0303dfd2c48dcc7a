"""Safe media resolution for the server: where the bytes of an `image_url` / `input_audio` / `video_url` may come from.

A URL in a request is untrusted input, so every source goes through one policy (DESIGN.md §7):

    data:...;base64,...   always allowed; decoded with a byte cap
    file:///x or /x/y     only when a media root is configured, and only for files under it (after resolving
                          symlinks and `..`, so `/root/../etc/passwd` and links out of the root are refused)
    http(s)://...         only with `allow_remote`; a connect/read timeout, at most `max_redirects`
                          redirects, and the body is read in chunks and cut off at the byte cap
    anything else         refused

The bytes (or the checked local path) then go to the decoders in `unigemma.inputs.image|audio|video`, which
enforce their own limits (pixels, seconds, frames). Every failure is a `MediaError` (a ValueError), which the
app maps to a 400 naming the content part.

What this module does not do: decode media, or put placeholders into prompts (server/service.py).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unigemma.inputs.media import MediaError, describe_source, parse_data_uri

# 20 MiB per item: the OpenAI API's own cap for images; audio clips of 30 s WAV are ~1 MiB.
DEFAULT_MAX_MEDIA_BYTES = 20 * 1024 * 1024


@dataclass
class MediaPolicy:
    media_root: Path | None = None
    allow_remote: bool = False
    remote_timeout_s: float = 10.0
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    max_redirects: int = 3
    max_pixels: int = 50_000_000
    max_side: int = 16_384
    max_decoded_bytes: int = 256 * 1024 * 1024
    max_audio_seconds: float = 600.0
    max_video_seconds: float = 600.0
    max_video_frames: int = 32

    def __post_init__(self) -> None:
        if self.media_root is not None:
            root = Path(self.media_root).expanduser()
            if not root.is_dir():
                raise ValueError(f"media root {str(root)!r} is not a directory")
            self.media_root = root.resolve()


def fetch(url: str, policy: MediaPolicy, what: str = "media") -> bytes | Path:
    """Resolve one media URL under `policy` into bytes or a checked local Path. Raises MediaError."""
    if not isinstance(url, str) or not url.strip():
        raise MediaError(f"{what}: empty URL")
    url = url.strip()
    head = url[:8].lower()
    if head.startswith("data:"):
        return parse_data_uri(url, what=what, max_bytes=policy.max_bytes)[1]
    if head.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise MediaError(f"{what}: remote URLs are disabled on this server ({describe_source(url)}); send the "
                             "media as a data: URI, or start the server with --allow-remote-media")
        return _fetch_remote(url, policy, what)
    if head.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    elif "://" in url[:16]:
        scheme = url.split("://", 1)[0]
        raise MediaError(f"{what}: URL scheme {scheme!r} is not supported; use data:, http(s):// or a local path")
    else:
        path = Path(url)
    return _local(path, policy, what)


def _local(path: Path, policy: MediaPolicy, what: str) -> Path:
    if policy.media_root is None:
        raise MediaError(f"{what}: local file paths are disabled on this server ({describe_source(str(path))}); "
                         "send the media as a data: URI, or start the server with --media-root DIR")
    root = policy.media_root
    full = (root / path) if not path.is_absolute() else path
    # One answer for "outside the root" and "missing": different messages would tell a client which files
    # exist anywhere on the machine. Containment is decided first, on the resolved path (symlinks, `..`).
    refused = MediaError(f"{what}: {str(path)!r} is not a readable file under the media root; only existing "
                         "files under it may be read")
    try:
        real = full.resolve(strict=False)
    except (OSError, RuntimeError):
        raise refused from None
    if not real.is_relative_to(root):
        raise refused
    try:
        if not real.is_file():
            raise refused
    except OSError:
        raise refused from None
    size = real.stat().st_size
    if size > policy.max_bytes:
        raise MediaError(f"{what}: {str(path)!r} is {size} bytes, over the limit of {policy.max_bytes}")
    if size == 0:
        raise MediaError(f"{what}: {str(path)!r} is empty")
    return real


def _fetch_remote(url: str, policy: MediaPolicy, what: str) -> bytes:
    import httpx  # only needed when remote media is enabled

    try:
        with httpx.Client(timeout=policy.remote_timeout_s, follow_redirects=True,
                          max_redirects=policy.max_redirects) as client:
            with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise MediaError(f"{what}: fetching {describe_source(url)} gave HTTP {resp.status_code}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise MediaError(f"{what}: {describe_source(url)} is {declared} bytes, over the limit of "
                                     f"{policy.max_bytes}")
                chunks, total = [], 0
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > policy.max_bytes:  # the header may lie or be absent: count what arrives
                        raise MediaError(f"{what}: {describe_source(url)} is over the limit of {policy.max_bytes} "
                                         "bytes")
                    chunks.append(chunk)
    except httpx.TimeoutException:
        raise MediaError(f"{what}: fetching {describe_source(url)} timed out after {policy.remote_timeout_s} s") \
            from None
    except httpx.HTTPError as e:
        raise MediaError(f"{what}: fetching {describe_source(url)} failed: {type(e).__name__}: {e}") from None
    data = b"".join(chunks)
    if not data:
        raise MediaError(f"{what}: {describe_source(url)} returned no data")
    return data


# --- decoding through the inputs layer --------------------------------------------------------------------------

def load_image(url: str, budget: int, policy: MediaPolicy, what: str = "image", patch_size: int | None = None):
    """→ `ImageFeatures` padded to `budget` soft tokens (patch_size: 48 unified, 16 family; None: 48)."""
    from unigemma.inputs.image import PATCH_SIZE, preprocess_image

    src = fetch(url, policy, what)
    try:
        return preprocess_image(src, budget, max_pixels=policy.max_pixels, max_side=policy.max_side,
                                max_decoded_bytes=policy.max_decoded_bytes, patch_size=patch_size or PATCH_SIZE)
    except MediaError as e:
        raise MediaError(f"{what}: {e}") from None


def load_audio(data: str, fmt: str | None, policy: MediaPolicy, what: str = "audio") -> list[np.ndarray]:
    """OpenAI `input_audio.data` (bare base64, or a data: URI) → 16 kHz mono segments of at most 30 s."""
    from unigemma.inputs.audio import load_audio_segments
    from unigemma.inputs.media import decode_base64

    if data.startswith("data:"):
        raw = parse_data_uri(data, what=what, max_bytes=policy.max_bytes)[1]
    else:
        raw = decode_base64(data, what=what, max_bytes=policy.max_bytes)
    try:
        return load_audio_segments(raw, max_seconds=policy.max_audio_seconds, format=fmt)
    except MediaError as e:
        raise MediaError(f"{what}: {e}") from None


def load_video(url: str, policy: MediaPolicy, what: str = "video", patch_size: int | None = None):
    """→ `VideoFeatures` (frames sampled uniformly, each at the video budget; patch_size 48 unified, 16 family)."""
    from unigemma.inputs.image import PATCH_SIZE
    from unigemma.inputs.video import load_video as _load

    src = fetch(url, policy, what)
    try:
        return _load(src, num_frames=policy.max_video_frames, max_seconds=policy.max_video_seconds,
                     patch_size=patch_size or PATCH_SIZE)
    except MediaError as e:
        raise MediaError(f"{what}: {e}") from None
