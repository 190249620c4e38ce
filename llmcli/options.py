"""Every option of every command, declared once.

Each command's options are a frozen dataclass: its fields (type, default, and `option()` /
`argument()` metadata: flags and help) are what `llmcli/cli.py` turns into the command line, and
the same object is what the package function receives, so no option is spelled twice. Range checks
live on the fields too and run when the object is built; they raise `FieldError` with the field's
name, which each boundary renders its own way (`--top-p` on the command line, `top_p` in an HTTP
body). This module imports nothing heavy: the CLI reads it to answer `--help` without torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmcli.errors import FieldError

API_KEY_ENV = "LLMCLI_API_KEY"
REQUIRED = dataclasses.MISSING  # an option() or argument() without a default must be given


# --------------------------------------------------------------------------------------------
# Declaring fields


@dataclass(frozen=True)
class Spec:
    """How one field appears on the command line."""

    flags: tuple[str, ...]  # e.g. ("--max-new-tokens", "-n"); () for a positional argument
    help: str
    argument: bool = False
    metavar: Optional[str] = None
    check: Optional[tuple[Callable[[Any], bool], str]] = None  # (value is fine, the rule in words)
    cli_type: Any = None  # the type Typer parses, when it differs from the field's
    convert: Optional[Callable[[Any], Any]] = None  # parsed value -> field value
    typer: dict = field(default_factory=dict)  # more typer.Option arguments (envvar, dir_okay...)


def option(default: Any = REQUIRED, *flags: str, help: str, check=None, cli_type=None,
           convert=None, metavar=None, **typer: Any) -> Any:
    """A `--flag` option; without `default` it is required."""
    spec = Spec(flags, help, check=check, cli_type=cli_type, convert=convert, metavar=metavar, typer=typer)
    return field(default=default, metadata={"cli": spec})


def argument(default: Any = REQUIRED, *, help: str, metavar: str | None = None,
             **typer: Any) -> Any:
    """A positional argument; without `default` it is required."""
    return field(default=default, metadata={"cli": Spec((), help, argument=True, metavar=metavar, typer=typer)})


def nested(cls: type) -> Any:
    """A group of options declared by another dataclass (its fields become this command's flags)."""
    return field(default_factory=cls, metadata={"nested": True})


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


AT_LEAST_ONE = (lambda v: _integer(v) and v >= 1, "at least 1")
NOT_NEGATIVE = (lambda v: _integer(v) and v >= 0, ">= 0")


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every options dataclass: checks each field's rule, then `check()` (cross-field)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            spec = f.metadata.get("cli")
            value = getattr(self, f.name)
            if spec is not None and spec.check is not None and value is not None:
                ok, rule = spec.check
                if not ok(value):
                    raise FieldError(f.name, f"must be {rule}; got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules between fields, or ones a single predicate cannot say; raise FieldError."""


def flag_names(cls: type) -> dict[str, str]:
    """Field name -> its long flag (or its metavar, for arguments), nested groups included."""
    names = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            names.update(flag_names(f.default_factory))  # type: ignore[arg-type]
            continue
        spec: Spec = f.metadata["cli"]
        longs = [flag for flag in spec.flags if flag.startswith("--")]
        names[f.name] = longs[0] if longs else (spec.metavar or f.name.upper())
    return names


# --------------------------------------------------------------------------------------------
# Sampling: one request's decoding settings (generate's flags, serve's request fields)


@dataclass(frozen=True, kw_only=True)
class SamplingParams(Options):
    """How one request is decoded; the engine applies them in the order of generate/sampling.py."""

    max_new_tokens: int = option(256, "--max-new-tokens", "-n", help="Tokens to generate at most.",
                                 check=(lambda v: _integer(v) and v >= 1, "a positive integer"))
    temperature: float = option(0.8, "--temperature", "-t", help="0 = greedy (always the most likely).",
                                check=(lambda v: _number(v) and v >= 0, ">= 0 (0 = greedy)"))
    top_k: int = option(0, "--top-k", help="Sample from the k most likely tokens only (0 = off).",
                        check=(lambda v: _integer(v) and v >= 0, "an integer >= 0 (0 = off)"))
    top_p: float = option(1.0, "--top-p", help="Nucleus: the smallest set of tokens with probability >= p, "
                                               "in (0, 1] (1 = off).",
                          check=(lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"))
    min_p: float = option(0.0, "--min-p", help="Drop tokens less likely than min-p x the most likely one, "
                                               "in [0, 1] (0 = off).",
                          check=(lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]"))
    repetition_penalty: float = option(1.0, "--repetition-penalty",
                                       help="Above 1 discourages tokens already in the prompt or output "
                                            "(1 = off).",
                                       check=(lambda v: _number(v) and v > 0, "> 0"))
    seed: Optional[int] = option(None, "--seed", help="Seed for reproducible samples (sample j of each prompt "
                                                      "uses seed+j).",
                                 check=(lambda v: _integer(v) and 0 <= v < 2**63, "an integer in [0, 2^63)"))
    stop: tuple[str, ...] = option((), "--stop", help="Stop before this text (repeatable; \\n and \\t are "
                                                      "understood).",
                                   cli_type=Optional[list[str]], convert=lambda items: tuple(map(unescape, items or ())))
    ignore_eot: bool = option(False, "--ignore-eot", help="Keep going past <|endoftext|>.")

    def check(self) -> None:
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) for s in self.stop):
            raise FieldError("stop", "must be a tuple of strings")
        if any(s == "" for s in self.stop):
            raise FieldError("stop", ": a stop string cannot be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True, kw_only=True)
class BeamOptions(Options):
    """Beam search (generate and eval)."""

    beams: int = option(1, "--beams", help="Beam search with N beams, keeping the best hypothesis (1 = off). "
                                           "Deterministic: temperature, top-k/p, min-p, the repetition penalty "
                                           "and the seed do not apply.", check=AT_LEAST_ONE)
    length_penalty: Optional[float] = option(None, "--length-penalty",
                                             help="Beam search: a hypothesis scores log-probability / length^p "
                                                  "(default 1; 0 = the plain sum; larger favours longer ones).",
                                             check=(_number, "a number"))
    early_stopping: bool = option(False, "--early-stopping", help="Beam search: stop as soon as N hypotheses "
                                                                  "ended (default: once no running beam can "
                                                                  "beat them).")

    def check(self) -> None:
        if self.beams == 1 and self.length_penalty is not None:
            raise FieldError("length_penalty", "applies to beam search only; add --beams N")
        if self.beams == 1 and self.early_stopping:
            raise FieldError("early_stopping", "applies to beam search only; add --beams N")


@dataclass(frozen=True, kw_only=True)
class SpeculationOptions(Options):
    """Speculative decoding: a proposer guesses tokens, the model verifies them in one forward."""

    draft: Optional[Path] = option(None, "--draft", help="Speculative decoding with this smaller model (same "
                                                         "tokenizer) proposing --draft-tokens at a time.",
                                   file_okay=False)
    draft_tokens: int = option(4, "--draft-tokens", help="Speculative decoding: tokens proposed per round.",
                               check=AT_LEAST_ONE)
    prompt_lookup: int = option(0, "--prompt-lookup", help="Speculative decoding without a draft: propose what "
                                                           "followed the latest earlier match of the last N "
                                                           "tokens (N-gram; 0 = off).", check=NOT_NEGATIVE)

    def check(self) -> None:
        if self.draft is not None and self.prompt_lookup:
            raise FieldError("prompt_lookup", "and --draft are two ways to speculate: give one")

    @property
    def enabled(self) -> bool:
        return self.draft is not None or self.prompt_lookup > 0


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed on a command line (e.g. in --stop) as the characters."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: table[m.group(1)], text)


# --------------------------------------------------------------------------------------------
# Shared option groups

DEVICE_HELP = "auto, cpu, cuda or cuda:N."
AUTO_DTYPE_HELP = "auto (bfloat16 on a GPU, else float32), float32, bfloat16, float16."


def _threads_option() -> Any:
    return option(None, "--threads", help="CPU threads for the model (default: one per core, fewer when other "
                                          "processes keep cores busy; see README). Small models run fastest "
                                          "on 1.", check=AT_LEAST_ONE)


def _config_option(help: str = "YAML config file (see configs/).") -> Any:
    return option(None, "--config", "-c", help=help, dir_okay=False)


def _overrides_argument() -> Any:
    return argument(None, metavar="[OVERRIDES]...",
                    help="section.key=value pairs applied over the config, e.g. train.max_steps=50 "
                         "model.n_layer=2.")


@dataclass(frozen=True, kw_only=True)
class ConfigOptions(Options):
    config: Optional[Path] = _config_option()
    overrides: Optional[list[str]] = _overrides_argument()


# --------------------------------------------------------------------------------------------
# The commands


@dataclass(frozen=True, kw_only=True)
class PrepareOptions(ConfigOptions):
    """Load a corpus, train or load its tokenizer, and cache one token array per split.

    Examples:

      llmcli data prepare                                  # Shakespeare, char tokenizer

      llmcli data prepare -c configs/shakespeare-bpe.yaml

      llmcli data prepare data.source=notes/ tokenizer.kind=bpe tokenizer.vocab_size=2048
    """

    force: bool = option(False, "--force", help="Re-tokenize even if a cached copy exists.")


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainOptions(ConfigOptions):
    """Train a tokenizer (tokenizer.kind=char|bpe) on the corpus's training split.

    Examples:

      llmcli tokenizer train --out tok.json tokenizer.kind=bpe tokenizer.vocab_size=8192

      llmcli tokenizer train -c configs/shakespeare-bpe.yaml --out tok.json
    """

    out: Path = option(REQUIRED, "--out", "-o", help="Where to write tokenizer.json.")
    overwrite: bool = option(False, "--overwrite", help="Replace an existing file.")


@dataclass(frozen=True, kw_only=True)
class TrainOptions(ConfigOptions):
    """Train a model; checkpoints, metrics and the effective config go to the run directory.

    Works unchanged under `torchrun --nproc_per_node N -m llmcli train ...` and `accelerate launch`.

    Examples:

      llmcli train -c configs/tiny.yaml --out runs/tiny

      llmcli train -c configs/shakespeare-char.yaml --out runs/char train.max_minutes=5

      llmcli train --resume runs/char train.max_steps=4000      # continue, with more steps

      llmcli train --init-from runs/gpt2 --out runs/ft data.source=notes/ train.lr=1e-4

      llmcli train --init-from runs/char --out runs/char-lora data.source=data/instructions.json
      data.format=alpaca train.lora.r=8 train.lora.targets=[q,v]   # a LoRA adapter (the base stays frozen)
    """

    out: Optional[Path] = option(None, "--out", "-o", help="Run directory to create.")
    resume: Optional[Path] = option(None, "--resume", help="Continue the run in this directory exactly where "
                                                           "its last checkpoint left off.", file_okay=False)
    overwrite: bool = option(False, "--overwrite", help="Replace a run already in --out.")
    init_from: Optional[Path] = option(None, "--init-from", help="Fine-tune: start from this checkpoint's "
                                                                 "weights, model and tokenizer.",
                                       file_okay=False)
    threads: Optional[int] = _threads_option()
    plot: bool = option(False, "--plot", help="Write curves.png (train and val loss) into the run directory "
                                              "at every evaluation.")


@dataclass(frozen=True, kw_only=True)
class EvalOptions(Options):
    """Score checkpoints on held-out text: loss, perplexity, top-1/top-5 accuracy, bits per byte.

    By default each checkpoint is scored on the val split of the data it was trained on (its own
    config.yaml, tokenized with its own tokenizer; prepared arrays are cached). Every token is
    scored exactly once, including each document's first (predicted after <|endoftext|>). Bits per
    byte = total loss / ln 2 / UTF-8 bytes of the text, comparable across tokenizers. Several
    checkpoints give one comparison table. A transformer reads the text through a sliding window
    of its context; a recurrent model (lstm, gru, rnn) reads it once, carrying its hidden state,
    so every token is predicted from all the text before it.

    A sequence-to-sequence model (encoder-decoder, gru-seq2seq, lstm-seq2seq) is scored on its
    pairs: loss, perplexity and token accuracy of the targets under teacher forcing, then on the
    outputs it decodes from each source (greedy, or --beams N): exact match, PER (token edit
    distance / reference tokens), WER (sources whose output matches none of their references),
    BLEU and chrF (sacrebleu). A source with several targets (a word's pronunciations) counts as
    correct when the output equals any of them; PER uses the closest. Pairs longer than the model
    takes are left out, with a warning.

    Examples:

      llmcli eval runs/char

      llmcli eval runs/lstm/best --split test --percent

      llmcli eval runs/char runs/bpe --split test data.test_fraction=0.1

      llmcli eval runs/char/best --text-file notes.txt --stride 64 --json

      llmcli eval runs/g2p/best runs/g2p-gru/best --split test --beams 4
      llmcli eval runs/char-lora --tasks data/tasks/shakespeare_plays.yaml     # lm-eval tasks

    With --tasks, EleutherAI's lm-evaluation-harness scores the checkpoints on its tasks instead: names
    it knows (--include-path adds a folder of task YAMLs) or YAML files; its own datasets are
    downloaded unless they are local files.
    """

    targets: list[str] = argument(metavar="RUN_DIR [RUN_DIR|OVERRIDE]",
                                  help="Run or checkpoint directories (a run dir, or its best/ or last/), then "
                                       "optional data.key=value overrides.")
    split: str = option("val", "--split", help="Which split of the data to score (val, test, train).")
    text_file: Optional[Path] = option(None, "--text-file", help="Score this UTF-8 text file instead of a split.",
                                       dir_okay=False)
    config: Optional[Path] = _config_option("Take the data settings from this YAML config instead of the "
                                            "checkpoint's own config.yaml.")
    stride: Optional[int] = option(None, "--stride",
                                   help="How far the window of block_size tokens advances; each window scores "
                                        "only the tokens the previous one did not, so every token is scored "
                                        "once with at least block_size-stride+1 tokens of context (after the "
                                        "first window). Default: block_size/2; block_size = disjoint blocks. "
                                        "Transformers only.")
    batch_size: Optional[int] = option(None, "--batch-size", "-b",
                                       help="Windows per forward pass (default 8; a recurrent model: batch-size x "
                                            "block_size tokens per forward); seq2seq: pairs per forward and "
                                            "sources decoded at once (default 64).", check=AT_LEAST_ONE)
    beam: BeamOptions = nested(BeamOptions)
    json_out: bool = option(False, "--json", help="One JSON object per checkpoint, one per line.")
    percent: bool = option(False, "--percent", help="Show accuracies as percentages (54.03% rather than 0.5403).")
    device: str = option("auto", "--device", help=DEVICE_HELP)
    dtype: str = option("float32", "--dtype", help="float32, bfloat16 or float16 weights.")
    threads: Optional[int] = _threads_option()
    tasks: Optional[str] = option(None, "--tasks", help="lm-eval tasks, comma-separated: task names or task "
                                                        "YAML files (instead of scoring text).")
    include_path: Optional[Path] = option(None, "--include-path", help="--tasks: a folder of more lm-eval "
                                                                       "task YAMLs.", file_okay=False)
    num_fewshot: Optional[int] = option(None, "--num-fewshot", help="--tasks: examples in each prompt (default: "
                                                                    "each task's own).", check=NOT_NEGATIVE)
    limit: Optional[int] = option(None, "--limit", help="--tasks: score only the first N documents of each "
                                                        "task; seq2seq: only the split's first N sources (all "
                                                        "their pairs).", check=AT_LEAST_ONE)

    def check(self) -> None:
        task_only = {"include_path": self.include_path, "num_fewshot": self.num_fewshot}
        for name, value in task_only.items():
            if value is not None and self.tasks is None:
                raise FieldError(name, "applies to --tasks only")
        if self.tasks is not None and not [t for t in self.tasks.split(",") if t.strip()]:
            raise FieldError("tasks", "names no task")
        if self.tasks is not None and self.text_file is not None:
            raise FieldError("text_file", "scores a file; --tasks scores lm-eval tasks (use one of them)")


@dataclass(frozen=True, kw_only=True)
class GenerateOptions(Options):
    """Continue a prompt with a trained model, streaming the text as it is produced.

    Generation stops at <|endoftext|>, at a --stop string (cut exactly before it) or after
    --max-new-tokens. A prompt longer than the context window keeps its last block_size tokens (with
    a warning); past the window, generation slides on: the slot is refilled with the last
    block_size/2 tokens and continues. Prompts and samples run batched; a seeded sample is the same
    whatever else runs in the batch.

    A sequence-to-sequence model maps each prompt (its source) to a target and prints the target
    alone, one line per source; a source longer than its encoder takes is refused. --beams N runs
    beam search (for any model); with --num-samples K <= N it prints the K best hypotheses.

    Speculative decoding (--draft RUN, a smaller model with the same tokenizer, or --prompt-lookup N)
    proposes several tokens and has the model verify them in one forward: greedy output is the same
    as without it, sampling keeps the model's distribution; --json reports each sample's acceptance
    rate. Each sequence then runs its rounds alone (a latency tool, not batched).

    Examples:

      llmcli generate runs/char "ROMEO:" -n 200

      llmcli generate runs/char "" --temperature 0 --stop "\\n\\n"

      llmcli generate runs/bpe -f prompts.txt --lines --num-samples 3 --seed 1 --json

      llmcli generate runs/g2p "shakespeare" --beams 4

      llmcli generate runs/char "ROMEO:" --temperature 0 --draft runs/char-small --json
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory.")
    prompt: Optional[str] = argument(None, metavar="[PROMPT]",
                                     help="Text to continue. \"\" starts from <|endoftext|> (a new document). "
                                          "Without it: --prompt-file, else stdin.")
    prompt_file: Optional[Path] = option(None, "--prompt-file", "-f", help="Read the prompt from this UTF-8 file.",
                                         dir_okay=False)
    lines: bool = option(False, "--lines", help="Each non-blank line of the input is a prompt.")
    sampling: SamplingParams = nested(SamplingParams)
    beam: BeamOptions = nested(BeamOptions)
    speculation: SpeculationOptions = nested(SpeculationOptions)
    num_samples: int = option(1, "--num-samples", "-s", help="Samples per prompt (with --beams: the best "
                                                              "hypotheses).", check=AT_LEAST_ONE)
    batch_size: int = option(8, "--batch-size", "-b", help="Sequences generated at once.", check=AT_LEAST_ONE)
    json_out: bool = option(False, "--json", help="One JSON object per sample, one per line.")
    no_stream: bool = option(False, "--no-stream", help="Print each sample when complete.")
    device: str = option("auto", "--device", help=DEVICE_HELP)
    dtype: str = option("auto", "--dtype", help=AUTO_DTYPE_HELP)
    threads: Optional[int] = _threads_option()

    def check(self) -> None:
        if self.speculation.enabled and self.beam.beams > 1:
            raise FieldError("beams", "and speculative decoding (--draft, --prompt-lookup) do not combine")
        if self.speculation.enabled and self.sampling.repetition_penalty != 1.0:
            raise FieldError("repetition_penalty", "does not combine with speculative decoding (it would change "
                                                   "between guesses)")
        if self.beam.beams > 1 and self.num_samples > self.beam.beams:
            raise FieldError("num_samples", f"must be at most --beams ({self.beam.beams}): beam search returns "
                                            "its best hypotheses")


@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    """Write a checkpoint as a Hugging Face model folder (GPT2LMHeadModel or LlamaForCausalLM).

    The folder loads with transformers' AutoModelForCausalLM and AutoTokenizer.from_pretrained.

    Examples:

      llmcli export runs/tiny --format hf --out exported/tiny

      llmcli export runs/llama/best --out exported/llama --dtype bfloat16 --overwrite
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory (a run dir exports its final "
                                                     "weights; name its best/ for the best ones).")
    out: Path = option(REQUIRED, "--out", "-o", help="Folder to write.")
    format: str = option("hf", "--format", help="Output format: hf (Hugging Face transformers).")
    overwrite: bool = option(False, "--overwrite", help="Replace an existing --out folder.")
    dequantize: bool = option(False, "--dequantize", help="Export a quantized checkpoint as float weights.")
    dtype: str = option("auto", "--dtype", help="Weights to write: auto (as stored), float32, bfloat16 or "
                                                "float16.")

    def check(self) -> None:
        if self.format != "hf":
            raise FieldError("format", f"must be hf (Hugging Face transformers); got {self.format!r}")


@dataclass(frozen=True, kw_only=True)
class ImportOptions(Options):
    """Turn a GPT2LMHeadModel / LlamaForCausalLM folder or hub id into an llmcli checkpoint.

    The result works with eval, generate and quantize like a trained run.

    Examples:

      llmcli import exported/tiny --out runs/tiny-again

      llmcli import openai-community/gpt2 --out runs/gpt2      # downloads from the hub
    """

    source: str = argument(metavar="SOURCE", help="A local Hugging Face model folder, or a hub id (gpt2, "
                                                  "owner/name).")
    out: Path = option(REQUIRED, "--out", "-o", help="Checkpoint directory to create.")
    overwrite: bool = option(False, "--overwrite", help="Replace an existing --out directory.")
    dtype: str = option("float32", "--dtype", help="Weights to store: float32, bfloat16, float16 or auto (as "
                                                   "in the source).")
    tokenizer: Optional[Path] = option(None, "--tokenizer", help="Use this tokenizer.json instead of the "
                                                                 "source's.", dir_okay=False)


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions(Options):
    """Quantize a model's weights to int8 or int4 into a new, smaller checkpoint.

    The result is an ordinary checkpoint directory (integer weights + scales in model.safetensors)
    that eval, generate and serve load like any other. A table compares the file size, val
    perplexity and batch-1 decode speed of the float32 and quantized models, measured in this run.

    Examples:

      llmcli quantize runs/char --method int8 --out runs/char-int8

      llmcli quantize runs/char/best --method int4 --group-size 32 --out runs/char-int4

      llmcli quantize runs/gpt2 --method int8 --include-embeddings --out runs/gpt2-int8 --eval-tokens 0
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory (a run dir quantizes its final "
                                                     "weights; name its best/ for the best ones).")
    method: str = option(REQUIRED, "--method", "-m", help="int8 (per-channel weights, dynamic int8 activations on "
                                                     "CPU) or int4 (group-wise weights, two per byte).")
    out: Path = option(REQUIRED, "--out", "-o", help="Checkpoint directory to write.")
    group_size: Optional[int] = option(None, "--group-size", "-g", help="int4 only: input columns per scale, 32, "
                                                                        "64 or 128 (default 64).")
    include_embeddings: bool = option(False, "--include-embeddings",
                                      help="Also quantize the token embedding table (and a tied LM head with "
                                           "it); otherwise they stay float32.")
    overwrite: bool = option(False, "--overwrite", help="Replace an existing --out directory.")
    eval_tokens: int = option(32768, "--eval-tokens", help="Val tokens to measure perplexity on before and after "
                                                           "(0 = skip).", check=NOT_NEGATIVE)
    decode_tokens: int = option(64, "--decode-tokens", help="Greedy tokens to time decoding with before and after "
                                                            "(0 = skip).", check=NOT_NEGATIVE)


PRUNE_METHODS = ("structured", "magnitude", "2:4")
FRACTION = (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class PruneOptions(Options):
    """Prune a model into a new, smaller checkpoint, and compare it with the original.

    structured (the default) removes whole attention heads (kv groups with GQA), MLP hidden units
    and recurrent hidden units, ranked by a gradient-based importance measured on a calibration
    sample of the run's own training data: a smaller dense model whose config gives its new shape.
    magnitude zeroes the smallest weights (torch.nn.utils.prune, over all layers or each layer
    alike), stored as values + bitmask. 2:4 keeps 2 of every 4 weights per row (CUDA only).
    --finetune-steps N then recovers quality with the ordinary training loop on the run's data
    (--out becomes a run directory: `llmcli train --resume OUT` continues it). The table compares
    parameters, file size, val perplexity, decode speed and greedy agreement, measured in this run.

    Examples:

      llmcli prune runs/char --heads 0.25 --mlp 0.3 --out runs/char-pruned

      llmcli prune runs/char --sparsity 0.3 --finetune-steps 300 --out runs/char-pruned-ft

      llmcli prune runs/lstm --hidden 0.25 --out runs/lstm-pruned

      llmcli prune runs/char --method magnitude --sparsity 0.5 --scope layer --out runs/char-50
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory to prune.")
    out: Path = option(REQUIRED, "--out", "-o", help="Checkpoint (or, with --finetune-steps, run) directory to write.")
    method: str = option("structured", "--method", "-m", help="structured, magnitude or 2:4.",
                         check=(lambda v: v in PRUNE_METHODS, f"one of {', '.join(PRUNE_METHODS)}"))
    sparsity: Optional[float] = option(None, "--sparsity", "-s", help="Share to remove: of every part's units "
                                                                      "(structured) or of the weights (magnitude).",
                                       check=FRACTION)
    heads: Optional[float] = option(None, "--heads", help="structured: share of attention heads to remove.",
                                    check=FRACTION)
    mlp: Optional[float] = option(None, "--mlp", help="structured: share of MLP hidden units to remove.",
                                  check=FRACTION)
    hidden: Optional[float] = option(None, "--hidden", help="structured: share of recurrent hidden units to "
                                                            "remove.", check=FRACTION)
    scope: str = option("global", "--scope", help="magnitude: global (one threshold over all layers) or layer "
                                                  "(each layer the same share).",
                        check=(lambda v: v in ("global", "layer"), "global or layer"))
    calibration_batches: int = option(8, "--calibration-batches", help="structured: training batches the "
                                                                       "importance is measured on.",
                                      check=AT_LEAST_ONE)
    finetune_steps: int = option(0, "--finetune-steps", help="Training steps after pruning (0 = none).",
                                 check=NOT_NEGATIVE)
    overwrite: bool = option(False, "--overwrite", help="Replace an existing --out directory.")
    eval_tokens: int = option(32768, "--eval-tokens", help="Val tokens to measure perplexity on (0 = skip).",
                              check=NOT_NEGATIVE)
    decode_tokens: int = option(64, "--decode-tokens", help="Greedy tokens to time decoding with (0 = skip).",
                                check=NOT_NEGATIVE)
    threads: Optional[int] = _threads_option()
    overrides: Optional[list[str]] = argument(None, metavar="[OVERRIDES]...",
                                              help="train.* settings for --finetune-steps, e.g. train.lr=1e-3.")

    def parts(self) -> dict[str, float]:
        """structured: the share to remove of each part (--sparsity fills in the parts not named)."""
        given = {"heads": self.heads, "mlp": self.mlp, "hidden": self.hidden}
        return {part: share for part, share in given.items() if share is not None}

    def check(self) -> None:
        if self.method == "structured":
            if self.sparsity is None and not any(self.parts().values()):
                raise FieldError("sparsity", "or --heads / --mlp / --hidden: say how much to remove")
        else:
            for name in ("heads", "mlp", "hidden"):
                if getattr(self, name) is not None:
                    raise FieldError(name, f"is for --method structured, not {self.method}")
        if self.method == "magnitude" and self.sparsity is None:
            raise FieldError("sparsity", "is needed with --method magnitude (the share of weights to zero)")
        if self.method == "2:4" and self.sparsity is not None:
            raise FieldError("sparsity", "does not apply to --method 2:4 (always 2 of every 4 weights)")
        if self.method != "structured" and self.finetune_steps:
            raise FieldError("finetune_steps", f"is for --method structured (training would fill the zeros of "
                                               f"--method {self.method} in again)")
        if self.overrides and not self.finetune_steps:
            raise FieldError("overrides", "apply to --finetune-steps; none was asked for")


@dataclass(frozen=True, kw_only=True)
class DistillOptions(ConfigOptions):
    """Train a student model (the config) with knowledge distillation from a teacher checkpoint.

    The loss on every batch is alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) +
    (1 - alpha) * cross-entropy(student, data), per token (padding left out), with T =
    distill.temperature and alpha = distill.alpha; both parts show in the progress and in
    metrics.jsonl. The teacher (any family, quantized too) runs without gradients on the same
    batches; it must share the student's tokenizer (and task). Everything else is `llmcli train`:
    checkpoints, several processes, exact --resume.

    Examples:

      llmcli distill --teacher runs/char -c configs/shakespeare-lstm.yaml --out runs/lstm-kd

      llmcli distill --teacher runs/char -c student.yaml --out runs/kd distill.alpha=0.9 distill.temperature=2

      llmcli distill --resume runs/kd train.max_steps=4000
    """

    teacher: Optional[Path] = option(None, "--teacher", help="The teacher: a run or checkpoint directory.")
    out: Optional[Path] = option(None, "--out", "-o", help="Run directory to create.")
    resume: Optional[Path] = option(None, "--resume", help="Continue the distillation run in this directory.",
                                    file_okay=False)
    overwrite: bool = option(False, "--overwrite", help="Replace a run already in --out.")
    threads: Optional[int] = _threads_option()


@dataclass(frozen=True, kw_only=True)
class ServeOptions(Options):
    """Serve a model over an OpenAI-compatible HTTP API, with continuous batching and streaming.

    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream=true gives
    server-sent events), GET /health. Requests join and leave the running batch at every step;
    greedy output is the same as `llmcli generate` whatever else runs. Beyond OpenAI's options:
    top_k, min_p, repetition_penalty, ignore_eos. A prompt longer than the context keeps its last
    block_size tokens. Ctrl-C stops taking requests (503) and lets running ones finish for a few
    seconds.

    /v1/chat/completions lays the messages out with the checkpoint's chat template (the Jinja
    chat_template of its tokenizer_config.json); base models without one get "{role}: {content}\\n"
    per message, then "assistant:", stopping at "\\nuser:". A --chat-template file is a .jinja template, or JSON with
    any of: "prefix", "message" (e.g. "{role}: {content}\\n"), "roles" (a format per role),
    "generation_prompt", "stop" (a list); formats use {role} and {content}.

    Examples:

      llmcli serve runs/char

      LLMCLI_API_KEY=secret llmcli serve runs/char-int8 --host 0.0.0.0 --port 8080

      curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 50}'

      llmcli serve runs/llama --engine vllm -- --tensor-parallel-size 2    # needs vllm and GPUs
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory (float or quantized).")
    host: str = option("127.0.0.1", "--host", help="Address to listen on. 127.0.0.1 = this machine only; "
                                                   "0.0.0.0 = every interface (set an API key then).")
    port: int = option(8000, "--port", "-p", help="Port to listen on (0 = any free port).",
                       check=(lambda v: _integer(v) and 0 <= v <= 65535, "in 0..65535"))
    api_key: Optional[str] = option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True,
                                    help="Require 'Authorization: Bearer KEY' on every request except GET "
                                         "/health. Prefer the environment variable: a command line is visible "
                                         "to other users.")
    max_batch_size: int = option(16, "--max-batch-size", "-b", help="Sequences decoded together; each has a "
                                                                    "KV-cache slot of the model's full context.",
                                 check=AT_LEAST_ONE)
    max_queue: int = option(64, "--max-queue", help="Sequences that may wait for a slot; beyond that requests "
                                                    "get 429.", check=(NOT_NEGATIVE[0], "0 or more"))
    model_name: Optional[str] = option(None, "--model-name", help="The model id clients use (default: the run "
                                                                  "directory's name).")
    chat_template: Optional[Path] = option(None, "--chat-template", help="A .jinja chat template or a JSON "
                                                                         "layout (see above) instead of the "
                                                                         "checkpoint's.", dir_okay=False)
    device: str = option("auto", "--device", help=DEVICE_HELP)
    dtype: str = option("auto", "--dtype", help=AUTO_DTYPE_HELP)
    threads: Optional[int] = _threads_option()
    engine: str = option("llmcli", "--engine", help="llmcli (this server) or vllm: export the checkpoint to a "
                                                    "Hugging Face folder (cached beside it) and run vLLM's OpenAI "
                                                    "server on it (GPUs, tensor parallelism, several machines).")
    vllm_args: Optional[list[str]] = argument(None, metavar="[-- VLLM_OPTIONS...]",
                                              help="--engine vllm: options passed to vLLM as they are, after --.")

    def check(self) -> None:
        if self.engine not in ("llmcli", "vllm"):
            raise FieldError("engine", f"must be llmcli or vllm; got {self.engine!r}")
        if self.vllm_args and self.engine != "vllm":
            raise FieldError("vllm_args", f"only go to --engine vllm; got {' '.join(self.vllm_args)!r}")
        if self.engine == "vllm" and self.chat_template is not None and self.chat_template.suffix != ".jinja":
            raise FieldError("chat_template", "must be a .jinja template with --engine vllm (vLLM reads no JSON "
                                              "layouts)")
        if self.engine == "vllm" and (self.threads is not None or self.device != "auto"):
            raise FieldError("engine", "vllm chooses its own devices and threads: drop --device/--threads (use "
                                       "CUDA_VISIBLE_DEVICES, or vLLM's options after --)")
        if self.model_name is not None and not self.model_name:
            raise FieldError("model_name", "cannot be empty")
        if self.api_key is not None and not self.api_key.strip():
            raise FieldError("api_key", f"/ {API_KEY_ENV} is empty")


@dataclass(frozen=True, kw_only=True)
class MergeOptions(Options):
    """Fold a LoRA run's adapter into its base: an ordinary checkpoint every command (and export) reads.

    The adapter run keeps pointing at its base; the merged checkpoint stands alone. A quantized base is
    dequantized first, so the result is float (quantize it again with llmcli quantize).

    Examples:

      llmcli merge runs/char-lora --out runs/char-merged

      llmcli merge runs/char-lora/best --out runs/char-merged --dtype bfloat16 --overwrite
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="An adapter run or checkpoint directory (train.lora).")
    out: Path = option(REQUIRED, "--out", "-o", help="Checkpoint directory to write.")
    overwrite: bool = option(False, "--overwrite", help="Replace an existing --out directory.")
    dtype: str = option("float32", "--dtype", help="Weights to store: float32, bfloat16 or float16.")


@dataclass(frozen=True, kw_only=True)
class ChatOptions(Options):
    """Chat with a model in the terminal: multi-turn, streamed, laid out by its chat template.

    Each line you type is a user message; the reply streams as it is produced. The history stays
    within the context window (the oldest turns leave first). Commands: /reset (forget the history),
    /system TEXT (set the system message and reset), /exit (or Ctrl-D). Ctrl-C stops a reply, not the
    session. With stdin from a pipe, every line is a message and each reply is printed on its own.

    Examples:

      llmcli chat runs/char-lora

      llmcli chat runs/char-lora --system "Answer briefly." --temperature 0

      printf 'Which play has OPHELIA?\\n' | llmcli chat runs/char-lora --temperature 0
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory (adapter runs too).")
    system: Optional[str] = option(None, "--system", help="A system message to start the conversation with.")
    chat_template: Optional[Path] = option(None, "--chat-template", help="Lay the conversation out with this "
                                                                         ".jinja template or JSON layout "
                                                                         "instead of the checkpoint's.",
                                           dir_okay=False)
    sampling: SamplingParams = nested(SamplingParams)
    device: str = option("auto", "--device", help=DEVICE_HELP)
    dtype: str = option("auto", "--dtype", help=AUTO_DTYPE_HELP)


# --------------------------------------------------------------------------------------------
# Seeing inside: attention maps, training curves, a run's summary (llmcli/insight/)

PICTURE_HELP = "(.png, .svg or .pdf)"


@dataclass(frozen=True, kw_only=True)
class AttentionOptions(Options):
    """Draw a model's attention weights on TEXT: heatmaps with the tokens on both axes.

    The weights come from one real forward pass of the model (its attention computed step by step
    so the softmax is kept; the logits are the same). By default every layer x head is drawn (a
    row per layer); --layer and --head pick one, --aggregate combines each layer's heads. Without
    --out or --json a shaded view prints in the terminal (up to 32 tokens). Layers and heads
    count from 0. For a sequence-to-sequence model TEXT is the source and the target is the
    model's own greedy output (to its end token, or N tokens with --generate N): encoder and
    decoder self-attention, and cross-attention (target tokens down, source tokens across).

    Examples:

      llmcli attention runs/char "ROMEO: What light" --out attention.png

      llmcli attention runs/char "To be, or not" --layer 3 --head 1

      llmcli attention runs/char "JULIET:" --generate 20 --aggregate mean --out gen.png

      llmcli attention runs/char "Hello" --json

      llmcli attention runs/g2p "shakespeare" --layer 1 --aggregate mean --out g2p.png
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory.")
    text: str = argument(metavar="TEXT", help="The text to run through the model.")
    out: Optional[Path] = option(None, "--out", "-o", help=f"Write the heatmaps to this picture {PICTURE_HELP}.")
    layer: Optional[int] = option(None, "--layer", "-l", help="Only this layer (from 0).", check=NOT_NEGATIVE)
    head: Optional[int] = option(None, "--head", help="Only this head of each layer (from 0).", check=NOT_NEGATIVE)
    aggregate: Optional[str] = option(None, "--aggregate", "-a", help="Combine each layer's heads: mean or max.")
    generate: int = option(0, "--generate", "-g", help="First continue TEXT with N greedy tokens; the maps "
                                                       "cover them too.", check=NOT_NEGATIVE)
    json_out: bool = option(False, "--json", help="Print the tokens and the weights as one JSON object.")
    device: str = option("auto", "--device", help=DEVICE_HELP)
    threads: Optional[int] = _threads_option()

    def check(self) -> None:
        if self.aggregate is not None and self.aggregate not in ("mean", "max"):
            raise FieldError("aggregate", f"must be mean or max; got {self.aggregate!r}")
        if self.aggregate is not None and self.head is not None:
            raise FieldError("aggregate", "combines a layer's heads; give --aggregate or --head, not both")
        if self.text == "":
            raise FieldError("text", "is empty: give some text to attend over")


PLOT_METRICS = ("loss", "acc", "ppl", "lr", "tokens_per_second")
PLOT_X = ("step", "tokens", "time")


@dataclass(frozen=True, kw_only=True)
class PlotOptions(Options):
    """Plot training curves from runs' metrics.jsonl: train and val loss (or another metric).

    Several runs are overlaid with a legend. Without --out the curves print in the terminal.
    `llmcli train ... --plot` writes the loss curves as curves.png into the run directory at
    every evaluation.

    Examples:

      llmcli plot runs/char --out curves.png

      llmcli plot runs/char runs/bpe --x tokens --log --out compare.png

      llmcli plot runs/char --metric lr
    """

    runs: list[Path] = argument(metavar="RUN_DIR...", help="Run directories (each holds a metrics.jsonl).")
    out: Optional[Path] = option(None, "--out", "-o", help=f"Write the plot to this picture {PICTURE_HELP}.")
    metric: str = option("loss", "--metric", "-m", help="loss (train and val), acc (train and val), ppl, lr, "
                                                      "tokens_per_second, or any key of metrics.jsonl.")
    x: str = option("step", "--x", help="Against step, tokens (seen) or time (training seconds).")
    log: bool = option(False, "--log", help="Logarithmic y axis.")

    def check(self) -> None:
        if self.x not in PLOT_X:
            raise FieldError("x", f"must be one of {', '.join(PLOT_X)}; got {self.x!r}")
        if not self.metric:
            raise FieldError("metric", "cannot be empty")


@dataclass(frozen=True, kw_only=True)
class InspectOptions(Options):
    """Summarise a run or checkpoint: model family and shape, parameters, tokenizer, quantization,
    training (steps, epochs, tokens, best val loss, wall time), files and sizes.

    Examples:

      llmcli inspect runs/char

      llmcli inspect runs/char-int8 --json
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory.")
    json_out: bool = option(False, "--json", help="Print one JSON object instead of the table.")
