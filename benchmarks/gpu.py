"""GPU benchmark (issue 9): the 12B geometry with random bf16 weights — the cost equals the real model's.

Prints one JSON object per line (DESIGN.md §6: `bench`, `metric`, `value`, `unit`, `impl` unigemma… / reference /
limit…, `batch`, `device`, `config`) and, with --out, writes the same lines to a file as they are measured (a run
cut short keeps what it measured). Sections, in the order they run (--sections picks; "default" = all but long):

    bandwidth    read bandwidth → the decode limit (weight bytes ÷ bandwidth)
    correctness  a small random model (fp32): greedy tokens, 64 of them, eager vs CUDA graph vs the engine's runner
    decode       batch 1: eager; CUDA graph over the op-by-op model (the earlier path); the engine's runner
                 (fused q/k/v and gate/up, compiled element-wise pieces, CUDA graph; model/fusion.py) with the
                 fraction of the limit and its set-up (compile + capture) time; 12B greedy eager vs each
    profile      the runner's decode step under torch.profiler: kernels per step, device time, top kernels
    throughput   batch 1/8/32/64: the runner's decode step (CUDA graphs per batch bucket) and the whole engine
                 (continuous batching: scheduler + sampler); aggregate tokens/s and the ratio to batch 1
    prefill      2,048 tokens whole and 32,768 chunked as the engine does (ModelRunner.prefill_chunk), per chunk
                 size; FLOP/s and the fraction of the bf16 peak (by device name, or --peak-tflops)
    reference    transformers 5.24.0 on the same weights: bf16 top-1 agreement, decode tokens/s, prefill of 2,048;
                 the ratios unigemma / reference
    mtp          a random drafter of the published assistant geometry (hidden 1024, 4 layers, centroid head):
                 one drafter step (as the engine runs it, and captured in a CUDA graph) vs one target decode
                 step, and verifying k = 2, 4, 6 drafts (one step of k + 1 tokens) vs one decode step
    long         a 131,072-token prompt prefilled in chunks, then decoded (and 262,144 when the GPU has
                 > 100 GB): peak GPU memory, KV bytes of full vs sliding layers, prefill time, decode tokens/s
    quant        int8 / int4 weight-only decode (unigemma.quant) vs bf16 (the bf16 model is freed first, so
                 this runs last), top-1 agreement with bf16

Device plan — each call under 6 minutes on one H100 or H200 (the device tool's timeout_s=360), at the published
depth (the 48 layers are what the memory and long-context figures are about; --layers N reduces the depth when only
per-layer figures are wanted, and `config` then says "12b-Nlayers"). As run on an H200 on 2026-12-04
(benchmarks/results/2026-12-04-h200-gpu-*; 156, 226 and 177 s of wall time):

    python benchmarks/gpu.py --sections bandwidth,correctness,decode,profile,throughput,prefill,reference,mtp,quant \
        --out $OUT/ --budget 300
    python benchmarks/gpu.py --sections bandwidth,decode,profile,prefill,reference,long,quant --long 131072 \
        --quant int4,int4-tinygemm --quant-detail --tag confirm --out $OUT/ --budget 240

The runner compiles its element-wise pieces on first use (~10-15 s at 12B, in `setup_s`), so the first decode
figure's set-up is longer than a capture alone. --out $OUT/ names the file <date>-<device>-gpu[-tag].jsonl, ready
for benchmarks/results/. --budget N: a section (or long-context length) that would start after N s is listed as
skipped instead of run. A section that fails prints an `error` line and the run goes on. 262,144 tokens of context
(the default --long on a GPU with > 100 GB) adds 2-3 minutes.

Decode caches have the engine's default context (--max-len 4096), so sliding layers hold their ring of
window + 31 entries as when served; the whole engine runs with the same max_model_len.

    python benchmarks/gpu.py --tiny --sections all --long 4096     # a small geometry on CPU (smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unigemma.config import FULL, SLIDING, AssistantConfig, UnifiedConfig, gemma4_12b_config  # noqa: E402
from unigemma.model.unified import Gemma4Unified  # noqa: E402

SECTIONS = ("bandwidth", "correctness", "decode", "profile", "throughput", "prefill", "reference", "mtp", "long",
            "quant")
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "long")

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
             ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12))

RESULTS: list[dict] = []
DEVICE_NAME = "cpu"
_OUT = None


def emit(**kw):
    kw.setdefault("device", DEVICE_NAME)
    RESULTS.append(kw)
    line = json.dumps(kw)
    print(line, flush=True)
    if _OUT is not None:
        _OUT.write(line + "\n")
        _OUT.flush()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (None: unknown, or a CPU)."""
    for key, v in PEAK_BF16:
        if key.lower() in device_name.lower():
            return v
    return None


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'h100' (the results file naming); 'cpu' stays 'cpu'."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", device_name)
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"


def out_path(out: str, device_name: str, tag: str | None, date: str | None = None) -> Path:
    """--out: a file path as given, or a folder (existing, or written with a trailing /) that gets
    <date>-<device>-gpu[-tag].jsonl."""
    p = Path(out)
    if p.is_dir() or out.endswith(("/", "\\")):
        date = date or time.strftime("%Y-%m-%d")
        return p / f"{date}-{device_slug(device_name)}-gpu{'-' + tag if tag else ''}.jsonl"
    return p


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------

def tiny_config() -> UnifiedConfig:
    return UnifiedConfig.from_dict({"model_type": "gemma4_unified", "text_config": {
        "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "global_head_dim": 128,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 64,
        "final_logit_softcapping": 30.0}})


def fill_random(m: torch.nn.Module, device, seed: int = 0) -> None:
    """Random weights in place (norm weights ≈ 1, matrices scaled by 1/√fan_in); float32 draws, one tensor at a
    time, copied into the module's dtype (the same values whatever that dtype is)."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * (p.shape[-1] ** -0.5))
        for n, b in m.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(1.0)
            elif n.endswith("token_ordering"):  # the centroid head's vocabulary order: a permutation
                b.copy_(torch.randperm(b.numel(), generator=torch.Generator().manual_seed(seed)).to(device))


def build(cfg: UnifiedConfig, device, dtype=torch.bfloat16, seed=0) -> Gemma4Unified:
    """The model made directly in `dtype` on `device` (a 12B never exists in float32)."""
    with torch.device("meta"):
        m = Gemma4Unified(cfg).to(dtype)
    m = m.to_empty(device=device)
    fill_random(m, device, seed)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.language_model.embed_tokens.weight
    return m.eval()


def drafter_config(cfg: UnifiedConfig, tiny: bool) -> AssistantConfig:
    """The MTP drafter geometry: the published 12B assistant as far as known (spec/mtp-drafting.md §9, unconfirmed:
    hidden 1024, 4 layers = 3 sliding + 1 full, 16 query heads, intermediate 8192, centroid head 2048 / top-32);
    attention geometry (kv heads, head dims, window) is the target's, which its reuse layers read."""
    t = cfg.raw["text_config"]
    hidden, layers, heads, inter, cent, top = (128, 2, 4, 512, 64, 8) if tiny else (1024, 4, 16, 8192, 2048, 32)
    keep = ("vocab_size", "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
            "attention_k_eq_v", "sliding_window", "rope_parameters", "max_position_embeddings")
    tc = {k: t[k] for k in keep if k in t}
    tc.update(model_type="gemma4_unified_text", hidden_size=hidden, intermediate_size=inter,
              num_hidden_layers=layers, num_attention_heads=heads,
              layer_types=[SLIDING] * (layers - 1) + [FULL])
    return AssistantConfig.from_dict({"model_type": "gemma4_unified_assistant", "text_config": tc,
                                      "backbone_hidden_size": cfg.text.hidden_size, "use_ordered_embeddings": True,
                                      "num_centroids": cent, "centroid_intermediate_top_k": top})


