"""The family's audio path (`gemma4` audio_config) vs the reference, transformers 5.24.0:

- the conformer alone (`Gemma4AudioModel`, clipped linears with bounds that bite, a logit cap that bites, right
  context, two layers) and inside the full model with real mel features from `llm.build_prompt`: fp32 max |Δ| ≤ 1e-4;
- the mel features (`Gemma4AudioFeatureExtractor`, pure numpy, so compared live): bit for bit, for mono and stereo
  clips at 8 / 16 / 44.1 / 48 kHz, shorter than one attention chunk and longer than 30 s (cut into 30-s segments,
  each its own BOA … EOA item, as the unified model's long audio is), and for a batch of different lengths.
Decoding, down-mixing and resampling are the unified model's (tests/test_audio.py); here they only feed the clips.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refmodels import randomize
from test_family_vision import MEL_SETTINGS, close, fam  # noqa: F401  (the shared checkpoint fixture)
from unigemma.inputs.audio import load_audio_segments
from unigemma.inputs.mel import MelSettings, batch_mel, log_mel, num_mel_tokens
from unigemma.model.encoders.audio import AudioTower

pytestmark = pytest.mark.usefixtures("no_grad")


def _wave(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    """A chirp + noise clip, (samples,) or (samples, channels), float32 in [−1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    base = 0.4 * np.sin(2 * np.pi * (200 + 900 * t / max(seconds, 1e-3)) * t) + 0.05 * rng.standard_normal(t.size)
    if channels == 1:
        return base.astype(np.float32)
    return np.stack([base, 0.5 * base + 0.1 * rng.standard_normal(t.size)], axis=1).astype(np.float32)


def _reference_extractor(**kw):
    from transformers import Gemma4AudioFeatureExtractor

    return Gemma4AudioFeatureExtractor(**kw)


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_mel_features_equal_reference_bit_for_bit(rate, channels):
    ref = _reference_extractor()
    seconds = [0.2, 2.7] + ([31.0] if channels == 1 and rate in (16000, 44100) else [])
    for i, s in enumerate(seconds):
        segments = load_audio_segments((_wave(s, rate, channels, i), rate))
        assert len(segments) == (2 if s > 30 else 1)
        for seg in segments:
            expected = ref([seg], return_tensors="np")
            feats, mask = log_mel(seg)
            np.testing.assert_array_equal(feats, expected["input_features"][0], err_msg=f"{rate} Hz {s} s")
            np.testing.assert_array_equal(mask, expected["input_features_mask"][0])
            # the processor's placeholder count (the mask after two stride-2 convolutions)
            t, m = len(mask), mask
            for _ in range(2):
                t_out = (t + 2 - 3) // 2 + 1
                m = m[::2][:t_out]
                t = len(m)
            assert num_mel_tokens(mask) == int(m.sum())


def test_mel_batch_and_checkpoint_settings_equal_reference():
    """Clips of different lengths in one call, and non-default settings (pre-emphasis, per-bin normalisation,
    input scale, fewer mel bins) as a checkpoint's processor config would give them."""
    clips = [_wave(s, 16000, 1, 7 + i) for i, s in enumerate((0.05, 1.3, 0.77))]
    expected = _reference_extractor()(clips, return_tensors="np")
    feats, mask = batch_mel([log_mel(c) for c in clips])
    np.testing.assert_array_equal(feats.numpy(), expected["input_features"])
    np.testing.assert_array_equal(mask.numpy(), expected["input_features_mask"])
    custom = dict(feature_size=40, preemphasis=0.97, input_scale_factor=1.5, min_frequency=60.0,
                  per_bin_mean=list(np.linspace(-2, 1, 40)), per_bin_stddev=list(np.linspace(0.5, 3, 40)))
    expected = _reference_extractor(**custom)([clips[1]], return_tensors="np")["input_features"][0]
    np.testing.assert_array_equal(log_mel(clips[1], MelSettings.from_dict(custom))[0], expected)
    with pytest.raises(ValueError, match="dither"):
        MelSettings.from_dict({"dither": 1e-4})


def test_audio_encoder_with_every_option_equals_reference():
    from transformers import Gemma4AudioConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel

    from unigemma.config import AudioTowerConfig

    d = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[8, 4],
             conv_kernel_size=3, attention_chunk_size=4, attention_context_left=5, attention_context_right=2,
             attention_logit_cap=3.0, use_clipped_linears=True, output_proj_dims=24, residual_weight=0.7)
    torch.manual_seed(0)
    ref = Gemma4AudioModel(Gemma4AudioConfig(**d)).eval()
    randomize(ref, 5)
    g = torch.Generator().manual_seed(6)
    for name, b in ref.named_buffers():
        if name.endswith(("input_min", "output_min")):
            b.fill_(-1.0 - torch.rand((), generator=g).item())
        elif name.endswith(("input_max", "output_max")):
            b.fill_(1.0 + torch.rand((), generator=g).item())
    ours = AudioTower(AudioTowerConfig.from_dict(ref.config.to_dict())).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    feats = torch.randn(2, 61, 8, generator=g) * 2
    mask = torch.ones(2, 61, dtype=torch.bool)
    mask[1, 37:] = False
    expected = ref(feats, mask)
    got, valid = ours(feats, mask)
    assert torch.equal(valid, expected.attention_mask)
    ok, diff = close(got[valid], expected.last_hidden_state[valid])
    assert ok, f"max |Δ| = {diff:.3g}"
    ours.layers[0].self_attn.cap = 50.0  # the cap bites: without it the outputs differ
    assert not close(ours(feats, mask)[0][valid], expected.last_hidden_state[valid])[0]


