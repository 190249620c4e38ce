"""An ollama Modelfile beside an exported GGUF: the chat layout as ollama's Go template, stop strings,
and sampling parameters.

llama.cpp and LM Studio read the Jinja chat template stored in the GGUF; ollama renders a
conversation with a Go template over `.Messages` (each with `.Role` and `.Content`). A Jinja
template becomes one when it lays messages out one after another: probe conversations rendered with
it give the text before the messages, each role's layout and the generation prompt, and that layout
is used only if it reproduces the Jinja rendering of several other conversations exactly. Other
templates (a system message folded into the first user turn, say) are left to ollama, which reads
the GGUF's template and knows the common ones; the Modelfile says so in a comment.

Parameters are `llmcli generate`'s defaults, so ollama samples as llmcli does (its own defaults add
top-k 40, top-p 0.9 and a repetition penalty), and num_ctx is the model's context: ollama's default
is longer, and a GPT-2 model has no positions past its own.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from llmcli.chat_template import ChatTemplate, JinjaTemplate
from llmcli.errors import UserError
from llmcli.options.sampling import SamplingParams

ROLES = ("system", "user", "assistant")
_MARK = "\ue000MESSAGE\ue001"  # a private-use marker no template changes
_PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Hello {there}"),),
    (("system", "Be brief."), ("user", "Hi\nthere")),
    (("user", "a"), ("assistant", "b"), ("user", "c")),
    (("system", "s"), ("user", "a"), ("assistant", " b "), ("user", "c"), ("assistant", "d")),
)


def layout_of(template: ChatTemplate | JinjaTemplate) -> ChatTemplate | None:
    """`template` as a per-message layout (a ChatTemplate rendering the same text), or None when it
    is not one."""
    if isinstance(template, ChatTemplate):
        return template
    try:
        prefix = template.render([], add_generation_prompt=False)
        roles = {}
        for role in ROLES:
            text = template.render([(role, _MARK)], add_generation_prompt=False)
            body = text[len(prefix):]
            if not text.startswith(prefix) or body.count(_MARK) != 1:
                return None
            roles[role] = _format(body)
        without = template.render([("user", _MARK)], add_generation_prompt=False)
        with_prompt = template.render([("user", _MARK)], add_generation_prompt=True)
        if not with_prompt.startswith(without):
            return None
        layout = ChatTemplate(message=roles["user"], roles=roles, prefix=prefix,
                              generation_prompt=with_prompt[len(without):], stop=())
        same = all(layout.render(list(chat), prompt) == template.render(list(chat), prompt)
                   for chat in _PROBES for prompt in (True, False))
    except UserError:  # the template refused a probe (e.g. a conversation without a user turn first)
        return None
    return layout if same else None


def _format(body: str) -> str:
    """Rendered text with the marker where the content goes -> a str.format layout."""
    before, _, after = body.partition(_MARK)
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return f"{escape(before)}{{content}}{escape(after)}"


def go_template(layout: ChatTemplate) -> str:
    """The layout as an ollama (Go text/template) TEMPLATE over .Messages."""
    def part(fmt: str) -> str:
        out = []
        for literal, name, _, _ in string.Formatter().parse(fmt):
            out.append(_go_literal(literal))
            if name is not None:
                out.append({"content": "{{ .Content }}", "role": "{{ .Role }}"}[name])
        return "".join(out)

    body = part(layout.message)
    for role, fmt in reversed(layout.roles.items()):
        body = f'{{{{ if eq .Role "{role}" }}}}{part(fmt)}{{{{ else }}}}{body}{{{{ end }}}}'
    return f"{_go_literal(layout.prefix)}{{{{ range .Messages }}}}{body}{{{{ end }}}}{_go_literal(layout.generation_prompt)}"


def _go_literal(text: str) -> str:
    """Text that Go's text/template prints as it is (only "{{" starts an action)."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_file: str, layout: ChatTemplate | None, stops: Sequence[str], context: int) -> str:
    """The Modelfile text: FROM ./gguf_file (relative to the Modelfile), TEMPLATE, PARAMETERs."""
    lines = [f"FROM ./{gguf_file}"]
    template = None if layout is None else go_template(layout)
    if template is not None and '"""' not in template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: this chat template is not a per-message layout; ollama reads the GGUF's "
                     "tokenizer.chat_template itself")
    defaults = SamplingParams()
    params = {"num_ctx": context, "temperature": defaults.temperature, "top_k": defaults.top_k,
              "top_p": defaults.top_p, "min_p": defaults.min_p, "repeat_penalty": defaults.repetition_penalty}
    lines += [f"PARAMETER {name} {value}" for name, value in params.items()]
    for stop in dict.fromkeys(stops):
        quoted = _quote(stop)
        lines.append(f"PARAMETER stop {quoted}" if quoted else f"# stop string {stop!r} cannot be written here")
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str | None:
    """A Modelfile value as ollama's parser reads it back: quoted when it has white space or a double
    quote (triple-quoted then); None when it holds three double quotes in a row."""
    if '"""' in value:
        return None
    if '"' in value:
        return f'"""{value}"""'
    return f'"{value}"' if any(c.isspace() for c in value) else value
