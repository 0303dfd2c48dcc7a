"""A scripted mock model and a byte tokenizer, for engine tests that need no weights.

`MockModel` speaks the part of `Gemma4Unified`'s interface the engine uses (`run`, `embed`, `make_cache`,
`config`) and keeps its state in a real `KVCache` with two one-dimensional "layers":

    layer 0 (sliding)  k = token id + 1 (0 = never written), v = media value of the token (0 for text), in the
                       ring buffer, with the ring's positions in `cache.ring_pos`
    layer 1 (full)     the same, entry index = position (the config forces the last layer to be full)

For every query position q the mock reads its context back from the cache and *checks* it: every full-layer
entry in [0, q] must have been written, and the ring must hold exactly the tokens of the last `window` positions.
So engine bugs in slot compaction, rollback, prefix-cache restore or chunking raise `MockCacheError` instead of
silently producing other tokens.

Next-token logits are a fixed random table indexed by a hash of (last two tokens, the sum of all media values
so far, sum of all tokens so far mod 5), scaled by `sharpness`, plus `copy_bonus` on the token `period`
positions back when `period` is set (repetitive text): high sharpness → nearly deterministic (greedy cycles,
good for prompt lookup), low sharpness → spread distributions (sampling tests). `fixed_probs` replaces all of
that with one fixed next-token distribution (for statistical tests).

The byte tokenizer maps ids 0..5 to specials and 6..261 to the bytes 0..255, so UTF-8 characters span tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from unigemma.config import UnifiedConfig
from unigemma.model.cache import EMPTY, KVCache

PAD, EOS, BOS, IMG, VID, AUD = 0, 1, 2, 3, 4, 5
BYTE0 = 6
VOCAB = BYTE0 + 256
SPECIAL_TEXT = {PAD: "<pad>", EOS: "<eos>", BOS: "<bos>", IMG: "<img>", VID: "<vid>", AUD: "<aud>"}


class MockCacheError(AssertionError):
    """The engine handed the mock a cache whose contents do not match the token history."""


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 6) plus six specials; decode replaces broken bytes with U+FFFD."""

    eos_token_id = EOS
    bos_token_id = BOS
    pad_token_id = PAD

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + BYTE0 for b in text.encode("utf-8")]
        return [BOS] + ids if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for t in ids:
            t = int(t)
            if t >= BYTE0:
                buf.append(t - BYTE0)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(SPECIAL_TEXT.get(t, f"<{t}>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __len__(self) -> int:
        return VOCAB


@dataclass
class MockOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor
    plan: object = None


def mock_config(window: int = 8, vocab: int = VOCAB) -> UnifiedConfig:
    cfg = UnifiedConfig.from_dict({
        "model_type": "gemma4_unified_text", "vocab_size": vocab, "hidden_size": 4, "intermediate_size": 4,
        "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2,
        "global_head_dim": 2, "sliding_window": window, "layer_types": ["sliding_attention", "full_attention"],
        "eos_token_id": EOS, "bos_token_id": BOS, "pad_token_id": PAD})
    cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id = IMG, VID, AUD
    return cfg


class MockModel:
    """See the module docstring. `calls` records (kind, batch, tokens) of every forward for assertions."""

    HIDDEN = 4

    def __init__(self, window: int = 8, sharpness: float = 3.0, seed: int = 0, fixed_probs=None,
                 table_size: int = 97, period: int | None = None, copy_bonus: float = 8.0):
        self.config = mock_config(window)
        self.window = window
        self.vocab = self.config.text.vocab_size
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(table_size, self.vocab, generator=g) * sharpness
        # keep the specials rare so generations are long, except EOS, which stays possible
        self.table[:, [PAD, BOS, IMG, VID, AUD]] -= 30.0
        self.table[:, EOS] -= 4.0
        self.fixed = None if fixed_probs is None else torch.as_tensor(fixed_probs, dtype=torch.float32)
        self.period, self.copy_bonus = period, copy_bonus
        self.calls: list[tuple[str, int, int]] = []
        self._param = torch.zeros(1)

    # --- the interface the engine uses -------------------------------------------------------------------
    def parameters(self):
        yield self._param

    def make_cache(self, slots: int, max_len: int, dtype=None, device=None, spare: int = 32) -> KVCache:
        return KVCache(self.config.text, slots, max_len, torch.float32, device or "cpu", spare)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, input_features=None, **_) -> torch.Tensor:
        """(B, T, 2): channel 0 = token id, channel 1 = the media value of placeholder tokens (0 for text)."""
        e = torch.zeros(*input_ids.shape, 2)
        e[..., 0] = input_ids.float()
        media = [m for m in (pixel_values, input_features) if m is not None]
        if media:
            values = torch.cat([m.reshape(-1).float() for m in media])
            where = (input_ids == IMG) | (input_ids == VID) | (input_ids == AUD)
            n = int(where.sum())
            e[..., 1][where] = values[torch.arange(n) % values.numel()]
        return e

    def run(self, input_ids: torch.Tensor, *, position_ids=None, cache: KVCache | None = None, slots=None,
            kv_len=None, logits_to_keep=None, inputs_embeds=None, compute_logits: bool = True,
            attention_mask=None, mm_token_type_ids=None, **media) -> MockOutput:
        B, T = input_ids.shape
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, **media)
        self.calls.append(("run", B, T))
        if cache is None:  # stateless: the whole sequence is in this call
            cache = self.make_cache(B, T)
            position_ids = torch.arange(T)[None].expand(B, T)
            slots = None
        if position_ids is None:
            raise ValueError("a cached forward needs explicit position_ids")
        rows = list(range(B)) if slots is None else [int(s) for s in slots]
        ring, full = cache.layers[0], cache.layers[1]
        R = cache.ring
        logits = torch.zeros(B, T, self.vocab)
        hidden = torch.zeros(B, T, self.HIDDEN)
        for b in range(B):
            s = rows[b]
            mine: dict[int, tuple[float, float]] = {}
            for t in range(T):
                p = int(position_ids[b, t])
                if p < 0:
                    continue
                if p >= cache.max_len:
                    raise ValueError(f"position {p} is beyond the cache's context of {cache.max_len} tokens")
                mine[p] = (float(inputs_embeds[b, t, 0]) + 1, float(inputs_embeds[b, t, 1]))
                full.k[s, 0, p, 0], full.v[s, 0, p, 0] = mine[p]
            # read (and check) the context before this call's tokens reach the ring, as attention would
            for t in range(T):
                p = int(position_ids[b, t])
                if p >= 0:
                    logits[b, t] = self._logits_at(cache, s, p, mine)
                    hidden[b, t, int(inputs_embeds[b, t, 0]) % self.HIDDEN] = 1.0
            for p, (k, v) in mine.items():
                ring.k[s, 0, p % R, 0], ring.v[s, 0, p % R, 0] = k, v
                cache.ring_pos[s, p % R] = p
        if not compute_logits:
            return MockOutput(None, hidden)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = torch.gather(logits, 1, logits_to_keep[..., None].expand(-1, -1, self.vocab))
        return MockOutput(logits, hidden)

    # --- the "language" ----------------------------------------------------------------------------------
    def _logits_at(self, cache: KVCache, s: int, q: int, mine: dict) -> torch.Tensor:
        ring, full = cache.layers[0], cache.layers[1]
        toks = full.k[s, 0, : q + 1, 0]
        if bool((toks == 0).any()):
            missing = (toks == 0).nonzero().flatten().tolist()
            raise MockCacheError(f"slot {s}: query at {q} attends unwritten full-layer positions {missing[:8]}")
        R = cache.ring
        for p in range(max(0, q - self.window + 1), q + 1):
            if p in mine:  # written by this very call
                continue
            if int(cache.ring_pos[s, p % R]) != p:
                raise MockCacheError(f"slot {s}: ring lacks position {p} for a query at {q} "
                                     f"(holds {int(cache.ring_pos[s, p % R])})")
            if float(ring.k[s, 0, p % R, 0]) != float(full.k[s, 0, p, 0]) or \
                    float(ring.v[s, 0, p % R, 0]) != float(full.v[s, 0, p, 0]):
                raise MockCacheError(f"slot {s}: ring entry for position {p} differs from the full layer")
        if self.fixed is not None:
            return self.fixed.clamp_min(1e-30).log()
        last = int(toks[q]) - 1
        prev = int(toks[q - 1]) - 1 if q > 0 else -1
        media = float(full.v[s, 0, : q + 1, 0].sum())  # every soft token so far shapes what follows
        total = int(toks.sum()) - (q + 1)
        key = f"{last},{prev},{round(media, 4)},{total % 5}".encode()
        h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        out = self.table[h % self.table.shape[0]].clone()
        if self.period is not None and q + 1 - self.period >= 0:
            # repetitive text: favour repeating the token `period` positions back (prompt lookup finds it)
            out[int(toks[q + 1 - self.period]) - 1] += self.copy_bonus
        return out

    def reference_greedy(self, prompt: list[int], n: int, eos: int | None = EOS) -> list[int]:
        """Greedy tokens computed without any cache reuse: the whole sequence is recomputed every step."""
        seq, out = list(prompt), []
        for _ in range(n):
            logits = self.run(torch.tensor([seq])).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            seq.append(tok)
            if tok == eos:
                break
        return out


