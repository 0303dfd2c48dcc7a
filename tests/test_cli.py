"""The CLI: `chat` driven through a pseudo-terminal, `generate`, `bench`; errors are one line, no traceback."""

import json
import re
import subprocess
import sys

import pexpect
import pytest
from PIL import Image

from tinyllm import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), seed=4)


def run(*args):
    return subprocess.run([sys.executable, "-m", "unigemma.cli", *args], capture_output=True, text=True, timeout=300)


def test_chat_session_in_a_pty(ckpt, tmp_path):
    img = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(img)
    saved = tmp_path / "conv.json"
    child = pexpect.spawn(sys.executable, ["-m", "unigemma.cli", "chat", "--model", str(ckpt), "--device", "cpu",
                                           "--max-tokens", "8", "--temperature", "0"],
                          encoding="utf-8", timeout=120)
    child.expect("unigemma chat")
    child.expect("> ")
    child.sendline("/image /no/such.png")
    child.expect("no such file")
    child.sendline(f"/image {img}")
    child.expect("image attached")
    child.sendline("/think on")
    child.expect("thinking on")
    child.sendline("What colour is this?")
    child.expect("> ")
    child.sendline("/think off")
    child.expect("thinking off")
    child.sendline("And now?")
    child.expect("> ")
    child.sendline(f"/save {saved}")
    child.expect("saved 4 messages")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    assert conv[0]["content"][0]["type"] == "image"


def test_chat_ctrl_c_stops_the_answer_not_the_session(ckpt):
    # greedy: this tiny model never emits an end token for this prompt, so the answer is still streaming when
    # Ctrl-C arrives (sampled, it could end on its own first and the test would race)
    child = pexpect.spawn(sys.executable, ["-m", "unigemma.cli", "chat", "--model", str(ckpt), "--device", "cpu",
                                           "--max-tokens", "4000", "--temperature", "0"],
                          encoding="utf-8", timeout=120)
    child.expect("> ")
    child.sendline("Tell me a very long story.")
    child.expect("story.\r\n")
    child.expect(r"\S", timeout=60)  # the answer has started streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect("> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generate_json_and_schema(ckpt, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    r = run("generate", "--model", str(ckpt), "--device", "cpu", "--prompt", "n?", "--json-schema", str(f),
            "--json", "--temperature", "0", "--max-tokens", "40")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert json.loads(out["content"])["n"] in range(10) and out["finish_reason"] == "stop"


def test_bench_and_errors(ckpt):
    r = run("bench", "--model", str(ckpt), "--device", "cpu", "--prompt-tokens", "32", "--new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {x["bench"] for x in rows} == {"prefill", "decode", "memory"} and all(x["value"] > 0 for x in rows)
    bad = run("generate", "--model", str(ckpt), "--device", "cpu", "--prompt", "x", "--image", "/no/such.png")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no such file" in bad.stderr
    bad = run("generate", "--model", "/no/such/dir", "--prompt", "x")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_bench_times_decode_and_prints_human_units(ckpt):
    """Decode is timed from its first streamed token to its last (it was total minus a separately timed prefill,
    floored at 1e-9 s: "decode 63000000000.0 tok/s" whenever the prefix cache made the run faster than that
    prefill); the text output says how many tokens in how long, and memory in MiB / GiB."""
    r = run("bench", "--model", str(ckpt), "--device", "cpu", "--prompt-tokens", "64", "--new-tokens", "16")
    assert r.returncode == 0, r.stderr
    m = re.search(r"^decode\s+([\d,.]+) tok/s\s+(\d+) tokens in ([\d.]+) (ms|s) \(([\d.]+) ms per token", r.stdout,
                  re.M)
    assert m, r.stdout
    tps, n, t = float(m.group(1).replace(",", "")), int(m.group(2)), float(m.group(3))
    seconds = t / 1000 if m.group(4) == "ms" else t
    assert 13 <= n <= 15 and seconds > 0
    assert abs(tps - n / seconds) <= 0.02 * tps + 0.2, (tps, n, seconds)  # the rate is what the line's time says
    assert abs(float(m.group(5)) - 1000 * seconds / n) <= 0.05 + 0.01 * float(m.group(5))
    assert re.search(r"^prefill\s+[\d,.]+ tok/s\s+64 tokens in [\d.]+ m?s$", r.stdout, re.M), r.stdout
    mem = re.search(r"^memory\s+([\d.]+) (MiB|GiB)\s+peak resident", r.stdout, re.M)
    assert mem, r.stdout
    mib = float(mem.group(1)) * (1024 if mem.group(2) == "GiB" else 1)
    assert 10 < mib < 16 * 1024 and (mem.group(2) == "MiB") == (mib < 1024), r.stdout  # human units, either way
    rows = {x["bench"]: x for x in map(json.loads, run("bench", "--model", str(ckpt), "--device", "cpu",
                                                           "--prompt-tokens", "64", "--new-tokens", "16",
                                                           "--json").stdout.splitlines())}
    d = rows["decode"]
    assert d["seconds"] > 0 and d["value"] == pytest.approx(d["new_tokens"] / d["seconds"])


def test_progress_bar_while_loading_in_a_terminal(ckpt):
    child = pexpect.spawn(sys.executable, ["-m", "unigemma.cli", "generate", "--model", str(ckpt), "--device", "cpu",
                                           "--prompt", "hi", "--max-tokens", "2"], encoding="utf-8", timeout=120)
    child.expect("loading weights")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
