"""Options of the commands that run a model: eval, generate, serve, chat."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmcli.errors import FieldError
from llmcli.options.fields import (
    AT_LEAST_ONE,
    AUTO_DTYPE_HELP,
    DEVICE_HELP,
    NOT_NEGATIVE,
    Options,
    argument,
    config_option,
    is_integer,
    nested,
    option,
    threads_option,
)
from llmcli.options.sampling import BeamOptions, FormatOptions, SamplingParams, SpeculationOptions

API_KEY_ENV = "LLMCLI_API_KEY"
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(?:([kmgt])(i?)b?|b)?\s*", re.IGNORECASE)
_SCALE = {"k": 1, "m": 2, "g": 3, "t": 4}
DEFAULT_BLOCK_TOKENS = 16


def parse_size(text: str) -> int | None:
    """Bytes in a size such as 2GiB, 512MiB, 1.5GB (powers of 1000) or 4096; None if it is not one."""
    match = _SIZE.fullmatch(text)
    if match is None:
        return None
    number, unit, binary = match.groups()
    return int(float(number) * ((1024 if binary else 1000) ** _SCALE[unit.lower()] if unit else 1))


def _given_key(flag: str | None) -> str | None:
    """--api-key, else LLMCLI_API_KEY even when it is set but empty (click reads that as unset): an
    empty key is refused, never taken for "no key". Edge spaces are dropped, as HTTP drops them from
    the client's header (a key read from a file keeps its newline)."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return None if key is None else key.strip()


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
    config: Optional[Path] = config_option("Take the data settings from this YAML config instead of the "
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
    threads: Optional[int] = threads_option()
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


COMPILE_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True)
class EngineOptions(Options):
    """How the engine computes its steps (generate and serve)."""

    max_num_batched_tokens: Optional[int] = option(
        None, "--max-num-batched-tokens", check=AT_LEAST_ONE,
        help="The most tokens one step computes: running sequences decode first and prompts are prefilled in "
             "chunks of what is left, so a long prompt does not stall the others (chunked prefill, as vLLM's "
             "option). Default: none for generate (each prompt prefilled whole), 512 for serve.")
    compile: str = option("auto", "--compile", help="Compile the decode step with torch.compile for a few batch "
                                                    "shapes: on, off, or auto (on for serve's transformer models but int4 ones, "
                                                    "where it measures faster once warm; its warm-up is cached on "
                                                    "disk and reported).")

    def check(self) -> None:
        if self.compile not in COMPILE_CHOICES:
            raise FieldError("compile", f"must be one of {', '.join(COMPILE_CHOICES)}; got {self.compile!r}")


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
    proposes several tokens and has the model verify them in one forward, every sequence of the
    batch at once: greedy output is the same as without it, sampling keeps the model's
    distribution; --json reports each sample's acceptance rate.

    Examples:

      llmcli generate runs/char "ROMEO:" -n 200

      llmcli generate runs/char "" --temperature 0 --stop "\\n\\n"

      llmcli generate runs/bpe -f prompts.txt --lines --num-samples 3 --seed 1 --json

      llmcli generate runs/g2p "shakespeare" --beams 4

      llmcli generate runs/char "ROMEO:" --temperature 0 --draft runs/char-small --json

      llmcli generate runs/bpe "A person: " --json-schema person.json --temperature 0

    --json-schema FILE, --regex R or --grammar FILE constrain the output: at each step the tokens that
    cannot continue the format are masked out, so the text always matches it (unless it is cut by
    --max-new-tokens or a --stop string). A vocabulary that cannot spell the format (a char
    vocabulary without `{`) is refused, naming the missing characters.
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
    constraint: FormatOptions = nested(FormatOptions)
    steps: EngineOptions = nested(EngineOptions)
    num_samples: int = option(1, "--num-samples", "-s", help="Samples per prompt (with --beams: the best "
                                                              "hypotheses).", check=AT_LEAST_ONE)
    batch_size: int = option(8, "--batch-size", "-b", help="Sequences generated at once.", check=AT_LEAST_ONE)
    json_out: bool = option(False, "--json", help="One JSON object per sample, one per line.")
    no_stream: bool = option(False, "--no-stream", help="Print each sample when complete.")
    device: str = option("auto", "--device", help=DEVICE_HELP)
    dtype: str = option("auto", "--dtype", help=AUTO_DTYPE_HELP)
    threads: Optional[int] = threads_option()

    def check(self) -> None:
        if self.speculation.enabled and self.beam.beams > 1:
            raise FieldError("beams", "and speculative decoding (--draft, --prompt-lookup) do not combine")
        if self.speculation.enabled and self.sampling.repetition_penalty != 1.0:
            raise FieldError("repetition_penalty", "does not combine with speculative decoding (it would change "
                                                   "between guesses)")
        if self.beam.beams > 1 and self.constraint.enabled:
            raise FieldError("beams", "and a constrained output (--json-schema, --regex, --grammar) do not combine")
        if self.beam.beams > 1 and self.num_samples > self.beam.beams:
            raise FieldError("num_samples", f"must be at most --beams ({self.beam.beams}): beam search returns "
                                            "its best hypotheses")


