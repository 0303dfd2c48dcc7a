"""The bundled demo model (unigemma/demo/model, built by scripts/demo/train_demo.py): it is what
`unigemma.load(None)` opens, its files and ids are consistent, it fits the size budget, and through the real
engine it answers in the trained forms, and gets what it has learned right (a red circle is "red").

The images here are drawn in the test (not taken from the training data): plain shapes on a light background,
as the demo data generator draws them. What this module does not test: the server (tests/test_server*.py) or
the accuracy figures of benchmarks/demo_eval.py.
"""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image, ImageDraw

import unigemma
from unigemma.api import demo_model_path
from unigemma.engine.generate import generate
from unigemma.outputs.parser import parse_response, start_state_for_prompt

SHIPPED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
           "generation_config.json", "processor_config.json")


@pytest.fixture(scope="module")
def llm():
    return unigemma.load(None, device="cpu")


def shape_png(path, shape: str, fill: tuple[int, int, int], size: int = 96, r: float = 30.0):
    """One filled shape in the middle of a light square image, drawn 4x larger and downsampled."""
    s = 4
    img = Image.new("RGB", (size * s, size * s), (244, 242, 236))
    d = ImageDraw.Draw(img)
    c = size * s / 2
    rr = r * s
    if shape == "circle":
        d.ellipse([c - rr, c - rr, c + rr, c + rr], fill=fill)
    elif shape == "square":
        h = rr / math.sqrt(2)
        d.rectangle([c - h, c - h, c + h, c + h], fill=fill)
    elif shape == "triangle":
        d.polygon([(c + rr * math.cos(math.radians(a)), c - rr * math.sin(math.radians(a))) for a in (90, 210, 330)],
                  fill=fill)
    else:
        raise ValueError(f"shape {shape!r}: this helper draws circle, square or triangle")
    img.resize((size, size), Image.Resampling.LANCZOS).save(path)
    return path


def ask(llm, messages, thinking: bool = False, max_tokens: int = 24):
    """Greedy chat turn through the engine; returns (parsed response, generation result)."""
    prompt = llm.build_prompt(messages, enable_thinking=thinking)
    res = generate(llm, prompt.input_ids, media=prompt.media or None, max_tokens=max_tokens, temperature=0.0)
    text = llm.tokenizer.decode(res.token_ids, skip_special_tokens=False)
    return parse_response(text, start_state_for_prompt(prompt.text)), res


def image_question(path, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(path), "max_soft_tokens": 70},
                                         {"type": "text", "text": question}]}]


def test_shipped_folder_is_complete_and_small():
    folder = demo_model_path()
    for name in SHIPPED:
        assert (folder / name).is_file(), f"missing {name}"
    total = sum(p.stat().st_size for p in folder.parent.rglob("*") if p.is_file())
    assert total <= 40 * 1024 * 1024, f"unigemma/demo is {total / 1e6:.1f} MB (budget 40 MB)"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_unified"
    assert cfg["vision_config"] is not None and cfg["audio_config"] is not None


def test_loads_by_default_with_consistent_ids(llm):
    cfg, tok = llm.config, llm.tokenizer
    assert llm.path == demo_model_path()
    assert cfg.vision is not None and cfg.audio is not None
    text = cfg.text
    assert {"sliding_attention", "full_attention"} <= set(text.layer_types)
    assert text.attention_k_eq_v
    assert text.vocab_size >= tok.backend.get_vocab_size()
    for attr, name in (("image_token_id", "<|image|>"), ("audio_token_id", "<|audio|>"),
                       ("boi_token_id", "<|image>"), ("eoi_token_id", "<image|>"),
                       ("boa_token_id", "<|audio>"), ("eoa_token_id", "<audio|>")):
        assert getattr(cfg, attr) == tok.token_to_id(name), attr
    assert tok.token_to_id("<turn|>") in llm.eos_token_ids
    n_params = sum(p.numel() for p in llm.model.parameters())
    assert 5e6 < n_params < 30e6


SHAPES = {"circle", "square", "triangle", "star", "diamond", "hexagon", "cross"}
COLOURS = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "black"}


