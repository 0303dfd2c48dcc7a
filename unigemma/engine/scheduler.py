"""Continuous batching: requests join and leave between steps; running sequences decode together.

One `step()`:

    admit     waiting requests take free cache slots (lowest first); the prefix cache restores what it can
    prefill   up to `prefill_chunk` prompt tokens, chunk by chunk (B = 1, slot s); the last chunk yields the
              request's first token
    decode    every running sequence advances in ONE forward over cache rows 0..B−1: T = 1 + k tokens per row
              (the pending token + k drafts; rows with fewer drafts, and rows still prefilling, are padded
              with position −1) → sampler at every real position → accept drafts → roll back the rest
    finish    EOS / stop ids / stop strings / max_tokens / context limit; the slot is freed at once and the
              sequence in the highest slot moves into it, so running rows stay compacted in 0..B−1 and
              decode reads the cache as zero-copy views

Failures are per request: an exception while admitting, prefilling or booking one sequence (bad media, a grammar,
detokenizer or stop-check error) ends that sequence alone with finish_reason "error" (TokenEvent.error says why;
the log has the request id and traceback). A failed batched decode forward is retried row by row, so only the
row at fault fails.

Results never depend on batch composition: every row is computed from its own cache slot, and its sampling
draws come from its own random stream (seeded requests), advanced only by the positions it actually emits.

Per sequence the cache holds positions [0, computed) with computed = len(tokens) − 1: the newest token is
"pending" and is fed by the next decode step. Rolling back rejected drafts is `cache.truncate`.

What this module does not do: run the model (engine/runner.py), choose drafts (engine/speculative.py),
process logits (engine/sampling.py), or know about chat messages (inputs/, outputs/).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import FULL
from ..outputs.detokenize import IncrementalDetokenizer
from .prefix_cache import BlockKeys, PrefixCache
from .runner import ModelRunner
from .sampling import PenaltyState, Sampler, SamplingBatch, SamplingParams, make_generator
from .speculative import DraftController, Proposer, SpecStats, Stopwatch, accept_length
from .stopping import StopChecker

WAITING, PREFILL, RUNNING, DONE = "waiting", "prefill", "running", "done"

log = logging.getLogger("unigemma.engine")


@dataclass
class Request:
    """One generation request: prompt token ids (+ media inputs for its placeholders) and settings.

    media: the model's media keyword arguments for this prompt (pixel_values, image_position_ids,
    input_features, input_features_mask, pixel_values_videos, video_position_ids, num_frames_per_video).
    speculate: False keeps this request out of speculative decoding.
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    media: dict[str, Any] | None = None
    request_id: str | None = None
    speculate: bool = True
    constraint: Any = None   # engine.constraints.CompiledGrammar: every sampled and drafted token must fit it
    open: bool = False       # streaming input: the prompt grows via Scheduler.extend and is prefilled as it
                             # arrives; nothing is sampled until extend(..., close=True)
    diffusion: Any = None    # DiffusionGemma only: engine.diffusion.DiffusionOptions, or a dict of its fields


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenEvent:
    """One generated token of one request (token_id None: a final event without a token, e.g. cancelled).

    text: the text this token makes safe to show (stop strings held back / cut, UTF-8 never split; "" when the
    engine has no tokenizer). usage is set on the finishing event.
    """

    request_id: str
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    error: str | None = None    # finish_reason "error": what went wrong (this request alone failed)


