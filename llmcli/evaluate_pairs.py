"""Scoring a sequence-to-sequence model on its pairs: what `llmcli eval` runs for one.

Teacher forcing gives the loss, perplexity and token accuracy of every target (with its end
token) given its source. Then each distinct source is decoded once, greedily by the engine
(continuous batching, the encoder run once per source) or by beam search, and the outputs are
scored against all of the source's targets (llmcli/metrics.py): exact match, WER, PER, BLEU,
chrF. Pairs longer than the model takes (sources over model.source_block_size tokens with their
end token, targets of block_size tokens or more) are left out with a warning.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmcli import ui
from llmcli.checkpoint import SOURCE_TOKENIZER
from llmcli.config import Config
from llmcli.generate.beam import BeamSearch, BeamSettings
from llmcli.generate.engine import Engine
from llmcli.metrics import sequence_scores
from llmcli.models.base import LanguageModel
from llmcli.options.sampling import BeamOptions, SamplingParams
from llmcli.tokenizer import decode, encode, eot_id
from llmcli.train.batches import IGNORE, PairBatches

DEFAULT_BATCH = 64  # pairs per teacher-forced forward, sources decoded at once


def with_source_tokenizer(cfg: Config, directory: Path) -> Config:
    """`cfg` reading the checkpoint's own source tokenizer (or its shared one)."""
    own = directory / SOURCE_TOKENIZER
    source = dataclasses.replace(cfg.source_tokenizer, kind="char", path=str(own)) if own.is_file() else \
        dataclasses.replace(cfg.source_tokenizer, kind="shared", path=None)
    return dataclasses.replace(cfg, source_tokenizer=source)


def score_pairs(model: LanguageModel, tokenizer: Any, prepared: Any, split: str, *, batch_size: int | None,
                beam: BeamOptions, limit: int | None, label: str) -> dict[str, Any]:
    """Every metric of `model` on `split` of the prepared pairs (see the module docstring)."""
    device = next(model.parameters()).device
    arrays, texts = prepared.arrays(split), prepared.texts(split)
    batch_size = batch_size or DEFAULT_BATCH
    order = _sources_in_order(texts, limit)
    chosen = np.array([i for pairs in order.values() for i in pairs])
    batches = PairBatches(arrays, batch_size, 0, 1, prepared.eot_id, source_limit=model.source_length,
                          target_limit=model.config.block_size)
    fits = np.isin(chosen, batches.kept)
    if not fits.all():
        ui.log(f"warning: {int((~fits).sum()):,} of {len(chosen):,} pairs are longer than the model takes; left out")
    chosen = set(chosen[fits].tolist())
    order = {source: [i for i in pairs if i in chosen] for source, pairs in order.items()}
    order = {source: pairs for source, pairs in order.items() if pairs}
    if not order:
        raise ValueError("no pair to score")
    how = f"{beam.beams} beams" if beam.beams > 1 else "greedy"
    ui.log(f"eval {label}: {len(chosen):,} pairs ({len(order):,} sources) of {split}, decoding {how}")
    forced = _teacher_forced(model, batches, np.searchsorted(batches.kept, sorted(chosen)), batch_size, device)
    started = time.perf_counter()
    sources = [arrays.source_ids(pairs[0]).tolist() for pairs in order.values()]
    outputs, tokens = _decode(model, tokenizer, sources, batch_size, beam, prepared.eot_id)
    seconds = time.perf_counter() - started
    references = [[texts[i][1] for i in pairs] for pairs in order.values()]
    scores = sequence_scores(outputs, references, tokens=lambda text: encode(tokenizer, text))
    loss = forced["nll"] / forced["count"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": forced["correct"] / forced["count"],
            **scores, "pairs": len(chosen), "target_tokens": forced["count"], "beams": beam.beams,
            "decode_tokens_per_second": tokens / max(seconds, 1e-9),
            "outputs": dict(zip(order, outputs, strict=True))}


def pairs_perplexity(model: LanguageModel, prepared: Any, split: str, tokens: int) -> tuple[float, int]:
    """Teacher-forced perplexity over the split's first pairs holding about `tokens` target tokens
    (what `llmcli quantize` compares before and after); (perplexity, target tokens scored)."""
    arrays = prepared.arrays(split)
    batches = PairBatches(arrays, DEFAULT_BATCH, 0, 1, prepared.eot_id, source_limit=model.source_length,
                          target_limit=model.config.block_size)
    count = int(np.searchsorted(np.cumsum(batches.tgt_len + 1), tokens)) + 1
    forced = _teacher_forced(model, batches, np.arange(min(count, len(batches.kept))), DEFAULT_BATCH,
                             next(model.parameters()).device)
    return math.exp(min(forced["nll"] / forced["count"], 700.0)), forced["count"]