@dataclass(frozen=True, kw_only=True)
class ServeOptions(Options):
    """Serve a model over an OpenAI-compatible HTTP API, with continuous batching and streaming.

    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream=true gives
    server-sent events), POST /v1/embeddings, GET /health, GET /metrics. `response_format` (json_object,
    json_schema) constrains replies; chat takes `tools` and answers `tool_calls`. Requests join and leave the running batch at every step;
    greedy output is the same as `llmcli generate` whatever else runs. A transformer's KV cache is
    paged (blocks of --block-size tokens, as vLLM's): memory follows actual lengths, prompts that
    start alike share their cached blocks, and when blocks run out the newest sequence waits and
    is recomputed later. Beyond OpenAI's options:
    top_k, min_p, repetition_penalty, ignore_eos. A prompt longer than the context keeps its last
    block_size tokens. Ctrl-C stops taking requests (503) and lets running ones finish for a few
    seconds.

    Speculative decoding (--draft RUN or --prompt-lookup N, as in `llmcli generate`): greedy output
    is the same, sampling keeps the model's distribution, the running sequences are verified in one
    forward (on the paged cache too); requests with a repetition_penalty are refused (400).

    /v1/chat/completions lays the messages out with the checkpoint's chat template (the Jinja
    chat_template of its tokenizer_config.json); base models without one get "{role}: {content}\\n"
    per message, then "assistant:", stopping at "\\nuser:". A --chat-template file is a .jinja template, or JSON with
    any of: "prefix", "message" (e.g. "{role}: {content}\\n"), "roles" (a format per role),
    "generation_prompt", "stop" (a list); formats use {role} and {content}.

    Examples:

      llmcli serve runs/char

      LLMCLI_API_KEY=secret llmcli serve runs/char-int8 --host 0.0.0.0 --port 8080

      curl localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 50}'

      llmcli serve runs/char --draft runs/char-small --draft-tokens 4

      llmcli serve runs/char --adapter plays=runs/char-lora --adapter sonnets=runs/char-lora2

      llmcli serve runs/llama --engine vllm -- --tensor-parallel-size 2    # needs vllm and GPUs
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory (float or quantized).")
    host: str = option("127.0.0.1", "--host", help="Address to listen on. 127.0.0.1 = this machine only; "
                                                   "0.0.0.0 = every interface (set an API key then).")
    port: int = option(8000, "--port", "-p", help="Port to listen on (0 = any free port).",
                       check=(lambda v: is_integer(v) and 0 <= v <= 65535, "in 0..65535"))
    api_key: Optional[str] = option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True, convert=_given_key,
                                    help="Require 'Authorization: Bearer KEY' on every request except GET "
                                         "/health. Prefer the environment variable: a command line is visible "
                                         "to other users. An empty key is refused (unset the variable to serve "
                                         "without one).")
    max_batch_size: int = option(16, "--max-batch-size", "-b", help="Sequences decoded together (at most).",
                                 check=AT_LEAST_ONE)
    kv_cache_memory: Optional[str] = option(None, "--kv-cache-memory", metavar="SIZE",
                                            help="Memory for the paged KV cache, e.g. 2GiB or 512MiB (default: "
                                                 "as much as --max-batch-size full-context sequences take).",
                                            check=(lambda v: (parse_size(v) or 0) > 0, "a size such as 2GiB or 512MiB"))
    num_blocks: Optional[int] = option(None, "--num-blocks", help="Blocks in the paged KV cache (instead of "
                                                                  "--kv-cache-memory).", check=AT_LEAST_ONE)
    block_tokens: int = option(DEFAULT_BLOCK_TOKENS, "--block-size", help="Tokens per block of the paged KV cache.",
                               check=AT_LEAST_ONE)
    no_prefix_cache: bool = option(False, "--no-prefix-cache", help="Do not share cached blocks between prompts "
                                                                    "that start alike.")
    slot_cache: bool = option(False, "--slot-cache", help="Give each sequence one KV-cache slot of the full "
                                                          "context instead of paged blocks.")
    max_queue: int = option(64, "--max-queue", help="Sequences that may wait for a slot; beyond that requests "
                                                    "get 429.", check=(NOT_NEGATIVE[0], "0 or more"))
    model_name: Optional[str] = option(None, "--model-name", help="The model id clients use (default: the run "
                                                                  "directory's name).")
    chat_template: Optional[Path] = option(None, "--chat-template", help="A .jinja chat template or a JSON "
                                                                         "layout (see above) instead of the "
                                                                         "checkpoint's.", dir_okay=False)
    speculation: SpeculationOptions = nested(SpeculationOptions)
    adapters: tuple[str, ...] = option((), "--adapter", metavar="NAME=RUN",
                                       help="Also serve this LoRA adapter run of RUN_DIR as model NAME (repeatable); "
                                            "requests pick one by `model`, and requests for different adapters "
                                            "share batches.",
                                       cli_type=Optional[list[str]], convert=lambda items: tuple(items or ()))
    steps: EngineOptions = nested(EngineOptions)
    device: str = option("auto", "--device", help=DEVICE_HELP)
    dtype: str = option("auto", "--dtype", help=AUTO_DTYPE_HELP)
    threads: Optional[int] = threads_option()
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
        if self.engine == "vllm" and (self.steps.max_num_batched_tokens is not None or self.steps.compile != "auto"):
            raise FieldError("engine", "vllm schedules and compiles with its own options: drop "
                                       "--max-num-batched-tokens/--compile (pass vLLM's after --)")
        if self.engine == "vllm" and self.speculation.enabled:
            raise FieldError("engine", "vllm speculates with its own options: drop --draft/--prompt-lookup (pass "
                                       "vLLM's --speculative-config after --)")
        if self.adapters and self.engine == "vllm":
            raise FieldError("adapters", "go to llmcli's engine; vLLM takes its own --lora-modules after --")
        if self.model_name is not None and not self.model_name:
            raise FieldError("model_name", "cannot be empty")
        if self.api_key is not None and not self.api_key.strip():
            raise FieldError("api_key", f"/ {API_KEY_ENV} is empty: give a key, or unset {API_KEY_ENV} to serve "
                                        "without one")
        if self.num_blocks is not None and self.kv_cache_memory is not None:
            raise FieldError("num_blocks", "and --kv-cache-memory both size the paged KV cache: give one")
        if self.paging_options and (self.slot_cache or self.engine == "vllm"):
            what = "gives each sequence a full-context slot, not paged blocks" if self.slot_cache else \
                "vllm pages its KV cache with its own options (after --)"
            raise FieldError("slot_cache" if self.slot_cache else "engine",
                             f"{what}: drop --num-blocks, --kv-cache-memory, --block-size and --no-prefix-cache")

    @property
    def paging_options(self) -> bool:
        """Whether any option of the paged KV cache was given."""
        return (self.num_blocks is not None or self.kv_cache_memory is not None or self.no_prefix_cache
                or self.block_tokens != DEFAULT_BLOCK_TOKENS)


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
    constraint: FormatOptions = nested(FormatOptions)
    device: str = option("auto", "--device", help=DEVICE_HELP)
    dtype: str = option("auto", "--dtype", help=AUTO_DTYPE_HELP)


@dataclass(frozen=True, kw_only=True)
class EmbedOptions(Options):
    """Turn lines of text into vectors: one unit-length embedding per non-blank line.

    Each family pools its own states: decoder-only and recurrent models average their last hidden
    states over the line's tokens; sequence-to-sequence models average their encoder's states over
    the source (the line). Vectors are L2-normalized, so a dot product is the cosine similarity.
    A line longer than the model takes is refused, naming it. --out FILE.npy writes one float32 row
    per line (numpy); FILE.jsonl (or stdout, without --out) one {"text", "embedding"} object per line.

    Examples:

      llmcli embed runs/char --input lines.txt --out vectors.npy

      printf 'ROMEO:\\nJULIET:\\n' | llmcli embed runs/char
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory.")
    input: Optional[Path] = option(None, "--input", "-i", help="A UTF-8 file of texts, one per line (default: "
                                                               "stdin).", dir_okay=False)
    out: Optional[Path] = option(None, "--out", "-o", help="Write the vectors here: .npy or .jsonl (default: JSON "
                                                           "lines on stdout).", dir_okay=False)
    overwrite: bool = option(False, "--overwrite", help="Replace --out if it exists.")
    device: str = option("auto", "--device", help=DEVICE_HELP)
    dtype: str = option("auto", "--dtype", help=AUTO_DTYPE_HELP)
    threads: Optional[int] = threads_option()
