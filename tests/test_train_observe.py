"""Watching a training run (issue 25): interval-mean loss, tokens/s, peak memory and ETA in every log record, a
progress bar, TensorBoard scalars and generated answers to eval prompts.

Tiny models (hidden 32, 2 layers) as in test_train.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_train import arithmetic_jsonl, make_checkpoint, tiny_config
from unigemma.train import config as tc
from unigemma.train.loop import train


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("observe")
    make_checkpoint(root / "base", tiny_config())
    arithmetic_jsonl(root / "train.jsonl", 16)
    arithmetic_jsonl(root / "eval.jsonl", 4, offset=100)
    return root


def cfg_for(root: Path, out: str, **sections) -> tc.TrainConfig:
    d = {"output_dir": str(root / out), "model": {"checkpoint": str(root / "base")},
         "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "batch_size": 4,
                  "num_workers": 0},
         "optim": {"lr": 3e-3, "steps": 6}, "log": {"every": 3, "progress": "lines"}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return tc.from_dict(d)


def test_log_records_tensorboard_and_generations(work, capsys):
    r = train(cfg_for(work, "obs", log={"report_to": ["tensorboard"]},
                      eval={"every": 3, "prompts": str(work / "eval.jsonl"), "max_prompts": 2, "max_new_tokens": 5}))
    recs = [json.loads(x) for x in (r.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "tokens_per_s" in x]
    assert [x["step"] for x in steps] == [3, 6]
    # the logged loss is the mean over the interval, not the last step's
    assert steps[0]["loss"] == pytest.approx(np.mean(r.losses[:3])) and steps[0]["loss_last_step"] == r.losses[2]
    assert steps[1]["loss"] == pytest.approx(np.mean(r.losses[3:6]))
    assert all(x["tokens_per_s"] > 0 and x["peak_mem_mb"] > 0 and x["eta_s"] >= 0 for x in steps)
    assert steps[1]["eta_s"] == 0
    evals = [x for x in recs if "generations" in x]
    assert [x["step"] for x in evals] == [3, 6]  # mid-run eval and the final summary
    g = evals[0]["generations"]
    assert len(g) == 2 and g[0]["prompt"] == "What is 2 plus 0?" and g[0]["expected"] == "It is 2."
    assert all(isinstance(x["generated"], str) for x in g)
    err = capsys.readouterr().err
    assert "(mean of 3)" in err and "tok/s" in err and "peak" in err and "eta" in err and "-> " in err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(r.output_dir / "tensorboard"), size_guidance={"tensors": 0})
    ea.Reload()
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [3, 6] and loss[0].value == pytest.approx(np.mean(r.losses[:3]), rel=1e-6)
    assert [e.step for e in ea.Scalars("eval/eval_loss")] == [3, 6]
    assert "eval/generation_0/text_summary" in ea.Tags()["tensors"]


def test_progress_bar(work, capsys):
    train(cfg_for(work, "bar", log={"progress": "bar", "every": 6}, data={"eval": None}))
    err = capsys.readouterr().err
    assert "6/6" in err and "step 6/6" in err


def test_report_to_is_validated(work):
    with pytest.raises(tc.TrainConfigError, match=r"log\.report_to\[0\] = 'mlflow' is not supported"):
        cfg_for(work, "x", log={"report_to": ["mlflow"]})
