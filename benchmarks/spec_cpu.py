"""CPU cost of speculative decoding on the bundled demo model: plain step vs verify step, and generate() rates.

    python benchmarks/spec_cpu.py [--reps 60] [--tokens 160] [--profile verify|lookup|oracle|mtp]
    python benchmarks/spec_cpu.py --compare /tmp/before [--rounds 3]   # before/after in one run, interleaved

--compare DIR runs this script alternately against the unigemma package in DIR (e.g. `git archive HEAD unigemma |
tar -x -C DIR`, put first on PYTHONPATH) and against this checkout, --rounds times each, and prints the median
of every line for both.

Lines (1 thread is what the numbers are meant for: run under OMP_NUM_THREADS=1):
    step T=1 / T=3 / T=5 / T=7   ms per runner.decode of T tokens (1 + k drafts) at context ~300, median of
                                 interleaved repetitions, and the ratio to the plain step
    generate plain / lookup / oracle / mtp-random
                                 tokens/s of unigemma.engine.generate.generate on a repetitive prompt, greedy:
                                 plain decoding, prompt lookup, an oracle proposer that drafts the plain greedy
                                 output (every draft right: the best case), and a random-weight 1-layer drafter
                                 built like scripts/demo/train_demo.py's (drafts mostly wrong: the overhead case)
Every speculative run is checked to produce the plain run's tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "demo"))


def load_demo():
    import unigemma
    import unigemma.api

    return unigemma.load(unigemma.api.demo_model_path(), device="cpu", dtype="float32", drafter=False)


def random_drafter(llm):
    import train_demo

    from unigemma.config import AssistantConfig
    from unigemma.model.assistant import Gemma4Assistant
    from unigemma.train.loop import init_weights

    target = json.loads((Path(llm.path) / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    d = Gemma4Assistant(AssistantConfig.from_dict(train_demo.drafter_config(target))).eval()
    init_weights(d, 0.02)
    d.generation_config = {"num_assistant_tokens": 4}
    return d


class Oracle:
    """Drafts the tokens plain greedy decoding produced after the sequence's current prefix."""

    name = "oracle"

    def __init__(self, prompt: list[int], out: list[int]):
        self.full = list(prompt) + list(out)

    def propose(self, seqs, k):
        res = []
        for s in seqs:
            L = len(s.tokens)
            res.append(self.full[L:L + k] if self.full[:L] == s.tokens else [])
        return res


def step_times(llm, ctx: int, Ts: list[int], reps: int) -> dict[int, float]:
    from unigemma.engine.generate import Engine

    eng = Engine(llm.model, llm.tokenizer, llm.eos_token_ids, None, max_slots=1, max_model_len=2048,
                 speculative=None)
    r = eng.runner
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(30, llm.config.text.vocab_size, (ctx,), generator=g).tolist()
    with torch.inference_mode():
        r.prefill_chunk(0, ids, 0, ctx)
        times: dict[int, list[float]] = {T: [] for T in Ts}
        for i in range(reps + 5):
            for T in Ts:
                tok = torch.tensor([ids[:T]])
                pos = torch.arange(ctx, ctx + T)[None]
                t0 = time.perf_counter()
                r.decode(tok, pos, ctx + T)
                dt = time.perf_counter() - t0
                r.cache.truncate(0, ctx)
                if i >= 5:
                    times[T].append(dt)
    return {T: statistics.median(v) * 1e3 for T, v in times.items()}