def test_logits_with_audio_equal_reference(fam):  # noqa: F811
    """A 16 kHz mono clip and a 44.1 kHz stereo clip (and an image) through `llm.build_prompt`: the features equal
    the reference extractor's (with the checkpoint's 8-bin settings), the encoder output and every logit the
    reference's."""
    ref, llm, _ = fam
    from test_family_vision import _messages, _mm_types, _pattern_image

    msgs = _messages((_pattern_image(90, 120, 4), 70))
    msgs[0]["content"] += [{"type": "audio", "audio": (_wave(1.3, 16000, 1, 1), 16000)},
                           {"type": "audio", "audio": (_wave(0.7, 44100, 2, 2), 44100)}]
    p = llm.build_prompt(msgs)
    segs = [load_audio_segments((_wave(1.3, 16000, 1, 1), 16000))[0],
            load_audio_segments((_wave(0.7, 44100, 2, 2), 44100))[0]]
    expected_feats = _reference_extractor(**MEL_SETTINGS)(segs, return_tensors="pt")
    assert torch.equal(p.media["input_features"], expected_feats["input_features"])
    assert torch.equal(p.media["input_features_mask"], expected_feats["input_features_mask"])
    ids = torch.tensor([p.input_ids])
    f, m = p.media["input_features"], p.media["input_features_mask"]
    enc_ref = ref.model.audio_tower(f, m)
    enc, valid = llm.model.model.audio_tower(f, m)
    assert torch.equal(valid, enc_ref.attention_mask)
    assert int(valid.sum()) == int((ids == llm.config.audio_token_id).sum())
    ok, d = close(enc[valid], enc_ref.last_hidden_state[valid])
    assert ok, f"encoder: max |Δ| = {d:.3g}"
    expected = ref(input_ids=ids, mm_token_type_ids=_mm_types(ids, llm.config), **p.media).logits
    ok, d = close(llm.model(ids, **p.media), expected)
    assert ok, f"logits: max |Δ| = {d:.3g}"
    out = llm.chat(msgs, max_tokens=3, temperature=0)  # the engine path runs with audio + image
    assert out.usage.prompt_tokens == len(p.input_ids)


# --- live audio: mel and encoder streams --------------------------------------------------------------------------

def _pieces(wave: np.ndarray, sizes) -> list[np.ndarray]:
    out, i = [], 0
    while i < wave.size:
        for s in sizes:
            out.append(wave[i:i + s])
            i += s
    return [c for c in out if c.size]


def test_streamed_mel_and_encoder_equal_one_shot(fam):  # noqa: F811
    """Samples in uneven pieces (shorter than one attention chunk, and spanning several): the mel frames are the
    one-shot frames bit for bit, the encoder rows the one-shot encoder's (≤ 1e-5), for clips that end mid-frame."""
    from unigemma.inputs.mel import MelStream
    from unigemma.model.encoders.audio import AudioStream

    _, llm, _ = fam
    tower = llm.model.model.audio_tower
    s = llm.mel_settings
    for seconds in (0.05, 0.61, 2.333):
        wave = _wave(seconds, 16000, 1, 11)
        feats, mask = log_mel(wave, s)
        whole, valid = tower(torch.from_numpy(feats)[None], torch.from_numpy(mask)[None])
        mel, enc, frames, rows = MelStream(s), AudioStream(tower), [], []
        for c in _pieces(wave, (37, 800, 160, 2500)):
            f = mel.push(c)
            frames.append(f)
            rows.append(enc.push(torch.from_numpy(f)))
        tail, tail_mask = mel.finish()
        last, last_valid = enc.finish(torch.from_numpy(tail), torch.from_numpy(tail_mask))
        np.testing.assert_array_equal(np.concatenate(frames + [tail]), feats)
        got = torch.cat(rows + [last[last_valid]])
        assert got.shape[0] == int(valid.sum()) == num_mel_tokens(mask)
        assert (got - whole[0][valid[0]]).abs().max().item() <= 1e-5, seconds


def test_live_session_equals_one_shot_chat(fam):  # noqa: F811
    """A live turn (text, then audio in 0.1-s chunks, prefilled as it arrives) has the one-shot prompt's ids and
    answers as `llm.chat` does; past 30 s the audio becomes two items, as build_prompt cuts it."""
    from unigemma.realtime import IncrementalPrompt, Session

    _, llm, _ = fam
    wave = _wave(1.37, 16000, 1, 12)
    with Session(llm, temperature=0, max_tokens=6) as sess:
        sess.append_text("Listen:")
        for c in _pieces(wave, (1600,)):
            sess.append_audio(c)
            assert sess.prefilled == len(sess.prompt_ids)
        res = sess.commit(stream=False)
    msg = [{"role": "user", "content": [{"type": "text", "text": "Listen:"},
                                        {"type": "audio", "audio": (wave, 16000)}]}]
    ref = llm.chat(msg, temperature=0, max_tokens=6)
    assert res.usage.prompt_tokens == ref.usage.prompt_tokens
    assert res.token_ids == ref.token_ids
    p = IncrementalPrompt(llm)
    long = _wave(30.5, 16000, 1, 13)
    for c in _pieces(long, (16000,)):
        p.append_audio(c)
    p.close()
    one_shot = llm.build_prompt([p.message()])
    assert p.ids == one_shot.input_ids
    assert p.ids.count(llm.config.boa_token_id) == 2
