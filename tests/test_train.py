"""Training: config validation, the assistant-only loss mask on real template renders, media expansion, loss
falling on a tiny dataset, exact resume, LoRA merge-back served by `unigemma.load`, and the CLI.

Tiny models (hidden 32, 2 layers, vocab 512) with the tiny Gemma-4-format tokenizer; every run is a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unigemma.checkpoint import save_model
from unigemma.config import UnifiedConfig
from unigemma.inputs.tokenizer import Tokenizer
from unigemma.model.unified import Gemma4Unified
from unigemma.testing import write_tiny_tokenizer
from unigemma.train import config as tc
from unigemma.train.data import (IGNORE, ChatDataset, LengthGroupedBatchSampler, MediaIds, Record,
                                 assistant_spans, build_example, chat_template_for, collate, render_record,
                                 tokenize_rendered)
from unigemma.train.loop import CausalLMLoss, chunked_ce, init_weights, lr_at, train

# The tiny tokenizer puts the Gemma 4 specials at small ids (unigemma.testing.GEMMA4_SPECIALS order).
TINY_IDS = dict(image_token_id=19, audio_token_id=20, video_token_id=23, boi_token_id=17, eoi_token_id=21,
                boa_token_id=18, eoa_token_index=22)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run many small ops; on a shared 2-core machine two OpenMP threads mostly wait for each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(mm: bool = False, hidden: int = 32, layers: int = 2) -> dict:
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    d = {"model_type": "gemma4_unified",
         "text_config": {"vocab_size": 512, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                         "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "head_dim": 16, "global_head_dim": 16, "sliding_window": 8, "layer_types": types,
                         "final_logit_softcapping": 30.0, "eos_token_id": [1, 16]},
         **TINY_IDS}
    if mm:
        d["vision_config"] = {"mm_embed_dim": 16, "output_proj_dims": 16, "mm_posemb_size": 40}
        d["audio_config"] = {}
    return d


def make_checkpoint(path: Path, cfg_dict: dict, seed: int = 0) -> Path:
    """A randomly initialised tiny model saved like a published checkpoint, with the tiny tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Gemma4Unified(UnifiedConfig.from_dict(cfg_dict))
    init_weights(model, 0.05)
    save_model(model, path, cfg_dict)
    write_tiny_tokenizer(path)
    return path


def arithmetic_jsonl(path: Path, n: int = 32, offset: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + n):
            a, b = i % 7, (3 * i) % 5
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                             {"role": "assistant", "content": f"It is {a + b}."}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    make_checkpoint(root / "base", tiny_config())
    (root / "config.json").write_text(json.dumps(tiny_config()), encoding="utf-8")
    arithmetic_jsonl(root / "train.jsonl", 32)
    arithmetic_jsonl(root / "eval.jsonl", 8, offset=100)
    return root


def run_cfg(root: Path, out: str, **sections) -> tc.TrainConfig:
    d = {"output_dir": str(root / out), "model": {"checkpoint": str(root / "base")},
         "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "batch_size": 4,
                  "num_workers": 0},
         "optim": {"lr": 3e-3, "steps": 30, "warmup_steps": 2}, "log": {"every": 100}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return tc.from_dict(d)


# --- config -------------------------------------------------------------------------------------------------

def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(tc.TrainConfigError, match=r"optim\.lrr: unknown key"):
        tc.from_dict({"model": {"checkpoint": "x"}, "data": {"train": "t"}, "optim": {"lrr": 1}})
    with pytest.raises(tc.TrainConfigError, match="exactly one of model.checkpoint"):
        tc.from_dict({"data": {"train": "t"}})
    with pytest.raises(tc.TrainConfigError, match=r"optim\.schedule = 'step'"):
        tc.from_dict({"model": {"checkpoint": "x"}, "data": {"train": "t"}, "optim": {"schedule": "step"}})
    with pytest.raises(tc.TrainConfigError, match=r"data\.batch_size must be an integer"):
        tc.from_dict({"model": {"checkpoint": "x"}, "data": {"train": "t", "batch_size": "4"}})
    with pytest.raises(tc.TrainConfigError, match="lora.enabled"):
        tc.from_dict({"model": {"config": "c.json"}, "data": {"train": "t", "tokenizer": "k"},
                      "lora": {"enabled": True}})
    # YAML's "2e-5" (a string to YAML 1.1) is accepted as a number; relative paths resolve against the file.
    (tmp_path / "a.yaml").write_text("model: {checkpoint: ck}\ndata: {train: d.jsonl}\noptim: {lr: 2e-5}\n")
    cfg = tc.load_train_config(tmp_path / "a.yaml")
    assert cfg.optim.lr == 2e-5 and cfg.model.checkpoint == str(tmp_path / "ck")
    (tmp_path / "b.toml").write_text('task = "finetune"\n[model]\ncheckpoint = "ck"\n[data]\ntrain = "d"\n'
                                     '[distributed]\nstrategy = "diloco"\ninner_steps = 10\n')
    assert tc.load_train_config(tmp_path / "b.toml").distributed.inner_steps == 10


