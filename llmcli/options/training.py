"""Options of the commands that make runs: data prepare, tokenizer train, train, distill."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmcli.options.fields import REQUIRED, ConfigOptions, option, threads_option


@dataclass(frozen=True, kw_only=True)
class PrepareOptions(ConfigOptions):
    """Stream a corpus, train or load its tokenizer, and cache each split as token shards
    (an interrupted run resumes; see docs/corpora.md).

    Examples:

      llmcli data prepare                                  # Shakespeare, char tokenizer

      llmcli data prepare -c shakespeare-bpe

      llmcli data prepare data.source=notes/ tokenizer.kind=bpe tokenizer.vocab_size=2048

      llmcli data prepare data.source='logs/*.jsonl.zst' tokenizer.kind=bpe tokenizer.train_bytes=2000000000
    """

    force: bool = option(False, "--force", help="Re-tokenize from scratch even if a cached (or interrupted) copy exists.")


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainOptions(ConfigOptions):
    """Train a tokenizer (tokenizer.kind=char|bpe) on the corpus's training split.

    Examples:

      llmcli tokenizer train --out tok.json tokenizer.kind=bpe tokenizer.vocab_size=8192

      llmcli tokenizer train -c shakespeare-bpe --out tok.json
    """

    out: Path = option(REQUIRED, "--out", "-o", help="Where to write tokenizer.json.")
    overwrite: bool = option(False, "--overwrite", help="Replace an existing file.")


@dataclass(frozen=True, kw_only=True)
class TrainOptions(ConfigOptions):
    """Train a model; checkpoints, metrics and the effective config go to the run directory.

    Works unchanged under `torchrun --nproc_per_node N -m llmcli train ...` and `accelerate launch`.

    Examples:

      llmcli train -c tiny --out runs/tiny

      llmcli train -c shakespeare-char --out runs/char train.max_minutes=5

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
    threads: Optional[int] = threads_option()
    plot: bool = option(False, "--plot", help="Write curves.png (train and val loss) into the run directory "
                                              "at every evaluation.")


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

      llmcli distill --teacher runs/char -c shakespeare-lstm --out runs/lstm-kd

      llmcli distill --teacher runs/char -c student.yaml --out runs/kd distill.alpha=0.9 distill.temperature=2

      llmcli distill --resume runs/kd train.max_steps=4000
    """

    teacher: Optional[Path] = option(None, "--teacher", help="The teacher: a run or checkpoint directory.")
    out: Optional[Path] = option(None, "--out", "-o", help="Run directory to create.")
    resume: Optional[Path] = option(None, "--resume", help="Continue the distillation run in this directory.",
                                    file_okay=False)
    overwrite: bool = option(False, "--overwrite", help="Replace a run already in --out.")
    threads: Optional[int] = threads_option()
