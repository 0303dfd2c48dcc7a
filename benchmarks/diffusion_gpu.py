"""DiffusionGemma on a GPU: the released geometry (the 26B-A4B text stack, canvas 256) with random bf16 weights.

Random weights cost what real ones cost per forward, but never make the denoiser confident: every canvas runs all
its steps, so `max_denoising_steps` (steps per canvas) is a parameter of each figure, not a result. JSON lines
(DESIGN.md §6: `bench`, `metric`, `value`, `unit`, `impl`, `batch`, `device`, `config`); --out writes them as they
are measured. Sections, in order (--sections picks):

    limits          read bandwidth, and a denoising step's floor: max(weight bytes the step reads ÷ bandwidth,
                    its FLOPs ÷ the bf16 peak); a canvas of 256 tokens × top-8 touches nearly all 128 experts of a
                    layer, so the step reads nearly every weight
    step            one denoiser forward of B canvases after a --prompt-token prompt: eager (model.denoise: the
                    experts' grouped path, host syncs), static (DenoiseGraphs without capture), graphs (captured;
                    experts through F.grouped_mm), graphs-all (captured; every expert on every token)
    generate        DiffusionEngine end to end (what llm.generate and the server run), B requests of --canvases
                    canvases each, per --steps value: aggregate tokens/s, forwards per token; graphs and eager
    autoregressive  the same tensors as a `gemma4_text` model of the same geometry (the same 26B-A4B stack):
                    the engine's runner decoding batch 1 and B (CUDA graphs), tokens/s; ratio diffusion / AR
    reference       transformers' DiffusionGemmaForBlockDiffusion on the same tensors (load_state_dict with
                    assign=True: no second copy): `generate` tokens/s at batch 1 and the first --steps value

    python benchmarks/diffusion_gpu.py --out $OUT/ --budget 300          # one H100 / H200, under 6 minutes
    python benchmarks/diffusion_gpu.py --tiny                            # a small geometry on the CPU (smoke)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import gpu as gpu_bench  # noqa: E402  (bandwidth, peak FLOP/s, random fill, runner decode)
from unigemma.config import _FAMILY_GEOMETRY, DiffusionConfig, UnifiedConfig  # noqa: E402
from unigemma.engine.diffusion import DenoiseGraphs, DiffusionEngine, DiffusionOptions  # noqa: E402
from unigemma.engine.sampling import SamplingParams  # noqa: E402
from unigemma.engine.scheduler import Request  # noqa: E402
from unigemma.model.diffusion import DiffusionGemma  # noqa: E402
from unigemma.model.unified import Gemma4Unified  # noqa: E402

SECTIONS = ("limits", "step", "generate", "autoregressive", "reference")
RESULTS: list[dict] = []
_OUT = None
_START = time.perf_counter()


_COMMON: dict = {}


def emit(**kw):
    """One JSON line: DESIGN.md §6 keys first (device and config of this run, impl "unigemma" unless given)."""
    kw = {"bench": "diffusion_gpu", "metric": kw.pop("metric"), "value": kw.pop("value", None),
          "unit": kw.pop("unit", None), "impl": kw.pop("impl", "unigemma"), **_COMMON, **kw}
    RESULTS.append(kw)
    line = json.dumps(kw)
    print(line, flush=True)
    if _OUT is not None:
        with open(_OUT, "a") as f:
            f.write(line + "\n")


def text_config(args) -> dict:
    """The released text geometry (config._FAMILY_GEOMETRY["26b-a4b"]), or a small one (--tiny); --layers cuts depth."""
    if args.tiny:
        d = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 num_global_key_value_heads=1, intermediate_size=256, enable_moe_block=True, num_experts=16,
                 top_k_experts=4, moe_intermediate_size=128, sliding_window=64, attention_k_eq_v=True,
                 max_position_embeddings=8192, vocab_size=4096, head_dim=64, global_head_dim=128)
    else:
        d = dict(_FAMILY_GEOMETRY["26b-a4b"], vocab_size=262144, head_dim=256, global_head_dim=512)
    d = {k: v for k, v in d.items() if k != "hidden_size_per_layer_input"}
    if args.layers:
        d["num_hidden_layers"] = args.layers
    n = d["num_hidden_layers"]
    d["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    d.update(final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=[1, 106, 50])
    return d


def build_diffusion(args, device) -> DiffusionGemma:
    cfg = DiffusionConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": args.canvas,
                                     "text_config": text_config(args)})
    with torch.device("meta"):
        m = DiffusionGemma(cfg).to(args.dtype)
    m = m.to_empty(device=device)
    gpu_bench.fill_random(m, device)
    m.lm_head.weight = m.model.decoder.embed_tokens.weight
    return m.eval()


def autoregressive_twin(dm: DiffusionGemma) -> Gemma4Unified:
    """A `gemma4_text` model of the same geometry holding the diffusion model's own tensors (no copy)."""
    d = {"model_type": "gemma4_text", "hidden_size_per_layer_input": 0, **dm._bench_text}
    cfg = UnifiedConfig.from_dict(d)
    with torch.device("meta"):
        m = Gemma4Unified(cfg).to(dm.stack.embed_tokens.weight.dtype)
    sd = {k.replace("model.decoder.", "model.language_model.", 1): v for k, v in dm.state_dict().items()
          if k.startswith("model.decoder.") and ".self_conditioning." not in k}
    sd["lm_head.weight"] = dm.lm_head.weight
    missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
    left = [n for n, p in list(m.named_parameters()) + list(m.named_buffers()) if p.is_meta]
    if left or unexpected:
        raise RuntimeError(f"autoregressive twin: tensors not shared {left[:5]}, unexpected {unexpected[:5]}")
    m.lm_head.weight = m.model.language_model.embed_tokens.weight
    return m.eval()


