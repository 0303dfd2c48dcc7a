"""Block-diffusion generation for DiffusionGemma checkpoints (model/diffusion.py), beside the autoregressive engine.

    prompt ─► encode into the KV cache ─► canvas 1: random ids ─► denoising steps ─► argmax canvas ─► tokens out
                                           ▲                                               │ (stop checks)
                                           └──── encode the finished canvas, next canvas ◄─┘

One denoising step (the reference's `generate`, transformers 5.24.0 generation_diffusion_gemma.py):
    logits = denoise(canvas, previous step's scaled logits)       scaled = logits / t,  t = t_min + (t_max − t_min)·s/N
    sample a token per position from softmax(scaled)               (s = steps remaining: N … 1)
    accept the lowest-entropy positions while Σ entropy − max entropy ≤ entropy_bound; the rest get fresh random ids
    stop the canvas when its argmax is unchanged for `stability_threshold` steps and the mean entropy is below
    `confidence_threshold`, or after N = max_denoising_steps steps.
The finished canvas is the argmax of the last step. Random draws happen in the reference's order (initial canvas
per canvas; per step one multinomial over every position, then the renoising ids) from one generator seeded with
the request's seed, so a seeded CPU float32 run returns the tokens the reference returns after
`torch.manual_seed(seed)`.

`DiffusionEngine` has the autoregressive `Engine`'s surface (add / step / cancel / output / forget / generate_stream,
`scheduler.seqs`), so `llm.generate`, `llm.chat` and the server drive it unchanged; one `step()` finishes one canvas
of every running request with the same options, batched (up to `max_slots`, each in its own slot of one KV cache,
each drawing from its own generator), so streams get a chunk per canvas. Tokens go through the same stop checker
(EOS, stop ids, stop strings, max_tokens) and incremental detokenizer as autoregressive ones.

On a CUDA device the denoiser forward runs as CUDA graphs (`DenoiseGraphs`: static shapes per batch bucket, prefix
width bucket and first step or not); the sampler between forwards runs eagerly.

What this module does not do: structured output (grammar masks need left-to-right sampling: refused), images,
the autoregressive sampling options (temperature, top_p, ... are refused: the schedule is t_max → t_min).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch

from ..model import moe
from .sampling import SamplingParams, make_generator
from .scheduler import DONE, RUNNING, Request, Sequence, TokenEvent

REFERENCE_DEFAULTS = dict(max_denoising_steps=48, t_min=0.4, t_max=0.8, entropy_bound=0.1, stability_threshold=1,
                          confidence_threshold=0.005)


@dataclass(frozen=True)
class DiffusionOptions:
    """The reference's generation options for block diffusion (names as in DiffusionGemmaGenerationConfig)."""

    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_denoising_steps) or self.max_denoising_steps < 1:
            bad("max_denoising_steps", "an integer >= 1")
        if not is_num(self.t_min) or self.t_min < 0:
            bad("t_min", "a number >= 0")
        if not is_num(self.t_max) or self.t_max <= self.t_min:
            bad("t_max", f"a number > t_min ({self.t_min})")
        if not is_num(self.entropy_bound) or self.entropy_bound <= 0:
            bad("entropy_bound", "a number > 0")
        if not is_int(self.stability_threshold) or self.stability_threshold < 0:
            bad("stability_threshold", "an integer >= 0")
        if not is_num(self.confidence_threshold) or self.confidence_threshold <= 0:
            bad("confidence_threshold", "a number > 0")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def resolve(cls, generation_config: dict | None = None, **overrides) -> "DiffusionOptions":
        """Options given (not None) > the checkpoint's generation_config.json > the reference's defaults."""
        unknown = sorted(k for k in overrides if k not in cls.names())
        if unknown:
            raise ValueError(f"unknown diffusion option(s) {unknown}; accepted: {list(cls.names())}")
        gc = dict(generation_config or {})
        sampler = gc.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            gc.setdefault("entropy_bound", sampler["entropy_bound"])
        values = {}
        for name in cls.names():
            v = overrides.get(name)
            if v is None:
                v = gc.get(name)
            values[name] = REFERENCE_DEFAULTS[name] if v is None else v
        return cls(**values)


# --- the sampler: small functions, each one step of the reference's loop ---------------------------------------

