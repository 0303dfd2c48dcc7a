"""MoE decode speed on the CPU: a mixture-of-experts model vs dense models with the same total and the same
active weights, and bytes read per token vs the active-weights limit (JSON lines, DESIGN.md §6).

    python benchmarks/moe.py [--hidden 512] [--layers 4] [--experts 32] [--top-k 4] [--expert-size 256]
                             [--dense-size 512] [--steps 32] [--batch 1,4] [--threads N] [--quick]
                             [--quant int8,int4]

Three `gemma4_text` models with random fp32 weights, built by unigemma (no reference involved), each decoding
through the ModelRunner and its KV cache after a 64-token prefill:

    moe          the MoE layer: dense MLP of --dense-size beside E experts of --expert-size, top-k per token
    dense-total  a dense MLP of --dense-size + E·--expert-size: the same weights in total
    dense-active a dense MLP of --dense-size + k·--expert-size: the same weights read per token

Lines: `metric: "tokens_per_s"` per model and batch (best of 3 timed runs of --steps steps; shared machines are
noisy), `metric: "bytes_per_token"` for the MoE at batch 1 — the weight bytes its decode steps read (every
non-expert weight + the distinct experts the router chose in each layer, counted from the router's choices) vs
the active-weight bytes (non-expert + k experts per layer) — and `impl: "limit"` = measured read bandwidth ÷
active bytes (the speed of a step that only streams the active weights once). Compare ratios within one run.

--quant int8,int4: the MoE model also in bf16 (the CPU weight-only kernels' compute dtype) and quantized from it,
experts included (`quant.QuantExperts`): `impl` moe-bf16 / moe-int8 / moe-int4, with their weight bytes and the
kernel the experts run.
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

from unigemma.config import UnifiedConfig  # noqa: E402
from unigemma.engine.runner import ModelRunner  # noqa: E402
from unigemma.model.unified import Gemma4Unified  # noqa: E402


def emit(**kw):
    print(json.dumps(kw), flush=True)


def read_bandwidth() -> float:
    x = torch.ones(64 * 1024 * 1024, dtype=torch.float32)  # 256 MiB
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def build(args, kind: str) -> Gemma4Unified:
    d = dict(model_type="gemma4_text", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
             num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=128,
             hidden_size_per_layer_input=0, final_logit_softcapping=30.0,
             layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * (args.layers // 4)
             + ["full_attention"] * (args.layers % 4))
    if kind == "moe":
        d.update(intermediate_size=args.dense_size, enable_moe_block=True, num_experts=args.experts,
                 top_k_experts=args.top_k, moe_intermediate_size=args.expert_size)
    elif kind == "dense-total":
        d.update(intermediate_size=args.dense_size + args.experts * args.expert_size)
    else:
        d.update(intermediate_size=args.dense_size + args.top_k * args.expert_size)
    cfg = UnifiedConfig.from_dict(d, kind)
    torch.manual_seed(0)
    model = Gemma4Unified(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (1.0 / max(1, p.shape[-1]) ** 0.5) if "norm" not in n
                    else 1 + 0.1 * torch.randn(p.shape))
    return model


def held_bytes(model) -> int:
    """Bytes of every parameter and buffer (quantized tensors are buffers); a tied table counted once."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def weight_bytes(model) -> tuple[int, int, int]:
    """(all weight bytes, expert bytes, bytes of one expert in one layer)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    layers = [l for l in model.language_model.layers if getattr(l, "has_moe", False)]
    one = 0
    if layers:
        e = layers[0].experts
        one = (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) * e.gate_up_proj.element_size()
    return total, experts, one


def decode_rate(model, batch: int, steps: int, prompt: int = 64, record=None) -> float:
    runner = ModelRunner(model, max_slots=batch, max_model_len=prompt + steps + 8, spare=8)
    g = torch.Generator().manual_seed(1)
    for s in range(batch):
        runner.prefill_chunk(s, torch.randint(3, model.config.text.vocab_size, (prompt,), generator=g).tolist(),
                             0, prompt, need_logits=False)
    tok = torch.randint(3, model.config.text.vocab_size, (batch, 1), generator=g)
    best = float("inf")
    for run in range(3):
        for s in range(batch):
            runner.cache.truncate(s, prompt)
        t = time.perf_counter()
        for i in range(steps):
            pos = torch.full((batch, 1), prompt + i)
            logits, _ = runner.decode(tok, pos, kv_len=prompt + i + 1)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            if record is not None and run == 0:
                record.append(None)  # step marker
        best = min(best, time.perf_counter() - t)
    return batch * steps / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-size", type=int, default=256)
    ap.add_argument("--dense-size", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, 4 steps")
    ap.add_argument("--quant", default="", help="comma-separated: int8, int4 (bf16 MoE models, experts quantized)")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.experts, args.top_k, args.expert_size, args.dense_size = 64, 4, 8, 2, 32, 64
        args.vocab, args.steps, args.batch = 256, 4, "1,2"
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    common = dict(bench="moe_decode", device=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), hidden=args.hidden, layers=args.layers, experts=args.experts,
                  top_k=args.top_k, expert_size=args.expert_size, dense_size=args.dense_size)
    bw = read_bandwidth()
    with torch.inference_mode():
        models = {k: build(args, k) for k in ("moe", "dense-total", "dense-active")}
        sizes = {k: weight_bytes(m) for k, m in models.items()}
        total, experts, one = sizes["moe"]
        moe_layers = [l for l in models["moe"].language_model.layers if l.has_moe]
        active = total - experts + len(moe_layers) * args.top_k * one
        for k in models:
            emit(**common, metric="weight_bytes", impl=k, value=sizes[k][0])
        # bytes the MoE's batch-1 steps read: count the distinct experts the router picks per layer and step
        chosen: list[int] = []
        hooks = [l.router.register_forward_hook(lambda m, i, o: chosen.append(int(o[1].unique().numel())))
                 for l in moe_layers]
        decode_rate(models["moe"], 1, args.steps)
        for h in hooks:
            h.remove()
        per_step = len(moe_layers)
        steps = [chosen[i:i + per_step] for i in range(0, len(chosen), per_step)]
        decode_steps = steps[-3 * args.steps:]  # the timed decode steps (the prefill's forward comes first)
        read = sum(total - experts + sum(s) * one for s in decode_steps) / max(1, len(decode_steps))
        emit(**common, metric="bytes_per_token", impl="moe", batch=1, value=int(read), active_bytes=int(active),
             total_bytes=int(total), ratio_to_active=round(read / active, 4))
        emit(**common, metric="read_bandwidth", impl="machine", value=int(bw))
        for b in batches:
            for k, m in models.items():
                emit(**common, metric="tokens_per_s", impl=k, batch=b, value=round(decode_rate(m, b, args.steps), 2))
        emit(**common, metric="tokens_per_s", impl="limit", batch=1, value=round(bw / active, 2),
             note="read bandwidth / active weight bytes")
        if args.quant:
            import copy

            from unigemma.quant import quantize_model

            bf16 = copy.deepcopy(models["moe"]).to(torch.bfloat16)
            variants = {"moe-bf16": bf16}
            for q in [q for q in args.quant.split(",") if q]:
                variants[f"moe-{q}"] = quantize_model(copy.deepcopy(bf16), q)
            for k, m in variants.items():
                gu = moe_layers and m.language_model.layers[0].experts.gate_up_proj
                emit(**common, metric="weight_bytes", impl=k, value=held_bytes(m),
                     expert_kernel=getattr(gu, "kernel", None))
            for b in batches:
                for k, m in variants.items():
                    emit(**common, metric="tokens_per_s", impl=k, batch=b,
                         value=round(decode_rate(m, b, args.steps), 2))


if __name__ == "__main__":
    main()
