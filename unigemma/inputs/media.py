"""Shared helpers for media inputs: the `MediaError` type and turning a "source" into bytes or a path.

A media source is what a caller hands us for an image, an audio clip or a video: a local path (str or
`pathlib.Path`), raw bytes, a `data:` URI, or a bare base64 string (the OpenAI `input_audio.data` field).
`read_source` resolves any of these into either a `Path` to an existing local file or a `bytes` object, with
size limits checked before anything is decoded. The per-modality modules (image.py, audio.py, video.py)
then decode those bytes with PIL, soundfile/PyAV or PyAV.

What this module does not do: fetch URLs (remote media is the server's job, behind its own allow-list and
limits: server/media.py), decide whether a local path is allowed (the caller's `--media-root` policy), or
decode anything.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
from pathlib import Path
from typing import Union

__all__ = [
    "MediaError",
    "MediaSource",
    "read_source",
    "decode_base64",
    "parse_data_uri",
    "describe_source",
    "DEFAULT_MAX_BYTES",
]


class MediaError(ValueError):
    """A media input could not be used: unreadable, corrupt, unsupported, or over a limit.

    A subclass of ValueError so that every layer that maps user errors to a 4xx (CLI, server) treats it as
    the caller's fault, never as a crash. The message names the bad value and what would be accepted.
    """


MediaSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

# 256 MiB: large enough for ten minutes of 48 kHz stereo float WAV, small enough that a hostile
# request cannot make us buffer gigabytes. Each loader passes its own, tighter limit where it has one.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# A string this long cannot be a path on any common filesystem (PATH_MAX is 4096 on Linux), so such
# a string is treated as base64 without asking the filesystem.
_MAX_PATH_CHARS = 4096
# No image, audio or video file worth decoding is under 24 bytes, i.e. 32 base64 characters: a shorter
# string that names no file is reported as a missing file rather than decoded.
_MIN_B64_CHARS = 32
_B64_CHARS = re.compile(rb"^[A-Za-z0-9+/_\-=\s]*$")


def describe_source(src: object, limit: int = 60) -> str:
    """A short, log-safe description of a source for error messages (never the whole payload)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if isinstance(src, str):
        if src.startswith("data:"):
            head = src.split(",", 1)[0]
            return f"<data URI {head[:limit]}..., {len(src)} chars>"
        return repr(src) if len(src) <= limit else repr(src[:limit]) + f"... ({len(src)} chars)"
    return f"<{type(src).__name__}>"


