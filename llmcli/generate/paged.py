"""The scheduler's side of a paged KV cache: which blocks each sequence holds.

Keys/values live in a pool of blocks of `block_len` tokens (blocks.py) instead of one full-context
slot per sequence, so memory follows actual lengths. The scheduler admits a request when a slot and
the blocks for its window are free (`place`), gives a sequence whose blocks are full one more
before its step (`extend`), and when none is free preempts the most recently admitted sequence:
its blocks and slot are freed (`release`) and it waits at the front of the queue, keeping its
tokens and random generator, until it is recomputed (its window's tokens prefilled again), so its
output is what it would have been. With prefix caching, the blocks a forward filled are keyed
(`register`); a window whose leading full blocks hold the same tokens as cached ones (a shared
system prompt, or a preempted sequence's own blocks) shares those blocks and is prefilled from
the first block it does not share, in a block of its own; its last token is always computed. A
pool smaller than the model's context narrows the window to the pool; a prompt it cannot hold is
refused when it is added.
"""

from __future__ import annotations

from typing import Any, Protocol

from llmcli.generate.blocks import BlockPool, chain_keys, next_key, root_key
from llmcli.generate.request import Request


class Sequence(Protocol):
    """What paging reads and writes of a scheduler.Sequence (scheduler.py imports this module)."""

    request: Request
    slot: int
    offset: int
    cached: int
    blocks: list[int]
    block_keys: list[int]


class PagedCache:
    """A paged decode state (`set_blocks(slot, blocks)`) and the pool its blocks come from; it keeps
    each scheduler.Sequence's `blocks` and `block_keys`."""

    def __init__(self, state: Any, num_blocks: int, block_len: int, *, prefix_cache: bool = True):
        self.state = state
        self.pool = BlockPool(num_blocks, block_len, prefix_cache=prefix_cache)

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.pool.num_blocks * self.pool.block_len

    def place(self, seq: Sequence) -> bool:
        """Blocks for the sequence's window: cached ones for its leading full blocks (its last token
        left out), fresh ones for the rest; `seq.cached` then says where prefill starts. False,
        holding nothing, when the pool lacks them."""
        pool, tokens = self.pool, seq.request.tokens[seq.offset:]
        keys = chain_keys(tokens[:-1], pool.block_len, root_key(seq.request.source_ids))
        shared = pool.share(keys)
        fresh = -(-len(tokens) // pool.block_len) - len(shared)
        if fresh > pool.available:
            pool.free(shared)
            return False
        pool.count_query(len(tokens), len(shared) * pool.block_len)
        seq.blocks, seq.block_keys = shared + pool.allocate(fresh), keys[:len(shared)]
        seq.cached = len(shared) * pool.block_len
        return True

    def bind(self, seq: Sequence) -> None:
        """Point the sequence's slot at its blocks."""
        self.state.set_blocks(seq.slot, seq.blocks)

    def full(self, seq: Sequence, position: int) -> bool:
        """Whether writing `position` needs a block the sequence does not hold yet."""
        return position >= len(seq.blocks) * self.pool.block_len

    def extend(self, seq: Sequence) -> bool:
        """One more block for the sequence; False when none is free."""
        if not self.pool.available or len(seq.blocks) >= self.state.blocks_per_slot:
            return False
        seq.blocks += self.pool.allocate(1)
        self.bind(seq)
        return True

    def register(self, seq: Sequence) -> None:
        """Key the blocks the last forward filled, so that later windows may share them."""
        size, r = self.pool.block_len, seq.request
        for i in range(len(seq.block_keys), seq.cached // size):
            parent = seq.block_keys[-1] if seq.block_keys else root_key(r.source_ids)
            start = seq.offset + i * size
            seq.block_keys.append(next_key(parent, r.tokens[start:start + size]))
            self.pool.register(seq.blocks[i], seq.block_keys[-1])

    def release(self, seq: Sequence) -> None:
        """The sequence lets go of its blocks (full ones stay cached); its slot points at none."""
        self.pool.free(seq.blocks)
        seq.blocks, seq.block_keys = [], []
        self.state.set_blocks(seq.slot, [])

    def use(self) -> dict[str, float]:
        """Blocks held and in all, and the prefix cache's hits over the prompt tokens looked up."""
        pool = self.pool
        return {"kv_usage": pool.used / pool.num_blocks, "kv_blocks_used": pool.used,
                "kv_blocks_total": pool.num_blocks, "prefix_hit_rate": pool.hit_rate,
                "prefix_hit_tokens": pool.hit_tokens, "prefix_queried_tokens": pool.queried_tokens}
