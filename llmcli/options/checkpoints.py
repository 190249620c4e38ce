"""Options of the commands that turn a checkpoint into another: export, import, quantize,
prune, merge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmcli.errors import FieldError
from llmcli.options.fields import (
    AT_LEAST_ONE,
    FRACTION,
    NOT_NEGATIVE,
    REQUIRED,
    Options,
    argument,
    option,
    threads_option,
)

EXPORT_FORMATS = ("hf", "gguf")
HF_DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_DTYPES = (*HF_DTYPES, "q8_0", "q4_0", "q4_1")


@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    """Write a checkpoint for another runtime: a Hugging Face model folder (GPT2LMHeadModel,
    LlamaForCausalLM or MarianMTModel) or one GGUF file for llama.cpp, ollama and LM Studio.

    --format hf: the folder loads with transformers' AutoModelForCausalLM and AutoTokenizer.from_pretrained.
    --format gguf: a decoder-only transformer with its tokenizer, chat template and end tokens in one
    file that llama-cli -m FILE.gguf runs; --ollama also writes a Modelfile beside it. A LoRA run
    exports merged into its base, or with --adapter-only as a GGUF LoRA adapter (llama-cli --lora).

    Examples:

      llmcli export runs/tiny --format hf --out exported/tiny

      llmcli export runs/llama/best --out exported/llama --dtype bfloat16 --overwrite

      llmcli export runs/demo/best --format gguf --out exported/demo.gguf --ollama

      llmcli export runs/gpt2-int8 --format gguf --out exported/gpt2-q8_0.gguf

      llmcli export runs/chat-lora --format gguf --adapter-only --out exported/chat-lora.gguf
    """

    run_dir: Path = argument(metavar="RUN_DIR", help="Run or checkpoint directory (a run dir exports its final "
                                                     "weights; name its best/ for the best ones).")
    out: Path = option(REQUIRED, "--out", "-o", help="Folder (hf) or .gguf file (gguf) to write.")
    format: str = option("hf", "--format", help="Output format: hf (Hugging Face transformers) or gguf "
                                                "(llama.cpp, ollama).",
                         check=(lambda v: v in EXPORT_FORMATS, f"one of {', '.join(EXPORT_FORMATS)}"))
    overwrite: bool = option(False, "--overwrite", help="Replace an existing --out.")
    dequantize: bool = option(False, "--dequantize", help="Export a quantized checkpoint as float weights.")
    dtype: str = option("auto", "--dtype", help="Weights to write: auto (as stored; gguf keeps int8 as q8_0 and "
                                                "int4 as q4_1), float32, bfloat16, float16; gguf also q8_0, "
                                                "q4_0, q4_1.")
    adapter_only: bool = option(False, "--adapter-only", help="gguf: write a LoRA run's adapter alone, as a GGUF "
                                                              "LoRA adapter for its base's GGUF.")
    ollama: bool = option(False, "--ollama", help="gguf: also write an ollama Modelfile beside the .gguf.")

    def check(self) -> None:
        dtypes = GGUF_DTYPES if self.format == "gguf" else HF_DTYPES
        if self.dtype not in dtypes:
            raise FieldError("dtype", f"must be one of {', '.join(dtypes)} for --format {self.format}; "
                                      f"got {self.dtype!r}")
        if self.format != "gguf":
            for name in ("adapter_only", "ollama"):
                if getattr(self, name):
                    raise FieldError(name, "is for --format gguf")
        if self.adapter_only and self.ollama:
            raise FieldError("ollama", "needs a model, not an adapter alone (ollama's ADAPTER line takes the "
                                       "adapter beside its base model's GGUF)")


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


@dataclass(frozen=True, kw_only=True)
class PruneOptions(Options):
    """Prune a model into a new, smaller checkpoint, and compare it with the original.

    structured (the default) removes whole attention heads (kv groups with GQA), MLP hidden units
    and recurrent hidden units, ranked by a gradient-based importance measured on a calibration
    sample of the run's own training data, and with --layers N the N whole layers whose removal
    raises that sample's loss least: a smaller dense model whose config gives its new shape.
    magnitude zeroes the smallest weights (torch.nn.utils.prune, over all layers or each layer
    alike), stored as values + bitmask. 2:4 keeps 2 of every 4 weights per row (CUDA only).
    --finetune-steps N then recovers quality with the ordinary training loop on the run's data
    (--out becomes a run directory: `llmcli train --resume OUT` continues it). The table compares
    parameters, file size, val perplexity, decode speed and greedy agreement, measured in this run.

    Examples:

      llmcli prune runs/char --heads 0.25 --mlp 0.3 --out runs/char-pruned

      llmcli prune runs/char --sparsity 0.3 --finetune-steps 300 --out runs/char-pruned-ft

      llmcli prune runs/char --heads 0.25 --mlp 0.3 --layers 1 --finetune-steps 300 --out runs/char-shallow

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
    layers: Optional[int] = option(None, "--layers", help="structured: whole layers to remove, those whose removal "
                                                          "raises the calibration loss least (seq2seq: counted over "
                                                          "encoder and decoder).", check=AT_LEAST_ONE)
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
    threads: Optional[int] = threads_option()
    overrides: Optional[list[str]] = argument(None, metavar="[OVERRIDES]...",
                                              help="train.* settings for --finetune-steps, e.g. train.lr=1e-3.")

    def parts(self) -> dict[str, float]:
        """structured: the share to remove of each part (--sparsity fills in the parts not named)."""
        given = {"heads": self.heads, "mlp": self.mlp, "hidden": self.hidden}
        return {part: share for part, share in given.items() if share is not None}

    def check(self) -> None:
        if self.method == "structured":
            if self.sparsity is None and not any(self.parts().values()) and not self.layers:
                raise FieldError("sparsity", "or --heads / --mlp / --hidden / --layers: say how much to remove")
        else:
            for name in ("heads", "mlp", "hidden", "layers"):
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
