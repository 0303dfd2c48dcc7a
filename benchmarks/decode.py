"""Decode speed: unigemma's engine vs the reference `generate` vs the memory-bandwidth limit (JSON lines).

    python benchmarks/decode.py [--configs 50m,7m] [--prompt 512] [--new 128] [--threads N] [--quick]
                                [--quant int8,int4] [--demo]

For each config (random fp32 weights of the unified architecture, text only) it prints one JSON object per
measurement (DESIGN.md §6): `bench: "decode"`, `metric: "tokens_per_s"`, `impl` in unigemma / reference /
limit (and unigemma-lookup for prompt-lookup speculation), with `config`, `batch`, `prompt_tokens`,
`new_tokens`, `device`, `threads`. Decode rates exclude the prefill: they time tokens 2 … N of a request
(best of a few runs, since shared machines are noisy).

limit = measured read bandwidth (sum over a 512 MiB tensor, best of 5) ÷ weight bytes: the speed at which one
token's forward would do nothing but stream the weights once.

Configs: "50m" (hidden 512, 8 layers, one full layer in four, 8 heads / 4 KV heads, head_dim 64, full layers
head_dim 128 with k_eq_v, window 128, vocab 32768) and "7m" (hidden 256, 4 layers, 4 / 2 heads, vocab 8192).
Absolute numbers from shared CPUs are noise; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import unigemma  # noqa: E402
from unigemma.engine.generate import Engine, Request  # noqa: E402
from unigemma.engine.sampling import SamplingParams  # noqa: E402

CONFIGS = {
    "50m": dict(vocab_size=32768, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=128,
                layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2),
    "7m": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
               num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=128,
               layer_types=["sliding_attention"] * 3 + ["full_attention"]),
}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def device_name() -> str:
    return platform.processor() or platform.machine()


def read_bandwidth() -> float:
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MiB: far beyond any cache
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def build(name: str, root: Path):
    from transformers import Gemma4UnifiedForCausalLM, Gemma4UnifiedTextConfig

    cfg = Gemma4UnifiedTextConfig(**CONFIGS[name], final_logit_softcapping=30.0, max_position_embeddings=4096)
    torch.manual_seed(0)
    ref = Gemma4UnifiedForCausalLM(cfg).eval()
    path = root / name
    ref.save_pretrained(str(path))
    return ref, path


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (quantized weights are buffers), shared tensors once."""
    seen, n = set(), 0
    for p in list(model.parameters()) + [b for b in model.buffers() if b.dim() >= 1]:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def prompts(batch: int, n: int, vocab: int, repetitive: bool = False) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batch):
        if repetitive:
            unit = torch.randint(10, vocab, (32,), generator=g).tolist()
            out.append([2] + (unit * (n // 32 + 1))[: n - 1])
        else:
            out.append([2] + torch.randint(10, vocab, (n - 1,), generator=g).tolist())
    return out


class _Clock:
    """A `generate(streamer=...)` hook that timestamps every generated token (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def time_reference(ref, ids: list[list[int]], new: int, reps: int = 3) -> float:
    """Decode tokens/s of the reference generate: tokens 2 … new, timed between their arrivals, best of reps."""
    x = torch.tensor(ids)
    best = 0.0
    for _ in range(reps):
        clock = _Clock()
        kw = dict(streamer=clock) if len(ids) == 1 else {}
        t = time.perf_counter()
        ref.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, **kw)
        if len(ids) == 1:
            rate = (new - 1) / (clock.times[-1] - clock.times[1])
        else:  # streamers take batch 1 only: subtract a separately timed one-token generate (the prefill)
            total = time.perf_counter() - t
            t = time.perf_counter()
            ref.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False, eos_token_id=None)
            prefill = time.perf_counter() - t
            # a noisy machine can time the one-token run longer than the prefill inside the whole run: never let
            # the difference collapse (at most 95% of the run is counted as prefill)
            rate = len(ids) * (new - 1) / max(0.05 * total, total - prefill)
        best = max(best, rate)
    return best


def time_engine(engine: Engine, ids: list[list[int]], new: int, reps: int = 1) -> tuple[float, list]:
    """Decode tokens/s of the engine with all rows running together (timed from the step that gave the last
    request its first token to the end), best of reps."""
    best, outs = 0.0, []
    for _ in range(reps):
        reqs = [engine.add(Request(p, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)))
                for p in ids]
        started = set()
        t0, emitted = None, 0
        while engine.has_work:
            evs = engine.step()
            if t0 is None:
                for e in evs:
                    started.add(e.request_id)
                if len(started) == len(reqs):
                    t0 = time.perf_counter()
                continue
            emitted += sum(e.token_id is not None for e in evs)
        best = max(best, emitted / (time.perf_counter() - t0))
        outs = [engine.output(r) for r in reqs]
        for r in reqs:
            engine.forget(r)
    return best, outs


def _count_repacks() -> dict:
    """Count PackedLinear.repack calls from now on (until _restore_repacks)."""
    from unigemma.engine.runner import PackedLinear

    state = {"n": 0, "real": PackedLinear.repack}

    def counted(self):
        state["n"] += 1
        state["real"](self)

    PackedLinear.repack = counted
    return state


def _restore_repacks(state: dict) -> None:
    from unigemma.engine.runner import PackedLinear

    PackedLinear.repack = state["real"]


def run_config(name: str, args, root: Path, bw: float):
    common = dict(config=name, device=device_name(), threads=torch.get_num_threads(),
                  prompt_tokens=args.prompt, new_tokens=args.new)
    ref, path = build(name, root)
    llm = unigemma.load(path, device="cpu", dtype="float32")
    wb = weight_bytes(llm.model)
    emit(bench="decode", impl="limit", metric="tokens_per_s", value=bw / wb, unit="tok/s", batch=1,
         weight_bytes=wb, read_bytes_per_s=bw, **common)
    vocab = CONFIGS[name]["vocab_size"]
    max_len = args.prompt + args.new + 64

    def engine(spec=None, adaptive=True, slots=8, model=None, **kw):
        return Engine(model or llm.model, None, [], max_slots=slots, max_model_len=max_len, speculative=spec,
                      adaptive=adaptive, prefix_cache=False, **kw)

    repacks = _count_repacks()
    with torch.inference_mode():  # as the server runs the engine
        eng = engine()
        time_engine(eng, prompts(1, args.prompt, vocab), 8)  # warm-up
        time_engine(eng, prompts(2, args.prompt, vocab), 4)
        packed_once = repacks["n"]
        ours, outs1 = time_engine(eng, prompts(1, args.prompt, vocab), args.new, reps=3)
        emit(bench="decode", impl="unigemma", metric="tokens_per_s", value=ours, unit="tok/s", batch=1,
             ms_per_token=1e3 / ours, fraction_of_limit=ours / (bw / wb), target_fraction=0.85, **common)
        theirs = time_reference(ref, prompts(1, args.prompt, vocab), args.new)
        emit(bench="decode", impl="reference", metric="tokens_per_s", value=theirs, unit="tok/s", batch=1,
             ms_per_token=1e3 / theirs, **common)
        emit(bench="decode", impl="unigemma", metric="speedup_vs_reference", value=ours / theirs, unit="x",
             batch=1, **common)
        # greedy tokens must agree with the reference (fp32, same weights)
        x = torch.tensor(prompts(1, args.prompt, vocab))
        expected = ref.generate(x, max_new_tokens=32, do_sample=False, eos_token_id=None)[0, args.prompt:].tolist()
        n_cmp = min(32, args.new)
        emit(bench="correctness", impl="unigemma", metric="greedy_tokens_equal_reference",
             value=int(outs1[0].token_ids[:n_cmp] == expected[:n_cmp]), unit="bool", batch=1, tokens=n_cmp,
             **common)
        if not args.quick:
            ids8 = prompts(8, args.prompt, vocab)
            ours8, outs8 = time_engine(eng, ids8, args.new, reps=2)
            emit(bench="decode", impl="unigemma", metric="tokens_per_s", value=ours8, unit="tok/s", batch=8,
                 vs_batch1=ours8 / ours, target_vs_batch1=4.0, **common)
            theirs8 = time_reference(ref, ids8, args.new // 2, reps=2)
            emit(bench="decode", impl="reference", metric="tokens_per_s", value=theirs8, unit="tok/s", batch=8,
                 **{**common, "new_tokens": args.new // 2})
            emit(bench="decode", impl="unigemma", metric="speedup_vs_reference", value=ours8 / theirs8, unit="x",
                 batch=8, target=1.3, **common)
            # each row of the batch-8 run is the request run alone (fp32, greedy)
            n_cmp = min(24, args.new)
            alone = [time_engine(eng, [p], n_cmp)[1][0].token_ids for p in ids8[:3]]
            emit(bench="correctness", impl="unigemma", metric="greedy_batch8_rows_equal_batch1",
                 value=int(all(outs8[i].token_ids[:n_cmp] == alone[i] for i in range(3))), unit="bool", batch=8,
                 rows_checked=3, tokens=n_cmp, **common)
            # the packed (oneDNN) products of batched steps against plain nn.Linear ones
            plain_eng = engine(cpu_packed=False)
            _, outs_plain = time_engine(plain_eng, ids8[:4], 24)
            _, outs_packed = time_engine(eng, ids8[:4], 24)
            emit(bench="correctness", impl="unigemma", metric="greedy_packed_equals_plain",
                 value=int([o.token_ids for o in outs_plain] == [o.token_ids for o in outs_packed]), unit="bool",
                 batch=4, packed_weights=eng.runner.packed, **common)
        # a packed weight is packed once, however many steps run (it was packed again on every call under
        # inference mode before: 70% of a batch-8 step)
        emit(bench="decode", impl="unigemma", metric="repacks_after_warm_up", value=repacks["n"] - packed_once,
             unit="count", packed_weights=eng.runner.packed, target=0, **common)
        _restore_repacks(repacks)
        if args.quant:  # weight-only int8 / int4 at batch 1 and 8 against float, same prompts
            for q in args.quant.split(","):
                # the kernels compute in bf16 (an fp32 model would dequantize each weight on every call)
                qllm = unigemma.load(path, device="cpu", dtype=args.quant_dtype, quantize=q)
                qeng = engine(model=qllm.model)
                time_engine(qeng, prompts(1, args.prompt, vocab), 8)
                r1, _ = time_engine(qeng, prompts(1, args.prompt, vocab), args.new, reps=2)
                emit(bench="decode", impl=f"unigemma-{q}", metric="tokens_per_s", value=r1, unit="tok/s", batch=1,
                     vs_float=r1 / ours, weight_bytes=weight_bytes(qllm.model), dtype=args.quant_dtype,
                     kernels=sorted({m.kernel or "dequantize" for m in qllm.model.modules()
                                     if type(m).__name__ == "QuantLinear"}), **common)
                if not args.quick:
                    r8, _ = time_engine(qeng, prompts(8, args.prompt, vocab), args.new, reps=1)
                    emit(bench="decode", impl=f"unigemma-{q}", metric="tokens_per_s", value=r8, unit="tok/s",
                         batch=8, vs_float=r8 / ours8, vs_batch1=r8 / r1, **common)
                del qeng, qllm
        # prompt lookup on a repetitive prompt, against plain decoding of the same prompt
        rep = prompts(1, args.prompt, vocab, repetitive=True)
        plain, outs_p = time_engine(engine(None), rep, args.new, reps=2)
        for adaptive in (True, False):
            spec_eng = engine("lookup", adaptive=adaptive)
            fast, outs_s = time_engine(spec_eng, rep, args.new, reps=2)
            u = outs_s[0].usage
            emit(bench="decode", impl="unigemma-lookup" + ("" if adaptive else "-fixed"), metric="tokens_per_s",
                 value=fast, unit="tok/s", batch=1, speedup_vs_plain=fast / plain, plain_tokens_per_s=plain,
                 acceptance_rate=u.acceptance_rate, mean_accepted_length=u.mean_accepted_length,
                 drafted_tokens=u.drafted_tokens, identical_to_plain=int(outs_s[0].token_ids == outs_p[0].token_ids),
                 **common)


DEMO_PROMPTS = [  # long-ish answers of the kinds the demo model was trained on (thinking arithmetic, JSON, tools)
    ([{"role": "user", "content": "What is 47 + 38?"}], True),
    ([{"role": "user", "content": "What is 63 + 29?"}], True),
    ([{"role": "user", "content": "Give me a JSON object with a name and an age for a person called Ada."}], False),
    ([{"role": "user", "content": "What is 15 + 86?"}], True),
]


def run_demo(args):
    """Speculative decoding as served: the bundled demo model and its MTP drafter, Engines built and stepped under
    inference mode (as the server's worker runs them), plain vs MTP vs prompt lookup on the same greedy prompts;
    decode tokens/s summed over the prompts (time after each request's first token) and identical outputs."""
    llm = unigemma.load(None, device="cpu", dtype="float32")  # the bundled model and its bundled drafter
    assert llm.drafter is not None, "the bundled demo drafter is missing (unigemma/demo/drafter)"
    common = dict(config="demo", device=device_name(), threads=torch.get_num_threads(), decoding="greedy")
    prompts_ = [llm.build_prompt(m, enable_thinking=think).input_ids for m, think in DEMO_PROMPTS]
    n_new = 96
    with torch.inference_mode():
        engines = {name: Engine(llm.model, llm.tokenizer, llm.eos_token_ids, llm.drafter if name == "mtp" else None,
                                max_slots=1, max_model_len=1024, speculative=None if name == "plain" else name,
                                prefix_cache=False)
                   for name in ("plain", "mtp", "lookup")}
        for eng in engines.values():  # warm-up
            time_engine(eng, prompts_[:1], 8)
        tot = {k: [0, 0.0] for k in engines}
        outs = {k: [] for k in engines}
        for r in range(args.demo_rounds):
            for i, p in enumerate(prompts_):
                for name in list(engines)[(i + r) % 3:] + list(engines)[: (i + r) % 3]:  # rotate: drift hits all
                    eng = engines[name]
                    rid = eng.add(Request(p, SamplingParams(temperature=0.0, max_tokens=n_new)))
                    t0, first = None, 0
                    while eng.has_work:
                        evs = eng.step()
                        if t0 is None and any(e.token_id is not None for e in evs):
                            t0, first = time.perf_counter(), sum(e.token_id is not None for e in evs)
                    o = eng.output(rid)
                    eng.forget(rid)
                    tot[name][0] += len(o.token_ids) - first
                    tot[name][1] += time.perf_counter() - t0
                    if r == 0:
                        outs[name].append((o.token_ids, o.usage))
    rate = {k: n / s for k, (n, s) in tot.items()}
    for name in ("mtp", "lookup"):
        drafted = sum(u.drafted_tokens for _, u in outs[name])
        accepted = sum(u.accepted_tokens for _, u in outs[name])
        emit(bench="decode", impl=f"unigemma-{name}", metric="tokens_per_s", value=rate[name], unit="tok/s",
             batch=1, plain_tokens_per_s=rate["plain"], speedup_vs_plain=rate[name] / rate["plain"],
             acceptance_rate=accepted / drafted if drafted else None, drafted_tokens=drafted,
             identical_to_plain=int([t for t, _ in outs[name]] == [t for t, _ in outs["plain"]]),
             prompts=len(prompts_), rounds=args.demo_rounds, engine="built and stepped under inference_mode",
             **common)


# ------------------------------------------------------------------------------------------------------------
# CUDA: the 12B geometry with random bf16 weights (costs what the real weights cost), plus correctness checks
# ------------------------------------------------------------------------------------------------------------

def random_model(cfg, device, dtype, seed=0):
    """A Gemma4Unified (or drafter) with random weights, built on the meta device and filled in place."""
    from unigemma.config import AssistantConfig
    from unigemma.model.assistant import Gemma4Assistant
    from unigemma.model.unified import Gemma4Unified

    with torch.device("meta"):
        m = Gemma4Assistant(cfg) if isinstance(cfg, AssistantConfig) else Gemma4Unified(cfg)
    m = m.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=device) * p.shape[-1] ** -0.5)
        for n, b in m.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(1.0)
    if cfg.tie_word_embeddings:
        if isinstance(cfg, AssistantConfig):
            m.lm_head.weight = m.model.embed_tokens.weight
        else:
            m.lm_head.weight = m.model.language_model.embed_tokens.weight
    return m.to(dtype).eval()


def drafter_config(target_text: dict, hidden: int, layers: int, heads: int):
    from unigemma.config import AssistantConfig

    keep = ("vocab_size", "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
            "attention_k_eq_v", "sliding_window")
    tc = {k: target_text[k] for k in keep if k in target_text}
    tc.update(model_type="gemma4_unified_text", hidden_size=hidden, intermediate_size=4 * hidden,
              num_hidden_layers=layers, num_attention_heads=heads,
              layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    return AssistantConfig.from_dict({"model_type": "gemma4_unified_assistant", "text_config": tc,
                                      "backbone_hidden_size": target_text["hidden_size"]})


def run_cuda(args):
    from unigemma.config import UnifiedConfig, gemma4_12b_config

    dev = torch.device("cpu" if args.smoke else "cuda")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu-smoke"
    graph_modes = (False, True) if dev.type == "cuda" else (False,)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def tokens(engine, ids, new, **kw):
        reqs = [engine.add(Request(p, SamplingParams(max_tokens=new, ignore_eos=True, **kw))) for p in ids]
        engine.run_until_done()
        return [engine.output(r).token_ids for r in reqs]

    # correctness on a tiny fp32 geometry: CPU vs CUDA eager vs CUDA graphs, with and without speculation
    text = dict(model_type="gemma4_unified_text", vocab_size=4096, hidden_size=256, intermediate_size=512,
                num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=64, final_logit_softcapping=30.0)
    cfg = UnifiedConfig.from_dict(text)
    model = random_model(cfg, dev, torch.float32)
    drafter = random_model(drafter_config(text, 128, 2, 4), dev, torch.float32, seed=1)
    cpu_model = random_model(cfg, dev, torch.float32).cpu()
    ids = prompts(3, 100, 4096)
    runs = {}
    on = dev.type == "cuda"
    for label, m, kw in [("cpu", cpu_model, {}), ("eager", model, dict(cuda_graphs=False)),
                         ("graph", model, dict(cuda_graphs=on)),
                         ("graph-lookup", model, dict(speculative="lookup", adaptive=False)),
                         ("graph-mtp", model, dict(speculative="mtp", adaptive=False, num_draft_tokens=3))]:
        eng = Engine(m, None, [], drafter if "mtp" in label else None, max_slots=4, max_model_len=512,
                     **{"speculative": None, **kw})
        runs[label] = tokens(eng, ids, 96, temperature=0.0)
        runs[label + "-seeded"] = tokens(eng, ids, 48, temperature=0.8, seed=3)
    for label in ("eager", "graph", "graph-lookup", "graph-mtp"):
        emit(bench="correctness", impl="unigemma", metric=f"greedy_{label}_equals_cpu",
             value=int(runs[label] == runs["cpu"]), unit="bool", config="tiny", device=name)
        emit(bench="correctness", impl="unigemma", metric=f"seeded_{label}_equals_eager",
             value=int(runs[label + "-seeded"] == runs["eager-seeded"]), unit="bool", config="tiny", device=name)
    del model, drafter, cpu_model

    # speed on the 12B geometry (bf16)
    cfg = UnifiedConfig.from_dict(text) if args.smoke else gemma4_12b_config()
    model = random_model(cfg, dev, torch.bfloat16)
    wb = weight_bytes(model)
    x = torch.empty(1 << (24 if args.smoke else 30), dtype=torch.bfloat16, device=dev).normal_()
    x.sum()
    sync()
    t = time.perf_counter()
    for _ in range(20):
        x.sum()
    sync()
    bw = 2 * x.numel() * 20 / (time.perf_counter() - t)
    del x
    common = dict(config="tiny" if args.smoke else "12b", device=name, prompt_tokens=args.prompt,
                  new_tokens=args.new, dtype="bfloat16")
    emit(bench="decode", impl="limit", metric="tokens_per_s", value=bw / wb, unit="tok/s", batch=1,
         weight_bytes=wb, read_bytes_per_s=bw, **common)
    max_len = args.prompt + args.new + 64
    vocab = cfg.text.vocab_size
    for graphs in graph_modes:
        eng = Engine(model, None, [], max_slots=8, max_model_len=max_len, speculative=None, prefix_cache=False,
                     cuda_graphs=graphs)
        time_engine(eng, prompts(1, args.prompt, vocab), 8)
        tps, _ = time_engine(eng, prompts(1, args.prompt, vocab), args.new)
        emit(bench="decode", impl="unigemma" if graphs else "unigemma-eager", metric="tokens_per_s", value=tps,
             unit="tok/s", batch=1, cuda_graph=graphs, fraction_of_limit=tps / (bw / wb), **common)
        if graphs == graph_modes[-1]:
            time_engine(eng, prompts(8, args.prompt, vocab), 8)
            tps8, _ = time_engine(eng, prompts(8, args.prompt, vocab), args.new)
            emit(bench="decode", impl="unigemma", metric="tokens_per_s", value=tps8, unit="tok/s", batch=8,
                 cuda_graph=True, vs_batch1=tps8 / tps, **common)
    rep = prompts(1, args.prompt, vocab, repetitive=True)
    plain, out_p = time_engine(eng, rep, args.new)
    del eng
    spec_len = max(max_len, 2048)  # a ring shorter than the window would leave no room for rollback
    spec = Engine(model, None, [], max_slots=8, max_model_len=spec_len, speculative="lookup", prefix_cache=False)
    spec.runner.warm_up(1, tuple(range(1, spec.scheduler.controller.max_draft + 2)), max_len)
    fast, out_s = time_engine(spec, rep, args.new)
    u = out_s[0].usage
    emit(bench="decode", impl="unigemma-lookup", metric="tokens_per_s", value=fast, unit="tok/s", batch=1,
         speedup_vs_plain=fast / plain, acceptance_rate=u.acceptance_rate, drafted_tokens=u.drafted_tokens,
         identical_to_plain=int(out_s[0].token_ids == out_p[0].token_ids), **common)
    del spec
    # a random (useless) MTP drafter: adaptive drafting must notice and stop; fixed drafting shows the cost
    drafter = random_model(drafter_config(text if args.smoke else cfg.raw["text_config"], 1024, 4, 16), dev,
                           torch.bfloat16, seed=1)
    for adaptive in (True, False):
        spec = Engine(model, None, [], drafter, max_slots=8, max_model_len=spec_len, speculative="mtp",
                      prefix_cache=False, adaptive=adaptive, num_draft_tokens=4)
        spec.runner.warm_up(1, tuple(range(1, spec.scheduler.controller.max_draft + 2)), max_len)
        fast, out_s = time_engine(spec, prompts(1, args.prompt, vocab), args.new)
        u = out_s[0].usage
        c = spec.scheduler.controller
        emit(bench="decode", impl="unigemma-mtp-random-drafter" + ("" if adaptive else "-fixed"),
             metric="tokens_per_s", value=fast, unit="tok/s", batch=1, vs_plain=fast / tps,
             drafted_tokens=u.drafted_tokens, acceptance_rate=u.acceptance_rate,
             step_ms={f"{r}x{t}": round(v * 1e3, 3) for (r, t), v in sorted(c.step_cost.items())},
             draft_ms=round(c.draft_cost * 1e3, 3), **common)
        del spec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="50m,7m")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="skip the batch-8 measurements")
    ap.add_argument("--quant", default="int8,int4", help="weight-only variants also timed (empty: none)")
    ap.add_argument("--quant-dtype", default="bfloat16", help="compute dtype of the quantized variants (the CPU "
                    "int8 / int4 kernels run in bf16; float32 dequantizes every weight on every call)")
    ap.add_argument("--demo", action="store_true", help="also speculative decoding (MTP, prompt lookup) on the "
                    "bundled demo model, through Engine under inference mode")
    ap.add_argument("--demo-rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the 12B geometry in bf16 (random weights) and CUDA correctness checks")
    ap.add_argument("--smoke", action="store_true", help="run the --device cuda script on CPU with a tiny geometry")
    args = ap.parse_args()
    if args.device == "cuda" or args.smoke:
        torch.set_grad_enabled(False)
        run_cuda(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    bw = read_bandwidth()
    emit(bench="bandwidth", impl="limit", metric="read_bytes_per_s", value=bw, unit="B/s", device=device_name(),
         threads=torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            if name not in CONFIGS:
                raise ValueError(f"--configs: unknown config {name!r} (accepted: {', '.join(CONFIGS)})")
            run_config(name, args, Path(tmp), bw)
    if args.demo:
        run_demo(args)


if __name__ == "__main__":
    main()
