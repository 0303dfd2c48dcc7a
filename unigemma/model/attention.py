"""Attention for sliding and full layers, with k_eq_v, KV sharing, and the masks (spec/unified-model.md §4, §11).

Masks are boolean "may attend" tensors built once per forward per layer type (`AttentionPlan`), from absolute
positions:

    sliding:  visible = valid_k ∧ ((k ≤ q ∧ k > q − W) ∨ same_vision_block(q, k))
    full:     visible = valid_k ∧ ( k ≤ q                ∨ same_vision_block(q, k))

Vision blocks (each image / each video frame: a maximal run of image or video placeholders) see themselves
bidirectionally, on both layer types, as the reference's plain forward does (spec §11.2, path 1). Block ids are
derived from the placeholder token ids, so callers need not pass token-type ids.

With a cache the keys come from it: full layers read entries [0, kv_len) after writing this step's keys; sliding
layers either write first and read the ring (short steps: decode, verification) or read the ring as it was and
concatenate this chunk's keys (long prefill chunks, which would overwrite keys still needed). With GQA, cached
forwards of a few tokens (decode, verification) fold each K/V head's query heads into the query axis instead of
copying the cached K/V once per query head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, SLIDING, TextConfig
from .cache import EMPTY, KVCache
from . import fusion
from .layers import RMSNorm


def vision_block_ids(is_vision: torch.Tensor) -> torch.Tensor:
    """(B, T) bool → (B, T) int64: index of the contiguous vision run a token belongs to, −1 for other tokens."""
    prev = torch.zeros_like(is_vision)
    prev[:, 1:] = is_vision[:, :-1]
    starts = is_vision & ~prev
    ids = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_vision, ids, torch.full_like(ids, -1))


def _ensure_nonempty(visible: torch.Tensor) -> torch.Tensor:
    # A query with no visible key (a padding position) would produce NaN that then leaks through 0·NaN in later
    # layers; let such rows see every key: their outputs are ignored anyway.
    empty = ~visible.any(dim=-1, keepdim=True)
    return visible | empty


@dataclass
class AttentionPlan:
    """Everything the layers of one forward share: rope tables, masks, cache write indices, shared K/V."""

    cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[str, torch.Tensor]                 # type → (B, 1, T, S) bool
    cache: KVCache | None = None
    rows: torch.Tensor | None = None               # (B, T) cache slot of each token
    full_index: torch.Tensor | None = None         # (B, T) write index in full layers
    ring_index: torch.Tensor | None = None         # (B, T) write index in the ring
    sliding_write_first: bool = True
    slots: torch.Tensor | None = None
    kv_len: int = 0
    shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    folded: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    read_only: bool = False                        # a canvas plan: attend cache + this call's keys, write nothing
    # build_prefix_plan (DiffusionGemma): type → (B, P) cache entries of each row's visible prefix, in position
    # order (front-padded); on the CPU, type → [(rows or None for all, keys)] groups attended over their own keys
    prefix: dict[str, torch.Tensor] = field(default_factory=dict)
    key_groups: dict[str, list] = field(default_factory=dict)
    separate_rows: bool = False                    # the experts run each row's tokens apart (moe.Experts.forward)

    def folded_mask(self, layer_type: str, group: int) -> torch.Tensor:
        """masks[layer_type] (B, 1, T, S) repeated for `group` query heads folded into the query axis:
        (B, 1, group·T, S), row g·T + t = query t (built once per forward)."""
        key = (layer_type, group)
        m = self.folded.get(key)
        if m is None:
            base = self.masks[layer_type]
            B, _, T, S = base.shape
            m = self.folded[key] = base[:, :, None].expand(B, 1, group, T, S).reshape(B, 1, group * T, S)
        return m


def build_plan(config: TextConfig, positions: torch.Tensor, rope, dtype: torch.dtype,
               block_ids: torch.Tensor | None, key_valid: torch.Tensor | None = None,
               cache: KVCache | None = None, slots: torch.Tensor | None = None,
               kv_len: int | None = None, segment_ids: torch.Tensor | None = None) -> AttentionPlan:
    """positions: (B, T) absolute positions, −1 marks padding tokens (cache mode only).

    segment_ids (B, T), no cache only: several sequences packed in one row (training); a token sees only keys of
    its own segment, and each segment's positions start again at 0 (causality and the window follow positions).

    Without a cache the keys are this call's tokens (key_valid = the 2-D attention mask). With a cache, key
    validity comes from positions; `slots` maps batch rows to cache slots (None: rows 0..B−1).
    """
    B, T = positions.shape
    dev = positions.device
    types = sorted(set(config.layer_types))
    cos_sin = {t: rope(positions.clamp(min=0), t, dtype) for t in types}
    W = config.sliding_window
    q = positions[:, :, None]  # (B, T, 1)
    same_block = None
    if block_ids is not None and T > 1 and bool((block_ids >= 0).any()):
        same_block = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)

    if cache is None:
        k = positions[:, None, :]
        valid = torch.ones(B, 1, T, dtype=torch.bool, device=dev) if key_valid is None else key_valid.bool()[:, None, :]
        causal = k <= q
        if segment_ids is not None:
            causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
        masks = {}
        for t in types:
            if same_block is not None and config.family_vision_mask:
                vis = (causal | same_block) & (k > q - W) if t == SLIDING else causal
            else:
                vis = causal & (k > q - W) if t == SLIDING else causal
                if same_block is not None:
                    vis = vis | same_block
            masks[t] = _ensure_nonempty(vis & valid)[:, None]
        return AttentionPlan(cos_sin, masks)

    # ---- cached forward ----
    if segment_ids is not None:
        raise ValueError("segment_ids (packed sequences) are for training forwards without a cache")
    real = positions >= 0
    if slots is None:
        row_of = torch.arange(B, device=dev)
    else:
        row_of = slots.to(dev)
    rows = row_of[:, None].expand(B, T)
    full_index = torch.where(real, positions, torch.full_like(positions, cache.max_len))
    if kv_len is None:
        kv_len = int(positions.max()) + 1
    if kv_len > cache.max_len:
        raise ValueError(f"position {kv_len - 1} is beyond the cache's context of {cache.max_len} tokens")
    masks: dict[str, torch.Tensor] = {}
    plan = AttentionPlan(cos_sin, masks, cache, rows, full_index, None, True, slots, kv_len)

    if FULL in types:
        kpos = torch.arange(kv_len, device=dev)[None, None, :]
        vis = kpos <= q
        if same_block is not None and not config.family_vision_mask:  # family: full layers stay causal
            cols = torch.where(real, positions, torch.zeros_like(positions)).clamp(max=kv_len - 1)
            overlay = torch.zeros(B, T, kv_len, dtype=torch.bool, device=dev)
            overlay.scatter_(2, cols[:, None, :].expand(B, T, T), same_block & real[:, None, :])
            vis = vis | overlay
        masks[FULL] = _ensure_nonempty(vis & real[:, :, None])[:, None]

    if SLIDING in types:
        R = cache.ring
        # Only the last R real tokens of a row reach the ring (earlier ones would collide on the same entry).
        row_last = positions.max(dim=1, keepdim=True).values
        to_ring = real & (positions > row_last - R)
        ring_index = torch.where(to_ring, positions % R, torch.full_like(positions, R))
        plan.ring_index = ring_index
        write_first = T <= cache.spare
        plan.sliding_write_first = write_first
        ring_pos = cache.ring_positions(slots, B)
        if write_first:
            # Record this step's positions first (other rows' entries are untouched), then mask from the ring alone.
            cache.ring_pos[rows, ring_index] = torch.where(to_ring, positions, torch.full_like(positions, EMPTY))
            cache.ring_pos[:, R] = EMPTY
            kpos = cache.ring_positions(slots, B)[:, None, :]  # (B, 1, R+1)
            cols = ring_index
        else:
            # Ring entries at positions >= this chunk's first position are stale (rolled back): hide them.
            start = torch.where(real, positions, torch.full_like(positions, 2 ** 40)).min(dim=1, keepdim=True).values
            old = torch.where(ring_pos < start, ring_pos, torch.full_like(ring_pos, EMPTY))
            kpos = torch.cat([old, torch.where(real, positions, torch.full_like(positions, EMPTY))], dim=1)[:, None, :]
            cols = torch.arange(T, device=dev)[None, :].expand(B, T) + (R + 1)
        vis = (kpos <= q) & (kpos > q - W)
        if same_block is not None:
            overlay = torch.zeros(B, T, kpos.shape[-1], dtype=torch.bool, device=dev)
            overlay.scatter_(2, cols[:, None, :].expand(B, T, T), same_block & real[:, None, :])
            if config.family_vision_mask:
                vis = ((kpos <= q) | overlay) & (kpos > q - W)
            else:
                vis = vis | overlay
        masks[SLIDING] = _ensure_nonempty(vis & real[:, :, None])[:, None]
    return plan


def build_prefix_plan(config: TextConfig, positions: torch.Tensor, rope, dtype: torch.dtype, cache: KVCache,
                      slots: torch.Tensor | None = None, causal: bool = True,
                      prefix_len: int | None = None) -> AttentionPlan:
    """DiffusionGemma's two passes: each row's T tokens at positions start_b + [0, T) attend to keys laid out as the
    reference's dynamic cache lays them out, [the cached prefix the row may see, in position order | this call's T
    keys]: full layers the whole prefix [0, start_b), sliding layers its last min(start_b, W − 1) positions.

    causal (the encoder): this call's keys causally (sliding: within the window), and they are written to the cache
    after attending (`finish_plan` records the ring positions). causal=False (the denoiser's canvas): every key
    visible, no window over the canvas (the reference passes the denoiser no mask), and the cache is only read.

    Why this layout rather than the cache's own (the ring in ring order, full layers up to the longest row): a
    kernel's result depends on which keys it sums over and in what order, even masked ones (CPU SDPA rounds
    differently with extra masked keys or permuted ones), and the denoising chain feeds each step's logits back, so
    one ulp grows into other tokens. With the reference's keys a CPU float32 forward is bit-identical to it.
    Rows whose prefixes are shorter than the longest are padded at the front (masked). On the CPU a row's result
    does not depend on its batch either: `plan.key_groups` lets the layers attend each group of rows with equal
    prefixes over exactly its own keys (`_attend_groups`), and `plan.separate_rows` has the experts run each row's
    tokens in products of their own (moe.Experts.forward). On CUDA one masked call serves the batch.
    Positions must be consecutive within a row (positions[b] = start_b + [0, T)).

    prefix_len (the canvas's CUDA graph, engine/diffusion.py `DenoiseGraphs`): a fixed prefix width, at least
    every row's start (sliding layers: min(prefix_len, W − 1)); the shapes then depend on it alone and the plan
    reads nothing back to the host, so the forward can be captured. One masked call serves the batch (no
    per-row groups): on the CPU this rounds differently from the exact layout above, within float32 error.
    """
    B, T = positions.shape
    dev = positions.device
    types = sorted(set(config.layer_types))
    W = config.sliding_window
    start = positions[:, :1]                                                          # (B, 1)
    static = prefix_len is not None
    if static:
        kv_len = prefix_len + T
    else:
        kv_len = int(positions.max()) + 1
    if kv_len > cache.max_len:
        raise ValueError(f"position {kv_len - 1} is beyond the cache's context of {cache.max_len} tokens")
    cos_sin = {t: rope(positions, t, dtype) for t in types}
    q = positions[:, :, None]                                                         # (B, T, 1)
    plan = AttentionPlan(cos_sin, {}, cache, slots=slots, kv_len=kv_len, read_only=not causal,
                         separate_rows=dev.type != "cuda" and not static)
    plan.rows = (torch.arange(B, device=dev) if slots is None else slots.to(dev))[:, None].expand(B, T)
    for t in types:
        n = start if t == FULL else start.clamp(max=W - 1)                            # (B, 1) prefix keys per row
        if static:
            P = prefix_len if t == FULL else min(prefix_len, W - 1)
        else:
            P = int(n.max())
        pp = start - P + torch.arange(P, device=dev)[None, :]                          # (B, P) prefix positions
        valid = pp >= start - n
        plan.prefix[t] = pp.clamp(min=0) if t == FULL else pp.clamp(min=0) % cache.ring
        vis = torch.cat([valid, torch.ones(B, T, dtype=torch.bool, device=dev)], dim=1)[:, None, :]  # (B, 1, S)
        if causal:
            kpos = torch.cat([pp, positions], dim=1)[:, None, :]
            vis = vis & (kpos <= q)
            if t == SLIDING:
                vis = vis & (kpos > q - W)
        plan.masks[t] = vis.expand(B, T, P + T)[:, None]                              # (B, 1, T, P + T)
        if plan.separate_rows:
            counts = n.flatten().tolist()
            plan.key_groups[t] = [(torch.tensor([b for b in range(B) if counts[b] == c], device=dev), c + T)
                                  for c in sorted(set(counts))] if len(set(counts)) > 1 else [(None, P + T)]
    if causal:
        plan.full_index = positions
        to_ring = positions > positions.max(dim=1, keepdim=True).values - cache.ring  # the last R reach the ring
        plan.ring_index = torch.where(to_ring, positions % cache.ring, torch.full_like(positions, cache.ring))
        plan.sliding_write_first = False  # finish_plan records the ring positions after the layers
    return plan


def build_canvas_plan(config: TextConfig, positions: torch.Tensor, rope, dtype: torch.dtype, cache: KVCache,
                      kv_len: int | torch.Tensor, slots: torch.Tensor | None = None,
                      prefix_len: int | None = None) -> AttentionPlan:
    """DiffusionGemma's denoiser: T canvas tokens at `positions` (B, T), row b right after its cached prefix
    [0, kv_len[b]) (one length, or one per row (B,)), attend with no mask among themselves and to that prefix
    (sliding layers: its last W − 1 positions, what the reference's sliding cache keeps); the cache is only read.
    See build_prefix_plan (prefix_len: the static, capturable layout; the caller has checked the positions)."""
    if prefix_len is None:
        lens = torch.as_tensor(kv_len, device=positions.device).reshape(-1).expand(positions.shape[0])
        if not bool((positions[:, 0] == lens).all()):
            raise ValueError("a canvas starts right after its cached prefix: positions[:, 0] must equal kv_len")
    return build_prefix_plan(config, positions, rope, dtype, cache, slots, causal=False, prefix_len=prefix_len)


def finish_plan(plan: AttentionPlan) -> None:
    """After all layers ran: record the ring positions written by a concatenating (long-chunk) forward."""
    if plan.cache is not None and plan.ring_index is not None and not plan.sliding_write_first:
        c = plan.cache
        pos = torch.where(plan.ring_index < c.ring, plan.full_index, torch.full_like(plan.full_index, EMPTY))
        c.ring_pos[plan.rows, plan.ring_index] = pos
        c.ring_pos[:, c.ring] = EMPTY


_FOLD_MAX_T = 64  # cached forwards of up to this many tokens fold GQA heads into the query axis (no K/V copy)


def _attend_few(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ · 1.0 where mask) · v for a few query rows R against many cached keys S.

    q (B, KV, R, d), k/v (B, KV, S, d), mask (B, 1, R, S) bool → (B, KV, R, d). On CUDA as two batched matmuls
    around a float32 softmax (scores rounded to q's dtype first, as the reference's eager attention does): SDPA's
    fused kernels run one thread block per (batch, head, 32 query rows), so a 12B full layer (one K/V head, 16
    folded query rows, d = 512) streamed all 4,096 cached keys through a single block (~0.4 ms on an H100); the
    matmuls spread the keys over the whole GPU. Elsewhere SDPA (its CPU kernels are fast for this shape).
    """
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return _attend_matmul(q, k, v, mask)


def _attend_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2))                                   # (B, KV, R, S)
    probs = fusion.masked_softmax(scores, mask).to(v.dtype)
    return torch.matmul(probs, v)                                                   # (B, KV, R, d)


