"""`llmcli distill`: train a student with knowledge distillation from a teacher checkpoint.

Per batch, with T = distill.temperature and alpha = distill.alpha, over the tokens that carry a
label (padding left out):

    loss = alpha * T^2 * mean_tokens KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * cross-entropy(student, labels)

(Hinton et al., 2015: T^2 keeps the soft term's gradients on the scale of the hard one's). The
teacher runs in eval mode without gradients on the same batches, on the student's device; it may
be quantized. Everything else is `llmcli train` (the loop calls `Distillation` as its objective):
checkpoints, several processes, exact --resume. The teacher's tokenizer becomes the student's, so
a student config naming another one is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcli.checkpoint import RUN_CONFIG, SOURCE_TOKENIZER, TOKENIZER, resolve_checkpoint
from llmcli.config import Config, DistillConfig
from llmcli.config_loader import load_config
from llmcli.device import configure_threads
from llmcli.errors import UserError
from llmcli.io import refuse_overlap
from llmcli.load import load_checkpoint
from llmcli.models.base import LanguageModel
from llmcli.options.training import DistillOptions
from llmcli.train.finetune import IGNORE


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                      alpha: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce) for logits [B, T, V] and labels [B, T] (see the module docstring)."""
    student, teacher = student.float(), teacher.float()
    ce = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, label_smoothing=label_smoothing)
    real = labels.flatten() != IGNORE
    s = F.log_softmax(student.flatten(0, 1)[real] / temperature, dim=-1)
    t = F.log_softmax(teacher.flatten(0, 1)[real] / temperature, dim=-1)
    kd = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2
    return alpha * kd + (1 - alpha) * ce, kd, ce


class Distillation:
    """The training loop's objective: the teacher's logits on the batch, then distillation_loss."""

    def __init__(self, teacher: LanguageModel, settings: DistillConfig, label_smoothing: float = 0.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings, self.label_smoothing = settings, label_smoothing

    def __call__(self, inputs: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if next(self.teacher.parameters()).device != logits.device:
            self.teacher.to(logits.device)
        with torch.no_grad():
            teacher = self.teacher(**inputs)
        loss, kd, ce = distillation_loss(logits, teacher, labels, self.settings.temperature, self.settings.alpha,
                                         self.label_smoothing)
        return loss, {"kd": kd.detach(), "ce": ce.detach()}


def distill_command(opts: DistillOptions) -> None:
    from llmcli.train.loop import Trainer
    from llmcli.train.report import print_summary

    plan, teacher = plan_distillation(opts)
    configure_threads(opts.threads)
    trainer = Trainer(plan, objective=Distillation(load_checkpoint(teacher).model, plan.cfg.distill,
                                                   plan.cfg.train.label_smoothing))
    summary = trainer.run()
    if trainer.main:
        print_summary(summary)


def plan_distillation(opts: DistillOptions):
    """(the run plan, the teacher's checkpoint directory), everything checked before any work."""
    from llmcli.train.run_dir import RunPlan, resume_config

    overrides = opts.overrides or []
    if opts.resume is not None:
        if opts.teacher is not None or (opts.out is not None and opts.out.resolve() != opts.resume.resolve()):
            raise UserError("--resume continues a distillation run in place, with its own teacher (no --teacher "
                            "or other --out)")
        cfg = resume_config(opts.resume, opts.config, overrides)
        if cfg.distill.teacher is None:
            raise UserError(f"{opts.resume} is not a distillation run (its config has no distill.teacher)")
        return RunPlan(cfg, opts.resume.expanduser(), resume=True), teacher_dir(Path(cfg.distill.teacher))
    if opts.teacher is None or opts.out is None:
        raise UserError("missing --teacher RUN and --out RUN_DIR (or --resume RUN_DIR to continue a run)")
    teacher = teacher_dir(opts.teacher)
    refuse_overlap(opts.out.expanduser(), {"the teacher": teacher, "the teacher's run": opts.teacher})
    cfg = with_teacher(load_config(opts.config, overrides), teacher)
    return RunPlan(cfg, opts.out.expanduser(), overwrite=opts.overwrite), teacher


def teacher_dir(path: Path) -> Path:
    """The teacher's checkpoint directory, or a one-line error saying why it is not one."""
    try:
        directory = resolve_checkpoint(path)
    except UserError as exc:
        raise UserError(f"--teacher: {exc}") from None
    for name in (TOKENIZER, RUN_CONFIG):
        if not (directory / name).is_file():
            raise UserError(f"--teacher: {directory} has no {name}; is it a checkpoint written by llmcli train?")
    return directory


def with_teacher(cfg: Config, teacher: Path) -> Config:
    """The student's config using the teacher's tokenizer(s) and recording the teacher; refused when
    the student asks for another tokenizer, another task or another vocabulary."""
    from llmcli.checkpoint import model_config_from_json

    taught = load_config(teacher / RUN_CONFIG)
    model = model_config_from_json(teacher / "model.json")
    if model.task != cfg.model.task:
        raise UserError(f"the teacher {teacher} is a {model.task} model (model.arch={model.arch}) and the student "
                        f"a {cfg.model.task} one (model.arch={cfg.model.arch}): a seq2seq teacher teaches "
                        "seq2seq students, a language model language models")
    _same_tokenizer("tokenizer", cfg.tokenizer, taught.tokenizer, teacher / TOKENIZER)
    tokenizer = dataclasses.replace(cfg.tokenizer, kind=taught.tokenizer.kind, path=str((teacher / TOKENIZER).resolve()))
    source = cfg.source_tokenizer
    if model.task == "seq2seq":
        _same_tokenizer("source_tokenizer", cfg.source_tokenizer, taught.source_tokenizer, teacher / SOURCE_TOKENIZER)
        own = teacher / SOURCE_TOKENIZER
        source = dataclasses.replace(source, kind="char", path=str(own.resolve())) if own.is_file() else \
            dataclasses.replace(source, kind="shared", path=None)
    for key in ("vocab_size", "src_vocab_size"):
        mine = getattr(cfg.model, key) if cfg.model.applies(key) else None
        theirs = getattr(model, key) if model.applies(key) else None
        if mine is not None and mine != theirs:
            raise UserError(f"model.{key}={mine} differs from the teacher's ({theirs}): their logits would not "
                            "compare token for token")
    distill = dataclasses.replace(cfg.distill, teacher=str(teacher.resolve()))
    return dataclasses.replace(cfg, tokenizer=tokenizer, source_tokenizer=source, distill=distill,
                               model=dataclasses.replace(cfg.model, vocab_size=model.vocab_size))


def _same_tokenizer(section: str, mine, theirs, teacher_file: Path) -> None:
    """Refuse a student tokenizer setting that is not the teacher's (unset settings take the teacher's)."""
    if mine.path is not None:
        if not teacher_file.is_file() or _json(Path(mine.path).expanduser()) != _json(teacher_file):
            raise UserError(f"{section}.path={mine.path} is not the teacher's tokenizer ({teacher_file}): distillation "
                            "compares the two models token for token, so the student uses the teacher's")
        return
    default = type(mine)()
    for key in ("kind", "vocab_size", "min_frequency"):
        if getattr(mine, key) != getattr(default, key) and getattr(mine, key) != getattr(theirs, key):
            raise UserError(f"{section}.{key}={getattr(mine, key)} differs from the teacher's ({getattr(theirs, key)}): "
                            "distillation compares the two models token for token, so the student uses the "
                            "teacher's tokenizer")


def _json(path: Path) -> object:
    """A tokenizer file's content (None when it cannot be read as JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