def temperature(step: int, opts: DiffusionOptions) -> torch.Tensor:
    """The linear schedule at `step` steps remaining, computed as the reference does (an int32 step over N in
    float32), so the scaled logits match it bit for bit."""
    s = torch.tensor(step, dtype=torch.int32)
    return opts.t_min + (opts.t_max - opts.t_min) * (s / opts.max_denoising_steps)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits): (B, L, V) → (B, L)."""
    return torch.distributions.Categorical(logits=logits).entropy()


def entropy_bound_mask(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Accept the k lowest-entropy positions with Σ_{i≤k} H_i − H_k ≤ bound (an upper bound on their joint mutual
    information, so the accepted tokens are nearly independent): (B, L, V) → (B, L) bool."""
    h, order = torch.sort(entropy(logits), dim=-1)
    keep = torch.cumsum(h, dim=-1) - h <= bound  # sorted ascending: h is the running maximum
    return torch.scatter(torch.zeros_like(keep), -1, order, keep)


class StableAndConfident:
    """Stops a canvas whose argmax has not changed for `stability_threshold` steps and whose mean entropy (of the
    temperature-scaled logits) is below `confidence_threshold`."""

    def __init__(self, opts: DiffusionOptions):
        self.n = opts.stability_threshold
        self.threshold = opts.confidence_threshold
        self.history: torch.Tensor | None = None

    def __call__(self, argmax: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.n == 0:
            stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
        else:
            if self.history is None:
                self.history = torch.full((self.n, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
            stable = (self.history == argmax[None]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        return stable & (entropy(logits).mean(dim=-1) < self.threshold)


def _bucket(n: int, floor: int, cap: int) -> int:
    """The power of two ≥ n (at least `floor`), capped at `cap` (but never below n)."""
    b = floor
    while b < n:
        b *= 2
    return max(n, min(b, cap))


class _Buffers:
    """The fixed tensors of R rows (canvas L, vocabulary V), shared by every graph of R rows (any prefix width, first
    step or not): the inputs each replay copies the step's tensors into, and the logits every graph writes."""

    def __init__(self, R: int, L: int, V: int, dtype: torch.dtype, device: torch.device):
        self.canvas = torch.zeros(R, L, dtype=torch.long, device=device)
        self.positions = torch.zeros(R, L, dtype=torch.long, device=device)
        self.lens = torch.zeros(R, dtype=torch.long, device=device)
        self.slots = torch.zeros(R, dtype=torch.long, device=device)
        self.sc = torch.zeros(R, L, V, dtype=dtype, device=device)  # the previous step's scaled logits
        self.logits = torch.zeros(R, L, V, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (prefix width, first step) → graph


class DenoiseGraphs:
    """The denoiser's forward with static shapes, as CUDA graphs: one per (rows, prefix width, first step).

        rows     the batch rounded up to a power of two ≤ max_slots; padding rows repeat row 0 (the cache is only
                 read, and their logits are dropped)
        prefix   the longest cached prefix rounded up to a power of two ≥ 256 (≤ the cache's room): shorter
                 prefixes are front-padded with masked keys (model.denoise(prefix_len=...))
        first    the first step of a canvas has no self-conditioning input, so no soft-embedding product

    The experts take a path with no host sync (moe.graph_safe: F.grouped_mm for bfloat16 weights). A replay
    copies the canvas, positions, prefix lengths, slots and the previous step's scaled logits into the buffers of
    its row count; every graph of that row count writes its logits into one output buffer (a (rows, 256, 262,144)
    float32 tensor is 268 MB a row: one per row count, not one per graph), valid until the next replay
    (denoise_canvas reads them at once). capture=False runs exactly the same static-shape forward without a graph
    (the CPU tests check it against the eager denoiser, and that it reads nothing back to the host).
    """

    PREFIX_FLOOR = 256

    def __init__(self, model, cache, max_rows: int, capture: bool | None = None):
        self.model = model
        self.cache = cache
        self.device = cache.layers[0].k.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {self.device}")
        self.max_rows = max_rows
        self.L = model.config.canvas_length
        self.room = cache.max_len - self.L  # the longest prefix a canvas can follow
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.buffers: dict[int, _Buffers] = {}  # rows → buffers

    def key(self, rows: int, longest_prefix: int) -> tuple[int, int]:
        return _bucket(rows, 1, self.max_rows), _bucket(longest_prefix, self.PREFIX_FLOOR, self.room)

    @property
    def graph_keys(self) -> set[tuple[int, int, bool]]:
        """(rows, prefix width, first step) of every graph captured so far."""
        return {(R, P, first) for R, buf in self.buffers.items() for P, first in buf.graphs}

    def _forward(self, buf: _Buffers, first: bool, prefix_len: int) -> None:
        with moe.graph_safe():
            logits = self.model.denoise(buf.canvas, buf.positions, self.cache, buf.lens, None if first else buf.sc,
                                        buf.slots, prefix_len=prefix_len)
        buf.logits.copy_(logits)

    def _capture(self, buf: _Buffers, first: bool, prefix_len: int) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: cuBLAS / grouped-GEMM handles and lazy tables outside the capture
                self._forward(buf, first, prefix_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(buf, first, prefix_len)
        return graph

    def __call__(self, canvas: torch.Tensor, positions: torch.Tensor, kv_len: torch.Tensor,
                 sc: torch.Tensor | None, slots: torch.Tensor, longest_prefix: int) -> torch.Tensor:
        """The denoiser's logits (B, L, V) float32 for canvas (B, L) at positions (B, L) after prefixes kv_len (B,)
        (the longest: `longest_prefix`, known to the caller) in cache slots (B,); sc: the previous step's scaled
        logits (B, L, V) in the embedding dtype, or None at a canvas's first step. The result is a view of the
        output buffer: read it before the next call."""
        B = canvas.shape[0]
        R, P = self.key(B, longest_prefix)
        buf = self.buffers.get(R)
        if buf is None:
            V = self.model.config.text.vocab_size
            dtype = self.model.stack.embed_tokens.weight.dtype
            buf = self.buffers[R] = _Buffers(R, self.L, V, dtype, self.device)
        for dst, src in ((buf.canvas, canvas), (buf.positions, positions), (buf.lens, kv_len), (buf.slots, slots)):
            dst[:B].copy_(src)
            if R > B:
                dst[B:].copy_(src[:1].expand(R - B, *src.shape[1:]))
        first = sc is None
        if not first:
            buf.sc[:B].copy_(sc)
        if not self.capture:
            self._forward(buf, first, P)
        else:
            graph = buf.graphs.get((P, first))
            if graph is None:
                graph = buf.graphs[(P, first)] = self._capture(buf, first, P)
            graph.replay()
        return buf.logits[:B]


@torch.inference_mode()
def denoise_canvas(model, cache, kv_len: torch.Tensor, positions: torch.Tensor, opts: DiffusionOptions,
                   generators: list[torch.Generator], slots: torch.Tensor | None = None,
                   graphs: DenoiseGraphs | None = None, longest_prefix: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoise one canvas per row at `positions` (B, L), row b after its cached prefix [0, kv_len[b]) in cache slot
    slots[b] → (argmax canvases (B, L), denoiser passes per row (B,)).

    Row b draws from generators[b] only, and only while it is still denoising, exactly the numbers a run of that
    row alone draws: its initial canvas, then per step a multinomial over its L positions and L renoising ids. On
    the CPU the forward does not depend on the batch either (attention and experts run each row apart,
    attention.build_prefix_plan; the dense products see B·L rows, and MKL rounds a row differently only when a
    product has a few rows, which a canvas of L rows is not), so a request's tokens do not depend on which requests
    share its batch (tests/test_diffusion.py checks this on the chaotic random checkpoint).

    graphs: run the denoiser through `DenoiseGraphs` (static shapes, CUDA graphs on a GPU) instead of eagerly;
    longest_prefix = max(kv_len), which the caller knows without reading the tensor back."""
    B, L = positions.shape
    V = model.config.text.vocab_size
    dev = positions.device
    canvas = torch.cat([torch.randint(0, V, (1, L), generator=g, device=dev) for g in generators])
    argmax = canvas
    sc = None
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    passes = torch.zeros(B, dtype=torch.long, device=dev)
    stopper = StableAndConfident(opts)
    emb_dtype = model.stack.embed_tokens.weight.dtype
    for step in range(opts.max_denoising_steps, 0, -1):
        live = (~done).nonzero().flatten().tolist()
        passes += (~done).long()
        if graphs is not None:
            rows = slots if slots is not None else torch.arange(B, device=dev)
            logits = graphs(canvas, positions, kv_len, sc, rows, longest_prefix)  # (B, L, V) float32
        else:
            logits = model.denoise(canvas, positions, cache, kv_len, sc, slots)  # (B, L, V) float32
        scaled = logits / temperature(step, opts).to(dev)
        probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
        sampled = canvas.clone()
        noise = canvas.clone()
        for b in live:  # per row, from its own generator: the multinomial, then the renoising ids
            sampled[b] = torch.multinomial(probs[b], 1, generator=generators[b]).view(L)
            noise[b] = torch.randint(0, V, (L,), generator=generators[b], device=dev)
        new_argmax = scaled.argmax(dim=-1)
        accept = entropy_bound_mask(scaled, opts.entropy_bound)
        new_canvas = torch.where(accept, sampled, noise)
        if bool(done.any()):  # rows already stopped keep their canvas and logits
            new_argmax = torch.where(done[:, None], argmax, new_argmax)
            new_canvas = torch.where(done[:, None], canvas, new_canvas)
            scaled = torch.where(done[:, None, None], sc.float(), scaled)
        done |= stopper(new_argmax, scaled)
        canvas, argmax, sc = new_canvas, new_argmax, scaled.to(emb_dtype)
        if bool(done.all()):
            break
    return argmax, passes


# --- the engine ------------------------------------------------------------------------------------------------

_AR_DEFAULTS = SamplingParams()
_AR_ONLY = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
            "logit_bias", "logprobs", "top_logprobs")


def autoregressive_options_set(params: SamplingParams) -> list[str]:
    """The autoregressive sampling options a request sets (not at their "off" value)."""
    return [n for n in _AR_ONLY if getattr(params, n) != getattr(_AR_DEFAULTS, n)]


def check_request(request: Request, canvas_length: int) -> None:
    """Refuse what block diffusion cannot honour, naming it (never silently ignored)."""
    if request.constraint is not None:
        raise ValueError("structured output (response_format / a forced tool call) is not supported for "
                         "DiffusionGemma: a grammar mask needs left-to-right sampling, and a canvas is denoised "
                         "all at once; ask for JSON in the prompt instead")
    if request.media:
        raise ValueError(f"DiffusionGemma runs text only in unigemma (its vision tower is not built); got "
                         f"{sorted(request.media)}")
    if request.open:
        raise ValueError("streaming-input (open) requests are not supported for DiffusionGemma")
    set_ = autoregressive_options_set(request.params)
    if set_:
        raise ValueError(f"{set_} are autoregressive sampling options; DiffusionGemma samples with the "
                         f"block-diffusion schedule instead: use {list(DiffusionOptions.names())}")


class _Queue:
    """The scheduler-shaped state generate / chat / the server read: seqs, waiting, slots, pending."""

    def __init__(self):
        self.seqs: dict[str, Sequence] = {}
        self.waiting: list[Sequence] = []
        self.slots: list[Sequence] = []
        self.pending: list[TokenEvent] = []


class DiffusionEngine:
    """Block-diffusion requests behind the autoregressive Engine's interface (see the module docstring)."""

    def __init__(self, model, tokenizer=None, eos_token_ids=None, *, max_slots: int = 8,
                 max_model_len: int = 4096, device=None, generation_config: dict | None = None,
                 cuda_graphs: bool | None = None, static_shapes: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos_token_ids = list(model.config.text.eos_token_id)
        self.eos_token_ids = list(eos_token_ids)
        self.max_slots = max_slots
        self.max_len = max_model_len
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.generation_config = dict(generation_config or {})
        self.scheduler = _Queue()
        self._counter = 0
        self.cache = None  # made at the first step: max_slots slots of max_model_len + one canvas
        # The denoiser as CUDA graphs (DenoiseGraphs): by default on a CUDA device. static_shapes runs the same
        # static-shape forward without capturing it (any device: what a graph computes, for checks).
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device; the model is on {self.device}")
        self._denoiser_mode = "graphs" if use_graphs else "static" if static_shapes else "eager"
        self.graphs: DenoiseGraphs | None = None
        self._free_slots = list(range(max_slots))

    # the runner attributes callers read
    @property
    def runner(self):
        return self

    @property
    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.slots or s.pending)

    def add(self, request: Request) -> str:
        check_request(request, self.model.config.canvas_length)
        opts = request.diffusion if isinstance(request.diffusion, DiffusionOptions) else \
            DiffusionOptions.resolve(self.generation_config, **(request.diffusion or {}))
        ids = [int(t) for t in request.prompt_ids]
        if not ids:
            raise ValueError("prompt is empty: give at least one token id")
        V = self.model.config.text.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {V})")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in a context of {self.max_len} tokens")
        rid = request.request_id or f"diff-{self._counter}"
        self._counter += 1
        if rid in self.scheduler.seqs and self.scheduler.seqs[rid].status != DONE:
            raise ValueError(f"request_id {rid!r} is already running")
        request.request_id = rid
        seq = Sequence(rid, request, self.eos_token_ids, self.max_len, self.tokenizer, self.device)
        L = self.model.config.canvas_length
        room = self.max_len - len(ids)
        want = request.params.max_tokens if request.params.max_tokens is not None else room
        seq.max_canvases = max(1, math.ceil(min(want, room) / L))
        seed = request.params.seed
        seq.generator = make_generator(seed if seed is not None else int(torch.randint(0, 2 ** 62, ()).item()),
                                       self.device)
        seq.opts = opts
        seq.denoiser_passes = 0
        seq.canvases_done = 0
        seq.kv_len = 0
        seq.to_encode = list(ids)
        self.scheduler.seqs[rid] = seq
        self.scheduler.waiting.append(seq)
        return rid

    def step(self) -> list[TokenEvent]:
        """One canvas for every running request that shares the first one's options (a batch: one denoiser forward
        per step for all of them), after admitting waiting requests into free cache slots."""
        s = self.scheduler
        events, s.pending = list(s.pending), []
        L = self.model.config.canvas_length
        if self.cache is None:
            self.cache = self.model.make_cache(self.max_slots, self.max_len + L, device=self.device)
            if self._denoiser_mode != "eager":
                self.graphs = DenoiseGraphs(self.model, self.cache, self.max_slots,
                                            capture=self._denoiser_mode == "graphs")
        while s.waiting and len(s.slots) < self.max_slots:
            seq = s.waiting.pop(0)
            seq.status = RUNNING
            seq.slot = self._free_slots.pop(0)
            self.cache.reset_slot(seq.slot)
            s.slots.append(seq)
        if not s.slots:
            return events
        batch = [q for q in s.slots if q.opts == s.slots[0].opts]
        try:
            with torch.inference_mode():
                for q in batch:  # the prompt, or the canvas finished last step, into the request's cache slot
                    n = len(q.to_encode)
                    pos = torch.arange(q.kv_len, q.kv_len + n, device=self.device)[None]
                    self.model.encode(torch.tensor([q.to_encode], device=self.device), pos, self.cache,
                                      slots=torch.tensor([q.slot], device=self.device))
                    q.kv_len += n
                    q.to_encode = []
            lens = torch.tensor([q.kv_len for q in batch], device=self.device)
            positions = lens[:, None] + torch.arange(L, device=self.device)[None]
            slots = torch.tensor([q.slot for q in batch], device=self.device)
            gens = [q.generator for q in batch]
            saved = [g.get_state() for g in gens] if self.graphs is not None else None
            try:
                canvas, passes = denoise_canvas(self.model, self.cache, lens, positions, batch[0].opts, gens, slots,
                                                self.graphs, max(q.kv_len for q in batch))
            except Exception as e:  # noqa: BLE001 - a graph that cannot be captured here: denoise eagerly
                if self.graphs is None:
                    raise
                warnings.warn(f"DiffusionGemma: the denoiser's CUDA graphs failed ({type(e).__name__}: {e}); "
                              "denoising eagerly from now on", RuntimeWarning, stacklevel=2)
                self.graphs, self._denoiser_mode = None, "eager"
                for g, state in zip(gens, saved):  # the same random numbers as if graphs had never been tried
                    g.set_state(state)
                canvas, passes = denoise_canvas(self.model, self.cache, lens, positions, batch[0].opts, gens, slots)
        except Exception as e:  # noqa: BLE001 - these requests fail, the engine goes on
            for q in batch:
                self._finish(q, events, "error", error=f"{type(e).__name__}: {e}")
            return events
        for b, q in enumerate(batch):
            ids = canvas[b].tolist()
            q.denoiser_passes += int(passes[b])
            q.canvases_done += 1
            self._emit(q, ids, events)
            if q.status == DONE:
                continue
            if q.canvases_done >= q.max_canvases:  # the context is full
                self._finish(q, events, "length")
            else:
                q.to_encode = ids
        # the batch goes to the back, so requests with other options get the next step
        s.slots = [q for q in s.slots if q not in batch] + [q for q in s.slots if q in batch]
        return events

    def _emit(self, seq: Sequence, ids: list[int], events: list[TokenEvent]) -> None:
        """A finished canvas's tokens through the stop checker and detokenizer, one event per token kept."""
        for tok in ids:
            seq.tokens.append(tok)
            seq.logprobs.append(None)
            delta = seq.detok.add(tok) if seq.detok is not None and tok not in seq.stop.stop_ids else ""
            res = seq.stop.step(tok, delta)
            text = res.text
            if res.finished and res.finish_reason == "length" and seq.detok is not None:
                text += seq.detok.finish()
            seq.text_parts.append(text)
            ev = TokenEvent(seq.id, tok, None, [], text)
            events.append(ev)
            if res.finished:
                seq.finish_reason, seq.stop_reason = res.finish_reason, res.stop_reason
                ev.finished, ev.finish_reason, ev.stop_reason = True, res.finish_reason, res.stop_reason
                self._release(seq)
                ev.usage = seq.usage()
                return

    def _finish(self, seq: Sequence, events: list[TokenEvent], reason: str, error: str | None = None) -> None:
        text = seq.stop.flush() + (seq.detok.finish() if seq.detok is not None else "")
        seq.text_parts.append(text)
        seq.finish_reason = reason
        self._release(seq)
        ev = TokenEvent(seq.id, None, text=text, finished=True, finish_reason=reason, usage=seq.usage())
        if error is not None:
            ev.error = error
        events.append(ev)

    def _release(self, seq: Sequence) -> None:
        seq.status = DONE
        if seq in self.scheduler.slots:
            self.scheduler.slots.remove(seq)
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def cancel(self, rid: str) -> bool:
        seq = self.scheduler.seqs.get(rid)
        if seq is None or seq.status == DONE:
            return False
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        self._release(seq)
        seq.finish_reason = "cancelled"
        self.scheduler.pending.append(TokenEvent(rid, None, finished=True, finish_reason="cancelled",
                                                 usage=seq.usage()))
        return True

    def output(self, rid: str):
        from .generate import RequestOutput  # generate.py imports this module

        seq = self.scheduler.seqs.get(rid)
        if seq is None:
            raise ValueError(f"unknown request_id {rid!r}")
        return RequestOutput(seq.id, seq.tokens[: seq.prompt_len], seq.output_ids, seq.text, seq.finish_reason,
                             seq.stop_reason, seq.usage(), list(seq.logprobs))

    def forget(self, rid: str) -> None:
        seq = self.scheduler.seqs.get(rid)
        if seq is not None and seq.status == DONE:
            del self.scheduler.seqs[rid]

    def generate_stream(self, request: Request, forget: bool = True) -> Iterator[TokenEvent]:
        rid = self.add(request)
        try:
            while True:
                for ev in self.step():
                    if ev.request_id == rid:
                        yield ev
                        if ev.finished:
                            return
                if not self.has_work:
                    return
        finally:
            seq = self.scheduler.seqs.get(rid)
            if seq is not None and seq.status != DONE:
                self.cancel(rid)
                self.scheduler.pending = [e for e in self.scheduler.pending if e.request_id != rid]
            if forget:
                self.forget(rid)

    def run_until_done(self) -> dict[str, RequestOutput]:
        ids = [rid for rid, s in self.scheduler.seqs.items() if s.status != DONE]
        while self.has_work:
            self.step()
        return {rid: self.output(rid) for rid in ids}


def is_diffusion(model_or_llm: Any) -> bool:
    from ..config import DiffusionConfig

    cfg = getattr(model_or_llm, "config", None)
    return isinstance(cfg, DiffusionConfig)
