"""Streaming input (unigemma.realtime, engine/session.py, Scheduler.extend) on a tiny random model: the ids a live
turn builds equal build_prompt's for the same message; greedy answers after commit equal llm.chat's one-shot
answers; the KV cache holds the turn before commit; cancel frees the slot; the energy VAD finds speech bursts."""

import json

import numpy as np
import pytest
from tinyllm import make_tiny_checkpoint

import unigemma
from unigemma.realtime import EnergyVAD, IncrementalPrompt, Session, pcm16_to_float


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return unigemma.load(make_tiny_checkpoint(tmp_path_factory.mktemp("rt"), seed=5), device="cpu",
                         dtype="float32")


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _chunks(wave: np.ndarray, sizes):
    i = 0
    for s in sizes:
        yield wave[i:i + s]
        i += s
    if i < wave.size:
        yield wave[i:]


def _image():
    from PIL import Image

    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))


def _collect(got: list[int], pieces) -> int:
    """Apply pieces to an id list as the engine does; returns how many tokens were rewound."""
    n = 0
    for p in pieces:
        if p.rewind:
            del got[len(got) - p.rewind:]
            n += p.rewind
        got += p.ids
    return n


@pytest.mark.parametrize("history", [False, True])
def test_incremental_ids_equal_build_prompt(llm, history):
    wave = _wave(1.37)
    msgs = []
    if history:  # history with audio: its ids are final up to the last placeholder
        msgs = [{"role": "user", "content": [{"type": "audio", "audio": (_wave(0.3, 2), 16000)},
                                             {"type": "text", "text": "before"}]},
                {"role": "assistant", "content": "ok"}]
    p = IncrementalPrompt(llm, msgs, system="Be brief.", enable_thinking=True)
    got = list(p.head().ids)
    _collect(got, p.append_text("  hello there "))
    for c in _chunks(wave, [100, 700, 641, 3000, 5]):
        _collect(got, p.append_audio(c))
    _collect(got, p.append_image(_image(), max_soft_tokens=70))
    _collect(got, p.append_text("what is"))
    _collect(got, p.append_text(" this?"))
    _collect(got, p.close())
    msg = p.message()
    ref = llm.build_prompt(msgs[:0] + [{"role": "system", "content": "Be brief."}] + msgs + [msg],
                           enable_thinking=True)
    assert got == ref.input_ids == p.ids
    assert [x["type"] for x in msg["content"]] == ["text", "audio", "image", "text"]
    assert msg["content"][3]["text"] == "what is this?"


@pytest.mark.parametrize("holdback", [None, 0, 2])
def test_typed_text_prefilled_early_and_rewound(llm, holdback):
    """Text arriving character by character is sent early; whatever tokenizes differently once the segment is
    complete is rewound, so the ids (and the greedy answer) equal the one-shot prompt's."""
    text = "the theory of thermal things, then the otherwise-unthinkable: ¿qué? 東京 "
    p = IncrementalPrompt(llm, text_holdback=holdback)
    got, rewound, early = list(p.head().ids), 0, 0
    for i in range(0, len(text), 3):
        pieces = p.append_text(text[i:i + 3])
        early += sum(len(x.ids) for x in pieces)
        rewound += _collect(got, pieces)
        assert got == p.ids
    _collect(got, p.append_audio(_wave(0.1)))
    _collect(got, p.append_text(" and th"))
    rewound += _collect(got, p.close())
    assert got == p.ids == llm.build_prompt([p.message()]).input_ids
    if holdback is None:
        assert early == 0
    else:
        assert early > 10
    if holdback == 0:
        assert rewound > 0  # "th" → "the" → "theory": emitting every token at once must be corrected later
    # the same through the engine: a session typed piecemeal answers as the one-shot chat does
    with Session(llm, temperature=0, max_tokens=8) as sess:
        sess.turn.prompt.text_holdback = holdback
        for i in range(0, len(text), 2):
            sess.append_text(text[i:i + 2])
            assert sess.prefilled == len(sess.prompt_ids)
        res = sess.commit(stream=False)
    ref = llm.chat([{"role": "user", "content": text}], temperature=0, max_tokens=8)
    assert res.token_ids == ref.token_ids


