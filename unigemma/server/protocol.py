"""The OpenAI HTTP schemas the server speaks: pydantic request models (validated strictly) and response models.

Requests are checked here, before any work is done, the way the OpenAI API checks them:

    body ──JSON──► dict ──pydantic──► ChatCompletionRequest / CompletionRequest
          │                │
          │ not JSON: 400  ├─ unknown top-level field: 400 "Unrecognized request argument supplied: X"
          │                └─ wrong type / out of range / missing field: 422 naming the field (`param`)
          ▼
    cross-field rules that need no model (top_logprobs needs logprobs, n with greedy, ...): 400

The request policy (README "Request policy"): every documented chat-completions field parses. An explicit
`null` means the field's default. Fields that mean nothing to a local model (`store`, `metadata`, `user`,
`service_tier`, `prediction`, `verbosity`, `prompt_cache_key`, `safety_identifier`, `web_search_options`, ...)
are accepted and ignored; `ignored_fields()` names those a request set, and the app reports them in the
`x-unigemma-ignored-fields` response header and the log. A field is refused with a 400 that says why only where
ignoring it would mislead the client (`modalities` asking for audio out, custom tools, `file_id` parts). Legacy
shapes are translated: `functions` / `function_call` to tools, `role: "function"` messages to tool results,
`refusal` parts to text, `file` parts holding an image or audio data URI to image / audio parts.

`error_body` builds the OpenAI error object `{"error": {"message", "type", "param", "code"}}` that every
failure uses. unigemma extensions that OpenAI lacks (`top_k`, `min_p`, `repetition_penalty`, `seed` on
completions, `chat_template_kwargs`, `max_soft_tokens`, `stop_token_ids`, `ignore_eos`) are accepted at the
top level, as vLLM and transformers-serve accept them (clients pass them with `extra_body`).

What this module does not do: turn a request into token ids or sampling settings (server/service.py), fetch
media (server/media.py), or routing (server/app.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# OpenAI allows up to 4 stop sequences and 20 top logprobs (5 on the legacy completions API).
MAX_STOP = 4
# The chat-template switches a client may set (the Gemma 4 template reads these two).
TEMPLATE_KWARGS = frozenset({"enable_thinking", "preserve_thinking"})
MAX_N = 16


class APIError(Exception):
    """A request failure with its HTTP status and OpenAI error fields; the app turns it into the error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # unknown fields are refused at the request level (OpenAI: "Unrecognized request argument supplied")
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    # nested objects that clients echo back with extra keys (assistant messages with `refusal`, `annotations`)
    model_config = ConfigDict(extra="ignore")


# --- chat messages ---------------------------------------------------------------------------------------------

class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str = Field(min_length=1)
    # "original" (full resolution) gets the largest soft-token budget, as "high" does
    detail: Literal["auto", "low", "high", "original"] | None = None
    # unigemma extension: the exact soft-token budget (70, 140, 280, 560 or 1120); wins over `detail`
    max_soft_tokens: int | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v


class InputAudio(_Lenient):
    data: str = Field(min_length=1)
    format: Literal["wav", "mp3", "flac", "ogg", "webm", "m4a"] | None = None


class AudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(_Lenient):
    url: str = Field(min_length=1)


class VideoPart(_Lenient):
    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _url_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart, VideoPart], Field(discriminator="type")]

_AUDIO_SUBTYPES = {"wav": "wav", "x-wav": "wav", "wave": "wav", "mpeg": "mp3", "mp3": "mp3", "flac": "flac",
                   "x-flac": "flac", "ogg": "ogg", "webm": "webm", "mp4": "m4a", "m4a": "m4a", "x-m4a": "m4a"}