def build_drafter(cfg: AssistantConfig, device, dtype=torch.bfloat16, seed=1):
    from unigemma.model.assistant import Gemma4Assistant

    with torch.device("meta"):
        m = Gemma4Assistant(cfg).to(dtype)
    m = m.to_empty(device=device)
    fill_random(m, device, seed)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    return m.eval()


def resident_bytes(model) -> int:
    """Bytes of every parameter and buffer, shared tensors once (a tied or quantized head counted once)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.data_ptr())
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


def layer_linear_params(cfg_text, model=None) -> int:
    """Weights of the decoder layers' matrices (what every prompt token multiplies), from the config."""
    H = cfg_text.hidden_size
    n = 0
    for i, t in enumerate(cfg_text.layer_types):
        d, kv, nh = cfg_text.layer_head_dim[i], cfg_text.layer_kv_heads[i], cfg_text.num_attention_heads
        n += H * nh * d * 2  # q_proj, o_proj
        if cfg_text.kv_sharing_modes[i] != "reuse":
            k_eq_v = cfg_text.attention_k_eq_v and t == FULL
            n += H * kv * d * (1 if k_eq_v else 2)
        n += 3 * H * cfg_text.layer_intermediate_size(i)
    return n


def _sum_min(a: int, b: int, w: int) -> int:
    """Σ_{v=a}^{b} min(v, w) for integers 1 ≤ a ≤ b (0 when a > b)."""
    if a > b:
        return 0
    lo_end = min(b, w)
    s = (lo_end * (lo_end + 1) - (a - 1) * a) // 2 if a <= lo_end else 0
    return s + max(0, b - max(a - 1, w)) * w


def prefill_flops(cfg_text, start: int, end: int) -> float:
    """FLOPs of prefilling positions [start, end) after [0, start) are cached: 2 · layer weights per token, one
    LM-head row, and attention over the visible keys (full: all earlier ones; sliding: the last W), 4 · d per
    (query head, key) pair (q·k and p·v). Masked-out pairs are not counted (a kernel that computes them spends
    more)."""
    n = end - start
    flops = 2.0 * layer_linear_params(cfg_text) * n + 2.0 * cfg_text.hidden_size * cfg_text.vocab_size
    W = cfg_text.sliding_window
    for i, t in enumerate(cfg_text.layer_types):
        pairs = _sum_min(start + 1, end, W) if t == SLIDING else (end * (end + 1) - start * (start + 1)) // 2
        flops += 4.0 * cfg_text.num_attention_heads * cfg_text.layer_head_dim[i] * pairs
    return flops


def kv_bytes(cache) -> dict[str, int]:
    """Bytes the cache holds per layer type (K and V of every storing layer)."""
    out = {FULL: 0, SLIDING: 0}
    for t, lk in zip(cache.config.layer_types, cache.layers):
        if lk is not None:
            out[t] += (lk.k.numel() * lk.k.element_size()) + (lk.v.numel() * lk.v.element_size())
    return out


# ------------------------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------------------------

def bandwidth(device) -> float:
    """Bytes/s of reading memory (a large reduction), the figure decode is bound by."""
    n = (2 << 30) if device.type == "cuda" else (256 << 20)
    x = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    for _ in range(3):
        x.sum()
    sync()
    t = time.perf_counter()
    reps = 20 if device.type == "cuda" else 3
    for _ in range(reps):
        x.sum()
    sync()
    return n * reps / (time.perf_counter() - t)


