"""What `llmcli quantize` and `llmcli prune` measure about a compressed checkpoint and the one it came
from: perplexity on the run's own val split (scored as `llmcli eval` scores it), greedy decode speed
timed in interleaved rounds (so that other jobs on the machine slow every model alike), and how many
greedy tokens agree with the original's."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from llmcli import ui
from llmcli.checkpoint import TOKENIZER
from llmcli.errors import UserError


def end_token(directory: Path) -> int:
    """The id of <|endoftext|> in the checkpoint's tokenizer: the prompt decoding is timed from."""
    from llmcli.tokenizer import eot_id, load_tokenizer

    return eot_id(load_tokenizer(directory / TOKENIZER))


def run_data(directory: Path, model: nn.Module):
    """The run's own data (its pairs, for a seq2seq model), as `llmcli eval` reads it."""
    from llmcli.data.prepare import prepare_data
    from llmcli.data.prepare_pairs import prepare_pairs
    from llmcli.evaluate import data_config
    from llmcli.evaluate_pairs import with_source_tokenizer

    try:
        cfg = data_config(directory, None, [])
        if model.task == "seq2seq":
            return prepare_pairs(with_source_tokenizer(cfg, directory), console=ui.stderr)
        return prepare_data(cfg, console=ui.stderr)
    except UserError as exc:
        raise UserError(f"{exc} (measuring needs the run's data; --eval-tokens 0 --decode-tokens 0 skip it)") from None


def decode_sources(directory: Path, model: nn.Module) -> list[list[int]] | None:
    """seq2seq: the val sources decoding is timed on (None for a language model)."""
    if model.task != "seq2seq":
        return None
    from llmcli.evaluate_pairs import first_sources

    return first_sources(run_data(directory, model), "val", 256)


def measure_perplexity(directory: Path, model: nn.Module, eval_tokens: int) -> tuple[float | None, int]:
    """Perplexity on the first `eval_tokens` tokens of the run's own val split, scored by
    llmcli.evaluate (sliding windows, as `llmcli eval`; a seq2seq model's targets by teacher
    forcing); (None, 0) when eval_tokens is 0."""
    if eval_tokens == 0:
        return None, 0
    from llmcli.evaluate import metrics_from_sums, score_tokens

    prepared = run_data(directory, model)
    if "val" not in prepared.splits:
        raise UserError("the run's data has no val split to measure perplexity on; pass --eval-tokens 0")
    if model.task == "seq2seq":
        from llmcli.evaluate_pairs import pairs_perplexity

        return pairs_perplexity(model, prepared, "val", eval_tokens)
    tokens = prepared.tokens("val")[:eval_tokens]
    metrics = metrics_from_sums(score_tokens(model, tokens, first_token=end_token(directory)))
    return metrics["perplexity"], int(metrics["tokens"])


def measure_decode(model: nn.Module, new_tokens: int, prompt_ids: list[int],
                   sources: list[list[int]] | None = None, batch: int = 1) -> tuple[float, list[int]]:
    """One greedy generation of `new_tokens` with llmcli.generate's engine:
    (decode tok/s, the tokens). A seq2seq model decodes `sources` one after another (each to its
    end token) until it has `new_tokens` tokens. With `batch` > 1 (language models), that many
    copies of the request decode together; the tokens are the first one's."""
    from llmcli.generate.engine import Engine

    return decode_run(Engine(model, max_batch_size=1 if sources is not None else batch), model, new_tokens,
                      prompt_ids, sources, batch)


def decode_run(engine, model: nn.Module, new_tokens: int, prompt_ids: list[int],
               sources: list[list[int]] | None = None, batch: int = 1) -> tuple[float, list[int]]:
    """`measure_decode` on an engine of `model` that may have run before (its rate: this run's)."""
    from llmcli.options.sampling import SamplingParams

    done, seconds = engine.stats.decode_tokens, engine.stats.decode_seconds
    tokens: list[int] = []
    if sources is not None:
        params = SamplingParams(max_new_tokens=(model.context_length or model.config.block_size + 1) - 1,
                                temperature=0.0)
        for source in sources:
            engine.add(prompt_ids, params, stop_token_ids=prompt_ids, source_ids=source)
            while engine.has_work():
                tokens += [ev.token for ev in engine.step()]
            if len(tokens) >= new_tokens:
                break
    else:
        if model.context_length is not None:
            new_tokens = max(1, min(new_tokens, model.context_length - len(prompt_ids)))
        params = SamplingParams(max_new_tokens=new_tokens + 1, temperature=0.0, ignore_eot=True)
        request = [engine.add(prompt_ids, params) for _ in range(batch)][0]
        while engine.has_work():
            tokens += [ev.token for ev in engine.step() if ev.id == request]
    took = engine.stats.decode_seconds - seconds
    return (engine.stats.decode_tokens - done) / took if took else 0.0, tokens


def measure_decode_pair(a: nn.Module, b: nn.Module, new_tokens: int, prompt_ids: list[int], *,
                        rounds: int = 3, sources: list[list[int]] | None = None, compile: bool = False
                        ) -> tuple[tuple[list[float], list[int]], tuple[list[float], list[int]]]:
    """Decode speed of two models timed in turn (a, b, a, b, ...) after a warm-up run of each, so
    that load from other jobs on the machine hits both alike. Returns ((tok/s per round, tokens)
    of a, (tok/s per round, tokens) of b)."""
    first, second = measure_decode_rounds([a, b], new_tokens, prompt_ids, rounds=rounds, sources=sources,
                                          compile=compile)
    return first, second


def measure_decode_rounds(models: list[nn.Module], new_tokens: int, prompt_ids: list[int], *, rounds: int = 3,
                          sources: list[list[int]] | None = None, batch: int = 1, compile: bool = False
                          ) -> list[tuple[list[float], list[int]]]:
    """Decode speed of several models timed in turn, round after round, each on one engine kept
    across rounds (as a server keeps it; `compile`: its decode step compiled and warmed up first),
    after a warm-up run of each: per model (tok/s per round, the warm-up's greedy tokens)."""
    from llmcli.generate.engine import Engine

    engines = [Engine(model, max_batch_size=1 if sources is not None else batch, compile=compile) for model in models]
    for engine in engines:
        engine.warm_up()
    tokens = [decode_run(engine, model, new_tokens, prompt_ids, sources, batch)[1]
              for engine, model in zip(engines, models, strict=True)]
    speeds: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for speed, engine, model in zip(speeds, engines, models, strict=True):
            speed.append(decode_run(engine, model, new_tokens, prompt_ids, sources, batch)[0])
    return list(zip(speeds, tokens, strict=True))


def agreement(reference: list[int], tokens: list[int]) -> float:
    """The share of `reference`'s greedy tokens that `tokens` repeats at the same position."""
    return sum(a == b for a, b in zip(reference, tokens, strict=False)) / max(1, len(reference))


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


