"""The training loop: Accelerate for devices, processes and mixed precision; exact, crash-safe resume.

`Trainer` sets a run up once (accelerator, data, model, optimizer, resumed state), then `run()`
repeats: train one step, log, every eval_interval steps evaluate and save; and once more at the
end. Checkpoints go to the run directory as `state/` (what --resume reads), `last/`, `best/` and
the run directory's own files (see run_dir.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from llmcli import ui
from llmcli.checkpoint import SOURCE_TOKENIZER, TOKENIZER, link_checkpoint, write_checkpoint
from llmcli.config import Config
from llmcli.device import configure_threads
from llmcli.errors import UserError
from llmcli.io import atomic_replace_dir, atomic_write_bytes, swap_in
from llmcli.model_card import write_model_card
from llmcli.models.base import Rows
from llmcli.options.training import TrainOptions
from llmcli.train import state as saved
from llmcli.train.averaging import Average, SnapshotAverage, WeightAverage
from llmcli.train.batches import PairBatches, WindowBatches, training_data
from llmcli.train.finetune import IGNORE, carried_files, describe_trainable, starting_model
from llmcli.train.memory import check_fits, estimate
from llmcli.train.optim import make_optimizer, set_lr
from llmcli.train.report import Reporter, print_summary
from llmcli.train.run_dir import (
    METRICS,
    RUN_MARKERS,
    STATE_DIR,
    RunPlan,
    check_out_dir,
    plan_run,
    removed_if_left_empty,
    staging_dir,
    truncate_metrics,
)
from llmcli.train.schedule import TrainState, lr_at, with_epochs
from llmcli.train.strategy import Strategy, peak_process_bytes
from llmcli.train.trackers import Trackers


def train_command(opts: TrainOptions) -> None:
    plan = dataclasses.replace(plan_run(opts), plot=opts.plot)
    configure_threads(opts.threads or plan.cfg.train.threads)
    with removed_if_left_empty(plan.out_dir):
        trainer = Trainer(plan)
        summary = trainer.run()
    if trainer.main:
        print_summary(summary)


def train(plan: RunPlan, console: Console = ui.stderr, objective: Objective | None = None) -> dict[str, Any]:
    """Train `plan.cfg` into `plan.out_dir` (or continue the run there); the final summary."""
    with removed_if_left_empty(plan.out_dir):
        return Trainer(plan, console, objective).run()


# A training step's loss other than plain cross-entropy (llmcli distill): called with the batch's
# model inputs, the model's logits and the labels, it gives the loss and the named terms it is made
# of (each logged as train_<name> and shown in the progress).
Objective = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: WindowBatches | PairBatches, batches: int,
             accelerator: Any) -> dict[str, float]:
    """Loss, perplexity and next-token accuracy on a fixed set of validation batches (padding left out)."""
    model.eval()
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss sum, correct, count
    world = accelerator.num_processes
    for first in range(0, batches, world):  # as many forwards on every process: FSDP and ZeRO-3 gather in each
        index = first + accelerator.process_index
        inputs, y = windows.eval_batch(min(index, batches - 1))
        inputs, y = _to(inputs, accelerator.device), y.to(accelerator.device)
        with accelerator.autocast():
            logits = model(**inputs)
        if index >= batches:
            continue  # a stand-in forward, not counted
        logits = logits.float()
        totals[0] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum",
                                     ignore_index=IGNORE).double()
        totals[1] += (logits.argmax(-1) == y).sum()
        totals[2] += (y != IGNORE).sum()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    loss = (totals[0] / totals[2]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
            "val_acc": (totals[1] / totals[2]).item()}


class Trainer:
    """One training run (see the module docstring)."""

    def __init__(self, plan: RunPlan, console: Console = ui.stderr, objective: Objective | None = None):
        from accelerate.utils import set_seed

        t = plan.cfg.train
        self.objective = objective
        # Insight hooks: trackers (refused before anything is written if not installed), --plot.
        self.trackers, self.plot = Trackers(t.log_with), plan.plot
        self.final_dir = Path(plan.out_dir).expanduser()
        # A resumed run without a checkpoint (killed before its first) starts over, in place.
        self.resume = plan.resume and (self.final_dir / STATE_DIR / saved.TRAINER_STATE).is_file()
        self.strategy = Strategy(plan.cfg, self.final_dir / STATE_DIR if self.resume else None)  # checks first
        if t.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("train.mixed_precision=fp16 needs a CUDA GPU (fp16 autocast and grad "
                            "scaling do not run on CPU); use bf16 on CPU")
        if not plan.resume:
            check_out_dir(plan)
        # --overwrite of a run builds the new one aside; it replaces the old at its first checkpoint.
        replacing = plan.overwrite and any((self.final_dir / name).exists() for name in RUN_MARKERS)
        self.out_dir = staging_dir(self.final_dir) if replacing else self.final_dir

        # 1) Accelerate, with the strategy's plugin (see strategy.py).
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # tied weights warn on save
        self.accelerator = self.strategy.make_accelerator(**self.trackers.accelerator_kwargs(self.out_dir))
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.main and replacing:
            shutil.rmtree(self.out_dir, ignore_errors=True)  # what a killed overwrite left
            self.out_dir.mkdir()
        self.accelerator.wait_for_everyone()

        # 2) Data, and the config resolved with it (the vocabulary size comes from the tokenizer),
        # once the run is known to fit: first with a guess at the vocabulary, then with the real one.
        tokenizer = plan.cfg.tokenizer
        check_fits(plan.cfg, self.accelerator.device, tokenizer.vocab_size if tokenizer.kind == "bpe" else 256,
                   self.world)
        with self.accelerator.main_process_first():
            from llmcli.data.tasks import prepare_for_task

            prepared = prepare_for_task(plan.cfg, console=console if self.main else Console(quiet=True))
        self.cfg = _resolve(plan.cfg, prepared)
        check_fits(self.cfg, self.accelerator.device, world=self.world)
        data = training_data(prepared, self.cfg, t.grad_accum * self.world)
        self.tokenizer, self.source_tokenizer = data.tokenizer, data.source_tokenizer
        self.train_windows, self.val_windows = data.train, data.val
        if self.main and not self.resume:
            self.cfg.save(self.out_dir / "config.yaml")
            atomic_write_bytes(self.out_dir / TOKENIZER, self.tokenizer)
            if self.source_tokenizer is not None:
                atomic_write_bytes(self.out_dir / SOURCE_TOKENIZER, self.source_tokenizer)
        if self.main and getattr(data.train, "dropped", 0):
            ui.log(f"warning: {data.train.dropped:,} training pairs are longer than the model takes (sources "
                   f"<= {self.cfg.model.source_context} tokens with their end token, targets < "
                   f"{self.cfg.model.block_size}) and are left out", console)
        self.accelerator.wait_for_everyone()

        # 3) Model and optimizer.
        set_seed(t.seed)
        model = starting_model(self.cfg, plan.init_from, self.out_dir, self.resume)
        self.files = carried_files(self.cfg, plan.init_from, self.out_dir, self.resume)
        if self.source_tokenizer is not None:
            self.files[SOURCE_TOKENIZER] = self.source_tokenizer
        self.trainable_note = describe_trainable(model, self.cfg)
        self.n_params, self.flops_per_token = model.num_params(), model.flops_per_token()
        # One fused kernel for every parameter: on the CPU 4x faster than the default per-tensor
        # loop (1.2 vs 4.8 ms per step for shakespeare-char), about 7% of a training step.
        fused = self.accelerator.device.type in ("cpu", "cuda")
        optimizer = make_optimizer(model, t, fused)
        self.model, self.optimizer = self.strategy.prepare(model, optimizer)  # train.compile too
        # train.ema_decay / train.average_last: the average that evaluations and checkpoints use (averaging.py).
        self.average: Average | None = None
        if t.ema_decay > 0:
            self.average = WeightAverage(self._unwrapped(), t.ema_decay)
        elif t.average_last is not None:
            self.average = SnapshotAverage(self._unwrapped(), t.average_last)
        # train.stateful: each stream's hidden state, carried from step to step (grad_accum x batch_size slots).
        self.carry = self._unwrapped().new_decode_state(t.grad_accum * t.batch_size, device=self.accelerator.device) \
            if t.stateful else None

        # 4) Where we start: step 0, or exactly where the run's last checkpoint left off.
        self.state = self._restore() if self.resume else TrainState()
        if self.main and plan.resume:
            truncate_metrics(self.out_dir / METRICS, self.state.step)
        self.tokens_per_step = self.train_windows.tokens_per_step  # seq2seq: the average
        self.epoch_steps = self.train_windows.epoch_steps
        self.schedule = with_epochs(t, self.epoch_steps)  # the saved config keeps max_epochs as given
        self.max_seconds = t.max_minutes * 60 if t.max_minutes else None
        # The budget spans resumes; the reporter times this run only, so give it what is left.
        budget_left = self.max_seconds - self.state.elapsed if self.max_seconds is not None else None
        self.reporter = Reporter(self.main, self.schedule.max_steps, budget_left, console,
                                 epochs=(self.epoch_steps, t.max_epochs) if t.max_epochs else None)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t = self.schedule
        self._announce()
        self.trackers.start(self.accelerator, self.cfg, self.final_dir.name, self.state.step if self.resume else None)
        self.start_step, self.run_start, self.elapsed_before = self.state.step, time.perf_counter(), self.state.elapsed
        self.tokens_at_start = self.state.tokens_seen
        self._reset_window()
        self.first_bad_step = torch.full((), -1, device=self.accelerator.device, dtype=torch.long)
        self.last_train_loss: float | None = None
        last_val: dict[str, float] | None = None
        self.metrics_file = open(self.out_dir / METRICS, "a") if self.main else None
        self.model.train()
        try:
            with self.reporter:
                while not self._done():
                    lr = lr_at(self.state.step, t, self._elapsed())
                    self._train_step(lr)
                    is_eval = self.state.step % t.eval_interval == 0
                    is_last = t.max_steps is not None and self.state.step >= t.max_steps
                    first = self.state.step == self.start_step + 1  # the loss shows from the first step
                    if first:
                        self._report_memory()
                    if self.state.step % t.log_interval == 0 or is_eval or is_last or first:
                        self._log(lr)
                    else:
                        self.reporter.tick(self.state.step, self._elapsed() - self.elapsed_before)
                    if is_eval:
                        last_val = self._evaluate_and_save()
                if self.window_count:
                    self._check_finite()
                if last_val is None or self.state.step % t.eval_interval:
                    self.state.elapsed = self._elapsed()
                    last_val = self._evaluate_and_save()
        finally:
            self.trackers.finish(self.accelerator)
            if self.metrics_file is not None:
                self.metrics_file.close()
            if self.main and self.out_dir != self.final_dir:  # failed before its first checkpoint
                shutil.rmtree(self.out_dir, ignore_errors=True)
        return self._summary(last_val)

    def record(self, entry: dict[str, Any]) -> None:
        """One line of metrics.jsonl (the main process writes them)."""
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(entry) + "\n")
            self.metrics_file.flush()
        self.trackers.log(self.accelerator, entry)

    def _elapsed(self) -> float:
        """Training seconds of the whole run, resumes included."""
        return self.elapsed_before + time.perf_counter() - self.run_start

    def _done(self) -> bool:
        t = self.schedule
        done = (t.max_steps is not None and self.state.step >= t.max_steps) or \
               (self.max_seconds is not None and self._elapsed() >= self.max_seconds)
        if self.world > 1 and self.max_seconds is not None:  # every process stops at the same step
            flag = torch.tensor(float(done), device=self.accelerator.device)
            done = bool(self.accelerator.reduce(flag, reduction="sum") > 0)
        return done

    def _train_step(self, lr: float) -> None:
        """One optimizer step over grad_accum micro-batches; losses stay on the device."""
        t, accelerator, device = self.cfg.train, self.accelerator, self.accelerator.device
        set_lr(self.optimizer, lr)
        for micro in range(t.grad_accum):
            inputs, y = self.train_windows.batch(self.state.step, micro * self.world + self.rank)
            inputs, y = _to(inputs, device), y.to(device)
            if self.carry is not None:
                inputs.update(state=self.carry, rows=self._carried_rows(micro, y.shape))
            with accelerator.accumulate(self.model):
                logits = self.model(**inputs)
                if self.objective is None:
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                           label_smoothing=t.label_smoothing)
                else:
                    loss, parts = self.objective(inputs, logits, y)
                    for name, part in parts.items():
                        self.window_parts[name] = self.window_parts.get(name, 0.0) + part.detach().double()
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            self.window_loss += loss
            self.window_correct += (logits.detach().argmax(-1) == y).sum() / (y != IGNORE).sum().clamp(min=1)
            self.window_count += 1
            self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss),
                                              torch.tensor(self.state.step, device=device), self.first_bad_step)
        if self.average is not None:
            self.average.after_step(self.state.step + 1)
        tokens = sum(self.train_windows.tokens(self.state.step, i) for i in range(t.grad_accum * self.world))
        self.window_tokens += tokens
        self.state.step += 1
        self.state.tokens_seen += tokens

    def _carried_rows(self, micro: int, shape: torch.Size) -> Rows:
        """train.stateful: micro-batch `micro`'s streams live in slots micro*B ...; they continue where
        the previous step left them, or start from a zero state at a pass's first step."""
        batch, length = shape
        slots = range(micro * batch, (micro + 1) * batch)
        carried = self.train_windows.continues(self.state.step)
        return Rows(slots, [self.carry.positions[s] if carried else 0 for s in slots], [length] * batch)

    def _reset_window(self) -> None:
        device = self.accelerator.device
        self.window_loss = torch.zeros((), device=device, dtype=torch.float64)
        self.window_correct = torch.zeros((), device=device, dtype=torch.float64)
        self.window_count, self.window_start, self.window_step0 = 0, time.perf_counter(), self.state.step
        self.window_tokens = 0
        self.window_parts: dict[str, torch.Tensor] = {}

    def _log(self, lr: float) -> None:
        """Average the losses since the last log line over steps and processes; one metrics row."""
        self._check_finite()
        names = sorted(self.window_parts)
        stats = self.accelerator.reduce(torch.stack([self.window_loss, self.window_correct,
                                                     *(self.window_parts[n] for n in names)]), reduction="mean")
        train_loss, train_acc, *values = (stats / self.window_count).tolist()
        parts = dict(zip(names, values, strict=True))
        now = time.perf_counter()
        tok_s = self.window_tokens / max(now - self.window_start, 1e-9)
        self.state.elapsed = self._elapsed()
        self.record({"step": self.state.step, "epoch": round(self.state.step / self.epoch_steps, 4),
                     "train_loss": train_loss, "train_acc": train_acc,
                     **{f"train_{name}": value for name, value in parts.items()}, "lr": lr,
                     "tokens_per_second": tok_s, "tokens_seen": self.state.tokens_seen,
                     "elapsed": round(self.state.elapsed, 3)})
        self.reporter.step(self.state.step, train_loss, train_acc, lr, tok_s,
                           self.state.elapsed - self.elapsed_before, self.start_step, parts)
        self.last_train_loss = train_loss
        self._reset_window()

    def _check_finite(self) -> None:
        bad = int(self.accelerator.reduce(self.first_bad_step.clone(), reduction="max"))
        if bad >= 0:
            saved = self.state.best_step >= 0 or self.resume
            where = f"the last good checkpoint is in {self.out_dir / 'last'}" if saved else "no checkpoint was written"
            raise UserError(f"loss became non-finite at step {bad + 1}; stopped ({where})")

    def _evaluate_and_save(self) -> dict[str, float]:
        if self.average is not None:
            self.average.before_evaluation()
        with self._averaged(self._unwrapped()):
            val = evaluate(self.strategy.eval_model(self.model), self.val_windows, self.cfg.train.eval_batches, self.accelerator)
        if not math.isfinite(val["val_loss"]):
            raise UserError(f"validation loss is non-finite at step {self.state.step}; stopped "
                            "(the last good checkpoint stays)")
        if val["val_loss"] < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step = val["val_loss"], self.state.step
        self.record({"step": self.state.step, **val})
        self.reporter.eval_row(self.state.step, self.last_train_loss, val)
        self._save(val)
        if self.plot and self.main:  # --plot: after _save, so the curves land in the final run dir
            from llmcli.insight.curves import write_run_curves

            write_run_curves(self.out_dir)
        return val

    def _save(self, val: dict[str, float]) -> None:
        """state/ first (what resume reads), then last/, best/ and the run dir's own files."""
        accelerator, out_dir = self.accelerator, self.out_dir
        state_tmp = out_dir / f".{STATE_DIR}.saving"
        if self.main:
            shutil.rmtree(state_tmp, ignore_errors=True)
            state_tmp.mkdir()
        accelerator.wait_for_everyone()
        saved.save_rng(state_tmp, self.rank)
        if self.carry is not None:
            saved.save_carry(state_tmp, self.rank, self.carry)
        # The strategy's weights and optimizer state; the whole model (consolidated) on the main process.
        model = self.strategy.save(state_tmp, self.model, self.optimizer, accelerator.scaler, self.state)
        if self.main and self.average is not None:
            self.average.save(state_tmp)
        accelerator.wait_for_everyone()
        if self.main:
            atomic_replace_dir(out_dir / STATE_DIR, lambda tmp: _move_contents(state_tmp, tmp))
            shutil.rmtree(state_tmp, ignore_errors=True)
            info = {"step": self.state.step, "tokens_seen": self.state.tokens_seen, **val}
            with self._averaged(model):
                write_checkpoint(out_dir / "last", model, self.cfg, self.tokenizer, info, self.files)
                if self.state.best_step == self.state.step:
                    write_checkpoint(out_dir / "best", model, self.cfg, self.tokenizer, info, self.files)
            write_model_card(out_dir / "last")
            if self.state.best_step == self.state.step:
                write_model_card(out_dir / "best")
            link_checkpoint(out_dir / "last", out_dir)
            write_model_card(out_dir)  # the run's: with its training log so far
            if out_dir != self.final_dir:  # the new run is complete enough to replace the old one
                swap_in(out_dir, self.final_dir)
        accelerator.wait_for_everyone()
        self.out_dir = self.final_dir

    def _restore(self) -> TrainState:
        """Everything --resume needs, from state/: the weights, the optimizer, the random generators
        and the counters; any file that does not load stops the run, naming it."""
        directory = self.out_dir / STATE_DIR
        saved.refuse_old_format(directory)
        self.strategy.load(directory, self.model, self.optimizer)  # the weights and the optimizer
        saved.load_scaler(directory, self.accelerator.scaler)
        saved.load_rng(directory, self.rank, self.world)
        if self.average is not None:
            self.average.load(directory)
        if self.carry is not None:
            saved.load_carry(directory, self.rank, self.carry)
        return saved.load_trainer_state(directory)

    # -- reporting ---------------------------------------------------------------------------

    def _announce(self) -> None:
        if not self.main:
            return
        accelerator, t = self.accelerator, self.cfg.train
        backend = getattr(accelerator.state, "backend", None) or "-"
        self.reporter.print(f"world size {self.world} ({accelerator.distributed_type.value}, backend {backend}), "
                            f"device {accelerator.device}, mixed precision {t.mixed_precision}"
                            + (f", {torch.get_num_threads()} CPU threads" if accelerator.device.type == "cpu" else ""))
        self.reporter.print(f"model {ui.format_count(self.n_params)} parameters, "
                            f"{ui.format_count(self.flops_per_token)} training FLOPs/token; "
                            f"{'~' if self.cfg.data.task == 'seq2seq' else ''}"
                            f"{ui.format_count(self.tokens_per_step)} {'target ' if self.cfg.data.task == 'seq2seq' else ''}"
                            "tokens/step")
        self.reporter.print(f"strategy {self.strategy.describe()} over {self.world} process(es): "
                            f"{estimate(self.cfg, world=self.world).describe()} (estimate)")
        if self.trainable_note:
            self.reporter.print(self.trainable_note)
        if self.resume:
            self.reporter.print(f"resuming {self.out_dir} at step {self.state.step}")

    def _report_memory(self) -> None:
        """After the first step: the most any process holds (weights, optimizer state, peak)."""
        held = self.strategy.held(self.model, self.optimizer)
        mine = torch.tensor([held.weights, held.optimizer, peak_process_bytes(self.accelerator.device)],
                            dtype=torch.float64, device=self.accelerator.device)
        weights, optimizer, peak = self.accelerator.reduce(mine, reduction="max").tolist() if self.world > 1 \
            else mine.tolist()
        self.reporter.print(f"memory per process after step {self.state.step} (largest of {self.world}): weights "
                            f"{ui.format_bytes(weights)}, optimizer state {ui.format_bytes(optimizer)}, "
                            f"peak {ui.format_bytes(peak)}")

    def _summary(self, final: dict[str, float] | None) -> dict[str, Any]:
        wall = time.perf_counter() - self.run_start
        trained = self.state.tokens_seen - self.tokens_at_start
        best = json.loads((self.out_dir / "best" / "checkpoint.json").read_text()) if self.main else {}
        return {
            "parameters": self.n_params, "steps": self.state.step, "tokens_seen": self.state.tokens_seen,
            "epochs": self.state.step / self.epoch_steps,
            "wall_seconds": wall, "tokens_per_second": trained / max(wall, 1e-9),
            "best_val_loss": self.state.best_val_loss,
            "best_val_ppl": math.exp(min(self.state.best_val_loss, 700.0)), "best_step": self.state.best_step,
            "best_val_acc": best.get("val_acc"), "final": final, "world_size": self.world,
            "checkpoint": str(self.out_dir / "best"),
        }

    def _unwrapped(self) -> torch.nn.Module:
        return self.strategy.unwrapped(self.model)

    def _averaged(self, model: torch.nn.Module) -> Any:
        """train.ema_decay / average_last: `model` (the live one) holds the averaged weights inside the block."""
        if self.average is None:
            return contextlib.nullcontext()
        return self.average.swapped_in()


def _resolve(cfg: Config, prepared: Any) -> Config:
    """`cfg` with what the data decides: the vocabulary sizes, when the config leaves them open."""
    sizes = {"vocab_size": prepared.vocab_size}
    if cfg.model.applies("src_vocab_size") and not cfg.model.share_embeddings:
        sizes["src_vocab_size"] = prepared.source_vocab_size
    model = cfg.model
    for key, size in sizes.items():
        given = getattr(model, key)
        if given is None:
            model = dataclasses.replace(model, **{key: size})
        elif given < size:
            raise UserError(f"model.{key}={given} is smaller than the tokenizer's vocabulary ({size})")
    return dataclasses.replace(cfg, model=model)


def _to(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device) for name, t in inputs.items()}


def _move_contents(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        os.replace(item, dst / item.name)