def per_call(fn, reps: int, warmup: int = 2) -> float:
    """Seconds per call of fn (device work included: synchronised around the timed loop)."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


class GraphDecoder:
    """The decode step (B tokens at known positions → next greedy tokens) captured once in a CUDA graph."""

    def __init__(self, model, cache, batch: int, kv_len: int, first_ids, first_pos, compiled=None):
        self.model, self.cache, self.kv_len = model, cache, kv_len
        self.fn = compiled
        dev = next(model.parameters()).device
        # Warm-up and capture run real steps: they must write the K/V the first real step writes anyway
        # (same token at the same position), never garbage over the prompt's entries.
        self.ids = first_ids.clone()
        self.pos = first_pos.clone()
        self.graph = None
        if dev.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()

    def _step(self):
        if self.fn is not None:
            return self.fn(self.ids, self.pos)
        return self.model.run(self.ids, position_ids=self.pos, cache=self.cache, kv_len=self.kv_len).logits[:, -1].argmax(-1)

    def __call__(self, ids, pos):
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.out


def compiled_step(model, cache, kv_len):
    """The decode step compiled by inductor (fuses norms, RoPE, masks and softcap into few kernels)."""
    def step(ids, pos):
        return model.run(ids, position_ids=pos, cache=cache, kv_len=kv_len).logits[:, -1].argmax(-1)
    return torch.compile(step, fullgraph=False, dynamic=False)


@torch.inference_mode()
def decode_run(model, prompt, new_tokens, max_len, graph: bool, batch: int = 1, compile: bool = False):
    """Prefill `prompt` (1, P) into `batch` slots, then greedy-decode `new_tokens` steps with model.run (eager, or
    one CUDA graph); returns (seconds of the decode steps, tokens (batch, new_tokens))."""
    cache = model.make_cache(slots=batch, max_len=max_len)
    dev = prompt.device
    P = prompt.shape[1]
    for b in range(batch):
        model.run(prompt, position_ids=torch.arange(P, device=dev)[None], cache=cache,
                  slots=torch.tensor([b], device=dev), logits_to_keep=1)
    tok = torch.full((batch, 1), 7, dtype=torch.long, device=dev)
    fn = compiled_step(model, cache, max_len) if compile else None
    dec = GraphDecoder(model, cache, batch, max_len, tok, torch.full((batch, 1), P, dtype=torch.long, device=dev),
                       fn) if (graph or compile) else None
    out = []
    sync()
    t = time.perf_counter()
    for i in range(new_tokens):
        pos = torch.full((batch, 1), P + i, dtype=torch.long, device=dev)
        if dec is not None:
            nxt = dec(tok, pos)
        else:
            nxt = model.run(tok, position_ids=pos, cache=cache, kv_len=max_len).logits[:, -1].argmax(-1)
        tok = nxt.view(batch, 1).clone()
        out.append(tok)
    sync()
    dt = time.perf_counter() - t
    return dt, torch.cat(out, 1)


def make_runner(model, slots: int, max_len: int, graphs: bool, fuse: bool | None = None):
    from unigemma.engine.runner import ModelRunner

    # cpu_column_major=False: the benchmark's model is shared by every section; leave its weights as built.
    # fuse=None: the engine's default (CUDA: fused projections + compiled element-wise pieces, model/fusion.py)
    return ModelRunner(model, slots, max_len, cuda_graphs=graphs, cpu_column_major=False, fuse=fuse)


@torch.inference_mode()
def runner_decode(model, batch: int, prompt, new_tokens: int, graphs: bool, max_len: int = 0,
                  fuse: bool | None = None, timings: dict | None = None):
    """The engine's decode step (ModelRunner.decode: rows 0..B−1 of its cache, a CUDA graph per batch bucket) at
    `batch` rows after prefilling `prompt` (1, P) into each; returns (seconds, tokens (batch, new_tokens)).
    max_len: the cache's context (the engine's max_model_len; at least what the run needs)."""
    dev = prompt.device
    P = prompt.shape[1]
    t_setup = time.perf_counter()
    runner = make_runner(model, batch, max(max_len, P + new_tokens + 8), graphs, fuse)
    for a in range(0, batch, 16):  # the prompts in groups of 16 rows: one forward each
        n = min(16, batch - a)
        model.run(prompt.expand(n, P), position_ids=torch.arange(P, device=dev)[None].expand(n, P),
                  cache=runner.cache, slots=torch.arange(a, a + n, device=dev), kv_len=P, compute_logits=False)
    runner.warm_up(batch, (1,), P + 1)  # captures (if any) outside the timed loop: first and last kv bucket
    runner.warm_up(batch, (1,), P + new_tokens)
    sync()
    if timings is not None:  # prefill + compiling + capturing, before the timed steps
        timings["setup_s"] = time.perf_counter() - t_setup
        timings["compiled"] = runner.compiled
        timings["fused"] = runner.fused
    tok = torch.full((batch, 1), 7, dtype=torch.long, device=dev)
    pos = torch.full((batch, 1), P, dtype=torch.long, device=dev)
    out = []
    sync()
    t = time.perf_counter()
    for i in range(new_tokens):
        logits, _ = runner.decode(tok, pos, P + i + 1)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        pos = pos + 1
        out.append(tok)
    sync()
    dt = time.perf_counter() - t
    del runner
    return dt, torch.cat(out, 1)


def engine_decode(model, batch: int, prompt_len: int, new_tokens: int, vocab: int,
                  max_len: int = 0) -> tuple[float, int]:
    """The whole engine (continuous batching: scheduler, greedy sampler, runner) with `batch` requests running:
    tokens/s over `new_tokens` steps taken once every request has its first token (requests are long enough that
    none finishes inside the window); returns (tokens/s, tokens counted)."""
    from unigemma.engine.generate import Engine, Request
    from unigemma.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = [[2] + torch.randint(10, vocab, (prompt_len - 1,), generator=g).tolist() for _ in range(batch)]
    eng = Engine(model, None, [], max_slots=batch, max_model_len=max(max_len, prompt_len + batch + new_tokens + 16),
                 speculative=None, prefix_cache=False, cpu_column_major=False)

    def start(max_tokens):
        rids = [eng.add(Request(p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))
                for p in prompts]
        started = set()
        while len(started) < len(rids):
            started.update(e.request_id for e in eng.step() if e.token_id is not None)
        return rids

    def drain(rids):
        for r in rids:
            eng.cancel(r)
        while eng.has_work:
            eng.step()
        for r in rids:
            eng.forget(r)

    drain(start(2))  # warm-up: graphs for every batch bucket on the way up to `batch`
    rids = start(batch + new_tokens + 8)
    sync()
    t = time.perf_counter()
    emitted = 0
    for _ in range(new_tokens):
        emitted += sum(e.token_id is not None for e in eng.step())
    sync()
    dt = time.perf_counter() - t
    drain(rids)
    return emitted / dt, emitted


# ------------------------------------------------------------------------------------------------------------
# the run's shared state
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    args: argparse.Namespace
    device: torch.device
    cfg: UnifiedConfig
    name: str
    tiny: bool
    t0: float = field(default_factory=time.perf_counter)
    bw: float | None = None
    peak: float | None = None
    figures: dict = field(default_factory=dict)
    _model: Gemma4Unified | None = None
    _prompt: torch.Tensor | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def model(self) -> Gemma4Unified:
        if self._model is None:
            with torch.inference_mode(False):  # plain tensors, whichever section asks first
                self._model = build(self.cfg, self.device)
        return self._model

    def free_model(self) -> None:
        self._model = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    @property
    def weight_bytes(self) -> int:
        return resident_bytes(self.model)

    @property
    def prompt(self) -> torch.Tensor:
        if self._prompt is None:
            g = torch.Generator().manual_seed(0)
            V = self.cfg.text.vocab_size
            self._prompt = torch.randint(10, V, (1, self.args.prompt), generator=g).to(self.device)
        return self._prompt

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self, extra: float = 0.0) -> bool:
        return self.args.budget is not None and self.elapsed() + extra > self.args.budget

    def common(self, **kw) -> dict:
        return {"config": self.name, **kw}


# ------------------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------------------

def sec_bandwidth(ctx: Ctx):
    ctx.bw = bandwidth(ctx.device)
    emit(bench="bandwidth", impl="limit", metric="read_bytes_per_s", value=ctx.bw, unit="B/s", config=ctx.name)
    wb = ctx.weight_bytes
    # decode reads every weight once per token (the tied LM head is the embedding table: counted once)
    emit(bench="decode", impl="limit", metric="tokens_per_s", value=ctx.bw / wb, unit="tok/s", batch=1,
         config=ctx.name, weight_bytes=wb)


def sec_correctness(ctx: Ctx):
    """Greedy tokens of a small random fp32 model, 64 steps: model.run eager vs one CUDA graph vs the runner."""
    cfg = tiny_config()
    cfg.vision = cfg.audio = None
    m = build(cfg, ctx.device, torch.float32, seed=3)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(10, cfg.text.vocab_size, (1, 100), generator=g).to(ctx.device)
    n = 64
    max_len = 256  # > window + spare: sliding layers use the ring as in the engine's default configuration
    _, eager = decode_run(m, prompt, n, max_len, graph=False)
    common = dict(config="tiny", dtype="float32", new_tokens=n)
    # the cached decode path (few-query attention, ring buffers) against one plain forward of the same tokens
    emit(bench="correctness", impl="unigemma", metric="greedy_decode_equals_full_forward",
         value=int(torch.equal(teacher_forced_argmax(m, prompt, eager), eager)), unit="bool", **common)
    if ctx.cuda:
        _, graph = decode_run(m, prompt, n, max_len, graph=True)
        emit(bench="correctness", impl="unigemma", metric="greedy_eager_equals_graph",
             value=int(torch.equal(eager, graph)), unit="bool", **common)
        if ctx.args.compile:
            _, comp = decode_run(m, prompt, n, max_len, graph=True, compile=True)
            emit(bench="correctness", impl="unigemma-compiled", metric="greedy_eager_equals_compiled",
                 value=int(torch.equal(eager, comp)), unit="bool", **common)
    _, run = runner_decode(m, 1, prompt, n, graphs=ctx.cuda, max_len=max_len, fuse=False)
    emit(bench="correctness", impl="unigemma", metric="greedy_eager_equals_runner", value=int(torch.equal(eager, run)),
         unit="bool", cuda_graph=ctx.cuda, fused=False, **common)
    if ctx.cuda or ctx.args.compile:
        # the engine's CUDA default: fused q/k/v and gate/up products, compiled element-wise pieces, CUDA graphs
        _, comp = runner_decode(m, 1, prompt, n, graphs=ctx.cuda, max_len=max_len, fuse=True)
        emit(bench="correctness", impl="unigemma-compiled", metric="greedy_eager_equals_compiled",
             value=int(torch.equal(eager, comp)), unit="bool", cuda_graph=ctx.cuda, fused=True,
             first_divergence=_divergence(eager, comp), **common)
        _, comp4 = runner_decode(m, 4, prompt, n, graphs=ctx.cuda, max_len=max_len, fuse=True)
        emit(bench="correctness", impl="unigemma-compiled", metric="greedy_batch4_rows_equal_eager",
             value=int(all(torch.equal(eager[0], comp4[r]) for r in range(4))), unit="bool", cuda_graph=ctx.cuda,
             fused=True, **common)


@torch.inference_mode()
def teacher_forced_argmax(model, prompt: torch.Tensor, generated: torch.Tensor, first: int = 7) -> torch.Tensor:
    """decode_run feeds `first` after the prompt, then each generated token: the greedy choice at each of those
    positions from one uncached forward over prompt + [first] + generated[:-1]."""
    B = generated.shape[0]
    lead = torch.full((B, 1), first, dtype=generated.dtype, device=generated.device)
    full = torch.cat([prompt.expand(B, -1), lead, generated[:, :-1]], 1)
    return model(full).argmax(-1)[:, prompt.shape[1]:]


def _divergence(a: torch.Tensor, b: torch.Tensor) -> int | None:
    diff = (a != b).flatten().nonzero()
    return int(diff[0]) if diff.numel() else None


def sec_decode(ctx: Ctx):
    a = ctx.args
    model, prompt = ctx.model, ctx.prompt
    max_len = a.max_len
    limit = ctx.bw / ctx.weight_bytes if ctx.bw else None
    common = ctx.common(batch=1, prompt_tokens=a.prompt, new_tokens=a.new_tokens, max_len=max_len)
    dt, toks_eager = decode_run(model, prompt, a.new_tokens, max_len, graph=False)
    emit(bench="decode", impl="unigemma-eager", metric="tokens_per_s", value=a.new_tokens / dt, unit="tok/s",
         **common)
    ctx.figures["decode_eager"] = a.new_tokens / dt
    if not ctx.cuda:
        return
    # before this run's changes: the same CUDA graph over op-by-op kernels, separate projections (model.run)
    dt, toks_graph = decode_run(model, prompt, a.new_tokens, max_len, graph=True)
    tps = a.new_tokens / dt
    emit(bench="decode", impl="unigemma-graph-unfused", metric="tokens_per_s", value=tps, unit="tok/s",
         cuda_graph=True, ms_per_token=1e3 / tps, fraction_of_limit=tps / limit if limit else None,
         kv_len="max_len", **common)
    emit(bench="correctness", impl="unigemma", metric="greedy_eager_equals_graph",
         value=int(torch.equal(toks_eager, toks_graph)), unit="bool", config=ctx.name, new_tokens=a.new_tokens,
         first_divergence=_divergence(toks_eager, toks_graph))
    # the engine's path: ModelRunner.decode (fused projections, compiled pieces, CUDA graph per kv bucket); compiled
    # code of the small correctness model is dropped first, so the 12B's shapes compile as a server's would
    torch._dynamo.reset()
    tm: dict = {}
    dt, toks_run = runner_decode(model, 1, prompt, a.new_tokens, graphs=True, max_len=max_len, timings=tm)
    tps = a.new_tokens / dt
    ctx.figures["decode"] = tps
    emit(bench="decode", impl="unigemma", metric="tokens_per_s", value=tps, unit="tok/s", cuda_graph=True,
         ms_per_token=1e3 / tps, fraction_of_limit=tps / limit if limit else None, path="runner",
         fused=tm.get("fused"), compiled=tm.get("compiled"), setup_s=tm.get("setup_s"), target_fraction=0.8,
         **common)
    # bf16 with random weights has near-tied logits: fractions, with where the first difference is
    forced = teacher_forced_argmax(model, prompt, toks_run)
    emit(bench="correctness", impl="unigemma", metric="decode_top1_agreement_vs_full_forward",
         value=(forced == toks_run).float().mean().item(), unit="fraction", config=ctx.name, path="runner",
         new_tokens=a.new_tokens, first_divergence=_divergence(forced, toks_run))
    emit(bench="correctness", impl="unigemma-compiled", metric="greedy_matches_eager_tokens",
         value=(toks_eager == toks_run).float().mean().item(), unit="fraction", config=ctx.name, path="runner",
         first_divergence=_divergence(toks_eager, toks_run))
    if a.compile:
        t0 = time.perf_counter()
        dt, toks_comp = decode_run(model, prompt, a.new_tokens, max_len, graph=True, compile=True)
        tps = a.new_tokens / dt
        emit(bench="decode", impl="unigemma-compiled-whole-step", metric="tokens_per_s", value=tps, unit="tok/s",
             cuda_graph=True, compile_s=time.perf_counter() - t0 - dt,
             fraction_of_limit=tps / limit if limit else None, **common)
        emit(bench="correctness", impl="unigemma-compiled-whole-step", metric="greedy_matches_eager_tokens",
             value=(toks_eager == toks_comp).float().mean().item(), unit="fraction", config=ctx.name,
             first_divergence=_divergence(toks_eager, toks_comp))


@torch.inference_mode()
def sec_profile(ctx: Ctx):
    """Where the runner's batch-1 decode step goes (see profile_step), against the graph step's wall time from the
    decode section: the difference is the launch gaps between kernels."""
    profile_step(ctx, ctx.model, "unigemma", ctx.figures.get("decode"))
    weight_read_rates(ctx, ctx.model, "unigemma")


def profile_step(ctx: Ctx, model, impl: str, tokens_per_s: float | None = None, top: int = 14):
    """The runner's batch-1 decode forward (fused, compiled pieces; not replayed from a graph) under torch.profiler:
    CUDA kernels per step, their summed device time and the top kernels."""
    from collections import defaultdict

    a, dev = ctx.args, ctx.device
    P = a.prompt
    runner = make_runner(model, 1, max(a.max_len, P + 32), graphs=False)
    chunked_prefill(model, runner, ctx.prompt[0].tolist(), max(P, 1))
    tok = torch.full((1, 1), 7, dtype=torch.long, device=dev)
    step = lambda i: runner.decode(tok, torch.full((1, 1), P + i, dtype=torch.long, device=dev), P + i + 1)  # noqa
    for i in range(3):
        step(i)
    sync()
    steps = 3
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if ctx.cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(steps):
            step(3 + i)
        sync()
    per: dict = defaultdict(lambda: [0, 0.0])
    n, total = 0, 0.0
    for e in prof.events():
        if ctx.cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.device_time
        else:
            if e.cpu_parent is not None or not e.name.startswith(("aten::", "Torch-Compiled", "CompiledFunction")):
                continue
            us = e.cpu_time
        per[e.name][0] += 1
        per[e.name][1] += us
        n += 1
        total += us
    common = ctx.common(batch=1, layers=ctx.cfg.text.num_hidden_layers, path="runner", compiled=runner.compiled)
    emit(bench="profile", impl=impl, metric="kernels_per_step", value=n / steps, unit="count",
         what="CUDA kernels" if ctx.cuda else "top-level ops", **common)
    emit(bench="profile", impl=impl, metric="kernel_us_per_step", value=total / steps, unit="us", **common)
    if tokens_per_s:
        emit(bench="profile", impl=impl, metric="graph_step_us", value=1e6 / tokens_per_s, unit="us", **common)
    for name, (cnt, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        emit(bench="profile", impl=impl, metric="kernel_us", value=round(us / steps, 1), unit="us",
             kernel=name[:140], calls_per_step=cnt / steps, share=round(us / max(total, 1e-9), 4), **common)
    del runner
    gc.collect()


@torch.inference_mode()
def weight_read_rates(ctx: Ctx, model, impl: str) -> None:
    """Each projection kind of the decode step alone at one row (fused where the runner fuses): µs per call and
    weight bytes read per second, cycling over all layers' copies so that nothing is served from the L2 cache."""
    from unigemma.model import fusion
    from unigemma.model.attention import Attention
    from unigemma.model.layers import MLP

    kinds: dict = {}
    for mod in model.model.language_model.layers.modules():
        if isinstance(mod, Attention) and not mod.is_reuse:
            f = mod.__dict__.get("_qkv")
            kinds.setdefault(f"qkv({mod.layer_type.split('_')[0]})", []).append(f if f is not None else mod.q_proj)
            kinds.setdefault(f"o_proj({mod.layer_type.split('_')[0]})", []).append(mod.o_proj)
        elif isinstance(mod, MLP):
            f = mod.__dict__.get("_gate_up")
            kinds.setdefault("gate_up", []).append(f if f is not None else mod.gate_proj)
            kinds.setdefault("down_proj", []).append(mod.down_proj)

    def nbytes(m):
        if isinstance(m, torch.Tensor):
            return m.numel() * m.element_size()
        return sum(b.numel() * b.element_size() for b in m.buffers()) + (
            m.weight.numel() * m.weight.element_size() if isinstance(m, torch.nn.Linear) else 0)

    with fusion.active(True):
        for kind, mods in kinds.items():
            x = torch.randn(1, mods[0].shape[1] if isinstance(mods[0], torch.Tensor) else
                            (mods[0].in_features), device=ctx.device, dtype=torch.bfloat16)
            fns = [(lambda m=m: torch.nn.functional.linear(x, m)) if isinstance(m, torch.Tensor) else (lambda m=m: m(x))
                   for m in mods]
            t = per_call(lambda: [f() for f in fns], 10) / len(fns)
            b = nbytes(mods[0])
            emit(bench="matmul", impl=impl, metric="us_per_call", value=round(t * 1e6, 2), unit="us", shape=kind,
                 rows=1, weight_bytes=b, weight_GBps=round(b / t / 1e9, 1),
                 fraction_of_bandwidth=round(b / t / ctx.bw, 3) if ctx.bw else None,
                 kernel=getattr(mods[0], "kernel", "bf16"), config=ctx.name)


