"""Block diffusion vs autoregressive decoding on the CPU, one run, same size and geometry (JSON lines).

    python benchmarks/diffusion.py [--hidden 256] [--layers 4] [--experts 8] [--top-k 2] [--canvas 256]
                                   [--tokens 512] [--prompt 64] [--steps 48] [--threads 1] [--repeats 2]

Two models with random fp32 weights built by unigemma (no reference involved), sharing one geometry: every layer
with the dense MLP beside the MoE block, k_eq_v full layers, 5:1 sliding / full layers:

    diffusion        `diffusion_gemma` through the DiffusionEngine (what llm.generate runs): prompt encoded once,
                     then canvases of --canvas tokens, each denoised for up to --steps steps (the reference's
                     schedule and sampler; defaults t 0.8 → 0.4, entropy_bound 0.1, stop when stable + confident)
    autoregressive   `gemma4_text` through the Engine (KV cache, one token per decode step, no drafting)

Lines: one per model with `tokens_per_s` (generated tokens ÷ wall time of the request, prompt included, best of
--repeats) and `forwards_per_token` (model forward passes ÷ generated tokens: denoiser passes + encoder passes —
the prompt and each finished canvas but the last — for diffusion; the prompt's forward + one decode step per further
token for autoregressive), and a `ratio` line. Random weights never make the
denoiser confident, so every canvas runs all --steps steps and the entropy bound accepts few tokens per step: this
measures the cost of the machinery at its worst, not a trained model's speed (which stops canvases early).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unigemma.config import DiffusionConfig, UnifiedConfig  # noqa: E402
from unigemma.engine.diffusion import DiffusionEngine, DiffusionOptions  # noqa: E402
from unigemma.engine.generate import Engine  # noqa: E402
from unigemma.engine.sampling import SamplingParams  # noqa: E402
from unigemma.engine.scheduler import Request  # noqa: E402
from unigemma.model.diffusion import DiffusionGemma  # noqa: E402
from unigemma.model.unified import Gemma4Unified  # noqa: E402


def emit(**kw):
    print(json.dumps(kw), flush=True)


def text_config(args) -> dict:
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                global_head_dim=64, num_global_key_value_heads=2, sliding_window=512, num_experts=args.experts,
                top_k_experts=args.top_k, moe_intermediate_size=args.hidden, max_position_embeddings=8192,
                final_logit_softcapping=30.0)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)


def build_diffusion(args) -> DiffusionGemma:
    cfg = DiffusionConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": args.canvas,
                                     "text_config": text_config(args)})
    m = DiffusionGemma(cfg).eval()
    randomize(m)
    return m


def build_autoregressive(args) -> Gemma4Unified:
    d = dict(model_type="gemma4_text", enable_moe_block=True, attention_k_eq_v=True,
             hidden_size_per_layer_input=0, **text_config(args))
    m = Gemma4Unified(UnifiedConfig.from_dict(d)).eval()
    randomize(m)
    return m


def run(engine, request_fn, repeats: int):
    best, out = float("inf"), None
    for r in range(repeats):
        req = request_fn(r)
        t = time.perf_counter()
        for _ in engine.generate_stream(req, forget=False):
            pass
        dt = time.perf_counter() - t
        o = engine.output(req.request_id)
        seq = engine.scheduler.seqs[req.request_id]
        if dt < best:
            best, out = dt, (o, seq)
        engine.forget(req.request_id)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    common = dict(device="cpu", threads=args.threads, torch=torch.__version__, cpu=platform.processor() or
                  platform.machine(), hidden=args.hidden, layers=args.layers, experts=args.experts,
                  top_k=args.top_k, vocab=args.vocab, prompt=args.prompt, max_tokens=args.tokens)
    prompt = torch.randint(3, args.vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    params = dict(max_tokens=args.tokens, ignore_eos=True)

    dm = build_diffusion(args)
    opts = DiffusionOptions.resolve({}, max_denoising_steps=args.steps)
    deng = DiffusionEngine(dm, None, [], max_slots=1, max_model_len=args.prompt + args.tokens + args.canvas)
    dt, (o, seq) = run(deng, lambda r: Request(list(prompt), SamplingParams(seed=r, **params), diffusion=opts),
                       args.repeats)
    n = len(o.token_ids)
    canvases = -(-n // args.canvas)
    forwards = seq.denoiser_passes + canvases  # + the prompt's encoder pass and one per finished canvas but the last
    d_tps = n / dt
    emit(**common, model="diffusion", canvas_length=args.canvas, max_denoising_steps=args.steps,
         tokens=n, seconds=round(dt, 3), tokens_per_s=round(d_tps, 2), denoiser_passes=seq.denoiser_passes,
         forwards_per_token=round(forwards / n, 4), tokens_per_denoiser_pass=round(n / seq.denoiser_passes, 3))
    del deng, dm

    am = build_autoregressive(args)
    aeng = Engine(am, None, [], max_slots=1, max_model_len=args.prompt + args.tokens + 1, speculative=None,
                  prefix_cache=False)
    dt_a, (o, _) = run(aeng, lambda r: Request(list(prompt), SamplingParams(seed=r, **params), speculate=False),
                       args.repeats)
    n = len(o.token_ids)
    a_tps = n / dt_a
    emit(**common, model="autoregressive", tokens=n, seconds=round(dt_a, 3), tokens_per_s=round(a_tps, 2),
         forwards_per_token=round(n / n, 4))  # the prompt's forward (first token) + n − 1 decode steps
    emit(**common, model="ratio", diffusion_over_autoregressive_tokens_per_s=round(d_tps / a_tps, 3))


if __name__ == "__main__":
    main()
