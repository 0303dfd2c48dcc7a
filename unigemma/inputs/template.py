"""Chat templates: render a checkpoint's jinja chat template, sandboxed, exactly as transformers renders it.

A chat template is code shipped with a checkpoint, so it is untrusted: it runs in jinja's
`ImmutableSandboxedEnvironment` (no dunder or private attribute access, no mutation of the inputs, bounded
`range`), and everything it can see is first rebuilt from plain JSON types (`str`, numbers, dicts, lists), so
media objects such as PIL images never reach it. Inside that sandbox it gets what transformers 5.24 offers a
template, so the checkpoint's own template renders byte-identically:

    trim_blocks, lstrip_blocks, the loopcontrols extension, a pass-through `{% generation %}` tag
    raise_exception(msg)  -> TemplateError(msg)        strftime_now(fmt) -> local time as text
    tojson (json.dumps: no HTML escaping, ensure_ascii=False, indent / separators / sort_keys options)
    dict(...) and namespace(...) (namespace refuses names starting with "_")
    context: messages, tools, documents, add_generation_prompt, the tokenizer's named special tokens
             (bos_token, eos_token, image_token, ...), then the caller's extra kwargs (enable_thinking, ...)

and the inputs get the same preparation: keys whose value is None are dropped from messages, and reasoning
given as `reasoning_content`, `reasoning` or `thinking` is offered under both `reasoning_content` and
`thinking`.

Two things differ on purpose, both switchable:

- `neutralize_user_text=True` (default): format-token strings such as `<turn|>` or `<|image|>` inside system,
  developer, user and tool message text, and in the strings of tool declarations (descriptions, enums, ...), get
  a zero-width space after their `<` (`neutralize`). Otherwise the tokenizer would read them as control tokens:
  prompt injection (a tool description or a system prompt may come from a third party too), and a broken
  image/audio placeholder count (chat-format.md §8 item 11). Assistant messages are the model's own format and
  stay as given. Pass `neutralize_user_text=False` for the raw, reference-identical render.
- `enable_thinking` is always passed (default False) because some engines read an undefined flag as true.

`normalize_messages` turns OpenAI-shaped messages (tool-call arguments as JSON strings, content parts) into
the shapes templates expect, and rejects malformed ones with a message naming the bad field.

The bundled Gemma 4 template (`unigemma/templates/gemma4_chat_template.jinja`) is `ChatTemplate.bundled()`.

What this module does not do: tokenization (inputs/tokenizer.py), media loading and placeholder expansion
(inputs/prompt.py and the media modules), parsing model output (outputs/parser.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from unigemma.inputs.wire import FORMAT_TOKENS

if TYPE_CHECKING:
    from unigemma.inputs.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUNDLED_TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "templates" / "gemma4_chat_template.jinja"

ROLES = ("system", "developer", "user", "assistant", "tool")
PART_TYPES = ("text", "image", "image_url", "audio", "input_audio", "video")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(ValueError):
    """The chat template refused the input (its `raise_exception`), failed, or tried something unsafe."""


# --- neutralising format tokens in user text ---------------------------------------------------------------

_ZWSP = "\u200b"
# Known Gemma 4 token strings, plus anything shaped like one (`<|x>`, `<x|>`, `<|x|>`), so that tokens of
# later revisions are covered too.
_FORMAT_LIKE = re.compile(
    "|".join(re.escape(t) for t in sorted(FORMAT_TOKENS, key=len, reverse=True))
    + r"|<\|[^\s<>|]{1,40}\|?>|<[^\s<>|]{1,40}\|>"
)


def neutralize(text: str) -> str:
    """Make format-token strings inert: `<turn|>` → `<` + U+200B + `turn|>`.

    The text still reads the same to a person, but the tokenizer no longer matches it as a control token.
    """
    if "<" not in text:
        return text
    return _FORMAT_LIKE.sub(lambda m: m.group(0)[0] + _ZWSP + m.group(0)[1:], text)


def find_format_token(text: str) -> str | None:
    """The first format-token string (`<turn|>`, `<|tool_call>`, or anything shaped like one) in `text`, or None."""
    if "<" not in text:
        return None
    m = _FORMAT_LIKE.search(text)
    return m.group(0) if m else None


def _neutralize_content(content: Any) -> Any:
    if isinstance(content, str):
        return neutralize(content)
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part = {**part, "text": neutralize(part["text"])}
            elif isinstance(part, str):
                part = neutralize(part)
            out.append(part)
        return out
    if isinstance(content, dict):  # a mapping tool result
        return {k: _neutralize_content(v) for k, v in content.items()}
    return content


_NEUTRALIZED_ROLES = ("system", "developer", "user", "tool")


def _neutralize_strings(value: Any) -> Any:
    """Every string value in a JSON-like structure neutralised (keys kept: they are schema names)."""
    if isinstance(value, str):
        return neutralize(value)
    if isinstance(value, Mapping):
        return {k: _neutralize_strings(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_neutralize_strings(v) for v in value]
    return value


# --- what the sandbox offers ------------------------------------------------------------------------------

def _raise_exception(message: Any) -> None:
    raise TemplateError(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes `<`, `>`, `&`, `'`; chat templates need the plain JSON text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """`dict(...)` for templates without handing them the `dict` type itself (no `dict.__subclasses__`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(Namespace):
    """jinja's namespace, refusing private names so a template cannot plant `__class__`-like attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - mirrors jinja's signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set namespace attribute {name!r} (names starting with '_' are refused)")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the
    body unchanged. Without the tag, templates that use it would not even compile."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _SafeNamespace
    return env


# --- input preparation --------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """A copy of `value` made only of JSON types; other objects become an inert '<TypeName>' string.

    Objects have methods the sandbox cannot judge (a PIL image can write files), and templates only look at
    which keys media parts have, never at the media, so this changes nothing they render.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _plain(value.item())  # numpy scalars: np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _to_dicts(value: Any) -> Any:
    """Message objects (dataclasses, pydantic models) to dicts, leaving media leaves untouched."""
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


def _alias_reasoning(message: dict) -> dict:
    # Templates read `reasoning_content` (Gemma) or `thinking` (others); clients send any of three names.
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    out = dict(message)
    out.setdefault("thinking", reasoning)
    out["reasoning_content"] = reasoning
    return out


def _prepare_messages(messages: Any, neutralize_user_text: bool) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(_to_dicts(list(getattr(messages, "messages", messages)))):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        if neutralize_user_text and message.get("role") in _NEUTRALIZED_ROLES and "content" in message:
            message["content"] = _neutralize_content(message["content"])
        out.append(message)
    return [_alias_reasoning(m) for m in _plain(out)]


# --- the template -------------------------------------------------------------------------------------------

class ChatTemplate:
    """One compiled chat template.

        tpl = ChatTemplate.from_tokenizer(tok)          # or ChatTemplate(source) / ChatTemplate.bundled()
        prompt = tpl.render(messages, tools=None, add_generation_prompt=True, enable_thinking=False)

    `sha256` identifies the exact template text (templates are revised often; log which one is in use).
    `special_tokens` ({'bos_token': '<bos>', ...}) are offered to the template as variables.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, name: str = "<string>"):
        if not isinstance(source, str) or not source.strip():
            raise ValueError("chat template source must be non-empty text")
        self.source = source
        self.name = name
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template {name} does not compile: line {e.lineno}: {e.message}") from None

    @classmethod
    def from_tokenizer(cls, tokenizer: "Tokenizer") -> "ChatTemplate":
        """The tokenizer's own template (`chat_template.jinja` or the config's `chat_template`)."""
        source = tokenizer.chat_template
        if not source:
            raise ValueError(f"tokenizer {tokenizer.source} has no chat template (no chat_template.jinja and no "
                             "'chat_template' in tokenizer_config.json); use ChatTemplate.bundled() for Gemma 4")
        tpl = cls(source, special_tokens=tokenizer.specials, name=f"{tokenizer.source}")
        log.info("chat template from %s: sha256 %s", tokenizer.source, tpl.sha256)
        return tpl

    @classmethod
    def bundled(cls, special_tokens: Mapping[str, str] | None = None) -> "ChatTemplate":
        """unigemma's own Gemma 4 template (unigemma/templates/gemma4_chat_template.jinja)."""
        return cls(BUNDLED_TEMPLATE_PATH.read_text(encoding="utf-8"), special_tokens=special_tokens,
                   name=BUNDLED_TEMPLATE_PATH.name)

    def render(self, messages: Any, tools: list[dict] | None = None, add_generation_prompt: bool = True,
               enable_thinking: bool = False, *, documents: list[dict] | None = None,
               neutralize_user_text: bool = True, **extra_kwargs: Any) -> str:
        """The prompt text for `messages` (OpenAI-style dicts; see `normalize_messages`).

        `extra_kwargs` become template variables (e.g. `preserve_thinking=True`) and override special tokens
        of the same name. With `neutralize_user_text=False` and the same inputs, the result equals
        transformers' `apply_chat_template(..., tokenize=False)`.
        """
        chat = _prepare_messages(messages, neutralize_user_text)
        if tools is not None:
            if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
                raise ValueError(f"tools must be a list of tool schemas, got {type(tools).__name__}")
            tools = list(tools)
            for i, tool in enumerate(tools):
                if not isinstance(tool, Mapping):
                    raise ValueError(f"tools[{i}] must be a JSON-schema dict like {{'type': 'function', "
                                     f"'function': {{'name': ..., 'parameters': {{...}}}}}}, got {tool!r}")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ValueError("documents must be a list of dicts")
        context = {**self.special_tokens, "enable_thinking": enable_thinking, **extra_kwargs}
        tools = _plain(tools)
        if neutralize_user_text and tools is not None:
            tools = _neutralize_strings(tools)
        try:
            return self._template.render(messages=chat, tools=tools, documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **_plain(context))
        except TemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"chat template {self.name} attempted an unsafe operation: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template {self.name} failed: {e}") from None
        except Exception as e:  # a template bug (TypeError, the sandbox's range limit, ...) is still its failure
            raise TemplateError(f"chat template {self.name} failed: {type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, sha256={self.sha256[:12]}…)"


# --- OpenAI messages → template messages ---------------------------------------------------------------------

def normalize_messages(messages: Any) -> list[dict]:
    """Validate OpenAI-style chat messages and convert them to the shapes chat templates expect.

    - roles must be one of system, developer, user, assistant, tool;
    - user/system/developer messages need `content` (text or a list of parts); tool messages need `content`;
      assistant messages need `content`, `tool_calls` or reasoning;
    - content parts must have a known `type` (text, image_url, input_audio, image, audio, video); they are kept
      as they are (the type is what the template reads; media stay for the processor);
    - `tool_calls[].function.arguments` given as a JSON string is parsed into a dict (the Gemma template
      cannot render a string); invalid JSON or a non-object is a ValueError;
    - keys whose value is None are dropped (OpenAI clients send `content: null` next to tool calls).

    Returns new dicts; the caller's messages are not modified.
    """
    messages = _to_dicts(list(getattr(messages, "messages", messages)))
    out: list[dict] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if "content" in message:
            message["content"] = _check_content(content, f"{where}.content", role)
        if role == "assistant":
            if "tool_calls" in message:
                message["tool_calls"] = _normalize_tool_calls(message["tool_calls"], f"{where}.tool_calls")
            if "content" not in message and not message.get("tool_calls") \
                    and not any(message.get(k) for k in _REASONING_KEYS):
                raise ValueError(f"{where} (assistant) has no content and no tool_calls")
        elif "content" not in message:
            raise ValueError(f"{where} ({role}) has no content")
        out.append(message)
    return out


def _check_content(content: Any, where: str, role: str) -> Any:
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and role == "tool":
        return content  # a structured tool result, rendered as an object
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where} must be a string or a list of content parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise ValueError(f"{at} must be a dict with a 'type', got {type(part).__name__}")
        kind = part.get("type")
        if kind not in PART_TYPES:
            raise ValueError(f"{at}.type is {kind!r}; expected one of {', '.join(PART_TYPES)}")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise ValueError(f"{at} is a text part without a 'text' string")
        if kind == "image_url":
            url = part.get("image_url")
            if not (isinstance(url, str) or (isinstance(url, dict) and isinstance(url.get("url"), str))):
                raise ValueError(f"{at}.image_url must be {{'url': 'data:...' or a path}}")
        if kind == "input_audio":
            audio = part.get("input_audio")
            if not (isinstance(audio, dict) and audio.get("data") is not None):
                raise ValueError(f"{at}.input_audio must be {{'data': base64 text, 'format': 'wav' | 'mp3' ...}}")
        parts.append(part)
    return parts


def _normalize_tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise ValueError(f"{at} must be a dict like {{'id', 'type': 'function', 'function': {{'name', "
                             f"'arguments'}}}}, got {type(call).__name__}")
        call = {k: v for k, v in call.items() if v is not None}
        if "function" not in call:  # flat {"name", "arguments"} form: nest it as OpenAI does
            call = {"function": {k: call[k] for k in ("name", "arguments") if k in call},
                    **{k: v for k, v in call.items() if k not in ("name", "arguments")}}
        fn = call["function"]
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{at}.function.name must be a non-empty string")
        args = fn.get("arguments")
        if args is None:
            args = {}
        elif isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"{at}.function.arguments is not valid JSON ({e.msg} at char {e.pos}): "
                                 f"{args[:200]!r}") from None
        if not isinstance(args, dict):
            raise ValueError(f"{at}.function.arguments must be a JSON object, got {type(args).__name__}")
        call = {**call, "function": {**fn, "arguments": args}}
        call.setdefault("type", "function")
        out.append(call)
    return out
