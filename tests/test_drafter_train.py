"""Drafter distillation: the batched training forward equals the drafter's own one-step forward as decoding
calls it, the acceptance measurement reproduces plain greedy decoding, and distillation against a small trained
target raises acceptance clearly above the untrained drafter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_train import make_checkpoint, tiny_config
from unigemma.config import FULL, SLIDING, AssistantConfig
from unigemma.model.assistant import Gemma4Assistant
from unigemma.train import config as tc
from unigemma.train.data import IGNORE
from unigemma.train.drafter import (DrafterLoss, _draft_masks, chain_valid, drafter_hidden, greedy_generate,
                                    measure_acceptance, query_masks)
from unigemma.train.loop import init_weights, train


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run many small ops; on a shared 2-core machine two OpenMP threads mostly wait for each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def drafter_config(ordered: bool = False) -> dict:
    d = {"model_type": "gemma4_unified_assistant", "backbone_hidden_size": 32,
         "text_config": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 16,
                         "sliding_window": 8, "layer_types": [SLIDING, FULL]}}
    if ordered:
        d.update(use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4)
    return d


def _models(tmp_path, ordered=False):
    from unigemma.checkpoint import build_model

    ck = make_checkpoint(tmp_path / "target", tiny_config(), seed=3)
    target, _ = build_model(ck)
    torch.manual_seed(1)
    drafter = Gemma4Assistant(AssistantConfig.from_dict(drafter_config(ordered)))
    init_weights(drafter, 0.2)
    if ordered:
        drafter.masked_embedding.token_ordering.copy_(torch.randperm(512))
    return target, drafter


def test_training_forward_matches_decode_step(tmp_path):
    """Query i of the batched forward = the drafter at position p = i+1 reading the target's K/V at positions < p
    (sliding: p−W−1 … p−1), exactly what measure_acceptance / the engine pass to Gemma4Assistant.forward."""
    target, drafter = _models(tmp_path)
    T = 20  # longer than the window (8): the sliding mask matters
    ids = torch.randint(30, 500, (1, T))
    with torch.no_grad():
        out = target.run(ids, compute_logits=False)
        E = target.language_model.embed(ids)
        types = [SLIDING, FULL]
        shared = {t: out.plan.shared[t] for t in types}
        x = torch.cat([E[:, 1:], out.hidden[:, :-1]], dim=-1)  # step 1: [embed(x_p), h_{p-1}]
        pos = torch.arange(1, T)[None]
        h, g = drafter_hidden(drafter, x, pos, shared, query_masks(types, T, 8, None, ids.device))
        logits = drafter.lm_head(h)
        for i in (0, 5, 9, 10, 18):
            p = i + 1
            kv = {t: (k[:, :, :p], v[:, :, :p]) for t, (k, v) in shared.items()}
            ref_logits, ref_g = drafter(x[:, i:i + 1], torch.tensor([[p]]), kv, _draft_masks(types, p, 8, "cpu"))
            torch.testing.assert_close(logits[:, i:i + 1], ref_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g[:, i:i + 1], ref_g, atol=1e-5, rtol=1e-5)


def test_chain_validity_and_centroid_head_loss(tmp_path):
    ok = torch.tensor([[True, True, True, False, True, True, True, True]])
    v = chain_valid(ok, 3)
    # step j at query i needs tokens i+1 … i+j+1 draftable: ok[i … i+j]
    assert v[0].tolist() == [[True, True, False, False, True, True, True]]
    assert v[1].tolist() == [[True, False, False, False, True, True, False]]
    assert v[2].tolist() == [[False, False, False, False, True, False, False]]
    target, drafter = _models(tmp_path, ordered=True)
    ids = torch.randint(30, 500, (2, 12))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    labels[1, :4] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones(2, 12, dtype=torch.bool)}
    loss_fn = DrafterLoss(target, drafter, draft_steps=2, loss="kl")
    s, n = loss_fn(batch)
    assert float(n) == loss_fn.count(batch) == 10 + 6 + 9 + 5
    s.backward()
    assert torch.isfinite(s) and drafter.masked_embedding.centroids.weight.grad.abs().sum() > 0
    assert drafter.pre_projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())


def _pattern_jsonl(path: Path, start: int, n: int) -> Path:
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            seq = " ".join(words[(i + j) % len(words)] for j in range(12))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Go {words[i % len(words)]}"},
                                             {"role": "assistant", "content": seq}]}) + "\n")
    return path


def test_distillation_raises_acceptance(tmp_path):
    from unigemma.checkpoint import build_model

    # 1. a small target that has learned a pattern (so its greedy continuations are predictable)
    make_checkpoint(tmp_path / "base", tiny_config(), seed=5)
    train_f = _pattern_jsonl(tmp_path / "train.jsonl", 0, 48)
    eval_f = _pattern_jsonl(tmp_path / "eval.jsonl", 100, 8)
    tcfg = tc.from_dict({"output_dir": str(tmp_path / "target"), "model": {"checkpoint": str(tmp_path / "base")},
                         "data": {"train": str(train_f), "batch_size": 8, "num_workers": 0},
                         "optim": {"steps": 60, "lr": 1e-2, "warmup_steps": 5}, "log": {"every": 1000}})
    target_dir = train(tcfg).output_dir / "final"
    (tmp_path / "drafter.json").write_text(json.dumps(drafter_config()))
    # 2. distil a fresh drafter against it
    dcfg = tc.from_dict({"task": "drafter", "output_dir": str(tmp_path / "drafter"),
                         "drafter": {"target": str(target_dir), "init": str(tmp_path / "drafter.json"),
                                     "draft_steps": 3, "acceptance_prompts": 8, "acceptance_new_tokens": 24},
                         "model": {"init_std": 0.02},
                         "data": {"train": str(train_f), "eval": str(eval_f), "batch_size": 8, "num_workers": 0},
                         "optim": {"steps": 60, "lr": 1e-2, "warmup_steps": 5}, "log": {"every": 1000}})
    r = train(dcfg)
    rep = r.report
    assert rep["acceptance_rate"] > 0.6 and rep["acceptance_rate"] > rep["acceptance_rate_initial"] + 0.4, rep
    assert rep["tokens_per_round"] > 2.0
    report = json.loads((r.output_dir / "final" / "train_report.json").read_text())
    assert report["acceptance_rate"] == rep["acceptance_rate"]
    # 3. the saved drafter is a checkpoint load() accepts beside its target, with the draft count set
    import unigemma

    llm = unigemma.load(target_dir, device="cpu", drafter=r.output_dir / "final")
    assert isinstance(llm.drafter, Gemma4Assistant)
    gen = json.loads((r.output_dir / "final" / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == 3
    # 4. speculative greedy output equals plain greedy output, whatever the drafter proposes
    target, _ = build_model(target_dir)
    drafter, _ = build_model(r.output_dir / "final")
    prompts = [[2, 15, 40, 41, 42, 16, 107 % 512, 15, 50], [2, 15, 60, 61, 16, 15, 70, 71, 72]]
    res = measure_acceptance(target, drafter, prompts, k=3, max_new_tokens=16)
    assert res["outputs"] == [greedy_generate(target, p, 16) for p in prompts]


def test_distillation_for_a_family_target(tmp_path):
    """`task: drafter` against a `gemma4_text` target with per-layer inputs and KV sharing (E2B-style): the
    drafter (`gemma4_assistant`) reads the target's store layers; the distillation loss falls, and the saved drafter
    loads beside its target and speculates losslessly."""
    import unigemma
    from unigemma.checkpoint import build_model, save_model
    from unigemma.config import UnifiedConfig
    from unigemma.model.unified import Gemma4Unified
    from unigemma.testing import write_tiny_tokenizer

    text = {"model_type": "gemma4_text", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 5, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "global_head_dim": 16, "sliding_window": 8, "final_logit_softcapping": 30.0, "eos_token_id": [1, 16],
            "layer_types": [SLIDING, SLIDING, FULL, SLIDING, FULL], "num_kv_shared_layers": 2,
            "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 512}
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    torch.manual_seed(2)
    model = Gemma4Unified(UnifiedConfig.from_dict(text))
    init_weights(model, 0.05)
    save_model(model, target_dir, text)
    write_tiny_tokenizer(target_dir)
    d = drafter_config()
    d["model_type"] = "gemma4_assistant"
    d["text_config"].update(model_type="gemma4_text", hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
    (tmp_path / "drafter.json").write_text(json.dumps(d))
    train_f = _pattern_jsonl(tmp_path / "train.jsonl", 0, 16)
    dcfg = tc.from_dict({"task": "drafter", "output_dir": str(tmp_path / "drafter"),
                         "drafter": {"target": str(target_dir), "init": str(tmp_path / "drafter.json"),
                                     "draft_steps": 2, "acceptance_prompts": 2, "acceptance_new_tokens": 8},
                         "model": {"init_std": 0.02},
                         "data": {"train": str(train_f), "batch_size": 4, "num_workers": 0},
                         "optim": {"steps": 30, "lr": 1e-2, "warmup_steps": 2}, "log": {"every": 1}})
    r = train(dcfg)
    assert sum(r.losses[-5:]) < sum(r.losses[:5]), r.losses
    llm = unigemma.load(target_dir, device="cpu", drafter=r.output_dir / "final")
    assert isinstance(llm.drafter, Gemma4Assistant) and llm.drafter.config.model_type == "gemma4_assistant"
    target, _ = build_model(target_dir)
    drafter, _ = build_model(r.output_dir / "final")
    prompts = [[2, 15, 40, 41, 42, 16, 107, 15, 50], [2, 15, 60, 61, 16, 15, 70, 71, 72, 73, 74, 75]]
    res = measure_acceptance(target, drafter, prompts, k=3, max_new_tokens=16)
    assert res["outputs"] == [greedy_generate(target, p, 16) for p in prompts]
