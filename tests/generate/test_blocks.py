"""The block pool of the paged KV cache: reference counts, the prefix cache's keys, sharing, eviction."""

from __future__ import annotations

import pytest

from llmcli.generate.blocks import BlockPool, chain_keys, root_key


def test_allocate_and_free_count_references():
    pool = BlockPool(4, 2)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2] and pool.used == 3 and pool.available == 1
    with pytest.raises(ValueError, match="2 blocks asked for, 1 free"):
        pool.allocate(2)
    pool.free(a[:1])
    assert pool.used == 2 and pool.refs[a[0]] == 0
    with pytest.raises(ValueError, match="is not held"):
        pool.free(a[:1])


def test_keys_chain_over_the_prefix_and_the_source():
    root = root_key(None)
    keys = chain_keys([1, 2, 3, 4, 5], 2, root)
    assert len(keys) == 2 and keys == chain_keys([1, 2, 3, 4], 2, root)
    assert chain_keys([9, 9, 3, 4], 2, root)[1] != keys[1]  # same block, other prefix
    assert chain_keys([1, 2], 2, root_key([7]))[0] != keys[0]  # same tokens, other source


def test_registered_blocks_are_shared_and_counted():
    pool = BlockPool(6, 2)
    keys = chain_keys([1, 2, 3, 4], 2, root_key(None))
    first = pool.allocate(2)
    for block, key in zip(first, keys, strict=True):
        pool.register(block, key)
    assert pool.share(keys) == first and [pool.refs[b] for b in first] == [2, 2]
    assert pool.share(chain_keys([1, 2, 9, 9], 2, root_key(None))) == first[:1]  # diverges in block 2
    pool.count_query(5, 4)
    assert pool.hit_rate == 0.8
    assert BlockPool(6, 2, prefix_cache=False).share(keys) == []


def test_freed_blocks_stay_cached_until_evicted_oldest_first():
    pool = BlockPool(3, 2)
    root = root_key(None)
    blocks = pool.allocate(3)
    keys = [chain_keys([t, t], 2, root)[0] for t in (1, 2, 3)]
    for block, key in zip(blocks, keys, strict=True):
        pool.register(block, key)
    pool.free([blocks[1]])
    pool.free([blocks[0]])
    pool.free([blocks[2]])
    assert pool.available == 3 and pool.used == 0
    assert pool.share([keys[0]]) == [blocks[0]] and pool.available == 2  # a hit takes it out of the cache
    assert pool.allocate(1) == [blocks[1]]  # the least recently freed goes first
    assert pool.share([keys[1]]) == [] and pool.share([keys[2]]) == [blocks[2]]


def test_a_key_already_cached_keeps_its_block():
    pool = BlockPool(2, 2)
    key = chain_keys([1, 2], 2, root_key(None))[0]
    a, b = pool.allocate(2)
    pool.register(a, key)
    pool.register(b, key)  # the same tokens computed twice: b stays private
    pool.free([a, b])
    assert pool.share([key]) == [a]
    assert pool.allocate(1) == [b]
