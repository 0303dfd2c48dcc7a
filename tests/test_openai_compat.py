"""Issue 24: what today's OpenAI clients send and expect, against a live server on a tiny random model.

The request policy (every documented chat-completions field parses; explicit nulls are defaults; fields a local
model ignores are named in `x-unigemma-ignored-fields`; refusals only where ignoring would mislead), one
finish-reason rule for tool calls cut off by the token budget (streamed == whole), the Responses API, the
embeddings endpoint, model aliases, CORS and the `api-key` header. Clients: the official `openai` SDK, and raw
httpx where a header or an exact body is the point.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
httpx = pytest.importorskip("httpx")

from test_server import (TIME, USER, WEATHER, LiveServer, png_data_uri, tiny_llm,  # noqa: E402,F401
                         tiny_model_dir, wav_base64)

MODEL = "tiny"
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(tiny_llm):  # noqa: F811
    from unigemma.server import ServerSettings

    settings = ServerSettings(model_name=MODEL, max_model_len=2048, max_concurrency=4)
    with LiveServer(tiny_llm, settings) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 3, "temperature": 0, **kw}


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- finish reasons: a tool call cut off by the budget ------------------------------------------------------------

def _streamed_call(client, **kw):
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
                entry["id"] = tc.id or entry["id"]
                if tc.function and tc.function.name:
                    entry["name"] = tc.function.name
                entry["args"] += (tc.function.arguments or "") if tc.function else ""
    return finish, calls


@pytest.mark.parametrize("max_tokens", [10, 20])
def test_tool_call_cut_by_the_budget_is_length_and_the_same_streamed_or_not(client, max_tokens):
    # forced call, seed 5: the call's arguments are still open after 10 and after 20 tokens (at 20 the old code
    # repaired the cut call and said "tool_calls"; at 10 it dropped it whole but streamed its start)
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER], tool_choice=FORCE_WEATHER, max_tokens=max_tokens,
              temperature=0.8, seed=5)
    whole = client.chat.completions.create(**kw).choices[0]
    finish, calls = _streamed_call(client, **kw)
    assert whole.finish_reason == "length" and finish == "length"
    assert len(whole.message.tool_calls) == 1 and list(calls) == [0]
    got = whole.message.tool_calls[0].function
    assert got.name == calls[0]["name"] == "get_weather"
    assert got.arguments == calls[0]["args"]          # exactly what the stream sent, no repair
    assert got.arguments.startswith('{"city": ')
    with pytest.raises(json.JSONDecodeError):
        json.loads(got.arguments)                     # cut off: incomplete JSON, as OpenAI sends it


def test_complete_tool_call_still_finishes_with_tool_calls(client):
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER], tool_choice=FORCE_WEATHER, max_tokens=40,
              temperature=0.8, seed=5)
    assert client.chat.completions.create(**kw).choices[0].finish_reason == "tool_calls"
    finish, calls = _streamed_call(client, **kw)
    assert finish == "tool_calls" and json.loads(calls[0]["args"])["city"]


# --- request policy -----------------------------------------------------------------------------------------------

def test_explicit_nulls_mean_default(client, http):
    r = http.post("/v1/chat/completions", json=chat_body(logprobs=None, n=None, stream=None, parallel_tool_calls=None,
                                                         top_logprobs=None, stop=None, stream_options=None,
                                                         tool_choice=None, tools=None, user=None))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None
    assert "x-unigemma-ignored-fields" not in r.headers  # a null is not a value: nothing was ignored
    # the SDK passes None through when asked to
    c = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, n=None, logprobs=None,
                                       parallel_tool_calls=None)
    assert len(c.choices) == 1


def test_documented_fields_parse_and_the_ignored_ones_are_named(client, http):
    fields = dict(modalities=["text"], prediction={"type": "content", "content": "hello"}, verbosity="low",
                  prompt_cache_key="k1", safety_identifier="u-1", web_search_options={}, store=False,
                  metadata={"a": "b"}, service_tier="auto", user="me", prompt_cache_retention="24h")
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=USER, max_tokens=3, **fields)
    assert raw.parse().choices[0].message.role == "assistant"
    ignored = {x.strip() for x in raw.headers["x-unigemma-ignored-fields"].split(",")}
    assert ignored == set(fields) - {"modalities"}
    # streamed, with stream_options.include_obfuscation: the header comes with the stream
    with http.stream("POST", "/v1/chat/completions",
                     json=chat_body(stream=True, stream_options={"include_usage": True, "include_obfuscation": False},
                                    verbosity="high")) as r:
        assert r.status_code == 200
        assert r.headers["x-unigemma-ignored-fields"] == "verbosity, stream_options.include_obfuscation"
        assert any('"usage"' in line for line in r.iter_lines())


def test_reasoning_effort_xhigh_turns_thinking_on(http):
    r = http.post("/v1/chat/completions", json=chat_body(reasoning_effort="xhigh"))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value,param_word", [
    ("modalities", ["text", "audio"], "audio output is not supported"),
    ("tools", [{"type": "custom", "custom": {"name": "grep"}}], "custom (free-form input) tools are not supported"),
])
def test_misleading_fields_are_refused_clearly(http, field, value, param_word):
    err = error_of(http.post("/v1/chat/completions", json=chat_body(**{field: value})), 422 if field == "tools"
                   else 400)
    assert param_word in err["message"]
    assert "Unrecognized" not in err["message"]


def test_audio_output_request_is_refused_even_with_audio_options(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, modalities=["text", "audio"],
                                       audio={"voice": "alloy", "format": "wav"})
    assert "audio output is not supported" in e.value.body["message"]


def test_legacy_functions_are_honoured_and_answered_in_kind(client, http):
    fn = WEATHER["function"]
    r = http.post("/v1/chat/completions", json=chat_body(functions=[fn], function_call={"name": "get_weather"},
                                                         max_tokens=40, temperature=0.8, seed=5))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert "tool_calls" not in choice["message"]
    args = json.loads(choice["message"]["function_call"]["arguments"])
    # the result comes back as a role "function" message, and an assistant message with function_call
    follow = [*USER, {"role": "assistant", "content": None, "function_call": {"name": "get_weather",
                                                                             "arguments": json.dumps(args)}},
              {"role": "function", "name": "get_weather", "content": '{"temp_c": 21}'}]
    r2 = http.post("/v1/chat/completions", json=chat_body(messages=follow, functions=[fn], function_call="none"))
    assert r2.status_code == 200, r2.text
    # streamed: function_call deltas, finish_reason function_call
    with http.stream("POST", "/v1/chat/completions", json=chat_body(
            functions=[fn], function_call={"name": "get_weather"}, max_tokens=40, temperature=0.8, seed=5,
            stream=True)) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [c for e in events for c in e["choices"]]
    assert not any("tool_calls" in c["delta"] for c in deltas)
    assert "".join(c["delta"].get("function_call", {}).get("arguments", "") for c in deltas) == json.dumps(args)
    assert deltas[-1]["finish_reason"] == "function_call"


def test_allowed_tools_choice_narrows_the_tools(http):
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}
    r = http.post("/v1/chat/completions", json=chat_body(tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60,
                                                         temperature=0.8, seed=2))
    assert r.status_code == 200, r.text
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    bad = dict(choice, allowed_tools={"mode": "auto", "tools": [{"type": "function", "function": {"name": "nope"}}]})
    err = error_of(http.post("/v1/chat/completions", json=chat_body(tools=[WEATHER], tool_choice=bad)), 400)
    assert "'nope'" in err["message"] and "get_weather" in err["message"]


def test_echoed_refusal_parts_file_parts_and_detail_original(http):
    png = png_data_uri(16, 16)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": png, "detail": "original"}},
                                     {"type": "file", "file": {"file_data": png, "filename": "a.png"}},
                                     {"type": "file", "file": {"file_data": "data:audio/wav;base64," + wav_base64(0.5),
                                                               "filename": "a.wav"}}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
        {"role": "user", "content": "ok"}]
    r = http.post("/v1/chat/completions", json=chat_body(messages=messages))
    assert r.status_code == 200, r.text
    only_text = http.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "look"}]))
    # two images (image_url + file) and an audio clip are in the prompt
    assert r.json()["usage"]["prompt_tokens"] > only_text.json()["usage"]["prompt_tokens"] + 100
    err = error_of(http.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-abc"}}]}])), 422)
    assert "Files API" in err["message"] and err["param"].startswith("messages[0]")
    err = error_of(http.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}]}])), 422)
    assert "application/pdf" in err["message"]


def test_unknown_fields_are_still_refused(http):
    err = error_of(http.post("/v1/chat/completions", json=chat_body(temprature=0.5)), 400)
    assert err["param"] == "temprature" and err["code"] == "unrecognized_argument"
    err = error_of(http.post("/v1/chat/completions", json=chat_body(legacy_functions=True)), 400)
    assert "legacy_functions" in err["message"]


# --- the Responses API --------------------------------------------------------------------------------------------

RESP_WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
                "parameters": WEATHER["function"]["parameters"]}


def _collect_stream(stream) -> tuple[list, object]:
    events = list(stream)
    return events, events[-1].response


def test_responses_create_string_input_and_usage(client):
    r = client.responses.create(model=MODEL, input="What is the weather in Oslo?", instructions="Be brief.",
                                max_output_tokens=8, temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    msgs = [o for o in r.output if o.type == "message"]
    assert len(msgs) == 1 and msgs[0].role == "assistant" and msgs[0].content[0].type == "output_text"
    assert r.output_text == msgs[0].content[0].text
    assert r.usage.output_tokens >= 1
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 8
    else:
        assert r.status == "completed"


def test_responses_stream_matches_whole_and_follows_the_event_sequence(client):
    kw = dict(model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}],
              max_output_tokens=12, temperature=1.0, extra_body={"seed": 3})   # seed 3: text, no stop
    whole = client.responses.create(**kw)
    events, final = _collect_stream(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == ("response.incomplete" if whole.status == "incomplete" else "response.completed")
    assert kinds[2:6] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                          kinds[5]]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert whole.status == "incomplete" and whole.usage.output_tokens == 12
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == final.output_text
    assert [e.text for e in events if e.type == "response.output_text.done"] == [text]
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_responses_forced_tool_call_then_output_continues_with_previous_response_id(client):
    r = client.responses.create(model=MODEL, input="What is the weather in Oslo?", tools=[RESP_WEATHER],
                                tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40,
                                temperature=0.8, extra_body={"seed": 5})
    assert r.status == "completed"
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), RESP_WEATHER["parameters"])
    # streamed: the same call through function_call_arguments events
    events, final = _collect_stream(client.responses.create(
        model=MODEL, input="What is the weather in Oslo?", tools=[RESP_WEATHER], stream=True,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40, temperature=0.8,
        extra_body={"seed": 5}))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args == done[0].arguments == calls[0].arguments == final.output[-1].arguments
    # the result goes back as function_call_output; the stored conversation supplies the call
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, tools=[RESP_WEATHER], max_output_tokens=6,
                                 temperature=0, input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                                        "output": '{"temp_c": 21}'}])
    assert r2.previous_response_id == r.id and r2.status in ("completed", "incomplete")
    # the stored history made the prompt longer than the bare tool output would be
    bare = client.responses.create(model=MODEL, input="x", max_output_tokens=1)
    assert r2.usage.input_tokens > bare.usage.input_tokens + r.usage.input_tokens - 5


def test_responses_function_call_items_in_input_without_state(client):
    items = [{"role": "user", "content": "What is the weather in Oslo?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    r = client.responses.create(model=MODEL, input=items, tools=[RESP_WEATHER], max_output_tokens=4, store=False)
    assert r.status in ("completed", "incomplete")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)               # store: false keeps nothing


def test_responses_retrieve_delete_and_unknown_previous(client):
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=3, temperature=0)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == r.status
    deleted = client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id"


def test_responses_truncated_call_is_incomplete_streamed_and_not(client):
    kw = dict(model=MODEL, input="What is the weather in Oslo?", tools=[RESP_WEATHER], max_output_tokens=20,
              tool_choice={"type": "function", "name": "get_weather"}, temperature=0.8, extra_body={"seed": 5})
    r = client.responses.create(**kw)
    _, final = _collect_stream(client.responses.create(stream=True, **kw))
    for resp in (r, final):
        assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
        assert resp.output[-1].type == "function_call" and resp.output[-1].status == "incomplete"
    assert r.output[-1].arguments == final.output[-1].arguments
    # the cut call (incomplete JSON) is not sent back as history: continuing from it works
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, input="go on", max_output_tokens=2)
    assert r2.status in ("completed", "incomplete")


def test_responses_json_schema_and_media_input(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Answer in JSON", max_output_tokens=40, temperature=0, text={
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    media = client.responses.create(model=MODEL, max_output_tokens=2, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": png_data_uri(16, 16), "detail": "low"},
        {"type": "input_audio", "input_audio": {"data": wav_base64(0.5), "format": "wav"}}]}])
    plain = client.responses.create(model=MODEL, max_output_tokens=2, input="what is this?")
    assert media.usage.input_tokens > plain.usage.input_tokens + 70


def test_responses_refusals_are_openai_errors(http):
    for body, param_word in [({"tools": [{"type": "web_search"}]}, "OpenAI's servers run"),
                             ({"background": True}, "background"),
                             ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
                             ({"max_output_tokens": 0}, "max_output_tokens"),
                             ({"bogus": 1}, "bogus")]:
        r = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})
        assert r.status_code in (400, 422), r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and param_word in err["message"], err


# --- embeddings ---------------------------------------------------------------------------------------------------

def test_embeddings_float_and_base64_agree_and_are_unit_length(client, tiny_llm):  # noqa: F811
    import numpy as np

    texts = ["the weather in Oslo", "a red circle", "x"]
    f = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    b = client.embeddings.create(model=MODEL, input=texts)          # the SDK asks for base64 and decodes it
    hidden = tiny_llm.config.text.hidden_size
    assert [d.index for d in f.data] == [0, 1, 2] and all(len(d.embedding) == hidden for d in f.data)
    vf, vb = np.array([d.embedding for d in f.data]), np.array([d.embedding for d in b.data])
    np.testing.assert_allclose(vf, vb, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(vf, axis=1), 1.0, atol=1e-5)
    assert f.usage.prompt_tokens == f.usage.total_tokens == sum(
        len(tiny_llm.tokenizer.encode(t, add_bos=True)) for t in texts)
    # batched == alone (padding is masked), and different texts differ
    alone = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float").data[0].embedding
    np.testing.assert_allclose(vf[0], alone, atol=1e-5)
    assert not np.allclose(vf[0], vf[1], atol=1e-3)


def test_embeddings_are_the_pooled_final_hidden_states(client, tiny_llm):  # noqa: F811
    import torch

    ids = tiny_llm.tokenizer.encode("a red circle", add_bos=True)
    got = client.embeddings.create(model=MODEL, input=[ids], encoding_format="float").data[0].embedding
    with torch.inference_mode():
        h = tiny_llm.model.run(torch.tensor([ids]), compute_logits=False).hidden[0].float().mean(0)
    want = (h / h.norm()).tolist()
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
    # token-id input and the same text agree
    text = client.embeddings.create(model=MODEL, input="a red circle", encoding_format="float").data[0].embedding
    assert max(abs(a - b) for a, b in zip(got, text)) < 1e-6


def test_embeddings_dimensions_and_limits(client, http, tiny_llm):  # noqa: F811
    import numpy as np

    hidden = tiny_llm.config.text.hidden_size
    full = np.array(client.embeddings.create(model=MODEL, input="abc", encoding_format="float").data[0].embedding)
    short = np.array(client.embeddings.create(model=MODEL, input="abc", dimensions=8,
                                              encoding_format="float").data[0].embedding)
    np.testing.assert_allclose(short, full[:8] / np.linalg.norm(full[:8]), atol=1e-6)
    for dims in (0, -1, hidden + 1):
        err = error_of(http.post("/v1/embeddings", json={"model": MODEL, "input": "abc", "dimensions": dims}), 400)
        assert err["param"] == "dimensions" and str(hidden) in err["message"]
    for body, param in [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[10 ** 9]]}, "input"),
                        ({"input": ["a"] * 300}, "input"),
                        ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
                        ({"model": "other", "input": "a"}, "model")]:
        r = http.post("/v1/embeddings", json={"model": MODEL, **body})
        assert r.status_code in (400, 404, 422), r.text
        assert r.json()["error"]["param"] == param, r.text
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": "a", "user": "me", "dimensions": None})
    assert r.status_code == 200 and r.headers["x-unigemma-ignored-fields"] == "user"


# --- model names, CORS, api-key -----------------------------------------------------------------------------------

def test_aliases_any_name_cors_and_api_key_header(tiny_llm):  # noqa: F811
    from unigemma.server import ServerSettings

    settings = ServerSettings(model_name="gemma-local", model_aliases=("gpt-4o-mini", "gemma"), api_key="s3cret",
                              allowed_origins=("http://app.example",), max_model_len=256)
    with LiveServer(tiny_llm, settings) as s:
        sdk = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert [m.id for m in sdk.models.list().data] == ["gemma-local", "gpt-4o-mini", "gemma"]
        for name in ("gemma-local", "gpt-4o-mini"):
            r = sdk.chat.completions.create(model=name, messages=USER, max_tokens=2)
            assert r.model == "gemma-local"
        with pytest.raises(openai.NotFoundError) as e:
            sdk.chat.completions.create(model="llama", messages=USER, max_tokens=2)
        assert "'gpt-4o-mini'" in e.value.body["message"] and "--accept-any-model-name" in e.value.body["message"]
        with httpx.Client(base_url=s.url, timeout=60) as h:
            # Azure-style key header; a wrong one is still a 401
            ok = h.post("/v1/embeddings", json={"model": "gemma", "input": "a"}, headers={"api-key": "s3cret"})
            assert ok.status_code == 200, ok.text
            assert error_of(h.post("/v1/embeddings", json={"model": "gemma", "input": "a"},
                                   headers={"api-key": "wrong"}), 401)["code"] == "invalid_api_key"
            # CORS: the allowed origin's preflight (no key) is answered; its request needs the key as before
            pre = h.options("/v1/chat/completions", headers={
                "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
            r = h.post("/v1/chat/completions", json=chat_body(model="gemma", verbosity="low"),
                       headers={"Origin": "http://app.example", "Authorization": "Bearer s3cret"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
            assert "x-unigemma-ignored-fields" in r.headers["access-control-expose-headers"]
            other = h.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in other.headers
    with LiveServer(tiny_llm, ServerSettings(model_name="tiny", accept_any_model_name=True, max_model_len=256)) as s:
        sdk = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert sdk.chat.completions.create(model="gpt-4.1", messages=USER, max_tokens=2).model == "tiny"
        assert sdk.responses.create(model="anything", input="hi", max_output_tokens=2).model == "tiny"
        # no origins configured: no CORS headers, and a browser preflight is not granted
        with httpx.Client(base_url=s.url, timeout=60) as h:
            pre = h.options("/v1/chat/completions", headers={"Origin": "http://app.example",
                                                             "Access-Control-Request-Method": "POST"})
            assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers


def test_serve_flags_for_names_origins_and_stores():
    import argparse

    from unigemma.server.run import add_serve_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    s = settings_from_args(p.parse_args(["--served-model-name", "a", "b", "c", "--accept-any-model-name",
                                         "--allowed-origins", "http://x.example", "http://y.example:3000",
                                         "--max-stored-responses", "5", "--max-embedding-inputs", "7",
                                         "--max-embedding-tokens", "99"]), "folder")
    assert (s.model_name, s.model_aliases, s.accept_any_model_name) == ("a", ("b", "c"), True)
    assert s.allowed_origins == ("http://x.example", "http://y.example:3000")
    assert (s.max_stored_responses, s.max_embedding_inputs, s.max_embedding_tokens) == (5, 7, 99)
    d = settings_from_args(p.parse_args([]), "folder")
    assert (d.model_name, d.model_aliases, d.accept_any_model_name, d.allowed_origins) == ("folder", (), False, ())


def test_responses_store_keeps_the_newest_and_names_responses_fields(tiny_llm):  # noqa: F811
    from unigemma.server import ServerSettings

    with LiveServer(tiny_llm, ServerSettings(model_name=MODEL, max_model_len=256, max_stored_responses=2)) as s:
        sdk = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        ids = [sdk.responses.create(model=MODEL, input=f"hi {i}", max_output_tokens=1).id for i in range(3)]
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(ids[0])            # the oldest went when the third came
        assert [sdk.responses.retrieve(i).id for i in ids[1:]] == ids[1:]
        raw = sdk.responses.with_raw_response.create(model=MODEL, input="hi", max_output_tokens=1, user="u",
                                                     text={"format": {"type": "text"}, "verbosity": "low"})
        assert raw.headers["x-unigemma-ignored-fields"] == "user, text.verbosity"
        with pytest.raises(openai.BadRequestError) as e:
            sdk.responses.create(model=MODEL, input="hi", reasoning={"effort": "extreme"})
        assert e.value.body["param"] == "reasoning.effort"


def test_responses_stream_reports_an_engine_failure_as_an_error_event(server, http, monkeypatch):
    # as in test_hardening: without the position-table guard this image fails inside the engine, after the
    # stream has started, so the failure comes in-band with the next sequence number
    import unigemma.inputs.image as image_mod

    monkeypatch.setattr(image_mod, "check_positions", lambda *a, **k: None)
    body = {"model": MODEL, "stream": True, "max_output_tokens": 4, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": png_data_uri(4000, 1)}]}]}
    with http.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [e["type"] for e in events] and names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "error" and events[-1]["code"] == "engine_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    ok = http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 2})
    assert ok.status_code == 200                      # it failed alone
