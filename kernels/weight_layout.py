"""The layouts the MoE kernels read MXFP4 expert weights in, made once at load (TritonKernels.prepare_weights)
from the checkpoint's, and their inverses: same bytes count, same scales, still MXFP4.

- `split_nibbles`: byte j of each 16-byte block holds elements j and j + 16 (the checkpoint's: 2j and 2j + 1),
  so that the kernels read activations in contiguous runs; its bits placed by `pack_split_bytes`, so that a
  nibble becomes a float8 e4m3 byte in one or two steps (moe_matmul.split_bytes_e4m3).
- `swizzle_bits`: after split_nibbles, each 4-byte word's bits scattered as SWIZZLE_POSITIONS says, for the bf16
  asm of the CUDA-core split-K path (moe_matmul.SWIZZLED_ASM).
- `tile_rows`: the bytes of tile_n rows' K block side by side, so one K step over a tile of rows reads one run.
"""

from __future__ import annotations

import torch

SWIZZLE_POSITIONS = (  # nibble slot (L0..L3, H0..H3) -> bit places of its (mantissa, e0, e1, sign) in the word
    (6, 7, 8, 15), (22, 23, 24, 31), (3, 4, 5, 12), (19, 20, 21, 28),
    (0, 1, 2, 9), (16, 17, 18, 25), (13, 10, 11, 14), (29, 26, 27, 30))


def split_nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """Re-lays out MXFP4 bytes [..., 16] so that byte j of each block holds elements j (the "low" nibble) and
    j + 16 (the "high") instead of 2j and 2j + 1, their bits placed by `pack_split_bytes`: the kernels then read
    activations in contiguous runs and turn bytes into e4m3 in a few instructions. Same size, same scales: still
    MXFP4, 4.25 bits a weight."""
    low, high = blocks & 0x0F, blocks >> 4  # elements 0, 2, 4, ... and 1, 3, 5, ... of each block
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., 32] nibbles in element order
    return pack_split_bytes(values[..., :16], values[..., 16:]).contiguous()


def pack_split_bytes(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Two FP4 nibbles s|e1 e0|m (uint8, 0..15) -> the split layout's byte: low's sign at bit 7 and magnitude at
    bits 4..2, where a float8 e4m3 byte has them (its e4m3 value is value * 2^-6: one AND); high's sign at bit 5,
    e1 at 6, e0 m at 1..0 (a shift left by 2 and one right, two ANDs). split_bytes_e4m3 reads it."""
    return ((low & 7) << 2) | ((low & 8) << 4) | (high & 3) | ((high & 4) << 4) | ((high & 8) << 2)


def unpack_split_bytes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_split_bytes`: split-layout bytes -> (low, high) nibbles."""
    low = ((blocks >> 2) & 7) | ((blocks >> 4) & 8)
    high = (blocks & 3) | ((blocks >> 4) & 4) | ((blocks >> 2) & 8)
    return low, high


def swizzle_bits(blocks: torch.Tensor) -> torch.Tensor:
    """Re-lays out split-layout MXFP4 bytes [..., 16] (`split_nibbles`) bit by bit within each 4-byte word as
    SWIZZLE_POSITIONS says, for the cheaper dequantization of SWIZZLED_ASM. Same bytes count, same values and
    element order for the kernels, same scales."""
    words = blocks.reshape(*blocks.shape[:-1], 4, 4).to(torch.int64)  # [..., word, byte]
    out = torch.zeros(words.shape[:-1], dtype=torch.int64, device=blocks.device)
    halves = unpack_split_bytes(words)  # (low, high) nibbles [..., word, byte]
    for slot, places in enumerate(SWIZZLE_POSITIONS):
        nibble = halves[slot // 4][..., slot % 4]  # L_j: low nibble of byte j; H_j: high
        for bit, place in enumerate(places):
            out |= ((nibble >> bit) & 1) << place
    return torch.stack([(out >> (8 * b)) & 0xFF for b in range(4)], dim=-1).to(torch.uint8).reshape(blocks.shape)


def unswizzle_bits(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of `swizzle_bits`."""
    parts = blocks.reshape(*blocks.shape[:-1], 4, 4).to(torch.int64)
    words = sum(parts[..., b] << (8 * b) for b in range(4))  # [..., word]
    halves = (torch.zeros_like(parts), torch.zeros_like(parts))  # (low, high) nibbles [..., word, byte]
    for slot, places in enumerate(SWIZZLE_POSITIONS):
        halves[slot // 4][..., slot % 4] = sum(((words >> place) & 1) << bit for bit, place in enumerate(places))
    return pack_split_bytes(*halves).to(torch.uint8).reshape(blocks.shape)


def tile_rows(blocks: torch.Tensor, tile_n: int) -> torch.Tensor:
    """Re-lays out MXFP4 bytes [..., N, G, 16] (N a multiple of tile_n) so that block g of tile_n consecutive
    rows lie side by side: [..., N / tile_n, G, tile_n, 16] in memory, returned in the original shape (the
    bytes are the same, so it can be copied back in place). A program's K step over tile_n rows then reads one
    contiguous run of bytes instead of tile_n runs 16 * G bytes apart."""
    *lead, n, g, b = blocks.shape
    if n % tile_n:
        raise ValueError(f"{n} rows are not whole tiles of {tile_n}")
    tiled = blocks.reshape(*lead, n // tile_n, tile_n, g, b).transpose(-3, -2).contiguous()
    return tiled.reshape(blocks.shape)


def untile_rows(blocks: torch.Tensor, tile_n: int) -> torch.Tensor:
    """The inverse of `tile_rows`."""
    *lead, n, g, b = blocks.shape
    rows = blocks.reshape(*lead, n // tile_n, g, tile_n, b).transpose(-3, -2).contiguous()
    return rows.reshape(blocks.shape)


def merge_nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of `split_nibbles`: byte j of a block back to elements 2j (low nibble) and 2j + 1 (high)."""
    values = torch.cat(unpack_split_bytes(blocks), dim=-1)  # [..., 32] nibbles in element order
    return (values[..., 0::2] | (values[..., 1::2] << 4)).contiguous()
