"""`llmcli chat`: a multi-turn conversation in the terminal, or scripted through stdin.

Each turn renders the whole history through the chat template (the one serve uses) and streams the
reply from the same Generator as `generate`. The history is trimmed to the context: the oldest
turns after the system message leave first, so that the prompt leaves room for a reply.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import IO, Any

from llmcli import ui
from llmcli.device import select_device, select_dtype
from llmcli.errors import UserError
from llmcli.generate.text import Generator, encode_prompt
from llmcli.load import load_checkpoint
from llmcli.options.inference import ChatOptions
from llmcli.options.sampling import SamplingParams

HELP = "/reset forgets the history, /system TEXT sets the system message, /exit (or Ctrl-D) leaves"


class Conversation:
    """The messages so far and the prompt they make, within `context` tokens minus `reserve`."""

    def __init__(self, template: Any, tokenizer: Any, context: int | None, reserve: int, system: str | None):
        self.template, self.tokenizer, self.context, self.reserve = template, tokenizer, context, reserve
        self.system = system
        self.turns: list[tuple[str, str]] = []

    def messages(self) -> list[tuple[str, str]]:
        return ([("system", self.system)] if self.system else []) + self.turns

    def reset(self, system: str | None = None, keep_system: bool = True) -> None:
        self.turns = []
        self.system = self.system if keep_system else system

    def prompt(self, user: str) -> list[int]:
        """Add the user's message; the ids of the prompt for the reply (old turns dropped to fit)."""
        self.turns.append(("user", user))
        while True:
            ids = encode_prompt(self.tokenizer, self.template.render(self.messages()))
            if self.context is None or len(ids) + self.reserve <= self.context or len(self.turns) <= 1:
                return ids
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[-1:]


def chat_command(opts: ChatOptions) -> None:
    device = select_device(opts.device)
    loaded = load_checkpoint(opts.run_dir, device, select_dtype(opts.dtype, device), chat_template=opts.chat_template)
    if loaded.task == "seq2seq":
        raise UserError(f"{loaded.directory} holds a model.arch={loaded.model.config.arch} sequence-to-sequence model, "
                        "which keeps no conversation: use llmcli generate (each source a prompt) or serve")
    generator = Generator.of(loaded, max_batch_size=1)
    fmt = opts.constraint.format()
    if fmt is not None:
        generator.grammars.check(fmt)  # compiled (or refused) before the conversation starts
    run_chat(generator, loaded.chat_template, opts, sys.stdin, sys.stdout)


def run_chat(generator: Generator, template: Any, opts: ChatOptions, stdin: IO[str], out: IO[str]) -> int:
    """The session (see the module docstring); returns how many replies were given."""
    interactive = stdin.isatty()
    context = generator.engine.max_len
    params = dataclasses.replace(opts.sampling, stop=tuple(dict.fromkeys([*opts.sampling.stop, *template.stop])))
    reserve = min(params.max_new_tokens, context // 2) if context else 0
    conversation = Conversation(template, generator.tokenizer, context, reserve, opts.system)
    if interactive:
        ui.log(f"chat with {opts.run_dir} (context {context or 'unlimited'} tokens); {HELP}; Ctrl-C stops a reply")
    replies = 0
    while (line := _read(stdin, interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(text, conversation, interactive):
                break
            continue
        reply = _reply(generator, conversation.prompt(text), params, out, opts.constraint.format())
        conversation.turns.append(("assistant", reply.strip()))
        replies += 1
    return replies


def _read(stdin: IO[str], interactive: bool) -> str | None:
    """The next line typed (None at the end); Ctrl-C at the prompt only says how to leave."""
    while True:
        try:
            if interactive:
                return input("> ")
            line = stdin.readline()
            return line if line else None
        except EOFError:
            return None
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=sys.stderr)


def _command(text: str, conversation: Conversation, interactive: bool) -> bool:
    """Run a /command; False for /exit."""
    name, _, rest = text.partition(" ")
    if name == "/exit":
        return False
    if name == "/reset":
        conversation.reset()
        note = "history cleared"
    elif name == "/system":
        conversation.reset(rest.strip() or None, keep_system=False)
        note = f"system message set to {rest.strip()!r}; history cleared" if rest.strip() else "system message removed"
    elif interactive:
        note = f"unknown command {name}; {HELP}"
    else:
        raise UserError(f"unknown command {name} ({HELP})")
    print(f"({note})", file=sys.stderr)
    return True


def _reply(generator: Generator, ids: list[int], params: SamplingParams, out: IO[str], fmt: Any = None) -> str:
    """Stream one reply to `out` (in the format `fmt`, when given); Ctrl-C stops it (what was shown is kept)."""
    request = generator.submit(ids, params, fmt)
    if generator.request(request).dropped_prompt_tokens:
        ui.log("warning: this message alone is longer than the context; the model sees its end only")
    shown: list[str] = []
    try:
        while generator.has_work():
            for event in generator.step():
                if event.text:
                    out.write(event.text)
                    out.flush()
                    shown.append(event.text)
                if event.finished:
                    generator.completion(event.id)
    except KeyboardInterrupt:
        generator.cancel(request)
        print("\n(reply stopped)", file=sys.stderr)
    text = "".join(shown)
    if not text.endswith("\n"):
        out.write("\n")
        out.flush()
    return text
