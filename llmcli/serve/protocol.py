"""OpenAI's wire format: request bodies, error bodies, and the JSON and stream chunks we answer with.

Request fields are OpenAI's, plus vLLM's `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`.
Unknown fields are ignored, as most OpenAI-compatible servers do; OpenAI fields that would change
the result and that we do not implement are refused (`unsupported`). Errors are OpenAI-shaped,
`{"error": {"message", "type", "param", "code"}}`: 400 invalid parameters (naming the field), 401
missing or wrong API key, 404 unknown model or route, 413 body over 1 MiB, 429 queue full, 503
shutting down. Streams are server-sent events: `data: {json}\\n\\n` chunks, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import JSONResponse

from llmcli.constrain.grammar import Format, GrammarError
from llmcli.errors import FieldError
from llmcli.generate.request import FINISH_EOT, FINISH_FORMAT, FINISH_LENGTH, FINISH_STOP
from llmcli.generate.text import Completion
from llmcli.options.sampling import SamplingParams
from llmcli.serve.tools import CallStream, Tool, parse_reply

MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_LIMIT = 1 << 16  # max_tokens above this are refused
MAX_N = 128
MAX_PROMPTS = 128
MAX_STOP = 16
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256
BODY_NAMES = {"max_new_tokens": "max_tokens", "ignore_eot": "ignore_eos"}  # SamplingParams field -> body field
DONE = "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**({"Retry-After": "1"} if self.status in (429, 503) else {}), **(headers or {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)

    def event(self) -> str:
        """The error as a stream chunk (a stream that already started cannot change its status)."""
        return sse(self.body())


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit / 2**20:g} MiB", code="request_too_large")


def validation_error(exc: Any) -> APIError:
    """The first pydantic error as a 400 naming its field, e.g. `temperature: Input should be ...`."""
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return invalid(f"{param}: {message}" if param else message, param)


# --------------------------------------------------------------------------------------------
# Request bodies


class Body(BaseModel):
    """Fields both endpoints take; the range constraints are the API's documentation."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)  # "stream": "yes" is a 400

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    stop: Optional[list[str]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    top_k: Optional[int] = Field(None, ge=-1)  # -1 or 0 = off
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: Optional[bool] = False
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a string or a list of strings")
        if len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in value):
            raise ValueError("a stop string cannot be empty")
        return value

    @field_validator("stream_options", mode="before")
    @classmethod
    def _stream_options(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict):
            raise ValueError("must be an object")
        return value


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


class CompletionBody(Body):
    prompt: Union[str, list[str], list[list[int]]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if _is_ids(value):
            return [value]  # one prompt as token ids
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value)
                                                  or all(_is_ids(p) for p in value)):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            return value
        raise ValueError("must be a string, a non-empty list of strings, a list of token ids or a list of "
                         "such lists")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1)
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant's earlier calls
    tool_call_id: Optional[str] = None  # role "tool": the call it answers


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None


MAX_EMBEDDING_INPUTS = 2048