def test_audio_segments_split_at_30s(llm):
    p = IncrementalPrompt(llm)
    wave = _wave(31.0)
    for c in _chunks(wave, [16000] * 31):
        p.append_audio(c)
    p.close()
    ref = llm.build_prompt([p.message()])
    assert p.ids == ref.input_ids
    c = llm.config
    assert p.ids.count(c.boa_token_id) == 2 and p.ids.count(c.audio_token_id) == 775


def test_session_matches_one_shot_chat(llm):
    wave = _wave(0.9, 3)
    sess = Session(llm, system="You are terse.", temperature=0, max_tokens=12)
    sess.append_text("Listen:")
    for c in _chunks(wave, [1000, 2000, 5000]):
        sess.append_audio(c)
        # prefill as you go: everything that is final is in the KV cache already
        assert sess.prefilled == len(sess.prompt_ids)
    n_before = len(sess.prompt_ids)
    sess.append_text("What was it?")
    res = sess.commit(stream=False)
    assert res.usage.prompt_tokens > n_before
    msgs = [{"role": "system", "content": "You are terse."}, sess.messages[0]]
    ref = llm.chat(msgs, temperature=0, max_tokens=12)
    assert res.token_ids == ref.token_ids and res.content == ref.content
    # the second turn carries the first (with its audio) as history
    sess.append_image(_image(), max_soft_tokens=70)
    chunks = list(sess.commit())
    ref2 = llm.chat(msgs + [sess.messages[1], sess.messages[2]], temperature=0, max_tokens=12)
    assert "".join(c.content for c in chunks) == ref2.content
    assert chunks[-1].finish_reason == ref2.finish_reason
    assert len(sess.messages) == 4
    sess.close()


def test_text_only_and_thinking_turn(llm):
    with Session(llm, enable_thinking=True, temperature=0, max_tokens=10) as sess:
        sess.append_text("hi")
        sess.append_text(" there")
        res = sess.commit(stream=False)
    ref = llm.chat([{"role": "user", "content": "hi there"}], enable_thinking=True, temperature=0, max_tokens=10)
    assert (res.token_ids, res.content, res.reasoning) == (ref.token_ids, ref.content, ref.reasoning)


def test_cancel_frees_slot_and_pool_reuse(llm):
    sess = Session(llm, temperature=0, max_tokens=4)
    eng = sess.engine
    sess.append_audio(_wave(0.5))
    assert len(eng.scheduler.slots) == 1 and eng.has_work
    sess.cancel()
    assert not eng.scheduler.slots and not eng.scheduler.seqs and not eng.has_work
    # a stream abandoned mid-answer also frees it
    sess.append_audio(_wave(0.2))
    it = sess.commit()
    next(it)
    it.close()
    assert not eng.scheduler.slots and not eng.scheduler.seqs
    assert len(sess.messages) == 0  # an unfinished answer is not history
    sess.close()
    with pytest.raises(ValueError, match="closed"):
        sess.append_text("x")
    s2 = Session(llm)
    assert s2.engine is eng  # the pool hands the engine back out
    s2.close()


def test_scheduler_extend_validation(llm):
    sess = Session(llm, max_tokens=4)
    sess.append_audio(_wave(0.1))
    live = sess.turn.live
    with pytest.raises(ValueError, match="vocabulary"):
        live.extend([10 ** 9])
    with pytest.raises(ValueError, match="does not fit"):
        live.extend([1] * 5000)
    rid = live.id
    sess.cancel()
    assert rid not in sess.engine.scheduler.seqs
    with pytest.raises(ValueError, match="not an open streaming request"):
        sess.engine.scheduler.extend(rid, [1])
    sess.close()


