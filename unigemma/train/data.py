"""Training data: chat JSONL → rendered prompts → token ids with an assistant-only loss mask → padded batches.

    JSONL line  {"messages": [...OpenAI chat...], "tools": [...]?, "enable_thinking": false?}   (or a bare list)
        ─► ChatTemplate.render(full conversation)            the model's own template, sandboxed
        ─► assistant_spans: character spans the model must learn to produce
              "<|turn>model\n" [<|channel>thought\n<channel|>]  body ... "<turn|>"  "\n"
                 not trained     prefill (thinking off), not trained   trained      trained  not trained
              inside a model turn, tool results ("response:...<tool_response|>" + their media) are not trained,
              but the "<|tool_response>" token that ends a call is (the model emits it to stop)
        ─► tokens (text pieces between media placeholders) + media expansion
              <|image|> → BOI + N×IMAGE + EOI      <|audio|> → per 30 s segment: BOA + n×AUDIO + EOA
        ─► labels: labels[t] = ids[t+1] where token t+1 is trained, else −100 (shifted here, once)

Images and audio are given as content parts holding local paths (relative to the JSONL file), data: URIs or base64
(`input_audio.data`); they are decoded in DataLoader workers. Batches come from `LengthGroupedBatchSampler`
(similar lengths together, deterministic per (seed, epoch), resumable at any batch), and `collate` pads them.

What this module does not do: fetch remote media, handle video, or run the model.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

IGNORE = -100
HEADER = "<|turn>model\n"
EOT = "<turn|>"
SOC = "<|channel>"
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"
TR_OPEN = "<|tool_response>"
TR_CLOSE = "<tool_response|>"


_B64_TEXT = re.compile(r"[A-Za-z0-9+/_\-\s]+={0,2}\s*")


class DataError(ValueError):
    """A training record is malformed; the message names the file and line."""


# --- reading --------------------------------------------------------------------------------------------

@dataclass
class Record:
    messages: list[dict]
    tools: list[dict] | None = None
    enable_thinking: bool = False
    where: str = ""


def read_jsonl(path: str | Path, *, extra_keys: str = "error", limit: int | None = None,
               errors: list[str] | None = None) -> list[Record]:
    """Parse a chat JSONL file; each line is {"messages": [...], "tools"?, "enable_thinking"?} or a message list.

    extra_keys: "error" (a training file with other keys is probably not what the caller meant) or "ignore"
    (evaluation splits that carry ids, answers and metadata beside the conversation). limit: the first N records.
    errors: when given, a malformed line is appended to it (its message names the line) and skipped.
    """
    if extra_keys not in ("error", "ignore"):
        raise ValueError(f"extra_keys must be 'error' or 'ignore', got {extra_keys!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                out.append(_parse_line(line, f"{path}:{n}", extra_keys))
            except DataError as e:
                if errors is None:
                    raise
                errors.append(str(e))
    if not out:
        raise DataError(f"{path}: no records" + (f" ({len(errors)} bad: {errors[0]})" if errors else ""))
    return out


def _parse_line(line: str, where: str, extra_keys: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, list):
        obj = {"messages": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise DataError(f"{where}: expected {{\"messages\": [...]}} with a non-empty message list")
    unknown = set(obj) - {"messages", "tools", "enable_thinking"}
    if extra_keys == "ignore":
        obj = {k: v for k, v in obj.items() if k not in unknown and v is not None}
    elif unknown:
        raise DataError(f"{where}: unknown key {sorted(unknown)[0]!r} (accepted: messages, tools, "
                        "enable_thinking)")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in obj["messages"]):
        raise DataError(f"{where}: no assistant message: nothing to train on")
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of tool schemas")
    return Record(obj["messages"], tools, bool(obj.get("enable_thinking", False)), where)


# --- media ----------------------------------------------------------------------------------------------

@dataclass
class MediaRef:
    kind: str                # "image" | "audio"
    source: str              # a resolved local path, a data: URI or base64 text
    fmt: str | None = None   # audio container hint (input_audio.format)


def _resolve(src: Any, base: Path, where: str) -> str:
    if not isinstance(src, str) or not src:
        raise DataError(f"{where}: media source must be a non-empty string (a path, data: URI or base64)")
    if src.startswith(("http://", "https://")):
        raise DataError(f"{where}: remote media ({src[:60]}) is not fetched in training; download it and give a path")
    if src.startswith("data:"):
        return src
    path = src[len("file://"):] if src.startswith("file://") else src
    if len(path) <= 4096:  # longer strings name no file (and stat() would fail with "File name too long")
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = base / p
        try:
            if p.is_file():
                return str(p)
        except OSError:  # a name longer than the file system allows: not a file, maybe base64
            pass
    # OpenAI's input_audio.data is plain base64; images may be given so too. Base64 text contains "/" and "+",
    # so it is recognised by its alphabet and length, never by the absence of path separators.
    if len(src) >= 32 and _B64_TEXT.fullmatch(src):
        return src
    raise DataError(f"{where}: media file {src[:80]!r}{'...' if len(src) > 80 else ''} not found (relative paths "
                    f"are resolved against {base}; media may also be a data: URI or base64 text)")


def collect_media(rec: Record, base: Path) -> list[MediaRef]:
    """Media parts in the order the template writes their placeholders (message order)."""
    refs: list[MediaRef] = []
    for i, m in enumerate(rec.messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            where = f"{rec.where}: messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind in ("image", "image_url", "audio", "input_audio", "video") and m.get("role") == "assistant":
                raise DataError(f"{where}: media in an assistant message cannot be trained (the model outputs text)")
            if kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                refs.append(MediaRef("image", _resolve(url, base, where)))
            elif kind == "image":
                refs.append(MediaRef("image", _resolve(part.get("image"), base, where)))
            elif kind == "input_audio":
                a = part.get("input_audio") or {}
                refs.append(MediaRef("audio", _resolve(a.get("data"), base, where), a.get("format")))
            elif kind == "audio":
                refs.append(MediaRef("audio", _resolve(part.get("audio"), base, where)))
            elif kind == "video":
                raise DataError(f"{where}: video parts are not supported in training data (use image frames)")
    return refs


@dataclass
class MediaIds:
    """Placeholder strings (tokenizer) and the ids a media item expands to (model config)."""

    image_text: str = "<|image|>"
    audio_text: str = "<|audio|>"
    image: int = 258_880
    audio: int = 258_881
    boi: int = 255_999
    eoi: int = 258_882
    boa: int = 256_000
    eoa: int = 258_883

    @classmethod
    def from_model(cls, config, tokenizer) -> "MediaIds":
        sp = tokenizer.specials
        return cls(sp.get("image_token", "<|image|>"), sp.get("audio_token", "<|audio|>"),
                   config.image_token_id, config.audio_token_id, config.boi_token_id, config.eoi_token_id,
                   config.boa_token_id, config.eoa_token_id)

    @property
    def media_ids(self) -> tuple[int, ...]:
        return (self.image, self.audio, self.boi, self.eoi, self.boa, self.eoa)


# --- rendering and the assistant mask ---------------------------------------------------------------------

def assistant_spans(text: str, prefill_empty_thought: bool = True,
                    placeholders: Sequence[str] = ("<|image|>", "<|audio|>", "<|video|>")
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(text, [(start, end)]): character spans of a rendered Gemma 4 conversation that the model produces.

    With `prefill_empty_thought`, a model turn that does not open a channel gets the thinking-off generation
    prefill `<|channel>thought\\n<channel|>` inserted after its header (untrained): at inference, thinking off, the
    prompt ends with exactly that, so training then sees what decoding sees.
    """
    spans: list[tuple[int, int]] = []
    i = 0
    while (h := text.find(HEADER, i)) >= 0:
        s = h + len(HEADER)
        if prefill_empty_thought and not text.startswith(SOC, s):
            text = text[:s] + EMPTY_THOUGHT + text[s:]
            s += len(EMPTY_THOUGHT)
        e = text.find(EOT, s)
        end = len(text) if e < 0 else e + len(EOT)
        nxt = text.find(HEADER, s)
        if 0 <= nxt < end:  # an unclosed turn followed by another model turn (defensive)
            end = nxt
        cur = s
        while (r := text.find(TR_OPEN, cur, end)) >= 0:
            spans.append((cur, r + len(TR_OPEN)))
            c = text.find(TR_CLOSE, r, end)
            cur = end if c < 0 else c + len(TR_CLOSE)
            moved = True
            while moved:  # media a tool result carries follow its block; injected, not produced
                moved = False
                for ph in placeholders:
                    if text.startswith(ph, cur):
                        cur += len(ph)
                        moved = True
        if cur < end:
            spans.append((cur, end))
        i = end
    return text, [sp for sp in spans if sp[1] > sp[0]]


