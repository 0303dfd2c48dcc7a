"""Where a decode step's time goes, and how fast each weight format multiplies (JSON lines, DESIGN.md §6).

    python benchmarks/gpu_profile.py --out results/         # on the GPU machine: 12B geometry, 12 layers
    python benchmarks/gpu_profile.py --tiny                 # the same on a small model (runs on CPU)

Sections:
- `step`: one batch-1 decode step of `model.run` (eager, after a 512-token prefill) under torch.profiler: kernels
  per step, the sum of their device time, and the top kernels by device time (`bench: "profile"`). Compared
  with the CUDA-graph step's wall time (from gpu.py's GraphDecoder) this says whether a step is bound by kernel
  work or by the gaps between many small kernels.
- `matmul`: one (M, K) × (N, K)ᵀ product for the model's weight shapes (q/o projections, MLP, LM head) and
  M = 1 / 8: bf16 `F.linear`, and each weight-only kernel `QuantLinear` picks (int8, int4 group 32), as µs per call
  and effective weight-read bandwidth (`bench: "matmul"`).
- `gemv` (CUDA): tile configurations of the int8 Triton kernels (unigemma/kernels_triton.py), one row and 8 rows,
  over weight copies larger than the L2 cache.
- `fuse`: the CUDA-graph step op by op, with the element-wise pieces compiled, and with fused q/k/v and gate/up
  products as well (model/fusion.py; the runner's default on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu  # noqa: E402  (benchmarks/gpu.py: build, GraphDecoder, bandwidth)
from unigemma.config import UnifiedConfig, gemma4_12b_config  # noqa: E402
from unigemma.quant import QuantLinear  # noqa: E402

LINES: list[dict] = []
DEVICE = "cpu"


def emit(**kw) -> None:
    kw.setdefault("device", DEVICE)
    LINES.append(kw)
    print(json.dumps(kw), flush=True)


def timed(fn, reps: int = 50) -> float:
    return gpu.per_call(fn, reps, warmup=3)


def prefilled(model, cfg, dev, prompt_len: int, max_len: int):
    """A one-slot cache holding a random prompt, and the next token to feed: (cache, tok (1, 1))."""
    V = cfg.text.vocab_size
    prompt = torch.randint(10, V, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    cache = model.make_cache(slots=1, max_len=max_len)
    model.run(prompt, position_ids=torch.arange(prompt_len, device=dev)[None], cache=cache,
              slots=torch.tensor([0], device=dev), logits_to_keep=1)
    return cache, torch.full((1, 1), 7, dtype=torch.long, device=dev)


@torch.inference_mode()
def sec_step(model, cfg, dev, prompt_len: int, max_len: int, top: int) -> None:
    cache, tok = prefilled(model, cfg, dev, prompt_len, max_len)

    def step(i):
        pos = torch.full((1, 1), prompt_len + i, dtype=torch.long, device=dev)
        return model.run(tok, position_ids=pos, cache=cache, kv_len=max_len).logits[:, -1].argmax(-1)

    for i in range(3):
        step(i)
    gpu.sync()
    steps = 4
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda"
                                                    else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(steps):
            step(3 + i)
        gpu.sync()
    # device kernels (CUDA) or top-level aten ops (CPU), per step
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    n_kernels, total_us = 0, 0.0
    for e in prof.events():
        if dev.type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.device_time
        else:
            if e.cpu_parent is not None or not e.name.startswith("aten::"):
                continue
            us = e.cpu_time
        per[e.name][0] += 1
        per[e.name][1] += us
        n_kernels += 1
        total_us += us
    emit(bench="profile", impl="unigemma", metric="kernels_per_step", value=n_kernels / steps, unit="count",
         layers=cfg.text.num_hidden_layers, what="CUDA kernels" if dev.type == "cuda" else "top-level aten ops")
    emit(bench="profile", impl="unigemma", metric="kernel_us_per_step", value=total_us / steps, unit="us",
         layers=cfg.text.num_hidden_layers)
    for name, (cnt, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        emit(bench="profile", impl="unigemma", metric="kernel_us", value=round(us / steps, 1), unit="us",
             kernel=name[:160], calls_per_step=cnt / steps, share=round(us / max(total_us, 1e-9), 4))
    if dev.type == "cuda":
        dec = gpu.GraphDecoder(model, cache, 1, max_len, tok, torch.full((1, 1), prompt_len + 10, device=dev))
        dt = timed(lambda: dec(tok, torch.full((1, 1), prompt_len + 10, device=dev)), reps=30)
        emit(bench="profile", impl="unigemma", metric="graph_step_us", value=dt * 1e6, unit="us",
             layers=cfg.text.num_hidden_layers)
        dt = timed(lambda: step(10), reps=10)
        emit(bench="profile", impl="unigemma-eager", metric="eager_step_us", value=dt * 1e6, unit="us",
             layers=cfg.text.num_hidden_layers)


def _graph_step_us(model, cfg, dev, prompt_len: int, max_len: int) -> float:
    cache, tok = prefilled(model, cfg, dev, prompt_len, max_len)
    pos = torch.full((1, 1), prompt_len, dtype=torch.long, device=dev)
    dec = gpu.GraphDecoder(model, cache, 1, max_len, tok, pos)
    return timed(lambda: dec(tok, pos), reps=30) * 1e6


@torch.inference_mode()
def sec_fuse(model, cfg, dev, prompt_len: int, max_len: int) -> None:
    """The CUDA-graph step (model.run) op by op, with the element-wise pieces compiled (model/fusion.py), and with
    those plus fused q/k/v and gate/up products (the runner's default on CUDA): what each change is worth."""
    from unigemma.model import fusion

    fusion.configure()
    for name, compiled, fused in (("op by op, separate products", False, False),
                                  ("compiled pieces, separate products", True, False),
                                  ("compiled pieces, fused products", True, True)):
        if fused:
            fusion.fuse_projections(model)
        else:
            fusion.unfuse(model)
        try:
            t0 = time.perf_counter()
            with fusion.active(compiled):
                us = _graph_step_us(model, cfg, dev, prompt_len, max_len)
            emit(bench="profile", impl="unigemma", metric="graph_step_us", value=round(us, 1), unit="us",
                 variant=name, layers=cfg.text.num_hidden_layers, wall_s=round(time.perf_counter() - t0, 1))
        except Exception as e:
            emit(bench="profile", impl="unigemma", metric="error", value=f"{type(e).__name__}: {e}"[:300], unit="",
                 variant=name)
    fusion.unfuse(model)


@torch.inference_mode()
def sec_matmul(cfg, dev, rows: list[int], bw: float | None) -> None:
    t = cfg.text
    H = t.hidden_size
    nh = t.num_attention_heads
    full = t.layer_types.index("full_attention")
    shapes = {"q_proj(sliding)": (nh * t.head_dim, H), "o_proj(full)": (H, nh * t.layer_head_dim[full]),
              "mlp.gate_proj": (t.layer_intermediate_size(0), H),
              "mlp.down_proj": (H, t.layer_intermediate_size(0)),
              "lm_head": (t.vocab_size, H)}
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (N, K) in shapes.items():
        w = (torch.randn(N, K, generator=g, device=dev) * K ** -0.5).to(torch.bfloat16)
        variants = {"bf16": None}
        kinds = {"int8": ["int8-triton", "int8"] if dev.type == "cuda" else ["int8"],
                 "int4": ["int4-cuda" if dev.type == "cuda" else "int4-cpu"]}
        for bits, gs in ((8, None), (4, 32)):
            for kind in kinds[f"int{bits}"] + [None]:
                q = QuantLinear.from_float(w, bits=bits, group_size=gs).to(dev)
                if kind is not None:
                    try:
                        q.prepare(_force=kind)
                    except Exception as e:  # not available here (no triton, op missing)
                        emit(bench="matmul", impl=kind, metric="error", value=f"{type(e).__name__}: {e}"[:300],
                             unit="", shape=name)
                        continue
                variants[kind or f"int{bits}-dequantize"] = q
        for M in rows:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            for vname, q in variants.items():
                fn = (lambda: F.linear(x, w)) if q is None else (lambda q=q: q(x))
                s = timed(fn, reps=50 if dev.type == "cuda" else 5)
                wbytes = N * K * 2 if q is None else sum(b.numel() * b.element_size() for b in q.buffers())
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                emit(bench="matmul", impl=vname, metric="us_per_call", value=round(s * 1e6, 2), unit="us",
                     shape=name, N=N, K=K, M=M, kernel=None if q is None else (q.kernel or "dequantize"),
                     weight_GBps=round(wbytes / s / 1e9, 1),
                     fraction_of_bandwidth=round(wbytes / s / bw, 3) if bw else None, rel_err=round(err, 4))


GEMV_CANDIDATES = [(16, 512, False, 4), (32, 512, False, 4), (8, 512, True, 4), (16, 512, True, 4),
                   (32, 256, True, 4), (8, 1024, False, 4), (16, 256, False, 4), (64, 256, False, 8),
                   (4, 1024, True, 4), (32, 1024, False, 8)]
MM_CANDIDATES = [(64, 128, 4), (32, 128, 4), (16, 256, 4), (32, 64, 4), (64, 64, 4), (128, 64, 8)]


@torch.inference_mode()
def sec_gemv(cfg, dev, bw: float | None) -> None:
    """The int8 Triton kernels' tile configurations, timed with CUDA events over copies of the weight that
    together exceed the L2 cache (what decode sees: every weight read from memory once per step)."""
    from unigemma import kernels_triton as kt
    from unigemma.quant import quantize_int8

    t = cfg.text
    H = t.hidden_size
    full = t.layer_types.index("full_attention")
    shapes = {"q_proj(sliding)": (t.num_attention_heads * t.head_dim, H),
              "o_proj(full)": (H, t.num_attention_heads * t.layer_head_dim[full]),
              "mlp.gate_proj": (t.layer_intermediate_size(0), H), "mlp.down_proj": (H, t.layer_intermediate_size(0)),
              "lm_head": (t.vocab_size, H)}

    def clock(fn, n: int, reps: int = 100) -> float:
        for i in range(5):
            fn(i % n)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(reps):
            fn(i % n)
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / reps * 1e3  # µs

    for name, (N, K) in shapes.items():
        copies = max(2, min(16, int(160e6 // (N * K)) + 1))
        ws, qs, ss = [], [], []
        for _ in range(copies):
            w = (torch.randn(N, K, device=dev) * K ** -0.5).to(torch.bfloat16)
            q, s_ = quantize_int8(w)
            ws.append(w)
            qs.append(q)
            ss.append(s_)
        for M in (1, 8):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            rows = [("bf16", None, clock(lambda i: F.linear(x, ws[i]), copies), N * K * 2)]
            cands = GEMV_CANDIDATES if M == 1 else MM_CANDIDATES
            for c in cands:
                fn = (lambda i, c=c: kt.w8_gemv(x, qs[i], ss[i], c)) if M == 1 else \
                     (lambda i, c=c: kt.w8_mm(x, qs[i], ss[i], c))
                try:
                    ref = (x.float() @ qs[0].float().t()) * ss[0].float()
                    err = ((fn(0).float() - ref).abs().max() / ref.abs().max()).item()
                    rows.append(("int8-triton", list(c), clock(fn, copies), N * K, err))
                except Exception as e:
                    emit(bench="gemv", impl="int8-triton", metric="error", value=f"{type(e).__name__}: {e}"[:200],
                         unit="", shape=name, config=list(c))
            if M == 1:
                cls = "small" if N <= 8192 else ("mid" if N <= 65536 else "large")
                for r in rows[1:]:
                    BEST.setdefault(cls, {}).setdefault(tuple(r[1]), 0.0)
                    BEST[cls][tuple(r[1])] += r[2]  # summed over the shapes of the class
            for r in rows:
                emit(bench="gemv", impl=r[0], metric="us_per_call", value=round(r[2], 2), unit="us", shape=name,
                     N=N, K=K, M=M, config=r[1], fraction_of_bandwidth=round(r[3] / (r[2] * 1e-6) / bw, 3)
                     if bw else None, rel_err=round(r[4], 4) if len(r) > 4 else None)
        del ws, qs, ss
        torch.cuda.empty_cache()


BEST: dict[str, dict[tuple, float]] = {}


@torch.inference_mode()
def sec_gemv_decode(cfg, dev, prompt_len: int, max_len: int) -> None:
    """int8 batch-1 decode (CUDA graph) of the given depth under each one-row kernel configuration set: the
    defaults, and the fastest per class from `sec_gemv`."""
    from unigemma import kernels_triton as kt
    from unigemma.quant import QuantConfig, quantize_model

    sets = {"default": dict(kt.GEMV_CONFIGS)}
    if BEST:
        sets["fastest"] = {c: min(v, key=v.get) for c, v in BEST.items()}
    sets["acc2d"] = {"small": (8, 512, True, 4), "mid": (16, 512, True, 4), "large": (32, 256, True, 4)}
    m = gpu.build(cfg, dev)
    V = cfg.text.vocab_size
    prompt = torch.randint(10, V, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    dt, _ = gpu.decode_run(m, prompt, 64, max_len, graph=True)
    emit(bench="gemv", impl="unigemma", metric="decode_tokens_per_s", value=round(64 / dt, 2), unit="tok/s",
         set="bf16", layers=cfg.text.num_hidden_layers)
    quantize_model(m, QuantConfig(bits=8))
    base = dict(kt.GEMV_CONFIGS)
    for name, conf in sets.items():
        kt.GEMV_CONFIGS.update(conf)
        dt, _ = gpu.decode_run(m, prompt, 64, max_len, graph=True)
        emit(bench="gemv", impl="unigemma-int8", metric="decode_tokens_per_s", value=round(64 / dt, 2),
             unit="tok/s", configs={k: list(v) for k, v in kt.GEMV_CONFIGS.items()}, set=name,
             layers=cfg.text.num_hidden_layers)
        kt.GEMV_CONFIGS.update(base)


def main(argv=None) -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, default=12, help="decoder layers of the 12B geometry built (default 12)")
    ap.add_argument("--sections", default="step,fuse,matmul")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--rows", default="1,8", help="M of the matmul section")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="folder: writes <date>-<device>-gpu-profile.jsonl")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    DEVICE = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    cfg = gpu.tiny_config() if a.tiny else gemma4_12b_config()
    if a.layers and not a.tiny:
        t = cfg.raw["text_config"]
        t["num_hidden_layers"] = a.layers
        t.pop("layer_types", None)
        cfg = UnifiedConfig.from_dict(cfg.raw)
    cfg.vision = cfg.audio = None
    prompt, max_len = (64, 256) if a.tiny else (a.prompt, a.max_len)
    emit(bench="env", impl="unigemma", metric="torch_version", value=torch.__version__, unit="",
         config=("tiny" if a.tiny else f"12b-{a.layers}layers"))
    secs = a.sections.split(",")
    bw = gpu.bandwidth(dev) if dev.type == "cuda" else None
    if "step" in secs:
        model = gpu.build(cfg, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        sec_step(model, cfg, dev, prompt, max_len, a.top)
        if "fuse" in secs:
            sec_fuse(model, cfg, dev, prompt, max_len)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "gemv" in secs and dev.type == "cuda":
        sec_gemv(cfg, dev, bw)
        sec_gemv_decode(cfg, dev, prompt, max_len)
    if "matmul" in secs:
        sec_matmul(cfg, dev, [int(r) for r in a.rows.split(",")], bw)
    if a.out:
        path = gpu.out_path(a.out, DEVICE, "profile")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(x) + "\n" for x in LINES), encoding="utf-8")
        print(f"# wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
