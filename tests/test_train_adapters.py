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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


def test_export_adapter_and_merge(work, lora_run, tmp_path):
    import unigemma
    import unigemma.cli
    from unigemma.train.cli import main

    assert main(["export", str(work / "lora"), "--out", str(tmp_path / "ad")]) == 0  # a run folder: its final/
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json",
                                                                  "adapter_model.safetensors"]
    assert unigemma.cli.main(["train", "export", str(work / "lora" / "checkpoint-000004"), "--merge",
                              "--out", str(tmp_path / "merged")]) == 0
    merged = unigemma.load(tmp_path / "merged", device="cpu")
    via = unigemma.load(work / "base", device="cpu", adapter=work / "lora" / "checkpoint-000004")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), via.model(ids), atol=1e-5, rtol=1e-5)
    assert merged.tokenizer is not None
    assert main(["export", str(work / "base"), "--out", str(tmp_path / "x")]) == 2  # not a LoRA run: one line


def test_adapter_flag_on_generate_and_serve(work, lora_run, capsys, monkeypatch):
    import unigemma
    from unigemma.cli import build_parser, main

    llm = unigemma.load(work / "base", device="cpu", adapter=lora_run)
    want = llm.generate("What is 3 plus 4?", max_tokens=6, temperature=0).text
    capsys.readouterr()
    assert main(["generate", "--model", str(work / "base"), "--adapter", str(lora_run), "--raw", "--prompt",
                 "What is 3 plus 4?", "--max-tokens", "6", "--temperature", "0", "--drafter", "none"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        unigemma.load(work / "base", device="cpu", adapter=work / "base")
    # serve: the flag reaches load()
    seen = {}

    def fake_load(*a, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(unigemma, "load", fake_load)
    args = build_parser().parse_args(["serve", "--model", str(work / "base"), "--adapter", str(lora_run)])
    with pytest.raises(ValueError, match="stop here"):
        args.func(args)
    assert seen["adapter"] == str(lora_run)


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_qlora_trains_and_its_adapter_applies_to_the_float_base(work, bits):
    import unigemma
    from unigemma.quant import QuantLinear
    from unigemma.train.data import ChatDataset, MediaIds, chat_template_for, collate

    cfg = cfg_for(work, f"qlora_{bits}", model={"quantize": bits}, optim={"steps": 16, "lr": 3e-2})
    r = train(cfg)
    assert np.mean(r.losses[-3:]) < 0.85 * np.mean(r.losses[:2])
    final = r.output_dir / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    # the adapter on the float base lowers the training loss as it did on the quantized one
    base = unigemma.load(work / "base", device="cpu", dtype="float32")
    adapted = unigemma.load(work / "base", device="cpu", dtype="float32", adapter=final)
    ds = ChatDataset(work / "train.jsonl", base.tokenizer, chat_template_for(base.tokenizer),
                     MediaIds.from_model(base.config, base.tokenizer))
    batch = collate([ds[i] for i in range(len(ds))])

    def loss(m):
        with torch.no_grad():
            s, n = CausalLMLoss(m)(batch)
        return float(s / n)

    assert loss(adapted.model) < 0.9 * loss(base.model)
    # on the quantized base it stays a side branch
    q = unigemma.load(work / "base", device="cpu", dtype="float32", quantize=bits, adapter=final)
    assert any(isinstance(m, QuantLinear) for m in q.model.modules())
    assert loss(q.model) < 0.9 * loss(base.model)


def test_quantized_base_without_lora_is_refused(work):
    with pytest.raises(tc.TrainConfigError, match="model.quantize = 'int4'.*enable lora"):
        cfg_for(work, "q", model={"quantize": "int4"}, lora={"enabled": False})


def test_trainable_embeddings_modules_to_save(work):
    import unigemma

    r = train(cfg_for(work, "emb", lora={"modules_to_save": ["embed_tokens"]}, optim={"steps": 4}))
    base = unigemma.load(work / "base", device="cpu", dtype="float32")
    ours = unigemma.load(work / "base", device="cpu", dtype="float32", adapter=r.output_dir / "final")
    e0 = base.model.model.language_model.embed_tokens.weight
    e1 = ours.model.model.language_model.embed_tokens.weight
    assert (e0 - e1).abs().max() > 0  # the embedding (tied LM head) was trained and travels in the adapter
    merged = unigemma.load(r.output_dir / "final", device="cpu", dtype="float32")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), ours.model(ids), atol=1e-5, rtol=1e-5)
    # PEFT keeps the LM head tied to the trained embedding (ensure_weight_tying): the same logits
    import peft  # test-only (the dev extra)
    from transformers import Gemma4UnifiedForConditionalGeneration

    assert json.loads((r.output_dir / "final" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    ref = Gemma4UnifiedForConditionalGeneration.from_pretrained(str(work / "base"), dtype=torch.float32).eval()
    ref = peft.PeftModel.from_pretrained(ref, str(r.output_dir / "final")).eval()
    with torch.no_grad():
        assert (ref(input_ids=ids).logits - ours.model(ids)).abs().max() <= 1e-4


def test_qlora_on_a_stored_int4_checkpoint(work, tmp_path):
    """The issue's case: LoRA on a folder written by `unigemma quantize` (was: unexpected tensor '...scales')."""
    import unigemma
    from unigemma.quant import quantize_checkpoint

    quantize_checkpoint(work / "base", tmp_path / "q4", "int4")
    r = train(cfg_for(work, "qlora_stored", model={"checkpoint": str(tmp_path / "q4")}, optim={"steps": 3}))
    assert len(r.losses) == 3 and all(np.isfinite(r.losses))
    llm = unigemma.load(tmp_path / "q4", device="cpu", adapter=r.output_dir / "final")
    assert llm.generate("What is 1 plus 2?", max_tokens=3, temperature=0).token_ids