@dataclass
class Tokenized:
    """A conversation's text pieces (between media placeholders) as ids with per-token trained flags."""

    pieces: list[np.ndarray]            # int32 ids of each text piece
    trained: list[np.ndarray]           # bool, same shapes
    media: list[MediaRef]               # one per gap between pieces
    est_len: int                        # length estimate (media at their budget) for length grouping
    where: str = ""                     # "file:line" of the record, for errors raised while building it


def tokenize_rendered(text: str, spans: list[tuple[int, int]], tokenizer, ids: MediaIds,
                      media: list[MediaRef], where: str = "") -> Tokenized:
    """Split at media placeholders, tokenize each piece, flag tokens whose first character lies in a span."""
    pieces, flags, cuts = [], [], []
    pos = 0
    while True:
        hits = [(text.find(ph, pos), ph) for ph in (ids.image_text, ids.audio_text)]
        hits = [(k, ph) for k, ph in hits if k >= 0]
        stop, ph = min(hits) if hits else (len(text), None)
        enc = tokenizer.backend.encode(text[pos:stop], add_special_tokens=False)
        starts = np.array([pos + a for a, _ in enc.offsets], dtype=np.int64)
        tr = np.zeros(len(starts), dtype=bool)
        for a, b in spans:
            tr |= (starts >= a) & (starts < b)
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        flags.append(tr)
        if ph is None:
            break
        cuts.append("image" if ph == ids.image_text else "audio")
        pos = stop + len(ph)
    if [m.kind for m in media] != cuts:
        raise DataError(f"{where}: the rendered prompt has media placeholders {cuts} but the messages hold "
                        f"{[m.kind for m in media]}")
    est = sum(len(p) for p in pieces) + sum(282 if m.kind == "image" else 100 for m in media)
    return Tokenized(pieces, flags, media, est, where)


