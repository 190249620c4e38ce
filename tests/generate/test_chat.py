"""`llmcli chat`: scripted through stdin, history within the context, /reset and /system, Ctrl-C stopping
a reply and not the session, a template that raises."""

from __future__ import annotations

import io
import json

import pytest

from llmcli.chat_template import ChatTemplate
from llmcli.generate.chat import run_chat
from llmcli.generate.text import Generator, encode_prompt
from llmcli.load import load_checkpoint
from llmcli.options.inference import ChatOptions
from llmcli.options.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, stop=("\nuser:",))


@pytest.fixture(scope="module")
def loaded(lora_run):
    return load_checkpoint(lora_run)


def alone(loaded, messages) -> str:
    """The greedy reply to `messages` laid out by the default template, generated directly."""
    model, tokenizer = loaded.model, loaded.tokenizer
    generator = Generator(model, tokenizer, max_batch_size=1)
    ids = encode_prompt(tokenizer, ChatTemplate().render(messages))
    return generator.generate([ids], GREEDY)[0].completion


@pytest.mark.slow
def test_chat_scripted_through_stdin(cli, lora_run, loaded):
    script = "say dog\nsay fox\n/reset\nsay dog\n/system be brief\nsay dog\n/exit\nsay lazy\n"
    result = cli("chat", lora_run, "--temperature", "0", "-n", "10", input=script)
    assert result.exit_code == 0, result.output
    first = alone(loaded, [("user", "say dog")])
    expected = [first,
                alone(loaded, [("user", "say fox")]),  # context 32: the first turn left the history to fit
                first,  # /reset forgot the first turns
                alone(loaded, [("system", "be brief"), ("user", "say dog")])]  # /exit: "say lazy" is never read
    assert result.stdout == "".join(lines(r) for r in expected)
    assert "history cleared" in result.stderr


def lines(reply: str) -> str:
    return reply if reply.endswith("\n") else reply + "\n"


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_not_the_session(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer

    class Interrupting(io.StringIO):
        """Ctrl-C while the first reply streams."""
        interrupted = False

        def write(self, text):
            if not self.interrupted and text.strip():
                self.interrupted = True
                raise KeyboardInterrupt
            return super().write(text)

    out = Interrupting()
    opts = ChatOptions(run_dir=loaded.directory, sampling=GREEDY)
    generator = Generator(model, tokenizer, max_batch_size=1)
    replies = run_chat(generator, ChatTemplate(), opts, io.StringIO("say dog\nsay dog\n"), out)
    assert replies == 2 and out.interrupted
    assert out.getvalue().endswith(lines(alone(loaded, [("user", "say dog")])))
    assert not generator.has_work()


def test_template_that_raises_is_one_line(cli, one_line_error, tmp_path, make_model, char_tokenizer, write_run):
    run = write_run(tmp_path / "run", make_model(char_tokenizer.get_vocab_size(), block_size=32), char_tokenizer)
    raising = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages here') }}{% endif %}x"
    (run / "tokenizer_config.json").write_text(json.dumps({"chat_template": raising}))
    one_line_error(cli("chat", run, "--system", "Be brief.", input="hello\n"),
                   "chat_template raised an error: no system messages here")
    one_line_error(cli("chat", run, input="/nonsense\n"), "unknown command /nonsense")
