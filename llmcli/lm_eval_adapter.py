"""An llmcli model for EleutherAI's lm-evaluation-harness, and `llmcli eval --tasks`.

`LlmcliLM` answers lm-eval's three request types with our model and engine:

* loglikelihood: log P(continuation | context) and whether greedy decoding gives the continuation,
  from one forward pass over context + continuation (the context keeps its last tokens when both
  exceed the model's context). Tokenized as lm-eval's HFLM does: trailing spaces of the context
  move to the continuation, whose tokens are those the whole text adds after the context's.
* loglikelihood_rolling: a document's log-likelihood in lm-eval's own rolling windows
  (`get_rolling_token_windows`), the first token predicted from the end-of-text token.
* generate_until: the continuous-batching Generator, greedy unless `do_sample`, stopping at the
  `until` strings, the model's end tokens or `max_gen_toks`.

`register()` adds it to lm-eval's registry as "llmcli". lm-eval's own command line has no way to
find models of other packages, so `python -m llmcli.lm_eval_adapter ...` (or `llmcli-lm-eval`) is
that command line with this model registered: `--model llmcli --model_args path=RUN`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from llmcli import ui
from llmcli.checkpoint import model_config_of
from llmcli.device import select_device, select_dtype
from llmcli.errors import UserError
from llmcli.generate.text import Generator
from llmcli.load import load_checkpoint
from llmcli.models.registry import family
from llmcli.options.inference import EvalOptions
from llmcli.options.sampling import SamplingParams
from llmcli.tokenizer import encode, eot_id

MODEL_NAME = "llmcli"
DEFAULT_GEN_TOKENS = 256  # lm-eval's default max_gen_toks


def register() -> None:
    """Make `--model llmcli` known to lm-eval (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=f"{__name__}:LlmcliLM")


def check_language_model(path: str | Path, config: Any) -> None:
    """Refuse a checkpoint lm-eval cannot score: tasks ask for the likelihood of a continuation."""
    if family(config).task != "lm":
        raise UserError(f"--tasks scores language models (lm-eval's likelihood of a continuation); {path} holds a "
                        f"model.arch={config.arch} sequence-to-sequence model")


class LlmcliLM(LM):
    """An llmcli run or checkpoint directory as an lm-eval model (see the module docstring)."""

    def __init__(self, path: str, device: str = "auto", dtype: str = "float32", batch_size: int | str = 8):
        super().__init__()
        self._device = select_device(str(device))
        loaded = load_checkpoint(path, self._device, select_dtype(str(dtype), self._device, auto=torch.float32))
        self.directory, self.model, self.tokenizer = loaded.directory, loaded.model, loaded.tokenizer
        check_language_model(path, self.model.config)
        self.path = str(path)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.end_ids = loaded.end_ids or (eot_id(self.tokenizer),)
        self.window = self.model.context_length or 1 << 30
        self._generator: Generator | None = None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LlmcliLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LlmcliLM:
        """`--model_args path=RUN[,dtype=...,device=...]`; lm-eval's own --device and --batch_size
        apply too, except its default cuda:0 on a machine without CUDA."""
        if "path" not in arg_dict:
            raise ValueError("--model_args needs path=RUN_DIR (an llmcli run or checkpoint directory)")
        extra = {k: v for k, v in (additional_config or {}).items() if k in ("device", "batch_size") and v is not None}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del extra["device"]
        return cls(**{**extra, **arg_dict})

    # -- tokens ------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = encode(self.tokenizer, context + continuation)
        context_ids = encode(self.tokenizer, context)
        if not context_ids:
            return [self.end_ids[0]], whole
        return context_ids, whole[len(context_ids):]

    @torch.inference_mode()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log P(continuation tokens), all of them greedy) per (context ids, continuation ids)."""
        for _, cont in pairs:
            if len(cont) > self.window:
                raise UserError(f"a continuation of {len(cont)} tokens is longer than the model's context "
                                f"({self.window} tokens)")
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: dict[int, tuple[float, bool]] = {}
        for first in range(0, len(order), self.batch_size):
            batch = order[first:first + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.window + 1):][:-1] for i in batch]
            width = max(map(len, rows))
            idx = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=self._device)
            logprobs = F.log_softmax(self.model(idx).float(), dim=-1)
            for row, i, n in zip(range(len(batch)), batch, map(len, rows), strict=True):
                cont = pairs[i][1]
                picked = logprobs[row, n - len(cont):n]
                target = torch.tensor(cont, device=self._device)
                total = picked.gather(-1, target[:, None]).sum().item()
                results[i] = (total, bool((picked.argmax(-1) == target).all()))
        return [results[i] for i in range(len(pairs))]

    # -- lm-eval's requests ------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = self._score([self._encode_pair(*r.args) for r in requests])
        for request, answer in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=encode(self.tokenizer, request.args[0]), prefix_token=self.end_ids[0],
                max_seq_len=self.window, context_len=1)]
            total = sum(logprob for logprob, _ in self._score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if self._generator is None:
            self._generator = Generator(self.model, self.tokenizer, max_batch_size=self.batch_size,
                                        stop_token_ids=self.end_ids)
        prompts = [encode(self.tokenizer, r.args[0]) or [self.end_ids[0]] for r in requests]
        params = [_sampling(r.args[1]) for r in requests]
        texts = [c.completion for c in self._generator.generate(prompts, params)]
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def _sampling(kwargs: dict[str, Any]) -> SamplingParams:
    """lm-eval's gen_kwargs as our sampling settings."""
    kwargs = dict(kwargs or {})
    until = kwargs.pop("until", None) or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
    return SamplingParams(max_new_tokens=int(kwargs.pop("max_gen_toks", DEFAULT_GEN_TOKENS)),
                          temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                          top_p=float(kwargs.pop("top_p", 1.0) or 1.0), seed=kwargs.pop("seed", None),
                          stop=tuple(s for s in until if s))


