"""The family's audio encoder (E2B / E4B `audio_config`): a conformer over log-mel features → soft tokens.

    input_features (N, F, M) mel frames, input_features_mask (N, F) True = real frame
        ─► subsample_conv_projection: 2 × [mask · x → Conv2d 3×3 stride 2 → LayerNorm (no bias) over channels → ReLU]
           (time and mel axes halved twice; the mask keeps every other frame each time)
           ─► (N, F/4, C1·M/4) ─► input_proj_linear ─► (N, T, hidden)
        ─► layers × L, each:  ½-step feed-forward ─► local self-attention ─► light conv ─► ½-step feed-forward ─► norm
        ─► output_proj (+bias) ─► (N, T, output_proj_dims), with the subsampled mask

Local attention: the sequence is cut into chunks of `attention_chunk_size` (C) queries; each chunk reads a context
of C + (left − 1) + right keys (the C own positions, `attention_context_left` − 1 before, `attention_context_right`
after). A key is visible when it is a real frame and 0 ≤ q − k < left − 1, or 0 < k − q < right. Logits: q scaled
by d^−½ / ln 2 · softplus(per_dim_scale), k by ln(1 + e) / ln 2, plus a relative-position term (sinusoids of the
distances (ctx/2 … 0) through `relative_k_proj`, aligned to keys by the Transformer-XL shift), capped by
cap · tanh(x / cap); masked logits are set to `attention_invalid_logits_value` before the float32 softmax.

Checkpoint names under `model.audio_tower.`: `subsample_conv_projection.layer{0,1}.{conv,norm}.weight`,
`subsample_conv_projection.input_proj_linear.weight` [hidden, C1·M/4], `layers.{i}.feed_forward{1,2}.{ffw_layer_1,
ffw_layer_2}.linear.weight` (+ clip bounds), `...feed_forward{1,2}.{pre,post}_layer_norm.weight`,
`layers.{i}.self_attn.{q_proj,k_proj,v_proj,post}.linear.weight`, `...self_attn.relative_k_proj.weight`,
`...self_attn.per_dim_scale` [head_dim], `layers.{i}.lconv1d.{linear_start,linear_end}.linear.weight`,
`...lconv1d.depthwise_conv1d.weight` [hidden, 1, K], `...lconv1d.{pre_layer_norm,conv_norm}.weight`,
`layers.{i}.norm_{pre_attn,post_attn,out}.weight`, `output_proj.{weight,bias}`.

This module maps features to soft tokens and nothing else: the mel front end lives in inputs/.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AudioTowerConfig
from ..layers import ClippableLinear, RMSNorm


def _clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    """The conformer's activation clamp (trained as gradient clipping), capped at the dtype's range."""
    c = min(limit, torch.finfo(x.dtype).max)
    return torch.clamp(x, -c, c)


class SubsampleLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(c_out, eps=eps, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, T, M), mask (N, T) → (N, C', ⌈T/2⌉, ⌈M/2⌉), (N, ⌈T/2⌉)."""
        x = x * mask[:, None, :, None].to(x.dtype)  # padded frames enter the convolution as zeros
        x = self.conv(x.to(self.conv.weight.dtype))
        x = F.relu(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x, mask[:, ::2]


class SubsampleProjection(nn.Module):
    def __init__(self, config: AudioTowerConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, config.rms_norm_eps)
        # The reference sizes this from c0 // 4 (the published c0 is 128, the mel bin count): M must equal c0.
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, config.hidden_size, bias=False)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.layer0(features.unsqueeze(1), mask)
        x, mask = self.layer1(x, mask)
        N, _, T, _ = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(N, T, -1)), mask  # (N, T, M/4 · C1) in


class FeedForward(nn.Module):
    """x + w · post_norm(clip(W2 silu(W1 pre_norm(clip(x)))))  (w = residual_weight, ½ in the published model)."""

    def __init__(self, config: AudioTowerConfig):
        super().__init__()
        H, clip = config.hidden_size, config.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(H, 4 * H, clip)
        self.ffw_layer_2 = ClippableLinear(4 * H, H, clip)
        self.pre_layer_norm = RMSNorm(H)
        self.post_layer_norm = RMSNorm(H)
        self.weight, self.limit = config.residual_weight, config.gradient_clipping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(_clip(x, self.limit)))))
        return self.post_layer_norm(_clip(h, self.limit)) * self.weight + x