def sec_throughput(ctx: Ctx):
    a = ctx.args
    model, prompt = ctx.model, ctx.prompt
    base = None
    for b in a.batches:
        dt, _ = runner_decode(model, b, prompt, a.new_tokens, graphs=ctx.cuda, max_len=a.max_len)
        tps = b * a.new_tokens / dt
        base = tps if b == 1 else base
        emit(bench="decode", impl="unigemma", metric="tokens_per_s", value=tps, unit="tok/s", batch=b,
             cuda_graph=ctx.cuda, path="runner", ms_per_step=1e3 * dt / a.new_tokens,
             vs_batch1=tps / base if base else None,
             **ctx.common(prompt_tokens=a.prompt, new_tokens=a.new_tokens, max_len=a.max_len))
        ctx.figures[f"runner_b{b}"] = tps
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    base = None
    for b in a.engine_batches:
        tps, n = engine_decode(model, b, a.prompt, a.new_tokens, ctx.cfg.text.vocab_size, a.max_len)
        base = tps if b == 1 else base
        emit(bench="decode", impl="unigemma-engine", metric="tokens_per_s", value=tps, unit="tok/s", batch=b,
             cuda_graph=ctx.cuda, path="engine (continuous batching, greedy sampler)", tokens=n,
             vs_batch1=tps / base if base else None,
             **ctx.common(prompt_tokens=a.prompt, new_tokens=a.new_tokens, max_len=a.max_len))
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


