"""The `llmcli` command line: a table of commands, each an options dataclass and the function that runs it.

The options (flags, help, defaults, checks) are declared once, in the llmcli/options/ package; this module
turns each dataclass into a Typer command whose help is the dataclass's docstring, builds the
options object from what was typed and hands it to the package. It imports no torch, so `--help`
and completion stay fast; a command's module is imported only when it runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable
from typing import Any

import click
import typer
from typer.core import TyperCommand, TyperGroup

from llmcli import __version__
from llmcli.errors import FieldError, UserError
from llmcli.options.checkpoints import (
    ExportOptions,
    ImportOptions,
    MergeOptions,
    PruneOptions,
    QuantizeOptions,
)
from llmcli.options.env import EnvOptions
from llmcli.options.fields import Options, Spec, flag_names
from llmcli.options.inference import ChatOptions, EmbedOptions, EvalOptions, GenerateOptions, ServeOptions
from llmcli.options.insight import AttentionOptions, InspectOptions, PlotOptions
from llmcli.options.recipes import RecipeCopyOptions, RecipeShowOptions, RecipesOptions
from llmcli.options.training import DistillOptions, PrepareOptions, TokenizerTrainOptions, TrainOptions

DEBUG_ENV = "LLMCLI_DEBUG"


@dataclasses.dataclass(frozen=True)
class Command:
    name: tuple[str, ...]  # ("train",) or ("data", "prepare"); a group's own name: what it does alone
    options: type[Options]
    run: str  # "module:function", called with the options object


COMMANDS = (
    Command(("data", "prepare"), PrepareOptions, "llmcli.data.tasks:prepare_command"),
    Command(("tokenizer", "train"), TokenizerTrainOptions, "llmcli.data.tasks:tokenizer_command"),
    Command(("train",), TrainOptions, "llmcli.train.loop:train_command"),
    Command(("eval",), EvalOptions, "llmcli.evaluate:eval_command"),
    Command(("generate",), GenerateOptions, "llmcli.generate.run:generate_command"),
    Command(("export",), ExportOptions, "llmcli.export:export_command"),
    Command(("import",), ImportOptions, "llmcli.hf.importer:import_command"),
    Command(("quantize",), QuantizeOptions, "llmcli.quantize.command:quantize_command"),
    Command(("prune",), PruneOptions, "llmcli.prune.command:prune_command"),
    Command(("distill",), DistillOptions, "llmcli.distill:distill_command"),
    Command(("serve",), ServeOptions, "llmcli.serve.server:serve_command"),
    Command(("attention",), AttentionOptions, "llmcli.insight.attention:attention_command"),
    Command(("plot",), PlotOptions, "llmcli.insight.curves:plot_command"),
    Command(("inspect",), InspectOptions, "llmcli.insight.inspect_run:inspect_command"),
    Command(("merge",), MergeOptions, "llmcli.merge:merge_command"),
    Command(("chat",), ChatOptions, "llmcli.generate.chat:chat_command"),
    Command(("embed",), EmbedOptions, "llmcli.embed:embed_command"),
    Command(("recipes",), RecipesOptions, "llmcli.recipes.command:recipes_command"),
    Command(("recipes", "show"), RecipeShowOptions, "llmcli.recipes.command:show_command"),
    Command(("recipes", "copy"), RecipeCopyOptions, "llmcli.recipes.command:copy_command"),
    Command(("env",), EnvOptions, "llmcli.env:env_command"),
)
# A group's help; None: the help of the group's own command (`llmcli recipes` alone lists them).
GROUPS = {"data": "Prepare corpora into cached token arrays.", "tokenizer": "Train tokenizers.", "recipes": None}


class _Flags:
    """Flags take no value: help shows none (typer would print <bool> for --help, completion...)."""

    def get_params(self, ctx: click.Context):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class _Command(_Flags, TyperCommand):
    pass


class _Group(_Flags, TyperGroup):
    """Turns user errors into one line on stderr and exit code 2 (a traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            click.echo(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), err=True)
            sys.exit(2)
        except (MemoryError, RuntimeError) as exc:  # torch's OutOfMemoryError is a RuntimeError
            if os.environ.get(DEBUG_ENV) or not _out_of_memory(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            click.echo(f"error: out of memory ({first}); use a smaller model, batch or context", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "out of memory" in text or "can't allocate memory" in text


def _make_app(help: str, completion: bool = False, no_args_is_help: bool = True) -> typer.Typer:
    return typer.Typer(cls=_Group, help=help, no_args_is_help=no_args_is_help, add_completion=completion,
                       pretty_exceptions_enable=False, rich_markup_mode="markdown")


# --------------------------------------------------------------------------------------------
# Options dataclass -> Typer command


def _leaves(cls: type) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path of nested field names, field, type) of every command-line field, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            out += [((f.name, *path), leaf, hint) for path, leaf, hint in _leaves(f.default_factory)]
        else:
            out.append(((f.name,), f, hints[f.name]))
    return out


def _parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    spec: Spec = f.metadata["cli"]
    default = ... if f.default is dataclasses.MISSING else f.default
    if spec.convert is not None:
        default = None if default is not ... else default
    if spec.argument:
        info = typer.Argument(default, metavar=spec.metavar, help=spec.help, **spec.typer)
    else:
        metavar = "" if hint is bool else spec.metavar  # a flag takes no value: show none
        info = typer.Option(default, *spec.flags, help=spec.help, metavar=metavar, **spec.typer)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=spec.cli_type or hint)


