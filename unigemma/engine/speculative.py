"""Speculative decoding: who proposes drafts, how many to draft, and how drafts are judged.

    proposer (PromptLookup | MTPProposer |   ──► up to k draft tokens per running sequence
              DraftModelProposer)
    DraftController ─────────────────────────► k for this step (0 = plain decoding), from each sequence's
                                               acceptance estimate and the measured cost of steps
    target verify step (one forward, T = k + 1 tokens per row: the pending token + the drafts)
    accept_length ───────────────────────────► leading drafts equal to the tokens the target picks there

Acceptance is "coupled": at every verified position the target's token is chosen exactly as a plain decoding
step would choose it (argmax when greedy; when sampling, the sampler's exponential race, with the request's own
random stream), and drafts are kept while they equal those tokens. Our drafts are deterministic (n-gram copies,
the drafter's argmax), and for deterministic drafts this rule is exact: position j's token is a fresh draw from
the target distribution p_j given the accepted prefix, so a draft d is accepted with probability p_j(d) and a
rejection yields a draw from p_j without d, renormalised, the rule of spec/mtp-drafting.md §7 trap 2 (and of
`sampling.speculative_accept_batch` with draft_probs=None). Because the draws are the very ones plain decoding
would make, a seeded request gives the same tokens with or without speculation, whatever k the controller picks.
(Rejection sampling with min(1, p/q) is only needed for drafts *sampled* from a draft distribution q, which no
proposer here makes.)

The MTP proposer follows spec/mtp-drafting.md §4 with "clean" K/V: the drafter at position p reads the target's
store layers from the cache, full layers at positions < p and sliding layers at positions p−W−1 … p−1 (the
reference's W + 1 entries, without the stale keys of rejected drafts, trap 1).

What this module does not do: run the target, roll the cache back, or sample (engine/scheduler.py does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ..config import FULL


class SpecSequence(Protocol):
    """What a proposer reads from a running sequence."""

    tokens: list[int]          # prompt + output; the last one is pending (not yet in the cache)
    slot: int                  # cache slot (== decode row)
    hidden: torch.Tensor | None  # target's post-norm hidden state that produced tokens[-1] (MTP only)
    spec_state: dict


class Proposer(Protocol):
    name: str

    def propose(self, seqs: Sequence[SpecSequence], k: int) -> list[list[int]]:
        """Up to k draft tokens for each sequence (fewer, or none, when it has nothing to offer)."""


# ------------------------------------------------------------------------------------------------------------
# Prompt lookup
# ------------------------------------------------------------------------------------------------------------

class NgramIndex:
    """n-gram → end index of its latest occurrence that has a continuation, updated as tokens are appended.

    Looking up the sequence's last n tokens gives where the same n-gram occurred before; the tokens that
    followed it are the proposal. O(max_n) per appended token, O(max_n) per lookup.
    """

    def __init__(self, min_n: int = 1, max_n: int = 3):
        self.min_n, self.max_n = min_n, max_n
        self.table: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # tokens[:indexed] have had their preceding n-grams recorded

    def update(self, tokens: list[int]) -> None:
        for j in range(max(self.indexed, 1), len(tokens)):
            # the n-grams ending just before j now have a continuation (tokens[j])
            for n in range(self.min_n, min(self.max_n, j) + 1):
                self.table[tuple(tokens[j - n:j])] = j
        self.indexed = max(self.indexed, len(tokens))

    def propose(self, tokens: list[int], k: int) -> list[int]:
        self.update(tokens)
        L = len(tokens)
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            end = self.table.get(tuple(tokens[L - n:]))
            if end is not None and end < L:
                # copy with period L − end: past the sequence's end the copy continues from itself, so a
                # repeating run ("ab ab ab") yields k drafts rather than stopping at the last token
                out: list[int] = []
                for i in range(k):
                    src = end + i
                    out.append(tokens[src] if src < L else out[src - L])
                return out
        return []


class PromptLookup:
    """Drafts by copying what followed the latest earlier occurrence of the last n tokens (n = max_n … min_n)."""

    name = "lookup"

    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt lookup n-gram sizes min_n={min_n}, max_n={max_n}: need 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: Sequence[SpecSequence], k: int) -> list[list[int]]:
        out = []
        for s in seqs:
            idx = s.spec_state.get("ngram")
            if idx is None:
                idx = s.spec_state["ngram"] = NgramIndex(self.min_n, self.max_n)
            out.append(idx.propose(s.tokens, k))
        return out


# ------------------------------------------------------------------------------------------------------------
# MTP drafter
# ------------------------------------------------------------------------------------------------------------

class MTPProposer:
    """k argmax drafts per sequence from a gemma4_unified_assistant drafter that reads the target's cache."""

    name = "mtp"

    def __init__(self, drafter, target, cache):
        tcfg = target.config.text
        dcfg = drafter.config
        if dcfg.backbone_hidden_size != tcfg.hidden_size:
            raise ValueError(f"drafter backbone_hidden_size {dcfg.backbone_hidden_size} != target hidden_size "
                             f"{tcfg.hidden_size}")
        for t in set(dcfg.text.layer_types):
            if t not in tcfg.layer_types:
                raise ValueError(f"drafter has {t} layers but the target has none to read K/V from")
        self.drafter = drafter
        self.target = target
        self.cache = cache
        self.window = dcfg.text.sliding_window
        self.types = sorted(set(dcfg.text.layer_types))
        self.store = {t: tcfg.store_layer(t) for t in self.types}

    @torch.inference_mode()
    def propose(self, seqs: Sequence[SpecSequence], k: int) -> list[list[int]]:
        if k <= 0 or not seqs:
            return [[] for _ in seqs]
        c = self.cache
        dev = c.device
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        p = torch.tensor([len(s.tokens) - 1 for s in seqs], device=dev)  # position of each pending token
        p_max = max(len(s.tokens) - 1 for s in seqs)
        contiguous = all(s.slot == i for i, s in enumerate(seqs))
        shared, masks = {}, {}
        for t in self.types:
            lk = c.layers[self.store[t]]
            if t == FULL:
                # clean view: cache entries [0, p) of each row (entry index == position)
                K, V = (lk.k[: len(seqs), :, :p_max], lk.v[: len(seqs), :, :p_max]) if contiguous else \
                       (lk.k[slots, :, :p_max], lk.v[slots, :, :p_max])
                masks[t] = torch.arange(p_max, device=dev)[None, :] < p[:, None]
            else:
                K, V = (lk.k[: len(seqs)], lk.v[: len(seqs)]) if contiguous else (lk.k[slots], lk.v[slots])
                rp = c.ring_pos[: len(seqs)] if contiguous else c.ring_pos[slots]
                masks[t] = (rp < p[:, None]) & (rp >= (p - self.window - 1)[:, None])
            shared[t] = (K, V)
        tok = torch.tensor([s.tokens[-1] for s in seqs], device=dev)[:, None]
        g = torch.stack([s.hidden for s in seqs])[:, None].to(dev)
        pos = p[:, None]
        embed = self.target.language_model.embed
        drafts = []
        for _ in range(k):
            x = torch.cat([embed(tok).to(g.dtype), g], dim=-1)
            logits, g = self.drafter(x, pos, shared, masks)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            drafts.append(tok)
        return torch.cat(drafts, dim=1).tolist()


