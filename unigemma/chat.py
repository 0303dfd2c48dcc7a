"""`llm.chat(...)`: OpenAI-style messages in; content, reasoning and tool calls out (DESIGN.md §4).

    messages ─► build_prompt (template, media) ─► Engine (sampling, stops, grammar masks) ─► token text
             ─► ResponseParser (thinking channel, tool calls, content) ─► ChatResult | ChatChunk stream

The grammar (response_format / forced tool calls, llguidance) starts after the thought channel when thinking is on,
so a schema never suppresses reasoning and reasoning never escapes the schema (engine/constraints.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator

from .engine.diffusion import DiffusionOptions, is_diffusion
from .engine.generate import _engine_for, diffusion_options, sampling_params
from .engine.scheduler import DONE, Request, Usage
from .outputs.parser import (ContentDelta, ParseWarning, ReasoningDelta, ResponseParser, ToolCallArgsDelta,
                             ToolCallEnd, ToolCallStart, start_state_for_prompt)


@dataclass
class ChatResult:
    content: str
    reasoning: str
    tool_calls: list[dict]
    finish_reason: str | None
    usage: Usage | None
    warnings: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


@dataclass
class ChatChunk:
    """One streamed delta: text of content and/or reasoning, tool-call deltas in OpenAI shape."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    warnings: list[str] = field(default_factory=list)   # parser warnings (repaired or dropped calls, markup)


def _finish_reason(engine_reason: str | None, n_calls: int) -> str | None:
    if n_calls and engine_reason in ("stop", None):
        return "tool_calls"
    return engine_reason


def chat(llm, messages, tools=None, tool_choice=None, response_format=None, enable_thinking: bool = False,
         stream: bool = False, parallel_tool_calls: bool = True, max_tokens: int | None = 512,
         resolve=None, seed_ids: int | None = None, **sampling) -> ChatResult | Iterator[ChatChunk]:
    from .engine.constraints import compile_constraint, spec_from_openai

    declared = None if tool_choice == "none" else tools
    prompt = llm.build_prompt(messages, tools=declared, enable_thinking=enable_thinking, resolve=resolve)
    start = start_state_for_prompt(prompt.text)
    spec = spec_from_openai(response_format, declared, tool_choice, parallel_tool_calls, enable_thinking,
                            thinking_open=start == "reasoning")
    diffusion = None
    if is_diffusion(llm):
        if spec is not None:
            raise ValueError("response_format and forced tool calls (structured output) are not supported for "
                             "DiffusionGemma checkpoints: a grammar needs left-to-right sampling, and a canvas is "
                             "denoised all at once; describe the format in the prompt instead")
        diffusion = diffusion_options(llm, {k: sampling.pop(k) for k in DiffusionOptions.names() if k in sampling})
    constraint = compile_constraint(spec, llm.tokenizer) if spec is not None else None
    params = sampling_params(llm, max_tokens=max_tokens, **sampling)
    engine = _engine_for(llm, len(prompt) + (max_tokens or 0) + 1)
    media = {k: (v.to(llm.device) if hasattr(v, "to") else v) for k, v in prompt.media.items()} or None
    request = Request(prompt.input_ids, params, media=media, constraint=constraint, diffusion=diffusion)
    names = [t.get("function", {}).get("name") for t in (declared or []) if isinstance(t, dict)]
    parser = ResponseParser(start, seed=seed_ids, tool_names=names or None, tools=declared)
    events = _run(engine, request)
    if stream:
        return _stream(events, parser)
    content, reasoning, warnings, ids = [], [], [], []
    calls: dict[int, dict] = {}
    last = None
    for ev in events:
        last = ev
        if ev.token_id is not None:
            ids.append(ev.token_id)
        for pe in parser.feed(ev.text):
            _fold(pe, content, reasoning, calls, warnings)
    for pe in parser.finish():
        _fold(pe, content, reasoning, calls, warnings)
    tool_calls = [calls[i] for i in sorted(calls) if calls[i]["function"]["arguments"] is not None]
    return ChatResult("".join(content), "".join(reasoning), tool_calls,
                      _finish_reason(last.finish_reason if last else None, len(tool_calls)),
                      last.usage if last else None, warnings, ids)


def _run(engine, request):
    """The request's token events; the request is cancelled if the consumer stops early."""
    rid = engine.add(request)
    try:
        while True:
            evs = [e for e in engine.step() if e.request_id == rid]
            for e in evs:
                yield e
            if evs and evs[-1].finished:
                return
            if not engine.has_work:
                return
    finally:
        seq = engine.scheduler.seqs.get(rid)
        if seq is not None and seq.status != DONE:
            engine.cancel(rid)
        engine.forget(rid)


def _fold(ev, content, reasoning, calls, warnings):
    if isinstance(ev, ContentDelta):
        content.append(ev.text)
    elif isinstance(ev, ReasoningDelta):
        reasoning.append(ev.text)
    elif isinstance(ev, ToolCallStart):
        calls[ev.index] = {"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
    elif isinstance(ev, ToolCallEnd):
        if ev.index in calls:
            calls[ev.index]["function"]["arguments"] = (None if ev.arguments is None
                                                        else json.dumps(ev.arguments, ensure_ascii=False))
    elif isinstance(ev, ParseWarning):
        warnings.append(ev.message)


def _stream(events, parser: ResponseParser) -> Iterator[ChatChunk]:
    n_calls = 0
    last = None

    def convert(pes) -> ChatChunk:
        nonlocal n_calls
        ch = ChatChunk()
        for pe in pes:
            if isinstance(pe, ContentDelta):
                ch.content += pe.text
            elif isinstance(pe, ReasoningDelta):
                ch.reasoning += pe.text
            elif isinstance(pe, ParseWarning):
                ch.warnings.append(pe.message)
            elif isinstance(pe, ToolCallEnd):
                n_calls += pe.arguments is not None
            elif isinstance(pe, ToolCallStart):
                ch.tool_calls.append({"index": pe.index, "id": pe.id, "type": "function",
                                      "function": {"name": pe.name, "arguments": ""}})
            elif isinstance(pe, ToolCallArgsDelta):
                ch.tool_calls.append({"index": pe.index, "function": {"arguments": pe.json_text}})
        return ch

    for ev in events:
        last = ev
        ch = convert(parser.feed(ev.text))
        if ch.content or ch.reasoning or ch.tool_calls or ch.warnings:
            yield ch
    ch = convert(parser.finish())
    ch.finish_reason = _finish_reason(last.finish_reason if last else None, n_calls)
    ch.usage = last.usage if last else None
    yield ch