def empty_ring(cache: KVCache, slot: int) -> bool:
    return bool((cache.ring_pos[slot] == EMPTY).all())


# ------------------------------------------------------------------------------------------------------------
# Tiny real checkpoints (reference-built, random weights) for the engine tests that need the real model
# ------------------------------------------------------------------------------------------------------------

def make_drafter(path, target: str = "kvshare", seed: int = 7, num_assistant_tokens: int = 3):
    """Save a random gemma4_unified_assistant whose geometry mirrors the `refmodels` config `target`
    (spec/mtp-drafting.md §1.1: same head dims, kv heads, window and k_eq_v as the target); returns it."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    from refmodels import BASE_TEXT, CONFIGS, randomize

    over = CONFIGS[target][0]
    tc = {**BASE_TEXT, **{k: v for k, v in over.items() if k in (
        "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "sliding_window")}}
    tc.update(num_hidden_layers=2, hidden_size=48, intermediate_size=64, final_logit_softcapping=None,
              layer_types=["sliding_attention", "full_attention"])
    cfg = Gemma4UnifiedAssistantConfig(text_config=tc, backbone_hidden_size=BASE_TEXT["hidden_size"])
    dr = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
    randomize(dr, seed)
    # the reference's assisted generation reads the draft count from the drafter's generation config
    dr.generation_config.num_assistant_tokens = num_assistant_tokens
    dr.save_pretrained(str(path))
    return dr
