"""Tests for unigemma.outputs.detokenize: UTF-8-safe streaming, exact agreement with a full decode, O(1) windows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unigemma.inputs.tokenizer import Tokenizer
from unigemma.outputs.detokenize import IncrementalDetokenizer
from unigemma.testing import write_tiny_tokenizer

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return Tokenizer.from_dir(path)


def stream(tok, ids, skip=False, prompt_ids=None, chunks=None):
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip, prompt_ids=prompt_ids)
    if chunks is None:
        deltas = [det.add(i) for i in ids]
    else:
        deltas, pos = [], 0
        for n in chunks:
            deltas.append(det.add_many(ids[pos:pos + n]))
            pos += n
        deltas.append(det.add_many(ids[pos:]))
    deltas.append(det.finish())
    return deltas, det


MULTIBYTE = "Héllo wörld 🙂 テスト 漢字 👍🏽 café Ωμέγα ⚙️ 😀😃 naïve"


def test_multibyte_characters_split_across_tokens(tok):
    ids = tok.encode(MULTIBYTE)
    # the test has teeth: some tokens are partial characters that decode alone to U+FFFD
    assert sum(FFFD in tok.decode([i]) for i in ids) >= 6
    deltas, det = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == MULTIBYTE
    assert not any(FFFD in d for d in deltas)
    assert det.text == MULTIBYTE and det.token_ids == ids
    # every emitted piece is whole characters: held-back tokens produce "" until the character completes
    assert "" in deltas[:-1] and any(d.endswith("字") for d in deltas)


def test_special_tokens_kept_or_skipped(tok):
    text = '<|turn>model\n<|channel>thought\n<channel|>Hi 🙂<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|><turn|>'
    ids = tok.encode(text)
    assert tok.token_to_id("<|turn>") in ids and tok.token_to_id('<|"|>') in ids
    kept, _ = stream(tok, ids)
    assert "".join(kept) == text
    assert "<|turn>" in kept and "<turn|>" in kept  # specials arrive as their own delta
    skipped, _ = stream(tok, ids, skip=True)
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True)
    assert "<|turn>" not in "".join(skipped) and "Hi 🙂" in "".join(skipped)


def test_add_many_matches_add(tok):
    ids = tok.encode(MULTIBYTE * 2)
    one_by_one, _ = stream(tok, ids)
    for chunks in ([3, 1, 4, 1, 5], [2] * 20, [len(ids)]):
        chunked, _ = stream(tok, ids, chunks=chunks)
        assert "".join(chunked) == "".join(one_by_one)
        assert not any(FFFD in d for d in chunked)


def test_prompt_context(tok):
    prompt = tok.encode("<|turn>user\nSay hi<turn|>\n<|turn>model\n")
    out = tok.encode("Héllo 🙂 there")
    deltas, det = stream(tok, out, prompt_ids=prompt)
    assert "".join(deltas) == tok.decode(prompt + out)[len(tok.decode(prompt)):]
    assert det.token_ids == out


def test_incomplete_tail_is_flushed_as_the_full_decode_shows_it(tok):
    ids = tok.encode("ab 漢")
    partial = ids[:-1]  # the last character cut mid-way
    det = IncrementalDetokenizer(tok)
    emitted = "".join(det.add(i) for i in partial)
    assert FFFD not in emitted
    assert emitted + det.finish() == tok.decode(partial) and tok.decode(partial).endswith(FFFD)


def test_cost_per_token_is_constant(tok):
    """Each decode call sees a bounded window, however long the stream."""
    class Counting:
        def __init__(self, inner):
            self.inner, self.max_window, self.calls = inner, 0, 0

        def decode(self, ids, skip_special_tokens=False):
            ids = list(ids)
            self.max_window = max(self.max_window, len(ids))
            self.calls += 1
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(MULTIBYTE * 60)
    assert len(ids) > 2000
    counting = Counting(tok)
    deltas, _ = stream(counting, ids)
    assert "".join(deltas) == MULTIBYTE * 60
    assert counting.max_window <= 8 and counting.calls <= 2 * len(ids) + 2


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
def test_random_unicode_roundtrip(tok, text):
    ids = tok.encode(text)
    full = tok.decode(ids)
    deltas, _ = stream(tok, ids)
    assert "".join(deltas) == full == text
    if FFFD not in full:
        assert not any(FFFD in d for d in deltas)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_token_ids_agree_with_full_decode(tok, data):
    """Arbitrary id sequences (invalid UTF-8, specials, partial characters): streaming never emits text that
    the full decode later contradicts, and the pieces join to the full decode."""
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    skip = data.draw(st.booleans())
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    so_far = ""
    for n, i in enumerate(ids, 1):
        so_far += det.add(i)
        assert tok.decode(ids[:n], skip_special_tokens=skip).startswith(so_far)
    so_far += det.finish()
    assert so_far == tok.decode(ids, skip_special_tokens=skip)
    if FFFD not in so_far:
        assert det.text == so_far


def test_sentencepiece_style_decoder_with_byte_fallback():
    """Gemma's own tokenizer decodes with ▁ → space and byte fallback; a Strip decoder also drops the leading
    space of whatever it is given, so decoding token by token would lose every space. The window keeps it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    vocab = {"<pad>": 0, "<eos>": 1, "▁hello": 2, "▁world": 3, "!": 4, "▁": 5}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    sp = Tokenizer(hf)
    han = [vocab[f"<0x{b:02X}>"] for b in "漢".encode()]
    ids = [2, 3, 5, *han, 4, 2]
    assert "".join(sp.decode([i]) for i in ids) != sp.decode(ids)  # naive per-token decoding is wrong here
    deltas, _ = stream(sp, ids)
    assert "".join(deltas) == sp.decode(ids) == "hello world 漢! hello"
    assert not any(FFFD in d for d in deltas)