def _attend_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, groups: list,
                   group: int) -> torch.Tensor:
    """A prefix plan's attention on the CPU (build_prefix_plan): q (B, H, T, d); k/v (B, KV, S, d), each row's keys
    right-aligned; mask (B, 1, T, S). For each (rows, n) of `groups` (rows None: all), those rows attend over
    their last n keys only, which are exactly the reference's keys for them: no padding enters a sum."""
    S = k.shape[2]
    if group > 1:  # GQA: each KV head serves `group` consecutive query heads
        B, KV, _, d = k.shape
        k = k[:, :, None].expand(B, KV, group, S, d).reshape(B, KV * group, S, d)
        v = v[:, :, None].expand(B, KV, group, S, d).reshape(B, KV * group, S, d)
    if len(groups) == 1 and groups[0][0] is None:
        n = groups[0][1]
        return F.scaled_dot_product_attention(q, k[:, :, S - n:], v[:, :, S - n:], attn_mask=mask[..., S - n:],
                                              scale=1.0)
    out = q.new_empty(q.shape[:3] + (v.shape[-1],))
    for rows, n in groups:
        out[rows] = F.scaled_dot_product_attention(q[rows], k[rows, :, S - n:], v[rows, :, S - n:],
                                                   attn_mask=mask[rows][..., S - n:], scale=1.0)
    return out


