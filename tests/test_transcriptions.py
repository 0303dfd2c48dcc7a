"""POST /v1/audio/transcriptions with the official `openai` SDK (`client.audio.transcriptions.create`) against the
bundled demo model: espeak-ng speech made here, every response_format, and the errors a client can cause.

The demo model was trained to transcribe spoken digits, numbers and short words (scripts/demo/make_data.py,
task `transcribe`); the words used here are ones it gets right."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import numpy as np
import pytest
import soundfile

openai = pytest.importorskip("openai")

from test_server import LiveServer  # noqa: E402

MODEL = "model"  # what `make serve` calls the bundled model: its folder name


@pytest.fixture(scope="module")
def server():
    import unigemma
    from unigemma.server import ServerSettings

    llm = unigemma.load(None, device="cpu")
    with LiveServer(llm, ServerSettings(model_name=MODEL, max_model_len=1024, max_concurrency=2)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def speak(path, text: str):
    assert shutil.which("espeak-ng"), "espeak-ng is not installed: run `make setup-system`"
    subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(path), text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


@pytest.mark.parametrize("word", ["seven", "three", "hello"])
def test_sdk_transcribes_speech(client, tmp_path, word):
    wav = speak(tmp_path / f"{word}.wav", word)
    with open(wav, "rb") as f:
        r = client.audio.transcriptions.create(model=MODEL, file=f)
    assert r.text == word
    assert r.usage.type == "tokens" and r.usage.input_tokens > 20 and r.usage.output_tokens >= 1


def test_every_response_format(client, tmp_path):
    wav = speak(tmp_path / "seven.wav", "seven")
    info = soundfile.info(str(wav))
    seconds = info.frames / info.samplerate
    text = client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), response_format="text")
    assert text.strip() == "seven"
    v = client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), response_format="verbose_json",
                                           language="en", timestamp_granularities=["segment"])
    assert v.text == "seven" and v.language == "en" and v.duration == pytest.approx(seconds, abs=0.01)
    (seg,) = v.segments  # one utterance: where the speech is, inside the file
    assert 0 <= seg.start < seg.end <= seconds + 1e-3 and seg.end - seg.start > 0.3 and seg.text == "seven"
    assert seg.avg_logprob < 0 and seg.avg_logprob > -2 and seg.tokens and seg.compression_ratio > 0
    srt = client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), response_format="srt")
    assert re.fullmatch(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\nseven\n\n", srt), srt
    vtt = client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), response_format="vtt")
    assert re.fullmatch(r"WEBVTT\n\n00:00:00\.\d{3} --> 00:00:0\d\.\d{3}\nseven\n\n", vtt), vtt
    # a prompt (context) is accepted; the answer is still the speech
    p = client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), prompt="Digits.")
    assert isinstance(p.text, str) and p.text


def test_pauses_make_segments_with_times(client, tmp_path):
    """"seven", 1.5 s of silence, "three": two utterances, each transcribed, timed where it was spoken."""
    a, rate = soundfile.read(str(speak(tmp_path / "a.wav", "seven")), dtype="float32")
    b, _ = soundfile.read(str(speak(tmp_path / "b.wav", "three")), dtype="float32")
    gap = np.zeros(int(1.5 * rate), dtype=np.float32)
    wav = tmp_path / "two.wav"
    soundfile.write(str(wav), np.concatenate([a, gap, b]), rate)
    v = client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), response_format="verbose_json")
    assert v.text == "seven three" and [s.text for s in v.segments] == ["seven", "three"]
    first, second = v.segments
    t_b = (len(a) + len(gap)) / rate  # where "three" starts in the file
    assert first.end < t_b - 0.5 and t_b - 0.3 <= second.start <= t_b + 0.3 and second.end <= v.duration + 1e-3
    srt = client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), response_format="srt")
    assert srt.count(" --> ") == 2 and srt.startswith("1\n") and "\n\n2\n00:00:0" in srt and srt.endswith("three\n\n")


def test_errors_are_openai_errors(client, server, tmp_path):
    wav = speak(tmp_path / "two.wav", "two")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.audio.transcriptions.create(model="whisper-1", file=wav.open("rb"))
    with pytest.raises(openai.BadRequestError, match="response_format 'xml'"):
        client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), response_format="xml")
    with pytest.raises(openai.BadRequestError, match="word timestamps"):
        client.audio.transcriptions.create(model=MODEL, file=wav.open("rb"), response_format="verbose_json",
                                           timestamp_granularities=["word"])
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model=MODEL, file=bad.open("rb"))
    assert e.value.body["param"] == "file"
    r = httpx.post(server.url + "/v1/audio/transcriptions", json={"model": MODEL, "file": "x"}, timeout=30)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/audio/transcriptions", data={"model": MODEL}, files={"x": ("a.wav", b"1")},
                   timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/audio/transcriptions", data={"model": MODEL}, files={"file": ("a.wav", b"")},
                   timeout=30)
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
