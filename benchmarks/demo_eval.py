"""Task accuracy of the bundled demo model on the demo test split, through the real engine; JSON lines.

    python benchmarks/demo_eval.py [--model unigemma/demo/model] [--data build/demo/data/test.jsonl]
                                   [--per-task 30] [--tasks shape colour digit ...] [--out results.jsonl]
                                   [--drafter FOLDER | --no-drafter] [--mtp-per-task 30]

Each test record's conversation up to its first assistant message is rendered with the model's template
(`llm.build_prompt`), decoded greedily by `unigemma.engine.generate.generate` (the engine the CLI and API use),
and parsed by `unigemma.outputs.parser.parse_response`. Lines (DESIGN.md §6): `bench: "demo_eval"`,
`metric: "accuracy"` (or `tool_call_validity`, `right_tool`, `schema_valid`, ...), `value` in [0, 1], `task`,
`n`, plus `subset` ("seen" / "held_out" voices and fonts) where the split marks it.

    image tasks (shape, colour, describe, count, text)   answer == expected (case-insensitive, trimmed);
                                                         describe also by question kind (subset compound /
                                                         plain, meta.question of make_data.py)
    compound  the shape and colour records' images asked "What shape and colour is this?" and the like
              (make_data.COMPOUND_QUESTIONS) → "a red circle", exact match as above
    audio tasks (digit, number, transcribe)               same; held-out voices reported apart
    arithmetic                                            with thinking on, for every problem; `add` = the + ones
    tool      first model turn: tool_call_validity = calls parse, name declared, arguments valid for the schema
              (no call expected: a plain answer counts as valid); right_tool = called names == expected names
    json      constrained decoding (response_format json_schema, llguidance) through the server's Service, the
              only path that applies grammars: schema_valid and exact (value == expected)

MTP drafting, when the loaded model has a drafter (`unigemma.load(None)` loads unigemma/demo/drafter beside the
demo model; --drafter FOLDER another one; --no-drafter none): the prompts of the selected tool, arithmetic
and json records (the long answers; json unconstrained here), each decoded greedily three times through the
same engine, interleaved: plain (`speculative=False`), with the drafter at the engine's default adaptive draft
length, and with a fixed draft length k = the drafter's num_assistant_tokens. Lines with `task: "mtp"`:

    acceptance  accepted ÷ drafted tokens of the fixed-k pass, summed over prompts (the engine's per-request
                speculative counters, `usage.drafted_tokens` / `accepted_tokens`): the drafter's own quality
    speedup     decode tokens/s with the drafter (adaptive, what generation uses) ÷ plain; decode = the tokens
                after the first streamed chunk, over the time after it (prefill excluded); `config` also has the
                fixed-k speedup and both token rates
    identical   fraction of prompts whose token ids are the same in all three passes (greedy speculation must
                not change the output)

What this does not do: train anything.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_TASKS = ("shape", "colour", "describe", "count", "text")
AUDIO_TASKS = ("digit", "number", "transcribe")
ALL_TASKS = IMAGE_TASKS + AUDIO_TASKS + ("arithmetic", "tool", "json", "compound")


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def compound_records(records: list[dict]) -> list[dict]:
    """Task `compound`: the image of every `shape` and `colour` record asked a question that wants both
    (make_data.COMPOUND_QUESTIONS, one per record, chosen by a Random seeded with the record id), expected answer
    the describe task's "a {colour} {shape}". More images than the split's compound-phrased describe records."""
    from random import Random

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "demo"))
    from make_data import COMPOUND_QUESTIONS

    out = []
    for r in records:
        if r["task"] not in ("shape", "colour"):
            continue
        q = Random(r["id"]).choice(COMPOUND_QUESTIONS)
        msgs = []
        for m in r["messages"]:
            if m["role"] == "user" and isinstance(m.get("content"), list):
                m = dict(m, content=[dict(c, text=q) if c.get("type") == "text" else c for c in m["content"]])
            msgs.append(m)
        answer = f"a {r['meta']['colour']} {r['meta']['shape']}"
        msgs[-1] = {"role": "assistant", "content": answer}
        out.append(dict(r, id=r["id"] + "-compound", task="compound", answer=answer, messages=msgs,
                        meta=dict(r["meta"], question=q)))
    return out


def select(records: list[dict], tasks: list[str], per_task: int | None) -> list[dict]:
    """The first `per_task` records of each task (file order: the split's seeded shuffle), keeping
    seen/held-out balance by taking them alternately when a task has both."""
    by: dict[str, list[dict]] = collections.defaultdict(list)
    for r in records:
        if r["task"] in tasks:
            by[r["task"]].append(r)
    out = []
    for t in tasks:
        rs = by.get(t, [])
        if per_task is not None and len(rs) > per_task:
            held = [r for r in rs if r.get("held_out")]
            seen = [r for r in rs if not r.get("held_out")]
            if held and seen:
                k = per_task // 2
                rs = seen[: per_task - min(k, len(held))] + held[: min(k, len(held))]
            else:
                rs = rs[:per_task]
        out += rs
    return out


def absolute_media(messages: list[dict], base: Path) -> list[dict]:
    """Media paths in the split are relative to the JSONL file; the prompt builder takes them as given."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for p in c:
                p = dict(p)
                for key in ("image", "audio"):
                    if p.get("type") == key and isinstance(p.get(key), str):
                        p[key] = str(base / p[key])
                parts.append(p)
            m = dict(m, content=parts)
        out.append(m)
    return out


def prompt_messages(rec: dict) -> list[dict]:
    msgs = rec["messages"]
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:first]