class LightConv(nn.Module):
    """x + W_end silu(conv_norm(clip(causal depthwise conv(GLU(W_start pre_norm(x))))))."""

    def __init__(self, config: AudioTowerConfig):
        super().__init__()
        H, clip, eps = config.hidden_size, config.use_clipped_linears, config.rms_norm_eps
        self.linear_start = ClippableLinear(H, 2 * H, clip)
        self.linear_end = ClippableLinear(H, H, clip)
        self.depthwise_conv1d = nn.Conv1d(H, H, config.conv_kernel_size, groups=H, bias=False)
        self.pre_layer_norm = RMSNorm(H, eps)
        self.conv_norm = RMSNorm(H, eps)
        self.limit = config.gradient_clipping

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)  # (N, T, H)
        k = self.depthwise_conv1d.kernel_size[0]
        h = self.depthwise_conv1d(F.pad(h.transpose(1, 2), (k - 1, 0))).transpose(1, 2)  # causal: K − 1 on the left
        return self.linear_end(F.silu(self.conv_norm(_clip(h, self.limit)))) + x


def relative_position_table(config: AudioTowerConfig, dtype: torch.dtype, device) -> torch.Tensor:
    """(ctx/2 + 1, hidden): [sin | cos] of distances ctx/2 … 0 at timescales 1 … 10⁴ (geometric)."""
    ctx = config.attention_chunk_size + config.attention_context_left - 1 + config.attention_context_right
    n = config.hidden_size // 2
    inv = torch.exp(torch.arange(n, device=device) * -(math.log(10_000.0) / max(n - 1, 1)))
    t = torch.arange(ctx // 2, -1, -1, device=device)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=-1).to(dtype)


class LocalAttention(nn.Module):
    def __init__(self, config: AudioTowerConfig):
        super().__init__()
        H, clip = config.hidden_size, config.use_clipped_linears
        self.heads = config.num_attention_heads
        self.head_dim = H // self.heads
        self.chunk = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.future = config.attention_context_right
        self.ctx = self.chunk + self.past + self.future
        self.cap = config.attention_logit_cap
        self.invalid = config.attention_invalid_logits_value
        self.q_proj = ClippableLinear(H, H, clip)
        self.k_proj = ClippableLinear(H, H, clip)
        self.v_proj = ClippableLinear(H, H, clip)
        self.post = ClippableLinear(H, H, clip)
        self.relative_k_proj = nn.Linear(H, H, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, h, d) → (N, blocks, ctx, h, d): each chunk's keys, `past` before it to `future` after it."""
        x = F.pad(x, (0, 0, 0, 0, self.past, self.future + self.chunk - 1))
        return torch.movedim(x.unfold(1, self.ctx, self.chunk), -1, 2)

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        """Relative logits (…, C, R) indexed by distance → (…, C, ctx) indexed by context key (Transformer-XL
        shift: pad each row to ctx + 1, flatten, drop the tail, re-cut rows of ctx)."""
        *lead, C, R = x.shape
        x = F.pad(x, (0, self.ctx + 1 - R)).reshape(*lead, C * (self.ctx + 1))
        return x[..., : C * self.ctx].reshape(*lead, C, self.ctx)

    def forward(self, x: torch.Tensor, rel: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """x (N, T, H); rel (R, H) position table; masked (N, 1, blocks, C, ctx) True = not visible."""
        N, T, _ = x.shape
        h, d, C = self.heads, self.head_dim, self.chunk
        q = self.q_proj(x).float().view(N, T, h, d) * ((d ** -0.5) / math.log(2)) * F.softplus(self.per_dim_scale)
        k = self.k_proj(x).float().view(N, T, h, d) * (math.log(1 + math.e) / math.log(2))
        v = self.v_proj(x).float().view(N, T, h, d)
        nb = (T + C - 1) // C
        q = F.pad(q, (0, 0, 0, 0, 0, nb * C - T)).view(N, nb, C, h, d).permute(0, 3, 1, 2, 4)  # (N, h, nb, C, d)
        k, v = self._context(k), self._context(v)  # (N, nb, ctx, h, d)
        rk = self.relative_k_proj(rel).view(-1, h, d).to(q.dtype)  # (R, h, d)
        content = q @ k.permute(0, 3, 1, 4, 2)  # (N, h, nb, C, ctx)
        position = (q.reshape(N, h, nb * C, d) @ rk.permute(1, 2, 0)).view(N, h, nb, C, -1)
        logits = content + self._shift(position)
        logits = torch.tanh(logits / self.cap) * self.cap
        logits = logits.masked_fill(masked, self.invalid)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        out = probs @ v.permute(0, 3, 1, 2, 4)  # (N, h, nb, C, d)
        out = out.permute(0, 2, 3, 1, 4).reshape(N, nb * C, h * d)[:, :T]
        return self.post(out.to(x.dtype))


class ConformerLayer(nn.Module):
    def __init__(self, config: AudioTowerConfig):
        super().__init__()
        H = config.hidden_size
        self.feed_forward1 = FeedForward(config)
        self.feed_forward2 = FeedForward(config)
        self.self_attn = LocalAttention(config)
        self.lconv1d = LightConv(config)
        self.norm_pre_attn = RMSNorm(H)
        self.norm_post_attn = RMSNorm(H)
        self.norm_out = RMSNorm(H)
        self.limit = config.gradient_clipping

    def forward(self, x, rel, masked):
        x = self.feed_forward1(x)
        a = self.self_attn(self.norm_pre_attn(_clip(x, self.limit)), rel, masked)
        x = self.norm_post_attn(_clip(a, self.limit)) + x
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clip(x, self.limit))


class AudioTower(nn.Module):
    """`model.audio_tower`: (N, F, M) features + (N, F) mask → (N, T, output_proj_dims), (N, T) mask, T = ⌈⌈F/2⌉/2⌉."""

    def __init__(self, config: AudioTowerConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubsampleProjection(config)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.num_hidden_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def visibility(self, valid: torch.Tensor) -> torch.Tensor:
        """(N, T) real frames → (N, 1, blocks, C, ctx) True where a query must NOT see a context key."""
        c = self.config
        C, past, future = c.attention_chunk_size, c.attention_context_left - 1, c.attention_context_right
        N, T = valid.shape
        nb = (T + C - 1) // C
        q = torch.arange(nb * C, device=valid.device).view(nb, C, 1)  # query position
        kpos = (torch.arange(nb, device=valid.device).view(nb, 1, 1) * C
                + torch.arange(C + past + future, device=valid.device).view(1, 1, -1) - past)  # key position
        dist = q - kpos
        near = ((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < future))
        inside = (kpos >= 0) & (kpos < T) & (q < T)
        kv = valid[:, kpos.clamp(0, T - 1).expand(nb, C, -1)]  # (N, nb, C, ctx)
        return ~(near & inside & kv)[:, None]

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        c0 = c.subsampling_conv_channels[0]
        # Two stride-2 convolutions quarter the mel axis; the projection was sized for c0 // 4 bins after them.
        if features.dim() != 3 or -(-(-(-features.shape[-1] // 2)) // 2) != c0 // 4:
            raise ValueError(f"input_features must be (clips, frames, {c0}) mel features for this audio encoder, got "
                             f"shape {tuple(features.shape)}")
        x, valid = self.subsample_conv_projection(features, mask.bool())
        rel = relative_position_table(c, x.dtype, x.device)
        masked = self.visibility(valid)
        for layer in self.layers:
            x = layer(x, rel, masked)
        return self.output_proj(x), valid


class AudioStream:
    """The encoder run incrementally, for live audio: mel frames in as they are computed, soft-token features out as
    soon as they are final, equal to what `AudioTower` gives for the whole clip (up to float summation order).

    State carried between pushes (the "chunk state"): the last mel frames and first-conv rows the stride-2
    convolutions still need (one row of look-ahead each), and per conformer layer the last `left − 1` attention
    inputs (keys and values are recomputed from them) and the last K − 1 light-conv inputs. Needs
    `attention_context_right == 0` (no look-ahead inside the conformer), as the published encoder has.

    push(frames) → (new outputs (n, output_proj_dims)); finish(frames, mask) → the rest, with the validity of each
    row (frames past the end of the audio are masked exactly as the one-shot path masks them).
    """

    def __init__(self, tower: AudioTower):
        c = tower.config
        if c.attention_context_right != 0:
            raise ValueError("streaming audio needs attention_context_right = 0 (this encoder looks "
                             f"{c.attention_context_right} positions ahead)")
        self.tower = tower
        p = next(tower.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.mel = torch.zeros(0, c.subsampling_conv_channels[0], dtype=self.dtype, device=self.device)  # unconsumed
        self.mel_mask = torch.zeros(0, dtype=torch.bool, device=self.device)
        self.mel_start = 0          # absolute index of self.mel[0]
        self.mid = None             # first-conv output rows not consumed yet (C0, rows, M/2)
        self.mid_mask = torch.zeros(0, dtype=torch.bool, device=self.device)
        self.mid_start = 0
        self.out_rows = 0           # second-conv rows produced (conformer positions)
        H = c.hidden_size
        self.attn_cache = [torch.zeros(0, H, dtype=self.dtype, device=self.device) for _ in tower.layers]
        self.valid_cache = [torch.zeros(0, dtype=torch.bool, device=self.device) for _ in tower.layers]
        self.conv_cache = [torch.zeros(0, H, dtype=self.dtype, device=self.device) for _ in tower.layers]
        self.rel = relative_position_table(c, self.dtype, self.device)

    # --- subsampling: a stride-2 3×3 convolution over time needs rows 2t − 1 … 2t + 1 for output t -------------
    @staticmethod
    def _conv_rows(layer: SubsampleLayer, x: torch.Tensor, mask: torch.Tensor, start: int, first: int, last: int):
        """Output rows [first, last) of `layer` from input rows held in x (C, rows, M) starting at `start`."""
        a, b = 2 * first - 1, 2 * last  # inclusive input range
        lo, hi = max(a, 0), min(b, start + x.shape[1] - 1)
        rows = x[:, lo - start:hi - start + 1] * mask[lo - start:hi - start + 1][None, :, None].to(x.dtype)
        rows = F.pad(rows, (0, 0, lo - a, b - hi))  # zero rows before the start / after the end
        y = F.conv2d(rows[None].to(layer.conv.weight.dtype), layer.conv.weight, stride=2, padding=(0, 1))
        return F.relu(layer.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)[0]  # (C', last − first, M')

    def _subsample(self, final: bool) -> tuple[torch.Tensor, torch.Tensor]:
        sub = self.tower.subsample_conv_projection
        end0 = self.mel_start + self.mel.shape[0]
        n0 = (end0 + 1) // 2 if final else max(0, (end0 - 1) // 2)  # first-conv rows computable now
        done0 = self.mid_start + (0 if self.mid is None else self.mid.shape[1])
        if n0 > done0:
            new = self._conv_rows(sub.layer0, self.mel[None], self.mel_mask, self.mel_start, done0, n0)
            new_mask = self._mask_rows(self.mel_mask, self.mel_start, done0, n0)
            self.mid = new if self.mid is None else torch.cat([self.mid, new], dim=1)
            self.mid_mask = torch.cat([self.mid_mask, new_mask])
            keep = max(0, 2 * n0 - 1 - self.mel_start)  # mel rows the next first-conv row still reads
            self.mel, self.mel_mask, self.mel_start = self.mel[keep:], self.mel_mask[keep:], self.mel_start + keep
        if self.mid is None:
            return self._empty()
        end1 = self.mid_start + self.mid.shape[1]
        n1 = (end1 + 1) // 2 if final else max(0, (end1 - 1) // 2)
        if n1 <= self.out_rows:
            return self._empty()
        y = self._conv_rows(sub.layer1, self.mid, self.mid_mask, self.mid_start, self.out_rows, n1)
        valid = self._mask_rows(self.mid_mask, self.mid_start, self.out_rows, n1)
        keep = max(0, 2 * n1 - 1 - self.mid_start)
        self.mid, self.mid_mask, self.mid_start = self.mid[:, keep:], self.mid_mask[keep:], self.mid_start + keep
        self.out_rows = n1
        x = sub.input_proj_linear(y.permute(1, 2, 0).reshape(y.shape[1], -1))  # (rows, hidden)
        return x, valid

    @staticmethod
    def _mask_rows(mask: torch.Tensor, start: int, first: int, last: int) -> torch.Tensor:
        """The one-shot rule mask[::2]: output row t is real when input row 2t is."""
        idx = torch.arange(first, last, device=mask.device) * 2 - start
        return mask[idx]

    def _empty(self):
        H = self.tower.config.hidden_size
        return torch.zeros(0, H, dtype=self.dtype, device=self.device), torch.zeros(0, dtype=torch.bool,
                                                                                   device=self.device)

    # --- conformer: causal with `past` keys of left context; rows in, rows out ---------------------------------
    def _layer(self, i: int, layer: ConformerLayer, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        att = layer.self_attn
        x = layer.feed_forward1(x[None])[0]
        a_in = layer.norm_pre_attn(_clip(x, layer.limit))
        keys_in = torch.cat([self.attn_cache[i], a_in])
        keys_valid = torch.cat([self.valid_cache[i], valid])
        n, m = a_in.shape[0], keys_in.shape[0]
        h, d = att.heads, att.head_dim
        q = att.q_proj(a_in).float().view(n, h, d) * ((d ** -0.5) / math.log(2)) * F.softplus(att.per_dim_scale)
        k = att.k_proj(keys_in).float().view(m, h, d) * (math.log(1 + math.e) / math.log(2))
        v = att.v_proj(keys_in).float().view(m, h, d)
        rk = att.relative_k_proj(self.rel).view(-1, h, d).to(q.dtype)  # (R, h, d): row r ↔ distance past − r
        qpos = torch.arange(m - n, m, device=x.device)[:, None]
        dist = qpos - torch.arange(m, device=x.device)[None, :]  # (n, m)
        visible = (dist >= 0) & (dist < att.past) & keys_valid[None, :]
        col = (att.past - dist).clamp(0, rk.shape[0] - 1)
        content = torch.einsum("nhd,mhd->hnm", q, k)
        position = torch.einsum("nhd,nmhd->hnm", q, rk[col])
        logits = torch.tanh((content + position) / att.cap) * att.cap
        logits = logits.masked_fill(~visible[None], att.invalid)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        out = torch.einsum("hnm,mhd->nhd", probs, v).reshape(n, h * d)
        x = layer.norm_post_attn(_clip(att.post(out.to(x.dtype)), layer.limit)) + x
        keep = att.past - 1  # a later query reads at most past − 1 earlier rows
        self.attn_cache[i], self.valid_cache[i] = keys_in[-keep:] if keep else keys_in[:0], keys_valid[-keep:] if keep \
            else keys_valid[:0]
        lc = layer.lconv1d
        g = F.glu(lc.linear_start(lc.pre_layer_norm(x)), dim=-1)  # (n, H)
        K = lc.depthwise_conv1d.kernel_size[0]
        hist = torch.cat([self.conv_cache[i], g])
        pad = max(0, K - 1 - self.conv_cache[i].shape[0])  # zeros before the first row, as the causal pad
        conv = F.conv1d(F.pad(hist.T[None], (pad, 0)), lc.depthwise_conv1d.weight, groups=hist.shape[1])[0].T
        self.conv_cache[i] = hist[-(K - 1):] if K > 1 else hist[:0]
        x = lc.linear_end(F.silu(lc.conv_norm(_clip(conv, lc.limit)))) + x
        x = layer.feed_forward2(x[None])[0]
        return layer.norm_out(_clip(x, layer.limit))

    def _run(self, final: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, valid = self._subsample(final)
        if x.shape[0] == 0:
            return torch.zeros(0, self.tower.config.output_proj_dims, dtype=self.dtype, device=self.device), valid
        for i, layer in enumerate(self.tower.layers):
            x = self._layer(i, layer, x, valid)
        return self.tower.output_proj(x), valid

    def push(self, frames: torch.Tensor) -> torch.Tensor:
        """Mel frames (n, M) of real audio → the encoder outputs that became final (k, output_proj_dims)."""
        self.mel = torch.cat([self.mel, frames.to(self.dtype)])
        self.mel_mask = torch.cat([self.mel_mask, torch.ones(frames.shape[0], dtype=torch.bool, device=self.device)])
        out, _ = self._run(final=False)
        return out

    def finish(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last mel frames (with their mask: the tail past the audio is masked) → remaining outputs and their
        validity (soft tokens are the valid rows)."""
        self.mel = torch.cat([self.mel, frames.to(self.dtype)])
        self.mel_mask = torch.cat([self.mel_mask, mask.to(self.device)])
        return self._run(final=True)
