#!/usr/bin/env python3
"""The demo model's tokenizer: a byte-level BPE trained on the rendered demo training conversations.

    python scripts/demo/make_tokenizer.py --data data/demo --out data/demo/tokenizer --vocab-size 4096 > ids.json

writes into --out

    tokenizer.json          HF `tokenizers` BPE: every Gemma 4 format token and placeholder first, at ids 0..23
                            (unigemma.testing.GEMMA4_SPECIALS order), then the 256 byte symbols, then merges
    tokenizer_config.json   the special tokens by attribute name (bos_token, image_token, eot_token, ...)
    chat_template.jinja     a copy of unigemma's bundled Gemma 4 template

and prints one JSON object with the ids a model config needs (config field names: `pad_token_id`,
`image_token_id`, `eoa_token_index`, ..., `eos_token_id` = [<eos>, <turn|>, <|tool_response>], `vocab_size`).

The corpus is every (prompt, completion) text of train.jsonl as `make_data.training_segments` renders it, cut
at the format-token strings: those are atomic special tokens, so BPE must not spend merges on their pieces.
Digits are split one per token before BPE (as Gemma's own tokenizer does), so "47 + 38" is seen digit by digit,
which is what a small model needs to learn carries. Training is deterministic for a given corpus.

What this does not do: make the data (make_data.py) or the model config.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_data  # noqa: E402  (scripts/demo/make_data.py; it also puts the checkout on sys.path)

from unigemma.inputs.template import BUNDLED_TEMPLATE_PATH, ChatTemplate  # noqa: E402
from unigemma.inputs.tokenizer import Tokenizer  # noqa: E402
from unigemma.testing import GEMMA4_SPECIALS  # noqa: E402

_SPECIAL_SPLIT = re.compile("|".join(re.escape(s) for _, s in sorted(GEMMA4_SPECIALS, key=lambda x: -len(x[1]))))

# tokenizer_config attribute → model config field (eoa is `eoa_token_index` in the reference config).
CONFIG_FIELDS = {"pad_token": "pad_token_id", "bos_token": "bos_token_id", "image_token": "image_token_id",
                 "audio_token": "audio_token_id", "video_token": "video_token_id", "boi_token": "boi_token_id",
                 "eoi_token": "eoi_token_id", "boa_token": "boa_token_id", "eoa_token": "eoa_token_index"}
STOP_TOKENS = ("eos_token", "eot_token", "str_token")  # <eos>, <turn|>, <|tool_response> (chat-format.md §1)


def corpus_from_records(records: list[dict], template: ChatTemplate | None = None) -> list[str]:
    """Rendered training text with the format-token strings cut out (one string per piece between them)."""
    template = template or ChatTemplate.bundled()
    out: list[str] = []
    for rec in records:
        for prompt, completion in make_data.training_segments(rec, template):
            out += [p for p in _SPECIAL_SPLIT.split(prompt + completion) if p]
    return out


def train_tokenizer(corpus: list[str], vocab_size: int = 4096) -> HFTokenizer:
    """Byte-level BPE with the Gemma 4 specials at ids 0..len(GEMMA4_SPECIALS)-1 and one token per digit."""
    if vocab_size < len(GEMMA4_SPECIALS) + 256:
        raise ValueError(f"vocab_size must be at least {len(GEMMA4_SPECIALS) + 256} (specials + 256 bytes), "
                         f"got {vocab_size}")
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[s for _, s in GEMMA4_SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def write_tokenizer(out: str | Path, tok: HFTokenizer) -> dict:
    """Write the three files; returns the model-config ids (see module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg: dict = {name: text for name, text in GEMMA4_SPECIALS}
    cfg.update({"tokenizer_class": "GemmaTokenizer", "model_max_length": 4096, "add_bos_token": False,
                "padding_side": "left"})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(BUNDLED_TEMPLATE_PATH.read_text(encoding="utf-8"), encoding="utf-8")
    loaded = Tokenizer.from_dir(out)  # read back through unigemma's own loader: what the model will use
    ids = loaded.special_ids
    for name, text in GEMMA4_SPECIALS:
        assert ids.get(name) == tok.token_to_id(text), (name, ids.get(name))
    result = {field: ids[name] for name, field in CONFIG_FIELDS.items()}
    result["eos_token_id"] = [ids[n] for n in STOP_TOKENS]
    result["vocab_size"] = tok.get_vocab_size()
    result["special_ids"] = {name: ids[name] for name, _ in GEMMA4_SPECIALS}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder holding train.jsonl (make_data.py --out)")
    p.add_argument("--out", required=True, help="tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args(argv)
    start = time.perf_counter()
    train = Path(args.data) / "train.jsonl"
    if not train.is_file():
        raise SystemExit(f"{train} not found: run scripts/demo/make_data.py --out {args.data} first")
    corpus = corpus_from_records(make_data.read_jsonl(train))
    tok = train_tokenizer(corpus, args.vocab_size)
    ids = write_tokenizer(args.out, tok)
    if ids["vocab_size"] < args.vocab_size:
        print(f"note: the corpus supports only {ids['vocab_size']} tokens (asked for {args.vocab_size}); "
              "pad the model's vocab_size up if it needs a multiple", file=sys.stderr)
    print(f"wrote {args.out} ({ids['vocab_size']} tokens) from {len(corpus)} text pieces in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