def norm(text: str | None) -> str:
    return " ".join((text or "").strip().lower().split()).rstrip(".")


# --- running one prompt ---------------------------------------------------------------------------------------

def run_engine(llm, messages: list[dict], tools, thinking: bool, max_tokens: int, speculative: bool = True):
    from unigemma.engine.generate import generate
    from unigemma.outputs.parser import parse_response, start_state_for_prompt

    prompt = llm.build_prompt(messages, tools=tools, enable_thinking=thinking)
    res = generate(llm, prompt.input_ids, media=prompt.media or None, max_tokens=max_tokens, temperature=0.0,
                   speculative=speculative)
    text = llm.tokenizer.decode(res.token_ids, skip_special_tokens=False)
    names = [t["function"]["name"] for t in tools or []]
    return parse_response(text, start_state_for_prompt(prompt.text), tool_names=names or None), res


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def openai_messages(messages: list[dict]) -> list[dict]:
    """Dataset parts (absolute paths) → OpenAI request parts with data: URIs (the server reads no paths here)."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for p in c:
                if p.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": _data_uri(Path(p["image"]), "image/png")}})
                elif p.get("type") == "audio":
                    data = base64.b64encode(Path(p["audio"]).read_bytes()).decode()
                    parts.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
                else:
                    parts.append(p)
            m = dict(m, content=parts)
        out.append(m)
    return out


class ConstrainedRunner:
    """JSON-schema-constrained chat completions through the server's Service (in process, no HTTP)."""

    def __init__(self, llm):
        from unigemma.server.service import ServerSettings, Service

        self.svc = Service(llm, ServerSettings(max_concurrency=1))
        self.svc.start()

    def __call__(self, messages: list[dict], response_format: dict, max_tokens: int) -> dict:
        from unigemma.server.protocol import ChatCompletionRequest

        req = ChatCompletionRequest(model="unigemma", messages=openai_messages(messages), temperature=0.0,
                                    max_tokens=max_tokens, response_format=response_format)
        prep = self.svc.prepare_chat(req)
        return asyncio.run(self.svc.chat(req, prep))["choices"][0]["message"]

    def close(self) -> None:
        self.svc.shutdown()


# --- scoring ----------------------------------------------------------------------------------------------