def test_red_circle_gives_well_formed_and_right_answers(llm, tmp_path):
    """The red circle through the engine: each answer is one finished turn, and the right one."""
    png = shape_png(tmp_path / "red_circle.png", "circle", (220, 30, 30))
    parsed, res = ask(llm, image_question(png, "What shape is this?"))
    assert res.finish_reason == "stop" and not parsed.warnings and not parsed.tool_calls and not parsed.reasoning
    assert parsed.content.strip() == "circle"
    parsed, res = ask(llm, image_question(png, "What colour is the shape?"))
    assert res.finish_reason == "stop" and parsed.content.strip() == "red"
    parsed, res = ask(llm, image_question(png, "Describe the image."))
    words = parsed.content.strip().split()
    assert res.finish_reason == "stop" and len(words) == 3 and words[0] == "a"
    assert words[1] in COLOURS and words[2] in SHAPES


@pytest.mark.parametrize("shape,colour,rgb", [("circle", "red", (220, 30, 30)), ("square", "blue", (30, 80, 220)),
                                              ("triangle", "green", (30, 160, 60))])
def test_shape_and_colour_follow_the_image(llm, tmp_path, shape, colour, rgb):
    """Not one memorised answer: three shapes in three colours each get their own shape and colour."""
    png = shape_png(tmp_path / f"{shape}.png", shape, rgb)
    parsed, res = ask(llm, image_question(png, "What colour is the shape?"))
    assert res.finish_reason == "stop" and parsed.content.strip() == colour
    parsed, res = ask(llm, image_question(png, "What shape is in the picture?"))
    assert res.finish_reason == "stop" and parsed.content.strip() == shape


@pytest.mark.parametrize("shape,colour,rgb,question", [
    ("circle", "red", (220, 30, 30), "What shape and colour is this?"),
    ("square", "blue", (30, 80, 220), "What colour and shape is it?"),
    ("triangle", "green", (30, 160, 60), "What shape and color is the object?")])
def test_compound_question_gets_shape_and_colour(llm, tmp_path, shape, colour, rgb, question):
    """A question that asks for both (issue 14: "What shape and colour is this?" once got only "red") is answered
    with both: the colour and the shape of the drawn image, in the describe form."""
    png = shape_png(tmp_path / f"{shape}.png", shape, rgb)
    parsed, res = ask(llm, image_question(png, question))
    assert res.finish_reason == "stop" and not parsed.warnings and not parsed.tool_calls
    words = parsed.content.strip().rstrip(".").split()
    assert colour in words and shape in words, parsed.content


@pytest.mark.parametrize("a,b", [(17, 25), (48, 24), (77, 21)])
def test_addition_with_thinking_copies_the_digits_and_carries(llm, a, b):
    """Problems held out of the training split (make_data.eval_pool): the trace reads the operands' digits from
    the prompt (ones, then tens with the carry), and the answer is the sum."""
    parsed, res = ask(llm, [{"role": "user", "content": f"What is {a} + {b}?"}], thinking=True, max_tokens=80)
    assert res.finish_reason == "stop" and not parsed.warnings
    assert parsed.reasoning.startswith(f"ones: {a % 10} + {b % 10} = {a % 10 + b % 10}"), parsed.reasoning
    assert "tens:" in parsed.reasoning and parsed.reasoning.strip().endswith(f"{a} + {b} = {a + b}")
    assert parsed.content.strip() == str(a + b)


def test_live_session_on_the_demo_model():
    """A voice turn prefilled while it arrives (its context is capped by the model's 2,048 positions) answers like
    the one-shot chat of the same audio."""
    import numpy as np

    import unigemma

    llm = unigemma.load(None, device="cpu")
    wave = (0.1 * np.sin(np.arange(16000 * 2) * 0.05)).astype(np.float32)
    sess = llm.session(temperature=0, max_tokens=8)
    for i in range(0, wave.size, 3200):
        sess.append_audio(wave[i:i + 3200])
    live = "".join(c.content for c in sess.commit())
    sess.close()
    one = llm.chat([{"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)}]}], temperature=0,
                   max_tokens=8)
    assert live == one.content
