"""benchmarks/gpu.py (issue 9) on CPU with its tiny geometry: every section runs and prints DESIGN.md §6 lines with
sane values, the FLOP count matches a brute-force count, and the run plan (budget, output naming) behaves."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from unigemma.config import FULL, SLIDING

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gpu = _load()
KEYS = {"bench", "metric", "value", "unit", "impl", "device", "config"}


def _check_lines(lines):
    assert lines, "nothing was emitted"
    for d in lines:
        assert KEYS <= set(d), d
        assert d["impl"].startswith(("unigemma", "reference", "limit")), d
        assert d["metric"] != "error", d
        if isinstance(d["value"], float):
            assert math.isfinite(d["value"]), d


def _find(lines, **kw):
    return [d for d in lines if all(d.get(k) == v for k, v in kw.items())]


def test_prefill_flops_equals_a_brute_force_count():
    cfg = gpu.tiny_config().text
    with torch.device("meta"):
        m = gpu.Gemma4Unified(gpu.tiny_config())
    linear = sum(p.numel() for p in m.model.language_model.layers.parameters() if p.dim() == 2)
    assert gpu.layer_linear_params(cfg) == linear
    W = cfg.sliding_window
    for start, end in [(0, 10), (0, 200), (50, 64), (100, 300), (63, 65)]:
        expect = 2.0 * linear * (end - start) + 2.0 * cfg.hidden_size * cfg.vocab_size
        for i, t in enumerate(cfg.layer_types):
            pairs = sum(min(q + 1, W) if t == SLIDING else q + 1 for q in range(start, end))
            expect += 4.0 * cfg.num_attention_heads * cfg.layer_head_dim[i] * pairs
        assert gpu.prefill_flops(cfg, start, end) == expect, (start, end)


def test_peak_flops_and_results_file_naming(tmp_path):
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA H200") == 989e12
    assert gpu.peak_flops("cpu") is None
    assert gpu.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu.device_slug("NVIDIA A100-SXM4-80GB") == "a100"
    named = gpu.out_path(str(tmp_path), "NVIDIA H200", "long", "2026-11-27")
    assert named == tmp_path / "2026-11-27-h200-gpu-long.jsonl"
    assert gpu.out_path(str(tmp_path), "NVIDIA H200", None, "2026-11-27") == tmp_path / "2026-11-27-h200-gpu.jsonl"
    assert gpu.out_path(str(tmp_path / "x.jsonl"), "NVIDIA H200", None) == tmp_path / "x.jsonl"


def test_bad_arguments_say_what_is_accepted():
    with pytest.raises(SystemExit, match="accepted: bandwidth"):
        gpu.parse_args(["--sections", "decode,warp"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        gpu.parse_args(["--batches", "1,eight"])
    a = gpu.parse_args(["--tiny", "--sections", "quant,decode,bandwidth"])
    assert a.sections == ["bandwidth", "decode", "quant"]  # canonical order: quant frees the model, so it is last


def test_a_spent_budget_skips_sections_instead_of_running_them():
    lines = gpu.main(["--tiny", "--device", "cpu", "--sections", "bandwidth,quant", "--budget", "0"])
    skipped = _find(lines, bench="plan", metric="skipped")
    assert [d["value"] for d in skipped] == ["bandwidth", "quant"]
    assert not _find(lines, bench="decode") and not _find(lines, bench="bandwidth")


def test_a_long_context_length_predicted_past_the_budget_is_skipped():
    # 256 tokens take milliseconds; 200,000 would take (200000 / 256)² times that, far past a 600 s budget
    lines = gpu.main(["--tiny", "--device", "cpu", "--sections", "long", "--long", "256,200000",
                      "--long-chunk", "128", "--long-new", "2", "--budget", "600"])
    assert [d["prompt_tokens"] for d in _find(lines, metric="prefill_tokens_per_s")] == [256]
    (skip,) = _find(lines, bench="plan", metric="skipped")
    assert skip["value"] == "long 200000" and "predicted" in skip["reason"]


def test_prefill_mtp_and_long_context_sections(tmp_path):
    lines = gpu.main(["--tiny", "--device", "cpu", "--sections", "bandwidth,correctness,prefill,mtp,long",
                      "--prefill", "128", "--prefill-chunked", "512", "--chunks", "128,256", "--long", "256,512",
                      "--long-chunk", "128", "--long-new", "4", "--out", str(tmp_path) + "/"])
    _check_lines(lines)
    files = list(tmp_path.glob("*-cpu-gpu-tiny.jsonl"))
    assert len(files) == 1
    assert [json.loads(x) for x in files[0].read_text().splitlines()] == lines

    assert _find(lines, metric="greedy_eager_equals_runner")[0]["value"] == 1
    for c in (128, 256):
        (p,) = _find(lines, bench="prefill", impl="unigemma", prompt_tokens=512, chunk=c)
        assert p["value"] > 0 and p["tflops"] > 0 and p["path"] == "runner.prefill_chunk"

    steps = _find(lines, bench="mtp", metric="verify_vs_decode_step")
    assert sorted(d["k"] for d in steps) == [2, 4, 6] and all(d["value"] > 0 for d in steps)
    (draft,) = _find(lines, bench="mtp", metric="draft_vs_target_step")
    assert draft["value"] > 0 and draft["target"] == 0.10
    (step,) = _find(lines, bench="mtp", metric="draft_step_ms")
    assert step["value"] > 0 and step["drafter"]["layers"] == 2 and step["drafter"]["centroids"] == 64

    kv = {(d["prompt_tokens"], d["layer_type"]): d for d in _find(lines, bench="long_context", metric="kv_bytes")}
    cfg = gpu.tiny_config().text
    # sliding layers: a ring bounded by the window (window − 1 + 32 spare + 1 scratch entries), whatever the length
    assert kv[(256, SLIDING)]["value"] == kv[(512, SLIDING)]["value"] > 0
    assert kv[(512, SLIDING)]["entries_per_layer"] == cfg.sliding_window - 1 + 32 + 1
    assert kv[(512, SLIDING)]["if_unbounded"] > kv[(512, SLIDING)]["value"]
    # full layers hold every position: twice the prompt, about twice the bytes
    assert 1.9 < kv[(512, FULL)]["value"] / kv[(256, FULL)]["value"] < 2.1
    for n in (256, 512):
        (dec,) = _find(lines, bench="long_context", impl="unigemma", metric="decode_tokens_per_s", prompt_tokens=n)
        assert dec["value"] > 0 and 0 < dec["fraction_of_limit"]
        (pre,) = _find(lines, bench="long_context", metric="prefill_tokens_per_s", prompt_tokens=n)
        assert pre["value"] > 0 and pre["chunk"] == 128


@pytest.mark.slow  # ~15 s on an idle 2-core machine (every section, the reference included)
def test_every_section_runs_on_cpu_with_the_tiny_geometry():
    lines = gpu.main(["--tiny", "--device", "cpu", "--sections", "all", "--long", "512"])
    _check_lines(lines)
    ran = {d["section"] for d in _find(lines, bench="plan", metric="section_s")}
    assert ran == set(gpu.SECTIONS)

    runner = {d["batch"]: d for d in _find(lines, bench="decode", impl="unigemma", path="runner")}
    assert set(runner) == {1, 4, 64}
    assert runner[64]["vs_batch1"] > 1  # 64 rows in one forward beat one row at a time
    engine = {d["batch"]: d for d in _find(lines, bench="decode", impl="unigemma-engine")}
    assert set(engine) == {1, 8} and engine[8]["tokens"] == 8 * 16

    assert _find(lines, metric="bf16_top1_agreement_vs_reference")[0]["value"] >= 0.99
    assert _find(lines, bench="decode", impl="reference")[0]["value"] > 0
    assert _find(lines, bench="prefill", impl="reference", prompt_tokens=256)[0]["value"] > 0
    assert _find(lines, bench="prefill", impl="unigemma", metric="speedup_vs_reference")[0]["value"] > 0

    (bf16,) = _find(lines, bench="decode", impl="unigemma", section="quant")
    q = {d["impl"]: d for d in _find(lines, bench="decode", metric="tokens_per_s") if d["impl"] in
         ("unigemma-int8", "unigemma-int4")}
    assert bf16["weight_bytes"] > q["unigemma-int8"]["weight_bytes"] > q["unigemma-int4"]["weight_bytes"]
    assert all(d["vs_bf16"] > 0 for d in q.values())
    agree = {d["impl"]: d["value"] for d in _find(lines, metric="top1_agreement_vs_bf16")}
    assert agree["unigemma-int8"] >= 0.5 and 0 <= agree["unigemma-int4"] <= 1


def _load_profile():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "benchmarks" / "gpu_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_script_counts_ops_and_times_every_weight_format(tmp_path):
    prof = _load_profile()
    prof.LINES.clear()
    assert prof.main(["--tiny", "--rows", "1", "--sections", "step,matmul", "--top", "5", "--out", str(tmp_path)]) == 0
    lines = prof.LINES
    by = {(d["bench"], d["metric"]) for d in lines}
    assert ("profile", "kernels_per_step") in by and ("profile", "kernel_us_per_step") in by
    top = [d for d in lines if d["metric"] == "kernel_us"]
    assert 0 < len(top) <= 5 and all(d["value"] >= 0 and 0 <= d["share"] <= 1 for d in top)
    mm = [d for d in lines if d["bench"] == "matmul"]
    impls = {d["impl"] for d in mm}
    assert {"bf16", "int8", "int8-dequantize", "int4-cpu", "int4-dequantize"} <= impls
    for d in mm:
        if d["metric"] == "us_per_call":
            assert d["value"] > 0 and math.isfinite(d["value"])
            # the product is checked, not only timed: int8 rounds to ~1%, int4 to ~10% of the largest output
            assert d["rel_err"] < (0.02 if d["impl"] in ("bf16", "int8", "int8-dequantize") else 0.2), d
    written = list(tmp_path.glob("*-cpu-gpu-profile.jsonl"))
    assert len(written) == 1 and len(written[0].read_text().splitlines()) == len(lines)
