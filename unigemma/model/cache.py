"""The KV cache the decoder asks for (`make_cache`): preallocated tensors, no Python lists that grow.

    full layers     k, v: (slots, kv_heads, max_len + 1, head_dim)  — entry index = absolute position
    sliding layers  k, v: (slots, kv_heads, R + 1, head_dim)        — ring buffer, entry = position % R
                    ring_pos: (slots, R + 1) int64, shared by all sliding layers: the absolute position held by
                    each ring entry (EMPTY when none)
    reuse layers    nothing (they read the K/V of their "store" layer in the same forward)

R = sliding_window − 1 + spare. A sliding layer needs the W − 1 keys before a query; the `spare` extra entries let a
decode or verification step of up to `spare` tokens be written *before* attending (no concatenation), and let
speculative decoding roll back up to `spare` tokens without losing keys that are still inside the window.
The last entry of each axis (index max_len or R) is a scratch slot that absorbs writes of padding tokens.

The cache holds no lengths: the caller passes absolute positions with every forward, which is what makes rewinding
(speculative rollback) free — stale entries beyond a row's position are simply never visible (causality), and are
overwritten when those positions are written again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import FULL, SLIDING, TextConfig

EMPTY = -(2 ** 40)  # ring_pos value of an entry that holds nothing; fails every window test


@dataclass
class LayerKV:
    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    def __init__(self, config: TextConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", spare: int = 32):
        if max_len < 1 or slots < 1:
            raise ValueError(f"KV cache needs slots >= 1 and max_len >= 1, got slots={slots}, max_len={max_len}")
        self.config = config
        self.slots = slots
        self.max_len = max_len
        self.window = config.sliding_window
        self.ring = min(config.sliding_window - 1 + spare, max_len)  # R: never more than the context itself
        self.spare = self.ring - (config.sliding_window - 1)
        self.dtype = dtype
        self.device = torch.device(device)
        modes = config.kv_sharing_modes
        self.layers: list[LayerKV | None] = []
        for i, t in enumerate(config.layer_types):
            if modes[i] == "reuse":
                self.layers.append(None)
                continue
            n = (max_len if t == FULL else self.ring) + 1
            shape = (slots, config.layer_kv_heads[i], n, config.layer_head_dim[i])
            self.layers.append(LayerKV(torch.zeros(shape, dtype=dtype, device=self.device),
                                       torch.zeros(shape, dtype=dtype, device=self.device)))
        self.has_sliding = SLIDING in config.layer_types
        self.ring_pos = torch.full((slots, self.ring + 1), EMPTY, dtype=torch.long, device=self.device)

    # --- bookkeeping for the engine ---------------------------------------------------------------------
    def nbytes(self) -> int:
        n = self.ring_pos.numel() * self.ring_pos.element_size()
        for lk in self.layers:
            if lk is not None:
                n += lk.k.numel() * lk.k.element_size() * 2
        return n

    def reset_slot(self, slot: int) -> None:
        """Forget a slot's sliding entries (full-layer entries need no reset: positions are rewritten in order)."""
        self.ring_pos[slot] = EMPTY

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy everything slot `src` holds into slot `dst` (compaction, forking a sequence for n > 1)."""
        for lk in self.layers:
            if lk is not None:
                lk.k[dst].copy_(lk.k[src])
                lk.v[dst].copy_(lk.v[src])
        self.ring_pos[dst].copy_(self.ring_pos[src])

    def truncate(self, slot: int, length: int) -> None:
        """Rewind slot to `length` tokens: drop ring entries at positions >= length (full layers need nothing)."""
        rp = self.ring_pos[slot]
        rp.masked_fill_(rp >= length, EMPTY)

    def ring_view_ok(self, slot: int, length: int) -> bool:
        """True when the ring still holds every key a query at position `length` needs (after a rollback)."""
        need = max(0, length - (self.window - 1))
        have = set(self.ring_pos[slot].tolist())
        return all(p in have for p in range(need, length))

    # --- reading / writing (used by the attention layers) ------------------------------------------------
    def full_kv(self, layer: int, slots: torch.Tensor | None, batch: int, kv_len: int):
        lk = self.layers[layer]
        if slots is None:
            return lk.k[:batch, :, :kv_len], lk.v[:batch, :, :kv_len]
        return lk.k[slots, :, :kv_len], lk.v[slots, :, :kv_len]

    def ring_kv(self, layer: int, slots: torch.Tensor | None, batch: int):
        lk = self.layers[layer]
        if slots is None:
            return lk.k[:batch], lk.v[:batch]
        return lk.k[slots], lk.v[slots]

    def gather_kv(self, layer: int, slots: torch.Tensor, index: torch.Tensor):
        """Entries index (B, P) of cache slots `slots` (B,) → k, v (B, kv_heads, P, head_dim) (copies)."""
        lk = self.layers[layer]
        rows = slots[:, None]
        return lk.k[rows, :, index].transpose(1, 2), lk.v[rows, :, index].transpose(1, 2)

    def ring_positions(self, slots: torch.Tensor | None, batch: int) -> torch.Tensor:
        return self.ring_pos[:batch] if slots is None else self.ring_pos[slots]

    def write(self, layer: int, rows: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, kv_heads, T, d) written at [rows (B,T), :, index (B,T)]."""
        lk = self.layers[layer]
        lk.k[rows, :, index] = k.transpose(1, 2).to(lk.k.dtype)
        lk.v[rows, :, index] = v.transpose(1, 2).to(lk.v.dtype)


def make_cache(config: TextConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", spare: int = 32) -> KVCache:
    return KVCache(config, slots, max_len, dtype, device, spare)
