"""Prefix cache: K/V of already computed token blocks, reused by later requests that start the same way.

    prompt ──► blocks of `block_size` tokens ──► key_j = H(key_{j−1} ‖ token ids of block j ‖ media digests)
    lookup: the longest chain key_0 … key_{m−1} present ──► restore into the request's slot ──► prefill the rest
    after every prefill chunk / decode step: store newly completed blocks (LRU, evicted under a byte budget)

Sliding-window layers are why other runtimes give up on prefix reuse: their cache is a ring that only holds
the last W−1 positions, so the state "after block j" is gone once later tokens were written. Here every block
stores *per-position* K/V for all non-reuse layers (full and sliding), copied out of the cache while the
positions are still in the ring. Restoring a prefix of m blocks writes the full layers' entries [0, P) and
rebuilds the ring from the last W−1 positions (with their `ring_pos`), which is exactly the state a prefill of
those P tokens leaves behind, for any block boundary, however long the prefix is compared with the window.

Media: placeholder tokens look alike whatever image they stand for, so a block's key also covers the content
of every media run (a maximal run of one placeholder id) that overlaps it: a digest of the run's soft-token
embeddings, which equal iff the images / audio give the same model input. A whole run is hashed, not just the
block's part, because vision runs attend bidirectionally: the K/V of a run's first tokens depend on its last.

What this module does not do: decide when to store (engine/scheduler.py), or share blocks between slots
without copying (each restore copies; slots stay plain tensors so decode reads zero-copy views).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..config import FULL
from ..model.cache import EMPTY, KVCache


@dataclass
class Block:
    key: bytes
    start: int                          # first position covered
    k: list[torch.Tensor | None]        # per layer: (kv_heads, block_size, d), None for reuse layers
    v: list[torch.Tensor | None]
    nbytes: int


def media_runs(tokens: list[int], media_ids: set[int]) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of one placeholder id."""
    runs, i, n = [], 0, len(tokens)
    while i < n:
        if tokens[i] in media_ids:
            j = i + 1
            while j < n and tokens[j] == tokens[i]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


class BlockKeys:
    """The hash chain of one sequence's blocks, extended as its tokens grow."""

    def __init__(self, block_size: int, media_ids: set[int], tokens: list[int],
                 embeds: torch.Tensor | None = None, prompt_len: int | None = None):
        self.block_size = block_size
        self.keys: list[bytes] = []
        self.media_ids = media_ids
        self.prompt_len = len(tokens) if prompt_len is None else prompt_len
        self.run_digest: list[tuple[int, int, bytes]] = []
        if embeds is not None:
            for s, e in media_runs(tokens[: self.prompt_len], media_ids):
                rows = embeds[s:e].detach().float().cpu().contiguous()
                self.run_digest.append((s, e, hashlib.blake2b(rows.numpy().tobytes(), digest_size=16).digest()))

    def extend(self, tokens: list[int], upto: int) -> list[bytes]:
        """Keys of every complete block within tokens[:upto]; None-safe to call repeatedly."""
        bs = self.block_size
        while (len(self.keys) + 1) * bs <= min(upto, len(tokens)):
            j = len(self.keys)
            s, e = j * bs, (j + 1) * bs
            block = tokens[s:e]
            if e > self.prompt_len and any(t in self.media_ids for t in block[max(0, self.prompt_len - s):]):
                break  # generated placeholder ids have no media behind them: never share such blocks
            h = hashlib.blake2b(digest_size=16)
            h.update(self.keys[-1] if self.keys else b"root")
            h.update(torch.tensor(block, dtype=torch.int64).numpy().tobytes())
            for rs, re_, d in self.run_digest:
                if rs < e and re_ > s:
                    h.update(d)
            self.keys.append(h.digest())
        return self.keys


