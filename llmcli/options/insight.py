"""Options of the commands that look inside a run: attention, plot, inspect (llmcli/insight/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmcli.errors import FieldError
from llmcli.options.fields import DEVICE_HELP, NOT_NEGATIVE, Options, argument, option, threads_option

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
    threads: Optional[int] = threads_option()

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
