"""The web chat page at /: served by the app with no external fetches, and driven in real headless Chromium
(Selenium + the Debian chromium / chromium-driver packages) against a live server on a tiny random model: a typed
message gets a streamed answer, an attached image is sent and shown, the markdown renderer escapes HTML, reasoning
and tool-call deltas are rendered (from a scripted SSE stream), and a WAV fed as the fake microphone becomes a voice
turn over /v1/realtime, push-to-talk and hands-free (browser VAD). A screenshot is saved in the test tmp dir.

`make test` installs chromium and chromium-driver (scripts/system_packages.sh); without them the browser tests fail
with the command to run, they never skip."""

from __future__ import annotations

import re
import shutil
import time
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

STATIC = Path(__file__).resolve().parent.parent / "unigemma" / "server" / "static"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tinyllm import make_tiny_checkpoint

    import unigemma

    return unigemma.load(make_tiny_checkpoint(tmp_path_factory.mktemp("web"), seed=7), device="cpu",
                         dtype="float32")


def test_page_is_served_and_self_contained(llm):
    from fastapi.testclient import TestClient

    from unigemma.server.app import create_app

    with TestClient(create_app(llm)) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<script src="/static/app.js">' in r.text
        for name, kind in (("app.js", "javascript"), ("style.css", "css")):
            s = c.get("/static/" + name)
            assert s.status_code == 200 and kind in s.headers["content-type"]
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
        # nothing is loaded from elsewhere: no absolute URLs in src/href/url()/import
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), f.name
        assert not re.search(r"""url\(\s*["']?(https?:)?//|@import""", text), f.name


def test_icons_need_no_emoji_font():
    """Buttons and labels use inline SVG or plain text: no pictographs, which show as empty boxes on machines without
    an emoji font (common on Linux)."""
    pictograph = re.compile("[\u2300-\u23ff\u2600-\u27bf\U0001F000-\U0001FAFF]")
    for f in STATIC.iterdir():
        found = pictograph.findall(f.read_text(encoding="utf-8"))
        assert not found, (f.name, found)
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    for button in ("attach", "camera", "mic"):
        assert re.search(rf'id="{button}"[^>]*data-icon="{button}"', html), button


# --- the browser ---------------------------------------------------------------------------------------------

def chromium() -> tuple[str, str]:
    """(browser, driver) paths; fails with what to install when something is missing."""
    import importlib.util

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("chromium / chromedriver are not installed: run `make setup-system` (as root: apt-get install "
                    "chromium chromium-driver)")
    for mod in ("selenium", "websockets"):  # uvicorn serves the page's voice WebSocket with `websockets`
        if importlib.util.find_spec(mod) is None:
            pytest.fail(f"{mod} is not installed: run `make setup`")
    return browser, driver