def tool_scores(rec: dict, parsed) -> tuple[bool, bool, bool]:
    """(valid, right tool, exact arguments) for the first model turn of a tool record."""
    import jsonschema

    expected = rec["meta"].get("calls") or []
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in rec.get("tools") or []}
    calls = parsed.tool_calls
    if not expected:
        ok = not calls and bool(parsed.content.strip())
        return ok, ok, ok
    if not calls:
        return False, False, False
    valid = not parsed.warnings
    got = []
    for c in calls:
        name = c["function"]["name"]
        try:
            args = json.loads(c["function"]["arguments"] or "{}")
            if name not in schemas:
                raise ValueError(name)
            jsonschema.validate(args, schemas[name])
        except (ValueError, jsonschema.ValidationError):
            valid = False
            args = None
        got.append((name, args))
    right = sorted(n for n, _ in got) == sorted(c["name"] for c in expected)
    exact = right and sorted(json.dumps(a, sort_keys=True) for _, a in got) == sorted(
        json.dumps(c["arguments"], sort_keys=True) for c in expected)
    return valid, right, exact


def evaluate(llm, records: list[dict], base: Path, log=None) -> list[dict]:
    """Score every record; returns per-record result dicts (task, subset, metric → bool)."""
    import jsonschema

    constrained = None
    results = []
    try:
        for rec in records:
            msgs = absolute_media(prompt_messages(rec), base)
            task = rec["task"]
            r: dict[str, Any] = {"id": rec["id"], "task": task, "held_out": bool(rec.get("held_out"))}
            t0 = time.perf_counter()
            if task == "json":
                if constrained is None:
                    constrained = ConstrainedRunner(llm)
                msg = constrained(msgs, rec["response_format"], 96)
                schema = rec["response_format"]["json_schema"]["schema"]
                try:
                    value = json.loads(msg.get("content") or "")
                    jsonschema.validate(value, schema)
                    r["schema_valid"] = True
                except (ValueError, jsonschema.ValidationError):
                    value, r["schema_valid"] = None, False
                r["accuracy"] = value == rec["meta"]["value"]
                r["output"] = msg.get("content")
            elif task == "tool":
                parsed, _ = run_engine(llm, msgs, rec.get("tools"), bool(rec.get("enable_thinking")), 160)
                r["tool_call_validity"], r["right_tool"], r["accuracy"] = tool_scores(rec, parsed)
                r["output"] = parsed.tool_calls or parsed.content
            elif task == "arithmetic":
                parsed, _ = run_engine(llm, msgs, None, True, 96)  # thinking on for every problem
                r["accuracy"] = norm(parsed.content) == norm(rec["answer"])
                r["op"] = rec["meta"]["op"]
                r["output"] = parsed.content
            else:
                parsed, _ = run_engine(llm, msgs, None, bool(rec.get("enable_thinking")), 24)
                r["accuracy"] = norm(parsed.content) == norm(rec["answer"])
                r["output"] = parsed.content
                if task == "describe" and rec["meta"].get("question"):
                    r["question"] = rec["meta"]["question"]  # "compound" or "describe" (make_data.py)
            r["seconds"] = round(time.perf_counter() - t0, 3)
            r["expected"] = rec["answer"]
            results.append(r)
            if log is not None:
                log(r)
    finally:
        if constrained is not None:
            constrained.close()
    return results


# --- MTP drafting -------------------------------------------------------------------------------------------

MTP_TASKS = {"tool": 160, "arithmetic": 96, "json": 96}  # max_tokens, as the accuracy runs give them


def _decode_run(llm, prompt, max_tokens: int, speculative: bool, fixed_k: bool) -> dict:
    """One greedy streamed generation: token ids, decode tokens and seconds after the first chunk, spec counters."""
    from unigemma.engine import generate as gen

    eng = gen._engine_for(llm, len(prompt.input_ids) + max_tokens + 1)  # the engine generate() is about to use
    ctl = eng.scheduler.controller
    adaptive = ctl.adaptive
    ctl.adaptive = not fixed_k
    try:
        ids, t_first, n_first, usage = [], None, 0, None
        for ch in gen.generate(llm, prompt.input_ids, media=prompt.media or None, max_tokens=max_tokens,
                               temperature=0.0, speculative=speculative, stream=True):
            ids += ch.token_ids
            if t_first is None:
                t_first, n_first = time.perf_counter(), len(ch.token_ids)
            usage = ch.usage or usage
        t_end = time.perf_counter()
    finally:
        ctl.adaptive = adaptive
    return {"ids": ids, "decode_tokens": len(ids) - n_first, "decode_s": t_end - (t_first or t_end),
            "drafted": usage.drafted_tokens if usage else 0, "accepted": usage.accepted_tokens if usage else 0}