class EmbeddingBody(BaseModel):
    """POST /v1/embeddings: OpenAI's fields."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Optional[str] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return value

    @field_validator("encoding_format")
    @classmethod
    def _encoding(cls, value: Any) -> Any:
        if value not in (None, "float", "base64"):
            raise ValueError(f"must be float or base64; got {value!r}")
        return value


def embedding_body(body: EmbeddingBody, vectors: Any, tokens: int, model: str) -> dict[str, Any]:
    """OpenAI's embeddings response: floats, or base64 of little-endian float32 (what the openai
    client asks for and decodes)."""
    import base64

    import numpy as np

    data = []
    for i, vector in enumerate(vectors):
        if body.encoding_format == "base64":
            value: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        else:
            value = [float(x) for x in vector]
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def unsupported(body: Any) -> None:
    """Refuse OpenAI fields that would change the answer and that this server does not implement."""
    checks = [
        ("presence_penalty", getattr(body, "presence_penalty", None) not in (None, 0), "use repetition_penalty instead"),
        ("frequency_penalty", getattr(body, "frequency_penalty", None) not in (None, 0),
         "use repetition_penalty instead"),
        ("logit_bias", bool(getattr(body, "logit_bias", None)), None),
        ("logprobs", getattr(body, "logprobs", None) not in (None, False, 0), None),
        ("top_logprobs", getattr(body, "top_logprobs", None) not in (None, 0), None),
        ("suffix", bool(getattr(body, "suffix", None)), None),
        ("best_of", getattr(body, "best_of", None) not in (None, 1, getattr(body, "n", None) or 1), None),
        ("functions", bool(getattr(body, "functions", None)), "use tools"),
    ]
    for name, refused, hint in checks:
        if refused:
            raise invalid(f"{name} is not supported by this server" + (f"; {hint}" if hint else ""), name,
                          "unsupported_parameter")


def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Each message as the chat template takes it ({"role", "content"}, and an assistant's
    `tool_calls` or a tool's `tool_call_id`); content parts other than text are refused."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise invalid(f"messages.{i}.content.{j}: only text content is supported",
                                  f"messages.{i}.content.{j}")
                texts.append(part.text)
            content = "".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.tool_calls:
            entry["tool_calls"] = [_earlier_call(call, f"messages.{i}.tool_calls.{j}")
                                   for j, call in enumerate(message.tool_calls)]
        if message.role == "tool":
            entry["tool_call_id"] = message.tool_call_id or ""
        if message.name is not None:
            entry["name"] = message.name
        out.append(entry)
    return out


def _earlier_call(call: dict[str, Any], where: str) -> dict[str, Any]:
    """An assistant's earlier call, with its arguments as an object (what chat templates expect)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid(f"{where}: must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}",
                      where)
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise invalid(f"{where}.function.arguments: not valid JSON", f"{where}.function.arguments") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def output_format(body: Body) -> Format | None:
    """The body's `response_format` as a Format (None: free text). Besides OpenAI's `text`,
    `json_object` and `json_schema` ({"name", "schema", "strict"}), llmcli takes `{"type": "regex",
    "regex": ...}` and `{"type": "grammar", "grammar": LARK}`."""
    spec = body.response_format
    if spec is None:
        return None
    kind = spec.get("type")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return Format.json_object()
        if kind == "json_schema":
            inner = spec.get("json_schema")
            if not isinstance(inner, dict) or "schema" not in inner:
                raise invalid("response_format.json_schema: must be an object with a \"schema\" (and \"name\", "
                              "\"strict\")", "response_format.json_schema")
            strict = inner.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise invalid("response_format.json_schema.strict: must be true or false",
                              "response_format.json_schema.strict")
            return Format.json_schema(inner["schema"], bool(strict))
        if kind in ("regex", "grammar"):
            value = spec.get(kind)
            if not isinstance(value, str) or not value:
                raise invalid(f"response_format.{kind}: must be a non-empty string", f"response_format.{kind}")
            return Format.regex(value) if kind == "regex" else Format.grammar(value)
    except GrammarError as exc:
        raise invalid(f"response_format.json_schema.schema: {exc}", "response_format.json_schema.schema") from None
    raise invalid(f"response_format.type: unknown type {kind!r} (expected text, json_object, json_schema, regex "
                  "or grammar)", "response_format.type")


def sampling_params(body: Body, max_tokens: int, extra_stop: Sequence[str] = ()) -> SamplingParams:
    """The body's decoding settings; a value SamplingParams refuses is a 400 in the body's terms."""
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=max(0, body.top_k or 0),
            top_p=1.0 if body.top_p is None else body.top_p,
            min_p=body.min_p or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=body.seed, stop=tuple(dict.fromkeys([*(body.stop or []), *extra_stop])),
            ignore_eot=bool(body.ignore_eos))
    except FieldError as exc:
        name = BODY_NAMES.get(exc.field, exc.field)
        raise invalid(exc.render(lambda f: BODY_NAMES.get(f, f)), name) from None


# --------------------------------------------------------------------------------------------
# Responses


def finish_reason(reason: str | None) -> str | None:
    if reason in (FINISH_EOT, FINISH_STOP, FINISH_FORMAT):
        return "stop"
    if reason == FINISH_LENGTH:
        return "length"
    return reason