def start_chromium(tmp: Path, extra_flags: tuple[str, ...] = ()):
    """Headless Chromium under Selenium, its profile in `tmp`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,900",
                 *extra_flags):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.set_page_load_timeout(30)
    return drv


def _write_wav(path: Path) -> None:
    """0.3 s of quiet, 1.2 s of a voiced-like tone, 1.5 s of quiet (Chromium loops the file)."""
    t = np.arange(int(16000 * 1.2)) / 16000
    burst = 0.3 * np.sin(2 * np.pi * 200 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    tone = np.concatenate([np.zeros(4800), burst, np.zeros(24000)])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((tone * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def live(llm):
    from test_server import LiveServer

    from unigemma.server.service import ServerSettings

    with LiveServer(llm, ServerSettings(max_model_len=1024, max_concurrency=2)) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    wav = tmp / "speech.wav"
    _write_wav(wav)
    drv = start_chromium(tmp, ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                               f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"))
    try:
        yield drv
    finally:
        drv.quit()


def _wait(cond, timeout: float = 60.0, what: str = "condition"):
    t = time.time()
    while time.time() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _answers(drv) -> list[str]:
    return drv.execute_script(
        "return [...document.querySelectorAll('.msg.assistant .content')].map(e => e.textContent)")


def _idle(drv) -> bool:
    return drv.execute_script("return document.body.dataset.busy") == "0"


def test_browser_chat_image_markdown_voice(live, browser, tmp_path, llm):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    drv = browser
    drv.get(live.url + "/")
    _wait(lambda: drv.execute_script("return document.readyState") == "complete", what="page load")
    drv.execute_script("localStorage.clear(); document.getElementById('opt-temperature').value = 0;"
                       "document.getElementById('opt-max-tokens').value = 8;")

    # 1. text → streamed answer (the SSE deltas land in the assistant bubble)
    box = drv.find_element(By.ID, "input")
    box.send_keys("Hello there")
    box.send_keys(Keys.ENTER)
    _wait(lambda: _answers(drv) and _idle(drv), what="first answer")
    first = _answers(drv)[0]
    status = drv.find_element(By.ID, "status").text
    assert re.search(r"\d+ prompt \+ [1-8] generated tokens", status), status
    # the page sent what the API answers for the same request (greedy)
    ref = llm.chat([{"role": "user", "content": "Hello there"}], temperature=0, max_tokens=8)
    assert first.strip() == ref.content.strip()

    # 2. attach an image through the file input, then send
    from PIL import Image

    img_path = tmp_path / "pic.png"
    Image.fromarray((np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3)).save(img_path)
    fi = drv.find_element(By.ID, "file-input")
    drv.execute_script("arguments[0].hidden = false", fi)
    fi.send_keys(str(img_path))
    _wait(lambda: drv.execute_script("return document.querySelectorAll('#attachments img').length") == 1,
          what="attachment thumbnail")
    box.send_keys("What is in the picture?")
    box.send_keys(Keys.ENTER)
    _wait(lambda: len(_answers(drv)) == 2 and _idle(drv), what="image answer")
    assert drv.execute_script("return document.querySelectorAll('.msg.user img.thumb').length") == 1
    assert "error" not in drv.execute_script("return document.querySelectorAll('.msg .error').length ? 'error' : ''")
    # the conversation is kept in localStorage
    stored = drv.execute_script("return JSON.parse(localStorage.getItem('unigemma.conversations'))")
    assert len(stored) == 1 and len(stored[0]["messages"]) == 4

    # a camera snapshot (Chromium's fake camera) becomes an attachment too; it is removed again unsent
    drv.find_element(By.ID, "camera").click()
    _wait(lambda: drv.execute_script("return document.querySelectorAll('#attachments img').length") == 1,
          what="camera snapshot")
    assert drv.execute_script("return document.querySelector('#attachments img').src").startswith(
        "data:image/jpeg;base64,")
    drv.find_element(By.CSS_SELECTOR, "#attachments button").click()
    assert drv.execute_script("return document.querySelectorAll('#attachments img').length") == 0

    # 3. markdown: formatting, and HTML in the answer is shown as text, never run
    html = drv.execute_script("return unigemma.renderMarkdown(arguments[0])",
                              "# Title\n**bold** and `x<y`\n- a\n- b\n```py\n<script>alert(1)</script>\n```\n"
                              "[ok](https://example.com) [bad](javascript:alert(1))")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>x&lt;y</code>" in html
    assert "<ul><li>a</li><li>b</li></ul>" in html and "&lt;script&gt;" in html and "<script>" not in html
    assert 'href="https://example.com"' in html and "javascript:" not in html.split("[bad]")[0]
    assert 'href="javascript' not in html

    # 4. reasoning and tool calls render (a scripted SSE stream stands in for a model that emits them)
    drv.execute_script("""
        const chunks = [{choices: [{delta: {reasoning_content: 'Let me think.'}}]},
                        {choices: [{delta: {content: 'Calling a tool.'}}]},
                        {choices: [{delta: {tool_calls: [{index: 0, id: 'call_1', type: 'function',
                                    function: {name: 'get_weather', arguments: ''}}]}}]},
                        {choices: [{delta: {tool_calls: [{index: 0, function: {arguments: '{"city": "Oslo"}'}}]}}]},
                        {choices: [{delta: {}, finish_reason: 'tool_calls'}],
                         usage: {prompt_tokens: 3, completion_tokens: 4}}];
        const body = chunks.map(c => 'data: ' + JSON.stringify(c) + '\\n\\n').join('') + 'data: [DONE]\\n\\n';
        window._realFetch = window.fetch;
        window.fetch = async () => new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
    """)
    box.send_keys("weather?")
    box.send_keys(Keys.ENTER)
    _wait(lambda: len(_answers(drv)) == 3 and _idle(drv), what="scripted answer")
    drv.execute_script("window.fetch = window._realFetch")
    last = drv.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    call = last.find_element(By.CSS_SELECTOR, ".tool-call")
    assert call.text == 'get_weather({"city": "Oslo"})' and call.find_elements(By.CSS_SELECTOR, "svg")
    details = last.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert details.get_attribute("hidden") is None and details.get_attribute("open") is None  # collapsed
    details.find_element(By.TAG_NAME, "summary").click()
    assert last.find_element(By.CSS_SELECTOR, ".reasoning-text").text == "Let me think."
    drv.save_screenshot(str(tmp_path / "web_page_chat.png"))  # text, image, reasoning and tool call on screen

    # 5. voice: the fake microphone plays the WAV; push-to-talk for ~1.5 s, then commit
    drv.find_element(By.ID, "new-chat").click()
    drv.execute_script("unigemma.startVoice()")
    _wait(lambda: drv.execute_script("return document.getElementById('mic').classList.contains('recording')"),
          what="recording")
    time.sleep(1.5)
    drv.execute_script("unigemma.commitVoice()")
    _wait(lambda: len(_answers(drv)) == 1 and _idle(drv), what="voice answer")
    note = drv.find_element(By.CSS_SELECTOR, ".msg.user .media").text
    secs = float(re.search(r"\(([\d.]+) s\)", note).group(1))
    assert secs > 0.5, note
    status = drv.find_element(By.ID, "status").text
    m = re.search(r"(\d+) prompt \+ (\d+) generated tokens \(completed\)", status)
    assert m, status
    assert int(m.group(1)) > secs * 20  # 25 audio tokens per second of speech, minus rounding
    # 6. hands-free: the page's VAD ends the turn when the speech-like burst stops (the socket's VAD is off, so
    # nothing else commits); listening then resumes
    drv.find_element(By.ID, "new-chat").click()
    drv.find_element(By.ID, "opt-handsfree").click()
    drv.execute_script("unigemma.startVoice()")
    _wait(lambda: len(_answers(drv)) >= 1, timeout=60, what="hands-free answer")
    assert "completed" in _wait(lambda: drv.find_element(By.ID, "status").text if "completed" in
                                drv.find_element(By.ID, "status").text else "", what="hands-free done")
    _wait(lambda: drv.execute_script("return document.getElementById('mic').classList.contains('recording')"),
          what="listening again")
    drv.find_element(By.ID, "mic").click()  # ends the loop
    _wait(lambda: _idle(drv) and not drv.execute_script(
        "return document.getElementById('mic').classList.contains('recording')"), what="loop stopped")
    shot = tmp_path / "web_page.png"
    drv.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
