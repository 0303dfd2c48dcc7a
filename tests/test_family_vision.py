"""The family's vision path (`gemma4` vision_config) vs the reference, transformers 5.24.0:

- the vision encoder alone (`Gemma4VisionModel`, with standardisation, clipped linears and grouped K/V heads
  switched on) and inside the full model: fp32 max |Δ| ≤ 1e-4 for encoder outputs and logits with images (and
  with frames through the model's video arguments);
- the image processor (`Gemma4ImageProcessor`) bit for bit on the committed golden outputs
  (tests/fixtures/golden/family_images.npz, scripts/make_family_golden.py): every image case × every budget and a
  batched call — no torchvision needed here;
- images through `llm.build_prompt` / `llm.chat` (greedy = the reference's greedy) and the server (openai SDK:
  200 and the prompt token counts of the budgets, with an audio clip beside the image).
The audio encoder and features: tests/test_family_audio.py.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import unigemma
from refmodels import FAMILY, FAMILY_TEXT, family_config, randomize
from unigemma.inputs.image import FAMILY_PATCH_SIZE, batch_images, pad_rows, preprocess_image
from unigemma.model.encoders.vision import VisionTower

pytestmark = pytest.mark.usefixtures("no_grad")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "golden" / "family_images.npz"
BUDGETS = (70, 140, 280, 560, 1120)


def close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    d = (a - b).abs().max().item()
    return d <= 1e-4, d


def _generator():
    spec = importlib.util.spec_from_file_location("make_golden_fixtures", ROOT / "scripts" / "make_golden_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _pattern_image(w: int, h: int, seed: int):
    from PIL import Image

    return Image.fromarray(_generator()._pattern(h, w, seed))


# --- processor: golden outputs of the reference ------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def cases():
    return _generator().image_cases()


@pytest.mark.parametrize("budget", BUDGETS)
def test_image_processor_matches_reference_bit_for_bit(golden, cases, budget):
    """Every golden image case at this budget: soft-token count, resized size, and the exact float32 pixel values
    and int64 positions (padding rows included) of the reference's output."""
    for name, build in cases.items():
        f = preprocess_image(build(), budget, patch_size=FAMILY_PATCH_SIZE)
        key = f"{name}|{budget}"
        assert f.pixel_values.shape == (9 * budget, 768) and f.position_ids.shape == (9 * budget, 2), key
        assert f.num_tokens == int(golden[f"{key}|num"]), key
        assert list(f.size) == golden[f"{key}|size"].tolist(), key
        if f"{key}|patches" in golden:  # where stored, the uint8 patches themselves (shows *where* a diff is)
            u8 = torch.round(f.pixel_values[: 9 * f.num_tokens] * 255).to(torch.uint8).numpy()
            np.testing.assert_array_equal(u8, golden[f"{key}|patches"], err_msg=key)
        assert _sha(f.pixel_values) == str(golden[f"{key}|pixel_sha"]), key
        assert _sha(f.position_ids) == str(golden[f"{key}|pos_sha"]), key


def test_batched_images_match_reference(golden, cases):
    names = ("rgb_640x480", "rgb_1x1", "la", "array_rgb_chw")
    pv, pos, num = batch_images([cases[n]() for n in names], 140, patch_size=FAMILY_PATCH_SIZE)
    assert list(pv.shape) == golden["batch|shape"].tolist() and num == golden["batch|num"].tolist()
    assert _sha(pv) == str(golden["batch|pixel_sha"]) and _sha(pos) == str(golden["batch|pos_sha"])