def test_example_config_parses():
    cfg = tc.load_train_config(Path(__file__).resolve().parent.parent / "examples" / "train.yaml")
    assert cfg.task == "finetune" and cfg.optim.schedule in ("cosine", "linear", "constant")


def test_lr_schedule():
    assert lr_at(0, 1.0, 100, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, warmup=10) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 100, warmup=10, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, warmup=10, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 100, warmup=10, schedule="linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_at(55, 1.0, 100, schedule="constant") == 1.0


# --- data ---------------------------------------------------------------------------------------------------

def _trained_text(tok, ex) -> str:
    return tok.decode([int(t) for t in ex["labels"] if t != IGNORE])


def test_assistant_mask_on_rendered_conversation(tmp_path):
    write_tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    tpl = chat_template_for(tok)  # the bundled Gemma 4 template (the tiny tokenizer has none)
    rec = Record([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <turn|> there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"},
        {"role": "assistant", "content": "It is cold."}])
    text, spans = render_record(rec, tpl)
    assert text.startswith("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi <\u200bturn|> there<turn|>\n")
    assert [text[a:b] for a, b in spans] == [
        "Hello!<turn|>",
        '<|tool_call>call:get{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>',
        "It is cold.<turn|>"]
    ex = build_example(tokenize_rendered(text, spans, tok, MediaIds(), []), MediaIds(), 10_000)
    ids, labels = ex["input_ids"], ex["labels"]
    # labels are the next token where that token is trained: exactly the model's content + end-of-turn tokens
    assert _trained_text(tok, ex) == ('Hello!<turn|><|tool_call>call:get{city:<|"|>Oslo<|"|>}<tool_call|>'
                                      '<|tool_response>It is cold.<turn|>')
    trained_pos = np.nonzero(labels != IGNORE)[0] + 1
    assert (labels[trained_pos - 1] == ids[trained_pos]).all()
    eot = tok.id_of("eot_token")
    # the "\n" after every <turn|>, the header, the thinking-off prefill and the tool result are never trained
    untrained = tok.decode([int(ids[i]) for i in range(len(ids)) if i not in set(trained_pos.tolist())])
    assert "response:get" in untrained and "<|turn>model\n<|channel>thought\n<channel|>" in untrained
    for i in np.nonzero(ids == eot)[0]:
        if i + 1 < len(ids):
            assert labels[i] == IGNORE  # token i+1 ("\n") untrained
    # without the prefill option, the turn body follows the header directly
    text2, spans2 = assistant_spans(tpl.render([{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                     "content": "b"}],
                                               add_generation_prompt=False), prefill_empty_thought=False)
    assert text2.endswith("<|turn>model\nb<turn|>\n") and [text2[a:b] for a, b in spans2] == ["b<turn|>"]


def test_media_expansion_and_batch(tmp_path):
    import soundfile as sf
    from PIL import Image

    write_tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    Image.new("RGB", (100, 60), (200, 30, 30)).save(tmp_path / "red.png")
    sf.write(tmp_path / "beep.wav", (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "red.png"}},
                                                       {"type": "text", "text": "Colour?"},
                                                       {"type": "audio", "audio": "beep.wav"}]},
                          {"role": "assistant", "content": "Red."}]},
            {"messages": [{"role": "user", "content": "Plain"}, {"role": "assistant", "content": "Yes."}]}]
    (tmp_path / "mm.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = UnifiedConfig.from_dict(tiny_config(mm=True))
    ids = MediaIds.from_model(cfg, tok)
    ds = ChatDataset(tmp_path / "mm.jsonl", tok, chat_template_for(tok), ids, 4096, image_soft_tokens=70)
    ex = ds[0]
    x = ex["input_ids"].tolist()
    n_img = ex["images"][0].num_tokens
    b = x.index(ids.boi)
    assert x[b:b + n_img + 2] == [ids.boi] + [ids.image] * n_img + [ids.eoi]
    a = x.index(ids.boa)
    assert x[a:a + 15] == [ids.boa] + [ids.audio] * 13 + [ids.eoa]  # 8000 samples → ceil(8000/640) = 13 frames
    assert not np.isin(ex["labels"], list(ids.media_ids)).any()
    assert _trained_text(tok, ex) == "Red.<turn|>"
    batch = collate([ds[0], ds[1]], pad_id=0)
    assert batch["pixel_values"].shape == (1, 70, 6912) and batch["input_features"].shape == (1, 13, 640)
    assert batch["attention_mask"][1].sum() == len(ds[1]["input_ids"])
    torch.manual_seed(0)
    model = Gemma4Unified(cfg)
    init_weights(model, 0.05)
    loss, n = CausalLMLoss(model)(batch)
    loss.backward()  # soft tokens reach the loss: the vision and audio projections get gradients
    assert n == batch["num_targets"] and model.model.embed_vision.embedding_projection.weight.grad.abs().sum() > 0
    assert model.model.embed_audio.embedding_projection.weight.grad.abs().sum() > 0
    # truncation never cuts a media block: the image (first) is dropped entirely when the cut falls inside it
    short = build_example(ds.items[0], ids, max_len=b + 3, image_soft_tokens=70)
    assert len(short["input_ids"]) == b and short["images"] == [] and short["audio"] == []


def test_sampler_groups_shards_and_resumes():
    lengths = [5, 50, 7, 48, 6, 52, 8, 49] * 4
    s = LengthGroupedBatchSampler(lengths, batch_size=4, seed=1, group_size=8)
    batches = s.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(32))
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) < 10 for b in batches)
    assert s.batches(0) == batches and s.batches(1) != batches
    s.set_position(0, 3)
    assert list(s) == batches[3:]
    shards = [LengthGroupedBatchSampler(lengths, 4, seed=1, group_size=8, rank=r, world_size=3).batches(0)
              for r in range(3)]
    assert len({len(x) for x in shards}) == 1 and not set(map(tuple, shards[0])) & set(map(tuple, shards[1]))


