"""The engine facade (`Engine`) and the single-call API behind `llm.generate(...)` (`generate`).

    Engine(model, tokenizer, eos_token_ids, drafter, max_slots, max_model_len, prefill_chunk, ...)
        add(Request) → request_id          step() → [TokenEvent]          cancel(request_id)
        generate_stream(Request) → iterator of that request's TokenEvents (drives step() itself)
        run_until_done() → {request_id: RequestOutput}

    generate(llm, prompt, max_tokens=…, temperature=…, …, stream=False)
        → GenerationResult(.text, .token_ids, .finish_reason, .usage)   or an iterator of GenerationChunk

The Engine wires the stages (DESIGN.md §2): ModelRunner (one KV cache, `max_slots` sequences) → Scheduler
(continuous batching) → Sampler → drafts from a Proposer chosen by `speculative`:
    "auto"    the drafter when one is given (an MTP drafter, or a smaller model of the family as draft model),
              else prompt lookup; draft length adapted per step
    "mtp"     the MTP drafter (required)      "draft"   the draft model (required)
    "lookup"  n-gram prompt lookup            None / "off"  none
    or any object with `name` and `propose(seqs, k)` (tests use scripted proposers).

What this module does not do: chat templates, media preprocessing (inputs/), response parsing (outputs/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence as Seq

import torch

from ..config import UnifiedConfig
from .prefix_cache import PrefixCache
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import DONE, Request, Scheduler, TokenEvent, Usage
from .speculative import DraftController, DraftModelProposer, MTPProposer, PromptLookup
from .diffusion import DiffusionEngine, is_diffusion

__all__ = ["Engine", "Request", "TokenEvent", "Usage", "RequestOutput", "GenerationResult", "GenerationChunk",
           "generate"]


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage
    logprobs: list[float | None] = field(default_factory=list)


class Engine:
    """Continuous-batching generation over one model and one KV cache (see the module docstring).

    Not thread-safe: one thread adds requests and calls `step()` (a server runs it in one worker). Records of
    finished requests stay available to `output()` until `forget()` (generate_stream forgets by default).
    On CPU the model's Linear weights are re-laid out column-major in place (faster decode, same values);
    pass cpu_column_major=False to keep them as loaded. Large ones also get a oneDNN-packed copy for steps of
    several tokens (verification, prefill; runner.PackedLinear) when the copies add at most 512 MiB;
    cpu_packed=False turns that off, True packs every float32 Linear whatever the size. On CUDA the projections
    are fused and the element-wise pieces compiled (model/fusion.py); fuse=False keeps the eager model.
    """

    def __init__(self, model, tokenizer=None, eos_token_ids: Seq[int] | None = None, drafter=None, *,
                 max_slots: int = 8, max_model_len: int = 4096, prefill_chunk: int = 512,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 speculative: Any = "auto", num_draft_tokens: int | None = None, adaptive: bool = True,
                 prefix_cache: bool = True, prefix_block_size: int = 16, prefix_cache_bytes: int | None = None,
                 cuda_graphs: bool | None = None, cpu_column_major: bool = True, spare: int = 32,
                 logprobs_mode: str = "processed", cpu_packed: bool | None = None, fuse: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos = model.config.text.eos_token_id
            eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = list(eos_token_ids)
        self.drafter = drafter
        max_pos = model.config.text.max_position_embeddings
        if max_model_len > max_pos:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings "
                             f"({max_pos})")
        self.runner = ModelRunner(model, max_slots, max_model_len, device=device, dtype=dtype, spare=spare,
                                  cuda_graphs=cuda_graphs, cpu_column_major=cpu_column_major,
                                  cpu_packed=cpu_packed, fuse=fuse)
        cache = self.runner.cache
        pc = PrefixCache(cache, prefix_block_size, prefix_cache_bytes, self.runner.media_ids) if prefix_cache \
            else None
        proposer, k_default = self._proposer(speculative, drafter)
        k = k_default if num_draft_tokens is None else num_draft_tokens
        if proposer is not None and cache.ring < cache.max_len:
            # verification writes k + 1 positions into the sliding ring before attending; rolling back k of them
            # must leave the window intact (a ring as long as the context never loses anything)
            k = max(0, min(k, cache.spare - 2))
        controller = DraftController(k if proposer is not None else 0, adaptive=adaptive,
                                     marginal_prior=0.005 if self.runner.device.type == "cuda" else 0.02, warmup=1)
        self.scheduler = Scheduler(self.runner, eos_token_ids=self.eos_token_ids, tokenizer=tokenizer,
                                   prefill_chunk=prefill_chunk, prefix_cache=pc, proposer=proposer,
                                   controller=controller, logprobs_mode=logprobs_mode)

    def _proposer(self, speculative, drafter):
        if speculative in (None, False, "off", "none"):
            return None, 0
        is_model = isinstance(getattr(drafter, "config", None), UnifiedConfig)  # a smaller target-type model
        if speculative == "auto":
            speculative = ("draft" if is_model else "mtp") if drafter is not None else "lookup"
        if speculative in ("mtp", "draft"):
            if drafter is None:
                raise ValueError(f"speculative={speculative!r} needs a drafter (an MTP drafter, "
                                 "gemma4_unified_assistant / gemma4_assistant, or a smaller model of the family)")
            ntok = (getattr(drafter, "generation_config", None) or {}).get("num_assistant_tokens", 4)
            if is_model:  # a draft model: its own cache, slots mirroring the target's
                return DraftModelProposer(drafter, self.model, self.runner.max_slots, self.runner.max_len), int(ntok)
            if speculative == "draft":
                raise ValueError("speculative='draft' needs a draft model (a smaller checkpoint sharing the "
                                 "tokenizer); the drafter given is an MTP drafter: use 'mtp'")
            return MTPProposer(drafter, self.model, self.runner.cache), int(ntok)
        if speculative == "lookup":
            return PromptLookup(), 6
        if hasattr(speculative, "propose") and hasattr(speculative, "name"):
            return speculative, 4
        raise ValueError(f"speculative={speculative!r}: expected 'auto', 'mtp', 'draft', 'lookup', None/'off', or a "
                         "proposer object with .name and .propose(seqs, k)")

    # --- requests ------------------------------------------------------------------------------------------
    @property
    def cache(self):
        return self.runner.cache

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.scheduler.prefix

    def add(self, request: Request) -> str:
        return self.scheduler.add(request)

    def step(self) -> list[TokenEvent]:
        return self.scheduler.step()

    def cancel(self, request_id: str) -> bool:
        return self.scheduler.cancel(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def output(self, request_id: str) -> RequestOutput:
        seq = self.scheduler.seqs.get(request_id)
        if seq is None:
            raise ValueError(f"unknown request_id {request_id!r}")
        return RequestOutput(seq.id, seq.tokens[: seq.prompt_len], seq.output_ids, seq.text, seq.finish_reason,
                             seq.stop_reason, seq.usage(), list(seq.logprobs))

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (the engine keeps them for `output` until told otherwise)."""
        seq = self.scheduler.seqs.get(request_id)
        if seq is not None and seq.status == DONE:
            del self.scheduler.seqs[request_id]

    def generate_stream(self, request: Request, forget: bool = True) -> Iterator[TokenEvent]:
        """Add `request` and yield its events until it finishes (other requests advance alongside; their events
        are not returned here: read them with `output`). The final event carries the usage; with forget=True
        the request's record is dropped afterwards (long-running servers must not accumulate them)."""
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
            if seq is not None and seq.status != DONE:  # the consumer stopped early: free the slot
                self.cancel(rid)
                self.scheduler.pending = [e for e in self.scheduler.pending if e.request_id != rid]
            if forget:
                self.forget(rid)

    def run_until_done(self) -> dict[str, RequestOutput]:
        ids = [rid for rid, s in self.scheduler.seqs.items() if s.status != DONE]
        while self.has_work:
            self.step()
        return {rid: self.output(rid) for rid in ids}


