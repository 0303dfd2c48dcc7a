"""The bundled demo model end to end: `unigemma serve` with no --model (what the README's main command runs),
a real uvicorn on 127.0.0.1, and the official `openai` client — checking the answers, not only their shapes.

Images are drawn here and speech is synthesised here with espeak-ng (not taken from the training data); the
questions use the demo's own phrasings. What this module does not test: accuracy over the test split
(benchmarks/demo_eval.py) or the server on random models (tests/test_server*.py).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from typing import Literal
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from test_demo_model import shape_png  # noqa: E402
from test_server import LiveServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "demo"))
import make_data  # noqa: E402

MODEL = "unigemma-demo"


@pytest.fixture(scope="module")
def server():
    import unigemma
    from unigemma.server import ServerSettings

    llm = unigemma.load(None, device="cpu")  # the bundled model (and its drafter when one is shipped)
    with LiveServer(llm, ServerSettings(model_name=MODEL, max_model_len=2048, max_concurrency=4)) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def png_uri(path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask_image(client, path, question: str) -> str:
    r = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_uri(path), "max_soft_tokens": 70}},
        {"type": "text", "text": question}]}])
    assert r.choices[0].finish_reason == "stop"
    return r.choices[0].message.content.strip()


@pytest.mark.parametrize("shape,colour", [("circle", "red"), ("square", "blue"), ("triangle", "green")])
def test_colour_and_shape_of_a_drawn_shape(client, tmp_path, shape, colour):
    path = shape_png(tmp_path / "s.png", shape, make_data.COLOURS[colour])
    assert ask_image(client, path, "What colour is the shape?") == colour
    assert ask_image(client, path, "What shape is this?") == shape


def test_tool_call_then_answer_from_the_result(client):
    tools = [make_data.TOOLS["get_weather"], make_data.TOOLS["get_time"]]
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"temperature": 12, "unit": "celsius", "condition": "sunny"})}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=60, temperature=0)
    answer = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert "12" in answer and "Oslo" in answer and "sunny" in answer, answer


def test_json_extraction_is_schema_valid_and_right(client):
    schema = make_data.SCHEMAS["person"]
    r = client.chat.completions.create(
        model=MODEL, max_tokens=60, temperature=0,
        messages=[{"role": "user", "content": "Extract the name, age and city as JSON.\n"
                                              "Text: Maria is 34 years old and lives in Paris."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert value["name"] == "Maria" and value["city"] == "Paris"


def test_thinking_streams_a_trace_before_the_sum(client):
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=96, temperature=0, stream=True,
        messages=[{"role": "user", "content": "What is 23 + 45?"}],
        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    reasoning, content = "", ""
    for chunk in stream:
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert reasoning.startswith("ones: 3 + 5 = 8") and "tens: 2 + 4 = 6" in reasoning, reasoning
    assert content.strip() == "68", content


def test_spoken_digit_is_recognised(client, tmp_path):
    assert shutil.which("espeak-ng"), "espeak-ng is not installed: run `make setup-system`"
    wav = tmp_path / "seven.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-s", "150", "-w", str(wav), "seven"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data = base64.b64encode(wav.read_bytes()).decode()
    r = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
        {"type": "text", "text": "Which number was said?"}]}])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.strip() == "7"


# --- the Responses API on the demo model (issue 24): real answers, not only shapes ------------------------------

def _responses_tool(chat_tool: dict) -> dict:
    return {"type": "function", **chat_tool["function"]}


def test_responses_tool_call_then_answer_with_previous_response_id(client):
    tools = [_responses_tool(make_data.TOOLS["get_weather"]), _responses_tool(make_data.TOOLS["get_time"])]
    r = client.responses.create(model=MODEL, input="What is the weather in Oslo?", tools=tools,
                                max_output_tokens=60, temperature=0)
    assert r.status == "completed"
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    result = json.dumps({"temperature": 12, "unit": "celsius", "condition": "sunny"})
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, tools=tools, max_output_tokens=60,
                                 temperature=0, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                        "output": result}])
    assert r2.status == "completed"
    answer = r2.output_text
    assert "12" in answer and "Oslo" in answer and "sunny" in answer, answer


def test_responses_streamed_reasoning_summary_before_the_sum(client):
    stream = client.responses.create(model=MODEL, input="What is 23 + 45?", max_output_tokens=96, temperature=0,
                                     reasoning={"effort": "medium", "summary": "auto"}, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    summary = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert summary.startswith("ones: 3 + 5 = 8") and "tens: 2 + 4 = 6" in summary, summary
    assert text.strip() == "68", text
    # the reasoning item is written (and closed) before the message item opens
    assert kinds.index("response.reasoning_summary_text.done") < kinds.index("response.content_part.added")
    final = events[-1].response
    assert final.status == "completed" and [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == summary


def test_langchain_chat_openai_over_the_responses_api(server):
    """LangChain's ChatOpenAI with use_responses_api=True (what it sends to /v1/responses), plain and streamed."""
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0,
                                      max_tokens=60, use_responses_api=True, max_retries=0)
    tools = [make_data.TOOLS["get_weather"], make_data.TOOLS["get_time"]]
    msg = llm.bind_tools(tools).invoke("What is the weather in Oslo?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Oslo"})]
    chunks = list(llm.bind_tools(tools).stream("What is the weather in Oslo?"))
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert whole.response_metadata.get("status") == "completed"


def test_openai_agents_sdk_with_its_default_model_api(server):
    """The openai-agents SDK's default model (the Responses API) against the server: the agent calls the tool with
    the demo model's arguments, gets its result, and finishes with the model's answer."""
    agents = pytest.importorskip("agents")

    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                                        max_retries=0, timeout=120), use_for_tracing=False)
    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
        """Current weather in a city

        Args:
            city: City name
        """
        calls.append(city)
        return json.dumps({"temperature": 12, "unit": unit, "condition": "sunny"})

    agent = agents.Agent(name="demo", model=MODEL, tools=[get_weather],
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=60))
    result = agents.Runner.run_sync(agent, "What is the weather in Oslo?", max_turns=3)
    assert calls == ["Oslo"]
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    answer = result.final_output
    assert "12" in answer and "Oslo" in answer and "sunny" in answer, (answer, result.raw_responses[-1])
