"""Sampling: per-request settings, batched logits processors, the sampler, and speculative acceptance.

Data flow for one decode step of a batch of B running requests (each with its own settings)::

    logits [B, V] (any float dtype, CPU or CUDA)
      │  float32 copy
      ├─ apply_logit_bias        per-row {token: bias}; a bias of -100 bans the token outright
      ├─ apply_penalties         repetition (prompt + output), presence / frequency (output counts)
      ├─ apply_temperature       greedy rows are left as they are
      │        └──► logprobs in "processed" mode are taken here (see LOGPROBS MODES below)
      ├─ apply_top_k_top_p       one sort (or one top-k when every sampled row has a k) serves both
      ├─ apply_min_p
      └─ sample                  greedy rows: argmax; others: exponential race with each row's own generator
    SamplerOutput(tokens [B], logprobs, top-N ids / logprobs)

Every step is a tensor op over the whole batch: no `.item()`, no data-dependent Python branches, so a CUDA
decode step never waits on the host. The only branching is on *settings* (known on the host), e.g. top-k is
skipped entirely when no row asks for it.

Seeds: a request with a seed owns a `torch.Generator` (see `make_generator`). Its row draws exactly V
exponentials from that generator per step, whatever else is in the batch, so the same seed gives the same tokens
alone or batched. Rows without a seed share the global generator.

LOGPROBS MODES (`Sampler(logprobs_mode=...)`):
  - "processed" (default): log-softmax after logit bias, penalties and temperature, before top-k / top-p /
    min-p truncation. This is the model's distribution as OpenAI reports it (after temperature), and every
    token keeps a finite logprob, so top-N lists stay meaningful.
  - "raw": log-softmax of the logits as the model produced them.
  - "sampled": the distribution actually sampled from (after truncation; removed tokens get -inf).
Greedy rows use temperature 1 for logprobs.

`speculative_accept` / `speculative_accept_batch` implement lossless acceptance of drafted tokens (greedy,
stochastic drafts with a draft distribution q, and deterministic argmax drafts as an MTP drafter makes them).

What this module does not do: stop conditions (engine/stopping.py), grammar masks (engine/constraints.py),
drafting and cache rollback (engine/speculative.py), tokens → text (outputs/detokenize.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

# Temperatures below this are treated as greedy: dividing logits by ~0 overflows float32 to inf (NaN softmax),
# and the limit of sampling as T → 0 is argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-5
# OpenAI: "values like -100 or 100 should result in a ban or exclusive selection". Adding -100 to a logit only
# makes a token unlikely, so a bias at the bottom of the range is applied as an exact ban (-inf).
BAN_BIAS = -100.0
MAX_TOP_LOGPROBS = 20

LogprobsMode = Literal["processed", "raw", "sampled"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Settings of one request. Validated on construction; errors are ValueError naming the field and range.

    temperature 0 means greedy. top_k 0 or -1, top_p 1, min_p 0, repetition_penalty 1 and the two OpenAI
    penalties 0 are "off". `logit_bias` maps token id → bias in [-100, 100] (JSON-style string keys are
    accepted and converted). `max_tokens` None means "until the context is full". `n` (several completions per
    prompt) is left to the server, which fans a request out into several.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, expected: str):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: expected {expected}")

        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1] (1 = off)")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "an integer >= 1, or 0 / -1 for off")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1] (0 = off)")
        if (not _is_number(self.repetition_penalty) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                bad(name, "a number in [-2, 2] (0 = off)")
        if not isinstance(self.logit_bias, dict):
            bad("logit_bias", "a mapping of token id to a bias in [-100, 100]")
        bias: dict[int, float] = {}
        for k, v in self.logit_bias.items():
            tid = int(k) if isinstance(k, str) and k.strip().isdigit() else k
            if not _is_int(tid) or tid < 0:
                raise ValueError(f"SamplingParams.logit_bias: key {k!r} is not a token id (an integer >= 0)")
            if not _is_number(v) or not -100 <= v <= 100:
                raise ValueError(f"SamplingParams.logit_bias[{k!r}]={v!r}: expected a number in [-100, 100]")
            bias[tid] = float(v)
        self.logit_bias = bias
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "an integer or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "an integer >= 1 or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        self.stop = list(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a list of non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids (integers >= 0)")
        if not isinstance(self.logprobs, bool):
            bad("logprobs", "true or false")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs > 0 and not self.logprobs:
            bad("top_logprobs", "0 unless logprobs is true")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request's row. Any Python int is accepted (reduced modulo 2**64)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed % (1 << 64))
    return g


# ----------------------------------------------------------------------------------------------------------
# Batched settings
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SamplingBatch:
    """The per-row settings of a batch as tensors on the logits' device, plus host-side flags.

    Build it once per batch composition (`SamplingBatch.build`) and reuse it every step. Seeded rows need
    their generator to persist across steps: keep `generators` and pass them back when rebuilding.
    """

    params: list[SamplingParams]
    temperature: torch.Tensor          # [B] float32; 1.0 for greedy rows (their logits are not scaled)
    top_k: torch.Tensor                # [B] int64; V when off
    top_p: torch.Tensor                # [B] float32; 1.0 when off
    min_p: torch.Tensor                # [B] float32; 0.0 when off
    repetition_penalty: torch.Tensor   # [B] float32
    presence_penalty: torch.Tensor     # [B] float32
    frequency_penalty: torch.Tensor    # [B] float32
    greedy: torch.Tensor               # [B] bool
    bias_rows: torch.Tensor            # [nnz] int64 } sparse logit bias: logits[rows, ids] += vals
    bias_ids: torch.Tensor             # [nnz] int64 }
    bias_vals: torch.Tensor            # [nnz] float32 (-inf for bans)
    generators: list[torch.Generator | None]
    # host-side flags, so whole stages are skipped without looking at device tensors
    all_greedy: bool
    any_top_k: bool
    max_top_k: int                     # the largest k over sampled rows; V when some sampled row has no top-k
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    any_bias: bool
    max_top_logprobs: int
    any_logprobs: bool

    @property
    def size(self) -> int:
        return len(self.params)

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int,
              device: torch.device | str = "cpu",
              generators: Sequence[torch.Generator | None] | None = None) -> "SamplingBatch":
        device = torch.device(device)
        params = list(params)
        if not params:
            raise ValueError("SamplingBatch.build: params is empty; expected one SamplingParams per row")
        if generators is None:
            generators = [make_generator(p.seed, device) if p.seed is not None and not p.greedy else None
                          for p in params]
        generators = list(generators)
        if len(generators) != len(params):
            raise ValueError(f"SamplingBatch.build: {len(generators)} generators for {len(params)} rows")
        rows, ids, vals = [], [], []
        for r, p in enumerate(params):
            for tid, b in p.logit_bias.items():
                if tid >= vocab_size:
                    raise ValueError(f"logit_bias token id {tid} is out of range: the vocabulary has "
                                     f"{vocab_size} tokens (ids 0..{vocab_size - 1})")
                rows.append(r)
                ids.append(tid)
                vals.append(-math.inf if b <= BAN_BIAS else b)

        def f32(xs):
            return torch.tensor(xs, dtype=torch.float32, device=device)

        return cls(
            params=params,
            temperature=f32([1.0 if p.greedy else p.temperature for p in params]),
            top_k=torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params],
                               dtype=torch.int64, device=device),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            presence_penalty=f32([p.presence_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            greedy=torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            bias_rows=torch.tensor(rows, dtype=torch.int64, device=device),
            bias_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            bias_vals=f32(vals),
            generators=generators,
            all_greedy=all(p.greedy for p in params),
            # truncation does not change an argmax, so greedy rows never need it
            any_top_k=any(0 < p.top_k < vocab_size and not p.greedy for p in params),
            max_top_k=max((p.top_k if 0 < p.top_k < vocab_size else vocab_size
                           for p in params if not p.greedy), default=vocab_size),
            any_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            any_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
            any_penalty=any(p.uses_penalties for p in params),
            any_bias=bool(rows),
            max_top_logprobs=max(p.top_logprobs for p in params),
            any_logprobs=any(p.logprobs for p in params),
        )


# ----------------------------------------------------------------------------------------------------------
# Token history for penalties
# ----------------------------------------------------------------------------------------------------------

@dataclass
class PenaltyState:
    """Which tokens each row has seen, on the logits' device.

    `prompt_mask[b, t]` is True when token t occurs in row b's prompt (repetition penalty looks at prompt and
    output, as in HF and vLLM); `output_counts[b, t]` counts t among the generated tokens (presence and
    frequency penalties look at the output only, as in the OpenAI API). Update once per step with `update`.
    """

    prompt_mask: torch.Tensor      # [B, V] bool
    output_counts: torch.Tensor    # [B, V] int32

    @classmethod
    def from_token_ids(cls, prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]] | None,
                       vocab_size: int, device: torch.device | str = "cpu") -> "PenaltyState":
        device = torch.device(device)
        b = len(prompt_ids)
        output_ids = output_ids if output_ids is not None else [[] for _ in range(b)]
        if len(output_ids) != b:
            raise ValueError(f"PenaltyState: {len(prompt_ids)} prompts but {len(output_ids)} outputs")
        prompt_mask = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)
        counts = torch.zeros(b, vocab_size, dtype=torch.int32, device=device)
        for r, (pi, oi) in enumerate(zip(prompt_ids, output_ids)):
            if len(pi):
                prompt_mask[r, torch.as_tensor(list(pi), dtype=torch.int64, device=device)] = True
            if len(oi):
                idx = torch.as_tensor(list(oi), dtype=torch.int64, device=device)
                counts[r].scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
        return cls(prompt_mask, counts)

    def update(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Count newly generated tokens: `tokens` [B] or [B, n] (several per row, e.g. accepted drafts);
        `valid` (same shape, bool) masks out padding."""
        t = tokens.reshape(tokens.shape[0], -1).to(torch.int64)
        ones = torch.ones_like(t, dtype=torch.int32)
        if valid is not None:
            ones = ones * valid.reshape(t.shape).to(torch.int32)
        self.output_counts.scatter_add_(1, t, ones)

    def select(self, rows: Sequence[int] | torch.Tensor) -> "PenaltyState":
        """The state of a subset / reordering of rows (when the batch composition changes)."""
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.prompt_mask.device)
        return PenaltyState(self.prompt_mask[idx], self.output_counts[idx])

    @staticmethod
    def concat(states: Sequence["PenaltyState"]) -> "PenaltyState":
        return PenaltyState(torch.cat([s.prompt_mask for s in states]),
                            torch.cat([s.output_counts for s in states]))


