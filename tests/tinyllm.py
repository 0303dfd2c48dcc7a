"""A tiny complete checkpoint folder: random reference weights + the tiny Gemma-4-style tokenizer + the bundled
chat template, with config token ids matching the tokenizer's special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unigemma.testing import write_tiny_tokenizer


def make_tiny_checkpoint(path: Path, seed: int = 0, vision: bool = True, audio: bool = True,
                         layers: int = 4, hidden: int = 64, window: int = 16) -> Path:
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    from refmodels import randomize

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = write_tiny_tokenizer(path)
    vocab = max(512, json.loads((path / "tokenizer.json").read_text())["model"]["vocab"].__len__() + 1)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=window,
                final_logit_softcapping=30.0, pad_token_id=ids["pad_token"], bos_token_id=ids["bos_token"],
                eos_token_id=[ids["eos_token"], ids["eot_token"]])
    kw = dict(text_config=text, image_token_id=ids["image_token"], audio_token_id=ids["audio_token"],
              video_token_id=ids["video_token"], boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"],
              boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"])
    if vision:
        kw["vision_config"] = dict(mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=64)
    if audio:
        kw["audio_config"] = dict()
    torch.manual_seed(seed)
    ref = Gemma4UnifiedForConditionalGeneration(Gemma4UnifiedConfig(**kw)).eval()
    randomize(ref, seed)
    ref.save_pretrained(str(path), max_shard_size="200KB")
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["eos_token"], ids["eot_token"], ids["str_token"]], "bos_token_id": ids["bos_token"],
         "pad_token_id": ids["pad_token"]}))
    return path
