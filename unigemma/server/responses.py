"""The Responses API (`POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`): what openai-agents, the Vercel
AI SDK and LangChain's `use_responses_api` speak by default.

A request is translated into a chat request and runs through the same path as /v1/chat/completions (template,
media, grammar, engine, response parser); only the shapes differ::

    ResponseCreate ─► history of previous_response_id (the store) + input items ─► chat messages
                    ─► ChatCompletionRequest ─► service.prepare_chat ─► engine ─► parser events
                    ─► Responses stream events (response.created ... response.completed)
                    ─► non-streamed: the `response` of the last event

Both modes come from one event generator, so a streamed and a whole response carry the same output. Items:
`reasoning` (the thought channel; its text in `summary` when `reasoning.summary` is set, else in `content` as
reasoning_text), `message` (output_text), `function_call`. A budget that ends the output makes the response
`incomplete` (reason max_output_tokens), with the cut-off call as far as it was streamed (service.finish_reason).

State: responses with `store` (default true) are kept in memory, the newest `--max-stored-responses` of them;
`previous_response_id` continues from one (its input and output, not its instructions, as OpenAI does).

What this module does not do: tokenizing, media loading or sampling (service.py), SSE transport (app.py).
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .protocol import (APIError, ChatCompletionRequest, StreamOptions, _canonical_part, parse_request,
                       validation_to_api_error)

# hosted tools run by OpenAI's servers: there is nothing local that could run them
_HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
                 "computer_use", "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom")
# accepted and ignored (named in x-unigemma-ignored-fields)
RESPONSES_IGNORED = ("user", "service_tier", "truncation", "include", "prompt_cache_key", "prompt_cache_retention",
                     "safety_identifier", "top_logprobs", "max_tool_calls")


class ResponseCreate(BaseModel):
    """POST /v1/responses. Unknown top-level fields are refused (400), as on the chat endpoint."""
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    # unigemma extensions, as on the chat endpoint
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # accepted and ignored (RESPONSES_IGNORED)
    user: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, v: Any) -> Any:
        return {k: x for k, x in v.items() if x is not None} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _refusals(self) -> "ResponseCreate":
        if self.background:
            raise ValueError("background: background responses are not supported; send the request in the "
                             "foreground (stream it to see progress)")
        if self.conversation is not None:
            raise ValueError("conversation: the Conversations API is not available here; continue a "
                             "conversation with previous_response_id")
        if self.prompt is not None:
            raise ValueError("prompt: stored prompt templates are not available here; send instructions and input")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must not be an empty list")
        return self

    def ignored_fields(self) -> list[str]:
        out = [f for f in RESPONSES_IGNORED if f in self.model_fields_set]
        if "verbosity" in (self.text or {}):
            out.append("text.verbosity")
        if self.stream_options is not None and "include_obfuscation" in self.stream_options.model_fields_set:
            out.append("stream_options.include_obfuscation")
        return out

    @property
    def summary(self) -> str | None:
        return (self.reasoning or {}).get("summary") or (self.reasoning or {}).get("generate_summary")


# --- input items → chat messages -------------------------------------------------------------------------------

def _part(part: Any, where: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise APIError(400, f"{where} must be a content part object", param=where)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where} of type {kind!r} needs a 'text' string", param=where)
        return {"type": "text", "text": part["text"]}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal", ""))}
    if kind == "input_image":
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{where}: input_image needs image_url (a data: URI or an allowed path); file_id "
                                "needs the Files API, which this server does not have", param=where)
        detail = part.get("detail")
        return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}
    if kind == "input_audio":
        audio = part.get("input_audio") or {k: part[k] for k in ("data", "format") if k in part}
        return {"type": "input_audio", "input_audio": audio}
    if kind == "input_file":
        try:
            return _canonical_part({"type": "file", "file": {k: v for k, v in part.items() if k != "type"}})
        except ValueError as e:
            raise APIError(400, f"{where}: {e}", param=where) from None
    raise APIError(400, f"{where}.type is {kind!r}; expected input_text, input_image, input_audio, input_file, "
                        "output_text or refusal", param=where)


def input_messages(items: str | list[dict], start: int = 0) -> list[dict]:
    """Responses input items as chat messages: messages keep their role; consecutive assistant output
    (message, function_call, reasoning items) folds into one assistant turn; function_call_output becomes a
    tool message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []

    def assistant() -> dict:
        if not out or out[-1]["role"] != "assistant" or out[-1].get("_closed"):
            out.append({"role": "assistant", "content": None})
        return out[-1]

    for i, item in enumerate(items, start):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object (a message or an item)", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role is {role!r}; expected user, system, developer or assistant",
                               param=f"{where}.role")
            content = item.get("content")
            if isinstance(content, list):
                parts = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
                if role == "assistant" or all(p["type"] == "text" for p in parts) and role != "user":
                    content = "".join(p["text"] for p in parts if p["type"] == "text")
                else:
                    content = parts
            elif not isinstance(content, str):
                raise APIError(400, f"{where}.content must be a string or a list of content parts",
                               param=f"{where}.content")
            if role == "assistant":
                a = assistant()
                a["content"] = (a["content"] or "") + content
            else:
                out.append({"role": role, "content": content})
        elif kind == "function_call":
            name, args = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not name:
                raise APIError(400, f"{where}: a function_call item needs a name", param=f"{where}.name")
            a = assistant()
            a.setdefault("tool_calls", []).append({"id": item.get("call_id") or item.get("id"), "type": "function",
                                                   "function": {"name": name, "arguments": args}})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
            if not isinstance(output, str):
                raise APIError(400, f"{where}.output must be a string", param=f"{where}.output")
            if out and out[-1]["role"] == "assistant":
                out[-1]["_closed"] = True
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        elif kind == "reasoning":
            texts = [p.get("text", "") for p in (item.get("content") or item.get("summary") or [])
                     if isinstance(p, dict)]
            a = assistant()
            a["reasoning_content"] = (a.get("reasoning_content") or "") + "\n".join(texts)
        else:
            raise APIError(400, f"{where}.type is {kind!r}; expected message, function_call, "
                                "function_call_output or reasoning", param=f"{where}.type")
    for m in out:
        m.pop("_closed", None)
        if m["role"] == "assistant" and m["content"] is None and not m.get("tool_calls"):
            m["content"] = ""
    return out


