"""Speculative decoding for the family on the CPU: what a draft costs and what verification costs (JSON lines).

    python benchmarks/family_spec.py [--ctx 256] [--reps 40] [--tokens 96] [--threads N] [--quick]

Random-weight `gemma4_text` models built by unigemma (acceptance is not the point: the weights are random):

    target   31B-style dense (k_eq_v full layers), hidden 512, 8 layers, vocab 8192
    draft    E2B-style (per-layer inputs, KV sharing), hidden 128, 4 layers, the same vocabulary
    mtp      a `gemma4_assistant` drafter of the target (1 sliding + 1 full layer, width 128, reads its K/V)

Lines (`bench: "family_spec"`):
    step_ms        impl target (T = 1, 3, 5: a plain step and verifying 2 / 4 drafts), draft (T = 1), mtp (one
                   drafter step on the target's K/V), median of interleaved repetitions at context --ctx, with the
                   ratio to the target's plain step
    tokens_per_s   generate through the engine, greedy: plain, oracle (a proposer that drafts the plain output:
                   every draft right, no draft cost — the ceiling), draft (the draft model: mostly wrong drafts,
                   the overhead case), mtp (likewise); each speculative run is checked to give the plain tokens
Compare ratios within one run; shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unigemma.config import AssistantConfig, UnifiedConfig  # noqa: E402
from unigemma.engine.generate import Engine, Request  # noqa: E402
from unigemma.engine.runner import ModelRunner  # noqa: E402
from unigemma.engine.sampling import SamplingParams  # noqa: E402
from unigemma.model.assistant import Gemma4Assistant  # noqa: E402
from unigemma.model.unified import Gemma4Unified  # noqa: E402

S, F = "sliding_attention", "full_attention"


def emit(**kw):
    print(json.dumps(kw), flush=True)


def randomize(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("scale"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return model.eval()


def build(a):
    common = dict(model_type="gemma4_text", vocab_size=a.vocab, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=64, global_head_dim=128, num_global_key_value_heads=1, attention_k_eq_v=True,
                  sliding_window=128, final_logit_softcapping=30.0, hidden_size_per_layer_input=0)
    target = dict(common, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                  layer_types=([S] * 3 + [F]) * (a.layers // 4))
    draft = dict(common, hidden_size=128, intermediate_size=512, num_hidden_layers=4, layer_types=[S, F, S, F],
                 num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size_per_layer_input=a.vocab,
                 attention_k_eq_v=False, num_key_value_heads=1, global_head_dim=64)
    mtp = {"model_type": "gemma4_assistant", "backbone_hidden_size": a.hidden,
           "text_config": dict(common, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                               layer_types=[S, F], final_logit_softcapping=None)}
    torch.manual_seed(0)
    return (randomize(Gemma4Unified(UnifiedConfig.from_dict(target)), 1),
            randomize(Gemma4Unified(UnifiedConfig.from_dict(draft)), 2),
            randomize(Gemma4Assistant(AssistantConfig.from_dict(mtp)), 3))


class Oracle:
    name = "oracle"

    def __init__(self, full: list[int]):
        self.full = full

    def propose(self, seqs, k):
        return [self.full[len(s.tokens):len(s.tokens) + k] for s in seqs]


def step_times(target, draft, mtp, ctx: int, reps: int) -> dict[str, float]:
    tr = ModelRunner(target, 1, ctx + 16)
    dr = ModelRunner(draft, 1, ctx + 16)
    ids = torch.randint(3, target.config.text.vocab_size, (ctx,), generator=torch.Generator().manual_seed(4)).tolist()
    tr.prefill_chunk(0, ids, 0, ctx, need_logits=False)
    dr.prefill_chunk(0, ids, 0, ctx, need_logits=False)
    t = target.config.text
    shared, masks = {}, {}
    for lt in (S, F):
        lk = tr.cache.layers[t.store_layer(lt)]
        L = lk.k.shape[2] if lt == S else ctx  # the ring, or the positions so far
        shared[lt] = (lk.k[:1, :, :L], lk.v[:1, :, :L])
        masks[lt] = torch.ones(1, L, dtype=torch.bool)
    x = torch.randn(1, 1, 2 * t.hidden_size)
    runs = {f"target T={T}": (lambda T=T: tr.decode(torch.full((1, T), 5), torch.arange(ctx, ctx + T)[None],
                                                    kv_len=ctx + T)) for T in (1, 3, 5)}
    runs["draft T=1"] = lambda: dr.decode(torch.full((1, 1), 5), torch.tensor([[ctx]]), kv_len=ctx + 1)
    runs["mtp step"] = lambda: mtp(x, torch.tensor([[ctx]]), shared, masks)
    times = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(reps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def generate(target, drafter, spec, prompt, n, k):
    eng = Engine(target, None, [], drafter, max_slots=1, max_model_len=len(prompt) + n + 32, speculative=spec,
                 adaptive=False, num_draft_tokens=k)
    best, out = float("inf"), None
    for _ in range(2):
        rid = eng.add(Request(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)))
        t0 = time.perf_counter()
        res = eng.run_until_done()[rid]
        best = min(best, time.perf_counter() - t0)
        out = res
    return n / best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small sizes, few repetitions")
    a = ap.parse_args(argv)
    if a.quick:
        a.ctx, a.reps, a.tokens, a.hidden, a.layers, a.vocab = 64, 3, 12, 128, 4, 512
    if a.threads:
        torch.set_num_threads(a.threads)
    common = dict(bench="family_spec", device=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), hidden=a.hidden, layers=a.layers, ctx=a.ctx)
    with torch.inference_mode():
        target, draft, mtp = build(a)
        ms = step_times(target, draft, mtp, a.ctx, a.reps)
        base = ms["target T=1"]
        for k, v in ms.items():
            impl, _, what = k.partition(" ")
            emit(**common, metric="step_ms", impl=impl, step=what, value=round(v, 3),
                 ratio_to_target_step=round(v / base, 3))
        prompt = torch.randint(3, a.vocab, (a.ctx,), generator=torch.Generator().manual_seed(6)).tolist()
        rate, plain = generate(target, None, None, prompt, a.tokens, a.k)
        emit(**common, metric="tokens_per_s", impl="plain", value=round(rate, 2))
        full = prompt + plain.token_ids
        for impl, drafter, spec in (("oracle", None, Oracle(full)), ("draft", draft, "draft"), ("mtp", mtp, "mtp")):
            r, out = generate(target, drafter, spec, prompt, a.tokens, a.k)
            if out.token_ids != plain.token_ids:
                raise SystemExit(f"{impl}: speculative output differs from plain decoding")
            emit(**common, metric="tokens_per_s", impl=impl, k=a.k, value=round(r, 2), speedup=round(r / rate, 3),
                 acceptance=out.usage.acceptance_rate, identical=True)


if __name__ == "__main__":
    main()
