"""Decode speed of weight-only quantized models: float vs int8 vs int4 in one run (JSON lines, DESIGN.md §6).

    python benchmarks/quant.py                         # CPU: an ~100M-parameter config, bf16 compute
    python benchmarks/quant.py --device cuda           # GPU: the published 12B geometry, random bf16 weights
    python benchmarks/quant.py --device cuda --layers 8   # reduced depth (per-layer cost is the same)

Each variant is the same random model: `unigemma` (float), `unigemma-int8` (per-channel), `unigemma-int4`
(group 32, symmetric); the embedding / LM head table is int8 in both quantized variants. The decode loop is
`model.run` with a preallocated cache, one token per step (T = 1), greedy; on CUDA the step is captured in a
CUDA graph. Rates exclude the prefill. Rounds alternate between variants so machine noise hits all of them; the
reported value is the median round (`best` is the fastest). Also printed: `limit` = measured read bandwidth ÷ the
variant's resident weight bytes (the speed of a step that only streams its weights once), and the top-1
agreement of each quantized variant with the float model on the prompt (teacher-forced), as a sanity check.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unigemma.config import UnifiedConfig, gemma4_12b_config  # noqa: E402
from unigemma.model.unified import Gemma4Unified  # noqa: E402
from unigemma.quant import QuantConfig, quantize_model  # noqa: E402

S, F = "sliding_attention", "full_attention"
# ~100M parameters: 75M in 8 decoder layers (the 12B's shape ratios: k_eq_v full layers with their own head_dim
# and one KV head) + a 25M-parameter tied embedding.
CPU_CONFIG = {"model_type": "gemma4_unified", "text_config": {
    "vocab_size": 32768, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "global_head_dim": 256,
    "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 512,
    "final_logit_softcapping": 30.0, "layer_types": [S, S, S, F] * 2}}
VARIANTS = {"unigemma": None, "unigemma-int8": QuantConfig(bits=8), "unigemma-int4": QuantConfig(bits=4, group_size=32)}
DEVICE_NAME = "cpu"


def emit(**kw) -> None:
    kw.setdefault("device", DEVICE_NAME)
    print(json.dumps(kw), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(cfg: UnifiedConfig, device: torch.device, dtype=torch.bfloat16, seed: int = 0) -> Gemma4Unified:
    """Random weights at trained-like scales, made directly on the device in `dtype` (one float32 tensor at a
    time as a temporary: a 12B model never exists in float32)."""
    with torch.device("meta"):
        m = Gemma4Unified(cfg).to(dtype)
    m = m.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
                if n.endswith(("q_norm.weight", "k_norm.weight")):
                    p.mul_(p.shape[0] ** -0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * p.shape[-1] ** -0.5)
        for n, b in m.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(1.0)
    m.lm_head.weight = m.model.language_model.embed_tokens.weight
    return m.eval()


def resident_bytes(model) -> int:
    ts = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in ts.values())


def bandwidth(device: torch.device) -> float:
    """Bytes/s of streaming a large tensor once (a reduction): what a decode step is bound by."""
    n = (2 << 30) if device.type == "cuda" else (512 << 20)
    x = torch.ones(n // 2, dtype=torch.bfloat16, device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return n / best


class Decoder:
    """Greedy T = 1 steps against one cache; on CUDA the step is captured once in a CUDA graph."""

    def __init__(self, model, prompt: torch.Tensor, max_len: int, graph: bool):
        self.model, self.max_len = model, max_len
        dev = prompt.device
        B, P = prompt.shape
        self.cache = model.make_cache(B, max_len)
        with torch.inference_mode():
            out = model.run(prompt, position_ids=torch.arange(P, device=dev)[None].expand(B, P), cache=self.cache,
                            kv_len=P, logits_to_keep=1)
        self.tok = out.logits[:, -1].argmax(-1, keepdim=True)
        self.pos = torch.full((B, 1), P, dtype=torch.long, device=dev)
        self.graph = None
        if graph:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode():
                for _ in range(2):  # warm-up writes the K/V the first real step writes anyway (same token, position)
                    self._step()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.inference_mode():
                self.out = self._step()

    def _step(self) -> torch.Tensor:
        return self.model.run(self.tok, position_ids=self.pos, cache=self.cache,
                              kv_len=self.max_len).logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def run(self, steps: int) -> float:
        """Seconds for `steps` decode steps (positions continue from where the last call stopped)."""
        dev = self.tok.device
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
                nxt = self.out
            else:
                nxt = self._step()
            self.tok.copy_(nxt)
            self.pos += 1
        sync(dev)
        return time.perf_counter() - t


def main() -> None:
    global DEVICE_NAME
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, choices=["cpu-100m", "12b"],
                    help="geometry (default: cpu-100m on CPU, the published 12b on CUDA)")
    ap.add_argument("--layers", type=int, default=None, help="reduce the depth of the 12b geometry")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens prefilled before decoding")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    DEVICE_NAME = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if (args.config or ("12b" if device.type == "cuda" else "cpu-100m")) == "12b":
        cfg, name = gemma4_12b_config(), "12b"
        if args.layers:
            t = cfg.raw["text_config"]
            t["num_hidden_layers"] = args.layers
            t.pop("layer_types", None)
            cfg, name = UnifiedConfig.from_dict(cfg.raw), f"12b-{args.layers}layers"
        cfg.vision = cfg.audio = None
    else:
        cfg, name = UnifiedConfig.from_dict(CPU_CONFIG), "cpu-100m"
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)} (accepted: {', '.join(VARIANTS)})")
    common = dict(config=name, batch=args.batch, prompt_tokens=args.prompt, new_tokens=args.new_tokens,
                  threads=torch.get_num_threads() if device.type == "cpu" else None)
    bw = bandwidth(device)
    emit(bench="bandwidth", impl="limit", metric="read_bytes_per_s", value=bw, unit="B/s", config=name)

    torch.manual_seed(0)
    V = cfg.text.vocab_size
    prompt = torch.randint(10, V, (args.batch, args.prompt), device=device)
    max_len = args.prompt + args.rounds * args.new_tokens + 8
    graph = device.type == "cuda"
    decoders, ref_logits = {}, None
    float_model = build(cfg, device) if device.type == "cpu" else None
    for impl in variants:
        # On CUDA the 12B model is rebuilt per variant (same seed: the same weights) rather than copied, so at
        # most one extra float copy exists while a variant is being quantized.
        model = copy.deepcopy(float_model) if float_model is not None else build(cfg, device)
        qc = VARIANTS[impl]
        t = time.perf_counter()
        if qc is not None:
            quantize_model(model, qc)
        quant_s = time.perf_counter() - t
        with torch.inference_mode():
            logits = model(prompt[:1]).float()
        if impl == "unigemma":
            ref_logits = logits.argmax(-1)
        elif ref_logits is not None:
            emit(bench="correctness", impl=impl, metric="top1_agreement_vs_float", unit="fraction",
                 value=(logits.argmax(-1) == ref_logits).float().mean().item(), config=name, tokens=args.prompt)
        wbytes = resident_bytes(model)
        emit(bench="decode", impl=f"limit:{impl}", metric="tokens_per_s", value=args.batch * bw / wbytes,
             unit="tok/s", weight_bytes=wbytes, quantize_s=quant_s, **common)
        decoders[impl] = (model, Decoder(model, prompt, max_len, graph))
        if device.type == "cuda":  # keep only the decoder's model; free the construction temporaries
            torch.cuda.empty_cache()
    times: dict[str, list[float]] = {impl: [] for impl in variants}
    for _ in range(args.rounds):
        for impl in variants:
            times[impl].append(decoders[impl][1].run(args.new_tokens))
    for impl in variants:
        rates = [args.batch * args.new_tokens / dt for dt in times[impl]]
        emit(bench="decode", impl=impl, metric="tokens_per_s", value=statistics.median(rates), best=max(rates),
             unit="tok/s", cuda_graph=graph, weight_bytes=resident_bytes(decoders[impl][0]), **common)


if __name__ == "__main__":
    main()
