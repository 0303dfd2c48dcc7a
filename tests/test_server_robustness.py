"""Robustness of the server: every bad request gets the right 4xx in the OpenAI error shape and the server keeps
serving; cancelled streams free their sequences; admission control answers 429; a fuzz run finds no 5xx;
SIGTERM shuts a real `python -m unigemma.server.run` process down cleanly.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_server import LiveServer, free_port, png_data_uri, tiny_llm, tiny_model_dir  # noqa: E402,F401

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def srv(tiny_llm):  # noqa: F811
    from unigemma.server import ServerSettings

    settings = ServerSettings(model_name="tiny", max_model_len=256, max_concurrency=2, max_queue=2,
                              api_key=KEY, max_body_bytes=64 * 1024)
    with LiveServer(tiny_llm, settings) as s:
        yield s


@pytest.fixture()
def http(srv):
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def chat(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def assert_error(r, status: int, param=None, contains: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if contains is not None:
        assert contains in body["error"]["message"], body
    return body["error"]


def metrics(http) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? ([-0-9.e+naif]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_auth(srv, http):
    assert_error(httpx.post(srv.url + "/v1/chat/completions", json=chat()), 401)
    assert_error(httpx.post(srv.url + "/v1/chat/completions", json=chat(),
                            headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}x"}), 401)
    assert httpx.get(srv.url + "/health").status_code == 200  # open for liveness probes
    assert http.get("/v1/models").status_code == 200
    # the web page loads without a key (a browser cannot send one for the page itself); the API still needs it
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(srv.url + "/static/app.js").status_code == 200
    assert_error(httpx.get(srv.url + "/v1/models"), 401)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps(chat(temperature="hot")).encode(), 422, "temperature"),
    (json.dumps(chat(temperature=5)).encode(), 422, "temperature"),
    (json.dumps(chat(n=0)).encode(), 422, "n"),
    (json.dumps(chat(max_tokens=-1)).encode(), 422, "max_tokens"),
    (json.dumps({"model": "tiny"}).encode(), 422, "messages"),
    (json.dumps(chat(messages=[{"role": "wizard", "content": "x"}])).encode(), 422, "messages[0].role"),
    (json.dumps(chat(messages=[{"role": "user", "content": [{"type": "sound"}]}])).encode(), 422,
     "messages[0].content[0]"),
    (json.dumps(chat(frobnicate=True)).encode(), 400, "frobnicate"),
    (json.dumps(chat(top_logprobs=2)).encode(), 400, None),
    (json.dumps(chat(stop=["a", "b", "c", "d", "e"])).encode(), 422, "stop"),
    (json.dumps(chat(logit_bias={"abc": 1})).encode(), 422, "logit_bias"),
    (json.dumps(chat(logit_bias={"99999": 1})).encode(), 400, "logit_bias"),
    (json.dumps(chat(tool_choice="required")).encode(), 400, None),
    (json.dumps(chat(response_format={"type": "json_schema"})).encode(), 422, "response_format"),
])
def test_bad_requests(http, body, status, param):
    r = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, status, param)


def test_unknown_model_route_and_method(http):
    assert_error(http.post("/v1/chat/completions", json=chat(model="gpt-9")), 404, "model")
    assert_error(http.get("/v1/models/gpt-9"), 404, "model")
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


def test_body_limits(http):
    big = chat(messages=[{"role": "user", "content": "x" * 100_000}])
    assert_error(http.post("/v1/chat/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(20):
            yield b" " * 8192
    assert_error(http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}),
                 413)


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!notbase64!!!"}},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"x" * 300).decode()}},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "image_url", "image_url": {"url": "/etc/hostname"}},
    {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}},
    {"type": "image_url", "image_url": {"url": png_data_uri(), "max_soft_tokens": 100}},
    {"type": "input_audio", "input_audio": {"data": "@@@@", "format": "wav"}},
    {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF" + b"\0" * 400).decode(),
                                            "format": "wav"}},
])
def test_bad_media(http, part):
    r = http.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": [part]}]))
    assert_error(r, 400, "messages[0].content[0]")


def test_over_long_prompt(http):
    r = http.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "word " * 400}]))
    err = assert_error(r, 400, contains="256")
    assert re.search(r"prompt is \d+ tokens", err["message"])
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": list(range(30, 330))})
    assert_error(r, 400, "prompt", contains="300 tokens")


def _open_streams(srv, count: int, max_tokens: int = 200):
    """Open `count` streams, read the first chunk of each, and drop the connection."""
    for _ in range(count):
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            body = chat(stream=True, max_tokens=max_tokens, temperature=1.0, extra_ignored=None)
            body.pop("extra_ignored")
            with c.stream("POST", "/v1/chat/completions", json={**body, "ignore_eos": True}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break


def _wait_idle(http, timeout=20.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = metrics(http)
        if (m["unigemma_requests_running"] == 0 and m["unigemma_requests_queued"] == 0
                and m["unigemma_in_flight_sequences"] == 0 and m["unigemma_kv_cache_used_tokens"] == 0):
            return m
        if time.time() > deadline:
            raise AssertionError(f"server not idle: {m}")
        time.sleep(0.05)


def test_cancelled_streams_free_everything(srv, http):
    before = metrics(http)
    _open_streams(srv, 100)
    m = _wait_idle(http)
    # they were cancelled, not run to the end: far fewer tokens than 100 × 200
    generated = m["unigemma_generation_tokens_total"] - before.get("unigemma_generation_tokens_total", 0)
    assert generated < 100 * 200 / 4
    r = http.post("/v1/chat/completions", json=chat(max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_busy_server_answers_429(srv, http):
    # capacity: 2 running + 2 queued; 4 long streams fill it, the 5th sequence is refused
    stop = threading.Event()
    started = threading.Barrier(5)

    def hold():
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            with c.stream("POST", "/v1/chat/completions",
                          json={**chat(stream=True, max_tokens=200), "ignore_eos": True}) as r:
                it = r.iter_lines()
                next(it)
                started.wait()
                stop.wait(30)

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        started.wait(30)
        r = http.post("/v1/chat/completions", json=chat())
        err = assert_error(r, 429)
        assert err["type"] == "rate_limit_error" and r.headers["Retry-After"] == "1"
        assert_error(http.post("/v1/chat/completions", json=chat(n=2)), 429)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    _wait_idle(http)
    assert http.post("/v1/chat/completions", json=chat()).status_code == 200


def test_fuzzed_requests_never_5xx(http):
    """Random JSON in and around the request schema (hypothesis): never a 5xx, always the error shape."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32),
                        st.text(max_size=12))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                        max_size=3), max_leaves=6)
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "video_url", "x"])},
                                 optional={"text": values, "image_url": values, "input_audio": values})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bot"])},
                                    optional={"content": st.one_of(st.text(max_size=20), st.lists(part, max_size=2),
                                                                   values),
                                              "tool_calls": values, "name": values})
    fields = {"temperature": values, "top_p": values, "n": st.integers(-1, 3), "stop": values, "seed": values,
              "logprobs": values, "top_logprobs": values, "tools": values, "tool_choice": values,
              "response_format": values, "logit_bias": values, "stream": st.booleans(), "max_tokens": values,
              "presence_penalty": values, "reasoning_effort": values, "chat_template_kwargs": values}
    body = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "other", 3]),
                                  "messages": st.lists(message, min_size=0, max_size=2)}, optional=fields)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body)
    def run(b):
        if isinstance(b.get("max_tokens"), int) or "max_tokens" not in b:
            b["max_tokens"] = 2  # keep accepted requests short
        r = http.post("/v1/chat/completions", json=b)
        assert r.status_code < 500, (b, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    run()
    assert http.get("/health").status_code == 200


def test_sigterm_shuts_down_cleanly(tiny_model_dir):  # noqa: F811
    port = free_port()
    env = {**os.environ, "UNIGEMMA_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "unigemma.server.run", "--model", str(tiny_model_dir),
                             "--port", str(port), "--device", "cpu", "--served-model-name", "tiny",
                             "--max-model-len", "256", "--graceful-timeout", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.1)
        h = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from UNIGEMMA_API_KEY
        assert httpx.post(url + "/v1/chat/completions", json=chat(), headers=h).status_code == 200
        # a stream in flight when SIGTERM arrives still ends properly, and the process exits without a traceback
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", url + "/v1/chat/completions", headers=h,
                          json={**chat(stream=True, max_tokens=200), "ignore_eos": True}) as r:
                it = r.iter_lines()
                next(it)
                proc.send_signal(signal.SIGTERM)
                lines = list(it)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1:] == ["data: [DONE]"], lines[-3:]
        # uvicorn drains, runs the app's shutdown, then re-raises the signal so the exit status shows it
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
