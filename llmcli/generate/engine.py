"""Continuous batching in token ids: a scheduler that plans each step and a runner that executes it.

`Engine.add(prompt_ids, params)` queues a request. Every `step()` asks the scheduler for a plan
(scheduler.py: which sequences run and how many of their tokens: admission, the token budget,
paging, preemption, sliding), has the runner execute it (runner.py: the model, its decode state,
sampling; speculation and a compiled decode step are its strategies) and gives the runner's tokens
back to the scheduler, which returns one `TokenEvent` per token. A sequence that finishes frees
its slot at once; the next queued request takes it in the following step. Each sequence has its
own sampling settings and random generator, so a seeded request gives the same tokens whatever
else is in the batch (greedy decoding gives the tokens of running it alone).

Context window. A prompt longer than the model's context keeps only its last `context_length`
tokens; a sequence that fills its slot continues from its last half (scheduler.py). A family
without a context limit never slides.

Paged KV cache (`kv_blocks`: families with `pages_decode_state`): memory follows actual lengths,
prompts that start alike share cached blocks, and a sequence that cannot grow is preempted and
recomputed later with the same output (generate/paged.py).

Sequence-to-sequence models. A request also carries its source's ids; when it takes a slot, the
source is encoded once (batched with the other sources admitted in the same step) and its memory
stays in the slot beside the decoder's cache, so each step attends to it at no further encoder
cost. Its prompt is the decoder's start token; a source longer than the encoder takes is refused.
It ends when its decoder's context is full (finish reason "length", as `transformers'`
max_length = block_size): a target longer than block_size - 1 was never trained, so its window
does not slide.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from llmcli.errors import UserError
from llmcli.generate.outputs import CacheUse, EngineStats, TokenEvent
from llmcli.generate.paged import PagedCache
from llmcli.generate.request import Request, RequestMetrics
from llmcli.generate.runner import ModelRunner
from llmcli.generate.scheduler import Scheduler
from llmcli.models.base import LanguageModel
from llmcli.options.sampling import SamplingParams

if TYPE_CHECKING:
    from llmcli.generate.compiled import Warmup


def check_source(model: LanguageModel, source_ids: Sequence[int] | None) -> list[int] | None:
    """The source ids a request to `model` needs (None for a language model), checked."""
    if model.task != "seq2seq":
        if source_ids is not None:
            raise UserError(f"model.arch={model.config.arch} is a language model: it takes a prompt, not a source")
        return None
    if not source_ids:
        raise UserError(f"model.arch={model.config.arch} maps a source to a target: the source has no tokens")
    ids = [int(t) for t in source_ids]
    if len(ids) > model.source_length:
        raise UserError(f"the source has {len(ids)} tokens (with its end token); this model's encoder takes at "
                        f"most {model.source_length} (model.source_block_size)")
    bad = [t for t in ids if not 0 <= t < model.source_vocab_size]
    if bad:
        raise UserError(f"source token id {bad[0]} is outside the model's source vocabulary "
                        f"(0..{model.source_vocab_size - 1})")
    return ids


class Engine:
    """Continuous-batching generation (see the module docstring).

    `max_batch_size` sequences run at once; more requests wait in a FIFO queue. The model should
    already be on its device and dtype; the decode state takes both from the model's parameters.
    Tokens with ids >= `vocab_size` (a model vocabulary padded beyond the tokenizer's) are never
    sampled. `prefill_tokens` bounds the padded tokens of one batched prefill forward;
    `max_num_batched_tokens` bounds the tokens of a whole step (chunked prefill; None: no bound).
    `kv_blocks` blocks of `block_len` tokens make the KV cache paged (None: a full-context slot per
    sequence). `speculation` (speculator.Speculation) decodes speculatively; `compile` compiles the
    decode step (compiled.py).
    """

    def __init__(self, model: LanguageModel, *, max_batch_size: int = 8, vocab_size: int | None = None,
                 prefill_tokens: int = 4096, kv_blocks: int | None = None, block_len: int = 16,
                 prefix_cache: bool = True, max_num_batched_tokens: int | None = None, speculation=None,
                 compile: bool = False):
        if max_batch_size < 1:
            raise UserError(f"batch size must be at least 1; got {max_batch_size}")
        if kv_blocks is not None and (kv_blocks < 1 or block_len < 1):
            raise UserError(f"a paged KV cache needs at least one block of one token; got {kv_blocks} blocks of "
                            f"{block_len}")
        if max_num_batched_tokens is not None and max_num_batched_tokens < max_batch_size:
            raise UserError(f"--max-num-batched-tokens {max_num_batched_tokens} is fewer than the sequences a step "
                            f"decodes (--max-batch-size {max_batch_size})")
        self.model = model.eval()
        self.runner = ModelRunner(model, slots=max_batch_size, vocab_size=vocab_size, prefill_tokens=prefill_tokens,
                                  kv_blocks=kv_blocks, block_len=block_len, speculation=speculation, compile=compile)
        paged = None
        if kv_blocks is not None:
            paged = PagedCache(self.runner.state, kv_blocks, block_len, prefix_cache=prefix_cache)
        self.max_len = model.context_length
        # The most tokens a slot holds before its window slides (a small pool narrows it).
        window = min(self.max_len, paged.capacity if paged else self.max_len) if self.max_len else None
        self.scheduler = Scheduler(max_batch_size, window, paged=paged, max_tokens=max_num_batched_tokens,
                                   lookahead=speculation.tokens if speculation is not None else 0,
                                   target_limit=self.max_len if model.task == "seq2seq" else None)
        self.speculative = speculation is not None
        self.max_batch_size = max_batch_size
        self._next_id = 0

    @property
    def stats(self) -> EngineStats:
        return self.scheduler.stats

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def max_prompt_tokens(self) -> int | None:
        """The most tokens a (truncated) prompt may have: what the paged pool holds; None: no limit."""
        paged = self.scheduler.paged
        return paged.capacity if paged is not None else None

    # -- requests ---------------------------------------------------------------------------

    def add(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
            stop_token_ids: Iterable[int] = (), source_ids: Sequence[int] | None = None,
            constraint: Any = None, adapter: int = 0) -> int:
        """Queue a request; returns its id. The prompt keeps its last context_length tokens; a
        seq2seq model needs `source_ids` (its end token included); a `constraint`
        (constrain.mask.RowConstraint) masks every token its format does not allow; `adapter` picks
        the LoRA adapter of its rows (Rows.adapters)."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise UserError("the prompt has no tokens")
        vocab = self.runner.model_vocab
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        if self.speculative and params.repetition_penalty != 1.0:
            raise UserError("speculative decoding takes no repetition penalty (it would change between guesses)")
        source = check_source(self.model, source_ids)
        dropped = max(0, len(ids) - self.max_len) if self.max_len else 0
        ids = ids[dropped:]
        limit = self.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            pool = self.scheduler.paged.pool
            raise UserError(f"the prompt has {len(ids)} tokens; the paged KV cache holds at most {limit} "
                            f"({pool.num_blocks} blocks of {pool.block_len})")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator()
        generator.manual_seed(seed)
        request = Request(id=self._next_id, params=params, prompt_ids=ids, source_ids=source, dropped_prompt_tokens=dropped,
                          stop_token_ids=frozenset(int(t) for t in stop_token_ids), seed=seed, generator=generator,
                          metrics=RequestMetrics(added_at=time.perf_counter()), tokens=list(ids),
                          constraint=constraint, adapter=adapter)
        self._next_id += 1
        self.scheduler.add(request)
        return request.id

    def cancel(self, request_id: int) -> None:
        """Drop a queued or running request (no further events for it); its slot is free at once."""
        self.scheduler.cancel(request_id)

    def get(self, request_id: int) -> Request | None:
        """A queued or running request (finished ones are forgotten after their last event)."""
        return self.scheduler.get(request_id)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def cache_use(self) -> CacheUse:
        """The decode state's load (serve's /health and /metrics)."""
        return self.scheduler.cache_use(self.max_len)

    @property
    def compiled_buckets(self) -> tuple[int, ...]:
        """The batch shapes the decode step is compiled for (none where it is not compiled)."""
        return tuple(self.runner.compiled.sizes) if self.runner.compiled is not None else ()

    def warm_up(self) -> Warmup | None:
        """Compile the decode step for every batch shape now, not on the first step of each (serve
        does it before it accepts a request); None where the step is not compiled."""
        return self.runner.compiled.warm_up() if self.runner.compiled is not None else None

    # -- stepping ----------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Plan, execute, update: one token (or a speculative round) for every sequence that runs."""
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        return self.scheduler.update(plan, self.runner.execute(plan))
