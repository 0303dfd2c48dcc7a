"""Messages → one `Prompt`: token ids with expanded media placeholders, plus the model's media tensors.

    OpenAI-style messages ─► chat template (sandboxed) ─► text with one <|image|> / <|audio|> / <|video|> per media part
                          └► media parts, in order ─► image / audio / video preprocessing
    text split at the placeholders; each becomes (spec/preprocessing.md §4, chat-format.md §7.2)
        image: BOI + IMAGE × N + EOI                      (N from the image's own size and token budget)
        audio: per 30-s segment BOA + AUDIO × n + EOA     (segments back to back)
        video: per frame "mm:ss " + BOI + VIDEO × N + EOI, frames joined by one space

User text cannot forge placeholders: the template neutralises format-token strings in user and tool text, and only
placeholders the template itself wrote (one per media part) are expanded; a count mismatch is an error.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import UnifiedConfig
from .audio import batch_audio, load_audio_segments, num_audio_tokens
from .image import budget_for_detail, check_budget, check_positions, model_image_spec, pad_rows, preprocess_image
from .media import MediaError
from .mel import MelSettings, batch_mel, log_mel, num_mel_tokens
from .template import ChatTemplate, normalize_messages
from .tokenizer import Tokenizer
from .video import batch_videos, load_video

PLACEHOLDERS = {"<|image|>": "image", "<|audio|>": "audio", "<|video|>": "video"}
_SPLIT = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")
_PART_KIND = {"image_url": "image", "image": "image", "input_audio": "audio", "audio": "audio", "video": "video"}


@dataclass
class MediaLimits:
    max_image_pixels: int = 50_000_000
    max_audio_seconds: float = 600.0
    max_video_frames: int = 128
    default_image_tokens: int = 280   # an image part with no max_soft_tokens / detail (LLM: the model's default)
    video_tokens: int = 70
    video_frames: int = 32


@dataclass
class Prompt:
    """Everything the engine needs for one request's prompt."""

    input_ids: list[int]
    media: dict[str, Any] = field(default_factory=dict)      # model kwargs: pixel_values, image_position_ids, ...
    text: str = ""                                           # the rendered template text (before expansion)
    media_keys: list[str] = field(default_factory=list)      # content hashes of the media, in order (prefix cache)

    def __len__(self) -> int:
        return len(self.input_ids)


