"""int8 / int4 arithmetic: rounding error bounds and exact packing."""

from __future__ import annotations

import pytest
import torch

from llmcli.quantize.kernels import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from llmcli.quantize.modules import GROUP_SIZES


def test_int8_rounding_error_is_at_most_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.logspace(-4, 1, 40)[:, None]  # rows of very different sizes
    w[3] = 0.0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (40,)
    assert int(q.abs().max()) == 127 and torch.equal(q[3], torch.zeros(96, dtype=torch.int8))
    error = (w - dequantize_int8(q, scale)).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("group", GROUP_SIZES)
def test_int4_rounding_error_is_at_most_half_a_step_per_group(group):
    torch.manual_seed(1)
    w = torch.randn(24, 256) * torch.logspace(-3, 0, 24)[:, None]
    w[0, :group] = 0.0  # an all-zero group
    w[1, :group] = -torch.rand(group)  # only negative values: zero point 15
    w[2, :group] = torch.rand(group)  # only positive values: zero point 0
    w[3, 1::7] = 0.0  # zeros inside a group stay exactly zero
    packed, scale, zero = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128)
    assert scale.dtype == torch.float16 and scale.shape == (24, 256 // group)
    assert zero.dtype == torch.uint8 and zero.shape == (24, 256 // group // 2)
    q, zero = unpack_int4(packed), unpack_int4(zero)
    assert int(q.min()) == 0 and int(q.max()) == 15
    assert int(zero[1, 0]) == 15 and int(zero[2, 0]) == 0
    dequantized = dequantize_int4(packed, scale, pack_int4(zero), group)
    step = scale.float().repeat_interleave(group, dim=1)
    assert bool(((w - dequantized).abs() <= step / 2 * (1 + 1e-5)).all())
    assert bool((dequantized[w == 0] == 0).all())


def test_int4_with_an_odd_number_of_groups():
    torch.manual_seed(3)
    w = torch.randn(5, 96)  # 3 groups of 32 per row: the zero points are padded to 2 bytes
    packed, scale, zero = quantize_int4(w, 32)
    assert scale.shape == (5, 3) and zero.shape == (5, 2)
    step = scale.float().repeat_interleave(32, dim=1)
    assert bool(((w - dequantize_int4(packed, scale, zero, 32)).abs() <= step / 2 * (1 + 1e-5)).all())


def test_int4_pack_unpack_is_exact():
    signed = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(signed, signed)  # every value in both nibbles, odd and negative too
    packed = pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert len(set(packed.flatten().tolist())) == 256  # all byte values, so nothing collides
    assert torch.equal(unpack_int4(packed, signed=True), pairs)
    unsigned = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.int8)
    assert torch.equal(unpack_int4(pack_int4(unsigned), signed=False), unsigned)
    odd = torch.tensor([[1, -3, 5, 7, -7, 3]], dtype=torch.int8)
    assert pack_int4(odd).tolist() == [[0xD1, 0x75, 0x39]]  # low nibble = even column
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 5, dtype=torch.int8))
