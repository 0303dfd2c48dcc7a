"""A new user's first minutes, end to end: the server started exactly as `make serve` starts it (scripts/serve.sh:
the bundled demo model under its real served name, a real process on 127.0.0.1), and the web page at / driven in
headless Chromium with its default settings except temperature 0: attach a drawn red circle, ask, get "red" and
"circle"; ask a sum with thinking on, get the trace and "72".

What this module does not test: the page's every feature on a random model (test_web_page.py) or the API's answers
(test_demo_server.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_demo_model import shape_png
from test_server import free_port
from test_web_page import start_chromium

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "demo"))
import make_data  # noqa: E402


def test_make_serve_runs_scripts_serve_sh():
    """The command below is the one `make serve` runs after its setup step (so the server here is the README's)."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^serve:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "no serve target in the Makefile"
    assert recipe.group(1).strip() == "PYTHON=$(PYTHON) HOST=$(HOST) PORT=$(PORT) bash scripts/serve.sh"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`PYTHON=python3 HOST=127.0.0.1 PORT=<free> bash scripts/serve.sh` in the repository, stopped with SIGINT."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHON": sys.executable, "HOST": "127.0.0.1", "PORT": str(port)}
    env.pop("MODEL", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "scripts/serve.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"scripts/serve.sh exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"the server did not answer /health in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops `make serve`
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def page(served, tmp_path_factory):
    drv = start_chromium(tmp_path_factory.mktemp("chromium"))
    try:
        drv.get(served + "/")
        _wait(lambda: drv.execute_script("return document.readyState") == "complete", "page load")
        yield drv
    finally:
        drv.quit()


def _wait(cond, what: str, timeout: float = 90.0):
    t = time.time()
    while time.time() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ask(drv, text: str, image: Path | None = None) -> dict:
    """Start a new chat, attach `image` through the file input, send `text`; the assistant bubble when done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    drv.find_element(By.ID, "new-chat").click()
    if image is not None:
        fi = drv.find_element(By.ID, "file-input")
        drv.execute_script("arguments[0].hidden = false", fi)
        fi.send_keys(str(image))
        drv.execute_script("arguments[0].hidden = true", fi)
        _wait(lambda: drv.execute_script("return document.querySelectorAll('#attachments img').length") == 1,
              "attachment thumbnail")
    box = drv.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    _wait(lambda: drv.execute_script("return document.querySelectorAll('.msg.assistant').length") == 1
          and drv.execute_script("return document.body.dataset.busy") == "0", f"the answer to {text!r}")
    return drv.execute_script("""
        const a = document.querySelector('.msg.assistant');
        const e = a.querySelector('.error');
        return {content: a.querySelector('.content').textContent.replace(e ? e.textContent : '', ''),
                error: e ? e.textContent : null, reasoning: a.querySelector('.reasoning-text').textContent,
                images: document.querySelectorAll('.msg.user img.thumb').length,
                status: document.getElementById('status').textContent};""")


def test_page_answers_a_drawn_red_circle(served, page, tmp_path):
    drv = page
    models = httpx.get(served + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["model"]  # the bundled model's folder name: what the page must send
    _wait(lambda: drv.execute_script("return document.getElementById('model-name').textContent") == "model",
          "the served model id in the sidebar")
    # defaults a new user has; only the temperature is set, through the slider, so the answers are greedy
    assert drv.execute_script("return document.getElementById('opt-image-budget').value") == "auto"
    drv.execute_script("const t = document.getElementById('opt-temperature'); t.value = 0;"
                       "t.dispatchEvent(new Event('input')); t.dispatchEvent(new Event('change'));")
    # the composer's icons are drawn (inline SVG), not emoji that need a font
    for button in ("attach", "camera", "mic"):
        w = drv.execute_script(f"const s = document.querySelector('#{button} svg');"
                               "return s ? s.getBoundingClientRect().width : 0")
        assert w >= 12, (button, w)

    circle = shape_png(tmp_path / "circle.png", "circle", make_data.COLOURS["red"])
    colour = _ask(drv, "What colour is the shape?", circle)
    assert colour["error"] is None and colour["images"] == 1
    assert colour["content"].strip() == "red", colour
    assert re.search(r"\d+ prompt \+ \d+ generated tokens", colour["status"]), colour
    shape = _ask(drv, "What shape is this?", circle)
    assert shape["error"] is None and shape["content"].strip() == "circle", shape
    drv.save_screenshot(str(tmp_path / "circle.png.answer.png"))

    drv.find_element("id", "opt-thinking").click()
    total = _ask(drv, "What is 48 + 24?")
    assert total["error"] is None and total["content"].strip() == "72", total
    assert total["reasoning"].startswith("ones: 8 + 4 = 12"), total