class Sequence:
    """The engine's state of one request."""

    def __init__(self, rid: str, request: Request, eos_ids: list[int], max_len: int, tokenizer, device):
        p = request.params
        self.id = rid
        self.request = request
        self.params = p
        self.prompt_len = len(request.prompt_ids)
        self.tokens: list[int] = list(request.prompt_ids)
        self.slot = -1
        self.status = WAITING
        self.computed = 0
        self.cached_tokens = 0
        self.generator = make_generator(p.seed, device) if (p.seed is not None and not p.greedy) else None
        self.stop = StopChecker.from_params(p, eos_ids, max_context=max_len, prompt_len=self.prompt_len)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids=request.prompt_ids) if tokenizer else None
        self.text_parts: list[str] = []
        self.logprobs: list[float | None] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.embeds: torch.Tensor | None = None
        self.keys: BlockKeys | None = None
        self.stored_blocks = 0
        self.store_broken = False
        self.hidden: torch.Tensor | None = None
        self.spec = SpecStats()
        self.spec_state: dict = {}
        self.prompt_mask: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.cstate = request.constraint.new_state() if request.constraint is not None else None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def usage(self) -> Usage:
        s = self.spec
        return Usage(self.prompt_len, len(self.tokens) - self.prompt_len, self.cached_tokens, s.drafted,
                     s.accepted, s.acceptance_rate, s.mean_accepted_length)


