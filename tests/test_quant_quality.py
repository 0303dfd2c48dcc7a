"""benchmarks/quant_quality.py: teacher-forced perplexity over assistant tokens (with image and audio prompts) and
top-1 agreement of int8 / int4 variants with the float model, on the tiny checkpoint and a tiny synthetic split."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tinyllm import make_tiny_checkpoint

import unigemma
from unigemma import quant
from unigemma.train.data import IGNORE, DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quant_quality as qq  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def write_split(root: Path) -> Path:
    """Six records in the demo split's shape (extra keys, media paths relative to the file): image, audio, text,
    thinking on, a system prompt."""
    import soundfile as sf
    from PIL import Image

    (root / "media").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(root / "media" / "red.png")
    Image.new("RGB", (48, 64), (20, 30, 220)).save(root / "media" / "blue.png")
    sf.write(root / "media" / "beep.wav", (0.1 * np.sin(np.arange(6400) / 5)).astype(np.float32), 16000)
    img = lambda p: {"type": "image", "image": p, "max_soft_tokens": 70}  # noqa: E731
    rows = [
        [{"role": "user", "content": [img("media/red.png"), {"type": "text", "text": "What colour is it?"}]},
         {"role": "assistant", "content": "red"}],
        [{"role": "user", "content": [{"type": "audio", "audio": "media/beep.wav"},
                                      {"type": "text", "text": "What do you hear?"}]},
         {"role": "assistant", "content": "a beep, then silence"}],
        [{"role": "user", "content": "What is 12 plus 7?"}, {"role": "assistant", "content": "19"}],
        [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": [{"type": "text", "text": "And this one?"}, img("media/blue.png")]},
         {"role": "assistant", "content": "blue, a rectangle"}],
        [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "one two three four five"}],
        [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
    ]
    path = root / "val.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, msgs in enumerate(rows):
            fh.write(json.dumps({"id": f"val-{i}", "task": "t", "meta": {"i": i}, "enable_thinking": i == 2,
                                 "messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qq")
    return make_tiny_checkpoint(root / "model", seed=1), write_split(root / "data")


def by(lines, impl, metric, **cfg):
    hits = [x for x in lines if x["impl"] == impl and x["metric"] == metric
            and all(x["config"][k] == v for k, v in cfg.items())]
    assert len(hits) == 1, (impl, metric, cfg, hits)
    return hits[0]


def test_float_perplexity_is_the_label_cross_entropy(tiny):
    ckpt, data = tiny
    lines = qq.quality(ckpt, data, ["int8", "int4-g32"], batch_size=4, image_soft_tokens=70)
    f = by(lines, "unigemma", "perplexity")
    assert f["bench"] == "quant_quality" and f["unit"] == "ppl" and f["records"] == 6
    assert math.isfinite(f["value"]) and f["value"] >= 1.0

    # Independently: each example alone (no padding, no batching), full logits from the public forward, the
    # labels the training pipeline makes. Same count of positions, same perplexity.
    llm = unigemma.load(ckpt, device="cpu")
    examples = qq.build_examples(qq.read_records(data), data.parent, llm.tokenizer, llm.config, 4096, 70)
    assert sum(len(e["images"]) for e in examples) == 2 and len([e for e in examples if e["audio"]]) == 1
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            batch = qq.collate([e], 0)
            logits = llm.model(batch["input_ids"], **qq.model_inputs(batch))[0]
            y = batch["labels"][0]
            total += float(F.cross_entropy(logits.double(), y, ignore_index=IGNORE, reduction="sum"))
            count += int((y != IGNORE).sum())
    assert f["label_tokens"] == count > 20
    assert f["value"] == pytest.approx(math.exp(total / count), rel=1e-4)

    # quantized variants: each has its three lines, measured on the same positions, and differs from float
    for impl, cfg in (("unigemma-int8", dict(bits=8)), ("unigemma-int4", dict(bits=4, group_size=32))):
        p = by(lines, impl, "perplexity", **cfg)
        inc = by(lines, impl, "perplexity_increase", **cfg)
        agree = by(lines, impl, "top1_agreement", **cfg)
        assert p["label_tokens"] == count and p["value"] != f["value"]
        assert inc["value"] == pytest.approx(p["value"] / f["value"] - 1, rel=1e-9)
        assert 0.0 <= agree["value"] <= 1.0 and agree["met"] == (agree["value"] >= agree["target"])
    int8, int4 = by(lines, "unigemma-int8", "perplexity"), by(lines, "unigemma-int4", "perplexity")
    assert abs(math.log(int8["value"] / f["value"])) < abs(math.log(int4["value"] / f["value"]))
    assert by(lines, "unigemma-int8", "top1_agreement")["value"] >= 0.9


def test_int8_exact_on_a_model_whose_weights_lie_on_the_int8_grid(tiny, tmp_path):
    """Snap every weight matrix to the int8 grid (per row, what int8 quantization stores): int8 then reproduces
    the float model — same argmax everywhere, the same perplexity — while int4 still changes it."""
    ckpt, data = tiny
    snapped = tmp_path / "snapped"
    snapped.mkdir()
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors":
            state = load_file(str(f))
            for k, w in state.items():
                if w.dim() == 2 and w.is_floating_point():
                    q, s = quant.quantize_int8(w)
                    state[k] = (q.float() * s[:, None]).to(w.dtype)
            save_file(state, str(snapped / f.name), metadata={"format": "pt"})
        else:
            (snapped / f.name).write_bytes(f.read_bytes())
    lines = qq.quality(snapped, data, ["int8", "int4-g32", "int4-g32-zp-embf"], batch_size=3)
    assert by(lines, "unigemma-int8", "top1_agreement")["value"] == 1.0
    assert abs(by(lines, "unigemma-int8", "perplexity_increase")["value"]) < 1e-5
    for cfg in (dict(zero_point=False, embeddings="int8"), dict(zero_point=True, embeddings="float")):
        assert abs(by(lines, "unigemma-int4", "perplexity_increase", **cfg)["value"]) > 1e-4


def test_variant_names_and_records(tmp_path):
    assert qq.parse_variant("int8") == quant.QuantConfig(bits=8)
    assert qq.parse_variant("int4-g128-zp-embf") == quant.QuantConfig(4, 128, True, "float")
    assert qq.config_fields(qq.parse_variant("int8-embf"))["group_size"] is None
    for bad, match in [("int3", "unknown kind"), ("int4", "group size"), ("int4-g48", "group size"),
                       ("int8-zp", "int4 only"), ("int4-g32-fast", "unexpected suffix 'fast'"),
                       ("int4-g32-zp-zp", "unexpected suffix")]:
        with pytest.raises(ValueError, match=match):
            qq.parse_variant(bad)
    p = tmp_path / "d.jsonl"
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    p.write_text(json.dumps({"id": 1, "task": "x", "meta": {}, "messages": turn}) + "\n\n"
                 + json.dumps(turn) + "\n{oops\n")
    assert [r.where for r in qq.read_records(p, limit=2)] == [f"{p}:1", f"{p}:3"]  # bare lists, blanks skipped
    with pytest.raises(DataError, match=r"d\.jsonl:4: invalid JSON"):
        qq.read_records(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        qq.read_records(tmp_path / "missing.jsonl")