def _emit_prefill(ctx: Ctx, n: int, dt: float, flops: float, **extra):
    tf = flops / dt
    emit(bench="prefill", impl="unigemma", metric="tokens_per_s", value=n / dt, unit="tok/s", batch=1,
         prompt_tokens=n, ms=dt * 1e3, tflops=tf / 1e12, fraction_of_peak=tf / ctx.peak if ctx.peak else None,
         **ctx.common(**extra))
    if ctx.peak:
        emit(bench="prefill", impl="limit", metric="tokens_per_s", value=ctx.peak * n / flops, unit="tok/s", batch=1,
             prompt_tokens=n, peak_tflops=ctx.peak / 1e12, flops=flops, **ctx.common(**extra))


@torch.inference_mode()
def chunked_prefill(model, runner, ids: list[int], chunk: int, slot: int = 0):
    """The engine's prefill of one prompt: runner.chunk_end / runner.prefill_chunk, chunk by chunk (the last
    chunk computes the logits of the last token); returns that chunk's output."""
    start, out = 0, None
    while start < len(ids):
        end = runner.chunk_end(ids, start, chunk)
        out = runner.prefill_chunk(slot, ids, start, end, need_logits=end == len(ids))
        start = end
    return out


def sec_prefill(ctx: Ctx):
    a = ctx.args
    model, dev, V = ctx.model, ctx.device, ctx.cfg.text.vocab_size
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for n in a.prefill:  # one forward over the whole prompt, as the engine runs it (runner.prefill_chunk)
            ids = torch.randint(10, V, (1, n), generator=g).to(dev).view(-1).tolist()
            runner = make_runner(model, 1, n + 8, graphs=False)
            runner.prefill_chunk(0, ids, 0, min(n, 128))  # warm-up (and compiling, on CUDA)
            runner.prefill_chunk(0, ids, 0, n)
            best = math.inf
            for _ in range(2):
                runner.cache.reset_slot(0)
                sync()
                t = time.perf_counter()
                runner.prefill_chunk(0, ids, 0, n)
                sync()
                best = min(best, time.perf_counter() - t)
            del runner
            ctx.figures[f"prefill_{n}"] = n / best
            _emit_prefill(ctx, n, best, prefill_flops(ctx.cfg.text, 0, n), chunk=n, path="runner.prefill_chunk")
    for n in a.prefill_chunked:
        ids = torch.randint(10, V, (n,), generator=g).tolist()
        for c in a.chunks:
            runner = make_runner(model, 1, n + 8, graphs=False)
            chunked_prefill(model, runner, ids[: min(n, 2 * c)], c)  # warm-up: the kernels of this chunk size
            runner.cache.reset_slot(0)
            sync()
            t = time.perf_counter()
            chunked_prefill(model, runner, ids, c)
            sync()
            dt = time.perf_counter() - t
            del runner
            if ctx.cuda:
                torch.cuda.empty_cache()
            ctx.figures[f"prefill_{n}_c{c}"] = n / dt
            _emit_prefill(ctx, n, dt, prefill_flops(ctx.cfg.text, 0, n), chunk=c, path="runner.prefill_chunk")


def build_reference(model, cfg, device):
    """transformers' Gemma4UnifiedForConditionalGeneration sharing `model`'s weights (no copy)."""
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    t = cfg.raw["text_config"]
    rc = Gemma4UnifiedConfig(text_config={k: v for k, v in t.items() if k != "model_type"})
    with torch.device("meta"):
        ref = Gemma4UnifiedForConditionalGeneration(rc)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ref.load_state_dict(sd, strict=False, assign=True)
    ref.lm_head.weight = ref.model.language_model.embed_tokens.weight
    ref.model.language_model.rotary_emb.to_empty(device=device)
    # recompute the non-persistent buffers that a meta build leaves empty
    rot = ref.model.language_model.rotary_emb
    for lt in rot.layer_types:
        fn = rot.rope_init_fns[lt]
        inv, _ = fn(rc.text_config.per_layer_config[lt] if hasattr(rc.text_config, "per_layer_config") else rc.text_config,
                    device, layer_type=lt)
        setattr(rot, f"{lt}_inv_freq", inv)
        setattr(rot, f"{lt}_original_inv_freq", inv.clone())
    emb = ref.model.language_model.embed_tokens
    emb.embed_scale = torch.tensor(cfg.text.hidden_size ** 0.5, device=device)
    return ref.to(device).eval()