# ------------------------------------------------------------------------------------------------------------
# llm.generate(...)
# ------------------------------------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    logprobs: list[float | None] | None = None


@dataclass
class GenerationChunk:
    text: str                        # the new text of this chunk
    token_ids: list[int]             # the new token ids
    finish_reason: str | None = None
    logprobs: list[float | None] | None = None
    usage: Usage | None = None       # on the last chunk


def _engine_for(llm, need_len: int) -> Engine:
    """One cached single-slot engine per LLM, rebuilt only when a request needs a longer context (for a
    DiffusionGemma checkpoint: a DiffusionEngine, which has the same interface)."""
    eng = getattr(llm, "_generate_engine", None)
    max_pos = llm.config.text.max_position_embeddings
    if is_diffusion(llm):
        if need_len > max_pos:
            raise ValueError(f"prompt + max_tokens = {need_len} tokens exceeds the model's context of {max_pos}")
        if eng is None or eng.max_len < need_len:
            size = 4096
            while size < need_len:
                size *= 2
            eng = llm._generate_engine = DiffusionEngine(
                llm.model, llm.tokenizer, llm.eos_token_ids, max_slots=1, max_model_len=min(size, max_pos),
                device=getattr(llm, "device", None), generation_config=getattr(llm, "generation_config", None))
        return eng
    if eng is None or eng.runner.max_len < need_len:
        size = 4096
        while size < need_len:
            size *= 2
        size = min(size, max_pos)
        if need_len > size:
            raise ValueError(f"prompt + max_tokens = {need_len} tokens exceeds the model's context of {max_pos}")
        eng = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, getattr(llm, "drafter", None), max_slots=1,
                     max_model_len=size, device=getattr(llm, "device", None))
        llm._generate_engine = eng
    return eng


def _default(value, gen_cfg: dict, key: str, fallback):
    if value is not None:
        return value
    v = gen_cfg.get(key)
    return fallback if v is None else v