def test_bad_audio_chunks(llm):
    p = IncrementalPrompt(llm)
    with pytest.raises(ValueError, match="1-D"):
        p.append_audio(np.zeros((2, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        p.append_audio(np.array([np.nan], dtype=np.float32))
    assert p.append_audio(np.zeros(0, dtype=np.float32)) == []
    x = pcm16_to_float(np.array([0, 16384, -32768], dtype="<i2").tobytes())
    assert x.tolist() == [0.0, 0.5, -1.0]
    with pytest.raises(ValueError, match="even"):
        pcm16_to_float(b"\x00")


def _speech_like(rng, seconds):
    """A voiced burst: a 120-Hz harmonic stack with a 4-Hz syllable envelope."""
    t = np.arange(int(seconds * 16000)) / 16000
    tone = sum(np.sin(2 * np.pi * 120 * k * t) / k for k in range(1, 6))
    env = 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 2 * t))
    return (0.2 * tone * env + 0.002 * rng.standard_normal(t.size)).astype(np.float32)


def test_energy_vad_bursts():
    rng = np.random.default_rng(0)
    noise = lambda s: (0.004 * rng.standard_normal(int(s * 16000))).astype(np.float32)
    parts = [noise(1.0), _speech_like(rng, 1.2), noise(0.2), _speech_like(rng, 0.8), noise(1.5),
             _speech_like(rng, 0.6), noise(1.0)]
    wave = np.concatenate(parts)
    vad = EnergyVAD(hangover_ms=500)
    events = []
    for c in _chunks(wave, [333] * (wave.size // 333)):
        events += vad.feed(c)
    kinds = [e.kind for e in events]
    # the 0.2-s pause is inside the hang-over: two turns, not three
    assert kinds == ["speech_started", "speech_stopped", "speech_started", "speech_stopped"]
    bounds = np.cumsum([p.size for p in parts]) / 16000
    assert abs(events[0].seconds - 1.0) < 0.1
    assert abs(events[1].seconds - bounds[3]) < 0.1
    assert abs(events[2].seconds - bounds[4]) < 0.1
    assert abs(events[3].seconds - bounds[5]) < 0.1
    # steady background noise loud enough to pass for speech at first is learnt: the "speech" ends
    v2 = EnergyVAD()
    ev = v2.feed((0.05 * rng.standard_normal(16000 * 8)).astype(np.float32))
    assert [e.kind for e in ev] == ["speech_started", "speech_stopped"] and not v2.speaking
    assert v2.feed((0.05 * rng.standard_normal(16000 * 3)).astype(np.float32)) == []
    v3 = EnergyVAD()
    assert v3.feed(np.zeros(16000 * 2, dtype=np.float32)) == []
    with pytest.raises(ValueError, match="ratio"):
        EnergyVAD(ratio=1.0)


# --- the WebSocket endpoint ------------------------------------------------------------------------------------

def _pcm16(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def _wav_b64(pcm: bytes) -> str:
    import base64
    import io
    import wave as wavmod

    buf = io.BytesIO()
    with wavmod.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(llm):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from unigemma.server.app import create_app
    from unigemma.server.service import ServerSettings

    app = create_app(llm, ServerSettings(max_concurrency=4, max_queue=40))
    with TestClient(app) as c:
        yield c


def _recv_until(ws, kind: str, limit: int = 10_000) -> list[dict]:
    out = []
    for _ in range(limit):
        ev = ws.receive_json()
        out.append(ev)
        if ev["type"] == kind:
            return out
    raise AssertionError(f"no {kind} event")


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def _idle(client) -> None:
    """Wait until the engine holds no sequence (cancellations land on the worker's next turn)."""
    import time

    for _ in range(200):
        if _metric(client, "unigemma_requests_running") == 0 and _metric(client, "unigemma_realtime_sessions") == 0:
            return
        time.sleep(0.02)
    raise AssertionError("sessions or sequences leaked")


def test_ws_same_answer_as_chat_completions(client):
    import base64

    import io

    pcm = _pcm16(_wave(0.7, 4))
    buf = io.BytesIO()
    _image().save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with client.websocket_connect("/v1/realtime") as ws:
        assert ws.receive_json()["type"] == "session.created"
        ws.send_json({"type": "session.update", "session": {"instructions": "Be short.", "temperature": 0,
                                                             "max_tokens": 10}})
        assert ws.receive_json()["type"] == "session.updated"
        ws.send_json({"type": "input_image.append", "image": uri, "max_soft_tokens": 70})
        ws.send_json({"type": "input_text.append", "text": "Hear this:"})
        for i in range(0, len(pcm), 3000):  # odd-sized chunks: frames straddle them
            ws.send_json({"type": "input_audio.append", "audio": base64.b64encode(pcm[i:i + 3000]).decode()})
        ws.send_json({"type": "input.commit"})
        events = _recv_until(ws, "response.done")
    done = events[-1]
    assert done["status"] == "completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    r = client.post("/v1/chat/completions", json={
        "model": "unigemma", "temperature": 0, "max_tokens": 10,
        "messages": [{"role": "system", "content": "Be short."},
                     {"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": uri, "max_soft_tokens": 70}},
                                                  {"type": "text", "text": "Hear this:"},
                                                  {"type": "input_audio",
                                                   "input_audio": {"data": _wav_b64(pcm), "format": "wav"}}]}]})
    assert r.status_code == 200, r.text
    ref = r.json()
    assert text == done["content"] == ref["choices"][0]["message"]["content"]
    assert done["usage"]["completion_tokens"] > 0 and len(done["content"]) > 0
    assert done["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert done["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
    _idle(client)


def test_ws_malformed_and_oversize_frames(client):
    import base64

    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        bad = ["not json", "[1, 2]", json.dumps({"type": "nope"}), json.dumps({"type": "input_text.append"}),
               json.dumps({"type": "input_audio.append", "audio": "***"}),
               json.dumps({"type": "input_audio.append", "audio": "AAA=", "format": "mp3"}),
               json.dumps({"type": "input_image.append", "image": "http://example.com/x.png"}),
               json.dumps({"type": "session.update", "session": {"temperature": 9}}),
               json.dumps({"type": "response.cancel"}),
               json.dumps({"type": "input_audio.append", "audio": base64.b64encode(b"\0" * 2 * 16000 * 11).decode()}),
               json.dumps({"type": "input_image.append", "image": "data:image/png;base64,AAAA"})]
        codes = []
        for frame in bad:
            ws.send_text(frame)
            ev = ws.receive_json()
            assert ev["type"] == "error", (frame[:40], ev)
            codes.append(ev["error"]["code"])
        assert codes[:3] == ["invalid_json", "invalid_event", "invalid_event"]
        assert "chunk_too_large" in codes and "invalid_session" in codes and "no_response" in codes
        # still usable afterwards
        ws.send_json({"type": "input_text.append", "text": "hello"})
        ws.send_json({"type": "input.commit"})
        assert _recv_until(ws, "response.done")[-1]["status"] == "completed"
    _idle(client)


def test_ws_cancel_clear_and_abrupt_disconnect(client):
    import base64

    pcm = base64.b64encode(_pcm16(_wave(0.5))).decode()
    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"max_tokens": 200, "temperature": 1.0}})
        ws.receive_json()
        ws.send_json({"type": "input_audio.append", "audio": pcm})
        ws.send_json({"type": "input.clear"})
        assert ws.receive_json()["type"] == "input.cleared"
        ws.send_json({"type": "input_audio.append", "audio": pcm})
        ws.send_json({"type": "input.commit"})
        assert ws.receive_json()["type"] == "response.created"
        ws.send_json({"type": "response.cancel"})
        done = _recv_until(ws, "response.done")[-1]
        assert done["status"] in ("cancelled", "completed")
    _idle(client)
    # disconnect in the middle of a turn (audio prefilled, nothing committed) and in the middle of an answer
    for commit in (False, True):
        with client.websocket_connect("/v1/realtime") as ws:
            ws.receive_json()
            ws.send_json({"type": "session.update", "session": {"max_tokens": 300}})
            ws.receive_json()
            ws.send_json({"type": "input_audio.append", "audio": pcm})
            if commit:
                ws.send_json({"type": "input.commit"})
                ws.receive_json()
        _idle(client)