def render_record(rec: Record, template, prefill_empty_thought: bool = True,
                  last_turn_only: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template (OpenAI shapes normalised first: JSON-string tool arguments parsed).
    last_turn_only: train only the final model turn (earlier assistant turns become context)."""
    from ..inputs.template import normalize_messages

    try:
        text = template.render(normalize_messages(rec.messages), tools=rec.tools, add_generation_prompt=False,
                               enable_thinking=rec.enable_thinking)
    except ValueError as e:
        raise DataError(f"{rec.where}: {e}") from None
    text, spans = assistant_spans(text, prefill_empty_thought and not rec.enable_thinking)
    if last_turn_only:
        start = text.rfind(HEADER)
        spans = [sp for sp in spans if sp[0] >= start]
    return text, spans


def build_example(tok: Tokenized, ids: MediaIds, max_len: int, image_soft_tokens: int = 280) -> dict:
    """Decode media and assemble one example: input_ids, labels (shifted), images, audio segments."""
    from ..inputs.audio import load_audio, split_segments
    from ..inputs.image import load_image, preprocess_image

    seq: list[np.ndarray] = [tok.pieces[0].astype(np.int64)]
    tr: list[np.ndarray] = [tok.trained[0]]
    images, audio = [], []
    starts = []  # (token index where the item starts, kind, count)
    length = len(seq[0])
    for ref, piece, flag in zip(tok.media, tok.pieces[1:], tok.trained[1:]):
        if ref.kind == "image":
            feat = preprocess_image(load_image(ref.source), image_soft_tokens)
            block = [ids.boi] + [ids.image] * feat.num_tokens + [ids.eoi]
            starts.append((length, "image", 1))
            images.append(feat)
        else:
            segs = split_segments(load_audio(ref.source, format=ref.fmt))
            block = []
            for s in segs:
                block += [ids.boa] + [ids.audio] * math.ceil(len(s) / 640) + [ids.eoa]
            starts.append((length, "audio", len(segs)))
            audio.extend(segs)
        seq += [np.asarray(block, dtype=np.int64), piece.astype(np.int64)]
        tr += [np.zeros(len(block), dtype=bool), flag]
        length += len(block) + len(piece)
    input_ids = np.concatenate(seq)
    trained = np.concatenate(tr)
    if len(input_ids) > max_len:
        # Cut at max_len, and never inside a media block: a partial block would not match its features.
        cut = max_len
        keep_img = keep_aud = 0
        for start, kind, n in starts:
            if start >= cut:
                break
            block_end = start + (2 + images[keep_img].num_tokens if kind == "image" else
                                 sum(2 + math.ceil(len(s) / 640) for s in audio[keep_aud:keep_aud + n]))
            if block_end > cut:
                cut = start
                break
            if kind == "image":
                keep_img += 1
            else:
                keep_aud += n
        input_ids, trained = input_ids[:cut], trained[:cut]
        images, audio = images[:keep_img], audio[:keep_aud]
    labels = np.full(len(input_ids), IGNORE, dtype=np.int64)
    if len(input_ids) > 1:
        nxt = input_ids[1:]
        labels[:-1] = np.where(trained[1:], nxt, IGNORE)
    return {"input_ids": input_ids, "labels": labels, "images": images, "audio": audio}


# --- datasets, sampling, batching --------------------------------------------------------------------------

def _short_source(source: str, base: Path) -> str:
    """A media source as the user wrote it, for messages: a path relative to the JSONL folder, or the payload's
    kind and size (never the payload)."""
    if source.startswith("data:"):
        return f"<data URI, {len(source)} chars>"
    p = Path(source) if len(source) <= 4096 else None
    if p is not None and p.is_absolute():
        try:
            return repr(str(p.relative_to(base)))
        except ValueError:
            return repr(source)
    return f"<base64, {len(source)} chars>"


def check_media(refs: list[MediaRef], threads: int = 4) -> dict[tuple, str]:
    """Decode every distinct media source once (threads: PIL and the audio decoders release the GIL) and return
    {(kind, source, fmt): error message} for those that fail, so a corrupt file is reported before training
    starts rather than when its batch comes up."""
    from concurrent.futures import ThreadPoolExecutor

    from ..inputs.audio import load_audio
    from ..inputs.image import load_image

    def check(key: tuple) -> str | None:
        kind, source, fmt = key
        try:
            if kind == "image":
                load_image(source)
            else:
                load_audio(source, format=fmt)
        except Exception as e:  # MediaError, or anything a decoder raises on bad bytes
            return str(e) or type(e).__name__
        return None

    keys = list(dict.fromkeys((r.kind, r.source, r.fmt) for r in refs))
    if not keys:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys)))) as pool:
        return {k: err for k, err in zip(keys, pool.map(check, keys)) if err is not None}


class ChatDataset(torch.utils.data.Dataset):
    """Rendered and tokenized at construction (main process), media checked once up front; media decoded per item
    (in workers).

    A bad record (malformed line, template error, unreadable image or audio) stops construction with a DataError
    naming its file:line, or, with `skip_bad_records`, is left out with a warning on stderr (`self.skipped` lists
    the messages).
    """

    def __init__(self, path: str | Path, tokenizer, template, ids: MediaIds, max_seq_len: int = 2048,
                 prefill_empty_thought: bool = True, image_soft_tokens: int = 280, skip_bad_records: bool = False,
                 validate_media: bool = True, train_on: str = "all_turns"):
        path = Path(path)
        self.ids = ids
        self.max_seq_len = max_seq_len
        self.image_soft_tokens = image_soft_tokens
        bad: list[str] = []
        items: list[Tokenized] = []
        for rec in read_jsonl(path, errors=bad):
            try:
                text, spans = render_record(rec, template, prefill_empty_thought, train_on == "last_turn")
                media = collect_media(rec, path.parent)
                items.append(tokenize_rendered(text, spans, tokenizer, ids, media, rec.where))
            except DataError as e:
                bad.append(str(e))
        if validate_media:
            failed = check_media([m for it in items for m in it.media])
            kept = []
            for it in items:
                errs = [(m, failed[k]) for m in it.media if (k := (m.kind, m.source, m.fmt)) in failed]
                if errs:
                    m, err = errs[0]
                    bad.append(f"{it.where}: {m.kind} {_short_source(m.source, path.parent)}: {err}")
                else:
                    kept.append(it)
            items = kept
        if bad and not skip_bad_records:
            more = f" (and {len(bad) - 1} more bad records)" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}; fix the record, or set data.skip_bad_records: true "
                            "(unigemma train --skip-bad-records) to train without it")
        for msg in bad:
            print(f"warning: skipping bad record {msg}", file=sys.stderr)
        if not items:
            raise DataError(f"{path}: no usable records ({len(bad)} skipped as bad)")
        self.skipped = bad
        self.items = items
        # Length for grouping: exact text tokens, images at their budget, audio at a typical clip (~4 s).
        self.lengths = [min(sum(len(p) for p in t.pieces) + sum(image_soft_tokens + 2 if m.kind == "image" else 100
                                                                for m in t.media), max_seq_len)
                        for t in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        try:
            return build_example(item, self.ids, self.max_seq_len, self.image_soft_tokens)
        except Exception as e:  # a file changed since the check: still name the record, not only the loader
            raise DataError(f"{item.where}: {e}") from e


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices: a fresh permutation per epoch (seeded), sorted by length within groups of
    `group_size` batches so that a batch holds sequences of similar length, then the batch order shuffled.

    Sharded over ranks (rank r takes batches r, r+W, ...; every rank gets the same count). `set_position(epoch,
    start)` makes the next iteration begin at batch `start` of `epoch`: the loop records how many batches it
    consumed, and resuming from that is exact.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_by_length: bool = True,
                 group_size: int = 64, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_size = group_size
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            chunk = self.batch_size * self.group_size
            groups = [order[i:i + chunk] for i in range(0, n, chunk)]
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        out = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.shuffle:
            out = [out[j] for j in rng.permutation(len(out))]
        usable = (len(out) // self.world_size) * self.world_size
        if usable == 0:
            raise DataError(f"{n} examples make {len(out)} batches of {self.batch_size}, fewer than the "
                            f"{self.world_size} workers; add data or lower data.batch_size")
        return out[self.rank:usable:self.world_size]

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.start

    def __iter__(self):
        yield from self.batches(self.epoch)[self.start:]


def collate(examples: list[dict], pad_id: int = 0) -> dict:
    """Right-pad to the longest example. Returns tensors the model's `run(...)` takes, plus labels."""
    from ..inputs.audio import batch_audio
    from ..inputs.image import batch_images

    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.from_numpy(e["input_ids"])
        labels[i, :n] = torch.from_numpy(e["labels"])
        mask[i, :n] = True
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
             "num_tokens": int(mask.sum()), "num_targets": int((labels != IGNORE).sum())}
    imgs = [f for e in examples for f in e["images"]]
    if imgs:
        budget = imgs[0].pixel_values.shape[0]
        pv, pos, _ = batch_images(imgs, budget)
        batch["pixel_values"], batch["image_position_ids"] = pv, pos
    waves = [w for e in examples for w in e["audio"]]
    if waves:
        batch["input_features"], batch["input_features_mask"] = batch_audio(waves)
    return batch


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most `row_len` (first fit, longest first; an example longer
    than row_len gets a row of its own). Rows keep their examples in index order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    return [sorted(r) for r in rows]


