"""Where a transformer decoder keeps its keys and values between decode steps.

`KVCache` gives every sequence in flight one preallocated slot of the full context (simple, and
as fast as it gets, but memory follows the longest possible sequence). `PagedKVCache` keeps a pool
of fixed-size blocks instead, and a block table per slot saying which block holds which stretch of
positions (vLLM's PagedAttention layout): memory follows actual lengths, and a full block can be
shared by every sequence whose prompt starts with the same tokens (prefix caching). Which block a
slot gets is the engine's business (generate/blocks.py); the cache only writes and reads through
the tables. Both hand a forward the same kind of step object (`positions`, `mask`,
`update(layer, k, v)`), and a paged step returns exactly the keys/values a slot step would.
A paged step of one token per row also offers `attend(layer, q, k, v)`, which the transformer
takes instead where it has it: the step writes k/v and computes the attention itself, reading its
rows' blocks in place (compiled) or a group of blocks at a time (eager) rather than gathering
every block into one copy for SDPA.

A compiled decode step binds `BucketRows` instead of `Rows`: one token for every slot 0..n-1, the
positions a device tensor, so nothing about a step is a host-side integer the graph could
specialise on. A slot that does not decode in that step (position -1) writes its row into a
scratch slot (or block) that nothing reads, and attends to its own position 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmcli.config import ModelConfig
from llmcli.models.base import BucketRows, Rows


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """What one position's keys and values cost over every layer, in `dtype`."""
    heads = sum(config.kv_heads_in(layer) for layer in range(config.n_layer))
    return 2 * heads * config.head_dim * dtype.itemsize


def check_rows(rows: Rows, max_slots: int, length: int, limit: int, block_size: int, max_len: int) -> int:
    """The furthest position a forward of `length` tokens per row writes, + 1 (checked on the host)."""
    if len(rows.slots) == 0:
        raise ValueError("forward with a decode state needs rows: one slot, start and length per row")
    if min(rows.slots) < 0 or max(rows.slots) >= max_slots:
        raise ValueError(f"slots must be in [0, {max_slots}); got {min(rows.slots)}..{max(rows.slots)}")
    lo, hi = min(rows.starts), max(rows.starts) + length - 1
    if lo < 0 or hi >= limit:
        raise ValueError(f"positions must be in [0, {limit}) (block_size={block_size}, cache "
                         f"max_len={max_len}); got {lo}..{hi}")
    return hi + 1


