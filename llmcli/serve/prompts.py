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

from llmcli.serve.engine_loop import Prompt
from llmcli.serve.protocol import APIError, Body, invalid, unsupported, validation_error
from llmcli.serve.state import ServerState
from llmcli.tokenizer import decode, encode, unknown_chars

LONG_PROMPT_CHARS = 4096  # longer text prompts are tokenized off the event loop


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
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
