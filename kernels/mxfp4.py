"""MXFP4 (OCP microscaling FP4) as gpt-oss stores its expert weights.

Each block of 32 values along the input (K) dimension is 16 bytes of FP4 E2M1 nibbles, low nibble first, plus
one uint8 E8M0 scale (exponent bias 127): value = FP4_VALUES[nibble] * 2**(scale - 127).
Tensors: blocks [..., num_blocks, 16] uint8, scales [..., num_blocks] uint8 -> values [..., num_blocks * 32].
"""

from __future__ import annotations

import torch

MXFP4_BLOCK_SIZE = 32  # values per scale
MXFP4_BYTES_PER_BLOCK = 16
E8M0_BIAS = 127

# FP4 E2M1 by nibble: bit 3 is the sign, bits 2..0 the magnitude.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def fp4_lut(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=dtype, device=device)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G * 32] in `dtype`.

    Exact in float32 (every FP4 value times a power of two is representable); bfloat16 is exact too except
    where the power of two leaves its exponent range.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = fp4_lut(blocks.device)
    low = lut[(blocks & 0x0F).long()]  # [..., G, 16] elements 0, 2, 4, ...
    high = lut[(blocks >> 4).long()]  # [..., G, 16] elements 1, 3, 5, ...
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32]
    exponents = scales.to(torch.int32) - E8M0_BIAS  # [..., G]
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8).

    Round to nearest FP4 value after choosing each block's scale so that its largest magnitude fits under 6.
    Used to make checkpoints from known float weights in tests; the random checkpoints draw bytes directly.
    """
    if x.shape[-1] % MXFP4_BLOCK_SIZE:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {MXFP4_BLOCK_SIZE}")
    x = x.float().reshape(*x.shape[:-1], -1, MXFP4_BLOCK_SIZE)  # [..., G, 32]
    amax = x.abs().amax(dim=-1).clamp_min(2.0 ** -126)  # [..., G]
    exponents = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # smallest power of two with amax/2^e <= 6
    scaled = x / torch.exp2(exponents).unsqueeze(-1)
    lut = fp4_lut(x.device)
    nibbles = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1).to(torch.uint8)  # [..., G, 32]
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # [..., G, 16]
    scales = (exponents + E8M0_BIAS).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()
