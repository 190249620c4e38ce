"""The command table: each command's flags and help come from its options dataclass, and a bad
option value is one line naming the flag."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from llmcli.cli import COMMANDS, _typer_function
from llmcli.errors import FieldError
from llmcli.options.fields import flag_names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c.name))
def test_every_option_comes_from_the_dataclass(command, cli):
    params = inspect.signature(_typer_function(command)).parameters
    flags = flag_names(command.options)
    assert set(params) == set(flags)  # nothing declared here that the dataclass does not declare
    result = cli(*command.name, "--help")
    assert result.exit_code == 0, result.output
    help_text = " ".join(result.stdout.split())
    first_line = inspect.getdoc(command.options).splitlines()[0]
    assert " ".join(first_line.split()) in help_text
    for name, flag in flags.items():
        assert flag in help_text, (name, flag)


def test_defaults_are_the_dataclass_defaults():
    for command in COMMANDS:
        for f in dataclasses.fields(command.options):
            if f.metadata.get("nested"):
                continue
            param = inspect.signature(_typer_function(command)).parameters[f.name]
            if f.default is not dataclasses.MISSING and f.metadata["cli"].convert is None:
                assert param.default.default == f.default, (command.name, f.name)


def test_a_field_error_is_rendered_with_the_flag(monkeypatch, cli, one_line_error):
    def fails(opts):
        raise FieldError("batch_size", "must be at least 1; got 0")

    monkeypatch.setattr("llmcli.evaluate.eval_command", fails)
    one_line_error(cli("eval", "somewhere"), "--batch-size must be at least 1; got 0", alone=True)


def test_bad_values_are_caught_when_the_options_are_built(cli, one_line_error):
    one_line_error(cli("generate", "somewhere", "x", "--top-p", "0"), "--top-p must be in (0, 1]; got 0.0",
                   alone=True)
    one_line_error(cli("serve", "somewhere", "--port", "70000"), "--port must be in 0..65535", alone=True)


def test_version_and_help(cli):
    assert cli("--version").stdout.startswith("llmcli ")
    result = cli("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command.name[0] in result.stdout


def test_flags_show_no_value_placeholder_and_completion_is_on(cli):
    for args in (["--help"], ["generate", "--help"], ["train", "--help"]):
        result = cli(*args)
        assert result.exit_code == 0 and "<bool>" not in result.stdout, args
    assert "--install-completion" in cli("--help").stdout