def test_chunked_ce_matches_full():
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    head = torch.nn.Linear(8, 20)
    y = torch.randint(0, 20, (10,))
    a = chunked_ce(h, y, head, chunk=3)
    b = torch.nn.functional.cross_entropy(head(h), y, reduction="sum")
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a, h)
    gb, = torch.autograd.grad(b, h)
    torch.testing.assert_close(ga, gb)


# --- training -------------------------------------------------------------------------------------------------

def test_loss_falls_and_checkpoint_loads(work):
    import unigemma

    r = train(run_cfg(work, "falls", model={"checkpoint": None, "config": str(work / "config.json")},
                      data={"tokenizer": str(work / "base")}))
    assert len(r.losses) == 30
    assert np.mean(r.losses[-5:]) < 0.7 * np.mean(r.losses[:3])
    assert r.final_eval_loss is not None and r.final_eval_loss < 0.7 * r.losses[0]
    llm = unigemma.load(r.output_dir / "final", device="cpu")
    assert llm.tokenizer is not None
    metrics = [json.loads(line) for line in (work / "falls" / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in m for m in metrics)


def test_train_under_no_grad_still_trains(work):
    """A caller inside torch.no_grad() (a notebook, a benchmark script) still gets a training run, and its own
    grad mode is back as it was afterwards."""
    with torch.no_grad():
        r = train(run_cfg(work, "nograd", optim={"steps": 6}))
        assert not torch.is_grad_enabled()
    assert len(r.losses) == 6 and all(np.isfinite(r.losses))
    assert np.mean(r.losses[-2:]) < r.losses[0]


def test_gradient_checkpointing_same_gradients(work):
    from unigemma.checkpoint import build_model

    model, _ = build_model(work / "base")
    model.requires_grad_(True)
    model.train()
    ids = torch.randint(30, 500, (2, 12))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE)], 1)
    grads = []
    for gc in (False, True):
        model.zero_grad()
        model.language_model.gradient_checkpointing = gc
        s, _ = CausalLMLoss(model)({"input_ids": ids, "labels": labels})
        s.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_exact_resume(work):
    common = dict(optim={"steps": 6, "grad_accum": 2, "warmup_steps": 2, "lr": 2e-3},
                  checkpoint={"every": 100}, data={"batch_size": 3})
    full = train(run_cfg(work, "resume_full", **common))
    first = train(run_cfg(work, "resume_cut", **common), stop_after=3)
    assert first.steps == 3 and (work / "resume_cut" / "checkpoint-000003" / "trainer_state.json").is_file()
    second = train(run_cfg(work, "resume_cut", **common))  # resume: auto
    assert len(second.losses) == 3
    assert first.losses + second.losses == full.losses  # bit-identical
    from safetensors.torch import load_file

    wa = load_file(str(work / "resume_full" / "final" / "model.safetensors"))
    wb = load_file(str(work / "resume_cut" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_merges_into_weights_load_serves(work):
    import unigemma
    from unigemma.train.lora import LoRALinear, merge_lora

    cfg = run_cfg(work, "lora", lora={"enabled": True, "rank": 4, "alpha": 8, "targets": ["q_proj", "o_proj",
                                                                                          "down_proj"]},
                  optim={"steps": 8, "lr": 1e-2}, checkpoint={"every": 4})
    r = train(cfg)
    assert r.losses[-1] < r.losses[0]
    llm = unigemma.load(r.output_dir / "final", device="cpu")
    base = unigemma.load(work / "base", device="cpu")
    # rebuild the adapted (unmerged) model from the base + the adapters kept in the training state
    from unigemma.train.loop import FinetuneTask
    from safetensors.torch import load_file

    task = FinetuneTask(cfg, torch.device("cpu"))
    state = load_file(str(r.output_dir / "final" / "rank0.safetensors"))
    with torch.no_grad():
        for n, p in task.model.named_parameters():
            if p.requires_grad:
                p.copy_(state[f"local.{n}"])
    assert sum(isinstance(m, LoRALinear) for m in task.model.modules()) == 6
    task.model.eval()
    ids = torch.randint(30, 500, (2, 10))
    with torch.no_grad():
        adapted = task.model(ids)
        served = llm.model(ids)
        plain = base.model(ids)
    torch.testing.assert_close(served, adapted, atol=1e-5, rtol=1e-5)
    assert (served - plain).abs().max() > 1e-3  # the adapters changed the model
    merge_lora(task.model)
    assert not any(isinstance(m, LoRALinear) for m in task.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(task.model(ids), served, atol=1e-5, rtol=1e-5)
    # frozen base weights are untouched in the training copy, only adapters were trained
    names = {n for n, p in FinetuneTask(cfg, torch.device("cpu")).model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)


def test_bf16_mixed_and_multimodal_training_step(tmp_path):
    import soundfile as sf
    from PIL import Image

    ck = make_checkpoint(tmp_path / "mm", tiny_config(mm=True))
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "g.png")
    sf.write(tmp_path / "s.wav", np.zeros(3000, dtype=np.float32), 16000)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "g.png"},
                                                       {"type": "input_audio",
                                                        "input_audio": {"data": "s.wav", "format": "wav"}}]},
                          {"role": "assistant", "content": "Green."}]}] * 4
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tc.from_dict({"output_dir": str(tmp_path / "out"), "model": {"checkpoint": str(ck),
                                                                       "precision": "bf16-mixed"},
                        "data": {"train": str(tmp_path / "d.jsonl"), "batch_size": 2, "num_workers": 1,
                                 "image_soft_tokens": 70},
                        "optim": {"steps": 2, "lr": 1e-3}})
    r = train(cfg)
    assert len(r.losses) == 2 and all(np.isfinite(r.losses))