def first_sources(prepared: Any, split: str, count: int) -> list[list[int]]:
    """The source ids of the split's first `count` distinct sources."""
    arrays, order = prepared.arrays(split), _sources_in_order(prepared.texts(split), count)
    return [arrays.source_ids(pairs[0]).tolist() for pairs in order.values()]


def _sources_in_order(texts: list[tuple[str, str]], limit: int | None) -> dict[str, list[int]]:
    """Distinct sources in the split's order, each with the indices of its pairs (the first `limit`)."""
    order: dict[str, list[int]] = {}
    for i, (source, _) in enumerate(texts):
        if source in order or limit is None or len(order) < limit:
            order.setdefault(source, []).append(i)
    return order


@torch.inference_mode()
def _teacher_forced(model: LanguageModel, batches: PairBatches, positions: np.ndarray, batch_size: int,
                    device: torch.device) -> dict[str, float]:
    """Summed target nll, correct next tokens and target tokens (end tokens included)."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    ordered = positions[np.lexsort((batches.tgt_len[positions], batches.src_len[positions]))]
    for start in range(0, len(ordered), batch_size):
        inputs, labels = batches.collate(ordered[start:start + batch_size])
        logits = model(**{k: v.to(device) for k, v in inputs.items()}).float()
        labels = labels.to(device)
        nll += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
        count += int((labels != IGNORE).sum())
    return {"nll": nll, "correct": correct, "count": count}


def _decode(model: LanguageModel, tokenizer: Any, sources: list[list[int]], batch_size: int, beam: BeamOptions,
            eot: int) -> tuple[list[str], int]:
    """Each source's decoded text, and the tokens decoded (beam search: over all beams)."""
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    max_new = (model.context_length or model.config.block_size + 1) - 1
    if beam.beams > 1:
        search = BeamSearch(model, batch_size=batch_size, beams=beam.beams, eos_id=eot, vocab_size=vocab)
        settings = BeamSettings(beam.beams, max_new, 1.0 if beam.length_penalty is None else beam.length_penalty,
                                beam.early_stopping)
        found = search.run([[eot_id(tokenizer)]] * len(sources), settings, sources)
        return [decode(tokenizer, h[0].tokens, skip_special_tokens=True) for h in found], search.tokens
    engine = Engine(model, max_batch_size=min(batch_size, len(sources)), vocab_size=vocab)
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    ids = [engine.add([eot], params, stop_token_ids=[eot], source_ids=s) for s in sources]
    generated: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for ev in engine.step():
            if not (ev.finished and ev.finish_reason == "eot"):
                generated[ev.id].append(ev.token)
    return [decode(tokenizer, generated[i], skip_special_tokens=True) for i in ids], engine.stats.decode_tokens


def pairs_table(results: list[Any], percent: bool = False) -> Any:
    """The comparison table of seq2seq eval results (evaluate.EvalResult with task seq2seq)."""
    from rich.table import Table

    table = Table(title=None)
    table.add_column("checkpoint", overflow="fold")
    for name in ("step", "loss", "ppl", "acc", "exact", "PER", "WER", "BLEU", "chrF", "sources", "beams", "tok/s"):
        table.add_column(name, justify="right", no_wrap=True)
    best = min(r.metrics["wer"] for r in results)
    for r in results:
        m = r.metrics
        rate = [f"{100 * m[k]:.2f}%" if percent else f"{m[k]:.4f}" for k in ("accuracy", "exact_match", "per", "wer")]
        if len(results) > 1 and m["wer"] == best:
            rate[3] = f"[bold green]{rate[3]}[/]"
        table.add_row(r.checkpoint, "-" if r.step is None else str(r.step), f"{m['loss']:.4f}", f"{m['perplexity']:.2f}",
                      *rate, f"{m['bleu']:.2f}", f"{m['chrf']:.2f}", f"{m['sources']:,}", str(m["beams"]),
                      ui.format_count(m["decode_tokens_per_second"]))
    return table