def _chat_tools(req: ResponseCreate) -> tuple[list[dict] | None, Any]:
    tools = []
    for i, t in enumerate(req.tools or []):
        kind = t.get("type")
        if kind != "function":
            if kind in _HOSTED_TOOLS or (isinstance(kind, str) and kind.startswith(_HOSTED_TOOLS)):
                raise APIError(400, f"tools[{i}] is a {kind!r} tool, which OpenAI's servers run; a local server "
                                    "cannot; declare function tools and run them yourself", param=f"tools[{i}]")
            raise APIError(400, f"tools[{i}].type is {kind!r}; expected 'function'", param=f"tools[{i}].type")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind == "allowed_tools":
            choice = {"type": "allowed_tools", "allowed_tools": {
                "mode": choice.get("mode", "auto"),
                "tools": [{"type": "function", "function": {"name": x.get("name")}} for x in choice.get("tools", [])]}}
        else:
            raise APIError(400, f"tool_choice of type {kind!r} is not supported; use 'auto', 'none', 'required', "
                                "{'type': 'function', 'name': ...} or allowed_tools", param="tool_choice")
    return tools or None, choice


def _response_format(req: ResponseCreate) -> dict | None:
    fmt = (req.text or {}).get("format")
    if not fmt:
        return None
    if fmt.get("type") == "json_schema":
        js = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": js}
    return {"type": fmt.get("type")}