class Attention(nn.Module):
    """q/k/v projections → per-head RMSNorm → RoPE (q, k) → cache → softmax(q·kᵀ · 1.0 + mask) · v → o_proj.

    k_eq_v (full layers with `attention_k_eq_v`): no v_proj; V starts from the raw K projection and gets only the
    weightless v_norm (no RoPE). Reuse layers (KV sharing) have only q_proj / q_norm / o_proj and attend to the
    K/V their store layer produced in the same forward.
    """

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.layer_head_dim[layer_idx]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.layer_kv_heads[layer_idx]
        mode = config.kv_sharing_modes[layer_idx]
        self.is_reuse = mode == "reuse"
        self.is_store = mode == "store"
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        if not self.is_reuse:
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
            k_eq_v = config.attention_k_eq_v and self.layer_type == FULL
            self.v_proj = None if k_eq_v else nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self._qkv = None  # q/k(/v) as one row-blocked weight (fusion.fuse_projections)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = plan.cos_sin[self.layer_type]
        H, KV, d = self.num_heads, self.num_kv_heads, self.head_dim
        eps = self.q_norm.eps
        if self.is_reuse:
            q = self.q_proj(x).view(B, T, H, d)
            q = fusion.q_norm_rope(q, self.q_norm.weight, cos, sin, eps)  # (B, H, T, d)
            k, v = plan.shared[self.layer_type]
        else:
            projs = (self.q_proj, self.k_proj) + ((self.v_proj,) if self.v_proj is not None else ())
            y = fusion.fused_linear(self._qkv, projs, x)
            if y is not None:  # one product for q, k (and v): (B, T, (H + 2·KV)·d) split in row blocks
                parts = y.split([p.out_features for p in projs], dim=-1)
            else:
                parts = [p(x) for p in projs]
            q = parts[0].view(B, T, H, d)
            k_raw = parts[1].view(B, T, KV, d)
            v_raw = parts[2].view(B, T, KV, d) if len(parts) == 3 else k_raw  # k_eq_v: V is the raw K
            # q, k: RMSNorm then RoPE; v: the weightless norm only → (B, H, T, d), (B, KV, T|S, d) ×2
            q, k, v = self._keys_values(q, k_raw, v_raw, cos, sin, plan)
            if self.is_store:
                plan.shared[self.layer_type] = (k, v)

        k, v = k.to(q.dtype), v.to(q.dtype)
        n_kv = k.shape[1]
        group = self.num_heads // n_kv
        mask = plan.masks[self.layer_type]
        groups = plan.key_groups.get(self.layer_type)
        if groups is not None:  # a CPU prefix plan: each group of rows over exactly its own keys
            out = _attend_groups(q, k, v, mask, groups, group)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        if group > 1 and T == 1:
            # One query token: fold each KV head's `group` query heads into the query axis (B, KV, group, d) and
            # attend the cached K/V as they are — no copy of the cache per step.
            out = _attend_few(q.view(B, n_kv, group, self.head_dim), k, v, mask)
            return self.o_proj(out.reshape(B, 1, self.num_heads * self.head_dim))
        if group > 1 and plan.cache is not None and T <= _FOLD_MAX_T:
            # A few query tokens against the cache (verification): fold the same way, (B, KV, group·T, d) with the
            # mask repeated per head, rather than copying the cached K/V `group` times.
            out = _attend_few(q.reshape(B, n_kv, group * T, self.head_dim), k, v,
                              plan.folded_mask(self.layer_type, group))
            out = out.view(B, self.num_heads, T, self.head_dim)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        if group > 1:  # GQA: each KV head serves `group` consecutive query heads
            k = k[:, :, None].expand(-1, -1, group, -1, -1).reshape(B, self.num_heads, -1, self.head_dim)
            v = v[:, :, None].expand(-1, -1, group, -1, -1).reshape(B, self.num_heads, -1, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _keys_values(self, q, k_raw, v_raw, cos, sin, plan: AttentionPlan):
        """Raw projections → (q, k, v) to attend with: q and k normed and rotated, v normed; k and v through the
        cache when there is one. Steps that write before attending (full layers, short sliding steps) norm,
        rotate and store K/V in one piece (fusion.qk_norm_rope_store) and attend the cache's entries."""
        wq, wk, eps = self.q_norm.weight, self.k_norm.weight, self.q_norm.eps
        cache = plan.cache
        full = self.layer_type == FULL
        if plan.prefix:  # DiffusionGemma (build_prefix_plan): [visible cached prefix | this call's] keys
            q, k, v = fusion.qk_norm_rope(q, k_raw, v_raw, wq, wk, cos, sin, eps)  # (B, H|KV, T, d)
            ck, cv = cache.gather_kv(self.layer_idx, plan.rows[:, 0], plan.prefix[self.layer_type])  # (B, KV, P, d)
            k_all, v_all = torch.cat([ck.to(k.dtype), k], dim=2), torch.cat([cv.to(v.dtype), v], dim=2)
            if not plan.read_only:  # the encoder: this chunk's keys into the cache, after reading the prefix
                cache.write(self.layer_idx, plan.rows, plan.full_index if full else plan.ring_index, k, v)
            return q, k_all, v_all
        if cache is None or not (full or plan.sliding_write_first):
            q, k, v = fusion.qk_norm_rope(q, k_raw, v_raw, wq, wk, cos, sin, eps)  # (B, H|KV, T, d)
            if cache is None:
                return q, k, v
            # a long chunk: read the ring as it was, then store this chunk's keys (they would overwrite some)
            rk, rv = cache.ring_kv(self.layer_idx, plan.slots, q.shape[0])
            k_all, v_all = torch.cat([rk.to(k.dtype), k], dim=2), torch.cat([rv.to(v.dtype), v], dim=2)
            cache.write(self.layer_idx, plan.rows, plan.ring_index, k, v)
            return q, k_all, v_all
        lk = cache.layers[self.layer_idx]
        index = plan.full_index if full else plan.ring_index
        q = fusion.qk_norm_rope_store(q, k_raw, v_raw, wq, wk, cos, sin, eps, lk.k, lk.v, plan.rows, index)
        B = q.shape[0]
        k, v = (cache.full_kv(self.layer_idx, plan.slots, B, plan.kv_len) if full
                else cache.ring_kv(self.layer_idx, plan.slots, B))
        return q, k, v