class Scheduler:
    """Owns the sequences and drives the runner; `Engine` (engine/generate.py) is the public facade."""

    def __init__(self, runner: ModelRunner, *, eos_token_ids: list[int], tokenizer=None, prefill_chunk: int = 512,
                 prefix_cache: PrefixCache | None = None, proposer: Proposer | None = None,
                 controller: DraftController | None = None, logprobs_mode: str = "processed"):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: expected an integer >= 1")
        self.runner = runner
        self.cache = runner.cache
        self.eos_token_ids = list(eos_token_ids)
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.prefix = prefix_cache
        if prefix_cache is not None:
            # a block can only be stored while all its positions are still in the sliding ring
            self.prefill_chunk = max(1, min(prefill_chunk, self.cache.ring - prefix_cache.block_size))
        self.proposer = proposer
        self.controller = controller or DraftController(0)
        self.sampler = Sampler(logprobs_mode)
        self.vocab = runner.vocab_size
        self.device = runner.device
        self.clock = Stopwatch(self.device)
        self.waiting: deque[Sequence] = deque()
        self.slots: list[Sequence] = []              # slots[i].slot == i: active (prefilling or running)
        self.seqs: dict[str, Sequence] = {}
        self.pending: list[TokenEvent] = []
        self._ids = itertools.count()
        self._finished: list[Sequence] = []
        self.steps = 0

    # --- requests ------------------------------------------------------------------------------------------
    def add(self, request: Request) -> str:
        ids = request.prompt_ids
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError("Request.prompt_ids must be a non-empty list of token ids")
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"Request.prompt_ids: token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
        if len(ids) >= self.runner.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit a context of {self.runner.max_len} tokens "
                             "(it needs at least one position to generate into); shorten it or raise max_model_len")
        if not isinstance(request.params, SamplingParams):
            raise ValueError(f"Request.params must be a SamplingParams, got {type(request.params).__name__}")
        big = [t for t in request.params.logit_bias if t >= self.vocab]
        if big:
            raise ValueError(f"logit_bias token id {big[0]} is outside the vocabulary [0, {self.vocab})")
        if request.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        request.prompt_ids = ids
        rid = request.request_id or f"req-{next(self._ids)}"
        if rid in self.seqs and self.seqs[rid].status != DONE:
            raise ValueError(f"request_id {rid!r} is already in use by an unfinished request")
        request.request_id = rid
        seq = Sequence(rid, request, self.eos_token_ids, self.runner.max_len, self.tokenizer, self.device)
        if request.params.uses_penalties:
            seq.prompt_mask = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            seq.prompt_mask[torch.tensor(ids, device=self.device)] = True
            seq.counts = torch.zeros(self.vocab, dtype=torch.int32, device=self.device)
        self.seqs[rid] = seq
        self.waiting.append(seq)
        return rid

    def cancel(self, rid: str) -> bool:
        """Stop a request now and free its slot; a final event with finish_reason "cancelled" follows from
        the next step(). False when the request is unknown or already finished."""
        seq = self.seqs.get(rid)
        if seq is None or seq.status == DONE:
            return False
        if seq.status == WAITING:
            self.waiting.remove(seq)
        else:
            self._free(seq)
        seq.status = DONE
        seq.finish_reason = "cancelled"
        self.pending.append(TokenEvent(rid, None, finished=True, finish_reason="cancelled", usage=seq.usage()))
        return True

    @torch.inference_mode()
    def extend(self, rid: str, ids: list[int], media: dict[str, Any] | None = None, close: bool = False) -> None:
        """Append prompt tokens to an open request (Request.open): the next steps prefill them. `media`: model
        media kwargs for placeholders among `ids` (their soft-token rows are embedded now). close=True ends the
        prompt: the request then samples its first token like any other."""
        seq = self.seqs.get(rid)
        if seq is None or seq.status not in (WAITING, PREFILL) or not seq.request.open:
            raise ValueError(f"request {rid!r} is not an open streaming request (Request(open=True), not closed)")
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"extend: token id {bad[0]} is outside the vocabulary [0, {self.vocab})")
        n0 = len(seq.tokens)
        if n0 + len(ids) >= self.runner.max_len:
            raise ValueError(f"the prompt would grow to {n0 + len(ids)} tokens, which does not fit a context of "
                             f"{self.runner.max_len} tokens")
        if ids and (media or seq.embeds is not None):
            # once any soft token is in the prompt the runner reads embeddings for every position; rows already
            # prefilled are never read again, but keeping absolute indexing keeps the runner unchanged
            embed = self.runner.model.embed
            new = embed(torch.tensor([ids], device=self.device), **(media or {}))[0]
            if seq.embeds is None:
                seq.embeds = embed(torch.tensor([seq.tokens], device=self.device))[0]
            seq.embeds = torch.cat([seq.embeds, new.to(seq.embeds.dtype)])
        seq.tokens += ids
        seq.prompt_len = len(seq.tokens)
        seq.request.prompt_ids = list(seq.tokens)
        if close:
            seq.request.open = False
            if seq.computed >= seq.prompt_len:  # the last token was prefilled without logits: compute it again
                seq.computed = seq.prompt_len - 1
                if seq.slot >= 0:
                    self.cache.truncate(seq.slot, seq.computed)
            # prompt-length-dependent state is rebuilt for the final prompt
            p = seq.params
            seq.stop = StopChecker.from_params(p, self.eos_token_ids, max_context=self.runner.max_len,
                                               prompt_len=seq.prompt_len)
            if self.tokenizer is not None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=seq.tokens)
            if seq.prompt_mask is not None:
                seq.prompt_mask[torch.tensor(seq.tokens, device=self.device)] = True

    def rewind(self, rid: str, n: int) -> None:
        """Drop the last `n` prompt tokens of an open request (text whose tokenization changed as more of it
        arrived); prefilled ones are cut from the cache too, as far as the sliding window still allows."""
        seq = self.seqs.get(rid)
        if seq is None or seq.status not in (WAITING, PREFILL) or not seq.request.open:
            raise ValueError(f"request {rid!r} is not an open streaming request (Request(open=True), not closed)")
        keep = len(seq.tokens) - n
        if n < 0 or keep < 1:
            raise ValueError(f"rewind n={n}: expected 0 <= n < {len(seq.tokens)} (the prompt's length)")
        if seq.computed > keep and seq.slot >= 0:
            if not self.cache.ring_view_ok(seq.slot, keep):
                raise ValueError(f"cannot rewind {seq.computed - keep} prefilled tokens: the sliding-window cache "
                                 f"only keeps {self.cache.spare} positions to roll back")
            self.cache.truncate(seq.slot, keep)
        seq.computed = min(seq.computed, keep)
        del seq.tokens[keep:]
        seq.prompt_len = keep
        seq.request.prompt_ids = list(seq.tokens)
        if seq.embeds is not None:
            seq.embeds = seq.embeds[:keep]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.slots or self.pending)

    # --- the step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events, self.pending = self.pending, []
        self._admit(events)
        self._prefill(events)
        self._decode(events)
        # freeing moves sequences between slots, so it waits until every row of this step is booked
        for seq in self._finished:
            self._free(seq)
        self._finished = []
        self.steps += 1
        return events

    def _admit(self, events: list[TokenEvent]) -> None:
        while self.waiting and len(self.slots) < self.runner.max_slots:
            seq = self.waiting.popleft()
            seq.slot = len(self.slots)
            self.slots.append(seq)
            seq.status = PREFILL
            try:
                self._admit_one(seq)
            except Exception as e:  # bad media for this request (e.g. the vision embedder refusing it)
                self._fail(seq, e, events, "admitting")

    def _admit_one(self, seq: Sequence) -> None:
        self.cache.reset_slot(seq.slot)
        media = seq.request.media
        if media:
            ids = torch.tensor([seq.tokens], device=self.device)
            seq.embeds = self.runner.model.embed(ids, **media)[0]
        if self.prefix is not None and not seq.request.open:  # a growing prompt has no block keys
            seq.keys = self.prefix.keys_for(seq.tokens, seq.embeds)
            keys = seq.keys.extend(seq.tokens, seq.prompt_len)
            # at least the last prompt token is always computed: its logits give the first output token
            blocks = self.prefix.lookup(keys, seq.prompt_len - 1)
            seq.cached_tokens = seq.computed = self.prefix.restore(blocks, seq.slot)
            seq.stored_blocks = len(blocks)

    def _prefill(self, events: list[TokenEvent]) -> None:
        budget = self.prefill_chunk
        for seq in list(self.slots):
            try:
                budget = self._prefill_one(seq, budget, events)
            except Exception as e:  # prefill is per sequence (B = 1): only this request fails
                self._fail(seq, e, events, "prefilling")
            if budget <= 0:
                break

    def _prefill_one(self, seq: Sequence, budget: int, events: list[TokenEvent]) -> int:
        while seq.status == PREFILL and budget > 0 and seq.computed < seq.prompt_len:
            start = seq.computed
            end = self.runner.chunk_end(seq.tokens, start, min(budget, self.prefill_chunk))
            end = min(end, seq.prompt_len)
            last = end == seq.prompt_len and not seq.request.open
            out = self.runner.prefill_chunk(seq.slot, seq.tokens, start, end, seq.embeds, need_logits=last)
            seq.computed = end
            budget -= end - start
            self._store_blocks(seq)
            if last:
                seq.status = RUNNING
                seq.embeds = None
                seq.hidden = out.hidden[0, -1].clone()
                self._emit_sampled(seq, out.logits[:, -1], events)
        return budget

    def _emit_sampled(self, seq: Sequence, logits: torch.Tensor, events: list[TokenEvent]) -> None:
        """First token of a sequence, from its last prompt position's logits (1, V)."""
        batch = SamplingBatch.build([seq.params], self.vocab, self.device, [seq.generator])
        if seq.cstate is not None:
            logits = logits.float().clone()
            logits[0] = logits[0].masked_fill(~self._allowed(seq.cstate, logits.shape[-1]), float("-inf"))
        out = self.sampler(logits, batch, self._penalties([seq], [0]) if batch.any_penalty else None)
        tok, lp, top = out.tolist([seq.params])[0]
        self._accept_tokens(seq, [(tok, lp, top)], events)

    # --- decode --------------------------------------------------------------------------------------------
    def _decode(self, events: list[TokenEvent]) -> None:
        running = [s for s in self.slots if s.status == RUNNING]
        if not running:
            return
        try:
            drafts, chosen, hidden = self._forward_rows(running, speculate=True)
        except Exception as e:
            if len(running) == 1:
                self._fail(running[0], e, events, "decoding")
                return
            # The batched step failed and cannot say for which row: run each row alone (no drafts) so that only
            # the request at fault fails. Rewriting a row's pending position is harmless (same token, same slot).
            log.warning("decode step of %d requests failed (%s: %s); retrying row by row", len(running),
                        type(e).__name__, e)
            for s in running:
                try:
                    d, c, h = self._forward_rows([s], speculate=False)
                except Exception as e1:
                    self._fail(s, e1, events, "decoding")
                    continue
                self._book([s], d, c, h, events)
            return
        self._book(running, drafts, chosen, hidden, events)

    def _forward_rows(self, running: list[Sequence], speculate: bool):
        """One decode forward over `running` (+ drafts) and the token plain decoding would pick at each
        verified position. Changes no sequence state (only the cache positions the rows write)."""
        rows = max(s.slot for s in running) + 1
        drafts = self._drafts(running, rows) if speculate else [[] for _ in running]
        T = 1 + max(len(d) for d in drafts)
        tok = torch.zeros(rows, T, dtype=torch.long)
        pos = torch.full((rows, T), -1, dtype=torch.long)
        kv_len = 0
        for s, d in zip(running, drafts):
            L = len(s.tokens)
            n = 1 + len(d)
            tok[s.slot, :n] = torch.tensor([s.tokens[-1]] + d)
            pos[s.slot, :n] = torch.arange(L - 1, L - 1 + n)
            kv_len = max(kv_len, L - 1 + n)
        t0 = self.clock.now()
        logits, hidden = self.runner.decode(tok.to(self.device), pos.to(self.device), kv_len)
        chosen = self._choose(running, drafts, logits)
        if speculate:
            self.controller.observe_step(rows, T, self.clock.now() - t0)
        return drafts, chosen, hidden

    def _book(self, running: list[Sequence], drafts, chosen, hidden, events: list[TokenEvent]) -> None:
        """Accept each row's verified tokens; a failure while booking one row (grammar, detokenizer, stop
        check) fails that request alone."""
        for s, d, picks in zip(running, drafts, chosen):
            try:
                n = accept_length(d, [t for t, _, _ in picks])
                L = len(s.tokens)
                if s.request.speculate and self.proposer is not None:
                    if d:
                        s.spec.observe(len(d), n)
                    else:
                        self.controller.idle(s.spec)
                if n < len(d):
                    self.cache.truncate(s.slot, L + n)  # drop the rejected drafts' ring entries
                s.computed = L + n
                if self.proposer is not None and self.proposer.name == "mtp":
                    s.hidden = hidden[s.slot, n].clone()
                self._accept_tokens(s, picks[: n + 1], events)
                if s.status == RUNNING:
                    self._store_blocks(s)
            except Exception as e:
                self._fail(s, e, events, "decoding")

    def _fail(self, seq: Sequence, exc: BaseException, events: list[TokenEvent], stage: str) -> None:
        """End `seq` alone with finish_reason "error" (its slot is freed at the end of the step); the other
        requests of the step go on. Logged with the request id and the traceback."""
        log.error("request %s failed while %s: %s: %s", seq.id, stage, type(exc).__name__, exc, exc_info=exc)
        if seq.status == DONE and seq not in self._finished and seq.slot < 0:
            return  # already ended (cancelled) and its final event sent: nothing left to fail
        seq.status = DONE
        seq.finish_reason = "error"
        seq.embeds = seq.hidden = None
        seq.spec_state.clear()
        if seq.slot >= 0 and seq not in self._finished:
            self._finished.append(seq)
        events[:] = [e for e in events if not (e.request_id == seq.id and e.finished)]
        events.append(TokenEvent(seq.id, None, finished=True, finish_reason="error", usage=seq.usage(),
                                 error=f"{type(exc).__name__} while {stage}: {exc}"))

    def _drafts(self, running: list[Sequence], rows: int) -> list[list[int]]:
        none = [[] for _ in running]
        if self.proposer is None or self.controller.max_draft <= 0:
            return none
        caps = []
        for s in running:
            cap = 0
            if s.request.speculate:
                left = s.stop.remaining
                # positions L−1 … L−1+k must fit the context; drafts past the token limit are wasted
                cap = min(self.controller.max_draft, self.runner.max_len - len(s.tokens),
                          (left - 1) if left is not None else self.controller.max_draft)
            caps.append(max(0, cap))
        cand = [s for s, c in zip(running, caps) if c > 0]
        if not cand:
            return none
        if self.proposer.name == "mtp":
            k = self.controller.choose([s.spec.alpha for s in cand], [c for c in caps if c > 0], rows)
            if k <= 0:
                return none
            t0 = self.clock.now()
            proposed = self.proposer.propose(cand, k)
            self.controller.observe_draft(k, self.clock.now() - t0)
        else:
            # free proposals first, then decide how many of them are worth verifying
            proposed = self.proposer.propose(cand, max(caps))
            avail = [min(len(p), c) for p, c in zip(proposed, [c for c in caps if c > 0])]
            k = self.controller.choose([s.spec.alpha for s, a in zip(cand, avail) if a > 0],
                                       [a for a in avail if a > 0], rows)
        it = iter(proposed)
        out = []
        for s, c in zip(running, caps):
            d = list(next(it))[: min(k, c)] if c > 0 else []
            if d and s.cstate is not None:
                d = d[: s.cstate.validate_drafts(d)]  # only drafts the grammar accepts are worth verifying
            out.append(d)
        return out

    @staticmethod
    def _allowed(state, vocab: int, drafts: list[int] | None = None) -> torch.Tensor:
        """Bool [k+1, vocab] (or [vocab]): tokens the grammar allows after each prefix of `drafts`."""
        from .constraints import unpack_bitmask

        n = 1 + len(drafts or [])
        bm = torch.zeros((n, state.mask_words), dtype=torch.int32)
        state.fill_draft_masks(bm, 0, drafts or [])
        allowed = unpack_bitmask(bm, state.vocab_size)
        if vocab > state.vocab_size:
            allowed = torch.cat([allowed, allowed.new_zeros(n, vocab - state.vocab_size)], dim=1)
        allowed = allowed[:, :vocab]
        return allowed if drafts else allowed[0]

    def _choose(self, running: list[Sequence], drafts: list[list[int]], logits: torch.Tensor):
        """The token plain decoding would pick at every verified position: per row, [(token, logprob, top)]
        for positions 0..len(drafts). Seeded rows rewind their generator to the draws actually used."""
        rows_idx, cols_idx, params, gens, owners = [], [], [], [], []
        for i, (s, d) in enumerate(zip(running, drafts)):
            for j in range(len(d) + 1):
                rows_idx.append(s.slot)
                cols_idx.append(j)
                params.append(s.params)
                gens.append(s.generator)
                owners.append(i)
        flat = logits[torch.tensor(rows_idx, device=logits.device), torch.tensor(cols_idx, device=logits.device)]
        if any(sq.cstate is not None for sq in running):
            flat = flat.float()
            at = 0
            for sq, d in zip(running, drafts):
                if sq.cstate is not None:
                    allowed = self._allowed(sq.cstate, flat.shape[-1], d).to(flat.device)
                    if allowed.dim() == 1:
                        allowed = allowed[None]
                    flat[at:at + len(d) + 1] = flat[at:at + len(d) + 1].masked_fill(~allowed, float("-inf"))
                at += len(d) + 1
        simple = all(p.greedy and not p.logprobs and not p.logit_bias and not p.uses_penalties for p in params)
        if simple:
            picks = [(t, None, []) for t in flat.argmax(-1).tolist()]
        else:
            saved = {i: s.generator.get_state() for i, (s, d) in enumerate(zip(running, drafts))
                     if s.generator is not None and d}
            batch = SamplingBatch.build(params, self.vocab, self.device, gens)
            pen = self._penalties(running, [len(d) for d in drafts], drafts) if batch.any_penalty else None
            picks = self.sampler(flat, batch, pen).tolist(params)
        out: list[list] = [[] for _ in running]
        for o, p in zip(owners, picks):
            out[o].append(p)
        if not simple:
            for i, state in saved.items():
                n = accept_length(drafts[i], [t for t, _, _ in out[i]])
                if n < len(drafts[i]):
                    # positions after the first rejection were drawn for nothing: replay only the n + 1 used
                    g = running[i].generator
                    g.set_state(state)
                    scratch = torch.empty(self.vocab, dtype=torch.float32, device=self.device)
                    for _ in range(n + 1):
                        scratch.exponential_(generator=g)
        return out

    def _penalties(self, seqs: list[Sequence], ks: list[int], drafts: list[list[int]] | None = None) -> PenaltyState:
        """Penalty state for every verified position: the counts include the drafts before that position."""
        masks, counts = [], []
        for i, (s, k) in enumerate(zip(seqs, ks)):
            pm = s.prompt_mask if s.prompt_mask is not None else torch.zeros(self.vocab, dtype=torch.bool,
                                                                              device=self.device)
            c = s.counts if s.counts is not None else torch.zeros(self.vocab, dtype=torch.int32, device=self.device)
            c = c.clone()
            for j in range(k + 1):
                masks.append(pm)
                counts.append(c.clone())
                if drafts is not None and j < k:
                    c[drafts[i][j]] += 1
        return PenaltyState(torch.stack(masks), torch.stack(counts))

    # --- tokens → events ---------------------------------------------------------------------------------
    def _accept_tokens(self, seq: Sequence, picks, events: list[TokenEvent]) -> None:
        for tok, lp, top in picks:
            seq.tokens.append(tok)
            if seq.counts is not None:
                seq.counts[tok] += 1
            seq.logprobs.append(lp)
            if seq.detok is not None and tok not in seq.stop.stop_ids:
                delta = seq.detok.add(tok)
            else:
                delta = ""
            res = seq.stop.step(tok, delta)
            if seq.cstate is not None and not res.finished:
                seq.cstate.advance(tok)
                if seq.cstate.is_finished():
                    # the grammar is complete (e.g. the closing brace of a JSON answer): nothing else may follow
                    res = type(res)(res.text + (seq.stop.flush() if hasattr(seq.stop, "flush") else ""), True,
                                    "stop", "grammar")
            text = res.text
            if res.finished and res.finish_reason == "length" and seq.detok is not None:
                text += seq.detok.finish()  # the tail of an incomplete character, as a full decode shows it
            seq.text_parts.append(text)
            ev = TokenEvent(seq.id, tok, lp, list(top) if top else [], text)
            events.append(ev)
            if res.finished:
                seq.finish_reason, seq.stop_reason = res.finish_reason, res.stop_reason
                seq.status = DONE
                seq.embeds = seq.hidden = None
                seq.spec_state.clear()
                self._finished.append(seq)
                ev.finished, ev.finish_reason, ev.stop_reason = True, res.finish_reason, res.stop_reason
                ev.usage = seq.usage()
                return

    def _free(self, seq: Sequence) -> None:
        """Release seq's slot; the sequence in the highest slot moves into it (rows stay compacted)."""
        i = seq.slot
        last = self.slots.pop()
        if last is not seq:
            self._move(last, i)
            self.slots[i] = last
        seq.slot = -1

    def _move(self, seq: Sequence, dst: int) -> None:
        c, src = self.cache, seq.slot
        n = seq.computed
        for lk, t in zip(c.layers, c.config.layer_types):
            if lk is None:
                continue
            if t == FULL:  # only the valid entries [0, computed): the rest is never read
                lk.k[dst, :, :n].copy_(lk.k[src, :, :n])
                lk.v[dst, :, :n].copy_(lk.v[src, :, :n])
            else:
                lk.k[dst].copy_(lk.k[src])
                lk.v[dst].copy_(lk.v[src])
        c.ring_pos[dst].copy_(c.ring_pos[src])
        seq.slot = dst

    # --- prefix cache ------------------------------------------------------------------------------------
    def _store_blocks(self, seq: Sequence) -> None:
        if self.prefix is None or seq.keys is None or seq.store_broken:
            return
        keys = seq.keys.extend(seq.tokens, seq.computed)
        bs = self.prefix.block_size
        before = seq.stored_blocks
        ready = min(len(keys), seq.computed // bs)  # keys may run ahead (the whole prompt's are known)
        while seq.stored_blocks < ready:
            j = seq.stored_blocks
            if not self.prefix.store(keys[j], j * bs, seq.slot):
                seq.store_broken = True
                break
            seq.stored_blocks += 1
        if seq.stored_blocks > before:
            self.prefix.touch_keys(keys[: seq.stored_blocks])
