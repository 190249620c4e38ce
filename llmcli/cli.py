"""The `llmcli` command line. Each command parses its options and calls into the package."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup

from llmcli import __version__
from llmcli.errors import UserError

DEBUG_ENV = "LLMCLI_DEBUG"


class _Group(TyperGroup):
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
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _make_app(help: str) -> typer.Typer:
    return typer.Typer(cls=_Group, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, rich_markup_mode="markdown")


app = _make_app("Train, evaluate, sample from, quantize and serve transformer language models.")
data_app = _make_app("Prepare corpora into cached token arrays.")
tokenizer_app = _make_app("Train tokenizers.")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see configs/).",
                         dir_okay=False)
OverridesArg = typer.Argument(None, metavar="[OVERRIDES]...",
                              help="section.key=value pairs applied over the config, "
                                   "e.g. train.max_steps=50 model.n_layer=2.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


@data_app.command("prepare")
def data_prepare(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
    force: bool = typer.Option(False, "--force", help="Re-tokenize even if a cached copy exists."),
) -> None:
    """Load a corpus, train or load its tokenizer, and cache one token array per split.

    Examples:

      llmcli data prepare                                  # Shakespeare, char tokenizer

      llmcli data prepare -c configs/shakespeare-bpe.yaml

      llmcli data prepare data.source=notes/ tokenizer.kind=bpe tokenizer.vocab_size=2048
    """
    from llmcli.config import load_config
    from llmcli.data import prepare_data, print_summary

    cfg = load_config(config, overrides or [])
    prepared = prepare_data(cfg, force=force)
    print_summary(prepared)


@tokenizer_app.command("train")
def tokenizer_train(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write tokenizer.json."),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Train a tokenizer (tokenizer.kind=char|bpe) on the corpus's training split.

    Examples:

      llmcli tokenizer train --out tok.json tokenizer.kind=bpe tokenizer.vocab_size=8192

      llmcli tokenizer train -c configs/shakespeare-bpe.yaml --out tok.json
    """
    from llmcli.config import load_config
    from llmcli.data import train_tokenizer_for_config

    cfg = load_config(config, overrides or [])
    train_tokenizer_for_config(cfg, out, overwrite=overwrite)


@app.command("train")
def train_cmd(
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to create."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory "
                                          "exactly where its last checkpoint left off.",
                                          file_okay=False),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Fine-tune: start from this "
                                             "checkpoint's weights, model and tokenizer.",
                                             file_okay=False),
) -> None:
    """Train a model; checkpoints, metrics and the effective config go to the run directory.

    Works unchanged under `torchrun --nproc_per_node N -m llmcli train ...` and `accelerate launch`.

    Examples:

      llmcli train -c configs/tiny.yaml --out runs/tiny

      llmcli train -c configs/shakespeare-char.yaml --out runs/char train.max_minutes=5

      llmcli train --resume runs/char train.max_steps=4000      # continue, with more steps

      llmcli train --init-from runs/gpt2 --out runs/ft data.source=notes/ train.lr=1e-4
    """
    from llmcli.config import load_config
    from llmcli.train import init_from_config, print_summary, resume_config, train

    if resume is not None:
        if init_from is not None:
            raise UserError("--init-from starts a new run; --resume continues one (use one of them)")
        if out is not None and out.resolve() != resume.resolve():
            raise UserError("--out and --resume name different directories; --resume continues in place")
        cfg = resume_config(resume, config, overrides or [])
        summary = train(cfg, resume, resume=True)
    else:
        if out is None:
            raise UserError("missing --out RUN_DIR (or --resume RUN_DIR to continue a run)")
        if init_from is not None:
            cfg = init_from_config(init_from, config, overrides or [])
        else:
            cfg = load_config(config, overrides or [])
        summary = train(cfg, out, overwrite=overwrite, init_from=init_from)
    if summary:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print_summary(summary)


