"""End-to-end tests of the OpenAI-compatible server: a real uvicorn on 127.0.0.1, a tiny random Gemma 4 unified
checkpoint (vision + audio), and the official `openai` client.

The model is random, so tests check what must hold whatever it says: shapes of responses, token accounting
(image / audio soft tokens in `usage`), greedy determinism (stream == whole, batched == alone, n=2 greedy
identical), grammar-forced outputs (tool calls and JSON that validate), prefix reuse (`cached_tokens`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")


# --- fixtures shared with test_server_robustness.py ------------------------------------------------------------

def build_tiny_checkpoint(path: Path) -> dict[str, int]:
    """A tiny random gemma4_unified checkpoint whose vocabulary and special ids match the tiny tokenizer."""
    import torch
    from refmodels import BASE_TEXT, randomize
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    from unigemma.inputs.tokenizer import Tokenizer
    from unigemma.testing import write_tiny_tokenizer

    ids = write_tiny_tokenizer(path)
    vocab = len(Tokenizer.from_dir(path))
    text = {**BASE_TEXT, "vocab_size": vocab, "num_hidden_layers": 4, "global_head_dim": 32,
            "attention_k_eq_v": True, "num_global_key_value_heads": 1, "max_position_embeddings": 4096,
            "pad_token_id": ids["pad_token"], "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"]}
    cfg = Gemma4UnifiedConfig(
        text_config=text, image_token_id=ids["image_token"], audio_token_id=ids["audio_token"],
        video_token_id=ids["video_token"], boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"],
        boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"],
        vision_config=dict(mm_embed_dim=48, output_proj_dims=48, mm_posemb_size=40), audio_config=dict())
    torch.manual_seed(0)
    ref = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize(ref, 0)
    ref.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["eos_token"], ids["eot_token"], ids["str_token"]]}))
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `create_app(llm, settings)` in a background thread on 127.0.0.1."""

    def __init__(self, llm, settings):
        import uvicorn

        from unigemma.server import create_app

        self.app = create_app(llm, settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny_server_model")
    build_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    import unigemma
    return unigemma.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(tiny_llm, tmp_path_factory):
    from unigemma.server import ServerSettings

    root = tmp_path_factory.mktemp("media_root")
    settings = ServerSettings(model_name="tiny", max_model_len=512, max_concurrency=4, media_root=root)
    with LiveServer(tiny_llm, settings) as s:
        s.media_root = root
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def png_data_uri(w: int = 64, h: int = 64) -> str:
    from PIL import Image

    img = Image.fromarray((np.arange(w * h * 3) % 251).astype(np.uint8).reshape(h, w, 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(seconds: float = 1.0, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


USER = [{"role": "user", "content": "What is the weather in Oslo?"}]


# --- tests -----------------------------------------------------------------------------------------------------

def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_plain_and_streamed_agree(client):
    whole = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0)
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == (choice.message.content or "")
    assert finish == choice.finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_concurrent_requests_match_single(server, client):
    """Greedy outputs are the same decoded alone or batched with others (continuous batching is exact)."""
    prompts = [[{"role": "user", "content": f"Tell me about item {i} and the lazy dog"}] for i in range(4)]
    alone = [client.chat.completions.create(model="tiny", messages=m, max_tokens=12, temperature=0,
                                            logprobs=True) for m in prompts]

    async def together():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(ac.chat.completions.create(model="tiny", messages=m, max_tokens=12,
                                                                 temperature=0, logprobs=True) for m in prompts))

    batched = asyncio.run(together())
    for a, b in zip(alone, batched):
        ta = [t.token for t in a.choices[0].logprobs.content]
        tb = [t.token for t in b.choices[0].logprobs.content]
        assert ta == tb
        la = np.array([t.logprob for t in a.choices[0].logprobs.content])
        lb = np.array([t.logprob for t in b.choices[0].logprobs.content])
        assert np.allclose(la, lb, atol=1e-3)


def test_image_tokens_follow_detail_and_max_soft_tokens(client):
    base = client.chat.completions.create(model="tiny", max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Describe this image:"}]}])

    def with_image(image_url, **extra):
        return client.chat.completions.create(model="tiny", max_tokens=2, temperature=0, extra_body=extra or None,
                                              messages=[{"role": "user", "content": [
                                                  {"type": "text", "text": "Describe this image:"},
                                                  {"type": "image_url", "image_url": image_url}]}])

    low = with_image({"url": png_data_uri(), "detail": "low"})
    # a square image at budget 70 is an 8×8 grid: the image adds BOI + 64 soft tokens + EOI
    assert low.usage.prompt_tokens - base.usage.prompt_tokens == 64 + 2
    exact = with_image({"url": png_data_uri(), "max_soft_tokens": 140})  # 11×11 grid
    assert exact.usage.prompt_tokens - base.usage.prompt_tokens == 121 + 2
    assert with_image({"url": png_data_uri()}, max_soft_tokens=70).usage.prompt_tokens == low.usage.prompt_tokens
    # detail=high is 1089 tokens: more than this server's context of 512, reported with both numbers
    with pytest.raises(openai.BadRequestError) as e:
        with_image({"url": png_data_uri(), "detail": "high"})
    msg = e.value.body["message"]
    assert "512" in msg and str(base.usage.prompt_tokens + 1089 + 2) in msg


def test_local_image_under_media_root_only(server, client, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(server.media_root / "red.png")
    r = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "red.png", "detail": "low"}}]}])
    assert r.usage.prompt_tokens > 60
    Image.new("RGB", (40, 30)).save(tmp_path / "outside.png")
    for url in (str(tmp_path / "outside.png"), "../" + tmp_path.name + "/outside.png", "file:///etc/passwd"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}])
        assert e.value.body["param"] == "messages[0].content[0]"


