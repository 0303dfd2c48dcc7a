"""Per-token cost of grammar masks (unigemma.engine.constraints), printed as JSON lines.

For each constraint (JSON schemas of growing complexity, a regex, forced Gemma 4 tool calls, the thinking gate)
it drives a "model" of seeded random logits through the mask until the grammar finishes, and times:

  mask_ms   ConstraintState.fill_mask: llguidance computing the allowed-token bitmask (the grammar work)
  apply_ms  apply_masks on [1, V] logits: the mask plus unpacking it and masking the logits (what a step pays)
  compile_ms  compile_constraint on a cold cache (paid once per distinct schema)

Vocabularies: the tiny test tokenizer and a ~32k-token byte-level BPE trained here on a generated corpus of
prose, JSON and Gemma tool-call text; `--vocab 512 32000 262144` adds Gemma's own vocabulary size (~40 s to train).

    python benchmarks/constraints.py [--vocab 512 32000] [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unigemma.engine import constraints as C  # noqa: E402
from unigemma.engine.constraints import ConstraintSpec, apply_masks, compile_constraint, spec_from_openai  # noqa: E402
from unigemma.inputs.tokenizer import Tokenizer  # noqa: E402
from unigemma.testing import GEMMA4_SPECIALS, train_bpe_tokenizer  # noqa: E402

SCHEMAS = {
    "flat_object": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                     "email": {"type": "string", "format": "email"}},
                    "required": ["name", "age"]},
    "nested_object": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                          "city": {"type": "string"}},
                        "required": ["zip", "city"]}}, "required": ["name", "address"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}}, "required": ["user", "tags"]},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 6, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0},
                                         "score": {"type": "number", "minimum": 0, "maximum": 1},
                                         "label": {"enum": ["cat", "dog", "bird"]}},
        "required": ["id", "score", "label"]}},
    "any_of": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
         "required": ["kind", "r"]},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"},
                                          "h": {"type": "number"}}, "required": ["kind", "w", "h"]}]},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "search_web", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"},
                                         "filters": {"type": "object", "properties": {
                                             "site": {"type": ["string", "null"]},
                                             "recent": {"type": "boolean"}}},
                                         "max_results": {"type": "integer"}},
        "required": ["query"]}}},
]


def _specs() -> dict[str, ConstraintSpec]:
    specs = {name: ConstraintSpec("json_schema", s) for name, s in SCHEMAS.items()}
    specs["json_object"] = ConstraintSpec("json_object")
    specs["regex_date_list"] = ConstraintSpec("regex", r"(\d{4}-\d{2}-\d{2}, ){0,5}\d{4}-\d{2}-\d{2}")
    specs["tool_call_required"] = spec_from_openai(tools=TOOLS, tool_choice="required")
    specs["thinking_then_schema"] = ConstraintSpec("json_schema", SCHEMAS["nested_object"], thinking=True)
    return specs


# ─── tokenizers ──────────────────────────────────────────────────────────────────────────────────────
_SYL = ["ka", "to", "ri", "men", "sa", "lo", "qu", "ex", "an", "ber", "ti", "on", "gra", "pho", "ze", "ul",
        "str", "ing", "ed", "ly", "ch", "sh", "th", "vo", "ni", "da", "ps", "ck", "ou", "ie", "ai", "oy"]


def _corpus(n_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYL) for _ in range(rng.randint(1, 4))) for _ in range(40000)]
    words += [w.capitalize() for w in words[:5000]]
    lines = []
    for i in range(n_lines):
        k = i % 4
        if k == 0:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) + ".")
        elif k == 1:
            obj = {rng.choice(words): rng.choice([rng.randint(-999, 99999), rng.random(), rng.choice(words), True,
                                                  None, [rng.randint(0, 9)] * 2]) for _ in range(rng.randint(1, 5))}
            lines.append(json.dumps(obj, indent=rng.choice([None, 2])))
        elif k == 2:
            lines.append(f'<|tool_call>call:{rng.choice(words)}{{{rng.choice(words)}:<|"|>{rng.choice(words)} '
                         f'{rng.choice(words)}<|"|>,n:{rng.randint(0, 500)}}}<tool_call|>')
        else:
            lines.append(f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
                         f"{rng.choice(words)}_{rng.choice(words)}({rng.randint(0, 99)}) -> {rng.random():.4f}")
    return lines


def make_tokenizer(vocab: int) -> tuple[Tokenizer, float]:
    t0 = time.perf_counter()
    corpus = _corpus(60000 if vocab > 4000 else 3000)
    if vocab > 32000:  # the syllable words run out of merges near 40k: add random letter strings
        rng = random.Random(1)
        abc = "abcdefghijklmnopqrstuvwxyz"
        corpus += [" ".join("".join(rng.choice(abc) for _ in range(rng.randint(3, 9))) for _ in range(12))
                   for _ in range(int(vocab * 0.6))]
    hf = train_bpe_tokenizer(corpus, vocab_size=vocab)
    return Tokenizer(hf, specials=dict(GEMMA4_SPECIALS), source=f"bpe{vocab}"), time.perf_counter() - t0


# ─── measurement ─────────────────────────────────────────────────────────────────────────────────────
def _closers(tok: Tokenizer) -> torch.Tensor:
    ids = [i for i in range(tok.vocab_size) if (t := tok.decode([i])).strip() and set(t.strip()) <= set('"}]')]
    ids += [tok.id_of(n) for n in ("escape_token", "etc_token", "str_token", "eoc_token", "eot_token")]
    return torch.tensor(ids)


def run_one(tok: Tokenizer, spec: ConstraintSpec, seeds: int, closers: torch.Tensor, device: str = "cpu",
            max_steps: int = 400, push_after: int = 60) -> tuple[list[float], list[float], int]:
    compiled = compile_constraint(spec, tok)
    mask_ms: list[float] = []
    apply_ms: list[float] = []
    V = tok.vocab_size
    bm = torch.empty((1, (compiled.vocab_size + 31) // 32), dtype=torch.int32)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tokens = 0
    for seed in range(seeds):
        state = compiled.new_state()
        gen = torch.Generator().manual_seed(seed)
        for step in range(max_steps):
            if state.is_finished():
                break
            logits = torch.randn(1, V, generator=gen)
            if step >= push_after:
                logits[0, closers] += 0.5 * (step - push_after + 1)
            logits = logits.to(device)
            sync()
            t0 = time.perf_counter()
            state.fill_mask(bm, 0)
            t1 = time.perf_counter()
            apply_masks(logits, [state], bitmask=bm)
            sync()
            t2 = time.perf_counter()
            logits = logits.cpu()
            mask_ms.append((t1 - t0) * 1e3)
            apply_ms.append((t2 - t1) * 1e3)  # apply_masks recomputes the mask itself: a full step
            t = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen))
            if not state.advance(t):
                raise RuntimeError(f"sampled a masked token for {spec.kind}")
            tokens += 1
            if t in compiled.stop_ids or t == tok.id_of("str_token"):
                break
    return mask_ms, apply_ms, tokens


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="*", default=[512, 32000], help="BPE vocabulary sizes")
    ap.add_argument("--seeds", type=int, default=3, help="generations per constraint")
    ap.add_argument("--quick", action="store_true", help="one seed, small vocabulary only")
    ap.add_argument("--device", default="cpu", help="where the logits live for apply_ms (masks are always CPU)")
    args = ap.parse_args()
    if args.quick:
        args.vocab, args.seeds = [512], 1
    torch.set_num_threads(1)
    for vocab in args.vocab:
        tok, train_s = make_tokenizer(vocab)
        V = tok.vocab_size
        t0 = time.perf_counter()
        C._entry(tok)

        def emit(**kw) -> None:
            print(json.dumps({"impl": "unigemma", "device": "cpu", "vocab": V, **kw}), flush=True)
        emit(bench="constraint_setup", metric="tokenizer_train_s", value=round(train_s, 2), unit="s", config="bpe")
        emit(bench="constraint_setup", metric="lltokenizer_build_ms",
             value=round((time.perf_counter() - t0) * 1e3, 2), unit="ms", config="bpe")
        closers = _closers(tok)
        for name, spec in _specs().items():
            t0 = time.perf_counter()
            compile_constraint(spec, tok)
            compile_ms = (time.perf_counter() - t0) * 1e3
            mask_ms, apply_ms, n = run_one(tok, spec, args.seeds, closers, args.device)
            common = dict(bench="constraint_mask", config=name, tokens=n)
            emit(**common, metric="mask_ms_p50", value=round(statistics.median(mask_ms), 4), unit="ms")
            emit(**common, metric="mask_ms_p99", value=round(_pct(mask_ms, 0.99), 4), unit="ms")
            emit(**common, metric="apply_ms_p50", value=round(statistics.median(apply_ms), 4), unit="ms",
                 device=args.device)
            emit(**common, metric="compile_ms", value=round(compile_ms, 2), unit="ms")


if __name__ == "__main__":
    main()