def collate_packed(examples: list[dict], row_len: int, pad_id: int = 0) -> dict:
    """Pack the examples into as few rows of at most `row_len` tokens as fit, each example its own segment:
    `segment_ids` keeps attention inside it, `position_ids` start at 0 in each. Labels never cross a boundary
    (an example's last token has none), so the loss equals that of the unpacked batch."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], row_len)
    # media go in the order their placeholders appear in the packed rows (row-major), which the model expects
    order = [i for r in rows for i in r]
    batch = collate([examples[i] for i in order], pad_id)
    B, T = len(rows), max(sum(len(examples[i]["input_ids"]) for i in r) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    seg = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        at = 0
        for s, i in enumerate(r):
            e = examples[i]
            n = len(e["input_ids"])
            input_ids[b, at:at + n] = torch.from_numpy(e["input_ids"])
            labels[b, at:at + n] = torch.from_numpy(e["labels"])
            mask[b, at:at + n] = True
            seg[b, at:at + n] = s
            pos[b, at:at + n] = torch.arange(n)
            at += n
    batch.update(input_ids=input_ids, labels=labels, attention_mask=mask, segment_ids=seg, position_ids=pos,
                 num_tokens=int(mask.sum()), num_targets=int((labels != IGNORE).sum()))
    return batch


@dataclass
class Collator:
    pad_id: int = 0
    pack_len: int | None = None   # data.packing: rows of at most this many tokens

    def __call__(self, examples: list[dict]) -> dict:
        if self.pack_len:
            return collate_packed(examples, self.pack_len, self.pad_id)
        return collate(examples, self.pad_id)


def make_loader(dataset: ChatDataset, sampler: LengthGroupedBatchSampler, pad_id: int, num_workers: int = 2,
                prefetch_factor: int = 4, pin_memory: bool = False,
                pack_len: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader that keeps the accelerator fed: worker processes decode media and pad batches ahead
    (prefetch_factor batches per worker), pinned host memory allows non-blocking copies to the GPU."""
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw = dict(prefetch_factor=prefetch_factor, persistent_workers=True)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(pad_id, pack_len),
                                       num_workers=num_workers, pin_memory=pin_memory, **kw)


def to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


MODEL_INPUTS = ("attention_mask", "pixel_values", "image_position_ids", "input_features", "input_features_mask",
                "position_ids", "segment_ids")


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of `Gemma4Unified.run` present in a batch (input_ids excluded)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def chat_template_for(tokenizer):
    """The tokenizer's own chat template, or unigemma's bundled Gemma 4 template when it has none."""
    from ..inputs.template import ChatTemplate

    if tokenizer.chat_template:
        return ChatTemplate.from_tokenizer(tokenizer)
    return ChatTemplate.bundled(special_tokens=tokenizer.specials)