def sampling_params(llm, *, max_tokens: int | None = 256, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                    seed: int | None = None, stop: str | Seq[str] | None = None,
                    stop_token_ids: Seq[int] | None = None, repetition_penalty: float | None = None,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: dict | None = None,
                    logprobs: bool = False, top_logprobs: int = 0, ignore_eos: bool = False) -> SamplingParams:
    """SamplingParams from user options, unset ones from the checkpoint's generation_config (do_sample false →
    greedy), then plain sampling at temperature 1."""
    # a DiffusionGemma generation_config holds the diffusion schedule, not autoregressive sampling settings
    gen_cfg = {} if is_diffusion(llm) else (getattr(llm, "generation_config", None) or {})
    if temperature is None and gen_cfg.get("do_sample") is False:
        temperature = 0.0
    return SamplingParams(
        temperature=float(_default(temperature, gen_cfg, "temperature", 1.0)),
        top_p=float(_default(top_p, gen_cfg, "top_p", 1.0)), top_k=int(_default(top_k, gen_cfg, "top_k", 0)),
        min_p=float(_default(min_p, gen_cfg, "min_p", 0.0)), seed=seed, max_tokens=max_tokens,
        stop=[stop] if isinstance(stop, str) else list(stop or []), stop_token_ids=list(stop_token_ids or []),
        repetition_penalty=float(_default(repetition_penalty, gen_cfg, "repetition_penalty", 1.0)),
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=dict(logit_bias or {}),
        logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=ignore_eos)


def generate(llm, prompt: str | Seq[int], *, max_tokens: int | None = 256, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
             seed: int | None = None, stop: str | Seq[str] | None = None, stop_token_ids: Seq[int] | None = None,
             repetition_penalty: float | None = None, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, logit_bias: dict | None = None, logprobs: bool = False,
             top_logprobs: int = 0, ignore_eos: bool = False, stream: bool = False, media: dict | None = None,
             speculative: bool = True, **diffusion) -> GenerationResult | Iterator[GenerationChunk]:
    """Generate from a raw prompt (text: tokenized with BOS, no chat template) or a list of token ids.

    Unset sampling options fall back to the checkpoint's generation_config (temperature, top_p, top_k;
    do_sample false → greedy), then to plain sampling at temperature 1. temperature=0 is greedy.
    media: model media inputs for placeholders in an id prompt (pixel_values=…, image_position_ids=…, …).
    The drafter given to `unigemma.load(drafter=…)` is used automatically, with the draft length adapted to
    what pays (`speculative=False` turns drafting off).

    DiffusionGemma checkpoints generate by block diffusion (engine/diffusion.py): `diffusion` takes the reference's
    options (max_denoising_steps, t_min, t_max, entropy_bound, stability_threshold, confidence_threshold; unset
    ones from generation_config.json); the autoregressive sampling options are refused. A stream yields one
    chunk per finished canvas.
    """
    if diffusion and not is_diffusion(llm):
        raise TypeError(f"generate() got unexpected option(s) {sorted(diffusion)} (block-diffusion options apply "
                        "to DiffusionGemma checkpoints only)")
    if isinstance(prompt, str):
        if llm.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass the prompt as a list of token ids")
        ids = llm.tokenizer.encode(prompt, add_bos=True)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty: give some text or at least one token id")
    params = sampling_params(llm, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             min_p=min_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                             repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty, logit_bias=logit_bias, logprobs=logprobs,
                             top_logprobs=top_logprobs, ignore_eos=ignore_eos)
    need = len(ids) + (max_tokens or 0) + 1
    engine = _engine_for(llm, need)
    request = Request(ids, params, media=media, speculate=speculative,
                      diffusion=diffusion_options(llm, diffusion) if is_diffusion(llm) else None)
    if stream:
        return _chunks(engine, request, logprobs)
    for _ in engine.generate_stream(request, forget=False):
        pass
    out = engine.output(request.request_id)
    engine.forget(request.request_id)
    return GenerationResult(out.text, out.token_ids, out.finish_reason, out.usage,
                            out.logprobs if logprobs else None)


def diffusion_options(llm, options: dict):
    """DiffusionOptions from a call's options over the checkpoint's generation_config.json (validated now, so a
    bad value fails before any work)."""
    from .diffusion import DiffusionOptions

    return DiffusionOptions.resolve(getattr(llm, "generation_config", None), **options)


def _chunks(engine: Engine, request: Request, logprobs: bool) -> Iterator[GenerationChunk]:
    """One chunk per engine step (several tokens when drafts were accepted)."""
    rid = engine.add(request)
    try:
        while True:
            evs = [e for e in engine.step() if e.request_id == rid]
            if evs:
                last = evs[-1]
                yield GenerationChunk("".join(e.text for e in evs),
                                      [e.token_id for e in evs if e.token_id is not None],
                                      last.finish_reason if last.finished else None,
                                      [e.logprob for e in evs] if logprobs else None, last.usage)
                if last.finished:
                    return
            if not engine.has_work:
                return
    finally:
        seq = engine.scheduler.seqs.get(rid)
        if seq is not None and seq.status != DONE:  # the consumer stopped early
            engine.cancel(rid)
            engine.scheduler.pending = [e for e in engine.scheduler.pending if e.request_id != rid]
        engine.forget(rid)
