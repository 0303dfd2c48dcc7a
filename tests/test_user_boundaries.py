"""What a new user types, and what they are told: the Python API takes the CLI's spellings of "no drafter", and a
model path that is not a checkpoint folder (an image, a missing path, an empty folder) gets an error that says what
a model folder is, from the API and from the CLI (one line, status 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

import unigemma


@pytest.mark.parametrize("spelling", ["none", "off", "None", " OFF "])
def test_load_takes_the_cli_spellings_of_no_drafter(spelling):
    llm = unigemma.load(None, device="cpu", drafter=spelling)
    assert llm.drafter is None
    r = llm.generate("1 + 1", max_tokens=6, temperature=0)
    assert r.usage.drafted_tokens == 0


def test_bundled_model_keeps_its_drafter_by_default():
    assert unigemma.load(None, device="cpu").drafter is not None  # so the spellings above really turned it off


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "unigemma.cli", *args], capture_output=True, text=True, timeout=120)


def test_a_file_given_as_model_says_what_a_model_folder_is(tmp_path):
    png = tmp_path / "circle.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(png)
    with pytest.raises(ValueError, match=r"is a file, not a model: the model is a checkpoint folder: config\.json"):
        unigemma.load(png, device="cpu")
    r = _cli("generate", "--model", str(png), "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "codec" not in r.stderr, r.stderr
    assert "is a file, not a model" in r.stderr and "config.json, tokenizer.json and model.safetensors" in r.stderr
    r = _cli("inspect", str(png))
    assert r.returncode == 2 and "codec" not in r.stderr and "checkpoint folder" in r.stderr, r.stderr
    r = _cli("generate", "--drafter", str(png), "--prompt", "hi")
    assert r.returncode == 2 and "is a file, not a drafter" in r.stderr and "'none' for no drafter" in r.stderr


def test_missing_or_empty_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder; the model is a checkpoint folder"):
        unigemma.load(tmp_path / "nope", device="cpu")
    with pytest.raises(FileNotFoundError, match="has no config.json: the model is a checkpoint folder"):
        unigemma.load(tmp_path, device="cpu")
