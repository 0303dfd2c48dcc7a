"""benchmarks/diffusion_gpu.py (DiffusionGemma on a GPU) on the CPU with its tiny geometry in float32: every section
runs and prints DESIGN.md §6 lines with sane values; the autoregressive and reference twins hold the diffusion
model's own tensors and compute exactly its logits."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = {"bench", "metric", "value", "unit", "impl", "device", "config"}


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("diffusion_gpu", ROOT / "benchmarks" / "diffusion_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_every_section_on_the_cpu(tmp_path):
    bench = _load()
    out = tmp_path / "d.jsonl"
    lines = bench.main(["--tiny", "--dtype", "float32", "--steps", "4", "--batches", "1,2", "--canvases", "2",
                        "--prompt", "40", "--out", str(out)])
    assert len(out.read_text().splitlines()) == len(lines)
    by = {}
    for d in lines:
        assert KEYS <= set(d), d
        assert d["metric"] not in ("error", "skipped"), d
        assert d["impl"].startswith(("unigemma", "reference", "limit")), d
        if isinstance(d["value"], float):
            assert math.isfinite(d["value"]) and d["value"] >= 0, d
        by.setdefault(d["metric"], []).append(d)
    steps = {(d["impl"], d["batch"]) for d in by["denoise_step"]}
    assert steps == {(i, b) for i in ("unigemma eager", "unigemma static") for b in (1, 2)}
    gen = by["generate_tokens_per_s"]
    ours = [d for d in gen if d["impl"] == "unigemma eager"]
    assert {d["batch"] for d in ours} == {1, 2}
    for d in ours:  # random weights: every canvas runs all its steps; two canvases per request
        assert d["tokens"] == 2 * 64 * d["batch"] and d["denoiser_passes"] == 2 * 4 * d["batch"]
    assert any(d["impl"].startswith("reference") for d in gen)
    agree = by["denoiser_top1_agreement_vs_reference"][0]
    assert agree["value"] == 1.0 and agree["max_abs_diff"] == 0.0  # the reference twin is the same model
    assert len(by["autoregressive_decode_tokens_per_s"]) == 2 and len(by["diffusion_over_autoregressive"]) == 2
    assert by["unigemma_over_reference"][0]["value"] > 0
    floor = by["denoise_step_floor"]
    assert all(d["flops"] > 0 and d["bytes_read"] > 0 for d in floor)


def test_twins_share_tensors():
    import argparse

    import torch

    bench = _load()
    a = argparse.Namespace(tiny=True, layers=2, canvas=16, dtype=torch.float32)
    dm = bench.build_diffusion(a, torch.device("cpu"))
    dm._bench_text = bench.text_config(a)
    ar = bench.autoregressive_twin(dm)
    assert ar.model.language_model.layers[0].experts.gate_up_proj.data_ptr() == \
        dm.model.decoder.layers[0].experts.gate_up_proj.data_ptr()
    assert ar.lm_head.weight.data_ptr() == dm.model.decoder.embed_tokens.weight.data_ptr()
    ref = bench.reference_twin(dm, a, torch.device("cpu"))
    assert ref.model.decoder.layers[1].self_attn.q_proj.weight.data_ptr() == \
        dm.model.decoder.layers[1].self_attn.q_proj.weight.data_ptr()