def evaluate_mtp(llm, records: list[dict], base: Path, log=None) -> dict:
    """Plain vs drafter decoding of the selected long-answer records (see the module docstring)."""
    tot = {m: {"decode_tokens": 0, "decode_s": 0.0, "drafted": 0, "accepted": 0} for m in ("plain", "mtp", "fixed")}
    same, n = 0, 0
    modes = [("plain", False, False), ("mtp", True, False), ("fixed", True, True)]
    for i, rec in enumerate(r for r in records if r["task"] in MTP_TASKS):
        msgs = absolute_media(prompt_messages(rec), base)
        thinking = True if rec["task"] == "arithmetic" else bool(rec.get("enable_thinking"))
        prompt = llm.build_prompt(msgs, tools=rec.get("tools"), enable_thinking=thinking)
        if i == 0:  # warm-up: first-call costs out of the timings
            _decode_run(llm, prompt, 8, True, False)
        runs = {}
        for name, spec, fixed in modes[i % 3:] + modes[: i % 3]:  # rotate the order: load drift hits all alike
            runs[name] = _decode_run(llm, prompt, MTP_TASKS[rec["task"]], spec, fixed)
        for name, r in runs.items():
            for key in tot[name]:
                tot[name][key] += r[key]
        ok = runs["plain"]["ids"] == runs["mtp"]["ids"] == runs["fixed"]["ids"]
        same += ok
        n += 1
        if log is not None:
            log({"id": rec["id"], "task": "mtp", "source_task": rec["task"], "identical": ok,
                 **{f"{k}_{key}": r[key] for k, r in runs.items() for key in ("decode_tokens", "decode_s",
                                                                               "drafted", "accepted")}})
    rate = {k: v["decode_tokens"] / v["decode_s"] if v["decode_s"] > 0 else None for k, v in tot.items()}
    return {"n": n, "identical": same, "totals": tot, "tokens_per_s": rate}


def mtp_lines(res: dict, llm, device: str, model: str) -> list[dict]:
    if not res["n"]:
        return []
    k = int((getattr(llm.drafter, "generation_config", None) or {}).get("num_assistant_tokens", 4))
    tot, rate = res["totals"], res["tokens_per_s"]
    cfg = {"model": model, "decoding": "greedy", "tasks": sorted(MTP_TASKS)}
    common = {"bench": "demo_eval", "impl": "unigemma", "device": device, "task": "mtp", "n": res["n"]}

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    acc = tot["fixed"]["accepted"] / tot["fixed"]["drafted"] if tot["fixed"]["drafted"] else None
    adaptive_acc = tot["mtp"]["accepted"] / tot["mtp"]["drafted"] if tot["mtp"]["drafted"] else None
    return [
        {**common, "metric": "acceptance", "value": None if acc is None else round(acc, 4), "unit": "fraction",
         "config": {**cfg, "draft": f"fixed k={k}", "drafted": tot["fixed"]["drafted"],
                    "accepted": tot["fixed"]["accepted"], "adaptive_acceptance":
                        None if adaptive_acc is None else round(adaptive_acc, 4),
                    "adaptive_drafted": tot["mtp"]["drafted"]}},
        {**common, "metric": "speedup", "value": ratio(rate["mtp"], rate["plain"]), "unit": "x",
         "config": {**cfg, "draft": "adaptive", "plain_tokens_per_s": ratio(rate["plain"], 1),
                    "mtp_tokens_per_s": ratio(rate["mtp"], 1), "fixed_k_speedup": ratio(rate["fixed"], rate["plain"]),
                    "decode_tokens": tot["plain"]["decode_tokens"]}},
        {**common, "metric": "identical", "value": round(res["identical"] / res["n"], 4), "unit": "fraction",
         "config": cfg},
    ]


