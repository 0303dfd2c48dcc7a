"""Sequence packing with attention kept inside each packed sequence (the loss equals the unpacked batch's), and
`data.train_on: last_turn` (issue 25). Tiny models as in test_train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import arithmetic_jsonl, make_checkpoint, tiny_config
from unigemma.config import UnifiedConfig
from unigemma.inputs.tokenizer import Tokenizer
from unigemma.model.unified import Gemma4Unified
from unigemma.testing import write_tiny_tokenizer
from unigemma.train import config as tc
from unigemma.train.data import (IGNORE, ChatDataset, MediaIds, chat_template_for, collate, collate_packed,
                                 pack_rows)
from unigemma.train.loop import CausalLMLoss, init_weights, train


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_pack_rows_first_fit():
    rows = pack_rows([5, 9, 3, 7, 12], 12)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 9, 3, 7, 12][i] for i in r) <= 12 for r in rows) and len(rows) == 3


def test_packed_loss_and_gradients_equal_unpacked(tmp_path):
    import soundfile as sf
    from PIL import Image

    write_tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "r.png")
    sf.write(tmp_path / "a.wav", (0.1 * np.sin(np.arange(4000) / 3)).astype(np.float32), 16000)
    rows = [{"messages": [{"role": "user", "content": f"Question {i} " + "word " * (3 * i)},
                          {"role": "assistant", "content": f"Answer {i} is " + "long " * i}]} for i in range(5)]
    rows.insert(1, {"messages": [{"role": "user", "content": [{"type": "image", "image": "r.png"},
                                                              {"type": "text", "text": "Colour?"}]},
                                 {"role": "assistant", "content": "Red."}]})
    rows.insert(4, {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                                 {"role": "assistant", "content": "A tone."}]})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = UnifiedConfig.from_dict(tiny_config(mm=True))
    ds = ChatDataset(tmp_path / "d.jsonl", tok, chat_template_for(tok), MediaIds.from_model(cfg, tok), 4096,
                     image_soft_tokens=70)
    examples = [ds[i] for i in range(len(ds))]
    lens = [len(e["input_ids"]) for e in examples]
    assert max(lens) > 8  # longer than the sliding window: the window must follow per-sequence positions
    torch.manual_seed(0)
    model = Gemma4Unified(cfg)
    init_weights(model, 0.05)
    loss = CausalLMLoss(model)
    plain, packed = collate(examples), collate_packed(examples, row_len=max(lens) + 40)
    assert packed["input_ids"].shape[0] < len(examples) and packed["num_targets"] == plain["num_targets"]
    assert packed["num_tokens"] == plain["num_tokens"]
    grads = []
    sums = []
    for batch in (plain, packed):
        model.zero_grad()
        s, n = loss(batch)
        s.backward()
        sums.append((float(s.detach()), int(n)))
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert sums[0][1] == sums[1][1]
    assert sums[1][0] == pytest.approx(sums[0][0], rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # without the segment mask the packed rows would see each other: the loss would differ
    cut = {k: v for k, v in packed.items() if k != "segment_ids"}
    with torch.no_grad():
        leak, _ = loss(cut)
    assert abs(float(leak) - sums[0][0]) > 1e-3


def test_packed_training_run_matches_unpacked(tmp_path):
    make_checkpoint(tmp_path / "base", tiny_config())
    arithmetic_jsonl(tmp_path / "t.jsonl", 16)

    def run(out, packing):
        return train(tc.from_dict({"output_dir": str(tmp_path / out), "model": {"checkpoint": str(tmp_path / "base")},
                                   "data": {"train": str(tmp_path / "t.jsonl"), "batch_size": 4, "num_workers": 0,
                                            "packing": packing, "max_seq_len": 128},
                                   "optim": {"lr": 3e-3, "steps": 5}, "log": {"every": 100}}))

    a, b = run("plain", False), run("packed", True)
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-4)
    assert b.losses[-1] < b.losses[0]


def test_train_on_last_turn(tmp_path):
    write_tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    conv = {"messages": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "First."},
                         {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Second."}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(conv) + "\n")
    ids = MediaIds.from_model(UnifiedConfig.from_dict(tiny_config()), tok)

    def trained(train_on):
        ds = ChatDataset(tmp_path / "d.jsonl", tok, chat_template_for(tok), ids, train_on=train_on)
        return tok.decode([int(t) for t in ds[0]["labels"] if t != IGNORE])

    assert trained("all_turns") == "First.<turn|>Second.<turn|>"
    assert trained("last_turn") == "Second.<turn|>"
    with pytest.raises(tc.TrainConfigError, match=r"data\.train_on = 'first'"):
        tc.from_dict({"model": {"checkpoint": "x"}, "data": {"train": "t", "train_on": "first"}})
