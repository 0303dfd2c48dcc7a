"""Small builders for tests and examples: a Gemma-4-style BPE tokenizer with all format tokens.

The official tokenizer has 262,144 entries with the format tokens at fixed ids (chat-format.md §1). Tiny test
models cannot afford that vocabulary, so this module trains a byte-level BPE of a few hundred entries whose
special tokens carry the same *strings* at small ids. `GEMMA4_SPECIALS` lists them in id order.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# (attribute name in tokenizer_config.json, token string), in the id order the tiny tokenizer assigns.
GEMMA4_SPECIALS: list[tuple[str, str]] = [
    ("pad_token", "<pad>"), ("eos_token", "<eos>"), ("bos_token", "<bos>"), ("unk_token", "<unk>"),
    ("mask_token", "<mask>"),
    ("std_token", "<|tool>"), ("etd_token", "<tool|>"), ("stc_token", "<|tool_call>"),
    ("etc_token", "<tool_call|>"), ("str_token", "<|tool_response>"), ("etr_token", "<tool_response|>"),
    ("escape_token", '<|"|>'), ("think_token", "<|think|>"), ("soc_token", "<|channel>"),
    ("eoc_token", "<channel|>"), ("sot_token", "<|turn>"), ("eot_token", "<turn|>"),
    ("boi_token", "<|image>"), ("boa_token", "<|audio>"), ("image_token", "<|image|>"),
    ("audio_token", "<|audio|>"), ("eoi_token", "<image|>"), ("eoa_token", "<audio|>"),
    ("video_token", "<|video|>"),
]

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "user model system thought declaration call response value",
    "What is the weather in Oslo? It is -3C and snowing.",
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}',
    "Describe this image: a red circle on a white background.",
    "Héllo wörld — ünïcödé テスト 🙂",
] * 20


def train_bpe_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE whose first ids are the Gemma 4 special tokens (see GEMMA4_SPECIALS)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[s for _, s in GEMMA4_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or _DEFAULT_CORPUS, trainer=trainer)
    return tok


def write_tiny_tokenizer(path: str | Path, corpus: list[str] | None = None, vocab_size: int = 512,
                         chat_template: str | None = None) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json into `path`; returns {attribute name: id}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(corpus, vocab_size)
    tok.save(str(path / "tokenizer.json"))
    cfg = {name: text for name, text in GEMMA4_SPECIALS}
    cfg["tokenizer_class"] = "GemmaTokenizer"
    cfg["model_max_length"] = 1_000_000
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return {name: tok.token_to_id(text) for name, text in GEMMA4_SPECIALS}