# ----------------------------------------------------------------------------------------------------------
# Processors: small functions over a batch; each returns a new tensor and leaves its input alone
# ----------------------------------------------------------------------------------------------------------

def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                     vals: torch.Tensor) -> torch.Tensor:
    """logits[rows[i], ids[i]] += vals[i] (-inf bans)."""
    return logits.index_put((rows, ids), vals.to(logits.dtype), accumulate=True)


def apply_penalties(logits: torch.Tensor, state: PenaltyState, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Repetition penalty r (HF / vLLM): for every token seen in prompt or output, a positive logit is divided
    by r and a negative one multiplied by r. Then OpenAI's penalties on output counts c:
    logit -= frequency * c + presence * (c > 0)."""
    counts = state.output_counts
    seen = state.prompt_mask | (counts > 0)
    r = repetition[:, None]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalised, logits)
    c = counts.to(logits.dtype)
    return logits - frequency[:, None] * c - presence[:, None] * (c > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (greedy rows carry 1.0)."""
    return logits / temperature[:, None]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None, max_k: int | None = None) -> torch.Tensor:
    """Keep the k highest logits of each row (exactly k, ties broken by sort order), then the smallest set of
    the highest-probability survivors whose mass reaches p. Removed tokens become -inf. `top_k` [B] int64
    (V = off), `top_p` [B] float (1 = off); either may be None.

    `max_k` (a host int, >= every row's k) lets the work shrink from a full sort of V to a top-`max_k`
    selection; top-p then runs over those survivors only, which gives the same result since it comes after
    top-k. Pass it only when it bounds every row that matters.
    """
    vocab = logits.shape[-1]
    if top_k is not None and max_k is not None and max_k < vocab:
        vals, idx = logits.topk(max_k, dim=-1)  # descending: (B, K)
        pos = torch.arange(max_k, device=logits.device)[None, :]
        vals = vals.masked_fill(pos >= top_k[:, None], -math.inf)
        if top_p is not None:
            probs = vals.softmax(dim=-1)
            above = probs.cumsum(dim=-1) - probs  # mass ranked above each token; exactly 0 for the first
            vals = vals.masked_fill(above >= top_p[:, None], -math.inf)
        return torch.full_like(logits, -math.inf).scatter(-1, idx, vals)
    sorted_logits, order = logits.sort(dim=-1)  # ascending: (B, V)
    if top_k is not None:
        # ascending positions below V - k are outside the top k
        cutoff = (vocab - top_k).clamp(min=0)[:, None]
        pos = torch.arange(vocab, device=logits.device)[None, :]
        sorted_logits = sorted_logits.masked_fill(pos < cutoff, -math.inf)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        # mass of all tokens ranked *above* each token (descending cumulative sum, exclusive); a token is kept
        # while the tokens above it have not yet reached p. The top token always has 0 above it, so it stays.
        above = 1.0 - probs.cumsum(dim=-1)
        remove = above >= top_p[:, None]
        remove[:, -1] = False  # rounding in the cumsum must never remove the top token (tiny p)
        sorted_logits = sorted_logits.masked_fill(remove, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    return apply_top_k_top_p(logits, top_k, None)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return apply_top_k_top_p(logits, None, top_p)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Remove tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


def sample_from_probs(probs: torch.Tensor,
                      generators: Sequence[torch.Generator | None] | torch.Generator | None = None
                      ) -> torch.Tensor:
    """One token per row from `probs` [B, V] by an exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks
    token t with probability p_t, needs no normalisation and no host sync. `generators`: one generator for all
    rows, or one per row (None = global RNG); a per-row generator draws exactly V numbers per call."""
    race = torch.empty_like(probs, dtype=torch.float32)
    if generators is None or isinstance(generators, torch.Generator):
        race.exponential_(generator=generators)
    else:
        gens = list(generators)
        if any(g is None for g in gens):
            race.exponential_()  # unseeded rows share the global generator
        for r, g in enumerate(gens):
            if g is not None:
                race[r].exponential_(generator=g)
    # an exponential draw can be exactly 0 (1 - u with u rounding to 1); 0/0 would be NaN, which argmax
    # treats as the maximum and would pick a zero-probability token
    race.clamp_(min=torch.finfo(torch.float32).tiny)
    return (probs.float() / race).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SamplerOutput:
    tokens: torch.Tensor                       # [B] int64
    logprobs: torch.Tensor | None = None       # [B] float32: logprob of the chosen token
    top_ids: torch.Tensor | None = None        # [B, N] int64, N = the largest top_logprobs in the batch
    top_logprobs: torch.Tensor | None = None   # [B, N] float32

    def tolist(self, params: Sequence[SamplingParams]
               ) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
        """Per row: (token, its logprob or None, [(id, logprob)] × that row's top_logprobs). Syncs once."""
        tokens = self.tokens.tolist()
        lps = self.logprobs.tolist() if self.logprobs is not None else None
        tids = self.top_ids.tolist() if self.top_ids is not None else None
        tlps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        out = []
        for r, p in enumerate(params):
            lp = lps[r] if (lps is not None and p.logprobs) else None
            top = list(zip(tids[r][:p.top_logprobs], tlps[r][:p.top_logprobs])) if tids is not None else []
            out.append((tokens[r], lp, top))
        return out


class Sampler:
    """Turns logits [B, V] into one token per row, each row under its own SamplingParams.

    Call with a list of SamplingParams (built into a SamplingBatch on the fly) or a prebuilt SamplingBatch.
    `penalties` is required when any row uses repetition / presence / frequency penalties.
    """

    def __init__(self, logprobs_mode: LogprobsMode = "processed"):
        if logprobs_mode not in ("processed", "raw", "sampled"):
            raise ValueError(f"logprobs_mode={logprobs_mode!r}: expected 'processed', 'raw' or 'sampled'")
        self.logprobs_mode = logprobs_mode

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams] | SamplingBatch,
                 penalties: PenaltyState | None = None,
                 generators: Sequence[torch.Generator | None] | None = None) -> SamplerOutput:
        if logits.dim() != 2:
            raise ValueError(f"Sampler: logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch = params if isinstance(params, SamplingBatch) else SamplingBatch.build(
            params, logits.shape[-1], logits.device, generators)
        if batch.size != logits.shape[0]:
            raise ValueError(f"Sampler: {batch.size} rows of settings for {logits.shape[0]} rows of logits")
        x = logits.float()  # processors are out-of-place, so the caller's tensor is never modified
        raw = x
        if batch.any_bias:
            x = apply_logit_bias(x, batch.bias_rows, batch.bias_ids, batch.bias_vals)
        if batch.any_penalty:
            if penalties is None:
                raise ValueError("Sampler: a row uses repetition/presence/frequency penalties but no "
                                 "PenaltyState was given")
            x = apply_penalties(x, penalties, batch.repetition_penalty, batch.presence_penalty,
                                batch.frequency_penalty)
        greedy_tokens = x.argmax(dim=-1)
        if not batch.all_greedy:
            x = apply_temperature(x, batch.temperature)
        processed = x
        if batch.all_greedy:
            tokens = greedy_tokens
        else:
            if batch.any_top_k or batch.any_top_p:
                x = apply_top_k_top_p(x, batch.top_k if batch.any_top_k else None,
                                      batch.top_p if batch.any_top_p else None, batch.max_top_k)
            if batch.any_min_p:
                x = apply_min_p(x, batch.min_p)
            sampled = sample_from_probs(x.softmax(dim=-1), batch.generators)
            tokens = torch.where(batch.greedy, greedy_tokens, sampled)
        out = SamplerOutput(tokens=tokens)
        if batch.any_logprobs:
            source = {"processed": processed, "raw": raw, "sampled": x}[self.logprobs_mode]
            lp = source.log_softmax(dim=-1)
            out.logprobs = lp.gather(-1, tokens[:, None]).squeeze(-1)
            if batch.max_top_logprobs > 0:
                out.top_logprobs, out.top_ids = lp.topk(batch.max_top_logprobs, dim=-1)
        return out


