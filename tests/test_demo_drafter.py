"""The demo model's MTP drafter pipeline: scripts/demo/train_demo.py's drafter config fits the shipped demo model
(check_geometry) and the size budget, the drafter / export-drafter stages produce a folder that `unigemma.load(None)`
picks up beside the demo model (drafter=False and `--drafter none` turn it off), and generation through that drafter
gives the same tokens as plain decoding.

Tiny target (hidden 32, 2 layers, window 8) and tiny drafters stand in for the demo pair; the bundled folders are
monkeypatched (`unigemma.api.demo_model_path` / `demo_drafter_path`), so nothing here needs a trained drafter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import unigemma
import unigemma.api
from test_train import make_checkpoint, tiny_config
from unigemma.checkpoint import save_model
from unigemma.config import AssistantConfig, load_config
from unigemma.engine.generate import generate
from unigemma.model.assistant import Gemma4Assistant
from unigemma.train.drafter import check_geometry
from unigemma.train.loop import init_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "demo"))
import train_demo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_drafter_config_fits_the_demo_model_and_the_budget():
    demo = unigemma.api.demo_model_path()
    target = json.loads((demo / "config.json").read_text(encoding="utf-8"))
    d = train_demo.drafter_config(target)
    check_geometry(load_config(demo), AssistantConfig.from_dict(d))
    text = d["text_config"]
    assert d["backbone_hidden_size"] == target["text_config"]["hidden_size"]
    assert text["layer_types"] == ["full_attention"] and text["use_bidirectional_attention"] is None
    assert text["rope_parameters"] == target["text_config"]["rope_parameters"]
    # the demo folder (model + drafter, float32) must stay within 40 MiB
    with torch.device("meta"):
        n = sum(p.numel() for p in Gemma4Assistant(AssistantConfig.from_dict(d)).parameters())
    model_bytes = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file())
    assert model_bytes + 4 * n + 64 * 1024 <= 40 * 1024 * 1024, (model_bytes, n)
    # two layers: sliding then full, both reading layers the demo model has
    d2 = train_demo.drafter_config(target, layers=2, hidden=128, intermediate=512)
    assert d2["text_config"]["layer_types"] == ["sliding_attention", "full_attention"]
    check_geometry(load_config(demo), AssistantConfig.from_dict(d2))
    # what check_geometry guards against: a drafter head size the target's K/V do not have
    bad = json.loads(json.dumps(d))
    bad["text_config"]["global_head_dim"] = 64
    with pytest.raises(ValueError, match="head_dim"):
        check_geometry(load_config(demo), AssistantConfig.from_dict(bad))
    with pytest.raises(ValueError, match="multiple"):
        train_demo.drafter_config(target, layers=2, heads=3)  # sliding layers have 2 K/V heads


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """A tiny target and a tiny drafter exported by train_demo's export-drafter code, as unigemma/demo would hold."""
    root = tmp_path_factory.mktemp("demo")
    target = make_checkpoint(root / "model", tiny_config(), seed=3)
    dcfg = train_demo.drafter_config(tiny_config(), layers=2, hidden=32, intermediate=64)
    check_geometry(load_config(target), AssistantConfig.from_dict(dcfg))
    torch.manual_seed(1)
    drafter = Gemma4Assistant(AssistantConfig.from_dict(dcfg))
    init_weights(drafter, 0.2)
    final = root / "run" / "final"
    save_model(drafter, final, dcfg)
    (final / "generation_config.json").write_text(json.dumps({"num_assistant_tokens": 3}), encoding="utf-8")
    size = train_demo.stage_export_drafter(final, root / "drafter")
    assert size > 0
    assert sorted(p.name for p in (root / "drafter").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    return target, root / "drafter"


@pytest.fixture()
def bundled(demo_pair, monkeypatch):
    target, drafter = demo_pair
    monkeypatch.setattr(unigemma.api, "demo_model_path", lambda: target)
    monkeypatch.setattr(unigemma.api, "demo_drafter_path", lambda: drafter)
    return target, drafter


def test_load_none_loads_the_bundled_drafter(bundled, tmp_path, monkeypatch):
    target, drafter_dir = bundled
    llm = unigemma.load(None, device="cpu")
    assert llm.path == target
    assert isinstance(llm.drafter, Gemma4Assistant)
    assert llm.drafter.generation_config["num_assistant_tokens"] == 3
    from safetensors.torch import load_file

    stored = load_file(str(drafter_dir / "model.safetensors"))
    torch.testing.assert_close(llm.drafter.pre_projection.weight, stored["pre_projection.weight"])
    # off switches: drafter=False, an explicit model path (the bundled drafter belongs to the bundled model)
    assert unigemma.load(None, device="cpu", drafter=False).drafter is None
    assert unigemma.load(target, device="cpu").drafter is None
    assert isinstance(unigemma.load(target, device="cpu", drafter=drafter_dir).drafter, Gemma4Assistant)
    with pytest.raises(ValueError, match="drafter=True"):
        unigemma.load(None, device="cpu", drafter=True)
    # no bundled drafter folder: the demo model alone
    monkeypatch.setattr(unigemma.api, "demo_drafter_path", lambda: tmp_path / "missing")
    assert unigemma.load(None, device="cpu").drafter is None


def test_cli_and_server_drafter_flag(bundled):
    from unigemma.interactive import add_model_flags, drafter_arg, load_from_args
    from unigemma.server.run import add_serve_arguments

    p = argparse.ArgumentParser()
    add_model_flags(p)
    assert load_from_args(p.parse_args(["--device", "cpu"])).drafter is not None
    assert load_from_args(p.parse_args(["--device", "cpu", "--drafter", "none"])).drafter is None
    s = argparse.ArgumentParser()
    add_serve_arguments(s)
    assert drafter_arg(s.parse_args(["--drafter", "None"]).drafter) is False
    assert drafter_arg(s.parse_args(["--drafter", "/x/drafter"]).drafter) == "/x/drafter"
    assert drafter_arg(s.parse_args([]).drafter) is None


def test_generation_with_the_bundled_drafter_equals_plain(bundled):
    llm = unigemma.load(None, device="cpu")
    prompt = [2] + [int(t) for t in torch.randint(30, 500, (20,), generator=torch.Generator().manual_seed(0))]
    spec = generate(llm, prompt, max_tokens=40, temperature=0.0, ignore_eos=True)
    eng = llm._generate_engine
    assert eng.scheduler.proposer is not None and eng.scheduler.proposer.name == "mtp"
    assert eng.scheduler.controller.max_draft == 3  # the drafter's num_assistant_tokens
    plain = generate(llm, prompt, max_tokens=40, temperature=0.0, ignore_eos=True, speculative=False)
    assert spec.usage.drafted_tokens > 0 and plain.usage.drafted_tokens == 0
    assert spec.token_ids == plain.token_ids and len(spec.token_ids) == 40
    # seeded sampling: the coupled acceptance draws what plain decoding draws
    a = generate(llm, prompt, max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)
    b = generate(llm, prompt, max_tokens=30, temperature=1.0, seed=7, ignore_eos=True, speculative=False)
    assert a.token_ids == b.token_ids
    off = unigemma.load(None, device="cpu", drafter=False)
    assert generate(off, prompt, max_tokens=40, temperature=0.0, ignore_eos=True).token_ids == plain.token_ids


def test_drafter_stage_runs_the_training_loop(tmp_path):
    """train_demo.py drafter on a tiny target: config written and checked, text-only data, a few loop steps, then
    export-drafter → a folder load() accepts."""
    target = make_checkpoint(tmp_path / "target", tiny_config(), seed=5)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 12), ("val", 3)):
        with open(data / f"{split}.train.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Count from {i}"},
                                                 {"role": "assistant", "content": " ".join(
                                                     str(i + j) for j in range(8))}]}) + "\n")
            f.write(json.dumps({"messages": [{"role": "user", "content": [
                {"type": "image", "image": "nowhere.png"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": "red"}]}) + "\n")
    work = tmp_path / "work"
    sets = ["optim.steps=3", "optim.warmup_steps=1", "data.batch_size=4", "data.num_workers=0", "log.every=1",
            "drafter.acceptance_prompts=2", "drafter.acceptance_new_tokens=6", "eval.max_batches=1"]
    rc = train_demo.main(["drafter", "--work", str(work), "--target", str(target), "--drafter-data", str(data),
                          "--drafter-layers", "2", "--drafter-hidden", "32", "--drafter-intermediate", "64"]
                         + [f"--set={s}" for s in sets])
    assert rc == 0
    assert len((work / "drafter" / "train.jsonl").read_text().splitlines()) == 12  # the image record left out
    summary = json.loads((work / "drafter_summary.json").read_text())
    assert summary["steps"] == 3 and summary["target"] == str(target.resolve())
    assert 0.0 <= summary["acceptance"]["acceptance_rate"] <= 1.0 and summary["acceptance"]["k"] == 4
    check_geometry(load_config(target), load_config(work / "drafter"))
    assert train_demo.main(["export-drafter", "--work", str(work), "--drafter-out", str(tmp_path / "out")]) == 0
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == 4  # drafter.yaml's draft_steps
    llm = unigemma.load(target, device="cpu", drafter=tmp_path / "out")
    assert llm.drafter.config.text.layer_types == ["sliding_attention", "full_attention"]
