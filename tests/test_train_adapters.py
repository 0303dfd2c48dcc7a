"""LoRA adapters that travel (issue 25): PEFT's layout in every LoRA checkpoint, read by PEFT on the reference
model with the same logits, `unigemma.load(base, adapter=DIR)`, `--adapter` on the CLI and server,
`unigemma train export [--merge]`, QLoRA on int8 / int4 bases, and modules trained in full (modules_to_save).

Tiny models (hidden 32, 2 layers) as in test_train; PEFT and transformers are test-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import arithmetic_jsonl, make_checkpoint, tiny_config
from unigemma.train import config as tc
from unigemma.train.loop import CausalLMLoss, train

LORA = {"enabled": True, "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_checkpoint(root / "base", tiny_config())
    arithmetic_jsonl(root / "train.jsonl", 16)
    return root


def cfg_for(root: Path, out: str, **sections) -> tc.TrainConfig:
    d = {"output_dir": str(root / out), "model": {"checkpoint": str(root / "base")},
         "data": {"train": str(root / "train.jsonl"), "batch_size": 4, "num_workers": 0},
         "optim": {"lr": 1e-2, "steps": 8}, "log": {"every": 100}, "lora": LORA}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return tc.from_dict(d)


@pytest.fixture(scope="module")
def lora_run(work) -> Path:
    """One LoRA run with a norm trained in full; final/ holds the adapter (and the merged model)."""
    r = train(cfg_for(work, "lora", lora={"modules_to_save": ["model.language_model.norm"]},
                      checkpoint={"every": 4}))
    assert r.losses[-1] < r.losses[0]
    return r.output_dir / "final"


def _ids() -> torch.Tensor:
    return torch.randint(30, 500, (2, 12), generator=torch.Generator().manual_seed(1))


def test_checkpoints_hold_peft_adapters(work, lora_run):
    step = work / "lora" / "checkpoint-000004"
    assert {p.name for p in step.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (step / "model.safetensors").exists()  # step checkpoints: adapter only
    cfg = json.loads((lora_run / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == str(work / "base")
    assert "model.language_model.layers.1.mlp.down_proj" in cfg["target_modules"]
    from safetensors.torch import load_file

    keys = set(load_file(str(lora_run / "adapter_model.safetensors")))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.language_model.norm.weight" in keys
    assert (lora_run / "model.safetensors").is_file()  # final: also the merged model (lora.save_merged)


def test_peft_loads_our_adapter_with_the_same_logits(work, lora_run):
    import peft  # test-only (the dev extra)
    from transformers import Gemma4UnifiedForConditionalGeneration

    import unigemma

    ref = Gemma4UnifiedForConditionalGeneration.from_pretrained(str(work / "base"), dtype=torch.float32).eval()
    ref = peft.PeftModel.from_pretrained(ref, str(lora_run)).eval()
    ours = unigemma.load(work / "base", device="cpu", dtype="float32", adapter=lora_run)
    base = unigemma.load(work / "base", device="cpu", dtype="float32")
    ids = _ids()
    with torch.no_grad():
        a, b, plain = ref(input_ids=ids).logits, ours.model(ids), base.model(ids)
    assert (a - b).abs().max() <= 1e-4
    assert (b - plain).abs().max() > 1e-2  # the adapter (and the trained norm) changed the model
    merged = unigemma.load(lora_run, device="cpu", dtype="float32")  # final/'s merged copy: the same model
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), b, atol=1e-5, rtol=1e-5)
