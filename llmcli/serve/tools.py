"""Tool calls: the request's `tools` checked, the format a forced call must take, and replies parsed
into OpenAI's `tool_calls` (whole, or chunk by chunk as a stream arrives).

A model calls a tool by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the
Hermes / Qwen convention, which the default chat template also describes to the model); any text
around the calls is the message's content. `tool_choice: "required"` or a named function
constrains the reply to exactly one such call, its arguments matching the function's parameter
schema (a Lark grammar with the schema inlined, constrain/grammar.py), so the call always
validates; `"auto"` leaves the reply free and parses whatever calls it makes; `"none"` renders no
tools and parses none.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from llmcli.chat_template import TOOL_CLOSE as CLOSE
from llmcli.chat_template import TOOL_OPEN as OPEN
from llmcli.constrain.grammar import Format

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


class ToolError(ValueError):
    """A bad `tools` or `tool_choice`; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        """OpenAI's shape, as chat templates take it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def body(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_tools(tools: Any) -> list[Tool]:
    """The request's `tools` as Tools; anything but valid function schemas is a ToolError."""
    if not isinstance(tools, list):
        raise ToolError("tools: must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f"{where}: must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            "\"parameters\": {...}}}}}", where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name: must be 1-64 letters, digits, _ or -; got {name!r}",
                            f"{where}.function.name")
        if any(t.name == name for t in out):
            raise ToolError(f"{where}.function.name: {name!r} is defined twice", f"{where}.function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters: must be a JSON schema of type object",
                            f"{where}.function.parameters")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description: must be a string", f"{where}.function.description")
        out.append(Tool(name, description, parameters))
    return out


def chosen(tools: list[Tool], choice: Any) -> tuple[str, list[Tool]]:
    """(mode "none" | "auto" | "required", the tools a forced call may use) for `tool_choice`."""
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolError(f"tool_choice: must be none, auto, required or {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ...}}}}; got {choice!r}", "tool_choice")
        if choice != "none" and not tools:
            raise ToolError(f"tool_choice: {choice} needs tools", "tool_choice")
        return choice, tools
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ToolError("tool_choice: a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        "tool_choice")
    named = [t for t in tools if t.name == name]
    if not named:
        offered = ", ".join(t.name for t in tools) or "none"
        raise ToolError(f"tool_choice: no function named {name!r} among the tools ({offered})", "tool_choice")
    return "required", named


def call_format(tools: list[Tool]) -> Format:
    """Exactly one call of one of `tools`, its arguments matching the function's schema."""
    rules, names = [], []
    for i, tool in enumerate(tools):
        schema = {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
        names.append(f"call_{i}")
        rules.append(f"call_{i}: %json {json.dumps(schema)}")
    lark = "\n".join([f"start: {json.dumps(OPEN)} ({' | '.join(names)}) {json.dumps(CLOSE)}", *rules])
    return Format.grammar(lark)


def _call(text: str, tools: list[Tool]) -> ToolCall | None:
    """A call's JSON as a ToolCall, if it names one of `tools` and its arguments are an object."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not any(t.name == data.get("name") for t in tools):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall("call_" + secrets.token_hex(12), data["name"], json.dumps(arguments, ensure_ascii=False))


def parse_reply(text: str, tools: list[Tool]) -> tuple[str | None, list[ToolCall]]:
    """(the content outside the calls, or None when there is none; the calls) of a whole reply. A
    block that is not a valid call of a known tool stays in the content."""
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        call = _call(match.group(1), tools)
        if call is None:
            continue
        calls.append(call)
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept) if calls else text
    return (content if content.strip() else None) if calls else text, calls


class CallStream:
    """A streamed reply split into content and calls as it grows: text that may open a call is held
    back until it is known not to; a call is released whole once its closing tag arrives."""

    def __init__(self, tools: list[Tool]):
        self.tools = tools
        self.pending = ""
        self.calls = 0

    def push(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """(content to send now, calls completed now)."""
        buffer, content, calls = self.pending + delta, [], []
        while True:
            start = buffer.find(OPEN)
            if start < 0:
                break
            end = buffer.find(CLOSE, start)
            if end < 0:
                break
            call = _call(buffer[start + len(OPEN):end], self.tools)
            content.append(buffer[:start] if call is not None else buffer[:end + len(CLOSE)])
            if call is not None:
                calls.append(call)
            buffer = buffer[end + len(CLOSE):]
        start = buffer.find(OPEN)
        if final:
            hold = 0
        elif start >= 0:
            hold = len(buffer) - start  # an open call: wait for its end
        else:
            hold = next((n for n in range(min(len(buffer), len(OPEN) - 1), 0, -1) if OPEN.startswith(buffer[-n:])), 0)
        content.append(buffer[:len(buffer) - hold])
        self.pending = buffer[len(buffer) - hold:]
        self.calls += len(calls)
        return "".join(content), calls