def sec_reference(ctx: Ctx):
    a, cfg, device, model, prompt = ctx.args, ctx.cfg, ctx.device, ctx.model, ctx.prompt
    ref = build_reference(model, cfg, device)
    with torch.inference_mode():
        n_agree = min(256, prompt.shape[1])
        x = ref(input_ids=prompt[:, :n_agree]).logits.argmax(-1)
        y = model(prompt[:, :n_agree]).argmax(-1)
        emit(bench="correctness", impl="unigemma", metric="bf16_top1_agreement_vs_reference",
             value=(x == y).float().mean().item(), unit="fraction", config=ctx.name, tokens=n_agree)
        # decode: generate n tokens minus a 1-token generate (the prefill)
        n = min(a.new_tokens, 32)
        ref.generate(prompt, max_new_tokens=2, do_sample=False)
        sync()
        t0 = time.perf_counter()
        ref.generate(prompt, max_new_tokens=1, do_sample=False, min_new_tokens=1)
        sync()
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        dt = time.perf_counter() - t0 - t_prefill
        tps = (n - 1) / dt
        emit(bench="decode", impl="reference", metric="tokens_per_s", value=tps, unit="tok/s", batch=1,
             ms_per_token=1e3 / tps, **ctx.common(prompt_tokens=a.prompt, new_tokens=n))
        ours = ctx.figures.get("decode", ctx.figures.get("decode_eager"))
        if ours:
            emit(bench="decode", impl="unigemma", metric="speedup_vs_reference", value=ours / tps, unit="x", batch=1,
                 cuda_graph="decode" in ctx.figures, **ctx.common(prompt_tokens=a.prompt))
        # prefill of the first whole-prompt length (2,048): one forward with a cache, logits of the last token
        g = torch.Generator().manual_seed(2)
        for n in a.prefill[:1]:
            ids = torch.randint(10, cfg.text.vocab_size, (1, n), generator=g).to(device)
            ref(input_ids=ids[:, : min(n, 128)], use_cache=True, logits_to_keep=1)
            best = math.inf
            for _ in range(2):
                sync()
                t = time.perf_counter()
                ref(input_ids=ids, use_cache=True, logits_to_keep=1)
                sync()
                best = min(best, time.perf_counter() - t)
            flops = prefill_flops(cfg.text, 0, n)
            emit(bench="prefill", impl="reference", metric="tokens_per_s", value=n / best, unit="tok/s", batch=1,
                 prompt_tokens=n, ms=best * 1e3, tflops=flops / best / 1e12,
                 fraction_of_peak=flops / best / ctx.peak if ctx.peak else None, **ctx.common())
            ours = ctx.figures.get(f"prefill_{n}")
            if ours:
                emit(bench="prefill", impl="unigemma", metric="speedup_vs_reference", value=ours / (n / best),
                     unit="x", batch=1, prompt_tokens=n, **ctx.common())
    del ref
    gc.collect()