def causal_view(rows: Rows, length: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token positions [B, T] and what each may attend to: mask [B, 1, T, width]."""
    positions = torch.tensor(rows.starts, device=device)[:, None] + torch.arange(length, device=device)
    return positions, (torch.arange(width, device=device) <= positions[:, :, None])[:, None]


class KVCache:
    """Preallocated keys/values, one row ("slot") per sequence in flight.

    Per layer, `k[layer]` and `v[layer]` have shape [max_slots + 1, n_kv_head, max_len, head_dim]
    (the last slot is the scratch one of BucketRows). A slot holds one sequence's keys at their
    absolute positions; a sequence that finishes gives its slot to the next one, which overwrites
    it from position 0 (stale entries further along are never attended, because attention only
    looks at key positions <= query position: rolling a sequence back is moving its position).
    """

    def __init__(self, config: ModelConfig, max_slots: int, max_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_slots = max_slots
        self.max_len = max_len or config.block_size
        self.block_size = config.block_size
        shapes = [(max_slots + 1, config.kv_heads_in(layer), self.max_len, config.head_dim)
                  for layer in range(config.n_layer)]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]

    def bind(self, rows: Rows | BucketRows, length: int, device: torch.device) -> CacheStep | BucketStep:
        """The cache as one forward of `length` tokens per row sees it (Rows are checked on the host)."""
        if isinstance(rows, BucketRows):
            return BucketStep(self, rows.positions, min(self.block_size, self.max_len))
        width = check_rows(rows, self.max_slots, length, min(self.block_size, self.max_len), self.block_size,
                           self.max_len)
        return CacheStep(self, rows, length, width, device)

    def copy_slots(self, sources: list[int], targets: list[int]) -> None:
        """Slot targets[i] becomes a copy of slot sources[i] (all read before any is written)."""
        src, dst = torch.tensor(sources), torch.tensor(targets)
        for tensors in (self.k, self.v):
            for t in tensors:
                t[dst.to(t.device)] = t[src.to(t.device)]



class CacheStep:
    """One forward's view of a KVCache: where each row writes, and what it may attend to.

    Rows reading slots lo, lo+1, ... see the cache as a slice (no copy); others gather their slots.
    Keys are read up to the furthest position written (`width`): nothing later can be attended.
    """

    def __init__(self, cache: KVCache, rows: Rows, length: int, width: int, device: torch.device):
        self.cache = cache
        self.slots = torch.tensor(rows.slots, device=device)
        self.positions, self.mask = causal_view(rows, length, width, device)  # [B, T], [B, 1, T, width]
        first, count = rows.slots[0], len(rows.slots)
        consecutive = rows.slots == tuple(range(first, first + count))
        self.kv_rows = slice(first, first + count) if consecutive else self.slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [B, H, T, D] at each row's positions; the rows' keys/values to attend."""
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        rows = self.slots[:, None]
        cache_k[rows, :, self.positions] = k.transpose(1, 2).to(cache_k.dtype)
        cache_v[rows, :, self.positions] = v.transpose(1, 2).to(cache_v.dtype)
        width = self.mask.shape[-1]
        if isinstance(self.kv_rows, slice):
            k, v = cache_k[self.kv_rows, :, :width], cache_v[self.kv_rows, :, :width]
        else:
            k = cache_k[:, :, :width].index_select(0, self.kv_rows)
            v = cache_v[:, :, :width].index_select(0, self.kv_rows)
        return k, v


def bucket_view(positions: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BucketRows' (live [n], positions [n] with -1 read as 0, mask [n, 1, 1, width])."""
    live = positions >= 0
    at = positions.clamp(min=0)
    return live, at, (torch.arange(width, device=positions.device) <= at[:, None])[:, None, None]


class BucketStep:
    """One compiled decode step's view of a KVCache: slots 0..n-1 read as a slice (no copy), every
    key of the context (`width`) masked by position; rows that do not decode write the scratch slot."""

    def __init__(self, cache: KVCache, positions: torch.Tensor, width: int):
        self.cache, self.n = cache, positions.shape[0]
        live, at, self.mask = bucket_view(positions, width)
        self.positions = at[:, None]  # [n, 1]
        self.slots = torch.where(live, torch.arange(self.n, device=positions.device), cache.max_slots)
        self.width = width

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v [n, H, 1, D] at each row's position; slots 0..n-1's keys/values."""
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        at = self.positions[:, 0]
        cache_k[self.slots, :, at] = k[:, :, 0].to(cache_k.dtype)
        cache_v[self.slots, :, at] = v[:, :, 0].to(cache_v.dtype)
        return cache_k[:self.n, :, :self.width], cache_v[:self.n, :, :self.width]


class PagedKVCache:
    """Keys/values in a pool of blocks of `block_len` positions, reached through a block table per slot.

    Per layer, `k[layer]` and `v[layer]` have shape [num_blocks + 2, block_len, n_kv_head, head_dim]
    (positions before heads: a row's blocks gathered in order are its keys, with no second copy);
    block `num_blocks` is all zeros and never written: every table entry not allocated points at
    it; the last one is BucketRows' scratch block.
    `tables` [max_slots, ceil(block_size / block_len)] says which block holds positions
    [i * block_len, (i + 1) * block_len) of each slot; the engine fills it (`set_blocks`) before a
    forward reaches those positions. Only each row's real tokens (`rows.lengths`) are written, so
    a right-padded prefill never touches a block, and a block shared by several slots is only read.
    """

    def __init__(self, config: ModelConfig, max_slots: int, num_blocks: int, block_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_len < 1:
            raise ValueError(f"a paged cache needs at least one block of one token; got {num_blocks} x {block_len}")
        self.max_slots, self.num_blocks, self.block_len = max_slots, num_blocks, block_len
        self.block_size = self.max_len = config.block_size
        self.null_block, self.scratch_block = num_blocks, num_blocks + 1
        shapes = [(num_blocks + 2, block_len, config.kv_heads_in(layer), config.head_dim)
                  for layer in range(config.n_layer)]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.blocks_per_slot = math.ceil(config.block_size / block_len)
        self.tables = torch.full((max_slots, self.blocks_per_slot), self.null_block, dtype=torch.long, device=device)
        self.held = [0] * max_slots  # blocks allocated per slot (host side, for the checks)

    def set_blocks(self, slot: int, blocks: Sequence[int]) -> None:
        """Slot `slot` holds positions 0.. in `blocks`, in order (empty: the slot holds nothing)."""
        if len(blocks) > self.blocks_per_slot or any(not 0 <= b < self.num_blocks for b in blocks):
            raise ValueError(f"a slot holds at most {self.blocks_per_slot} blocks in [0, {self.num_blocks}); "
                             f"got {list(blocks)}")
        row = list(blocks) + [self.null_block] * (self.blocks_per_slot - len(blocks))
        self.tables[slot] = torch.tensor(row, dtype=torch.long)
        self.held[slot] = len(blocks)

    def bind(self, rows: Rows | BucketRows, length: int, device: torch.device) -> PagedStep | PagedBucketStep:
        """The cache as one forward of `length` tokens per row sees it (Rows are checked on the host)."""
        if isinstance(rows, BucketRows):
            return PagedBucketStep(self, rows.positions)
        width = check_rows(rows, self.max_slots, length, self.block_size, self.block_size, self.max_len)
        for slot, start, count in zip(rows.slots, rows.starts, rows.lengths, strict=True):
            if start + count > self.held[slot] * self.block_len:
                raise ValueError(f"slot {slot} holds {self.held[slot]} blocks of {self.block_len}: positions "
                                 f"{start}..{start + count - 1} need more")
        return (PagedDecodeStep if length == 1 else PagedStep)(self, rows, length, width, device)


class PagedStep:
    """One forward's view of a PagedKVCache: the same positions and mask as a CacheStep; keys and
    values written into each row's blocks and gathered back through its table, `width` wide."""

    def __init__(self, cache: PagedKVCache, rows: Rows, length: int, width: int, device: torch.device):
        self.cache = cache
        self.positions, self.mask = causal_view(rows, length, width, device)
        tables = cache.tables[torch.tensor(rows.slots, device=cache.tables.device)]
        self.read = tables[:, :math.ceil(width / cache.block_len)]  # [B, blocks to read]
        where = tables.gather(1, self.positions // cache.block_len), self.positions % cache.block_len
        self.real = None  # which [B, T] entries are real tokens (None: all of them)
        if min(rows.lengths) < length:
            self.real = torch.arange(length, device=device) < torch.tensor(rows.lengths, device=device)[:, None]
            where = tuple(w[self.real] for w in where)
        self.blocks, self.offsets = (w.flatten() for w in where)  # where each real token is written

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this step's real k/v [B, H, T, D] into their blocks."""
        for pool, new in ((self.cache.k[layer], k), (self.cache.v[layer], v)):
            new = new.transpose(1, 2)  # [B, T, H, D]
            new = new[self.real] if self.real is not None else new.flatten(0, 1)
            pool[self.blocks, self.offsets] = new.to(pool.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`write`, then the rows' keys/values to attend [B, H, width, D], gathered from their blocks."""
        self.write(layer, k, v)
        return tuple(gather_blocks(pool[layer], self.read, self.mask.shape[-1]).transpose(1, 2)
                     for pool in (self.cache.k, self.cache.v))


class PagedDecodeStep(PagedStep):
    """A PagedStep of one token per row, which attends group by group of blocks (`attend`) rather
    than through one copy of every block its rows read."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`write`, then each row's attention output [B, H, 1, D] (grouped_attention)."""
        self.write(layer, k, v)
        return grouped_attention(q, self.cache.k[layer], self.cache.v[layer], self.read, self.mask)


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor, width: int) -> torch.Tensor:
    """The blocks of each row's table [B, n] copied in order from `pool` [N, block_len, H, D]: the
    row's keys (or values) at positions 0..width-1, [B, width, H, D]."""
    B, n = tables.shape
    return pool.index_select(0, tables.flatten()).view(B, n * pool.shape[1], *pool.shape[2:])[:, :width]


# grouped_attention's copies of keys (per layer and step, as many again for values): a read up to
# COPY_BYTES is one copy; a larger one, which glibc's malloc always maps fresh (its largest mmap
# threshold is 32 MiB), goes in groups of GROUP_BYTES (docs/benchmarks.md measures both).
COPY_BYTES, GROUP_BYTES = 32 * 2**20, 4 * 2**20


def grouped_attention(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, tables: torch.Tensor,
                      mask: torch.Tensor, copy_bytes: int = COPY_BYTES, group_bytes: int = GROUP_BYTES
                      ) -> torch.Tensor:
    """One query per row, q [B, H, 1, D], over its keys/values in the blocks of `tables` [B, n].
    A small read is one copy of every block, through SDPA; a large one is copied a group of blocks
    at a time with an online softmax across groups (flash-decoding's split), since a large fresh
    copy costs more to fault into memory than to fill. `mask` [B, 1, 1, width]: where a row may attend."""
    B, heads, _, dim = q.shape
    block_len, kv_heads = pool_k.shape[1], pool_k.shape[2]
    per_block = B * block_len * kv_heads * dim * q.element_size()
    if per_block * tables.shape[1] <= copy_bytes:  # 1) one copy: SDPA over it (kv heads repeated)
        k, v = (gather_blocks(pool, tables, mask.shape[-1]).transpose(1, 2).to(q.dtype) for pool in (pool_k, pool_v))
        if kv_heads != heads:
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # 2) groups: running max, normalizer and weighted sum per query head, in float32
    qg = q.float().view(B, kv_heads, heads // kv_heads, dim) * (1.0 / math.sqrt(dim))  # [B, Hkv, G, D]
    mask = F.pad(mask.view(B, 1, 1, -1), (0, tables.shape[1] * block_len - mask.shape[-1]))
    top = torch.full((B, kv_heads, heads // kv_heads, 1), float("-inf"), device=q.device)
    total, out = torch.zeros_like(top), torch.zeros_like(qg)
    size = max(1, group_bytes // per_block)  # blocks per group
    for first in range(0, tables.shape[1], size):
        group = tables[:, first:first + size]
        k, v = (gather_blocks(pool, group, group.shape[1] * block_len).float().permute(0, 2, 1, 3)
                for pool in (pool_k, pool_v))  # [B, Hkv, positions, D]
        at = slice(first * block_len, (first + group.shape[1]) * block_len)
        scores = (qg @ k.transpose(-2, -1)).masked_fill(~mask[..., at], float("-inf"))
        new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
        weights, rescale = torch.exp(scores - new_top), torch.exp(top - new_top)
        total = total * rescale + weights.sum(-1, keepdim=True)
        out, top = out * rescale + weights @ v, new_top
    return (out / total).view(B, heads, 1, dim).to(q.dtype)


def paged_read(pool: torch.Tensor, tables: torch.Tensor, width: int) -> torch.Tensor:
    """Each row's keys (or values) at positions 0..width-1 [n, width, H, D], read through its block
    table [n, blocks] from `pool` [N, block_len, H, D]: a gather in eager; under torch.compile, an
    indexed load that inductor fuses into whatever consumes it."""
    at = torch.arange(width, device=pool.device)
    return pool[tables[:, at // pool.shape[1]], at % pool.shape[1]]


def paged_attention(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor, tables: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """One query per row, q [n, H, 1, D], attending to its keys/values straight from the pools through
    its block table (no [n, S, H, D] copy under torch.compile); `mask` [n, 1, 1, S] is True where a
    row may attend. Grouped kv heads are shared by H / H_kv query heads; the sums run in float32."""
    n, heads, _, dim = q.shape
    width, kv_heads = mask.shape[-1], pool_k.shape[2]
    q = q.float().view(n, 1, kv_heads, heads // kv_heads, dim)
    # 1) scores [n, S, H_kv, G]: each query head against each key of its kv head
    scores = (q * paged_read(pool_k, tables, width).float()[:, :, :, None]).sum(-1) * (1.0 / math.sqrt(dim))
    # 2) softmax over the positions a row may attend
    weights = torch.softmax(scores.masked_fill(~mask.view(n, width, 1, 1), float("-inf")), dim=1)
    # 3) the weighted sum of the values [n, H_kv, G, D]
    y = (weights[..., None] * paged_read(pool_v, tables, width).float()[:, :, :, None]).sum(1)
    return y.reshape(n, heads, 1, dim)


class PagedBucketStep:
    """One compiled decode step's view of a PagedKVCache: slots 0..n-1 write into their blocks (rows
    that do not decode: the scratch block) and attend to every block of their tables, masked by
    position, straight from the pool (`attend`); `update` also returns the gathered keys/values."""

    def __init__(self, cache: PagedKVCache, positions: torch.Tensor):
        self.cache, n, size = cache, positions.shape[0], cache.block_len
        width = cache.blocks_per_slot * size
        live, at, self.mask = bucket_view(positions, width)
        self.positions = at[:, None]  # [n, 1]
        self.tables = cache.tables[:n]
        self.blocks = torch.where(live, self.tables.gather(1, (at // size)[:, None])[:, 0], cache.scratch_block)
        self.offsets = at % size

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this step's k/v [n, H, 1, D] at each row's position."""
        for pool, new in ((self.cache.k[layer], k), (self.cache.v[layer], v)):
            pool[self.blocks, self.offsets] = new[:, :, 0].to(pool.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`write`, then every block of the rows' tables gathered: keys/values [n, H, S, D]."""
        self.write(layer, k, v)
        return tuple(gather_blocks(pool[layer], self.tables, self.mask.shape[-1]).transpose(1, 2)
                     for pool in (self.cache.k, self.cache.v))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`write`, then each row's attention output [n, H, 1, D] read from the pool (paged_attention)."""
        self.write(layer, k, v)
        return paged_attention(q, self.cache.k[layer], self.cache.v[layer], self.tables, self.mask).to(q.dtype)