class PrefixCache:
    """Blocks of per-position K/V keyed by hash chains; LRU eviction under `max_bytes`."""

    def __init__(self, cache: KVCache, block_size: int = 16, max_bytes: int = 1 << 30,
                 media_ids: set[int] | None = None):
        if block_size < 1:
            raise ValueError(f"prefix cache block_size={block_size}: expected an integer >= 1")
        if max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes={max_bytes}: expected >= 0")
        self.cache = cache
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.media_ids = set(media_ids or ())
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        types = cache.config.layer_types
        self.full_layers = [i for i, lk in enumerate(cache.layers) if lk is not None and types[i] == FULL]
        self.ring_layers = [i for i, lk in enumerate(cache.layers) if lk is not None and types[i] != FULL]

    def keys_for(self, tokens: list[int], embeds: torch.Tensor | None = None) -> BlockKeys:
        return BlockKeys(self.block_size, self.media_ids, tokens, embeds)

    # --- lookup / restore ----------------------------------------------------------------------------------
    def lookup(self, keys: list[bytes], max_tokens: int) -> list[Block]:
        """The longest run of stored blocks from the start, covering at most max_tokens tokens."""
        found = []
        for j, key in enumerate(keys):
            if (j + 1) * self.block_size > max_tokens:
                break
            b = self.blocks.get(key)
            if b is None:
                break
            found.append(b)
        if found:
            self.hits += 1
            self._touch(found)
        else:
            self.misses += 1
        return found

    def restore(self, blocks: list[Block], slot: int) -> int:
        """Write the blocks' K/V into `slot` as a prefill of those tokens would have; returns the token count."""
        if not blocks:
            return 0
        c = self.cache
        P = len(blocks) * self.block_size
        for i in self.full_layers:
            lk = c.layers[i]
            lk.k[slot, :, :P] = torch.cat([b.k[i] for b in blocks], dim=1)
            lk.v[slot, :, :P] = torch.cat([b.v[i] for b in blocks], dim=1)
        c.ring_pos[slot] = EMPTY
        if self.ring_layers:
            n = min(P, c.window - 1)  # what the next query needs: the W − 1 positions before it
            first = (P - n) // self.block_size
            tail = blocks[first:]
            off = P - n - first * self.block_size
            pos = torch.arange(P - n, P, device=c.device)
            idx = pos % c.ring
            for i in self.ring_layers:
                lk = c.layers[i]
                # lk.k[slot] is a view, so the indexed assignment lands in the cache: (kv_heads, n, d)
                lk.k[slot][:, idx] = torch.cat([b.k[i] for b in tail], dim=1)[:, off:]
                lk.v[slot][:, idx] = torch.cat([b.v[i] for b in tail], dim=1)[:, off:]
            c.ring_pos[slot, idx] = pos
        return P

    # --- store -------------------------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return key in self.blocks

    def store(self, key: bytes, start: int, slot: int) -> bool:
        """Copy positions [start, start + block_size) of `slot` into a new block. False when the ring no longer
        holds them (then no later block of this sequence can be stored either) or the budget is too small."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return True
        c = self.cache
        bs = self.block_size
        pos = torch.arange(start, start + bs, device=c.device)
        idx = pos % c.ring
        if self.ring_layers and not bool((c.ring_pos[slot, idx] == pos).all()):
            return False
        k: list[torch.Tensor | None] = [None] * len(c.layers)
        v: list[torch.Tensor | None] = [None] * len(c.layers)
        nbytes = 0
        for i in self.full_layers:
            k[i] = c.layers[i].k[slot, :, start:start + bs].clone()
            v[i] = c.layers[i].v[slot, :, start:start + bs].clone()
        for i in self.ring_layers:
            k[i] = c.layers[i].k[slot][:, idx]  # advanced indexing copies: (kv_heads, block_size, d)
            v[i] = c.layers[i].v[slot][:, idx]
        for t in k + v:
            if t is not None:
                nbytes += t.numel() * t.element_size()
        if nbytes > self.max_bytes:
            return False
        self.blocks[key] = Block(key, start, k, v, nbytes)
        self.nbytes += nbytes
        self._evict()
        return key in self.blocks

    def _touch(self, chain: list[Block]) -> None:
        # leaf first, root last: the root ends up most recent, so eviction takes the deepest blocks first and a
        # chain is never left with a hole in the middle (lookups stop at the first missing key)
        for b in reversed(chain):
            if b.key in self.blocks:
                self.blocks.move_to_end(b.key)

    def touch_keys(self, keys: list[bytes]) -> None:
        self._touch([self.blocks[k] for k in keys if k in self.blocks])

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self.blocks:
            _, b = self.blocks.popitem(last=False)
            self.nbytes -= b.nbytes
            self.evictions += 1

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0