def usage(completions: Sequence[Completion], n: int) -> dict[str, int]:
    """Token counts of a request whose completions come `n` per prompt, in order."""
    prompt_tokens = sum(c.prompt_tokens for c in completions[::n])  # the n choices of a prompt share it
    completion_tokens = sum(c.tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: Any) -> str:
    return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"


@dataclass(frozen=True)
class Reply:
    """One response's id, time and model, and its JSON body or stream chunks in OpenAI's shape.
    With `tools`, chat replies are parsed into `tool_calls` (tools.py)."""

    chat: bool
    model: str
    ident: str
    created: int
    include_usage: bool = False  # streams: a last chunk with the usage
    tools: tuple[Tool, ...] = ()
    _calls: dict[int, CallStream] = field(default_factory=dict, compare=False)  # streams: per choice

    @classmethod
    def new(cls, chat: bool, model: str, include_usage: bool = False, tools: Sequence[Tool] = ()) -> Reply:
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        return cls(chat, model, ident, int(time.time()), include_usage, tuple(tools))

    def body(self, indices: Sequence[int], texts: Sequence[str], completions: Sequence[Completion],
             n: int) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        choices = []
        for i, text, c in zip(indices, texts, completions, strict=True):
            reason = finish_reason(c.finish_reason)
            if not self.chat:
                content: dict[str, Any] = {"text": text}
            else:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if self.tools:
                    message["content"], calls = parse_reply(text, list(self.tools))
                    if calls:
                        message["tool_calls"] = [call.body() for call in calls]
                        reason = "tool_calls"
                content = {"message": message}
            choices.append({"index": i, **content, "logprobs": None, "finish_reason": reason})
        return {"id": self.ident, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": usage(completions, n)}

    # -- streams ----------------------------------------------------------------------------

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        base: dict[str, Any] = {"id": self.ident, "object": "chat.completion.chunk" if self.chat
                                else "text_completion", "created": self.created, "model": self.model}
        if self.include_usage:
            base["usage"] = None
        return sse({**base, "choices": choices, **extra})

    def choice(self, index: int, text: str | None, reason: str | None, role: bool = False,
               tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A streamed choice: `text` for completions, a `delta` for chat (None: no content)."""
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_calls is not None:
            delta["tool_calls"] = tool_calls
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    def opening(self, prompts: Sequence[tuple[int, str]], echo: bool) -> str:
        """Chunks before the first token: each chat choice's role, or each echoed (index, prompt)."""
        if self.chat:
            return "".join(self.chunk([self.choice(i, "", None, role=True)]) for i, _ in prompts)
        if echo:
            return "".join(self.chunk([self.choice(i, text, None)]) for i, text in prompts)
        return ""

    def events(self, events: Sequence[Any]) -> str:
        """Chunks for one step's events (`index`, `text`, `finished`, `finish_reason` each)."""
        out = []
        for ev in events:
            reason = finish_reason(ev.finish_reason) if ev.finished else None
            if not self.chat:
                out.append(self.chunk([self.choice(ev.index, ev.text, reason)]))
                continue
            text = ev.text
            if self.tools:
                text, calls = self._calls.setdefault(ev.index, CallStream(list(self.tools))).push(ev.text, ev.finished)
                out += self._call_chunks(ev.index, calls)
                if ev.finished and self._calls[ev.index].calls:
                    reason = "tool_calls"
            if text:
                out.append(self.chunk([self.choice(ev.index, text, None)]))
            if ev.finished:
                out.append(self.chunk([self.choice(ev.index, None, reason)]))
        return "".join(out)

    def _call_chunks(self, index: int, calls: Sequence[Any]) -> list[str]:
        """OpenAI streams a call as its id and name, then its arguments (here in one piece)."""
        out = []
        first = self._calls[index].calls - len(calls)
        for k, call in enumerate(calls, start=first):
            head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            out.append(self.chunk([self.choice(index, None, None, tool_calls=[head])]))
            args = {"index": k, "function": {"arguments": call.arguments}}
            out.append(self.chunk([self.choice(index, None, None, tool_calls=[args])]))
        return out

    def usage_chunk(self, completions: Sequence[Completion], n: int) -> str:
        return self.chunk([], usage=usage(completions, n))