def summarize(results: list[dict], device: str, model: str) -> list[dict]:
    lines = []

    def line(task: str, metric: str, rows: list[dict], subset: str | None = None, key: str | None = None):
        if not rows:
            return
        key = key or metric
        v = sum(bool(x[key]) for x in rows) / len(rows)
        d = {"bench": "demo_eval", "impl": "unigemma", "metric": metric, "value": round(v, 4), "unit": "fraction",
             "device": device, "task": task, "n": len(rows), "config": {"model": model, "decoding": "greedy"}}
        if subset:
            d["subset"] = subset
        lines.append(d)

    by = collections.defaultdict(list)
    for r in results:
        by[r["task"]].append(r)
    for task, rows in by.items():
        if task == "tool":
            line(task, "tool_call_validity", rows)
            line(task, "right_tool", rows)
            line(task, "accuracy", rows)  # right tool with exactly the expected arguments
        elif task == "json":
            line(task, "schema_valid", rows)
            line(task, "accuracy", rows)
        elif task == "arithmetic":
            line(task, "accuracy", rows)
            line("arithmetic_add", "accuracy", [r for r in rows if r.get("op") == "+"])
        else:
            line(task, "accuracy", rows)
            held = [r for r in rows if r["held_out"]]
            compound = [r for r in rows if r.get("question") == "compound"]
            if compound:  # describe records asked "What shape and colour is this?" and the like
                line(task, "accuracy", compound, "compound")
                line(task, "accuracy", [r for r in rows if r.get("question") != "compound"], "plain")
            if held:
                line(task, "accuracy", [r for r in rows if not r["held_out"]], "seen")
                line(task, "accuracy", held, "held_out")
    return lines


def main(argv: list[str] | None = None) -> int:
    import platform

    import torch

    import unigemma

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    p.add_argument("--data", default="build/demo/data/test.jsonl", help="demo split JSONL (make_data.py)")
    p.add_argument("--tasks", nargs="*", default=list(ALL_TASKS), choices=ALL_TASKS)
    p.add_argument("--per-task", type=int, default=None, help="at most this many records per task")
    p.add_argument("--out", default=None, help="also write the summary lines here")
    p.add_argument("--details", default=None, help="write per-record results (JSON lines) here")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--drafter", default=None,
                   help="MTP drafter folder (default: the bundled demo drafter with the bundled model; 'none': off)")
    p.add_argument("--no-drafter", action="store_true", help="load no drafter: no MTP lines")
    p.add_argument("--mtp-per-task", type=int, default=None,
                   help="MTP timing: at most this many tool / arithmetic / json records each (default: --per-task)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = Path(a.data)
    if not data.is_file():
        raise SystemExit(f"{data}: no such split; generate it with scripts/demo/make_data.py (see scripts/demo/README.md)")
    from unigemma.interactive import drafter_arg

    llm = unigemma.load(a.model, device="cpu", drafter=False if a.no_drafter else drafter_arg(a.drafter))
    all_records = read_records(data)
    all_records += compound_records(all_records)
    records = select(all_records, a.tasks, a.per_task)
    det = open(a.details, "w", encoding="utf-8") if a.details else None

    def log(r: dict) -> None:
        if det is not None:
            det.write(json.dumps(r, ensure_ascii=False) + "\n")
            det.flush()

    t0 = time.perf_counter()
    results = evaluate(llm, records, data.parent, log)
    device = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    lines = summarize(results, device, str(llm.path))
    if llm.drafter is not None:
        mtp_tasks = [t for t in a.tasks if t in MTP_TASKS]
        mtp = evaluate_mtp(llm, select(all_records, mtp_tasks, a.mtp_per_task or a.per_task), data.parent, log)
        lines += mtp_lines(mtp, llm, device, str(llm.path))
    lines.append({"bench": "demo_eval", "impl": "unigemma", "metric": "seconds", "value": round(
        time.perf_counter() - t0, 1), "unit": "s", "device": device, "task": "all", "n": len(results)})
    out = open(a.out, "w", encoding="utf-8") if a.out else None
    for d in lines:
        s = json.dumps(d)
        print(s)
        if out is not None:
            out.write(s + "\n")
    for fh in (out, det):
        if fh is not None:
            fh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
