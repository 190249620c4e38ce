"""Chat templates: how /v1/chat/completions lays a conversation out as one prompt.

Our models are base models: they were never tuned to follow a conversation, so the chat endpoint
only lays the messages out as text the model continues. The default layout is
`{role}: {content}\\n` per message, then `assistant:`, with `\\nuser:` as a stop string. A
`--chat-template FILE` is a JSON object with any of these keys (Python str.format fields
`{role}` and `{content}`; write literal braces as `{{` and `}}`):

    {"prefix": "",                             text before the first message
     "message": "{role}: {content}\\n",         each message ...
     "roles": {"system": "{content}\\n\\n"},    ... or, for these roles, this instead
     "generation_prompt": "assistant:",        after the last message: the model continues here
     "stop": ["\\nuser:"]}                      stop strings added to every chat request
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.errors import UserError

TEMPLATE_KEYS = {"prefix", "message", "roles", "generation_prompt", "stop"}


@dataclass(frozen=True)
class ChatTemplate:
    """How chat messages become one prompt (see the module docstring)."""

    message: str = "{role}: {content}\n"
    roles: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    generation_prompt: str = "assistant:"
    stop: tuple[str, ...] = ("\nuser:",)

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        parts = [self.prefix]
        for role, content in messages:
            parts.append(self.roles.get(role, self.message).format(role=role, content=content))
        parts.append(self.generation_prompt)
        return "".join(parts)


def _check_format(text: Any, where: str) -> str:
    """`text` if it is a format string using only {role} and {content}."""
    if not isinstance(text, str):
        raise UserError(f"{where} must be a string; got {text!r}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise UserError(f"{where}: {exc} (write literal braces as {{{{ and }}}})") from None
    bad = [name for name in fields if name not in ("role", "content")]
    if bad:
        raise UserError(f"{where}: unknown field {{{bad[0]}}} (only {{role}} and {{content}}; write literal "
                        f"braces as {{{{ and }}}})")
    return text


def _read_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"chat template not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a JSON chat template ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a chat template is a JSON object with keys {sorted(TEMPLATE_KEYS)}")
    unknown = sorted(set(raw) - TEMPLATE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (expected {', '.join(sorted(TEMPLATE_KEYS))})")
    return raw


def load_chat_template(path: str | Path | None) -> ChatTemplate:
    """The default template, or the one in a JSON file (refused with one line naming the problem)."""
    if path is None:
        return ChatTemplate()
    path = Path(path).expanduser()
    raw = _read_object(path)
    default = ChatTemplate()
    roles = raw.get("roles", {})
    if not isinstance(roles, dict):
        raise UserError(f"{path}: roles must be an object mapping a role to its format")
    stop = raw.get("stop", list(default.stop))
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"{path}: stop must be a list of non-empty strings")
    prefix = raw.get("prefix", default.prefix)
    generation_prompt = raw.get("generation_prompt", default.generation_prompt)
    for key, value in (("prefix", prefix), ("generation_prompt", generation_prompt)):
        if not isinstance(value, str):
            raise UserError(f"{path}: {key} must be a string; got {value!r}")
    return ChatTemplate(
        message=_check_format(raw.get("message", default.message), f"{path}: message"),
        roles={str(k): _check_format(v, f"{path}: roles.{k}") for k, v in roles.items()},
        prefix=prefix, generation_prompt=generation_prompt, stop=tuple(stop))