def test_ws_concurrent_sessions_no_leak(client):
    import base64
    import threading

    pcm = base64.b64encode(_pcm16(_wave(0.12))).decode()
    results, errors = [], []

    def one(i):
        try:
            with client.websocket_connect("/v1/realtime") as ws:
                ws.receive_json()
                ws.send_json({"type": "session.update", "session": {"max_tokens": 3}})
                ws.receive_json()
                ws.send_json({"type": "input_text.append", "text": f"n{i}"})
                ws.send_json({"type": "input_audio.append", "audio": pcm})
                ws.send_json({"type": "input.commit"})
                results.append(_recv_until(ws, "response.done")[-1]["status"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == ["completed"] * 32
    _idle(client)


def test_ws_vad_commits_and_api_key(llm):
    import base64

    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from unigemma.server.app import create_app
    from unigemma.server.service import ServerSettings

    rng = np.random.default_rng(3)
    wave = np.concatenate([np.zeros(8000, np.float32), _speech_like(rng, 0.6), np.zeros(16000, np.float32)])
    with TestClient(create_app(llm, ServerSettings(api_key="sekret"))) as c:
        with pytest.raises(WebSocketDisconnect):
            with c.websocket_connect("/v1/realtime") as ws:
                ws.receive_json()
        with c.websocket_connect("/v1/realtime?api_key=sekret") as ws:
            ws.receive_json()
            ws.send_json({"type": "session.update", "session": {"vad": True, "max_tokens": 3}})
            ws.receive_json()
            pcm = _pcm16(wave)
            for i in range(0, len(pcm), 6400):
                ws.send_json({"type": "input_audio.append", "audio": base64.b64encode(pcm[i:i + 6400]).decode()})
            events = _recv_until(ws, "response.done")
        kinds = [e["type"] for e in events]
        assert kinds.index("vad.speech_started") < kinds.index("vad.speech_stopped") < kinds.index("response.created")


def test_ws_history_and_media_policy(client):
    hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"messages": hist, "max_tokens": 6}})
        assert ws.receive_json()["messages"] == 2
        ws.send_json({"type": "input_text.append", "text": "and now?"})
        ws.send_json({"type": "input.commit"})
        done = _recv_until(ws, "response.done")[-1]
        ref = client.post("/v1/chat/completions", json={"model": "unigemma", "temperature": 0, "max_tokens": 6,
                                                        "messages": hist + [{"role": "user", "content": "and now?"}]})
        assert done["content"] == ref.json()["choices"][0]["message"]["content"]
        # local paths in the history are refused by the server's media policy (no --media-root)
        ws.send_json({"type": "session.update", "session": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}})
        ws.receive_json()
        ws.send_json({"type": "input_text.append", "text": "x"})
        ev = ws.receive_json()
        assert ev["type"] == "error" and "local file paths are disabled" in ev["error"]["message"]
        ws.send_json({"type": "session.update", "session": {"messages": [{"role": "wizard", "content": "x"}]}})
        assert ws.receive_json()["type"] == "error"
    _idle(client)


