"""A checkpoint's own default image budget: `max_soft_tokens` in its processor config is what an image gets when
a request names none — through `llm.build_prompt`, the server and live sessions — and a bad value is an error that
names the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import unigemma
from unigemma.api import read_default_image_tokens
from unigemma.inputs.image import budget_for_detail

from tinyllm import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("transformers")
    return make_tiny_checkpoint(tmp_path_factory.mktemp("budget"), layers=2)


def image(tmp_path):
    p = tmp_path / "img.png"
    Image.fromarray((np.arange(96 * 96 * 3) % 251).astype(np.uint8).reshape(96, 96, 3)).save(p)
    return str(p)


def n_image_tokens(llm, ids) -> int:
    return sum(1 for t in ids if t == llm.config.image_token_id)


def test_processor_config_sets_the_default_budget(ckpt, tmp_path):
    assert read_default_image_tokens(ckpt) == 280  # no processor config: the processor's own default
    msg = [{"role": "user", "content": [{"type": "image", "image": image(tmp_path)}, {"type": "text", "text": "?"}]}]
    llm = unigemma.load(ckpt, device="cpu")
    big = n_image_tokens(llm, llm.build_prompt(msg).input_ids)
    (ckpt / "processor_config.json").write_text(json.dumps({"image_processor": {"max_soft_tokens": 70}}))
    try:
        llm = unigemma.load(ckpt, device="cpu")
        assert llm.default_image_tokens == 70
        small = n_image_tokens(llm, llm.build_prompt(msg).input_ids)
        assert small == 64 < big  # a 96×96 image: 8×8 soft tokens at budget 70, more at 280
        named = [{"role": "user", "content": [{"type": "image", "image": image(tmp_path), "max_soft_tokens": 280}]}]
        assert n_image_tokens(llm, llm.build_prompt(named).input_ids) == big  # a request's own budget wins
        sess = llm.session(max_tokens=1)
        sess.append_image(image(tmp_path))
        assert sess.turn.prompt.parts[-1]["max_soft_tokens"] == 70
        sess.close()
    finally:
        (ckpt / "processor_config.json").unlink()


def test_detail_auto_follows_the_model_default():
    assert budget_for_detail(None, 70) == 70 and budget_for_detail("auto", 70) == 70
    assert budget_for_detail("low", 280) == 70 and budget_for_detail("high", 70) == 1120


@pytest.mark.parametrize("name,body", [("processor_config.json", {"image_processor": {"max_soft_tokens": 100}}),
                                       ("preprocessor_config.json", {"max_soft_tokens": "70"})])
def test_bad_budget_names_the_file(tmp_path, name, body):
    (tmp_path / name).write_text(json.dumps(body))
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*max_soft_tokens must be one of"):
        read_default_image_tokens(tmp_path)