def test_family_patches_are_the_unified_resize_cut_finer():
    """The same resized image as the unified processor's, in 16-px patches: 9 per soft token, raster order,
    (x, y) positions on the 16-px grid, padding rows zero / −1."""
    img = _pattern_image(200, 90, 3)
    uni = preprocess_image(img, 70)
    fam = preprocess_image(img, 70, patch_size=FAMILY_PATCH_SIZE)
    assert fam.num_tokens == uni.num_tokens and fam.size == uni.size and fam.rows_per_token == 9
    h, w = fam.size
    gw = w // 16
    n = 9 * fam.num_tokens
    assert fam.position_ids[:n].tolist() == [[i % gw, i // gw] for i in range(n)]
    assert (fam.position_ids[n:] == -1).all() and not fam.pixel_values[n:].any()
    # patch (x, y) of the fine grid is the 16×16 crop at rows 16y.., columns 16x.. of the resized image, which the
    # unified 48-px patch (x//3, y//3) holds at offset (16·(y%3), 16·(x%3))
    big = uni.pixel_values[: uni.num_tokens].view(-1, 48, 48, 3)
    small = fam.pixel_values[:n].view(-1, 16, 16, 3)
    for i in (0, 5, gw + 7, n - 1):
        x, y = i % gw, i // gw
        crop = big[(y // 3) * (w // 48) + x // 3, 16 * (y % 3):16 * (y % 3) + 16, 16 * (x % 3):16 * (x % 3) + 16]
        assert torch.equal(small[i], crop)
    with pytest.raises(ValueError, match="patch_size must be 48"):
        preprocess_image(img, 70, patch_size=32)


# --- the encoder alone, every option on -------------------------------------------------------------------------

def test_vision_encoder_with_every_option_equals_reference():
    """`Gemma4VisionModel` with standardize, use_clipped_linears (finite bounds that bite) and 4 query heads over
    2 K/V heads, 2 layers: our tower loads its state dict under the same names and gives the same soft tokens for
    two images of different budgets and aspect ratios (padded to one batch)."""
    from transformers import Gemma4VisionConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    from unigemma.config import VisionTowerConfig

    d = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, position_embedding_size=64, standardize=True, use_clipped_linears=True,
             rope_parameters={"rope_type": "axial", "rope_theta": 50.0})
    torch.manual_seed(0)
    ref = Gemma4VisionModel(Gemma4VisionConfig(**d)).eval()
    randomize(ref, 3)
    g = torch.Generator().manual_seed(4)
    for name, b in ref.named_buffers():
        if name.endswith(("input_min", "output_min")):
            b.fill_(-1.5 - torch.rand((), generator=g).item())
        elif name.endswith(("input_max", "output_max")):
            b.fill_(1.5 + torch.rand((), generator=g).item())
        elif name.endswith("std_bias"):
            b.copy_(torch.randn(b.shape, generator=g))
        elif name.endswith("std_scale"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
    ours = VisionTower(VisionTowerConfig.from_dict(ref.config.to_dict())).eval()
    state = {k: v for k, v in ref.state_dict().items() if "rotary_emb" not in k}
    ours.load_state_dict(state, strict=True)

    a = preprocess_image(_pattern_image(131, 47, 5), 70, patch_size=16)
    b = preprocess_image(_pattern_image(40, 90, 6), 140, patch_size=16)
    rows = max(a.pixel_values.shape[0], b.pixel_values.shape[0])
    padded = [pad_rows(f.pixel_values, f.position_ids, rows) for f in (a, b)]
    pv = torch.stack([v for v, _ in padded])
    pos = torch.stack([p for _, p in padded])
    expected = ref(pixel_values=pv, pixel_position_ids=pos).last_hidden_state
    got = ours(pv, pos)
    assert got.shape == expected.shape == (a.num_tokens + b.num_tokens, 32)
    ok, diff = close(got, expected)
    assert ok, f"max |Δ| = {diff:.3g}"
    # the options matter: without clipping / standardisation the outputs differ
    ours.encoder.layers[0].mlp.down_proj.clipped = False
    assert not close(ours(pv, pos), expected)[0]


# --- the full model with images ---------------------------------------------------------------------------------

def build_family_vision_checkpoint(path: Path):
    """FAMILY["e"] (E2B / E4B style, vision + audio towers) with the tiny tokenizer's vocabulary and special ids,
    bidirectional attention over image blocks; returns the reference model (eval, fp32)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from unigemma.inputs.tokenizer import Tokenizer
    from unigemma.testing import write_tiny_tokenizer

    ids = write_tiny_tokenizer(path)
    vocab = len(Tokenizer.from_dir(path))
    base = family_config("e")
    text = {**FAMILY_TEXT, **FAMILY["e"][0], "vocab_size": vocab, "vocab_size_per_layer_input": vocab,
            "use_bidirectional_attention": "vision", "pad_token_id": ids["pad_token"],
            "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"]}
    cfg = Gemma4Config(text_config=text, vision_config=base.vision_config.to_dict(),
                       audio_config=base.audio_config.to_dict(), image_token_id=ids["image_token"],
                       audio_token_id=ids["audio_token"], video_token_id=ids["video_token"],
                       boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"], boa_token_id=ids["boa_token"],
                       eoa_token_index=ids["eoa_token"])
    torch.manual_seed(0)
    ref = Gemma4ForConditionalGeneration(cfg).eval()
    randomize(ref, 11)
    ref.save_pretrained(str(path), max_shard_size="200KB")
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["eos_token"], ids["eot_token"]], "bos_token_id": ids["bos_token"],
         "pad_token_id": ids["pad_token"]}))
    # the tiny audio tower reads 8 mel bins (its first conv has 8 channels, as the published one has 128 for 128)
    (path / "processor_config.json").write_text(json.dumps({"feature_extractor": dict(MEL_SETTINGS)}))
    return ref


MEL_SETTINGS = {"feature_size": 8, "mel_floor": 0.001, "max_frequency": 8000.0}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    path = tmp_path_factory.mktemp("family_vision")
    ref = build_family_vision_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llm = unigemma.load(path, device="cpu", dtype="float32")
    return ref, llm, path


def _messages(*images, text="Describe:"):
    content = [{"type": "text", "text": text}]
    content += [{"type": "image", "image": im, **({"max_soft_tokens": b} if b else {})} for im, b in images]
    return [{"role": "user", "content": content}]


def _mm_types(input_ids: torch.Tensor, cfg) -> torch.Tensor:
    return (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()


def test_loads_both_towers_under_the_checkpoint_names(fam):
    _, llm, path = fam
    cfg = llm.config
    assert cfg.vision_tower is not None and cfg.audio_tower is not None and cfg.vision is None and cfg.audio is None
    assert cfg.skipped_towers == () and llm.mel_settings.feature_size == 8
    names = {n for n, _ in llm.model.named_parameters()} | {n for n, _ in llm.model.named_buffers()}
    for n in ("model.vision_tower.patch_embedder.position_embedding_table",
              "model.embed_vision.embedding_projection.weight", "model.audio_tower.layers.0.self_attn.per_dim_scale",
              "model.embed_audio.embedding_projection.weight",
              "model.audio_tower.layers.0.lconv1d.linear_start.input_min"):
        assert n in names, n
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped any more: no warning
        unigemma.load(path, device="cpu", dtype="float32")



def test_logits_with_images_equal_reference(fam):
    """Two images at budgets 70 and 140 through `llm.build_prompt` (our processor, placeholders expanded): the
    reference's logits for the same ids and pixels, every position; also the encoder output alone."""
    ref, llm, _ = fam
    p = llm.build_prompt(_messages((_pattern_image(300, 200, 1), 70), (_pattern_image(64, 150, 2), 140)))
    ids = torch.tensor([p.input_ids])
    media = p.media
    n_img = int((ids == llm.config.image_token_id).sum())
    assert media["pixel_values"].shape == (2, 9 * 140, 768) and n_img > 64
    enc_ref = ref.model.vision_tower(pixel_values=media["pixel_values"],
                                     pixel_position_ids=media["image_position_ids"]).last_hidden_state
    enc = llm.model.model.vision_tower(media["pixel_values"], media["image_position_ids"])
    assert enc.shape[0] == n_img
    ok, d = close(enc, enc_ref)
    assert ok, f"encoder: max |Δ| = {d:.3g}"
    expected = ref(input_ids=ids, mm_token_type_ids=_mm_types(ids, llm.config), **media).logits
    ok, d = close(llm.model(ids, **media), expected)
    assert ok, f"logits: max |Δ| = {d:.3g}"


def test_frames_through_the_video_arguments_equal_reference(fam):
    """The encoder serves video frames too (model level: `pixel_values_videos`, per-frame 16-px patches)."""
    ref, llm, _ = fam
    c = llm.config
    frames = [preprocess_image(_pattern_image(96, 64, 10 + i), 70, patch_size=16) for i in range(3)]
    pv = torch.stack([f.pixel_values for f in frames])
    pos = torch.stack([f.position_ids for f in frames])
    per = frames[0].num_tokens
    ids = [2, 30, 31]
    for _ in frames:
        ids += [c.boi_token_id] + [c.video_token_id] * per + [c.eoi_token_id] + [32]
    ids = torch.tensor([ids])
    media = dict(pixel_values_videos=pv, video_position_ids=pos, num_frames_per_video=torch.tensor([3]))
    expected = ref(input_ids=ids, mm_token_type_ids=_mm_types(ids, c), **media).logits
    ok, d = close(llm.model(ids, **media), expected)
    assert ok, f"max |Δ| = {d:.3g}"


@pytest.fixture(scope="module")
def golden_video():
    return np.load(ROOT / "tests" / "fixtures" / "golden" / "family_video.npz")


def test_video_processor_matches_reference_bit_for_bit(golden_video):
    """The golden MP4 sampled three ways (32 frames, 8 frames, 3 fps): frame indices, timestamps, soft tokens per
    frame, and the exact `pixel_values_videos` / `video_position_ids` of `Gemma4VideoProcessor` (budget 70)."""
    from unigemma.inputs.video import load_video

    gen = _generator()
    data = gen.make_video_bytes()
    assert hashlib.sha256(data).hexdigest() == str(golden_video["file_sha"])
    for name, kw in gen.VIDEO_CONFIGS.items():
        v = load_video(data, patch_size=FAMILY_PATCH_SIZE, **kw)
        assert v.frame_indices == golden_video[f"{name}|indices"].tolist(), name
        assert v.timestamps == golden_video[f"{name}|timestamps"].tolist(), name
        assert v.num_tokens_per_frame == int(golden_video[f"{name}|num"]), name
        assert list(v.pixel_values.shape) == golden_video[f"{name}|shape"].tolist(), name
        assert _sha(v.pixel_values) == str(golden_video[f"{name}|pixel_sha"]), name
        assert _sha(v.position_ids.to(torch.int64)) == str(golden_video[f"{name}|pos_sha"]), name


def test_logits_with_a_video_equal_reference(fam):
    """A 4-frame video part through `llm.build_prompt` ("mm:ss" + BOI + frame tokens + EOI per frame): every
    logit equals the reference's for the same ids and frames."""
    ref, llm, _ = fam
    data = _generator().make_video_bytes()
    p = llm.build_prompt([{"role": "user", "content": [{"type": "text", "text": "What happens?"},
                                                       {"type": "video", "video": data, "num_frames": 4}]}])
    ids = torch.tensor([p.input_ids])
    m = p.media
    assert m["pixel_values_videos"].shape[0] == 4 and m["pixel_values_videos"].shape[-1] == 768
    assert int((ids == llm.config.video_token_id).sum()) == 4 * 63  # 160×120 at budget 70: 9×7 tokens a frame
    expected = ref(input_ids=ids, mm_token_type_ids=_mm_types(ids, llm.config), **m).logits
    ok, d = close(llm.model(ids, **m), expected)
    assert ok, f"max |Δ| = {d:.3g}"


def test_chat_with_an_image_is_the_reference_greedy(fam):
    """`llm.chat` with an image (engine: prefill with the image, cached decode) = the reference's greedy choice
    step by step (full forwards, no cache), 8 tokens."""
    ref, llm, _ = fam
    msgs = _messages((_pattern_image(120, 160, 7), 70))
    p = llm.build_prompt(msgs)
    out = llm.chat(msgs, max_tokens=8, temperature=0)
    seq = list(p.input_ids)
    expected = []
    for _ in range(8):
        ids = torch.tensor([seq])
        nxt = int(ref(input_ids=ids, mm_token_type_ids=_mm_types(ids, llm.config), **p.media).logits[0, -1].argmax())
        expected.append(nxt)
        seq.append(nxt)
        if nxt in llm.eos_token_ids:
            break
    assert out.usage.prompt_tokens == len(p.input_ids)
    assert list(out.token_ids)[: len(expected)] == expected and len(out.token_ids) >= len(expected) - 1


# --- the server: image_url with the openai SDK --------------------------------------------------------------------

def _png_uri(w: int = 64, h: int = 64) -> str:
    from PIL import Image

    img = Image.fromarray((np.arange(w * h * 3) % 251).astype(np.uint8).reshape(h, w, 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_image_and_audio_prompt_token_counts(fam):
    openai = pytest.importorskip("openai")
    from test_server import LiveServer

    from unigemma.server import ServerSettings

    _, llm, _ = fam
    settings = ServerSettings(model_name="tiny-family", max_model_len=512, max_concurrency=2)
    with LiveServer(llm, settings) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(*parts, **extra):
            return client.chat.completions.create(
                model="tiny-family", max_tokens=2, temperature=0, extra_body=extra or None,
                messages=[{"role": "user", "content": [{"type": "text", "text": "Describe:"}, *parts]}])

        base = ask()
        low = ask({"type": "image_url", "image_url": {"url": _png_uri(), "detail": "low"}})
        # a square image at budget 70: an 8×8 grid of soft tokens (24×24 16-px patches) + BOI + EOI
        assert low.usage.prompt_tokens - base.usage.prompt_tokens == 64 + 2
        assert low.choices[0].finish_reason in ("length", "stop")
        mid = ask({"type": "image_url", "image_url": {"url": _png_uri(), "max_soft_tokens": 140}})
        assert mid.usage.prompt_tokens - base.usage.prompt_tokens == 121 + 2
        # the same prompt through the Python API counts the same
        p = llm.build_prompt(_messages((_png_uri(), 70)))
        assert len(p.input_ids) == low.usage.prompt_tokens
        import soundfile as sf

        from unigemma.inputs.mel import MelSettings, log_mel, num_mel_tokens
        wav = io.BytesIO()
        wave = (np.sin(np.arange(16000) / 5.0) * 0.3).astype(np.float32)  # 1 s at 16 kHz
        sf.write(wav, wave, 16000, format="WAV", subtype="FLOAT")
        audio_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.getvalue()).decode(),
                                                             "format": "wav"}}
        both = ask({"type": "image_url", "image_url": {"url": _png_uri(), "detail": "low"}}, audio_part)
        n_audio = num_mel_tokens(log_mel(wave, MelSettings(**MEL_SETTINGS))[1])
        assert n_audio == 25  # 1 s = 100 mel frames (the last one masked) → 25 soft tokens of 40 ms
        assert both.usage.prompt_tokens - low.usage.prompt_tokens == n_audio + 2
        assert both.choices[0].finish_reason in ("length", "stop")


def test_cli_generate_with_image_and_audio(fam, tmp_path, capsys):
    """`unigemma generate --image --audio` on a family checkpoint: the prompt counts the image at the default budget
    (a square at 280: 16×16 soft tokens) and 1 s of audio (25 soft tokens), each with its BOI/EOI or BOA/EOA."""
    import json as _json

    import soundfile as sf
    from PIL import Image

    from unigemma.cli import main

    _, llm, path = fam
    Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(tmp_path / "x.png")
    sf.write(tmp_path / "x.wav", (np.sin(np.arange(16000) / 5.0) * 0.3).astype(np.float32), 16000)
    common = ["generate", "--model", str(path), "--prompt", "Describe", "--max-tokens", "2", "--temperature", "0",
              "--json"]
    main(common)
    base = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])["usage"]["prompt_tokens"]
    main(common + ["--image", str(tmp_path / "x.png"), "--audio", str(tmp_path / "x.wav")])
    out = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["usage"]["prompt_tokens"] - base == (256 + 2) + (25 + 2)
    assert out["finish_reason"] in ("length", "stop")