def _canonical_part(part: Any) -> Any:
    """Content parts OpenAI documents that the model reads as another kind: `refusal` (in echoed assistant
    messages) as text; a `file` holding an image or audio data URI as that image / audio. Anything else is
    returned unchanged for the union to judge."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": "text", "text": part["refusal"]}
    if kind != "file":
        return part
    f = part.get("file") if isinstance(part.get("file"), dict) else {}
    data = f.get("file_data")
    if not isinstance(data, str):
        if f.get("file_id"):
            raise ValueError("file parts by file_id need the Files API, which this server does not have; send "
                             "the file inline as file.file_data (a data: URI), or as an image_url / input_audio part")
        raise ValueError("a file part needs file.file_data: a data: URI of an image or audio file")
    mime = data[5:].split(";", 1)[0].split(",", 1)[0].lower() if data.startswith("data:") else ""
    if mime.startswith("image/"):
        return {"type": "image_url", "image_url": {"url": data}}
    if mime.startswith("audio/") and mime[6:] in _AUDIO_SUBTYPES and ";base64," in data[:100]:
        return {"type": "input_audio", "input_audio": {"data": data.split(",", 1)[1],
                                                       "format": _AUDIO_SUBTYPES[mime[6:]]}}
    raise ValueError(f"file.file_data of type {mime or 'unknown'!r} cannot be read by this model; it takes "
                     "images (data:image/...) and audio (data:audio/wav|mpeg|flac|ogg|webm;base64,...)")


class FunctionCall(_Lenient):
    name: str = Field(min_length=1)
    arguments: str | dict = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # legacy "function" is read as "tool"
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    function_call: FunctionCall | None = None   # legacy assistant call, read as one tool call

    @model_validator(mode="before")
    @classmethod
    def _legacy_shapes(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        v = dict(v)
        if v.get("role") == "function":   # the legacy function result: a tool result named by its function
            v["role"] = "tool"
        if isinstance(v.get("content"), list):
            v["content"] = [_canonical_part(p) for p in v["content"]]
        if v.get("role") == "assistant" and isinstance(v.get("function_call"), dict) and not v.get("tool_calls"):
            v["tool_calls"] = [{"type": "function", "function": v["function_call"]}]
        v.pop("function_call", None)
        return v

    @model_validator(mode="after")
    def _needs_content(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.role == "assistant" and self.content is None and not self.tool_calls \
                and not (self.reasoning_content or self.reasoning):
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        return self


# --- tools and output formats ----------------------------------------------------------------------------------

class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef

    @model_validator(mode="before")
    @classmethod
    def _custom(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") == "custom":
            name = (v.get("custom") or {}).get("name") if isinstance(v.get("custom"), dict) else None
            raise ValueError(f"custom tool {name!r}: custom (free-form input) tools are not supported by this "
                             "server; declare it as a function tool with a JSON Schema for its arguments")
        return v


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(_Strict):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]] = Field(min_length=1)

    def names(self) -> list[str]:
        out = []
        for i, t in enumerate(self.tools):
            name = (t.get("function") or {}).get("name") if isinstance(t.get("function"), dict) else t.get("name")
            if t.get("type", "function") != "function" or not isinstance(name, str):
                raise ValueError(f"tool_choice.allowed_tools.tools[{i}] must be {{'type': 'function', "
                                 "'function': {'name': NAME}}")
            out.append(name)
        return out


class AllowedToolsChoice(_Strict):
    """tool_choice {"type": "allowed_tools"}: only these of `tools` may be called (the rest stay out of the
    prompt); mode "required" forces a call to one of them."""
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class JSONSchemaFormat(_Strict):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type 'json_schema' needs json_schema.schema")
        return self


class StreamOptions(_Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None   # ignored: a local server has no side channel to pad against


# Fields a request may set that mean nothing to a local model: accepted, ignored, and named in the
# x-unigemma-ignored-fields response header.
IGNORED_FIELDS = ("metadata", "store", "service_tier", "user", "prediction", "verbosity", "prompt_cache_key",
                  "prompt_cache_retention", "safety_identifier", "web_search_options", "audio")


# --- requests --------------------------------------------------------------------------------------------------

class _SamplingFields(_Strict):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # accepted and ignored, as a local server has no use for them (IGNORED_FIELDS)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, v: Any) -> Any:
        # OpenAI SDKs and proxies send `"n": null`, `"stream": null`...: null is "not given"
        return {k: x for k, x in v.items() if x is not None} if isinstance(v, dict) else v

    def ignored_fields(self) -> list[str]:
        """The IGNORED_FIELDS this request set, and stream_options.include_obfuscation."""
        out = [f for f in IGNORED_FIELDS if f in self.model_fields_set]
        if self.stream_options is not None and "include_obfuscation" in self.stream_options.model_fields_set:
            out.append("stream_options.include_obfuscation")
        return out

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(v)}")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty strings")
        elif v == "":
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict | None) -> dict | None:
        for k, b in (v or {}).items():
            if not k.strip().isdigit():
                raise ValueError(f"logit_bias key {k!r} is not a token id (a non-negative integer as a string)")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias[{k!r}]={b} is outside [-100, 100]")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    max_soft_tokens: int | None = None
    # documented fields that change nothing here (IGNORED_FIELDS), or are checked in _cross
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    # set when the request used the legacy `functions` / `function_call` (the response then answers in kind)
    legacy_functions: bool = Field(default=False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _legacy_functions(cls, v: Any) -> Any:
        """`functions` / `function_call` (deprecated, still documented) as `tools` / `tool_choice`, one call."""
        if isinstance(v, dict) and "legacy_functions" in v:   # set here only, never by a client
            raise ValueError("Unrecognized request argument supplied: legacy_functions")
        if not isinstance(v, dict) or ("functions" not in v and "function_call" not in v):
            return v
        v = dict(v)
        functions, call = v.pop("functions", None), v.pop("function_call", None)
        if functions is None and call is None:
            return v
        if v.get("tools") is not None:
            raise ValueError("functions (legacy) and tools were both given; use tools")
        if functions is not None:
            if not isinstance(functions, list):
                raise ValueError("functions must be a list of {'name', 'description', 'parameters'} objects")
            v["tools"] = [{"type": "function", "function": f} for f in functions]
        if isinstance(call, dict):
            v["tool_choice"] = {"type": "function", "function": call}
        elif call is not None:
            v["tool_choice"] = call
        v["parallel_tool_calls"] = False
        v["legacy_functions"] = True
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict | None) -> dict | None:
        # An allow-list: anything else would reach the template as a variable, and could switch off the
        # neutralising of user text, replace bos_token with control tokens, or collide with messages / tools.
        for k, x in (v or {}).items():
            if k not in TEMPLATE_KWARGS:
                raise ValueError(f"chat_template_kwargs.{k} is not supported; allowed keys: "
                                 f"{', '.join(sorted(TEMPLATE_KWARGS))}")
            if not isinstance(x, bool):
                raise ValueError(f"chat_template_kwargs.{k} must be true or false, got {x!r}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "ChatCompletionRequest":
        if self.modalities is not None and "audio" in self.modalities:
            raise ValueError('modalities: this server answers in text only; audio output is not supported (send '
                             'modalities ["text"] or leave it out)')
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, AllowedToolsChoice):
            names = self.tool_choice.allowed_tools.names()
            declared = {t.function.name for t in self.tools or []}
            unknown = [n for n in names if n not in declared]
            if unknown:
                raise ValueError(f"tool_choice.allowed_tools names {', '.join(map(repr, unknown))}, not in tools "
                                 f"({', '.join(sorted(declared)) or 'none given'})")
            # honoured by narrowing: the other tools leave the prompt, the mode becomes the tool_choice
            self.tools = [t for t in self.tools or [] if t.function.name in names]
            self.tool_choice = self.tool_choice.allowed_tools.mode
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise ValueError("tool_choice 'required' or a named function needs a non-empty 'tools' list")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not "
                                 f"in tools ({', '.join(sorted(names))})")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def enable_thinking(self) -> bool:
        """chat_template_kwargs.enable_thinking wins; else reasoning_effort other than none/minimal turns it on."""
        kw = self.chat_template_kwargs or {}
        if "enable_thinking" in kw:
            return bool(kw["enable_thinking"])
        return self.reasoning_effort not in (None, "none", "minimal")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _cross(self) -> "CompletionRequest":
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this model")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# --- responses -------------------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "unigemma"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- validation errors → OpenAI errors -------------------------------------------------------------------------

def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[...]", "function-after[...]", "function-before[...]") or "[" in str(part) \
                or str(part).startswith(("TextPart", "ImagePart", "AudioPart", "VideoPart", "NamedToolChoice",
                                         "AllowedToolsChoice",
                                         "literal")):
            continue  # union-branch labels pydantic adds to locations; not field names
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_to_api_error(exc: ValidationError) -> APIError:
    """The first error of a pydantic ValidationError as an OpenAI error: 400 for unknown fields, else 422."""
    errors = exc.errors(include_url=False)
    # prefer an error that names a real field over union-branch noise; unknown fields first (OpenAI order)
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        e = extra[0]
        name = _loc(e["loc"]) or "?"
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                        code="unrecognized_argument")
    # the deepest location is the most specific (a content-part error beats "not a string" of the str branch)
    e = max(errors, key=lambda e: len(e["loc"]))
    param = _loc(e["loc"]) or None
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = f"{param}: " if param else ""
    # a rule across fields (e.g. top_logprobs without logprobs) is a bad parameter (400), not a schema violation
    status = 400 if not e["loc"] and e["type"] == "value_error" else 422
    return APIError(status, f"{where}{msg}", param=param, code="invalid_value")


def parse_request(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_to_api_error(exc) from None