@app.command("eval")
def eval_cmd(
    targets: list[str] = typer.Argument(..., metavar="RUN_DIR [RUN_DIR|OVERRIDE]",
                                        help="Run or checkpoint directories (a run dir, or its best/ or "
                                             "last/), then optional data.key=value overrides."),
    split: str = typer.Option("val", "--split", help="Which split of the data to score (val, test, train)."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", dir_okay=False,
                                             help="Score this UTF-8 text file instead of a split."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", dir_okay=False,
                                          help="Take the data settings from this YAML config instead of "
                                               "the checkpoint's own config.yaml."),
    stride: Optional[int] = typer.Option(None, "--stride",
                                         help="How far the window of block_size tokens advances; each "
                                              "window scores only the tokens the previous one did not, so "
                                              "every token is scored once with at least block_size-stride+1 "
                                              "tokens of context (after the first window). Default: "
                                              "block_size/2; block_size = disjoint blocks."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Windows per forward pass."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per checkpoint, one per line."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 weights."),
) -> None:
    """Score checkpoints on held-out text: loss, perplexity, top-1/top-5 accuracy, bits per byte.

    By default each checkpoint is scored on the val split of the data it was trained on (its own
    config.yaml, tokenized with its own tokenizer; prepared arrays are cached). Every token is
    scored exactly once, including each document's first (predicted after <|endoftext|>). Bits per
    byte = total loss / ln 2 / UTF-8 bytes of the text, comparable across tokenizers. Several
    checkpoints give one comparison table.

    Examples:

      llmcli eval runs/char

      llmcli eval runs/char runs/bpe --split test data.test_fraction=0.1

      llmcli eval runs/char/best --text-file notes.txt --stride 64 --json
    """
    from llmcli.evaluate import evaluate_checkpoint, print_results, split_targets

    paths, overrides = split_targets(targets)
    if not paths:
        raise UserError("missing RUN_DIR: name at least one run or checkpoint directory")
    if text_file is not None and (overrides or config is not None):
        raise UserError("--text-file scores a file; data overrides and --config do not apply")
    results = [evaluate_checkpoint(path, split=split, text_file=text_file, config_path=config,
                                   overrides=overrides, stride=stride, batch_size=batch_size,
                                   device=device, dtype=dtype)
               for path in paths]
    print_results(results, json_lines=json_out)


@app.command("generate")
def generate_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run or checkpoint directory."),
    prompt: Optional[str] = typer.Argument(None, metavar="[PROMPT]",
                                           help="Text to continue. \"\" starts from <|endoftext|> (a new "
                                                "document). Without it: --prompt-file, else stdin."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", dir_okay=False,
                                               help="Read the prompt from this UTF-8 file."),
    lines: bool = typer.Option(False, "--lines", help="Each non-blank line of the input is a prompt."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy (always the most likely)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k most likely tokens only (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus: the smallest set of tokens with probability "
                                                     ">= p, in (0, 1] (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens less likely than min-p x the most likely "
                                                     "one, in [0, 1] (0 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty",
                                             help="> 1 discourages tokens already in the prompt or output "
                                                  "(1 = off)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop before this text (repeatable; "
                                                                  "\\n and \\t are understood)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible samples (sample j of "
                                                            "each prompt uses seed+j)."),
    num_samples: int = typer.Option(1, "--num-samples", "-s", help="Samples per prompt."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Sequences generated at once."),
    ignore_eot: bool = typer.Option(False, "--ignore-eot", help="Keep going past <|endoftext|>."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per sample, one per line."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print each sample when complete."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype",
                              help="auto (bfloat16 on a GPU, else float32), float32, bfloat16, float16."),
) -> None:
    """Continue a prompt with a trained model, streaming the text as it is produced.

    Generation stops at <|endoftext|>, at a --stop string (cut exactly before it) or after
    --max-new-tokens. A prompt longer than the context window keeps its last block_size tokens (with
    a warning); past the window, generation slides on: the slot is refilled with the last
    block_size/2 tokens and continues. Prompts and samples run batched; a seeded sample is the same
    whatever else runs in the batch.

    Examples:

      llmcli generate runs/char "ROMEO:" -n 200

      llmcli generate runs/char "" --temperature 0 --stop "\\n\\n"

      llmcli generate runs/bpe -f prompts.txt --lines --num-samples 3 --seed 1 --json
    """
    from llmcli.generate import SamplingParams, read_prompts, run_generate, unescape

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                            stop=tuple(unescape(s) for s in stop or ()), ignore_eot=ignore_eot)
    params.validate()
    prompts = read_prompts(prompt, prompt_file, lines)
    run_generate(run_dir, prompts, params, num_samples=num_samples, batch_size=batch_size,
                 json_lines=json_out, stream=not no_stream, device=device, dtype=dtype)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR",
                                   help="Run or checkpoint directory (a run dir exports its final "
                                   "weights; name its best/ for the best ones)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    format: str = typer.Option("hf", "--format", help="Output format: hf (Hugging Face transformers)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Export a quantized checkpoint as float weights."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights to write: auto (as stored), float32, "
                              "bfloat16 or float16."),
) -> None:
    """Write a checkpoint as a Hugging Face model folder (GPT2LMHeadModel or LlamaForCausalLM).

    The folder loads with transformers' AutoModelForCausalLM and AutoTokenizer.from_pretrained.

    Examples:

      llmcli export runs/tiny --format hf --out exported/tiny

      llmcli export runs/llama/best --out exported/llama --dtype bfloat16 --overwrite
    """
    from llmcli.hf import export_hf, print_export

    if format != "hf":
        raise UserError(f"--format must be hf (Hugging Face transformers); got {format!r}")
    print_export(export_hf(run_dir, out, overwrite=overwrite, dequantize=dequantize, dtype=dtype))


