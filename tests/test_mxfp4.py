"""MXFP4 decoding against the format's definition, for every byte value and a range of scales."""

import itertools

import pytest
import torch

from gptoss_serve.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4


def e2m1(nibble: int) -> float:
    """FP4 E2M1 from its bits: sign, two exponent bits (bias 1), one mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if nibble & 0b1000 else 1.0
    exponent, mantissa = (nibble >> 1) & 0b11, nibble & 1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


@pytest.mark.parametrize("scale", [0, 1, 100, 119, 124, 126, 127, 128, 130, 150, 200, 254])
def test_every_byte_value_at_each_scale(scale):
    byte_values = torch.arange(256, dtype=torch.uint8).view(16, 16)  # 16 blocks of 16 bytes = all 256 bytes
    scales = torch.full((16,), scale, dtype=torch.uint8)
    got = dequantize_mxfp4(byte_values, scales, torch.float32).view(256, 2)
    for byte in range(256):
        low, high = byte & 0x0F, byte >> 4  # the low nibble is the earlier element
        # the spec's value, rounded to float32 (where 6 * 2**127 overflows to inf, as it must)
        want = torch.tensor([e2m1(low) * 2.0 ** (scale - 127), e2m1(high) * 2.0 ** (scale - 127)])
        assert torch.equal(got[byte], want), (byte, scale)


def test_element_order_within_rows_and_blocks():
    # blocks [rows=2, groups=3, 16]: element j of a row comes from group j // 32, byte (j % 32) // 2
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 130, (2, 3), dtype=torch.uint8, generator=g)
    got = dequantize_mxfp4(blocks, scales, torch.float32)  # [2, 96]
    for row, j in itertools.product(range(2), range(96)):
        byte = blocks[row, j // 32, (j % 32) // 2].item()
        nibble = byte & 0x0F if j % 2 == 0 else byte >> 4
        assert got[row, j].item() == e2m1(nibble) * 2.0 ** (scales[row, j // 32].item() - 127)


def test_bfloat16_output_is_exact_in_range():
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16)
    scales = torch.full((16,), 120, dtype=torch.uint8)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16).float(),
                       dequantize_mxfp4(blocks, scales, torch.float32))


def test_quantize_round_trips_representable_values():
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (4, 5, 16), dtype=torch.uint8, generator=g)
    blocks[..., 0] |= 0x07  # a magnitude-6 value in each block, so the block scale is recovered exactly
    scales = torch.randint(110, 140, (4, 5), dtype=torch.uint8, generator=g)
    values = dequantize_mxfp4(blocks, scales, torch.float32)
    blocks2, scales2 = quantize_mxfp4(values)
    assert torch.equal(dequantize_mxfp4(blocks2, scales2, torch.float32), values)


def test_rejects_mismatched_shapes_and_dtypes():
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_mxfp4(torch.zeros(2, 3, 16), torch.zeros(2, 3, dtype=torch.uint8))
