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

Memory: blocks live in one pool preallocated (and touched) when the cache is made, `max_bytes` in all (default:
as much as the KV cache itself). A long-running server therefore does not grow while the cache fills: storing a
block takes a free pool entry or the least recently used one.

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
    index: int                          # entry in the pool: pool_k[layer][index] is (kv_heads, block_size, d)
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
    """Blocks of per-position K/V keyed by hash chains, in a preallocated pool of `max_bytes`; LRU eviction."""

    def __init__(self, cache: KVCache, block_size: int = 16, max_bytes: int | None = None,
                 media_ids: set[int] | None = None):
        if block_size < 1:
            raise ValueError(f"prefix cache block_size={block_size}: expected an integer >= 1")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes={max_bytes}: expected >= 0")
        self.cache = cache
        self.block_size = block_size
        self.media_ids = set(media_ids or ())
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.hits = self.misses = self.evictions = 0
        types = cache.config.layer_types
        self.full_layers = [i for i, lk in enumerate(cache.layers) if lk is not None and types[i] == FULL]
        self.ring_layers = [i for i, lk in enumerate(cache.layers) if lk is not None and types[i] != FULL]
        layers = self.full_layers + self.ring_layers
        self.block_bytes = sum(2 * cache.layers[i].k.shape[1] * block_size * cache.layers[i].k.shape[3]
                               * cache.layers[i].k.element_size() for i in layers)
        self.max_bytes = cache.nbytes() if max_bytes is None else max_bytes
        self.capacity = self.max_bytes // self.block_bytes if self.block_bytes else 0
        # zeros, not empty: the pages are touched now, so memory in use is what it will stay
        self.pool_k: dict[int, torch.Tensor] = {}
        self.pool_v: dict[int, torch.Tensor] = {}
        for i in layers:
            lk = cache.layers[i]
            shape = (self.capacity, lk.k.shape[1], block_size, lk.k.shape[3])
            self.pool_k[i] = torch.zeros(shape, dtype=lk.k.dtype, device=cache.device)
            self.pool_v[i] = torch.zeros(shape, dtype=lk.v.dtype, device=cache.device)
        self.free: list[int] = list(range(self.capacity - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks in use (the pool itself is `capacity × block_bytes`, allocated up front)."""
        return len(self.blocks) * self.block_bytes

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
        idx_all = torch.tensor([b.index for b in blocks], device=c.device)
        for i in self.full_layers:
            lk = c.layers[i]
            # pool (n, kv_heads, bs, d) → (kv_heads, n·bs, d)
            lk.k[slot, :, :P] = self.pool_k[i][idx_all].transpose(0, 1).reshape(lk.k.shape[1], P, -1)
            lk.v[slot, :, :P] = self.pool_v[i][idx_all].transpose(0, 1).reshape(lk.v.shape[1], P, -1)
        c.ring_pos[slot] = EMPTY
        if self.ring_layers:
            n = min(P, c.window - 1)  # what the next query needs: the W − 1 positions before it
            first = (P - n) // self.block_size
            tail = idx_all[first:]
            off = P - n - first * self.block_size
            pos = torch.arange(P - n, P, device=c.device)
            idx = pos % c.ring
            for i in self.ring_layers:
                lk = c.layers[i]
                kh = lk.k.shape[1]
                k = self.pool_k[i][tail].transpose(0, 1).reshape(kh, -1, lk.k.shape[3])[:, off:]
                v = self.pool_v[i][tail].transpose(0, 1).reshape(kh, -1, lk.v.shape[3])[:, off:]
                # lk.k[slot] is a view, so the indexed assignment lands in the cache: (kv_heads, n, d)
                lk.k[slot][:, idx] = k
                lk.v[slot][:, idx] = v
            c.ring_pos[slot, idx] = pos
        return P

    # --- store -------------------------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return key in self.blocks

    def store(self, key: bytes, start: int, slot: int) -> bool:
        """Copy positions [start, start + block_size) of `slot` into a pool entry. False when the ring no longer
        holds them (then no later block of this sequence can be stored either) or the pool has no room at all."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return True
        if self.capacity == 0:
            return False
        c = self.cache
        bs = self.block_size
        pos = torch.arange(start, start + bs, device=c.device)
        idx = pos % c.ring
        if self.ring_layers and not bool((c.ring_pos[slot, idx] == pos).all()):
            return False
        if not self.free:
            self._evict_one()
        e = self.free.pop()
        for i in self.full_layers:
            self.pool_k[i][e] = c.layers[i].k[slot, :, start:start + bs]
            self.pool_v[i][e] = c.layers[i].v[slot, :, start:start + bs]
        for i in self.ring_layers:
            self.pool_k[i][e] = c.layers[i].k[slot][:, idx]
            self.pool_v[i][e] = c.layers[i].v[slot][:, idx]
        self.blocks[key] = Block(key, start, e, self.block_bytes)
        return True

    def _touch(self, chain: list[Block]) -> None:
        # leaf first, root last: the root ends up most recent, so eviction takes the deepest blocks first and a
        # chain is never left with a hole in the middle (lookups stop at the first missing key)
        for b in reversed(chain):
            if b.key in self.blocks:
                self.blocks.move_to_end(b.key)

    def touch_keys(self, keys: list[bytes]) -> None:
        self._touch([self.blocks[k] for k in keys if k in self.blocks])

    def _evict_one(self) -> None:
        _, b = self.blocks.popitem(last=False)
        self.free.append(b.index)
        self.evictions += 1

    def clear(self) -> None:
        self.free.extend(b.index for b in self.blocks.values())
        self.blocks.clear()
