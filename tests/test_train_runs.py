"""Training runs that must not lose work (issue 25): a finished run is never overwritten silently, a changed
config or data set never resumes silently, signals save a checkpoint, bad media is found up front naming its
JSONL line, and raw base64 / data-URI media is accepted in training data.

Tiny models (hidden 32, 2 layers) as in test_train; each test is a few seconds at most.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import arithmetic_jsonl, make_checkpoint, tiny_config
from unigemma.train import config as tc
from unigemma.train import loop
from unigemma.train.data import ChatDataset, DataError, MediaIds, chat_template_for
from unigemma.train.loop import RunConflict, train

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_checkpoint(root / "base", tiny_config())
    arithmetic_jsonl(root / "train.jsonl", 16)
    return root


def cfg_for(root: Path, out: str, **sections) -> tc.TrainConfig:
    d = {"output_dir": str(root / out), "model": {"checkpoint": str(root / "base")},
         "data": {"train": str(root / "train.jsonl"), "batch_size": 4, "num_workers": 0},
         "optim": {"lr": 3e-3, "steps": 6}, "log": {"every": 100}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return tc.from_dict(d)


# --- 1. resume only the same run; never overwrite a finished one ---------------------------------------------

def test_finished_run_is_not_overwritten(work, capsys):
    first = train(cfg_for(work, "done", optim={"steps": 4}, checkpoint={"every": 3}))
    final = first.output_dir / "final"
    before = (final / "model.safetensors").read_bytes()
    # the case: the same folder, fewer steps; it used to resume from checkpoint-3, run 0 steps, replace final
    with pytest.raises(RunConflict, match=r"already holds a finished run \(final/ at step 4\).*--overwrite"):
        train(cfg_for(work, "done", optim={"steps": 2}, checkpoint={"every": 3}))
    with pytest.raises(RunConflict, match="finished run"):  # the same config again: still finished
        train(cfg_for(work, "done", optim={"steps": 4}, checkpoint={"every": 3}))
    assert (final / "model.safetensors").read_bytes() == before
    again = train(cfg_for(work, "done", optim={"steps": 2}, checkpoint={"every": 3, "overwrite": True}))
    assert len(again.losses) == 2 and again.losses[0] == first.losses[0]  # from scratch, not resumed
    assert not (work / "done" / "checkpoint-000003").exists()
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 2


def test_changed_config_or_data_refuses_to_resume(work, tmp_path, capsys):
    arithmetic_jsonl(tmp_path / "train.jsonl", 16)
    base = dict(data={"train": str(tmp_path / "train.jsonl")}, optim={"steps": 6}, checkpoint={"every": 2})
    cut = train(cfg_for(work, "changed", **base), stop_after=2)
    assert cut.steps == 2
    with pytest.raises(RunConflict, match=r"checkpoint-000002 was written by a different run \(optim\.lr: "
                                          r"0\.003 -> 0\.001\).*--resume"):
        train(cfg_for(work, "changed", **{**base, "optim": {"steps": 6, "lr": 1e-3}}))
    arithmetic_jsonl(tmp_path / "train.jsonl", 16, offset=50)  # same path, other contents
    with pytest.raises(RunConflict, match="data.train: contents changed"):
        train(cfg_for(work, "changed", **base))
    # forced: resumes, and says from where and what changed
    capsys.readouterr()
    r = train(cfg_for(work, "changed", **{**base, "checkpoint": {"every": 2, "resume": "force"}}))
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-000002 (step 2 of 6)" in err and "contents changed" in err
    assert len(r.losses) == 4


def test_unchanged_resume_is_announced(work, capsys):
    train(cfg_for(work, "announce"), stop_after=3)
    capsys.readouterr()
    r = train(cfg_for(work, "announce", log={"every": 50}, data={"num_workers": 0}))  # logging: not the trajectory
    assert "resuming from" in capsys.readouterr().err and len(r.losses) == 3


def test_changed_lora_rank_is_a_clear_error(work):
    lora = {"enabled": True, "rank": 2, "alpha": 4, "targets": ["q_proj"]}
    train(cfg_for(work, "rank", lora=lora), stop_after=2)
    with pytest.raises(ValueError, match=r"lora_A has shape \(2, 32\) in the checkpoint but \(4, 32\) in this run "
                                         r"\(lora\.rank: 2 -> 4.*--overwrite"):
        train(cfg_for(work, "rank", lora={**lora, "rank": 4}, checkpoint={"resume": "force"}))


def test_checkpoint_past_the_end_is_refused(work):
    train(cfg_for(work, "past", optim={"steps": 6}), stop_after=4)
    with pytest.raises(ValueError, match=r"at step 4, not before optim.steps = 3: nothing to train"):
        train(cfg_for(work, "past", optim={"steps": 3}, checkpoint={"resume": "force"}))


# --- 3. signals save a checkpoint -----------------------------------------------------------------------------

def test_sigint_saves_a_checkpoint_and_resume_is_exact(work, monkeypatch):
    full = train(cfg_for(work, "sig_full"))
    real = loop.lr_at
    calls = []

    def lr_and_signal(step, *a, **k):  # the signal arrives in the middle of step 3 (0-based 2)
        calls.append(step)
        if step == 2 and len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(step, *a, **k)

    monkeypatch.setattr(loop, "lr_at", lr_and_signal)
    cut = train(cfg_for(work, "sig_cut"))
    monkeypatch.setattr(loop, "lr_at", real)
    assert cut.interrupted == "SIGINT" and cut.steps == 3 and cut.output_dir.name == "checkpoint-000003"
    assert not (work / "sig_cut" / "final").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    rest = train(cfg_for(work, "sig_cut"))
    assert cut.losses + rest.losses == full.losses


def test_sigterm_cli_saves_checkpoint_and_exits_143(work, tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "model": {"checkpoint": str(work / "base")},
                             "data": {"train": str(work / "train.jsonl"), "batch_size": 4, "num_workers": 0},
                             "optim": {"steps": 100000, "lr": 1e-3}, "log": {"every": 1}}))
    y = y.rename(tmp_path / "run.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "unigemma.train.cli", str(y)], stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    for line in proc.stderr:  # wait until training runs
        if line.startswith("step 2/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 143, rest
    assert "stopped by SIGTERM" in rest
    ckpts = list((tmp_path / "out").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file()
    assert not list((tmp_path / "out").glob("*.tmp"))


# --- 2 and 3. media: base64 accepted, bad media found up front --------------------------------------------------

def _wav_bytes(n: int = 8000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(n) / 5)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _mm_dataset(tmp_path: Path, rows: list[dict], **kw) -> ChatDataset:
    from unigemma.config import UnifiedConfig
    from unigemma.inputs.tokenizer import Tokenizer
    from unigemma.testing import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    (tmp_path / "d.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    ids = MediaIds.from_model(UnifiedConfig.from_dict(tiny_config(mm=True)), tok)
    return ChatDataset(tmp_path / "d.jsonl", tok, chat_template_for(tok), ids, 4096, image_soft_tokens=70, **kw)


def _row(*parts) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]},
                         {"role": "assistant", "content": "That."}]}


def test_raw_base64_and_data_uri_media(tmp_path):
    wav, png = _wav_bytes(), _png_bytes()
    b64 = base64.b64encode(wav).decode()
    assert len(b64) > 4096  # longer than any file name: a path lookup fails with "File name too long"
    rows = [_row({"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}),  # OpenAI's format
            _row({"type": "input_audio", "input_audio": {"data": "data:audio/wav;base64," + b64}}),
            _row({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                            + base64.b64encode(png).decode()}}),
            _row({"type": "image", "image": base64.b64encode(png).decode()})]
    ds = _mm_dataset(tmp_path, rows)
    assert len(ds) == 4
    a0, a1 = ds[0], ds[1]
    assert len(a0["audio"]) == 1 and np.array_equal(a0["audio"][0], a1["audio"][0])
    assert ds[2]["images"][0].num_tokens == ds[3]["images"][0].num_tokens > 0


def test_corrupt_media_named_up_front_and_skippable(tmp_path, capsys):
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    (tmp_path / "bad.png").write_bytes(_png_bytes()[:40])  # truncated
    rows = [_row({"type": "image", "image": "ok.png"}), _row({"type": "image", "image": "bad.png"}),
            _row({"type": "image", "image": "ok.png"})]
    with pytest.raises(DataError, match=r"d\.jsonl:2: image .*bad\.png.*skip_bad_records") as e:
        _mm_dataset(tmp_path, rows)
    assert len(str(e.value)) < 600
    ds = _mm_dataset(tmp_path, rows, skip_bad_records=True)
    assert len(ds) == 2 and len(ds.skipped) == 1 and "d.jsonl:2" in ds.skipped[0]
    assert "skipping bad record" in capsys.readouterr().err
    # a malformed JSON line is reported and skipped the same way
    with pytest.raises(DataError, match=r"d\.jsonl:4: invalid JSON"):
        _mm_dataset(tmp_path, [rows[0], rows[0], rows[0], "{not json"])
    assert len(_mm_dataset(tmp_path, [rows[0], "{not json", rows[0]], skip_bad_records=True)) == 2


def test_bad_media_fails_before_training(work, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [_row({"type": "image", "image": "bad.png"})] + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 7
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    make_checkpoint(tmp_path / "mm", tiny_config(mm=True))
    base = {"model": {"checkpoint": str(tmp_path / "mm")},
            "data": {"train": str(tmp_path / "t.jsonl"), "image_soft_tokens": 70}}
    with pytest.raises(DataError, match=r"t\.jsonl:1: image"):
        train(cfg_for(work, "badmedia", **base))
    r = train(cfg_for(work, "badmedia", **{**base, "data": {**base["data"], "skip_bad_records": True}},
                      optim={"steps": 2}))
    assert len(r.losses) == 2


# --- torchrun's automatic restart ---------------------------------------------------------------------------------

_CRASH_ONCE = '''
import os, sys
from unigemma.train import loop

real = loop.lr_at


def crash_once(step, *a, **k):  # worker 1 dies in its 4th step, on the first attempt only
    if step == 3 and os.environ["RANK"] == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        os._exit(3)
    return real(step, *a, **k)


loop.lr_at = crash_once
from unigemma.train.cli import main

sys.exit(main(sys.argv[1:]))
'''


def test_torchrun_restart_resumes_from_the_last_checkpoint(work, tmp_path):
    """`torchrun --max-restarts N`: a worker dies, torchrun restarts the group, and the run resumes from its latest
    checkpoint. With torchrun's static rendezvous (MASTER_ADDR / MASTER_PORT, no --standalone) the restarted group
    used to read the dead workers' addresses from the store ("Gloo connectFullMesh failed ... Connection
    refused"); with --standalone it did so only sometimes."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "launch.py").write_text(_CRASH_ONCE)
    y = tmp_path / "run.json"
    y.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "model": {"checkpoint": str(work / "base")},
                             "data": {"train": str(work / "train.jsonl"), "batch_size": 2, "num_workers": 0},
                             "optim": {"steps": 5, "lr": 1e-3}, "log": {"every": 1}, "checkpoint": {"every": 2},
                             "distributed": {"strategy": "ddp"}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "1",
                           str(tmp_path / "launch.py"), str(y)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "checkpoint-000002 (step 2 of 5)" in proc.stderr
    state = json.loads((tmp_path / "out" / "final" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["world_size"] == 2


def test_cli_flags_resume_overwrite_skip(work, tmp_path, capsys):
    from unigemma.train.cli import main

    y = tmp_path / "run.json"
    y.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "model": {"checkpoint": str(work / "base")},
                             "data": {"train": str(work / "train.jsonl"), "batch_size": 4, "num_workers": 0},
                             "optim": {"steps": 2, "lr": 1e-3}, "log": {"every": 1}}))
    assert main([str(y)]) == 0
    capsys.readouterr()
    assert main([str(y), "--set", "optim.steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a finished run" in err and "--overwrite" in err
    assert main([str(y), "--set", "optim.steps=1", "--overwrite", "--skip-bad-records"]) == 0
    assert json.loads((tmp_path / "out" / "final" / "trainer_state.json").read_text())["step"] == 1
    # --resume continues a changed run from its latest checkpoint
    assert main([str(y), "--set", "optim.steps=4", "--set", "output_dir=" + str(tmp_path / "o2"),
                 "--set", "checkpoint.every=2", "--set", "optim.lr=1e-3"]) == 0
    import shutil

    shutil.rmtree(tmp_path / "o2" / "final")
    capsys.readouterr()
    assert main([str(y), "--set", "optim.steps=6", "--set", "output_dir=" + str(tmp_path / "o2"),
                 "--set", "checkpoint.every=2"]) == 2
    assert "optim.steps: 4 -> 6" in capsys.readouterr().err
    assert main([str(y), "--set", "optim.steps=6", "--set", "output_dir=" + str(tmp_path / "o2"),
                 "--set", "checkpoint.every=2", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
