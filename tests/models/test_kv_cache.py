"""The paged cache's read straight from its pool against the gathered keys/values SDPA reads."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from llmcli.models.base import BucketRows, Rows
from llmcli.models.kv_cache import grouped_attention, paged_attention, paged_read


def gathered_attention(q, pool_k, pool_v, tables, mask):
    """The reference: every row's blocks gathered into a copy, kv heads repeated, then SDPA."""
    width, group = mask.shape[-1], q.shape[1] // pool_k.shape[2]
    k, v = (paged_read(pool, tables, width).transpose(1, 2).to(q.dtype).repeat_interleave(group, dim=1)
            for pool in (pool_k, pool_v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def pool_case(dtype, heads=4, kv_heads=2, block_len=4, blocks_per_row=5, dim=8):
    """Rows at different positions (one not decoding: -1) over a shuffled, non-contiguous pool."""
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 17, -1, 9, 19])
    n, num_blocks = len(positions), 40
    pool_k, pool_v = (torch.randn(num_blocks, block_len, kv_heads, dim, generator=gen).to(dtype) for _ in "kv")
    tables = torch.randperm(num_blocks, generator=gen)[:n * blocks_per_row].view(n, blocks_per_row)
    at = positions.clamp(min=0)
    mask = (torch.arange(blocks_per_row * block_len) <= at[:, None])[:, None, None]
    return torch.randn(n, heads, 1, dim, generator=gen), pool_k, pool_v, tables, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_the_read_from_the_pool_equals_the_gathered_read(dtype, kv_heads):
    case = pool_case(dtype, kv_heads=kv_heads)
    torch.testing.assert_close(paged_attention(*case), gathered_attention(*case), atol=1e-5, rtol=1e-5)


def test_the_compiled_read_equals_the_gathered_read_and_keeps_no_gathered_copy():
    from torch._inductor.utils import run_and_get_code

    case = pool_case(torch.float32)
    got, (code,) = run_and_get_code(torch.compile(paged_attention, dynamic=False), *case)
    torch.testing.assert_close(got, gathered_attention(*case), atol=1e-5, rtol=1e-5)
    n, width, kv_heads, dim = case[0].shape[0], case[4].shape[-1], case[1].shape[2], case[1].shape[3]
    sizes = [math.prod(int(d) for d in shape.split(",") if d.strip())
             for shape in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)]
    assert sizes and max(sizes) < n * width * kv_heads * dim, "inductor allocated a gathered copy of the keys"


def test_a_paged_bucket_step_attends_as_its_gathered_keys_do(tiny_model):
    model = tiny_model(preset="llama", n_kv_head=2)
    cache = model.new_paged_decode_state(4, 32, 4, dtype=torch.float32, device="cpu")
    for slot, blocks in enumerate([[5, 2, 9], [0], [30, 1, 7, 4, 12], []]):
        cache.set_blocks(slot, blocks)
    for pool in cache.k + cache.v:
        pool[:cache.num_blocks].normal_()
    positions = torch.tensor([10, 3, 18, -1])
    step = cache.bind(BucketRows(positions), 1, torch.device("cpu"))
    layer, config = 0, model.config
    q = torch.randn(4, config.n_head, 1, config.head_dim)
    k, v = (torch.randn(4, config.kv_heads, 1, config.head_dim) for _ in "kv")
    got = step.attend(layer, q, k, v)
    keys, values = (t.repeat_interleave(config.n_head // config.kv_heads, dim=1) for t in step.update(layer, k, v))
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("copy_bytes,group_bytes", [(0, 1), (0, 5120), (2**30, 0)])  # groups of 1 block, of 2-4, one copy
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_grouped_read_equals_the_gathered_read(copy_bytes, group_bytes, kv_heads):
    q, pool_k, pool_v, tables, mask = pool_case(torch.float32, kv_heads=kv_heads)
    mask = mask[..., :18]  # the eager step reads up to its furthest position, not a whole block
    got = grouped_attention(q, pool_k, pool_v, tables, mask, copy_bytes, group_bytes)
    torch.testing.assert_close(got, gathered_attention(q, pool_k, pool_v, tables, mask), atol=1e-5, rtol=1e-5)


def test_a_one_token_paged_step_attends_as_its_gathered_keys_do(tiny_model):
    model = tiny_model(preset="llama", n_kv_head=2)
    cache = model.new_paged_decode_state(3, 32, 4, dtype=torch.float32, device="cpu")
    for slot, blocks in enumerate([[5, 2, 9], [30, 1, 7, 4, 12], [0]]):
        cache.set_blocks(slot, blocks)
    for pool in cache.k + cache.v:
        pool[:cache.num_blocks].normal_()
    step = cache.bind(Rows((2, 0, 1), (2, 10, 18), (1, 1, 1)), 1, torch.device("cpu"))
    config = model.config
    q = torch.randn(3, config.n_head, 1, config.head_dim)
    k, v = (torch.randn(3, config.kv_heads, 1, config.head_dim) for _ in "kv")
    got = step.attend(0, q, k, v)
    keys, values = (t.repeat_interleave(config.n_head // config.kv_heads, dim=1) for t in step.update(0, k, v))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask))
    assert not hasattr(cache.bind(Rows((0,), (0,), (2,)), 2, torch.device("cpu")), "attend"), \
        "a prefill step reads its gathered keys/values"
