"""Tokenizer: a thin wrapper over HF `tokenizers` loaded from a checkpoint folder.

It reads `tokenizer.json` (never a pickled or sentencepiece-python tokenizer) and the special tokens named in
`tokenizer_config.json` / `special_tokens_map.json`. Encoding never adds BOS by itself: Gemma 4 chat templates
write `<bos>` into the rendered text, and raw prompts get it from `encode(..., add_bos=True)`. Decoding keeps
special tokens by default, because the Gemma 4 output format (`<|"|>`, `<|tool_call>`, ...) is made of them.

What it does not do: chat templates (inputs/template.py), incremental detokenization (outputs/detokenize.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer

# Attribute names used by Gemma 4 tokenizer configs for its special tokens (chat-format.md §1).
_NAMED_SPECIALS = (
    "bos_token", "eos_token", "pad_token", "unk_token", "mask_token",
    "boi_token", "eoi_token", "image_token", "boa_token", "eoa_token", "audio_token", "video_token",
    "sot_token", "eot_token", "soc_token", "eoc_token", "think_token",
    "std_token", "etd_token", "stc_token", "etc_token", "str_token", "etr_token", "escape_token",
)


def _token_text(value) -> str | None:
    # tokenizer_config.json stores either "<bos>" or {"content": "<bos>", ...}
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    """`text` with lone surrogates (e.g. from JSON "\\ud800", which Python accepts) replaced by U+FFFD: the
    tokenizer library refuses such strings outright, and one bad character must not fail a whole request."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    except AttributeError:
        raise TypeError(f"text to encode must be a str, got {type(text).__name__}") from None


class Tokenizer:
    """Text ↔ token ids for one checkpoint.

    `specials` maps attribute names (`bos_token`, `image_token`, `eot_token`, ...) to token strings;
    `special_ids` maps the same names to ids. `chat_template` is the checkpoint's template text, if any.
    """

    def __init__(self, hf: _HFTokenizer, specials: dict[str, str] | None = None,
                 chat_template: str | None = None, source: str = "<memory>"):
        self._tok = hf
        self.source = source
        self.chat_template = chat_template
        self.specials: dict[str, str] = {}
        self.special_ids: dict[str, int] = {}
        for name, text in (specials or {}).items():
            if text is None:
                continue
            tid = hf.token_to_id(text)
            if tid is None:
                continue  # named in the config but absent from the vocabulary: ignore, do not invent ids
            self.specials[name] = text
            self.special_ids[name] = tid
        # Every added special token, e.g. for "does this id print as markup" checks.
        self.all_special_ids: set[int] = {
            tid for tid, tok in hf.get_added_tokens_decoder().items() if tok.special
        }

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json (unigemma loads HF fast tokenizers only; "
                "convert a sentencepiece model with `tokenizers` first)")
        try:
            hf = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise ValueError(f"{tj}: cannot parse tokenizer.json: {e}") from None
        specials: dict[str, str] = {}
        chat_template = None
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = path / name
            if not f.is_file():
                continue
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: invalid JSON ({e})") from None
            for key in _NAMED_SPECIALS:
                text = _token_text(data.get(key))
                if text is not None:
                    specials[key] = text
            if name == "tokenizer_config.json" and isinstance(data.get("chat_template"), str):
                chat_template = data["chat_template"]
        jinja = path / "chat_template.jinja"
        if jinja.is_file():  # the separate file wins over the inline copy, as in transformers
            chat_template = jinja.read_text(encoding="utf-8")
        return cls(hf, specials, chat_template, source=str(path))

    # --- encode / decode ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.special_ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.special_ids.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.special_ids.get("pad_token")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in `text` become their ids (templates rely on it)."""
        ids = self._tok.encode(_valid_unicode(text), add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch([_valid_unicode(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)

    def id_of(self, name: str) -> int:
        """Id of a named special token (`"eot_token"`, `"image_token"`, ...); KeyError if the tokenizer lacks it."""
        if name not in self.special_ids:
            raise KeyError(f"tokenizer {self.source} has no special token {name!r}")
        return self.special_ids[name]

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. for grammar engines that need the vocabulary)."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"