def to_chat(req: ResponseCreate, history: list[dict]) -> tuple[ChatCompletionRequest, list[dict]]:
    """The chat request this response runs as, and the conversation (history + this input) to store."""
    conversation = history + input_messages(req.input)
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    tools, choice = _chat_tools(req)
    effort = (req.reasoning or {}).get("effort")
    if effort is None and req.summary:
        effort = "medium"   # asking for a summary of the reasoning asks for reasoning
    body = {"model": req.model, "messages": messages, "tools": tools, "tool_choice": choice,
            "parallel_tool_calls": req.parallel_tool_calls, "response_format": _response_format(req),
            "reasoning_effort": effort, "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "top_k": req.top_k,
            "min_p": req.min_p, "repetition_penalty": req.repetition_penalty,
            "chat_template_kwargs": req.chat_template_kwargs, "stream": req.stream}
    try:
        chat = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        e = validation_to_api_error(exc)
        # name the Responses field behind the chat one
        for chat_name, name in (("max_completion_tokens", "max_output_tokens"), ("response_format", "text.format"),
                                ("reasoning_effort", "reasoning.effort"), ("messages", "input")):
            e.message = e.message.replace(chat_name, name)
            if e.param and e.param.startswith(chat_name):
                e.param = name + e.param[len(chat_name):]
        if e.status == 422:
            e.status = 400
        raise e from None
    return chat, conversation


# --- the store -------------------------------------------------------------------------------------------------

@dataclass
class Stored:
    response: dict
    conversation: list[dict]    # chat messages: the inputs so far and this response's output


