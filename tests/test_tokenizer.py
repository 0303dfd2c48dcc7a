"""Tokenizer loading: tokenizer.json + special tokens from tokenizer_config.json / special_tokens_map.json."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from unigemma.inputs.tokenizer import Tokenizer
from unigemma.testing import GEMMA4_SPECIALS, write_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    p = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(p, chat_template="{{ messages }}")
    return Tokenizer.from_dir(p)


def test_specials_and_template(tok):
    for name, text in GEMMA4_SPECIALS:
        assert tok.specials[name] == text
        assert tok.encode(text) == [tok.id_of(name)]
    assert tok.bos_token_id == tok.id_of("bos_token") and tok.eos_token_id == tok.id_of("eos_token")
    assert tok.chat_template == "{{ messages }}"
    with pytest.raises(KeyError, match="no special token 'nope'"):
        tok.id_of("nope")


def test_bos_handling(tok):
    ids = tok.encode("hello", add_bos=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # a rendered chat prompt already starts with <bos>: never a second one
    assert tok.encode("<bos>hi", add_bos=True).count(tok.bos_token_id) == 1
    assert tok.encode("hello")[0] != tok.bos_token_id


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_map_and_template_file(tmp_path):
    write_tiny_tokenizer(tmp_path, chat_template="inline")
    (tmp_path / "chat_template.jinja").write_text("from file")  # the separate file wins, as in transformers
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["eot_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eot_token": {"content": "<turn|>"}}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.chat_template == "from file"
    assert t.specials["eot_token"] == "<turn|>"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