# ----------------------------------------------------------------------------------------------------------
# Speculative acceptance
# ----------------------------------------------------------------------------------------------------------

def _leading_count(accepted: torch.Tensor) -> torch.Tensor:
    """Number of leading True values per row of a [B, k] bool tensor."""
    if accepted.shape[-1] == 0:
        return torch.zeros(accepted.shape[0], dtype=torch.int64, device=accepted.device)
    return accepted.to(torch.int64).cumprod(dim=-1).sum(dim=-1)


def _uniform(shape: tuple[int, int], device, generators) -> torch.Tensor:
    u = torch.empty(shape, dtype=torch.float32, device=device)
    if generators is None or isinstance(generators, torch.Generator):
        return u.uniform_(generator=generators)
    gens = list(generators)
    if any(g is None for g in gens):
        u.uniform_()
    for r, g in enumerate(gens):
        if g is not None:
            u[r].uniform_(generator=g)
    return u


def speculative_accept_batch(target: torch.Tensor, drafts: torch.Tensor,
                             draft_probs: torch.Tensor | None = None, *, greedy: bool = False,
                             num_drafts: torch.Tensor | None = None,
                             generators: Sequence[torch.Generator | None] | torch.Generator | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless acceptance of k drafted tokens per row; returns (num_accepted [B], next_token [B]) as tensors.

    target: [B, k+1, V]: the target's processed distribution p at each draft position plus the bonus position
        (probabilities; with greedy=True, logits work as well since only the argmax is used).
    drafts: [B, k] drafted token ids.
    draft_probs: [B, k, V], the distribution q the drafts were *sampled* from, or None.
    num_drafts: [B] how many drafts are real in each row (the rest is padding); default k.

    Rules (the emitted tokens are distributed exactly as sampling from p one token at a time):
      greedy=True            accept leading drafts equal to argmax p; next = argmax at the first mismatch.
      draft_probs given      accept d_i with probability min(1, p(d_i) / q(d_i)); on the first rejection
                             sample from normalize(max(p - q, 0)) (Leviathan et al., speculative sampling).
      draft_probs None       drafts are deterministic (argmax of a drafter, as MTP drafts are): accept d_i
                             with probability p(d_i); on rejection sample from p with d_i removed, renormalised.
                             This is the rule above with q = one-hot(d_i).
    If every real draft is accepted, next is sampled from p at position num_drafts (the bonus token).
    """
    if target.dim() != 3 or drafts.dim() != 2:
        raise ValueError(f"speculative_accept_batch: expected target [B, k+1, V] and drafts [B, k], got "
                         f"{tuple(target.shape)} and {tuple(drafts.shape)}")
    bsz, k = drafts.shape
    if target.shape[:2] != (bsz, k + 1):
        raise ValueError(f"speculative_accept_batch: target has shape {tuple(target.shape)}; expected "
                         f"[{bsz}, {k + 1}, V] for {k} drafts")
    if draft_probs is not None and draft_probs.shape != (bsz, k, target.shape[-1]):
        raise ValueError(f"speculative_accept_batch: draft_probs has shape {tuple(draft_probs.shape)}; "
                         f"expected [{bsz}, {k}, {target.shape[-1]}]")
    device = target.device
    drafts = drafts.to(torch.int64).clamp(min=0)  # padding ids (e.g. -1) past num_drafts must still index
    rows = torch.arange(bsz, device=device)
    if num_drafts is None:
        num_drafts = torch.full((bsz,), k, dtype=torch.int64, device=device)
    num_drafts = num_drafts.to(device=device, dtype=torch.int64)
    real = torch.arange(k, device=device)[None, :] < num_drafts[:, None]  # (B, k)

    if greedy:
        best = target.argmax(dim=-1)  # (B, k+1)
        n = _leading_count((best[:, :k] == drafts) & real)
        return n, best[rows, n]

    p = target.float()
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # (B, k): p_i(d_i)
    u = _uniform((bsz, k), device, generators)
    if draft_probs is not None:
        q_d = draft_probs.float().gather(-1, drafts[..., None]).squeeze(-1)
        # u < p/q written without the division: q = 0 with p = 0 must reject, q = 0 with p > 0 accept
        accepted = u * q_d < p_d
    else:
        accepted = u < p_d
    n = _leading_count(accepted & real)  # (B,)

    p_n = p[rows, n]  # (B, V): target distribution at the first rejected (or bonus) position
    rejected = n < num_drafts
    if draft_probs is not None:
        # at the bonus position (n == k) there is no q; any index works since the row is masked out below
        q_n = draft_probs.float()[rows, n.clamp(max=max(k - 1, 0))] if k > 0 else torch.zeros_like(p_n)
        residual = (p_n - q_n).clamp(min=0)
    else:
        d_n = drafts[rows, n.clamp(max=max(k - 1, 0))] if k > 0 else torch.zeros_like(n)
        residual = p_n.scatter(-1, d_n[:, None], 0.0)
    # fall back to p where the residual vanished (p == q up to rounding: rejection had probability ~0)
    usable = residual.sum(-1, keepdim=True) > 0
    residual = torch.where(usable, residual, p_n)
    dist = torch.where(rejected[:, None], residual, p_n)
    return n, sample_from_probs(dist, generators)


def speculative_accept(target: torch.Tensor, drafts: torch.Tensor | Sequence[int],
                       draft_probs: torch.Tensor | None = None, *, greedy: bool = False,
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """One request: target [k+1, V], drafts [k], draft_probs [k, V] or None → (num_accepted, next_token).

    The emitted tokens are drafts[:num_accepted] + [next_token]. See `speculative_accept_batch` for the rules.
    """
    drafts = torch.as_tensor(drafts, dtype=torch.int64, device=target.device)
    n, t = speculative_accept_batch(target[None], drafts[None],
                                    None if draft_probs is None else draft_probs[None],
                                    greedy=greedy, generators=generator)
    return int(n[0]), int(t[0])