def test_ws_idle_turn_is_dropped(client, monkeypatch):
    import base64

    from unigemma.server import realtime_ws

    monkeypatch.setattr(realtime_ws, "IDLE_TURN_S", 0.3)
    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ws.send_json({"type": "input_audio.append", "audio": base64.b64encode(_pcm16(_wave(0.2))).decode()})
        ev = ws.receive_json()
        assert ev["type"] == "error" and ev["error"]["code"] == "turn_timeout"
        assert _wait_free(client)  # the dropped turn gave its slot back
        ws.send_json({"type": "input_text.append", "text": "again"})
        ws.send_json({"type": "input.commit"})
        assert _recv_until(ws, "response.done")[-1]["status"] == "completed"
    _idle(client)


def _wait_free(client) -> bool:
    import time

    for _ in range(100):
        if _metric(client, "unigemma_requests_running") == 0:
            return True
        time.sleep(0.02)
    return False


def test_session_vad_end_of_turn_and_resampling(llm):
    rng = np.random.default_rng(1)
    with Session(llm, vad=True, temperature=0, max_tokens=3) as sess:
        events = []
        for part in (np.zeros(4000, np.float32), _speech_like(rng, 0.5), np.zeros(12000, np.float32)):
            events += sess.append_audio(part)
        assert [e.kind for e in events] == ["speech_started", "speech_stopped"] and sess.end_of_turn
        n16 = sess.prompt_ids.count(llm.config.audio_token_id)
        sess.cancel()
        assert not sess.end_of_turn
        # 48 kHz input is resampled to 16 kHz: the same duration gives the same number of frames
        sess.append_audio(np.zeros(3 * 24000, np.float32), sample_rate=48000)
        assert sess.prompt_ids.count(llm.config.audio_token_id) == n16 == 24000 // 640
        assert sess.commit(stream=False).finish_reason in ("stop", "length")


def test_ws_text_typed_piecemeal(client):
    text = "then the theory of thermal things, thereafter the thesis"
    with client.websocket_connect("/v1/realtime") as ws:
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"max_tokens": 6}})
        ws.receive_json()
        for i in range(0, len(text), 2):
            ws.send_json({"type": "input_text.append", "text": text[i:i + 2]})
        ws.send_json({"type": "input.commit"})
        done = _recv_until(ws, "response.done")[-1]
    ref = client.post("/v1/chat/completions", json={"model": "unigemma", "temperature": 0, "max_tokens": 6,
                                                    "messages": [{"role": "user", "content": text}]}).json()
    assert done["content"] == ref["choices"][0]["message"]["content"]
    assert done["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    _idle(client)