# ------------------------------------------------------------------------------------------------------------
# A smaller model of the same family as draft model
# ------------------------------------------------------------------------------------------------------------

class DraftModelProposer:
    """k argmax drafts per sequence from a smaller checkpoint that shares the target's tokenizer (e.g. E2B drafting
    for 31B), run with its own KV cache whose slots mirror the target's.

    Per sequence, `spec_state["draft_ids"]` holds the tokens whose K/V the draft cache has for that slot (positions
    0…n−1). Each round: keep the longest prefix of them that the sequence still agrees with (accepted drafts stay,
    rejected ones are rolled back by `truncate`), prefill the rest of the sequence but its pending token, then k
    batched one-token steps: the pending token, then each draft in turn. A new sequence in a reused slot starts
    from an empty state, so nothing leaks between requests.
    """

    name = "draft"

    def __init__(self, draft_model, target, max_slots: int, max_model_len: int, max_draft: int = 16):
        from .runner import ModelRunner

        dv, tv = draft_model.config.text.vocab_size, target.config.text.vocab_size
        if dv != tv:
            raise ValueError(f"draft model vocab_size {dv} != target vocab_size {tv}: a draft model must share the "
                             "target's tokenizer")
        self.runner = ModelRunner(draft_model, max_slots, max_model_len + max_draft + 1, spare=max_draft + 8)
        self.max_draft = max_draft
        self.owner: list[object | None] = [None] * max_slots  # whose K/V each draft slot holds

    def _follow_moves(self, seqs: Sequence[SpecSequence]) -> None:
        """The scheduler keeps running rows compacted, moving a sequence into a freed slot; move its draft K/V
        the same way when its old draft slot still holds them (all sources are read before any destination is
        written: a chain of moves may reuse a slot). Otherwise the sequence starts afresh in its new slot."""
        moves = [s for s in seqs if s.spec_state.get("draft_slot", s.slot) != s.slot]
        c = self.runner.cache
        saved = []
        for s in moves:
            a, key = s.spec_state["draft_slot"], s.spec_state["draft_key"]
            if self.owner[a] is key:
                saved.append(([(lk.k[a].clone(), lk.v[a].clone()) if lk is not None else None for lk in c.layers],
                              c.ring_pos[a].clone(), s.slot, key))
            else:
                s.spec_state["draft_ids"] = []
        for kv, ring, b, key in saved:
            for lk, pair in zip(c.layers, kv):
                if lk is not None:
                    lk.k[b].copy_(pair[0])
                    lk.v[b].copy_(pair[1])
            c.ring_pos[b].copy_(ring)
            self.owner[b] = key

    @torch.inference_mode()
    def propose(self, seqs: Sequence[SpecSequence], k: int) -> list[list[int]]:
        k = min(k, self.max_draft)
        if k <= 0 or not seqs:
            return [[] for _ in seqs]
        r = self.runner
        self._follow_moves(seqs)
        for s in seqs:  # catch each slot's cache up to the sequence (all but its pending token)
            key = s.spec_state.setdefault("draft_key", object())
            s.spec_state["draft_slot"] = s.slot
            have = s.spec_state.get("draft_ids", []) if self.owner[s.slot] is key else []
            self.owner[s.slot] = key
            n = 0
            for a, b in zip(have, s.tokens[:-1]):
                if a != b:
                    break
                n += 1
            r.cache.truncate(s.slot, n)
            if n < len(s.tokens) - 1:
                r.prefill_chunk(s.slot, s.tokens, n, len(s.tokens) - 1, need_logits=False)
            s.spec_state["draft_ids"] = list(s.tokens[:-1])
        rows = max(s.slot for s in seqs) + 1
        tok = torch.zeros(rows, 1, dtype=torch.long, device=r.device)
        pos = torch.full((rows, 1), -1, dtype=torch.long, device=r.device)  # rows not drafting: padding
        slots = torch.tensor([s.slot for s in seqs], device=r.device)
        tok[slots, 0] = torch.tensor([s.tokens[-1] for s in seqs], device=r.device)
        pos[slots, 0] = torch.tensor([len(s.tokens) - 1 for s in seqs], device=r.device)
        top = max(len(s.tokens) for s in seqs)
        drafts = []
        for i in range(k):
            logits, _ = r.decode(tok, pos, kv_len=top + i)
            nxt = logits[:, -1].argmax(-1)
            drafts.append(nxt[slots])
            tok = nxt[:, None]
            pos = torch.where(pos >= 0, pos + 1, pos)
        out = torch.stack(drafts, dim=1).tolist()
        for s, d in zip(seqs, out):  # the cache now also holds the pending token and the first k − 1 drafts
            s.spec_state["draft_ids"] = s.tokens + d[:-1]
        return out