def test_audio_clip(client):
    base = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Transcribe:"}]}])
    r = client.chat.completions.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Transcribe:"},
        {"type": "input_audio", "input_audio": {"data": wav_base64(1.0), "format": "wav"}}]}])
    # 1 s at 16 kHz = 25 frames of 640 samples: the clip adds BOA + 25 soft tokens + EOA
    assert r.usage.prompt_tokens - base.usage.prompt_tokens == 25 + 2
    assert r.choices[0].finish_reason in ("stop", "length")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["utc", "cet"]}}, "required": ["zone"]}}}


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_calls(client, choice):
    r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME], tool_choice=choice,
                                       max_tokens=120, temperature=0.8, seed=3, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_tool_call_deltas(client):
    stream = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=120, temperature=0.8, seed=5)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
                entry["id"] = tc.id or entry["id"]
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                entry["args"] += (tc.function.arguments or "") if tc.function else ""
    assert finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["args"]), WEATHER["function"]["parameters"])


def test_json_schema_output_validates(client):
    # small bounds: a random model spends most of its tokens on the whitespace the grammar allows between items
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=300, temperature=0.7, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                    "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), {**schema, "additionalProperties": False})
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=300, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_n2_and_seed(client):
    greedy = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    kw = dict(model="tiny", messages=USER, max_tokens=8, temperature=1.0, n=2, seed=11, logprobs=True)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    toks = lambda r, i: [t.token for t in r.choices[i].logprobs.content]  # noqa: E731
    assert toks(a, 0) == toks(b, 0) and toks(a, 1) == toks(b, 1)  # same seed, same samples
    assert a.usage.completion_tokens == len(a.choices[0].logprobs.content) + len(a.choices[1].logprobs.content) \
        + sum(c.finish_reason == "stop" for c in a.choices)  # a stop token counts but has no logprob entry


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert t.token == t.top_logprobs[0].token and abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token


def test_cached_tokens_on_repeated_prefix(client):
    system = {"role": "system", "content": "You are a helpful assistant. " * 8}
    first = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        system, {"role": "user", "content": "first question"}])
    second = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        system, {"role": "user", "content": "another question"}])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 60
    # everything up to the user text is shared
    assert 50 < cached < second.usage.prompt_tokens


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5, temperature=0,
                                  logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason in ("stop", "length")
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 5
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    many = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=3, temperature=0)
    assert [ch.index for ch in many.choices] == [0, 1]
    ids = client.completions.create(model="tiny", prompt=[2, 40, 41], max_tokens=3, temperature=0, echo=True)
    assert ids.usage.prompt_tokens == 3
    text = "".join(ch.text for ch in client.completions.create(model="tiny", prompt="The quick brown fox",
                                                                max_tokens=5, temperature=0, stream=True)
                   for ch in ch.choices)
    assert text == c.text


def test_thinking_switch_changes_prompt(client):
    off = client.chat.completions.create(model="tiny", messages=USER, max_tokens=1)
    on = client.chat.completions.create(model="tiny", messages=USER, max_tokens=1,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    effort = client.chat.completions.create(model="tiny", messages=USER, max_tokens=1, reasoning_effort="high")
    # thinking on adds the system turn with <|think|> and drops the empty, closed thought channel
    assert on.usage.prompt_tokens != off.usage.prompt_tokens
    assert effort.usage.prompt_tokens == on.usage.prompt_tokens


def test_json_schema_after_thinking_returns_reasoning_separately(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=80, temperature=0.9, seed=4, reasoning_effort="high",
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    msg = r.choices[0].message
    assert "<|channel>" not in (msg.content or "") and "<channel|>" not in (msg.content or "")
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(msg.content), schema)