def decode_base64(text: str | bytes, *, what: str = "media", max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Decode standard or URL-safe base64 (padding optional, whitespace ignored) into bytes.

    Raises MediaError for characters outside the base64 alphabets, a bad length, an empty result, or a
    decoded size over `max_bytes` (checked from the encoded length first, so nothing huge is allocated).
    """
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    if not _B64_CHARS.match(raw):
        raise MediaError(f"{what}: invalid base64 data (characters outside the base64 alphabet)")
    raw = b"".join(raw.split())
    if len(raw) * 3 // 4 > max_bytes:
        raise MediaError(f"{what}: base64 payload decodes to more than {max_bytes} bytes (the limit)")
    if b"-" in raw or b"_" in raw:
        raw = raw.replace(b"-", b"+").replace(b"_", b"/")
    raw = raw.rstrip(b"=")
    if len(raw) % 4 == 1:
        raise MediaError(f"{what}: invalid base64 data (length {len(raw)} is not a valid base64 length)")
    raw += b"=" * (-len(raw) % 4)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{what}: invalid base64 data ({exc})") from None
    if not data:
        raise MediaError(f"{what}: base64 data is empty")
    return data


def parse_data_uri(uri: str, *, what: str = "media", max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[str, bytes]:
    """Split `data:[<mime>][;base64],<payload>` into (mime type, decoded bytes).

    Both base64 and percent-encoded payloads are accepted (RFC 2397); the mime type is returned lower-case
    ("" when absent) so callers can use it as a format hint.
    """
    if not uri.startswith("data:"):
        raise MediaError(f"{what}: not a data URI: {describe_source(uri)}")
    header, sep, payload = uri[5:].partition(",")
    if not sep:
        raise MediaError(f"{what}: malformed data URI (no ',' between header and data): {describe_source(uri)}")
    params = [p.strip() for p in header.split(";")]
    mime = params[0].lower() if params and "=" not in params[0] else ""
    if "base64" in (p.lower() for p in params[1:]):
        return mime, decode_base64(payload, what=what, max_bytes=max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise MediaError(f"{what}: data URI holds {len(data)} bytes, over the limit of {max_bytes}")
    if not data:
        raise MediaError(f"{what}: data URI is empty")
    return mime, data


def read_source(
    src: MediaSource, *, what: str = "media", max_bytes: int = DEFAULT_MAX_BYTES
) -> Path | bytes:
    """Resolve a media source into a local file `Path` or the media's bytes.

    - bytes / bytearray / memoryview: returned as bytes.
    - `pathlib.Path` / os.PathLike: must name an existing file.
    - str: a `data:` URI is decoded; `http(s)://` is refused (remote fetching happens in the server, behind
      its own policy); `file://` URLs and plain strings naming an existing file are paths; anything else
      that looks like base64 is decoded; otherwise "no such file".

    Raises MediaError for a missing file, an empty or oversized payload, or bad base64.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError(f"{what}: empty bytes")
        if len(data) > max_bytes:
            raise MediaError(f"{what}: {len(data)} bytes is over the limit of {max_bytes} bytes")
        return data
    if isinstance(src, os.PathLike):
        return _check_path(Path(os.fspath(src)), what, max_bytes)
    if not isinstance(src, str):
        raise MediaError(
            f"{what}: unsupported source type {type(src).__name__}; expected a path, bytes, a data: URI or base64"
        )
    text = src.strip()
    if not text:
        raise MediaError(f"{what}: empty string given as source")
    if text.startswith("data:"):
        return parse_data_uri(text, what=what, max_bytes=max_bytes)[1]
    lowered = text[:8].lower()
    if lowered.startswith("http://") or lowered.startswith("https://"):
        raise MediaError(
            f"{what}: remote URLs are not fetched by the media loaders ({describe_source(text)}); "
            "download it first or use the server's remote-media option"
        )
    if lowered.startswith("file://"):
        parsed = urllib.parse.urlparse(text)
        return _check_path(Path(urllib.parse.unquote(parsed.path)), what, max_bytes)
    if len(text) <= _MAX_PATH_CHARS:
        path = Path(text).expanduser()
        try:
            exists = path.exists()
        except OSError:  # e.g. "File name too long" for a long base64 string
            exists = False
        if exists:
            return _check_path(path, what, max_bytes)
    # Not a file: base64 is the only other string form. Short strings with path separators or dots are
    # almost certainly mistyped paths, so say that instead of "invalid base64".
    looks_like_path = len(text) < _MIN_B64_CHARS or (
        len(text) < 256 and ("/" in text or "\\" in text or "." in text) and not text.endswith("=")
    )
    if looks_like_path or not _B64_CHARS.match(text.encode("ascii", "replace")):
        raise MediaError(f"{what}: no such file: {describe_source(text)} (and it is not base64 data either)")
    return decode_base64(text, what=what, max_bytes=max_bytes)


def _check_path(path: Path, what: str, max_bytes: int) -> Path:
    try:
        st = path.stat()
    except OSError:
        raise MediaError(f"{what}: no such file: {str(path)!r}") from None
    if not path.is_file():
        raise MediaError(f"{what}: not a regular file: {str(path)!r}")
    if st.st_size == 0:
        raise MediaError(f"{what}: file is empty: {str(path)!r}")
    if st.st_size > max_bytes:
        raise MediaError(f"{what}: file {str(path)!r} is {st.st_size} bytes, over the limit of {max_bytes} bytes")
    return path
