"""The runner: the model, its decode state and sampling; it executes a scheduler's StepPlan.

A step is at most three kinds of forward, each a small free function below: the sources of newly
admitted seq2seq sequences are encoded into their slots (`encode_sources`), the decoding
sequences advance one token each (`decode`: one token per row at its position; compiled for a
bounded set of batch shapes where that is on, compiled.py), and prompt chunks are written from
their start positions (`prefill`, chunks of like lengths batched together with little padding).
Then one token is sampled for every row that needs one, each with its own settings and random
generator, so a seeded request gives the same tokens whatever else is in the batch.

With speculation (speculation.py) decoding rows instead feed their last token and up to
`lookahead` guesses in one forward, and each row keeps its own number of them.

On the CPU the runner decodes with a copy of the model whose large float32 Linear layers are
packed for oneDNN (device.packed_for_decoding): the model it was given is not changed. A compiled
step compiles the unpacked model (inductor fuses its own matrix products and cannot lower the
packed op).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from llmcli.constrain.mask import mask_logits
from llmcli.device import packed_for_decoding
from llmcli.generate.sampling import apply_repetition_penalty, sample
from llmcli.generate.scheduler import Chunk, Decode, StepOutput, StepPlan
from llmcli.generate.scheduler import Sequence as Seq
from llmcli.models.base import LanguageModel, Rows

# --------------------------------------------------------------------------------------------
# The hot path


def decode(model: LanguageModel, state, tokens: torch.Tensor, slots: Sequence[int],
           positions: Sequence[int], adapters: Sequence[int] | None = None) -> torch.Tensor:
    """Next-token logits [n, V] of n rows, each fed one token (`tokens` [n, 1]) at its position
    (`adapters`: each row's LoRA adapter, llmcli/adapters.py; None: the base)."""
    return model(tokens, state=state, rows=Rows(slots, positions, [1] * len(slots), adapters))[:, -1]


def padded(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Token ids [n, longest], each row right-padded with zeros."""
    idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, ids in enumerate(rows):
        idx[i, :len(ids)] = torch.tensor(ids)
    return idx.to(device)


def prefill(model: LanguageModel, state, tokens: Sequence[Sequence[int]], slots: Sequence[int],
            starts: Sequence[int], device: torch.device, adapters: Sequence[int] | None = None) -> torch.Tensor:
    """Logits [n, V] after each row's last token, its `tokens` written from its start position."""
    out = model(padded(tokens, device), state=state, rows=Rows(slots, starts, map(len, tokens), adapters))
    last = torch.tensor([len(t) - 1 for t in tokens], device=device)
    return out[torch.arange(len(tokens), device=device), last]


def encode_sources(model: LanguageModel, state, sources: Sequence[Sequence[int]], slots: Sequence[int],
                   device: torch.device) -> None:
    """seq2seq: run the encoder over each source into its slot (right-padded batch)."""
    model.encode(padded(sources, device), state=state, rows=Rows(slots, [0] * len(sources), map(len, sources)))


def batched(items: list, size_of, max_tokens: int, start_of=lambda item: 0, limit: int | None = None) -> list[list]:
    """Consecutive items batched while the padded batch (rows x the longest) stays within `max_tokens`
    and, with a `limit`, every row's padding stays below that position (a chunk's start + the longest)."""
    groups: list[list] = []
    for item in items:
        group = groups[-1] + [item] if groups else []
        longest = max(map(size_of, group), default=0)
        if group and longest * len(group) <= max_tokens and (
                limit is None or max(map(start_of, group)) + longest <= limit):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


# --------------------------------------------------------------------------------------------


class ModelRunner:
    """Executes StepPlans on `model` (see the module docstring).

    `slots` sequences fit the decode state: full-context slots, or with `kv_blocks` a paged KV
    cache of that many blocks of `block_len` tokens. Ids >= `vocab_size` (a model vocabulary
    padded beyond the tokenizer's) are never sampled. `prefill_tokens` bounds the padded tokens
    of one batched prefill (its logits are [rows, length, vocab] floats). `speculation`
    (speculator.Speculation) makes decoding speculative; `compile` compiles the decode step
    (compiled.py).
    """

    def __init__(self, model: LanguageModel, *, slots: int, vocab_size: int | None = None, prefill_tokens: int = 4096,
                 kv_blocks: int | None = None, block_len: int = 16, speculation=None, compile: bool = False):
        self.model = model.eval()
        self.decoder = packed_for_decoding(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.slots = slots
        if kv_blocks is None:
            self.state = model.new_decode_state(slots, model.context_length, dtype=self.dtype, device=self.device)
        else:
            self.state = model.new_paged_decode_state(slots, kv_blocks, block_len, dtype=self.dtype, device=self.device)
        self.model_vocab = model.config.vocab_size
        self.vocab_size = min(vocab_size or self.model_vocab, self.model_vocab)
        self.prefill_tokens = prefill_tokens
        self._seen: torch.Tensor | None = None  # [slots, V] bool, for repetition penalties
        self.speculator = speculation.start(self) if speculation is not None else None
        self.compiled = None
        if compile:
            from llmcli.generate.compiled import CompiledDecode

            self.compiled = CompiledDecode(self.model, self.state, slots, self.vocab_size)

    def decode(self, tokens: Sequence[int], slots: Sequence[int], positions: Sequence[int],
               adapters: Sequence[int] | None = None) -> torch.Tensor:
        """Next-token logits [n, V]: each row's token at its position in its slot (compiled where on,
        and no row uses a LoRA adapter)."""
        return self.decode_argmax(tokens, tuple(slots), positions, adapters)[0]

    def decode_argmax(self, tokens: Sequence[int], slots: tuple[int, ...], positions: Sequence[int],
                      adapters: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`decode`'s logits and, from a compiled step, each row's arg-max over the vocabulary (None eager)."""
        if self.compiled is not None and not any(adapters or ()):
            return self.compiled(tokens, slots, positions)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        return decode(self.decoder, self.state, ids, slots, positions, adapters), None

    # -- a step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        """Run the plan's forwards and sample its tokens (see the module docstring)."""
        if plan.decode_only and self.speculator is None:
            return self._decode_step(plan)
        for seq in plan.admitted:
            self._admit(seq)
        encode_seconds = self._encode([s for s in plan.admitted if s.request.source_ids is not None])
        rows: list[Seq] = []
        logits: list[torch.Tensor] = []
        decoded: list[list[int]] = []
        proposed: list[int] = []
        decode_seconds = 0.0
        if plan.decode and self.speculator is not None:
            started = time.perf_counter()
            decoded, proposed = self.speculator.round(plan.decode)
            decode_seconds = self._since(started)
        elif plan.decode:
            started = time.perf_counter()
            logits.append(self._decode(plan.decode))
            decode_seconds = self._since(started)
            rows += [d.seq for d in plan.decode]
        prefill_seconds, chunk_seconds = self._prefill(plan.prefill, rows, logits)
        sampled: list[int] = []
        started = time.perf_counter()
        if rows:
            sampled = self.sample(rows, torch.cat(logits) if len(logits) > 1 else logits[0]).tolist()
        sample_seconds = time.perf_counter() - started
        if not decoded and plan.decode:
            decoded = [[t] for t in sampled[:len(plan.decode)]]
            sampled = sampled[len(plan.decode):]
        return StepOutput(decoded, sampled, decode_seconds, prefill_seconds, chunk_seconds, encode_seconds,
                          sample_seconds, proposed)

    def _decode_step(self, plan: StepPlan) -> StepOutput:
        """The steady state: every running sequence decodes one token, nothing else runs. Rows that
        all take the arg-max (plan.argmax) use the one the compiled graph computed."""
        seqs = plan.sequences
        started = time.perf_counter()
        logits, greedy = self.decode_argmax([s.request.tokens[-1] for s in seqs], plan.slots,
                                            [s.cached for s in seqs], plan.adapters)
        decode_seconds = self._since(started)
        started = time.perf_counter()
        if greedy is None or not plan.argmax or self._seen is not None:
            greedy = self.sample(seqs, logits, plan.argmax)
        tokens = greedy.tolist()
        return StepOutput([[t] for t in tokens], [], decode_seconds, 0.0, [],
                          sample_seconds=time.perf_counter() - started)

    def _decode(self, rows: Sequence[Decode]) -> torch.Tensor:
        seqs = [d.seq for d in rows]
        return self.decode([s.request.tokens[-1] for s in seqs], [s.slot for s in seqs], [s.cached for s in seqs],
                           [s.request.adapter for s in seqs])

    def _prefill(self, chunks: Sequence[Chunk], rows: list[Seq], logits: list[torch.Tensor]
                 ) -> tuple[float, list[float]]:
        """Prefill the chunks, prompts of like lengths batched together; the logits of the chunks
        that sample join `logits` (their sequences `rows`). (Seconds in all, seconds per chunk.)"""
        seconds: dict[int, float] = {}
        last: dict[int, torch.Tensor] = {}
        total = 0.0
        for group in batched(sorted(chunks, key=lambda c: c.count), lambda c: c.count, self.prefill_tokens,
                             lambda c: c.start, self.model.context_length):
            started = time.perf_counter()
            tokens = [c.seq.request.tokens[c.seq.offset + c.start:c.seq.offset + c.start + c.count] for c in group]
            out = prefill(self.decoder, self.state, tokens, [c.seq.slot for c in group], [c.start for c in group],
                          self.device, [c.seq.request.adapter for c in group])
            took = self._since(started)
            total += took
            for i, chunk in enumerate(group):
                seconds[id(chunk)] = took
                last[id(chunk)] = out[i:i + 1]
        for chunk in chunks:  # in the plan's order
            if chunk.samples:
                logits.append(last[id(chunk)])
                rows.append(chunk.seq)
        return total, [seconds[id(c)] for c in chunks]

    def _encode(self, seqs: list[Seq]) -> float:
        started = time.perf_counter()
        for group in batched(seqs, lambda s: len(s.request.source_ids), self.prefill_tokens):
            encode_sources(self.decoder, self.state, [s.request.source_ids for s in group], [s.slot for s in group],
                           self.device)
        return self._since(started) if seqs else 0.0

    def _since(self, started: float) -> float:
        """Seconds since `started`, once the device has finished the work queued so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    # -- sampling ---------------------------------------------------------------------------

    def _admit(self, seq: Seq) -> None:
        """A sequence took a slot: the slot's seen tokens (repetition penalty) and draft state are its own."""
        if self.speculator is not None:
            self.speculator.admit(seq)
        if seq.request.params.repetition_penalty == 1.0 and self._seen is None:
            return
        if self._seen is None:
            self._seen = torch.zeros(self.slots, self.model_vocab, dtype=torch.bool, device=self.device)
        self._seen[seq.slot] = False
        self._seen[seq.slot, torch.tensor(seq.request.tokens, device=self.device)] = True

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """Ids the tokenizer lacks (a padded model vocabulary) are never proposed or sampled."""
        if self.vocab_size < logits.shape[-1]:
            logits = logits.clone()
            logits[..., self.vocab_size:] = -math.inf
        return logits

    def sample(self, rows: Sequence[Seq], logits: torch.Tensor, argmax: bool = False) -> torch.Tensor:
        """One token per row of `logits` [n, V] with each row's sequence's settings (and its format's
        mask, constrain/mask.py); `argmax`: every row is greedy and unconstrained (Seq.argmax)."""
        if argmax:
            tokens = logits[:, :self.vocab_size].argmax(-1)
            if self._seen is not None:
                self._seen[torch.tensor([s.slot for s in rows], device=logits.device), tokens] = True
            return tokens
        logits = mask_logits(logits, [s.request.constraint for s in rows])
        params = [s.request.params for s in rows]
        if all(p.greedy for p in params) and not any(p.repetition_penalty != 1.0 for p in params):
            tokens = logits[:, :self.vocab_size].argmax(-1)  # the arg-max of the masked logits
        else:
            tokens = self._sample(rows, params, self.masked(logits))
        if self._seen is not None:
            self._seen[torch.tensor([s.slot for s in rows], device=logits.device), tokens] = True
        return tokens

    def _sample(self, rows: list[Seq], params: list, logits: torch.Tensor) -> torch.Tensor:
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = self._seen[torch.tensor([s.slot for s in rows], device=self._seen.device)]
            penalty = torch.tensor([p.repetition_penalty for p in params], device=logits.device)
            logits = apply_repetition_penalty(logits, seen, penalty)
        if all(p.greedy for p in params):
            return logits.argmax(-1)

        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(logits.device, non_blocking=True)

        # One uniform per sampled token from each sequence's own generator: a seeded request
        # draws the same numbers whatever else is in the batch.
        uniforms = [0.0 if p.greedy else float(torch.rand((), generator=s.request.generator))
                    for s, p in zip(rows, params, strict=True)]
        return sample(logits, per_row([p.temperature for p in params], torch.float32),
                      per_row([p.top_k for p in params], torch.long), per_row([p.top_p for p in params], torch.float32),
                      per_row([p.min_p for p in params], torch.float32), per_row(uniforms, torch.float32))
