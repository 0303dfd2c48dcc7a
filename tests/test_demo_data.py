"""The demo dataset generator, tokenizer builder and audio augmentation (scripts/demo/).

One small dataset is generated per session (about 150 examples, 2–3 s) and checked: byte-identical reruns
(also with two worker processes), split separation and held-out voices/fonts, rendering and tokenizing of every
conversation as training will see it, tool calls against their tools' schemas, JSON answers against their
schemas, image answers against the pixels, and audio files (16 kHz mono, not silent).

espeak-ng and the fonts are system packages. Without them these tests fail (they never skip): install with
`apt-get install -y espeak-ng fonts-dejavu-core fonts-liberation`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo"
sys.path.insert(0, str(DEMO))

import augment  # noqa: E402
import make_data as md  # noqa: E402
import make_tokenizer as mt  # noqa: E402

from unigemma.inputs.image import num_image_tokens  # noqa: E402
from unigemma.inputs.template import ChatTemplate  # noqa: E402
from unigemma.inputs.tokenizer import Tokenizer  # noqa: E402
from unigemma.testing import GEMMA4_SPECIALS  # noqa: E402

SIZES = {"train": 80, "val": 12, "test": 60}
SEED = 5


@pytest.fixture(scope="module")
def resources() -> md.Resources:
    try:
        espeak = md.find_espeak(install=False)
    except ValueError as e:
        pytest.fail(f"{e}\n(CI: .ci/run must apt-get install espeak-ng before the tests)")
    fonts = md.find_fonts(install=False)
    if not all(n in fonts for n in md.HELD_OUT_FONTS) or not any(n in fonts for n in md.TRAIN_FONTS):
        pytest.fail("the demo fonts are missing: apt-get install -y fonts-dejavu-core fonts-liberation")
    return md.Resources(espeak=espeak, fonts=fonts)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, resources) -> Path:
    out = tmp_path_factory.mktemp("demo")
    md.generate(out, SIZES, SEED, jobs=1, res=resources)
    return out


@pytest.fixture(scope="module")
def records(dataset) -> dict[str, list[dict]]:
    return {s: md.read_jsonl(dataset / f"{s}.jsonl") for s in SIZES}


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.bundled()


def _all(records):
    return [r for s in SIZES for r in records[s]]


def _media(rec: dict, kind: str) -> list[dict]:
    return [p for m in rec["messages"] if isinstance(m.get("content"), list) for p in m["content"]
            if p["type"] == kind]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- determinism and layout ----------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(tmp_path, resources):
    sizes = {"train": 24, "val": 4, "test": 16}
    md.generate(tmp_path / "a", sizes, 11, jobs=1, res=resources)
    md.generate(tmp_path / "b", sizes, 11, jobs=2, res=resources)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b
    assert sum(k.endswith(".wav") for k in a) > 3 and sum(k.endswith(".png") for k in a) > 5
    md.generate(tmp_path / "c", sizes, 12, jobs=1, res=resources)
    assert _tree(tmp_path / "c")["train.jsonl"] != a["train.jsonl"]  # the seed matters


def test_records_have_the_training_format(dataset, records):
    for split, n in SIZES.items():
        recs = records[split]
        assert len(recs) == n
        assert Counter(r["task"] for r in recs) == {t: c for t, c in md.task_counts(n).items() if c}
        for r in recs:
            assert r["split"] == split and r["id"].startswith(split + "-")
            assert isinstance(r["enable_thinking"], bool) and isinstance(r["held_out"], bool)
            assert r["messages"][-1]["role"] == "assistant" and isinstance(r["answer"], str) and r["answer"]
            for part in _media(r, "image") + _media(r, "audio"):
                rel = part.get("image") or part.get("audio")
                assert not Path(rel).is_absolute() and rel.startswith(split + "/")
                assert (dataset / rel).is_file()
            for part in _media(r, "image"):
                assert part["max_soft_tokens"] == md.MAX_SOFT_TOKENS
            assert ("tools" in r) == (r["task"] == "tool")
            assert ("response_format" in r) == (r["task"] == "json")
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["counts"]["train"] == md.task_counts(SIZES["train"])
    assert manifest["fonts"]["held_out"] == list(md.HELD_OUT_FONTS)


def test_task_counts_are_whole_and_sum_to_n():
    for n in (0, 1, 7, 100, 20000):
        counts = md.task_counts(n)
        assert sum(counts.values()) == n and set(counts) == set(md.TASK_WEIGHTS)
    assert md.task_counts(1000)["digit"] == 140


# --- splits and held-out voices / fonts ----------------------------------------------------------------------------

def _voice_held(meta: dict) -> bool:
    return meta["voice"] in md.HELD_OUT_VOICES or meta["variant"] in md.HELD_OUT_VARIANTS


def test_held_out_voices_and_fonts_only_in_test(records):
    for split in ("train", "val"):
        for r in records[split]:
            assert not r["held_out"]
            if r["task"] in ("digit", "number", "transcribe"):
                assert r["meta"]["voice"] in md.TRAIN_VOICES and r["meta"]["variant"] in md.TRAIN_VARIANTS
            if r["task"] == "text":
                assert r["meta"]["font"] in md.TRAIN_FONTS
    flags = Counter()
    for r in records["test"]:
        if r["task"] in ("digit", "number", "transcribe"):
            assert r["held_out"] == _voice_held(r["meta"])
        elif r["task"] == "text":
            assert r["held_out"] == (r["meta"]["font"] in md.HELD_OUT_FONTS)
        else:
            assert not r["held_out"]
        if r["task"] in md.HOLDABLE:
            flags[r["held_out"]] += 1
    assert flags[True] >= 3 and flags[False] >= 3  # the test split compares seen and unseen


def test_splits_share_no_media_and_no_arithmetic_problem(dataset, records):
    digests: dict[str, str] = {}
    for split in SIZES:
        for p in sorted((dataset / split).iterdir()):
            d = hashlib.sha256(p.read_bytes()).hexdigest()
            assert d not in digests, f"{p} duplicates {digests.get(d)}"
            digests[d] = str(p)
    problems = {s: {(r["meta"]["a"], r["meta"]["op"], r["meta"]["b"]) for r in records[s] if r["task"] == "arithmetic"}
                for s in SIZES}
    assert problems["train"] and problems["test"]
    assert not problems["train"] & (problems["val"] | problems["test"])
    assert all(md.eval_pool(a, b, op) == (s != "train") for s in SIZES for a, op, b in problems[s])


# --- rendering and tokenizing -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, records, template) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok")
    corpus = mt.corpus_from_records(records["train"], template)
    ids = mt.write_tokenizer(out, mt.train_tokenizer(corpus, 700))
    assert ids["special_ids"] == {name: i for i, (name, _) in enumerate(GEMMA4_SPECIALS)}
    return Tokenizer.from_dir(out)


def test_every_conversation_renders_and_tokenizes(records, template, tokenizer):
    ids = tokenizer.special_ids
    for r in _all(records):
        segments = md.training_segments(r, template)
        assert len(segments) == sum(m["role"] == "assistant" for m in r["messages"])
        n_img, n_aud = len(_media(r, "image")), len(_media(r, "audio"))
        for k, (prompt, completion) in enumerate(segments):
            text = prompt + completion
            toks = tokenizer.encode(text)
            assert toks[0] == ids["bos_token"] and toks.count(ids["bos_token"]) == 1
            assert toks.count(ids["image_token"]) == n_img and toks.count(ids["audio_token"]) == n_aud
            assert tokenizer.decode(toks) == text
            assert completion.endswith("<turn|>") or completion.endswith("<|tool_response>")
            assert "<|turn>" not in completion and completion.count("<turn|>") <= 1
            if not r["enable_thinking"] and prompt.endswith("<|turn>model\n<|channel>thought\n<channel|>"):
                assert not completion.startswith("<|channel>")
        final = segments[-1][1]
        assert final == _expected_final(r), r["id"]


def _expected_final(r: dict) -> str:
    last = r["messages"][-1]
    head = ""
    if r["enable_thinking"]:
        assert last.get("reasoning_content"), r["id"]
        opened = any(m.get("tool_calls") for m in r["messages"])  # after tool results the prompt opens the channel
        head = ("" if opened else "<|channel>thought\n") + last["reasoning_content"] + "\n<channel|>"
    return head + last["content"] + "<turn|>"


def test_thinking_and_tool_segments_are_what_inference_generates(records, template):
    recs = records["train"] + records["test"]
    arith = next(r for r in recs if r["task"] == "arithmetic" and r["enable_thinking"])
    (prompt, completion), = md.training_segments(arith, template)
    assert prompt.endswith("<|turn>model\n") and "<|think|>" in prompt
    assert completion.startswith("<|channel>thought\nones: ") and completion.endswith(f"<channel|>{arith['answer']}<turn|>")
    tool = next(r for r in recs if r["task"] == "tool" and r["meta"]["calls"] and not r["enable_thinking"])
    (p1, c1), (p2, c2) = md.training_segments(tool, template)
    assert p1.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert c1.startswith("<|tool_call>call:") and c1.endswith("<tool_call|><|tool_response>")
    assert p2.endswith("<tool_response|>") and c2 == tool["answer"] + "<turn|>"


def test_tokenizer_splits_digits_and_keeps_specials_first(tokenizer):
    toks = tokenizer.encode("12 + 345")
    assert [tokenizer.id_to_token(t) for t in toks if tokenizer.id_to_token(t).isdigit()] == list("12345")
    for i, (name, text) in enumerate(GEMMA4_SPECIALS):
        assert tokenizer.token_to_id(text) == i and tokenizer.encode(text) == [i]


def test_make_tokenizer_cli_writes_a_loadable_folder(dataset, tmp_path, capsys):
    assert mt.main(["--data", str(dataset), "--out", str(tmp_path / "tok"), "--vocab-size", "600"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids["eos_token_id"] == [1, 16, 9] and ids["image_token_id"] == 19 and ids["eoa_token_index"] == 22
    assert ids["vocab_size"] <= 600
    tok = Tokenizer.from_dir(tmp_path / "tok")
    assert tok.vocab_size == ids["vocab_size"]
    assert tok.chat_template == (md.REPO / "unigemma/templates/gemma4_chat_template.jinja").read_text()
    again = mt.train_tokenizer(mt.corpus_from_records(md.read_jsonl(dataset / "train.jsonl")), 600)
    assert again.to_str() == tok.backend.to_str()  # deterministic for the same corpus


# --- tools and JSON ---------------------------------------------------------------------------------------------

def test_tool_calls_validate_against_their_tools(records):
    n_calls = 0
    for r in _all(records):
        if r["task"] != "tool":
            continue
        declared = {t["function"]["name"]: t["function"]["parameters"] for t in r["tools"]}
        assert 2 <= len(declared) <= 3
        calls = [c for m in r["messages"] if m["role"] == "assistant" for c in m.get("tool_calls", [])]
        answered = [m["tool_call_id"] for m in r["messages"] if m["role"] == "tool"]
        assert [c["id"] for c in calls] == answered
        assert [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                for c in calls] == r["meta"]["calls"]
        for c in calls:
            name, args = c["function"]["name"], json.loads(c["function"]["arguments"])
            assert name in declared, (r["id"], name)
            jsonschema.validate(args, declared[name])
            if name == "convert_units":
                assert args["from_unit"] in md.UNIT_NAMES and args["to_unit"] in md.UNIT_NAMES
            n_calls += 1
        for m in r["messages"]:
            if m["role"] == "tool":
                result = json.loads(m["content"]) if isinstance(m["content"], str) else m["content"]
                assert any(str(v) in r["answer"] for v in result.values() if not isinstance(v, str) or v != "celsius")
    assert n_calls >= 5


def test_tool_results_are_correct():
    rng = md.Random("tools")
    for _ in range(200):
        q, args, result, final = md._plan_call(rng, "convert_units")
        k = md.UNITS.get((args["from_unit"], args["to_unit"]))
        expected = args["value"] * k if k else (args["value"] * 9 / 5 + 32 if args["from_unit"] == "celsius"
                                                 else (args["value"] - 32) * 5 / 9)
        assert math.isclose(result["value"], expected, abs_tol=0.006)
        q, args, result, final = md._plan_call(rng, "add")
        assert result["result"] == args["a"] + args["b"] and str(args["a"] + args["b"]) in final


def test_json_answers_match_their_schema(records):
    seen = 0
    for r in _all(records):
        if r["task"] != "json":
            continue
        rf = r["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
        value = json.loads(r["answer"])
        jsonschema.validate(value, rf["json_schema"]["schema"])
        assert value == r["meta"]["value"] and list(value) == list(rf["json_schema"]["schema"]["properties"])
        assert r["messages"][-1]["content"] == r["answer"]
        seen += 1
    assert seen >= 3


# --- arithmetic ------------------------------------------------------------------------------------------------

def test_arithmetic_traces_are_right_for_every_problem():
    for a in range(100):
        for b in range(100):
            trace, result = md.arithmetic_trace(a, b, "+")
            assert result == a + b and trace.endswith(f"= {a + b}")
            if a >= b:
                trace, result = md.arithmetic_trace(a, b, "-")
                assert result == a - b and trace.endswith(f"= {a - b}")
    assert md.arithmetic_trace(47, 38, "+")[0] == "ones: 7 + 8 = 15, write 5 carry 1\ntens: 4 + 3 + 1 = 8\n47 + 38 = 85"


def test_arithmetic_records_answer_correctly(records):
    for r in _all(records):
        if r["task"] == "arithmetic":
            m = r["meta"]
            assert int(r["answer"]) == (m["a"] + m["b"] if m["op"] == "+" else m["a"] - m["b"])
            assert ("reasoning_content" in r["messages"][-1]) == r["enable_thinking"]


# --- images ---------------------------------------------------------------------------------------------------

# Filled area / r² of each shape as drawn (outer radius r): πr², the hexagon, the square, ... (from draw_shape).
AREA = {"circle": math.pi, "hexagon": 3 * math.sqrt(3) / 2, "cross": 8 * 0.34 - 4 * 0.34 ** 2, "square": 2.0,
        "triangle": 3 * math.sqrt(3) / 4, "diamond": 2 * 0.62, "star": 5 * 0.45 * math.sin(math.radians(36))}


def _close(px, colour, tol=10) -> bool:
    return max(abs(int(a) - int(b)) for a, b in zip(px, md.COLOURS[colour])) <= tol


def test_image_answers_match_the_pixels(dataset, records):
    checked = Counter()
    for r in _all(records):
        imgs = _media(r, "image")
        if not imgs:
            continue
        img = Image.open(dataset / imgs[0]["image"])
        assert img.mode == "RGB" and [img.height, img.width] == r["meta"]["size"]
        assert num_image_tokens(img.height, img.width, 70) <= 70
        arr = np.asarray(img)
        m = r["meta"]
        if r["task"] == "count":
            assert int(r["answer"]) == m["count"] == len(m["objects"])
            for o in m["objects"]:
                assert _close(arr[round(o["centre"][1]), round(o["centre"][0])], o["colour"]), r["id"]
        elif r["task"] == "text":
            ink = np.abs(arr.astype(int) - np.array(md.COLOURS[m["colour"]])).max(axis=2) <= 40
            assert ink.sum() >= 30, r["id"]  # the characters are there, in their colour
            assert r["answer"] == m["text"]
        else:
            cx, cy = m["centre"]
            assert _close(arr[round(cy), round(cx)], m["colour"]), r["id"]
            # The filled area tells circle (3.1 r²) from hexagon (2.6), cross (2.3), square (2.0), the rest (~1.3).
            filled = (np.abs(arr.astype(int) - np.array(md.COLOURS[m["colour"]])).max(axis=2) <= 40).sum()
            assert filled / m["radius"] ** 2 == pytest.approx(AREA[m["shape"]], rel=0.15), (r["id"], m["shape"])
            want = {"shape": m["shape"], "colour": m["colour"], "describe": f"a {m['colour']} {m['shape']}",
                    "json": json.dumps({"shape": m["shape"], "colour": m["colour"]}, separators=(",", ":"))}
            assert r["answer"] == want[r["task"]]
        checked[r["task"]] += 1
    assert all(checked[t] >= 2 for t in ("shape", "colour", "count", "text")), checked


def _question(rec: dict) -> str:
    user = next(m for m in rec["messages"] if m["role"] == "user")
    return next(p["text"] for p in user["content"] if p["type"] == "text")


def test_describe_is_asked_plainly_and_as_compound_questions(tmp_path, resources):
    """Issue 14: "What shape and colour is this?" and its kin are describe questions (answer "a red circle");
    meta.question says which list the record drew from, and both kinds occur, about half each."""
    out = tmp_path / "describe"
    md.generate(out, {"train": 40}, SEED, jobs=1, res=resources, train_weights=md.parse_weights("describe=1"))
    recs = md.read_jsonl(out / "train.jsonl")
    assert len(recs) == 40 and all(r["task"] == "describe" for r in recs)
    kinds = Counter(r["meta"]["question"] for r in recs)
    assert set(kinds) == {"compound", "describe"} and min(kinds.values()) >= 10, kinds
    for r in recs:
        questions = md.COMPOUND_QUESTIONS if r["meta"]["question"] == "compound" else md.DESCRIBE_QUESTIONS
        assert _question(r) in questions, r["id"]
        assert r["answer"] == f"a {r['meta']['colour']} {r['meta']['shape']}" == r["messages"][-1]["content"]
    assert "What shape and colour is this?" in md.COMPOUND_QUESTIONS
    assert not set(md.COMPOUND_QUESTIONS) & set(md.DESCRIBE_QUESTIONS + md.SHAPE_QUESTIONS + md.COLOUR_QUESTIONS)


def test_draw_shape_refuses_unknown_shapes():
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        md.draw_shape(md.ImageDraw.Draw(img), "blob", 5, 5, 3, (0, 0, 0))


# --- audio ----------------------------------------------------------------------------------------------------

def test_audio_files_are_16k_mono_and_not_silent(dataset, records):
    n = 0
    for r in _all(records):
        for part in _media(r, "audio"):
            info = sf.info(str(dataset / part["audio"]))
            assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
            wave, _ = sf.read(str(dataset / part["audio"]), dtype="float32")
            assert 0.2 <= wave.size / 16000 <= 3.0
            assert 0.45 <= np.abs(wave).max() <= 0.55  # normalised clean speech, no noise added
            assert np.sqrt(np.mean(wave ** 2)) > 0.03
            said = r["meta"]["said"]
            assert r["answer"] == (said if r["task"] == "transcribe" else str(
                next(k for k in range(100) if md.number_words(k) == said)))
            n += 1
    assert n >= 20


def test_voices_change_the_sound(resources):
    a = md.speak(resources, "seven", "en-us", "f3", 150, 50)
    b = md.speak(resources, "seven", "en-gb-scotland", "m1", 150, 50)
    c = md.speak(resources, "seven", "en-us", "f3", 150, 50)
    assert np.array_equal(a, c) and not (a.size == b.size and np.allclose(a, b))


def test_number_words():
    assert [md.number_words(k) for k in (0, 7, 10, 13, 20, 42, 99)] == [
        "zero", "seven", "ten", "thirteen", "twenty", "forty two", "ninety nine"]
    with pytest.raises(ValueError, match="0..99"):
        md.number_words(100)


# --- augmentation ---------------------------------------------------------------------------------------------

def test_augmentation_is_fresh_per_draw_and_reproducible_per_seed():
    wave = (0.5 * np.sin(np.arange(8000) / 7.0)).astype(np.float32)
    a = augment.augment_batch([wave, wave], np.random.default_rng(1))
    b = augment.augment_batch([wave, wave], np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not (a[0].size == a[1].size and np.allclose(a[0], a[1]))  # two draws differ
    for x in a:
        assert wave.size <= x.size <= wave.size + 2 * int(0.3 * 16000) and x.dtype == np.float32
        assert np.abs(x).max() <= 1.0


def test_augmentation_shift_gain_and_snr_are_as_asked():
    wave = (0.5 * np.sin(np.arange(16000) / 5.0)).astype(np.float32)
    out = augment.augment_waveform(torch.from_numpy(wave), np.random.default_rng(0), max_shift_s=0.0,
                                   gain_db=(-6.0, -6.0), p_noise=0.0)
    np.testing.assert_allclose(out, wave * 10 ** (-6 / 20), rtol=1e-5)
    rng = np.random.default_rng(3)
    for _ in range(6):
        noisy = augment.augment_waveform(wave, rng, max_shift_s=0.0, gain_db=(0.0, 0.0), snr_db=(20.0, 20.0),
                                         p_noise=1.0)
        snr = 10 * np.log10(np.mean(wave ** 2) / np.mean((noisy - wave) ** 2))
        assert snr == pytest.approx(20.0, abs=0.5)


def test_augmentation_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D mono"):
        augment.augment_waveform(np.zeros((2, 100), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        augment.augment_waveform(np.zeros(100, np.float32), 0)
    with pytest.raises(ValueError, match="gain_db"):
        augment.augment_waveform(np.zeros(100, np.float32), np.random.default_rng(0), gain_db=(3.0, -3.0))


# --- command line ---------------------------------------------------------------------------------------------

def test_cli_writes_the_splits(tmp_path, capsys):
    assert md.main(["--out", str(tmp_path), "--train", "6", "--val", "2", "--test", "3", "--seed", "1",
                    "--jobs", "1", "--no-install"]) == 0
    assert [len(md.read_jsonl(tmp_path / f"{s}.jsonl")) for s in SIZES] == [6, 2, 3]
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="sizes must map"):
        md.generate(tmp_path, {"train": -1}, 0, res=md.Resources(espeak=None))