def test_cli(work, tmp_path):
    from unigemma.train.cli import main

    y = tmp_path / "run.yaml"
    y.write_text(f"model:\n  checkpoint: {work / 'base'}\ndata:\n  train: {work / 'train.jsonl'}\n  num_workers: 0\n"
                 f"output_dir: {tmp_path / 'cli_out'}\noptim:\n  steps: 2\n")
    assert main([str(y), "--set", "optim.lr=1e-3", "--set", "log.every=1"]) == 0
    assert (tmp_path / "cli_out" / "final" / "model.safetensors").is_file()
    assert main([str(y), "--set", "optim.bogus=1"]) == 2


def test_init_gives_attention_a_usable_temperature(monkeypatch):
    """Gemma 4 attention has scale 1 (the q/k norm scales are the temperature): init_weights sets them to
    head_dim^-1/4, so fresh heads spread their attention instead of starting one-hot (scales of one give logits
    with std sqrt(head_dim) and a saturated softmax whose gradient is ~0)."""
    import torch.nn.functional as F

    cfg = tiny_config(hidden=64)
    cfg["text_config"].update(head_dim=64, global_head_dim=64, num_attention_heads=2)
    torch.manual_seed(0)
    model = Gemma4Unified(UnifiedConfig.from_dict(cfg))
    init_weights(model, 0.02)
    norms = {n: p for n, p in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))}
    assert len(norms) == 2 * 2 and all(torch.allclose(p, torch.full_like(p, 64 ** -0.25)) for p in norms.values())

    logit_std = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, scale=None, **kw):
        if q.shape[-2] == k.shape[-2] and q.shape[1] % k.shape[1] == 0:
            kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logit_std.append(float((q @ kk.transpose(-1, -2) * (1.0 if scale is None else scale)).std()))
        return real(q, k, v, attn_mask=attn_mask, scale=scale, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(30, 500, (2, 24))
    with torch.no_grad():
        model.run(ids)
        assert logit_std and max(logit_std) < 2.5, logit_std  # ~1: the usual 1/sqrt(d) temperature
        for p in norms.values():
            p.fill_(1.0)
        logit_std.clear()
        model.run(ids)
    assert min(logit_std) > 5.0, logit_std  # scales of one: std ~ sqrt(64) = 8, one-hot heads