# ------------------------------------------------------------------------------------------------------------
# Acceptance and the adaptive controller
# ------------------------------------------------------------------------------------------------------------

def accept_length(drafts: Sequence[int], chosen: Sequence[int]) -> int:
    """Number of leading drafts equal to the target's chosen tokens at their positions (see module doc)."""
    n = 0
    for d, t in zip(drafts, chosen):
        if d != t:
            break
        n += 1
    return n


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens emitted by one verify step with k drafts when each draft is accepted with probability alpha
    (given the previous ones were): 1 + alpha + … + alpha^k."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class SpecStats:
    """Per-request speculation counters and the running acceptance estimate."""

    alpha: float = 0.6
    drafted: int = 0        # draft tokens verified
    accepted: int = 0       # draft tokens accepted
    verify_steps: int = 0   # steps in which this request had at least one draft

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Accepted drafts per verify step (the bonus token not counted)."""
        return self.accepted / self.verify_steps if self.verify_steps else None

    def observe(self, k: int, n: int, rate: float = 0.15) -> None:
        if k <= 0:
            return
        self.drafted += k
        self.accepted += n
        self.verify_steps += 1
        # each accepted draft is a success; the first rejection (if any) a failure; later drafts say nothing
        for x in [1.0] * n + ([0.0] if n < k else []):
            self.alpha += rate * (x - self.alpha)


class DraftController:
    """Chooses the draft length of each step to maximise expected tokens per second.

    Every row of a step pays for the longest row (the forward has T = 1 + k positions per row), so k is chosen
    per step: argmax over k of Σ_rows E(alpha_row, min(k, drafts available to the row)) / (cost(rows, k) +
    k · draft_cost). Costs are measured (EMA per (rows, T)); unmeasured ones are extrapolated from the plain
    step of the same batch with a marginal cost per extra token that is itself fitted from measurements.
    A row that is not drafting drifts its alpha back toward the prior, so drafting is retried now and then
    (content changes: a JSON answer may turn into repetitive text).
    """

    def __init__(self, max_draft: int, adaptive: bool = True, prior_alpha: float = 0.6,
                 marginal_prior: float = 0.02, ema: float = 0.2, recovery: float = 0.02, warmup: int = 0):
        if max_draft < 0:
            raise ValueError(f"num_draft_tokens={max_draft}: expected an integer >= 0")
        if warmup < 0:
            raise ValueError(f"warmup={warmup}: expected an integer >= 0")
        self.max_draft = max_draft
        self.adaptive = adaptive
        self.prior_alpha = prior_alpha
        self.marginal = marginal_prior   # extra cost per extra token, relative to a plain step of the batch
        self.ema = ema
        self.recovery = recovery
        self.warmup = warmup             # first steps of each (rows, T) not taken as cost samples (see observe_step)
        self.seen: dict[tuple, int] = {}
        self.step_cost: dict[tuple[int, int], float] = {}
        self.draft_cost = 0.0            # seconds per drafter call (0 for prompt lookup)

    # --- measurements ------------------------------------------------------------------------------------
    def _shape(self, tokens: int) -> float:
        """Relative cost of a forward over `tokens` tokens: 1 + marginal · (tokens − 1)."""
        return 1.0 + self.marginal * (tokens - 1)

    def observe_step(self, rows: int, T: int, seconds: float) -> None:
        """A step of `rows` rows × T tokens took `seconds`.

        The first `warmup` steps of each shape are not cost samples: they pay one-time work (oneDNN kernel
        builds, CUDA graph captures, allocator growth) that would otherwise make that draft length look 1.5-2x
        dearer, and a length that looks dear is never tried again, so its estimate would never recover. Later
        samples move the estimate by at most a factor of 2 (one step stalled by another process does not either)."""
        key = (rows, T)
        n = self.seen.get(key, 0)
        self.seen[key] = n + 1
        if n < self.warmup:
            return
        old = self.step_cost.get(key)
        if old is not None:
            seconds = min(max(seconds, 0.5 * old), 2.0 * old)
        self.step_cost[key] = seconds if old is None else old + self.ema * (seconds - old)
        base = self.step_cost.get((rows, 1))
        if not base:
            return
        for (r, t), c in self.step_cost.items():
            if r != rows or t == 1 or (T > 1 and t != T):
                continue  # a verify step updates its own pair; a plain step updates all pairs of its batch
            # solve c(rows, t) / c(rows, 1) = shape(rows·t) / shape(rows) for the marginal cost per token
            ratio = c / base
            denom = (rows * t - 1) - ratio * (rows - 1)
            if denom > 0:
                m = max(0.0, (ratio - 1.0) / denom)
                self.marginal += self.ema * (m - self.marginal)

    def observe_draft(self, k: int, seconds: float) -> None:
        """A proposer call for k drafts took `seconds` (warm-up and outliers as in observe_step)."""
        if k > 0:
            n = self.seen.get(("draft", 0), 0)
            self.seen[("draft", 0)] = n + 1
            if n < self.warmup:
                return
            per = seconds / k
            if self.draft_cost == 0:
                self.draft_cost = per
            else:
                per = min(max(per, 0.5 * self.draft_cost), 2.0 * self.draft_cost)
                self.draft_cost += self.ema * (per - self.draft_cost)

    def cost(self, rows: int, k: int) -> float:
        """Seconds for a step of `rows` rows with k drafts each: measured, else scaled from the nearest
        measurement by the linear cost shape."""
        c = self.step_cost.get((rows, k + 1))
        if c is not None:
            return c
        if not self.step_cost:
            return self._shape(rows * (k + 1))  # relative units: only ratios between choices matter
        (r0, t0), c0 = min(self.step_cost.items(),
                           key=lambda kv: (abs(kv[0][0] - rows), abs(kv[0][1] - (k + 1))))
        return c0 * self._shape(rows * (k + 1)) / self._shape(r0 * t0)

    # --- the decision ------------------------------------------------------------------------------------
    def choose(self, alphas: Sequence[float], available: Sequence[int], rows: int) -> int:
        """k for this step. alphas / available: per drafting-capable row; rows: rows in the forward."""
        kmax = min(self.max_draft, max(available, default=0))
        if kmax <= 0:
            return 0
        if not self.adaptive:
            return kmax
        best_k, best = 0, -math.inf
        for k in range(kmax + 1):
            gain = sum(expected_tokens(a, min(k, av)) for a, av in zip(alphas, available))
            gain += rows - len(alphas)  # rows that cannot draft still emit one token
            rate = gain / (self.cost(rows, k) + k * self.draft_cost)
            if rate > best * (1 + 1e-9):
                best_k, best = k, rate
        return best_k

    def idle(self, stats: SpecStats) -> None:
        """A row that could have drafted but did not: let its estimate recover toward the prior."""
        stats.alpha += self.recovery * (self.prior_alpha - stats.alpha)


class Stopwatch:
    """Wall-clock timer that waits for queued device work, so measured costs are real."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()