def gen_rate(llm, prompt: list[int], n: int, speculative, reps: int = 3):
    from unigemma.engine import generate as G

    llm._generate_engine = None
    eng = G.Engine(llm.model, llm.tokenizer, llm.eos_token_ids, None, max_slots=1, max_model_len=2048,
                   speculative=speculative if speculative is not False else None)
    llm._generate_engine = eng
    best, out = None, None
    for _ in range(reps):
        t0 = time.perf_counter()
        res = G.generate(llm, prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                         speculative=speculative is not False)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
        out = res
    llm._generate_engine = None
    return len(out.token_ids) / best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--ctx", type=int, default=300)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--profile", choices=["verify", "lookup", "mtp", "oracle"], default=None)
    ap.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    ap.add_argument("--compare", type=Path, default=None, metavar="DIR")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    if a.compare is not None:
        return compare(a)
    torch.set_num_threads(1)
    llm = load_demo()
    from unigemma.engine.generate import Engine  # noqa: F401  (relayout happens in the first Engine)

    text = ("The cat sat on the mat. The dog sat on the log. " * 6).strip()
    prompt = llm.tokenizer.encode(text, add_bos=True)

    if a.profile:
        return profile(llm, prompt, a)

    res: dict[str, float] = {}
    if not a.skip_steps:
        st = step_times(llm, a.ctx, [1, 3, 5, 7, 9], a.reps)
        for T, ms in st.items():
            res[f"step_T{T}_ms"] = ms
            print(f"step T={T}: {ms:.3f} ms  ({ms / st[1]:.2f} plain steps)")
    plain_rate, plain = gen_rate(llm, prompt, a.tokens, False)
    res["plain_tok_s"] = plain_rate
    print(f"generate plain : {plain_rate:7.1f} tok/s  ({1e3 / plain_rate:.2f} ms/token)")
    for name, spec in [("lookup", "lookup"), ("oracle", Oracle(prompt, plain.token_ids)),
                       ("mtp-random", "mtp")]:
        if spec == "mtp":
            llm.drafter = random_drafter(llm)
            from unigemma.engine import generate as G
            llm._generate_engine = G.Engine(llm.model, llm.tokenizer, llm.eos_token_ids, llm.drafter, max_slots=1,
                                            max_model_len=2048, speculative="mtp")
            best = None
            for _ in range(3):
                t0 = time.perf_counter()
                out = G.generate(llm, prompt, max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            rate = len(out.token_ids) / best
            llm.drafter = None
            llm._generate_engine = None
        else:
            rate, out = gen_rate(llm, prompt, a.tokens, spec)
        same = out.token_ids == plain.token_ids
        u = out.usage
        res[f"{name}_tok_s"] = rate
        res[f"{name}_identical"] = float(same)
        print(f"generate {name:<10}: {rate:7.1f} tok/s  {rate / plain_rate:.2f}x plain  drafted {u.drafted_tokens} "
              f"accepted {u.accepted_tokens}  mean accepted {u.mean_accepted_length}  identical={same}")
        if not same:
            print("  MISMATCH", out.token_ids[:40], plain.token_ids[:40])
    if a.json:
        print("JSON " + json.dumps(res))
    return 0


def compare(a) -> int:
    import os
    import subprocess

    args = [sys.executable, __file__, "--json", "--reps", str(a.reps), "--tokens", str(a.tokens), "--ctx", str(a.ctx)]
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(a.rounds):
        for label in ("before", "after"):
            env = dict(os.environ)
            if label == "before":
                env["PYTHONPATH"] = str(a.compare.resolve()) + os.pathsep + env.get("PYTHONPATH", "")
            out = subprocess.run(args, env=env, capture_output=True, text=True, check=True, cwd="/").stdout
            line = next(x for x in out.splitlines() if x.startswith("JSON "))
            runs[label].append(json.loads(line[5:]))
            print(f"round {r + 1} {label} done", file=sys.stderr)
    keys = list(runs["after"][0])
    print(f"{'metric':<22}{'before':>10}{'after':>10}   (median of {a.rounds} interleaved runs)")
    for k in keys:
        b = statistics.median(x[k] for x in runs["before"])
        f = statistics.median(x[k] for x in runs["after"])
        print(f"{k:<22}{b:10.3f}{f:10.3f}")
    for label in ("before", "after"):
        st = {k: statistics.median(x[k] for x in runs[label]) for k in keys}
        ratios = "  ".join(f"T={T}: {st[f'step_T{T}_ms'] / st['step_T1_ms']:.2f}" for T in (3, 5, 7, 9)
                           if f"step_T{T}_ms" in st)
        speed = "  ".join(f"{n}: {st[f'{n}_tok_s'] / st['plain_tok_s']:.2f}x"
                          for n in ("lookup", "oracle", "mtp-random"))
        print(f"{label}: verify / plain step  {ratios}   generate vs plain  {speed}")
    return 0


def profile(llm, prompt, a) -> int:
    import cProfile
    import pstats

    from unigemma.engine import generate as G

    if a.profile == "verify":
        step_times(llm, a.ctx, [5], 3)
        pr = cProfile.Profile()
        pr.enable()
        step_times(llm, a.ctx, [5], a.reps)
        pr.disable()
    else:
        plain_rate, plain = gen_rate(llm, prompt, a.tokens, False, reps=1)
        spec = {"lookup": "lookup", "oracle": Oracle(prompt, plain.token_ids), "mtp": "mtp"}[a.profile]
        drafter = random_drafter(llm) if a.profile == "mtp" else None
        llm.drafter = drafter
        llm._generate_engine = G.Engine(llm.model, llm.tokenizer, llm.eos_token_ids, drafter, max_slots=1,
                                        max_model_len=2048, speculative=spec)
        G.generate(llm, prompt, max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
        pr = cProfile.Profile()
        pr.enable()
        G.generate(llm, prompt, max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
        pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(35)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