@app.command("import")
def import_cmd(
    source: str = typer.Argument(..., metavar="SOURCE",
                                 help="A local Hugging Face model folder, or a hub id (gpt2, owner/name)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to create."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights to store: float32, bfloat16, float16 "
                              "or auto (as in the source)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Use this tokenizer.json instead "
                                             "of the source's.", dir_okay=False),
) -> None:
    """Turn a GPT2LMHeadModel / LlamaForCausalLM folder or hub id into an llmcli checkpoint.

    The result works with eval, generate and quantize like a trained run.

    Examples:

      llmcli import exported/tiny --out runs/tiny-again

      llmcli import openai-community/gpt2 --out runs/gpt2      # downloads from the hub
    """
    from llmcli.hf import import_hf, print_import

    print_import(import_hf(source, out, overwrite=overwrite, dtype=dtype, tokenizer=tokenizer))


@app.command("quantize")
def quantize_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run or checkpoint directory (a run dir "
                                   "quantizes its final weights; name its best/ for the best ones)."),
    method: str = typer.Option(..., "--method", "-m", help="int8 (per-channel weights, dynamic int8 "
                               "activations on CPU) or int4 (group-wise weights, two per byte)."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory to write."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="int4 only: input columns "
                                             "per scale, 32, 64 or 128 (default 64)."),
    include_embeddings: bool = typer.Option(False, "--include-embeddings",
                                            help="Also quantize the token embedding table (and a tied "
                                                 "LM head with it); otherwise they stay float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
    eval_tokens: int = typer.Option(32768, "--eval-tokens", help="Val tokens to measure perplexity on "
                                    "before and after (0 = skip)."),
    decode_tokens: int = typer.Option(64, "--decode-tokens", help="Greedy tokens to time decoding with "
                                      "before and after (0 = skip)."),
) -> None:
    """Quantize a model's weights to int8 or int4 into a new, smaller checkpoint.

    The result is an ordinary checkpoint directory (integer weights + scales in model.safetensors)
    that eval, generate and serve load like any other. A table compares the file size, val
    perplexity and batch-1 decode speed of the float32 and quantized models, measured in this run.

    Examples:

      llmcli quantize runs/char --method int8 --out runs/char-int8

      llmcli quantize runs/char/best --method int4 --group-size 32 --out runs/char-int4

      llmcli quantize runs/gpt2 --method int8 --include-embeddings --out runs/gpt2-int8 --eval-tokens 0
    """
    from llmcli import ui
    from llmcli.quantize import print_report, quantize_checkpoint

    report = quantize_checkpoint(run_dir, out, method=method, group_size=group_size,
                                 include_embeddings=include_embeddings, overwrite=overwrite,
                                 eval_tokens=eval_tokens, decode_tokens=decode_tokens, log=ui.log)
    print_report(report)


@app.command("serve")
def serve_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run or checkpoint directory (float or "
                                   "quantized)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. 127.0.0.1 = this machine "
                             "only; 0.0.0.0 = every interface (set an API key then)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on (0 = any free port)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLMCLI_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on every request "
                                               "except GET /health. Prefer the environment variable: "
                                               "a command line is visible to other users."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", "-b", help="Sequences decoded together; "
                                       "each has a KV-cache slot of the model's full context."),
    max_queue: int = typer.Option(64, "--max-queue", help="Sequences that may wait for a slot; beyond "
                                  "that requests get 429."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model id clients use "
                                             "(default: the run directory's name)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", dir_okay=False,
                                                 help="JSON file laying chat messages out as a prompt "
                                                      "(see above)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype",
                              help="auto (bfloat16 on a GPU, else float32), float32, bfloat16, float16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the model (default: "
                                          "PyTorch's, one per core). Fewer leave a core for the HTTP "
                                          "side; small models run fastest on 1."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with continuous batching and streaming.

    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream=true gives
    server-sent events), GET /health. Requests join and leave the running batch at every step;
    greedy output is the same as `llmcli generate` whatever else runs. Beyond OpenAI's options:
    top_k, min_p, repetition_penalty, ignore_eos. A prompt longer than the context keeps its last
    block_size tokens. Ctrl-C stops taking requests (503) and lets running ones finish for a few
    seconds.

    Our models are base models, not chat-tuned: /v1/chat/completions lays the messages out as
    "{role}: {content}\\n" each, then "assistant:", and stops at "\\nuser:". A --chat-template
    file is JSON with any of: "prefix", "message" (e.g. "{role}: {content}\\n"), "roles" (a
    format per role), "generation_prompt", "stop" (a list); formats use {role} and {content}.

    Examples:

      llmcli serve runs/char

      LLMCLI_API_KEY=secret llmcli serve runs/char-int8 --host 0.0.0.0 --port 8080

      curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 50}'
    """
    from llmcli.serve import run_server

    run_server(run_dir, host=host, port=port, api_key=api_key, max_batch_size=max_batch_size,
               max_queue=max_queue, model_name=model_name, chat_template=chat_template, device=device,
               dtype=dtype, threads=threads)


def main() -> None:
    app(prog_name="llmcli")