# --------------------------------------------------------------------------------------------
# llmcli eval --tasks


def task_list(opts: EvalOptions) -> tuple[list[Any], Any]:
    """(lm-eval task names and YAML configs, the TaskManager that knows the names)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    items = [t.strip() for t in (opts.tasks or "").split(",") if t.strip()]
    names = [t for t in items if not t.endswith((".yaml", ".yml"))]
    tasks: list[Any] = []
    for item in items:
        if item in names:
            tasks.append(item)
            continue
        if not Path(item).is_file():
            raise UserError(f"--tasks: task file not found: {item}")
        tasks.append(load_yaml(item, resolve_func=True))
    manager = TaskManager(include_path=str(opts.include_path) if opts.include_path else None,
                          include_defaults=bool(names))
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise UserError(f"--tasks: lm-eval knows no task {unknown[0]!r} (see `lm-eval ls tasks`; a local task "
                        "is a YAML file, or a name in an --include-path folder)")
    return tasks, manager


def evaluate_tasks(paths: Sequence[str], opts: EvalOptions) -> list[dict[str, Any]]:
    """lm-eval's results for every checkpoint: one row per (checkpoint, task, metric)."""
    from lm_eval import simple_evaluate

    for path in paths:  # before lm-eval indexes its tasks (15 s): a wrong checkpoint is refused at once
        check_language_model(path, model_config_of(path))
    tasks, manager = task_list(opts)
    rows = []
    for path in paths:
        model = LlmcliLM(path, device=opts.device, dtype=opts.dtype, batch_size=opts.batch_size)
        ui.log(f"lm-eval {path}: {', '.join(t if isinstance(t, str) else t.get('task', '?') for t in tasks)}")
        results = simple_evaluate(model=model, tasks=tasks, task_manager=manager, num_fewshot=opts.num_fewshot,
                                  limit=opts.limit, bootstrap_iters=1000, log_samples=False, verbosity="ERROR")
        rows += _rows(path, results)
    return rows


def _rows(path: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, metrics in results["results"].items():
        shots = results.get("n-shot", {}).get(task)
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"checkpoint": path, "task": task, "metric": metric, "filter": filt, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None, "n_shot": shots,
                         "samples": samples})
    return rows


def print_task_results(rows: list[dict[str, Any]], json_lines: bool = False) -> None:
    """One JSON object per row, or a table like `llmcli eval`'s."""
    from rich.table import Table

    if json_lines:
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    table = Table(title=None)
    table.add_column("checkpoint", overflow="fold", min_width=12)
    for name in ("task", "metric", "value", "± stderr"):
        table.add_column(name, justify="left" if name in ("task", "metric") else "right", no_wrap=True)
    for r in rows:
        stderr = "-" if r["stderr"] is None or not math.isfinite(r["stderr"]) else f"{r['stderr']:.4f}"
        table.add_row(r["checkpoint"], r["task"], r["metric"], f"{r['value']:.4f}", stderr)
    ui.stdout.print(table)
    for task, (shots, samples) in {r["task"]: (r["n_shot"], r["samples"]) for r in rows}.items():
        ui.stdout.print(f"{task}: {'-' if shots is None else shots}-shot, "
                        f"{'-' if samples is None else f'{samples:,}'} samples", markup=False)
    ui.stdout.print("scored with lm-evaluation-harness", markup=False)


def main() -> None:
    """lm-eval's command line, with `--model llmcli` registered."""
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()