class ResponseStore:
    """The newest `capacity` stored responses, in memory (a local server has no database; a restart forgets)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: collections.OrderedDict[str, Stored] = collections.OrderedDict()

    def put(self, rid: str, stored: Stored) -> None:
        self.items[rid] = stored
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def get(self, rid: str, param: str = "response_id", status: int = 404) -> Stored:
        s = self.items.get(rid)
        if s is None:
            raise APIError(status, f"no stored response with id {rid!r} (responses are kept in memory, the newest "
                                   f"{self.capacity}, and only with store: true)", param=param, code="not_found")
        return s

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self.items[rid]


# --- running: one event generator for both modes ----------------------------------------------------------------

def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _skeleton(req: ResponseCreate, rid: str, model: str, created: int) -> dict:
    fmt = (req.text or {}).get("format") or {"type": "text"}
    return {"id": rid, "object": "response", "created_at": created, "status": "in_progress", "error": None,
            "incomplete_details": None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": model, "output": [], "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": req.summary},
            "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt}, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled", "usage": None,
            "user": req.user, "metadata": req.metadata or {}}


async def response_events(service, store: ResponseStore, req: ResponseCreate, chat: ChatCompletionRequest,
                          prep, conversation: list[dict], counter: list[int]) -> AsyncIterator[dict]:
    """Responses stream events, each with its sequence_number (counter[0]: the next one); the last is
    response.completed (or response.incomplete) carrying the whole response, which is stored when req.store."""
    from unigemma.outputs.parser import ContentDelta, ReasoningDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart

    from .service import finish_reason

    handle = service.chat_handles(chat, prep)[0]   # made before the first event: refusals keep their status
    rid, created = _id("resp"), int(time.time())
    resp = _skeleton(req, rid, service.settings.model_name, created)
    def ev(kind: str, **fields) -> dict:
        counter[0] += 1
        return {"type": kind, "sequence_number": counter[0] - 1, **fields}

    yield ev("response.created", response=json.loads(json.dumps(resp)))
    yield ev("response.in_progress", response=json.loads(json.dumps(resp)))

    output: list[dict] = resp["output"]
    open_item: dict | None = None         # the reasoning or message item being written
    calls: dict[int, dict] = {}           # parser call index → function_call item
    unreadable: set[str] = set()          # ids of calls that started but could not be read (ParseWarning)
    summary = bool(req.summary)
    reasoning_tokens = n_tokens = 0

    def close_open() -> list[dict]:
        nonlocal open_item
        item, open_item = open_item, None
        if item is None:
            return []
        idx = output.index(item)
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            evs = [ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                      text=part["text"], logprobs=[]),
                   ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                      part=dict(part))]
        elif summary:
            part = item["summary"][0]
            evs = [ev("response.reasoning_summary_text.done", item_id=item["id"], output_index=idx,
                      summary_index=0, text=part["text"]),
                   ev("response.reasoning_summary_part.done", item_id=item["id"], output_index=idx,
                      summary_index=0, part=dict(part))]
        else:
            part = item["content"][0]
            evs = [ev("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0,
                      text=part["text"]),
                   ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                      part=dict(part))]
        item_view = {k: v for k, v in item.items() if k != "status"} if item["type"] == "reasoning" else item
        return evs + [ev("response.output_item.done", output_index=idx, item=json.loads(json.dumps(item_view)))]

    def open_kind(kind: str) -> list[dict]:
        nonlocal open_item
        if open_item is not None and open_item["type"] == kind:
            return []
        evs = close_open()
        if kind == "message":
            item = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant", "content": []}
        else:
            item = {"type": "reasoning", "id": _id("rs"), "summary": []}
        output.append(item)
        open_item = item
        idx = len(output) - 1
        evs.append(ev("response.output_item.added", output_index=idx, item=json.loads(json.dumps(item))))
        if kind == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            evs.append(ev("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                          part=dict(part)))
        elif summary:
            part = {"type": "summary_text", "text": ""}
            item["summary"].append(part)
            evs.append(ev("response.reasoning_summary_part.added", item_id=item["id"], output_index=idx,
                          summary_index=0, part=dict(part)))
        else:
            part = {"type": "reasoning_text", "text": ""}
            item["content"] = [part]
            evs.append(ev("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                          part=dict(part)))
        return evs

    def text_delta(kind: str, text: str) -> list[dict]:
        evs = open_kind(kind)
        item = open_item
        idx = output.index(item)
        if kind == "message":
            item["content"][0]["text"] += text
            evs.append(ev("response.output_text.delta", item_id=item["id"], output_index=idx, content_index=0,
                          delta=text, logprobs=[]))
        elif summary:
            item["summary"][0]["text"] += text
            evs.append(ev("response.reasoning_summary_text.delta", item_id=item["id"], output_index=idx,
                          summary_index=0, delta=text))
        else:
            item["content"][0]["text"] += text
            evs.append(ev("response.reasoning_text.delta", item_id=item["id"], output_index=idx, content_index=0,
                          delta=text))
        return evs

    parser = service._parser(prep)
    reason = None
    try:
        async for out in service._steps(handle):
            if out.token_id >= 0:
                n_tokens += 1
            events = parser.feed(out.text + (service._stop_text(out) if out.finished else ""))
            if out.finished:
                reason = out.finish_reason
                events += parser.finish(cut_off=reason == "length")
            if any(isinstance(e, ReasoningDelta) for e in events):
                reasoning_tokens += 1
            for e in events:
                if isinstance(e, ContentDelta):
                    for x in text_delta("message", e.text):
                        yield x
                elif isinstance(e, ReasoningDelta):
                    for x in text_delta("reasoning", e.text):
                        yield x
                elif isinstance(e, ToolCallStart):
                    for x in close_open():
                        yield x
                    item = {"type": "function_call", "id": _id("fc"), "call_id": e.id, "name": e.name,
                            "arguments": "", "status": "in_progress"}
                    calls[e.index] = item
                    output.append(item)
                    yield ev("response.output_item.added", output_index=len(output) - 1,
                             item=json.loads(json.dumps(item)))
                elif isinstance(e, ToolCallArgsDelta):
                    item = calls[e.index]
                    item["arguments"] += e.json_text
                    yield ev("response.function_call_arguments.delta", item_id=item["id"],
                             output_index=output.index(item), delta=e.json_text)
                elif isinstance(e, ToolCallEnd):
                    item = calls[e.index]
                    idx = output.index(item)
                    if e.arguments is None and not e.cut_off:
                        unreadable.add(item["id"])   # not a call (a ParseWarning says why); a stream saw it start
                    item["status"] = "completed" if e.arguments is not None else "incomplete"
                    yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                             name=item["name"], arguments=item["arguments"])
                    yield ev("response.output_item.done", output_index=idx, item=json.loads(json.dumps(item)))
        if not any(i["type"] in ("message", "function_call") and i["id"] not in unreadable for i in output):
            for x in open_kind("message"):   # an empty answer is still an (empty) message, as on the chat API
                yield x
        for x in close_open():
            yield x
    finally:
        handle.cancel()
    # an unreadable call is dropped from the final output, as the chat endpoint drops it
    resp["output"] = [i for i in output if i.get("id") not in unreadable]
    finish = finish_reason(reason, any(i["type"] == "function_call" for i in resp["output"]))
    usage = service._usage(len(prep.prompt_ids), n_tokens, handle.cached_tokens)
    resp["usage"] = {"input_tokens": usage["prompt_tokens"],
                     "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                     "output_tokens": n_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                     "total_tokens": usage["total_tokens"]}
    if finish == "length":
        resp["status"], resp["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
    else:
        resp["status"] = "completed"
    if req.store:
        store.put(rid, Stored(json.loads(json.dumps(resp)), conversation + _as_messages(resp["output"])))
    yield ev("response.incomplete" if finish == "length" else "response.completed", response=resp)


def _as_messages(output: list[dict]) -> list[dict]:
    """A response's output items as the chat messages that continue the conversation."""
    # past thoughts are not re-sent (chat format); a call cut off by the budget has no arguments to send back
    items = [i for i in output if i["type"] == "message" or (i["type"] == "function_call"
                                                             and i["status"] == "completed")]
    return input_messages(items) if items else []