def media_parts(messages: list[dict]) -> list[dict]:
    """The media content parts of normalised messages, in rendering order."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            out += [p for p in content if p.get("type") in _PART_KIND]
    return out


def _image_source(part: dict, default: int = 280) -> tuple[Any, int]:
    if part["type"] == "image":
        src = part.get("image")
        budget = part.get("max_soft_tokens") or default
    else:
        url = part["image_url"]
        src = url if isinstance(url, str) else url.get("url")
        detail = None if isinstance(url, str) else url.get("detail")
        budget = part.get("max_soft_tokens") or (url.get("max_soft_tokens") if isinstance(url, dict) else None) \
            or budget_for_detail(detail, default)
    return src, check_budget(int(budget))


def _key(kind: str, tensor: torch.Tensor) -> str:
    return kind + ":" + hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:32]


def build_prompt(messages: Any, tokenizer: Tokenizer, template: ChatTemplate, config: UnifiedConfig, *,
                 tools: list[dict] | None = None, enable_thinking: bool = False, add_generation_prompt: bool = True,
                 resolve: Callable[[str, Any], Any] | None = None, limits: MediaLimits | None = None,
                 mel: MelSettings | None = None, **template_kwargs) -> Prompt:
    """Render, load media, expand placeholders and tokenize.

    resolve(kind, source) may map a media source (URL, path) to bytes / a path / an object, enforcing the caller's
    policy (the server allows data: URIs and paths under --media-root only); by default sources are used as given.
    """
    limits = limits or MediaLimits()
    msgs = normalize_messages(messages)
    text = template.render(msgs, tools=tools, add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking, **template_kwargs)
    parts = media_parts(msgs)
    pieces = _SPLIT.split(text)
    found = [PLACEHOLDERS[p] for p in pieces if p in PLACEHOLDERS]
    kinds = [_PART_KIND[p["type"]] for p in parts]
    if found != kinds:
        raise ValueError(f"the chat template wrote media placeholders {found} but the messages hold media parts "
                         f"{kinds}; they must match one to one (is this template made for gemma4_unified?)")
    needs = set(kinds)
    patch_size = table = None
    if "image" in needs or "video" in needs:
        patch_size, table = model_image_spec(config)
    family_audio = config.audio_tower is not None  # mel features for the conformer, not raw frames
    if "audio" in needs and config.audio is None and not family_audio:
        raise ValueError("this model has no audio_config: it cannot take audio")

    images, audios, videos, keys = [], [], [], []
    media_iter = iter(parts)
    ids: list[int] = []
    c = config
    for piece in pieces:
        if piece not in PLACEHOLDERS:
            if piece:
                ids += tokenizer.encode(piece)
            continue
        part = next(media_iter)
        kind = PLACEHOLDERS[piece]
        if kind == "image":
            src, budget = _image_source(part, limits.default_image_tokens)
            src = resolve("image", src) if resolve else src
            feats = preprocess_image(src, budget, max_pixels=limits.max_image_pixels, patch_size=patch_size)
            check_positions(feats, table)
            images.append(feats)
            keys.append(_key("image", feats.pixel_values[: feats.num_tokens * feats.rows_per_token]))
            ids += [c.boi_token_id] + [c.image_token_id] * feats.num_tokens + [c.eoi_token_id]
        elif kind == "audio":
            if part["type"] == "input_audio":
                src, fmt = part["input_audio"]["data"], part["input_audio"].get("format")
            else:
                src, fmt = part.get("audio"), part.get("format")
            src = resolve("audio", src) if resolve else src
            segments = load_audio_segments(src, max_seconds=limits.max_audio_seconds, format=fmt)
            for seg in segments:
                keys.append(_key("audio", torch.from_numpy(seg)))
                if family_audio:
                    feats, mask = log_mel(seg, mel)
                    n = num_mel_tokens(mask)
                    if n == 0:
                        raise MediaError(f"audio clip of {seg.size} samples is too short: the encoder makes no soft "
                                         "token of it (at least ~25 ms of audio is needed)")
                    audios.append((feats, mask))
                else:
                    audios.append(seg)
                    n = num_audio_tokens(seg.size)
                ids += [c.boa_token_id] + [c.audio_token_id] * n + [c.eoa_token_id]
        else:
            src = part.get("video")
            if isinstance(src, dict):
                src = src.get("url")
            src = resolve("video", src) if resolve else src
            v = load_video(src, num_frames=part.get("num_frames"), fps=part.get("fps"),
                           max_soft_tokens=part.get("max_soft_tokens") or limits.video_tokens,
                           max_frames=limits.max_video_frames, patch_size=patch_size)
            if part.get("num_frames") is None and part.get("fps") is None and v.num_frames > limits.video_frames:
                raise MediaError(f"video sampled {v.num_frames} frames, over the limit of {limits.video_frames}")
            videos.append(v)
            keys.append(_key("video", v.pixel_values))
            for f, stamp in enumerate(v.timestamps):
                if f:
                    ids += tokenizer.encode(" ")
                ids += tokenizer.encode(stamp + " ")
                ids += [c.boi_token_id] + [c.video_token_id] * v.num_tokens_per_frame + [c.eoi_token_id]

    media: dict[str, Any] = {}
    if images:
        P = max(f.pixel_values.shape[0] for f in images)
        padded = [pad_rows(f.pixel_values, f.position_ids, P) for f in images]
        media["pixel_values"] = torch.stack([v for v, _ in padded])
        media["image_position_ids"] = torch.stack([p for _, p in padded])
    if audios:
        batch = batch_mel if family_audio else batch_audio
        media["input_features"], media["input_features_mask"] = batch(audios)
    if videos:
        pv, vp, nf = batch_videos(videos)
        media["pixel_values_videos"], media["video_position_ids"] = pv, vp
        media["num_frames_per_video"] = torch.tensor(nf)
    return Prompt(ids, media, text, keys)