@torch.inference_mode()
def sec_mtp(ctx: Ctx):
    """Drafter step and verification cost at batch 1, against the target's decode step (runner, CUDA graphs)."""
    from unigemma.engine.speculative import MTPProposer

    a, model, dev = ctx.args, ctx.model, ctx.device
    dcfg = drafter_config(ctx.cfg, ctx.tiny)
    drafter = build_drafter(dcfg, dev)
    dt_ = dcfg.text
    geometry = dict(hidden=dt_.hidden_size, layers=dt_.num_hidden_layers, heads=dt_.num_attention_heads,
                    intermediate=dt_.intermediate_size, centroids=dcfg.num_centroids,
                    top_k=dcfg.centroid_intermediate_top_k, weight_bytes=resident_bytes(drafter))
    P = a.prompt
    ks = a.verify_k
    runner = make_runner(model, 1, max(a.max_len, P + max(ks) + 16), graphs=ctx.cuda)
    ids = ctx.prompt[0].tolist()
    chunked_prefill(model, runner, ids, max(P, 1))
    runner.warm_up(1, tuple(sorted({1, *(k + 1 for k in ks)})), P + max(ks) + 1)
    reps = 20 if ctx.cuda else 3
    V = ctx.cfg.text.vocab_size

    def target_step(T):
        tok = torch.randint(10, V, (1, T), device=dev)
        pos = torch.arange(P, P + T, device=dev)[None]
        return lambda: runner.decode(tok, pos, P + T)

    step_s = per_call(target_step(1), reps)
    common = ctx.common(batch=1, prompt_tokens=P, cuda_graph=ctx.cuda)
    emit(bench="mtp", impl="unigemma", metric="target_step_ms", value=step_s * 1e3, unit="ms", **common)
    for k in ks:
        s = per_call(target_step(k + 1), reps)
        emit(bench="mtp", impl="unigemma", metric="verify_ms", value=s * 1e3, unit="ms", k=k, **common)
        emit(bench="mtp", impl="unigemma", metric="verify_vs_decode_step", value=s / step_s, unit="x", k=k,
             target="close to 1", **common)

    # the engine's drafter: MTPProposer.propose (k chained drafter forwards, eager, then one host sync)
    seq = SimpleNamespace(tokens=ids + [7], slot=0, spec_state={},
                          hidden=torch.randn(ctx.cfg.text.hidden_size, device=dev).to(torch.bfloat16))
    prop = MTPProposer(drafter, model, runner.cache)
    kd = 4
    draft_s = per_call(lambda: prop.propose([seq], kd), max(2, reps // 4)) / kd
    emit(bench="mtp", impl="unigemma", metric="draft_step_ms", value=draft_s * 1e3, unit="ms", path="MTPProposer",
         drafts_per_call=kd, drafter=geometry, **{**common, "cuda_graph": False})
    emit(bench="mtp", impl="unigemma", metric="draft_vs_target_step", value=draft_s / step_s, unit="fraction",
         target=0.10, path="MTPProposer", **{**common, "cuda_graph": False})
    if ctx.cuda:  # one drafter forward captured in a CUDA graph: what the drafter costs without launch overhead
        c = runner.cache
        shared, masks = {}, {}
        for t in prop.types:
            lk = c.layers[prop.store[t]]
            if t == FULL:
                shared[t] = (lk.k[:1, :, :P], lk.v[:1, :, :P])
                masks[t] = torch.ones(1, P, dtype=torch.bool, device=dev)
            else:
                shared[t] = (lk.k[:1], lk.v[:1])
                rp = c.ring_pos[:1]
                masks[t] = (rp < P) & (rp >= P - dcfg.text.sliding_window - 1)
        x = torch.cat([model.language_model.embed(torch.tensor([[7]], device=dev)), seq.hidden.view(1, 1, -1)], -1)
        pos = torch.tensor([[P]], device=dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                drafter(x, pos, shared, masks)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            drafter(x, pos, shared, masks)
        g_s = per_call(graph.replay, reps * 5)
        emit(bench="mtp", impl="unigemma-graph", metric="draft_step_ms", value=g_s * 1e3, unit="ms",
             path="drafter forward in a CUDA graph", drafter=geometry, **common)
        emit(bench="mtp", impl="unigemma-graph", metric="draft_vs_target_step", value=g_s / step_s, unit="fraction",
             target=0.10, path="drafter forward in a CUDA graph", **common)
        del graph
    del runner, prop, drafter
    gc.collect()


def sec_long(ctx: Ctx):
    a, model, dev, cfg = ctx.args, ctx.model, ctx.device, ctx.cfg.text
    max_pos = cfg.max_position_embeddings
    V = cfg.vocab_size
    prev = None  # (context, prefill seconds) of the last length measured: predicts the next one (quadratic)
    for L in a.long:
        new = a.long_new
        prompt_len = min(L, max_pos - new - 1)
        if prev is not None and a.budget is not None:
            guess = prev[1] * (prompt_len / prev[0]) ** 2 + 15
            if ctx.over_budget(guess):
                emit(bench="plan", impl="unigemma", metric="skipped", value=f"long {L}", unit="",
                     reason=f"~{guess:.0f} s predicted, {a.budget - ctx.elapsed():.0f} s of the budget left",
                     config=ctx.name)
                continue
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        common = ctx.common(batch=1, prompt_tokens=prompt_len, context_tokens=prompt_len + new, chunk=a.long_chunk)
        ids = torch.randint(10, V, (prompt_len,), generator=torch.Generator().manual_seed(4)).tolist()
        runner = make_runner(model, 1, prompt_len + new + 1, graphs=ctx.cuda)
        kv = kv_bytes(runner.cache)
        sync()
        t = time.perf_counter()
        out = chunked_prefill(model, runner, ids, a.long_chunk)
        sync()
        dt = time.perf_counter() - t
        prev = (prompt_len, dt)
        flops = prefill_flops(cfg, 0, prompt_len)
        tf = flops / dt
        emit(bench="long_context", impl="unigemma", metric="prefill_tokens_per_s", value=prompt_len / dt,
             unit="tok/s", prefill_s=dt, tflops=tf / 1e12, fraction_of_peak=tf / ctx.peak if ctx.peak else None,
             **common)
        c = runner.cache
        emit(bench="long_context", impl="unigemma", metric="kv_bytes", value=kv[FULL], unit="B", layer_type=FULL,
             layers=cfg.layer_types.count(FULL), entries_per_layer=c.max_len + 1, **common)
        n_sliding = sum(1 for t_, lk in zip(cfg.layer_types, c.layers) if t_ == SLIDING and lk is not None)
        emit(bench="long_context", impl="unigemma", metric="kv_bytes", value=kv[SLIDING], unit="B",
             layer_type=SLIDING, layers=n_sliding, entries_per_layer=c.ring + 1, window=c.window,
             if_unbounded=kv[SLIDING] // (c.ring + 1) * (c.max_len + 1), **common)
        with torch.inference_mode():
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            pos = torch.full((1, 1), prompt_len, dtype=torch.long, device=dev)
            runner.warm_up(1, (1,), prompt_len + new)
            sync()
            t = time.perf_counter()
            for i in range(new):
                logits, _ = runner.decode(tok, pos, prompt_len + i + 1)
                tok = logits[:, -1].argmax(-1, keepdim=True)
                pos = pos + 1
            sync()
            dt = time.perf_counter() - t
        tps = new / dt
        limit = None
        if ctx.bw:  # every weight plus the K/V a step reads at this length (full layers: all of it; ring: all)
            limit = ctx.bw / (ctx.weight_bytes + kv[FULL] * (prompt_len + new) / (c.max_len + 1) + kv[SLIDING])
        emit(bench="long_context", impl="unigemma", metric="decode_tokens_per_s", value=tps, unit="tok/s",
             new_tokens=new, cuda_graph=ctx.cuda, fraction_of_limit=tps / limit if limit else None, **common)
        if limit:
            emit(bench="long_context", impl="limit", metric="decode_tokens_per_s", value=limit, unit="tok/s",
                 new_tokens=new, **common)
        if ctx.cuda:
            emit(bench="long_context", impl="unigemma", metric="peak_memory_bytes",
                 value=torch.cuda.max_memory_allocated(), unit="B", weight_bytes=ctx.weight_bytes,
                 device_memory_bytes=torch.cuda.get_device_properties(dev).total_memory, **common)
        del runner, out
        if ctx.cuda:
            torch.cuda.empty_cache()


def sec_quant(ctx: Ctx):
    """int8 / int4 weight-only decode against bf16, same loop (the runner: CUDA graphs, compiled pieces, fused
    projections where the kernel reads the canonical layout), same random weights."""
    from unigemma.quant import QuantConfig, QuantLinear, quantize_model

    a, dev, cfg = ctx.args, ctx.device, ctx.cfg
    prompt = ctx.prompt
    max_len = a.max_len
    n_agree = min(128, prompt.shape[1])
    bf16 = ctx.figures.get("decode" if ctx.cuda else "decode_eager")
    with torch.inference_mode():
        ref_top1 = ctx.model(prompt[:, :n_agree]).argmax(-1)
    if bf16 is None:
        dt, _ = runner_decode(ctx.model, 1, prompt, a.new_tokens, graphs=ctx.cuda, max_len=max_len)
        bf16 = a.new_tokens / dt
    common = ctx.common(batch=1, prompt_tokens=a.prompt, new_tokens=a.new_tokens, cuda_graph=ctx.cuda,
                        max_len=max_len)
    emit(bench="decode", impl="unigemma", metric="tokens_per_s", value=bf16, unit="tok/s",
         weight_bytes=ctx.weight_bytes, section="quant", **common)
    ctx.free_model()  # one 12B at a time: each variant is rebuilt (same seed, same weights) and quantized
    for q in a.quant:
        qc = QuantConfig(bits=8) if q == "int8" else QuantConfig(bits=4, group_size=32)
        m = build(cfg, dev)
        sync()
        t = time.perf_counter()
        force = {"int4-tinygemm": "int4-cuda", "int4-triton": "int4-triton"}.get(q)
        if force:  # one int4 kernel for the layers instead of the default choice
            quantize_model(m, qc, kernels=False)
            for mod in m.modules():
                if isinstance(mod, QuantLinear):
                    mod.prepare(_force=force) if mod.bits == 4 else mod.prepare()
        else:
            quantize_model(m, qc)
        sync()
        quant_s = time.perf_counter() - t
        if ctx.cuda:
            gc.collect()
            torch.cuda.empty_cache()
        with torch.inference_mode():
            agree = (m(prompt[:, :n_agree]).argmax(-1) == ref_top1).float().mean().item()
        emit(bench="correctness", impl=f"unigemma-{q}", metric="top1_agreement_vs_bf16", value=agree,
             unit="fraction", config=ctx.name, tokens=n_agree)
        tm: dict = {}
        dt, _ = runner_decode(m, 1, prompt, a.new_tokens, graphs=ctx.cuda, max_len=max_len, timings=tm)
        tps = a.new_tokens / dt
        wb = resident_bytes(m)
        limit = ctx.bw / wb if ctx.bw else None
        kernels = sorted({getattr(mod, "kernel", None) or "dequantize" for mod in m.modules()
                          if type(mod).__name__ == "QuantLinear"})
        emit(bench="decode", impl=f"unigemma-{q}", metric="tokens_per_s", value=tps, unit="tok/s", weight_bytes=wb,
             vs_bf16=tps / bf16, target=2.0 if q.startswith("int4") else 1.6, quantize_s=quant_s, kernels=kernels,
             path="runner", fused=tm.get("fused"), compiled=tm.get("compiled"),
             fraction_of_limit=tps / limit if limit else None, **common)
        if limit:
            emit(bench="decode", impl=f"limit:unigemma-{q}", metric="tokens_per_s", value=limit, unit="tok/s",
                 weight_bytes=wb, **common)
        if a.quant_detail:  # what limits it: the step's kernels, and each projection's read rate
            profile_step(ctx, m, f"unigemma-{q}", tps, top=10)
            weight_read_rates(ctx, m, f"unigemma-{q}")
        del m
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()


RUN = {"bandwidth": sec_bandwidth, "correctness": sec_correctness, "decode": sec_decode, "profile": sec_profile,
       "throughput": sec_throughput, "prefill": sec_prefill, "reference": sec_reference, "mtp": sec_mtp,
       "long": sec_long, "quant": sec_quant}


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------

def _ints(value: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {value!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if not out or min(out) < 1:
        raise SystemExit(f"{flag} {value!r}: expected one or more integers >= 1")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small geometry and short lengths (runs on CPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--layers", type=int, default=None, help="reduce depth (per-layer figures scale; config says so)")
    ap.add_argument("--sections", default="default",
                    help=f"comma-separated subset of {','.join(SECTIONS)}; 'default' = all but long; 'all'")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default 64; tiny 16)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens before decoding (default 512; tiny 64)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="context of the decode caches (the engine's max_model_len; default 4096; tiny 256): sliding "
                    "layers then hold a ring of window + 31 entries, as served")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference section")
    ap.add_argument("--batches", default=None, help="runner decode batches (default 1,8,32,64; tiny 1,4,64)")
    ap.add_argument("--engine-batches", default=None, help="engine decode batches (default 1,64; tiny 1,8)")
    ap.add_argument("--prefill", default=None, help="prompt lengths prefilled in one forward (default 2048; tiny 256)")
    ap.add_argument("--prefill-chunked", default=None,
                    help="prompt lengths prefilled chunk by chunk like the engine (default 32768; tiny 1024)")
    ap.add_argument("--chunks", default=None, help="prefill chunk sizes for those (default 512,2048; tiny 128,512)")
    ap.add_argument("--long", default=None,
                    help="long-context lengths (default 131072, plus 262144 on a GPU with > 100 GB; tiny 2048)")
    ap.add_argument("--long-chunk", type=int, default=None, help="prefill chunk of the long prompts (default 2048; "
                    "tiny 256)")
    ap.add_argument("--long-new", type=int, default=16, help="tokens decoded after each long prompt")
    ap.add_argument("--verify-k", default="2,4,6", help="draft lengths whose verification step is timed")
    ap.add_argument("--quant", default=None, help="weight-only variants: int8, int4 (the default kernel choice), "
                    "int4-triton / int4-tinygemm (the layers on that CUDA int4 kernel); default int8,int4 and on a "
                    "GPU also int4-triton")
    ap.add_argument("--quant-detail", action="store_true", help="quant: also profile each variant's step and time "
                    "each projection kind alone")
    ap.add_argument("--compile", action="store_true", help="also the inductor-compiled decode step (slow to build)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak (default: by device name)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: sections (and long lengths) that would start past it are skipped, not run")
    ap.add_argument("--out", default=None, help="write the JSON lines to this file, or into this folder as "
                    "<date>-<device>-gpu[-tag].jsonl")
    ap.add_argument("--tag", default=None, help="suffix of the --out file name (e.g. long)")
    a = ap.parse_args(argv)
    t = a.tiny
    a.new_tokens = a.new_tokens or (16 if t else 64)
    a.prompt = a.prompt or (64 if t else 512)
    a.max_len = max(a.max_len or (256 if t else 4096), a.prompt + a.new_tokens + 8)
    a.batches = _ints(a.batches or ("1,4,64" if t else "1,8,32,64"), "--batches")
    a.engine_batches = _ints(a.engine_batches or ("1,8" if t else "1,64"), "--engine-batches")
    a.prefill = _ints(a.prefill or ("256" if t else "2048"), "--prefill")
    a.prefill_chunked = _ints(a.prefill_chunked or ("1024" if t else "32768"), "--prefill-chunked")
    a.chunks = _ints(a.chunks or ("128,512" if t else "512,2048"), "--chunks")
    a.long_chunk = a.long_chunk or (256 if t else 2048)
    a.verify_k = _ints(a.verify_k, "--verify-k")
    if a.quant is None:  # both CUDA int4 kernels side by side ("int4" is the default choice: tinygemm)
        a.quant = "int8,int4" if t or not torch.cuda.is_available() else "int8,int4,int4-triton"
    a.quant = [q for q in a.quant.split(",") if q]
    bad = sorted(set(a.quant) - {"int8", "int4", "int4-triton", "int4-tinygemm"})
    if bad:
        raise SystemExit(f"--quant: unknown {bad} (accepted: int8, int4, int4-triton, int4-tinygemm)")
    if a.sections in ("default", "all"):
        a.sections = list(DEFAULT_SECTIONS if a.sections == "default" else SECTIONS)
    else:
        want = [s for s in a.sections.split(",") if s]
        bad = sorted(set(want) - set(SECTIONS))
        if bad:
            raise SystemExit(f"--sections: unknown {bad} (accepted: {', '.join(SECTIONS)}, default, all)")
        a.sections = [s for s in SECTIONS if s in want]  # always the canonical order (quant frees the model: last)
    if a.no_reference and "reference" in a.sections:
        a.sections.remove("reference")
    if a.long_new < 1:
        raise SystemExit(f"--long-new {a.long_new}: expected an integer >= 1")
    return a


def main(argv=None) -> list[dict]:
    """Run the selected sections; returns the emitted lines (also printed, and written to --out)."""
    global DEVICE_NAME, _OUT
    a = parse_args(argv)
    RESULTS.clear()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    DEVICE_NAME = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cfg = tiny_config() if a.tiny else gemma4_12b_config()
    if a.layers:
        t = cfg.raw["text_config"]
        t["num_hidden_layers"] = a.layers
        t.pop("layer_types", None)
        cfg = UnifiedConfig.from_dict(cfg.raw)
    cfg.vision = cfg.audio = None
    name = ("tiny" if a.tiny else "12b") + (f"-{a.layers}layers" if a.layers else "")
    if a.long is None:
        big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory > 100e9
        a.long = [2048] if a.tiny else ([131072, 262144] if big else [131072])
    elif isinstance(a.long, str):
        a.long = _ints(a.long, "--long")
    torch.manual_seed(0)
    ctx = Ctx(a, device, cfg, name, a.tiny)
    ctx.peak = a.peak_tflops * 1e12 if a.peak_tflops else (peak_flops(DEVICE_NAME) if device.type == "cuda" else None)
    out = None
    if a.out:
        path = out_path(a.out, DEVICE_NAME, "-".join(x for x in (a.tag, None if not a.tiny else "tiny") if x) or None)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = _OUT = open(path, "w", encoding="utf-8")
        print(f"# writing {path}", file=sys.stderr, flush=True)
    try:
        emit(bench="env", impl="unigemma", metric="torch_version", value=torch.__version__, unit="", config=name,
             cuda=torch.version.cuda, sections=a.sections, peak_tflops=ctx.peak / 1e12 if ctx.peak else None,
             device_memory_bytes=torch.cuda.get_device_properties(device).total_memory if ctx.cuda else None)
        for sec in a.sections:
            if ctx.over_budget():
                emit(bench="plan", impl="unigemma", metric="skipped", value=sec, unit="", config=name,
                     reason=f"budget of {a.budget:.0f} s spent ({ctx.elapsed():.0f} s)")
                continue
            t = time.perf_counter()
            try:
                with torch.no_grad():
                    RUN[sec](ctx)
            except Exception as e:  # one failing section (e.g. out of memory) must not lose the others
                traceback.print_exc()
                emit(bench=sec, impl="unigemma", metric="error", value=f"{type(e).__name__}: {e}"[:2000], unit="",
                     config=name)
                gc.collect()
                if ctx.cuda:
                    torch.cuda.empty_cache()
            emit(bench="plan", impl="unigemma", metric="section_s", value=round(time.perf_counter() - t, 3), unit="s",
                 section=sec, config=name)
    finally:
        if out is not None:
            out.close()
            _OUT = None
    return list(RESULTS)


if __name__ == "__main__":
    main()