def _sse(event: dict) -> bytes:
    return f"event: {event['type']}\n".encode() + b"data: " + json.dumps(event).encode() + b"\n\n"


def install_responses(app: FastAPI) -> None:
    """Add /v1/responses (create, retrieve, delete) to an app made by create_app."""
    service, settings = app.state.service, app.state.settings
    store = ResponseStore(settings.max_stored_responses)
    app.state.responses = store

    @app.post("/v1/responses")
    async def create(request: Request):
        req = parse_request(ResponseCreate, await app.state.read_json(request))
        service.check_model(req.model)
        history = store.get(req.previous_response_id, "previous_response_id", 400).conversation \
            if req.previous_response_id else []
        chat, conversation = to_chat(req, list(history))
        service.check_request(chat)
        counter = [0]

        def error_frame(e: APIError) -> bytes:  # after the status line: an error event, as OpenAI sends it
            counter[0] += 1
            return _sse({"type": "error", "sequence_number": counter[0] - 1, "code": e.code, "message": e.message,
                         "param": e.param})

        async def whole(prep) -> dict:
            last = None
            async for event in response_events(service, store, req, chat, prep, conversation, counter):
                last = event
            return last["response"]

        return await app.state.run(request, chat, lambda: service.prepare_chat(chat),
                                   lambda prep: response_events(service, store, req, chat, prep, conversation,
                                                                counter),
                                   whole, frame=_sse, error_frame=error_frame, done=b"",
                                   ignored=req.ignored_fields())

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str):
        return store.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str):
        store.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def input_items(response_id: str):
        s = store.get(response_id)
        data = [{"type": "message", "id": _id("msg"), "role": m["role"], "content": m.get("content")}
                for m in s.conversation if m["role"] in ("user", "system", "developer")]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}
