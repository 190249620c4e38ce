"""A request's body and prompts: JSON validated into the protocol's models, text tokenized into `Prompt`s.

Text prompts are tokenized on the event loop (off it when long); characters the tokenizer never
saw, token ids outside the vocabulary and sources longer than the encoder takes are 400s that name
the field.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from llmcli.constrain.grammar import Format, GrammarError
from llmcli.serve.engine_loop import Prompt
from llmcli.serve.protocol import APIError, Body, invalid, unsupported, validation_error
from llmcli.serve.state import ServerState
from llmcli.serve.tools import Tool, ToolError, chosen, parse_tools
from llmcli.tokenizer import decode, encode, unknown_chars

LONG_PROMPT_CHARS = 4096  # longer text prompts are tokenized off the event loop


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name not in state.model_names:
        served = ", ".join(f"`{n}`" for n in state.model_names)
        raise APIError(404, f"The model `{name}` does not exist; this server serves {served}",
                       param="model", code="model_not_found")


async def parse_body(request: Request, model: type[Body]) -> Any:
    """The request's body as `model`; a 400 for bad JSON, bad fields or unsupported ones."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
    check_model(request.app.state.llm, body.model)
    unsupported(body)
    return body


async def encode_prompt(state: ServerState, text: str, param: str) -> Prompt:
    """Tokenize a text prompt (off the event loop when it is long); unknown characters are a 400."""

    if state.task == "seq2seq" and not text.strip():
        raise invalid(f"{param}: the source is empty", param)

    def work() -> Prompt | list[str]:
        unknown = unknown_chars(state.tokenizer, text)
        if unknown:
            return unknown
        if state.task == "seq2seq":
            return Prompt(text, encode(state.tokenizer, text) + [state.eot])  # the source, with its end token
        return Prompt(text, encode(state.tokenizer, text) or [state.eot])  # "": a new document

    result = await asyncio.to_thread(work) if len(text) > LONG_PROMPT_CHARS else work()
    if isinstance(result, list):
        shown = " ".join(repr(c) for c in result[:20]) + (" ..." if len(result) > 20 else "")
        raise invalid(f"{param}: {len(result)} character(s) this model's tokenizer never saw: {shown}", param,
                      "unknown_characters")
    _check_source_length(state, result.ids, param)
    return result


def _check_source_length(state: ServerState, ids: list[int], param: str) -> None:
    if state.source_length is not None and len(ids) > state.source_length:
        raise invalid(f"{param}: the source has {len(ids)} tokens (with its end token); this model's encoder takes "
                      f"at most {state.source_length}", param, "source_too_long")


async def completion_prompts(state: ServerState, prompt: Any) -> list[Prompt]:
    """The body's `prompt` (a string, strings, or lists of token ids) as Prompts."""
    if isinstance(prompt, str):
        return [await encode_prompt(state, prompt, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [await encode_prompt(state, p, "prompt") for p in prompt]
    out = []
    for ids in prompt:
        bad = [t for t in ids if not 0 <= t < state.vocab_size]
        if bad:
            raise invalid(f"prompt: token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})",
                          "prompt")
        if state.task == "seq2seq":  # source ids: the end token is added when missing
            ids = list(ids) if ids[-1] == state.eot else [*ids, state.eot]
            _check_source_length(state, ids, "prompt")
        out.append(Prompt(decode(state.tokenizer, ids, skip_special_tokens=state.task == "seq2seq"), list(ids)))
    return out


async def checked_format(state: ServerState, fmt: Format | None, param: str) -> Format | None:
    """`fmt` compiled for the model's vocabulary (cached for the engine); a format the library cannot
    compile, or the vocabulary cannot spell, is a 400 naming `param` (the schema's field)."""
    if fmt is None:
        return None
    if fmt.kind == "json_schema" and param == "response_format":
        param = "response_format.json_schema.schema"
    try:
        await asyncio.to_thread(state.grammars.check, fmt)
    except GrammarError as exc:
        raise invalid(f"{param}: {exc}", param, "invalid_format") from None
    return fmt


def request_tools(state: ServerState, body: Any) -> tuple[str, list[Tool]]:
    """(tool_choice's mode: none, auto or required; the tools a reply may call), checked."""
    try:
        tools = parse_tools(body.tools) if body.tools is not None else []
        mode, allowed = chosen(tools, body.tool_choice)
    except ToolError as exc:
        raise invalid(str(exc), exc.param) from None
    if tools and state.task == "seq2seq":
        raise invalid("tools: a sequence-to-sequence model maps a source to a target; it calls no tools", "tools")
    return mode, allowed if mode == "required" else tools


def embedding_inputs(state: ServerState, body: Any) -> list[list[int]]:
    """The body's `input` as token id lists: texts tokenized, ids checked; each within what the model embeds."""
    value = body.input
    items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
    out = []
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 else f"input.{i}"
        if isinstance(item, str):
            unknown = unknown_chars(state.tokenizer, item)
            if unknown:
                shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
                raise invalid(f"{where}: {len(unknown)} character(s) this model's tokenizer never saw: {shown}",
                              "input", "unknown_characters")
            ids = encode(state.tokenizer, item)
        else:
            bad = [t for t in item if not 0 <= t < state.vocab_size]
            if bad:
                raise invalid(f"{where}: token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})",
                              "input")
            ids = list(item)
        limit = state.embedder.limit
        if not ids:
            raise invalid(f"{where}: has no tokens", "input")
        if limit is not None and len(ids) > limit:
            raise invalid(f"{where}: {len(ids)} tokens; this model embeds at most {limit} (its context)", "input",
                          "input_too_long")
        out.append(ids)
    return out
