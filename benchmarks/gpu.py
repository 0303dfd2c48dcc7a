"""GPU benchmark (issue 9): the 12B geometry with random bf16 weights — the cost equals the real model's.

Prints one JSON object per line (DESIGN.md §6). Measured in one run: memory bandwidth (→ the decode limit), unigemma
decode (eager and with the decode step captured in a CUDA graph) at batch 1/8/32, prefill of 2,048 tokens, the
reference (`transformers` generate) decode on the same weights, and correctness checks (greedy tokens eager vs graph;
bf16 logits vs the reference, top-1 agreement).

    python benchmarks/gpu.py                 # on a CUDA machine
    python benchmarks/gpu.py --tiny          # a small geometry, runs on CPU too (smoke test)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unigemma.config import UnifiedConfig, gemma4_12b_config
from unigemma.model.unified import Gemma4Unified

RESULTS: list[dict] = []


def emit(**kw):
    kw.setdefault("device", DEVICE_NAME)
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tiny_config() -> UnifiedConfig:
    return UnifiedConfig.from_dict({"model_type": "gemma4_unified", "text_config": {
        "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "global_head_dim": 128,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 64,
        "final_logit_softcapping": 30.0}})


def build(cfg: UnifiedConfig, device, dtype=torch.bfloat16, seed=0) -> Gemma4Unified:
    with torch.device("meta"):
        m = Gemma4Unified(cfg)
    m = m.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * (p.shape[-1] ** -0.5))
        for n, b in m.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(1.0)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.language_model.embed_tokens.weight
    return m.to(dtype).eval()


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


def main():
    global DEVICE_NAME
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="reduce depth (figures scale per layer)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--compile", action="store_true", help="also measure the inductor-compiled decode step")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    DEVICE_NAME = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    cfg = tiny_config() if args.tiny else gemma4_12b_config()
    if args.layers:
        t = cfg.raw["text_config"]
        t["num_hidden_layers"] = args.layers
        t.pop("layer_types", None)
        cfg = UnifiedConfig.from_dict(cfg.raw)
    cfg.vision = cfg.audio = None
    name = "tiny" if args.tiny else ("12b" if not args.layers else f"12b-{args.layers}layers")
    torch.manual_seed(0)

    bw = bandwidth(device)
    emit(bench="bandwidth", impl="limit", metric="read_bytes_per_s", value=bw, unit="B/s", config=name)
    model = build(cfg, device)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # decode reads every weight once per token (the tied LM head is the embedding table: counted once)
    limit_tps = bw / wbytes
    emit(bench="decode", impl="limit", metric="tokens_per_s", value=limit_tps, unit="tok/s", batch=1, config=name,
         weight_bytes=wbytes)

    V = cfg.text.vocab_size
    prompt = torch.randint(10, V, (1, args.prompt), device=device)
    max_len = args.prompt + args.new_tokens + 8
    dt, toks_eager = decode_run(model, prompt, args.new_tokens, max_len, graph=False)
    emit(bench="decode", impl="unigemma-eager", metric="tokens_per_s", value=args.new_tokens / dt, unit="tok/s",
         batch=1, config=name, prompt_tokens=args.prompt, new_tokens=args.new_tokens)
    if device.type == "cuda":
        dt, toks_graph = decode_run(model, prompt, args.new_tokens, max_len, graph=True)
        emit(bench="decode", impl="unigemma", metric="tokens_per_s", value=args.new_tokens / dt, unit="tok/s",
             batch=1, config=name, prompt_tokens=args.prompt, new_tokens=args.new_tokens, cuda_graph=True,
             fraction_of_limit=(args.new_tokens / dt) / limit_tps)
        same = int((toks_eager == toks_graph).all().item())
        emit(bench="correctness", impl="unigemma", metric="greedy_eager_equals_graph", value=same, unit="bool",
             config=name, new_tokens=args.new_tokens)
        if args.compile:
            t0 = time.perf_counter()
            dt, toks_comp = decode_run(model, prompt, args.new_tokens, max_len, graph=True, compile=True)
            emit(bench="decode", impl="unigemma-compiled", metric="tokens_per_s", value=args.new_tokens / dt,
                 unit="tok/s", batch=1, config=name, cuda_graph=True, compile_s=time.perf_counter() - t0 - dt,
                 fraction_of_limit=(args.new_tokens / dt) / limit_tps)
            emit(bench="correctness", impl="unigemma-compiled", metric="greedy_matches_eager_tokens",
                 value=(toks_eager == toks_comp).float().mean().item(), unit="fraction", config=name)
        for b in [int(x) for x in args.batches.split(",") if int(x) > 1]:
            bp = prompt.expand(b, -1)[:1]
            dt, _ = decode_run(model, bp, args.new_tokens, max_len, graph=True, batch=b)
            emit(bench="decode", impl="unigemma", metric="tokens_per_s", value=b * args.new_tokens / dt,
                 unit="tok/s", batch=b, config=name, cuda_graph=True)

    # prefill
    with torch.inference_mode():
        for n in (2048,):
            ids = torch.randint(10, V, (1, n), device=device)
            cache = model.make_cache(slots=1, max_len=n + 8)
            model.run(ids[:, :128], position_ids=torch.arange(128, device=device)[None], cache=cache, logits_to_keep=1)
            sync()
            cache = model.make_cache(slots=1, max_len=n + 8)
            t = time.perf_counter()
            model.run(ids, position_ids=torch.arange(n, device=device)[None], cache=cache, logits_to_keep=1)
            sync()
            dt = time.perf_counter() - t
            flops = 2 * wbytes / 2 * n  # ≈ 2 · params · tokens (attention extra not counted)
            emit(bench="prefill", impl="unigemma", metric="tokens_per_s", value=n / dt, unit="tok/s",
                 prompt_tokens=n, config=name, ms=dt * 1e3, tflops=flops / dt / 1e12)

    if not args.no_reference:
        reference(model, cfg, prompt, args, name, device)


def reference(model, cfg, prompt, args, name, device):
    try:
        from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration
    except ImportError as e:
        emit(bench="decode", impl="reference", metric="error", value=str(e), unit="", config=name)
        return
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
    ref = ref.to(device).eval()
    with torch.inference_mode():
        a = ref(input_ids=prompt[:, :256]).logits.argmax(-1)
        b = model(prompt[:, :256]).argmax(-1)
        emit(bench="correctness", impl="unigemma", metric="bf16_top1_agreement_vs_reference",
             value=(a == b).float().mean().item(), unit="fraction", config=name, tokens=256)
        n = min(args.new_tokens, 32)
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
        emit(bench="decode", impl="reference", metric="tokens_per_s", value=(n - 1) / dt, unit="tok/s", batch=1,
             config=name, prompt_tokens=args.prompt, new_tokens=n)


DEVICE_NAME = "cpu"
if __name__ == "__main__":
    main()
