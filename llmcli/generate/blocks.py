"""The blocks of a paged KV cache: who holds which, and which full blocks can be shared (prefix caching).

`BlockPool` hands out block ids 0..num_blocks-1 and counts the sequences holding each. A block
that is full is keyed by a hash chain over the tokens it holds and all before them
(`chain_keys`: the key of block i hashes the key of block i-1 and block i's token ids; the chain's
root is the seq2seq source, since a decoder's keys depend on it): two sequences whose first i
blocks have the same key hold the same keys and values there, so a new sequence takes the cached
blocks instead of computing them (`share`). A shared block is only read: a sequence writes only
past its shared blocks, in blocks of its own, so copy-on-write never has to copy. A block nobody
holds any more keeps its contents and key, in least-recently-freed order, until the pool needs it
for something else (`allocate` evicts the oldest first). Pure Python: no tensors here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def root_key(source: Sequence[int] | None) -> int:
    """Where a chain of keys starts: the seq2seq source the decoder attends to (None: a language model)."""
    return hash(("source", tuple(source or ())))


def next_key(parent: int, tokens: Sequence[int]) -> int:
    """The key of a full block holding `tokens`, after the block keyed `parent`."""
    return hash((parent, tuple(tokens)))


def chain_keys(tokens: Sequence[int], block_len: int, root: int) -> list[int]:
    """The keys of the full blocks of `tokens` (len(tokens) // block_len of them), from chain root `root`."""
    keys, key = [], root
    for start in range(0, len(tokens) - block_len + 1, block_len):
        key = next_key(key, tokens[start:start + block_len])
        keys.append(key)
    return keys


class BlockPool:
    """Free list, reference counts and the prefix cache of `num_blocks` blocks of `block_len` tokens."""

    def __init__(self, num_blocks: int, block_len: int, *, prefix_cache: bool = True):
        if num_blocks < 1 or block_len < 1:
            raise ValueError(f"a block pool needs at least one block of one token; got {num_blocks} x {block_len}")
        self.num_blocks, self.block_len, self.prefix_cache = num_blocks, block_len, prefix_cache
        self.refs = [0] * num_blocks
        self._fresh = list(range(num_blocks - 1, -1, -1))  # free, holding nothing worth keeping
        self._cached: OrderedDict[int, None] = OrderedDict()  # free, still keyed: oldest first
        self._key_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        self.hit_tokens = 0  # prompt tokens found in the cache, of `queried_tokens` looked up
        self.queried_tokens = 0

    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out now (cached ones included: they are evicted when needed)."""
        return len(self._fresh) + len(self._cached)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.available

    def allocate(self, count: int) -> list[int]:
        """`count` blocks, each held once; fresh ones first, then the least recently freed cached ones."""
        if count > self.available:
            raise ValueError(f"{count} blocks asked for, {self.available} free")
        out = []
        for _ in range(count):
            if self._fresh:
                block = self._fresh.pop()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
            self.refs[block] = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Let go of each block once; one nobody holds stays cached if it has a key, else is fresh."""
        for block in blocks:
            if self.refs[block] < 1:
                raise ValueError(f"block {block} is not held")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._fresh.append(block)

    def share(self, keys: Sequence[int]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the first, each now held once more."""
        out = []
        if self.prefix_cache:
            for key in keys:
                block = self._block_of.get(key)
                if block is None:
                    break
                if self.refs[block] == 0:
                    del self._cached[block]
                self.refs[block] += 1
                out.append(block)
        return out

    def count_query(self, tokens: int, hits: int) -> None:
        """One prompt of `tokens` tokens was looked up and `hits` of them found (the hit rate)."""
        self.queried_tokens += tokens
        self.hit_tokens += hits

    def register(self, block: int, key: int) -> None:
        """`block` is full and holds what `key` names: later sequences may share it. A key already
        cached keeps its block (this one stays private, freed as fresh)."""
        if self.prefix_cache and key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