def reference_twin(dm: DiffusionGemma, args, device):
    """transformers' DiffusionGemmaForBlockDiffusion on the diffusion model's tensors (assign=True), its
    non-persistent buffers (rotary tables) computed on the device."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config=dict(dm._bench_text), vision_config=None, canvas_length=args.canvas)
    with torch.device("meta"):
        ref = DiffusionGemmaForBlockDiffusion(cfg)
    ref.load_state_dict(dm.state_dict(), strict=False, assign=True)
    ref.tie_weights()  # the encoder's shared weights (and the head) point at the assigned decoder tensors again
    for p in ref.parameters():  # transformers' guarded initialisers leave these alone
        p._is_hf_initialized = True
    for name, mod in ref.named_modules():  # non-persistent buffers (rotary tables, embedding scale): on the device
        if "vision" in name:  # the vision tower (built by default) is not used by text generation
            continue
        metas = [n for n, b in mod.named_buffers(recurse=False) if b.is_meta]
        for n in metas:
            setattr(mod, n, torch.empty_like(getattr(mod, n), device=device))
        if metas:
            ref._init_weights(mod)
    left = [n for n, p in list(ref.named_parameters()) + list(ref.named_buffers()) if p.is_meta and "vision" not in n]
    if left:
        raise RuntimeError(f"reference twin: tensors left on meta: {left[:5]}")
    ref.generation_config.eos_token_id = []  # never stop early: a fixed number of tokens is timed
    return ref.eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return [2] + torch.randint(10, vocab, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- sections ------------------------------------------------------------------------------------------------

def sec_limits(ctx):
    dm, cfg = ctx.dm, ctx.dm.config.text
    bw = gpu_bench.bandwidth(ctx.device) if ctx.device.type == "cuda" else None
    peak = gpu_bench.peak_flops(ctx.device_name) if ctx.device.type == "cuda" else None
    total = sum(p.numel() for p in dm.parameters())  # tied head counted once
    E, k = cfg.num_experts, cfg.top_k_experts
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    experts_all = E * expert * cfg.num_hidden_layers
    for B in ctx.batches:
        pairs = B * args_canvas(ctx) * 1.0
        touched = E * (1 - (1 - k / E) ** pairs)  # expected distinct experts per layer (uniform routing)
        read = (total - experts_all + touched / E * experts_all) * 2  # bf16 bytes
        active = total - experts_all + k * expert * cfg.num_hidden_layers
        flops = 2 * active * B * args_canvas(ctx)
        row = dict(batch=B, impl="limit",
                   params_total=total, active_params=active, experts_touched_per_layer=round(touched, 1),
                   bytes_read=int(read), flops=int(flops), bandwidth_gbs=round(bw / 1e9, 1) if bw else None)
        floor = [x for x in ((read / bw) if bw else None, (flops / peak) if peak else None) if x]
        emit(**row, metric="denoise_step_floor", value=round(max(floor) * 1e3, 3) if floor else None, unit="ms")
    ctx.bandwidth = bw


def args_canvas(ctx) -> int:
    return ctx.dm.config.canvas_length


def _encoded_cache(ctx, B: int, P: int):
    dm = ctx.dm
    cache = dm.make_cache(B, ctx.max_len + args_canvas(ctx), dtype=ctx.args.dtype, device=ctx.device)
    ids = torch.tensor([prompt_ids(P, dm.config.text.vocab_size)], device=ctx.device)
    with torch.inference_mode():
        for b in range(B):
            dm.encode(ids, torch.arange(P, device=ctx.device)[None], cache, slots=torch.tensor([b], device=ctx.device))
    return cache


def _experts_path(dm, path):
    for layer in dm.model.decoder.layers:
        if getattr(layer, "has_moe", False):
            layer.experts.path = path


@torch.inference_mode()
def sec_step(ctx):
    dm, L, P, dev = ctx.dm, args_canvas(ctx), ctx.args.prompt, ctx.device
    V = dm.config.text.vocab_size
    for B in ctx.batches:
        cache = _encoded_cache(ctx, B, P)
        kv = torch.full((B,), P, device=dev)
        pos = kv[:, None] + torch.arange(L, device=dev)[None]
        slots = torch.arange(B, device=dev)
        canvas = torch.randint(0, V, (B, L), device=dev)
        sc = dm.denoise(canvas, pos, cache, kv, None, slots).to(ctx.args.dtype)
        impls = [("unigemma eager", lambda: dm.denoise(canvas, pos, cache, kv, sc, slots), None),
                 ("unigemma static", None, (False, None))]
        if dev.type == "cuda":
            impls += [("unigemma graphs", None, (True, None)), ("unigemma graphs, experts all", None, (True, "all"))]
        base = None
        for impl, fn, spec in impls:
            setup = 0.0
            if spec is not None:
                capture, path = spec
                _experts_path(dm, path)
                t = time.perf_counter()
                g = DenoiseGraphs(dm, cache, B, capture=capture)
                g(canvas, pos, kv, sc, slots, P)
                sync()
                setup = time.perf_counter() - t

                def fn(g=g):
                    return g(canvas, pos, kv, sc, slots, P)
            try:
                dt = gpu_bench.per_call(fn, ctx.reps)
            finally:
                _experts_path(dm, None)
            base = base or dt
            emit(metric="denoise_step", value=round(dt * 1e3, 3), unit="ms", impl=impl,
                 batch=B, prompt=P, canvas=L,
                 tokens_per_s_per_step=round(B * L / dt, 1), speedup_vs_eager=round(base / dt, 3),
                 setup_s=round(setup, 2))
        del cache
        gc.collect()


def _generate(ctx, B: int, steps: int, graphs: bool | None) -> dict:
    dm, L = ctx.dm, args_canvas(ctx)
    n_tokens = ctx.args.canvases * L
    eng = DiffusionEngine(dm, None, [], max_slots=B, max_model_len=ctx.max_len, device=ctx.device,
                          cuda_graphs=graphs)
    opts = DiffusionOptions.resolve({}, max_denoising_steps=steps)
    vocab = dm.config.text.vocab_size

    def requests(r):
        return [Request(prompt_ids(ctx.args.prompt, vocab, seed=10 * r + b),
                        SamplingParams(seed=b, max_tokens=n_tokens, ignore_eos=True), diffusion=opts)
                for b in range(B)]

    for req in requests(99):  # warm-up: graphs captured, kernels loaded
        eng.add(req)
    eng.run_until_done()
    rids = [eng.add(req) for req in requests(0)]
    sync()
    t = time.perf_counter()
    out = eng.run_until_done()
    sync()
    dt = time.perf_counter() - t
    toks = sum(len(out[r].token_ids) for r in rids)
    passes = sum(eng.scheduler.seqs[r].denoiser_passes for r in rids)
    encodes = B * (1 + ctx.args.canvases - 1)
    return dict(seconds=round(dt, 3), tokens=toks, tokens_per_s=round(toks / dt, 1),
                denoiser_passes=passes, forwards_per_token=round((passes + encodes) / toks, 4))


def sec_generate(ctx):
    for steps in ctx.steps:
        for B in ctx.batches:
            impls = ([("unigemma graphs", None), ("unigemma eager", False)] if ctx.device.type == "cuda"
                     else [("unigemma eager", None)])
            if steps != ctx.steps[0] or B != ctx.batches[0]:
                impls = impls[:1]  # eager only at the first setting: its step cost is in `step` already
            for impl, graphs in impls:
                r = _generate(ctx, B, steps, graphs)
                ctx.diffusion_tps[(impl, B, steps)] = r["tokens_per_s"]
                emit(metric="generate_tokens_per_s", value=r["tokens_per_s"], unit="tok/s",
                     impl=impl, batch=B, 
                     max_denoising_steps=steps, canvas=args_canvas(ctx), prompt=ctx.args.prompt,
                     note="random weights: every canvas runs all its steps", **r)


def sec_autoregressive(ctx):
    ar = autoregressive_twin(ctx.dm)
    P = ctx.args.prompt
    prompt = torch.tensor([prompt_ids(P, ar.config.text.vocab_size)], device=ctx.device)
    graphs = ctx.device.type == "cuda"
    for B in ctx.batches:
        dt, _ = gpu_bench.runner_decode(ar, B, prompt, ctx.args.ar_tokens, graphs, max_len=ctx.max_len)
        tps = B * ctx.args.ar_tokens / dt
        emit(metric="autoregressive_decode_tokens_per_s", value=round(tps, 1), unit="tok/s",
             impl="unigemma runner" + (" (CUDA graphs)" if graphs else ""), batch=B, 
             prompt=P, forwards_per_token=round(1 / B, 4))
        impl = "unigemma graphs" if graphs else "unigemma eager"
        for steps in ctx.steps:
            d = ctx.diffusion_tps.get((impl, B, steps))
            if d:
                emit(metric="diffusion_over_autoregressive", value=round(d / tps, 3),
                     unit="ratio", impl=impl, batch=B, 
                     max_denoising_steps=steps)
    del ar
    gc.collect()


@torch.inference_mode()
def sec_reference(ctx):
    ref = reference_twin(ctx.dm, ctx.args, ctx.device)
    steps = ctx.steps[0]
    n = ctx.args.canvases * args_canvas(ctx)
    ids = torch.tensor([prompt_ids(ctx.args.prompt, ctx.dm.config.text.vocab_size)], device=ctx.device)
    # the same tensors compute the same thing: one denoiser forward, top-1 agreement of the canvas logits
    canvas = torch.randint(0, ctx.dm.config.text.vocab_size, (1, args_canvas(ctx)), device=ctx.device)
    theirs = ref(input_ids=ids, decoder_input_ids=canvas).logits.float()
    ours = ctx.dm(ids, canvas).float()
    emit(metric="denoiser_top1_agreement_vs_reference",
         value=round(float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()), 4), unit="fraction",
         max_abs_diff=round(float((theirs - ours).abs().max()), 4), batch=1, 
         dtype=str(ctx.args.dtype).removeprefix("torch."))
    kw = dict(max_new_tokens=n, max_denoising_steps=steps)
    ref.generate(ids, **{**kw, "max_new_tokens": args_canvas(ctx)})  # warm-up
    sync()
    t = time.perf_counter()
    out = ref.generate(ids, **kw)
    sync()
    dt = time.perf_counter() - t
    toks = out.sequences.shape[1] - ids.shape[1]
    tps = toks / dt
    emit(metric="generate_tokens_per_s", value=round(tps, 1), unit="tok/s",
         impl="reference (transformers 5.24.0)", batch=1, 
         max_denoising_steps=steps, tokens=toks, seconds=round(dt, 3))
    ours = ctx.diffusion_tps.get(("unigemma graphs" if ctx.device.type == "cuda" else "unigemma eager", 1, steps))
    if ours:
        emit(metric="unigemma_over_reference", value=round(ours / tps, 3), unit="ratio",
             batch=1, max_denoising_steps=steps)
    del ref
    gc.collect()


class Ctx:
    pass


def main(argv=None):
    """Run the sections named by argv; the JSON lines are printed (and written to --out) and returned."""
    with torch.no_grad():  # only inside: a caller (a test) keeps its grad mode
        return _main(argv)


def _main(argv):
    global _OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a small geometry (runs on the CPU)")
    ap.add_argument("--layers", type=int, default=None, help="reduce depth (config then says so)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--batches", default="1,4", help="requests denoised together")
    ap.add_argument("--steps", default="48,16,8", help="max_denoising_steps values (steps per canvas)")
    ap.add_argument("--canvas", type=int, default=None, help="canvas_length (default 256; tiny 64)")
    ap.add_argument("--canvases", type=int, default=2, help="canvases generated per request")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--ar-tokens", type=int, default=64, help="autoregressive decode steps timed")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="weights and cache (float32: a check of the twins on the CPU)")
    ap.add_argument("--reps", type=int, default=10, help="denoiser forwards timed per figure")
    ap.add_argument("--budget", type=float, default=None, help="a section that would start after N s is skipped")
    ap.add_argument("--out", default=None, help="a file, or a folder (then <date>-<device>-diffusion.jsonl)")
    args = ap.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.canvas is None:
        args.canvas = 64 if args.tiny else 256
    if args.tiny:
        args.prompt = min(args.prompt, 96)
        args.reps = min(args.reps, 2)
        args.ar_tokens = min(args.ar_tokens, 8)
    ctx = Ctx()
    ctx.args = args
    ctx.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx.device_name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
    ctx.batches = [int(x) for x in args.batches.split(",")]
    ctx.steps = [int(x) for x in args.steps.split(",")]
    ctx.reps = args.reps
    ctx.max_len = 4096 if not args.tiny else 512
    ctx.diffusion_tps = {}
    ctx.config_name = ("tiny" if args.tiny else "diffusiongemma-26b-a4b") + (f"-{args.layers}layers"
                                                                            if args.layers else "")
    if args.out:
        out = Path(args.out)
        if args.out.endswith("/") or out.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            out = out / f"{time.strftime('%Y-%m-%d')}-{gpu_bench.device_slug(ctx.device_name)}-diffusion.jsonl"
        _OUT = out
    t = time.perf_counter()
    _COMMON.update(device=ctx.device_name, config=ctx.config_name)
    ctx.dm = build_diffusion(args, ctx.device)
    ctx.dm._bench_text = text_config(args)
    sync()
    emit(metric="build_s", value=round(time.perf_counter() - t, 2), unit="s",
         torch=torch.__version__,
         params=sum(p.numel() for p in ctx.dm.parameters()))
    for name in args.sections.split(","):
        if args.budget is not None and time.perf_counter() - _START > args.budget:
            emit(metric="skipped", section=name, reason=f"past --budget {args.budget} s")
            continue
        try:
            globals()[f"sec_{name}"](ctx)
        except Exception as e:  # noqa: BLE001 - the run goes on; the line says what failed
            emit(metric="error", section=name, error=f"{type(e).__name__}: {e}",
                 trace=traceback.format_exc()[-1500:])
        if ctx.device.type == "cuda":
            emit(metric="peak_memory_gb", section=name,
                 value=round(torch.cuda.max_memory_allocated() / 1e9, 2), unit="GB")
    return RESULTS


if __name__ == "__main__":
    main()
