"""What a training step reads, for either task: micro-batches of (model inputs, labels).

A micro-batch is `(inputs, labels)`: `model(**inputs)` gives logits [B, T, vocab] for labels
[B, T], where IGNORE marks positions that are padding. Every batch is a function of (seed, step,
micro-batch index), as schedule.py explains, so resumed runs and several processes see exactly the
batches of one uninterrupted process.

* `WindowBatches` (data.task=lm): random windows of block_size tokens (schedule.RandomWindows),
  consecutive windows of parallel streams (schedule.StreamWindows, train.stateful), or windows that
  start at an example (finetune.ExampleWindows, data.format alpaca/chat).
* `PairBatches` (data.task=seq2seq): padded pairs bucketed by length. Each epoch sorts the pairs by
  (source length, target length) with random ties, cuts the order into batches of batch_size pairs
  and shuffles the batches, all from (seed, epoch); so every pair is seen once per epoch and a
  batch pads little. With train.batch_tokens the order is cut into batches of as many pairs as fit
  that many source + target tokens (padding included) instead. With train.pack_pairs each epoch
  shuffles the pairs (no sorting), cuts them into batches of batch_size pairs and packs each batch
  into as few rows as hold its pairs within the model's lengths (first fit, longest source first),
  with `source_segments` / `target_segments` numbering each token's pair (models/encoder_decoder.py).
  Decoder inputs are `<|endoftext|>` + target, labels target + `<|endoftext|>`. Pairs longer than
  the model takes are left out of training, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmcli.config import Config
from llmcli.errors import UserError
from llmcli.train.finetune import IGNORE, ExampleWindows
from llmcli.train.schedule import RandomWindows, StreamWindows, steps_per_epoch

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class WindowBatches:
    """Language-model windows (RandomWindows, StreamWindows, or finetune.ExampleWindows for alpaca/chat
    data) as (inputs, labels)."""

    def __init__(self, windows: RandomWindows | StreamWindows | ExampleWindows, per_step: int):
        self.windows, self.per_step = windows, per_step
        self.tokens_per_batch = windows.batch_size * windows.block_size

    def batch(self, step: int, index: int) -> Batch:
        x, y = self.windows.batch(step, index)
        return {"idx": x}, y

    def eval_batch(self, index: int) -> Batch:
        x, y = self.windows.eval_batch(index)
        return {"idx": x}, y

    def tokens(self, step: int, index: int) -> int:
        return self.tokens_per_batch

    def continues(self, step: int) -> bool:
        """Whether step `step` reads on where step - 1 stopped (StreamWindows), its states carried over."""
        return isinstance(self.windows, StreamWindows) and self.windows.continues(step)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens_per_batch * self.per_step

    @property
    def epoch_steps(self) -> int:
        return steps_per_epoch(len(self.windows.tokens), self.tokens_per_batch * self.per_step)


class PairBatches:
    """Bucketed, padded (source, target) pairs (see the module docstring); `per_step` micro-batches
    make one optimizer step (grad_accum x processes)."""

    def __init__(self, arrays: Any, batch_size: int, seed: int, per_step: int, eot: int, *,
                 source_limit: int, target_limit: int, eval_batches: int = 0, batch_tokens: int | None = None,
                 pack: bool = False):
        self.arrays, self.batch_size, self.seed, self.per_step, self.eot = arrays, batch_size, seed, per_step, eot
        self.batch_tokens, self.pack = batch_tokens, pack
        self.source_limit, self.target_limit = source_limit, target_limit
        src, tgt = arrays.source_lengths, arrays.target_lengths
        fits = (src <= source_limit) & (tgt + 1 <= target_limit)
        self.kept = np.flatnonzero(fits)
        self.dropped = int(len(src) - len(self.kept))
        if not len(self.kept):
            raise UserError(f"no pair fits the model: sources need <= {source_limit} tokens with their end token "
                            f"(model.source_block_size), targets <= {target_limit - 1} (model.block_size - 1)")
        self.src_len, self.tgt_len = src[self.kept], tgt[self.kept]
        if batch_tokens is not None and batch_tokens < source_limit + target_limit:
            raise UserError(f"train.batch_tokens={batch_tokens} cannot hold the longest pair the model takes "
                            f"({source_limit} source + {target_limit} target tokens)")
        self.n_batches = len(self._sorted_chunks(np.arange(len(self.kept)), np.random.default_rng(0))) \
            if batch_tokens else math.ceil(len(self.kept) / batch_size)
        self._epoch: tuple[int, list[np.ndarray]] | None = None
        self._eval = self._eval_batches(eval_batches) if eval_batches else []

    def _sorted_chunks(self, order: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """`order` (positions in self.kept) sorted by length with random ties, in batches."""
        ties = rng.random(len(order))
        order = order[np.lexsort((ties, self.tgt_len[order], self.src_len[order]))]
        if self.batch_tokens is None:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # Sorted by source length, a batch's widest source is its last; targets may vary.
        chunks, first, widest_target = [], 0, 0
        for i, pair in enumerate(order):
            widest_target = max(widest_target, self.tgt_len[pair] + 1)
            if (i + 1 - first) * (self.src_len[pair] + widest_target) > self.batch_tokens:
                chunks.append(order[first:i])
                first, widest_target = i, self.tgt_len[pair] + 1
        return [*chunks, order[first:]]

    def _batches_of_epoch(self, epoch: int) -> list[np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, 2, epoch])
            if self.pack:
                order = rng.permutation(len(self.kept))
                chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            else:
                chunks = self._sorted_chunks(np.arange(len(self.kept)), rng)
            self._epoch = (epoch, [chunks[i] for i in rng.permutation(len(chunks))])
        return self._epoch[1]

    def _eval_batches(self, count: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, 1])
        chosen = rng.permutation(len(self.kept))[:count * self.batch_size]
        return self._sorted_chunks(chosen, rng)

    def _chunk(self, step: int, index: int) -> np.ndarray:
        k = step * self.per_step + index
        return self._batches_of_epoch(k // self.n_batches)[k % self.n_batches]

    def batch(self, step: int, index: int) -> Batch:
        return self.collate(self._chunk(step, index))

    def eval_batch(self, index: int) -> Batch:
        return self.collate(self._eval[index % len(self._eval)])

    def tokens(self, step: int, index: int) -> int:
        return int(self.tgt_len[self._chunk(step, index)].sum()) + len(self._chunk(step, index))

    @property
    def tokens_per_step(self) -> float:
        return float(self.tgt_len.sum() + len(self.tgt_len)) / self.n_batches * self.per_step

    @property
    def epoch_steps(self) -> int:
        return max(1, math.ceil(self.n_batches / self.per_step))

    def collate(self, chunk: np.ndarray) -> Batch:
        """Padded sources [B, S] and their lengths, decoder inputs and labels [B, T]; with `pack`,
        rows of several pairs (`packed`)."""
        if self.pack:
            return self.packed(chunk)
        pairs = self.kept[chunk]
        sources = [self.arrays.source_ids(i) for i in pairs]
        targets = [self.arrays.target_ids(i) for i in pairs]
        width, length = max(map(len, sources)), max(map(len, targets)) + 1
        source = torch.full((len(pairs), width), self.eot, dtype=torch.long)
        idx = torch.full((len(pairs), length), self.eot, dtype=torch.long)
        labels = torch.full((len(pairs), length), IGNORE, dtype=torch.long)
        for b, (s, t) in enumerate(zip(sources, targets, strict=True)):
            source[b, :len(s)] = torch.from_numpy(s.astype(np.int64))
            t = torch.from_numpy(t.astype(np.int64))
            idx[b, 1:len(t) + 1] = t
            labels[b, :len(t)] = t
            labels[b, len(t)] = self.eot
        lengths = torch.tensor([len(s) for s in sources])
        return {"idx": idx, "source": source, "source_lengths": lengths}, labels


    def packed(self, chunk: np.ndarray) -> Batch:
        """The chunk's pairs in rows: sources [R, S] with source_segments, decoder inputs, labels and
        target_segments [R, T]; segment j + 1 is a row's j-th pair, 0 padding."""
        rows: list[list[int]] = []  # positions in self.kept, per row
        room: list[list[int]] = []  # source and target tokens each row has left
        for pair in sorted(chunk.tolist(), key=lambda p: -self.src_len[p]):
            need = (int(self.src_len[pair]), int(self.tgt_len[pair]) + 1)
            row = next((r for r, (s, t) in enumerate(room) if need[0] <= s and need[1] <= t), None)
            if row is None:
                rows.append([])
                room.append([self.source_limit, self.target_limit])
                row = len(rows) - 1
            rows[row].append(pair)
            room[row][0] -= need[0]
            room[row][1] -= need[1]
        width = max(self.source_limit - s for s, _ in room)
        length = max(self.target_limit - t for _, t in room)
        source = torch.full((len(rows), width), self.eot, dtype=torch.long)
        idx = torch.full((len(rows), length), self.eot, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        source_segments = torch.zeros((len(rows), width), dtype=torch.long)
        target_segments = torch.zeros((len(rows), length), dtype=torch.long)
        for r, pairs in enumerate(rows):
            s_at = t_at = 0
            for segment, pair in enumerate(pairs, start=1):
                s = torch.from_numpy(self.arrays.source_ids(self.kept[pair]).astype(np.int64))
                t = torch.from_numpy(self.arrays.target_ids(self.kept[pair]).astype(np.int64))
                source[r, s_at:s_at + len(s)] = s
                source_segments[r, s_at:s_at + len(s)] = segment
                idx[r, t_at + 1:t_at + len(t) + 1] = t
                labels[r, t_at:t_at + len(t)] = t
                labels[r, t_at + len(t)] = self.eot
                target_segments[r, t_at:t_at + len(t) + 1] = segment
                s_at, t_at = s_at + len(s), t_at + len(t) + 1
        return {"idx": idx, "source": source, "source_segments": source_segments,
                "target_segments": target_segments}, labels


@dataclass
class TrainingData:
    """The batches a run trains and validates on, and the tokenizer files its checkpoints carry."""

    train: WindowBatches | PairBatches
    val: WindowBatches | PairBatches
    tokenizer: bytes
    source_tokenizer: bytes | None  # seq2seq with a tokenizer of its own for the source


def training_data(prepared: Any, cfg: Config, per_step: int) -> TrainingData:
    """The batches of `prepared` (prepare.PreparedData or prepare_pairs.PreparedPairs) for `cfg`."""
    t, m = cfg.train, cfg.model
    if cfg.data.task != "seq2seq":
        train = WindowBatches(_windows(prepared, "train", cfg, t.seed, per_step if t.stateful else 0), per_step)
        val = WindowBatches(_windows(prepared, "val", cfg, t.seed + 1, 0), per_step)
        return TrainingData(train, val, prepared.tokenizer_path.read_bytes(), None)
    limits = dict(source_limit=m.source_context, target_limit=m.block_size)
    train = PairBatches(prepared.arrays("train"), t.batch_size, t.seed, per_step, prepared.eot_id,
                        batch_tokens=t.batch_tokens, pack=t.pack_pairs, **limits)
    val = PairBatches(prepared.arrays("val"), t.batch_size, t.seed + 1, per_step, prepared.eot_id,
                      eval_batches=t.eval_batches, **limits)
    source = prepared.source_tokenizer_path
    return TrainingData(train, val, prepared.tokenizer_path.read_bytes(), source.read_bytes() if source else None)


def _windows(prepared: Any, split: str, cfg: Config, seed: int,
             per_step: int) -> RandomWindows | StreamWindows | ExampleWindows:
    """The split's windows: consecutive ones of per_step x batch_size streams where `per_step` is not 0
    (train.stateful, the training split), else random ones (or one per example)."""
    tokens, block = prepared.tokens(split), cfg.model.block_size
    if (examples := prepared.examples(split)) is not None:
        return ExampleWindows(tokens, *examples, block, cfg.train.batch_size, seed, prepared.eot_id, split)
    if len(tokens) <= block + 1:
        raise UserError(f"model.block_size={block} needs more than {block + 1} tokens, but the {split} split "
                        f"of {cfg.data.source} has {len(tokens)} (in {prepared.dir})")
    if per_step:
        streams = per_step * cfg.train.batch_size
        if len(tokens) // streams < 2 * block + 1:
            raise UserError(f"train.stateful: the {split} split's {len(tokens)} tokens cut into {streams} streams "
                            f"(train.batch_size x grad_accum x processes) leave fewer than 2 windows of "
                            f"model.block_size={block} per stream")
        return StreamWindows(tokens, block, cfg.train.batch_size, streams, seed)
    return RandomWindows(tokens, block, cfg.train.batch_size, seed)
