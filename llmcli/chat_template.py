"""Chat templates: how a conversation becomes one prompt, for training data, `llmcli chat` and serve alike.

Every template has `render(messages, add_generation_prompt=True)` (messages are (role, content)
pairs) and `stop` (stop strings its layout needs). `load_chat_template` picks, in this order:

* `--chat-template FILE`: a `.jinja` file (a Jinja chat template), or a JSON layout (below);
* the checkpoint's `tokenizer_config.json` `chat_template` (Hugging Face's format; imported models
  keep theirs). It is rendered in jinja2's ImmutableSandboxedEnvironment set up as `transformers`
  does (trim_blocks, lstrip_blocks, loopcontrols; tojson, raise_exception, strftime_now) with the
  file's special tokens (bos_token, eos_token, ...) in scope, so the prompt is the one
  `apply_chat_template` gives; generation stops at the model's end tokens;
* the default for base models, never tuned to follow a conversation: `{role}: {content}\\n` per
  message, then `assistant:`, with `\\nuser:` as a stop string (`DEFAULT_JINJA` is the same layout
  as Jinja, what `llmcli export` writes for a checkpoint without a template of its own).

Messages are (role, content) pairs or OpenAI's dicts: an assistant message's `tool_calls` are
written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (`render_call`, the syntax
serve parses replies with) and a `tool` message is a message like the others. `tools` (OpenAI's
function specs) go to a Jinja template as its `tools` variable; the other layouts put one line
before the messages, `tools: [...]` and how to call one.

A JSON layout is an object with any of these keys (Python str.format fields `{role}` and
`{content}`; write literal braces as `{{` and `}}`):

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

from llmcli.checkpoint import TOKENIZER_CONFIG
from llmcli.errors import UserError
from llmcli.io import read_json_object

TEMPLATE_KEYS = {"prefix", "message", "roles", "generation_prompt", "stop"}
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_LINE = ("tools: {tools}\nTo call a tool, answer " + TOOL_OPEN + '{{"name": NAME, "arguments": {{...}}}}'
              + TOOL_CLOSE + "\n")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_JINJA = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@dataclass(frozen=True)
class ChatTemplate:
    """How chat messages become one prompt (see the module docstring)."""

    message: str = "{role}: {content}\n"
    roles: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    generation_prompt: str = "assistant:"
    stop: tuple[str, ...] = ("\nuser:",)

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = True,
               tools: Sequence[dict[str, Any]] | None = None) -> str:
        parts = [self.prefix]
        if tools:
            parts.append(TOOLS_LINE.format(tools=json.dumps(list(tools), ensure_ascii=False)))
        for message in map(as_message, messages):
            content = message["content"] + "".join(render_call(c["function"]["name"], c["function"]["arguments"])
                                                    for c in message.get("tool_calls") or [])
            parts.append(self.roles.get(message["role"], self.message).format(role=message["role"], content=content))
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)


def as_message(message: Any) -> dict[str, Any]:
    """A (role, content) pair or an OpenAI message dict, as a dict."""
    if isinstance(message, dict):
        return {**message, "content": message.get("content") or ""}
    role, content = message
    return {"role": role, "content": content}


def render_call(name: str, arguments: Any) -> str:
    """How a model writes a tool call (what serve parses replies for, tools.py)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{TOOL_OPEN}{{"name": {json.dumps(name)}, "arguments": {args}}}{TOOL_CLOSE}'


class JinjaTemplate:
    """A Hugging Face Jinja chat template (see the module docstring); errors are one-line UserErrors."""

    stop: tuple[str, ...] = ()

    def __init__(self, source: str, special_tokens: dict[str, Any] | None = None, where: str = "chat template"):
        import jinja2

        self.source, self.where = source, where
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise UserError(f"{where}: not a valid Jinja template ({exc.message}, line {exc.lineno})") from None

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = True,
               tools: Sequence[dict[str, Any]] | None = None) -> str:
        import jinja2

        chat = [as_message(m) for m in messages]
        try:
            return self._template.render(messages=chat, tools=list(tools) if tools else None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:  # raise_exception(...), undefined names, sandbox refusals
            raise UserError(f"{self.where} raised an error: {exc}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise UserError(f"{self.where} failed: {type(exc).__name__}: {exc}") from None


def _environment() -> Any:
    """transformers' environment for chat templates (utils/chat_template_utils.py)."""
    import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def _special_tokens(config: dict[str, Any]) -> dict[str, Any]:
    """The special tokens a tokenizer_config.json names (strings, or {"content": ...})."""
    out: dict[str, Any] = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    if isinstance(config.get("additional_special_tokens"), list):
        out["additional_special_tokens"] = config["additional_special_tokens"]
    return out


def tokenizer_config(directory: Path | None) -> dict[str, Any]:
    """A checkpoint's tokenizer_config.json ({} when it has none)."""
    path = None if directory is None else Path(directory) / TOKENIZER_CONFIG
    return read_json_object(path) if path is not None and path.is_file() else {}


def jinja_source(config: dict[str, Any], where: str) -> str | None:
    """The `chat_template` of a tokenizer_config.json: a string, or HF's list of named ones ("default")."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: chat_template must be a string (or a list of named templates)")
    return value


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


def load_chat_template(path: str | Path | None = None, directory: Path | None = None) -> ChatTemplate | JinjaTemplate:
    """The template a conversation with the checkpoint `directory` is laid out by (see the module
    docstring); a bad file is refused with one line naming the problem."""
    config = tokenizer_config(directory)
    if path is not None:
        path = Path(path).expanduser()
        if path.suffix in (".jinja", ".j2"):
            if not path.is_file():
                raise UserError(f"chat template not found: {path}")
            return JinjaTemplate(path.read_text(encoding="utf-8"), _special_tokens(config), str(path))
        return _json_template(path)
    where = f"{Path(directory) / TOKENIZER_CONFIG} chat_template" if directory is not None else "chat template"
    source = jinja_source(config, where)
    return JinjaTemplate(source, _special_tokens(config), where) if source is not None else ChatTemplate()


def _json_template(path: Path) -> ChatTemplate:
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