def _build(cls: type, values: dict[str, Any]) -> Any:
    """The options object from the parsed values (nested groups built first)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            kwargs[f.name] = _build(f.default_factory, values)
        else:
            spec: Spec = f.metadata["cli"]
            value = values[f.name]
            kwargs[f.name] = spec.convert(value) if spec.convert is not None else value
    return cls(**kwargs)


def _runner(path: str) -> Callable[[Any], None]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _typer_function(command: Command) -> Callable[..., None]:
    leaves = _leaves(command.options)
    flags = flag_names(command.options)

    def run(**values: Any) -> None:
        try:
            opts = _build(command.options, values)
            _runner(command.run)(opts)
        except FieldError as exc:
            raise UserError(exc.render(lambda name: flags.get(name, name))) from None

    params = [_parameter(f, hint) for _, f, hint in leaves]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = inspect.getdoc(command.options)
    run.__name__ = "_".join(command.name)
    return run


def _group_action(command: Command) -> Callable[..., None]:
    """A group's own command (`llmcli recipes`), run only when no subcommand follows."""
    run = _typer_function(command)

    def action(ctx: typer.Context, **values: Any) -> None:
        if ctx.invoked_subcommand is None:
            run(**values)

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    action.__signature__ = inspect.Signature([context, *inspect.signature(run).parameters.values()])  # type: ignore[attr-defined]
    action.__doc__ = run.__doc__
    return action


def build_app() -> typer.Typer:
    app = _make_app("Train, evaluate, sample from, quantize and serve language models.", completion=True)
    acting = {c.name[0]: inspect.getdoc(c.options) for c in COMMANDS if len(c.name) == 1 and c.name[0] in GROUPS}
    groups = {name: _make_app(help or acting[name], no_args_is_help=name not in acting)
              for name, help in GROUPS.items()}
    for name, group in groups.items():
        app.add_typer(group, name=name)
    for command in COMMANDS:
        *group, verb = command.name
        if not group and verb in groups:
            groups[verb].callback(invoke_without_command=True)(_group_action(command))
            continue
        target = groups[group[0]] if group else app
        target.command(verb, cls=_Command)(_typer_function(command))

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                     help="Print the version and exit."),
        debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    ) -> None:
        if debug:
            os.environ[DEBUG_ENV] = "1"

    return app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmcli {__version__}")
        raise typer.Exit()


app = build_app()


def main() -> None:
    # Idle OpenMP threads sleep instead of spinning, so a busy neighbour on the same cores slows a
    # run down gracefully instead of 4-9x (docs/training.md, "CPU threads"); read when torch loads, later.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(prog_name="llmcli")
