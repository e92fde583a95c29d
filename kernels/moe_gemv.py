"""One decode token's expert matmuls as matrix-vector products on the CUDA cores, activations held in registers.

With one token each of its top_k experts meets a single activation row, so a matmul is W_e [N, K] @ a [K]. The
split-K kernel of moe_matmul.py walks K inside a program for a fixed tile of rows, so every K step loads and
converts a fresh slice of the activation (one value per weight). Here a program owns a fixed K range of one
pair instead: it loads that slice of the activation once, as float32 registers, and walks rows. Each thread
holds whole 16-byte MXFP4 blocks (so the dequantization asm sees its bytes in register order), a warp's lanes
cover a few rows times KB blocks, and a row's partial sum is reduced across those lanes with shuffles only.
On the split layout the weights are dequantized without their scale (values times 2^-6, through float8 e4m3
bits and the hardware's e4m3 -> f16 conversion) and each block's sum of 32 products is scaled once: the same
float32 products as scaling every weight first (powers of two), so the outputs are bit for bit the same.
Partial sums of each K range go to the same float32 workspace [splits, pairs, N] as the split-K kernel, whose
follow-up kernels (SwiGLU, combine) finish the layer with the same roundings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.moe_matmul import (_dequant_mxfp4_tile, check_decode_operands, e4m3_block_scale,
                                              split_bytes_e4m3, split_bytes_e4m3_ptx)
from gptoss_serve.kernels.triton_utils import device_function, emulate_bf16, launch


def _split_bytes_e4m3_f32_asm(split: bool) -> str:
    """PTX: four split-layout bytes ($8; the checkpoint's if not split) -> their eight values times 2^-6 as
    float32, unscaled ($0..$3 the low nibbles' of bytes 0..3, $4..$7 the high nibbles'). The nibbles move to float8
    e4m3 bits as in moe_matmul.split_bytes_e4m3 (four at a time), cvt reads two e4m3 bytes as an f16 pair (sm_89+),
    and each half widens to float32: about 3.4 instructions a weight with the FMA (before the split layout's bytes
    were laid out for e4m3), against 4.5 for bf16 values times their scale widened (the scale is applied to each
    block's sum instead)."""
    lines = ["{", ".reg .b32 t, u, lo, hi, f<4>;", ".reg .b16 e<4>, h<8>;"] + split_bytes_e4m3_ptx("$8", split)
    for i in range(4):  # e4m3 byte pair i -> f16 pair -> $2i, $2i + 1
        lines += [f"cvt.rn.f16x2.e4m3x2 f{i}, e{i};", f"mov.b32 {{h{2 * i}, h{2 * i + 1}}}, f{i};",
                  f"cvt.f32.f16 ${2 * i}, h{2 * i};", f"cvt.f32.f16 ${2 * i + 1}, h{2 * i + 1};"]
    return "\n".join(lines + ["}"])


SPLIT_BYTES_E4M3_F32_ASM = tl.constexpr(_split_bytes_e4m3_f32_asm(split=True))
PAIRED_BYTES_E4M3_F32_ASM = tl.constexpr(_split_bytes_e4m3_f32_asm(split=False))  # the checkpoint's layout

# Tiles chosen on an H200 (docs/PERFORMANCE.md, 2026-12-01, tools/moe_gemv_sweep.py; the same on 2026-12-02 with
# the scale applied to block sums, 4 rows a thread included): a K range of 16 blocks
# (512 weights of a row, 6 ranges over K = 2880), 2 rows a thread and 64 rows a program. Fewer, longer programs
# lost (512 rows: 94-138 us against 54), and so did loading the next step's bytes ahead (+6-12 us). The SwiGLU and
# combine kernels that follow take blocks of 64 (more programs for so few rows: 53.2 -> 50.0 us a layer).
DEFAULT_GEMV_CONFIG = dict(KB=16, ROWS_PER_THREAD=2, ROWS_PER_PROGRAM=64, num_warps=4, EPILOGUE_BLOCK=64)


@triton.jit
def _moe_gemv_kernel(
    a_ptr, w_ptr, scales_ptr, ws_ptr, expert_ids_ptr,
    N, num_blocks_k, a_row_div, rows_per_program, first_expert, num_local_experts,
    stride_a, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_s_k, stride_ws_split,
    SPLIT_NIBBLES: tl.constexpr, SWIZZLED: tl.constexpr, FOLD_SCALES: tl.constexpr, TILE_N: tl.constexpr,
    EMULATE_BF16: tl.constexpr, KB: tl.constexpr, RB: tl.constexpr,
):
    """Program (pair, row chunk, K range): ws[split, pair, rows of the chunk] = W_e[rows, K range] @ a[K range].
    Each iteration covers RB rows x KB blocks of 32 (16 bytes a thread); the K range is KB blocks."""
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    split = tl.program_id(2)
    expert = tl.load(expert_ids_ptr + pair) - first_expert
    if (expert < 0) | (expert >= num_local_experts):  # routed to another rank's expert
        return
    a_row = a_ptr + (pair // a_row_div).to(tl.int64) * stride_a
    a_low, a_high = activation_slice(a_row, split, num_blocks_k, SPLIT_NIBBLES, KB)
    tile = tile_offsets(split, num_blocks_k, stride_w_row, stride_s_row, stride_s_k, TILE_N, KB, RB)
    w_expert = w_ptr + expert.to(tl.int64) * stride_w_expert
    s_expert = scales_ptr + expert.to(tl.int64) * stride_s_expert
    row_begin = chunk * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, N)
    for r0 in range(row_begin, row_end, RB):
        row_sum = rows_times_slice(w_expert, s_expert, tile, r0, row_end, a_low, a_high, stride_w_row,
                                   stride_s_row, SWIZZLED, FOLD_SCALES, TILE_N, EMULATE_BF16, KB, RB, SPLIT_NIBBLES)
        out_rows = r0 + tl.arange(0, RB)
        tl.store(ws_ptr + split * stride_ws_split + pair.to(tl.int64) * N + out_rows, row_sum, mask=out_rows < row_end)


@device_function
def activation_slice(a_row, split, num_blocks_k, SPLIT_NIBBLES: tl.constexpr, KB: tl.constexpr):
    """K range `split` (KB blocks) of one activation row: the elements the weights' low and high nibbles meet,
    [1, KB, 16] float32 each (0 past num_blocks_k). Broadcast over a tile's rows, it moves through shared memory
    into the tile's layout (loading it in the tile's shape instead made Triton move it twice, SASS)."""
    blk = split * KB + tl.arange(0, KB)  # [KB] the range's MXFP4 blocks along K
    in_blk = blk < num_blocks_k
    byte = tl.arange(0, 16)
    if SPLIT_NIBBLES:  # byte j of a block holds elements j and j + 16
        k_low = blk[:, None] * 32 + byte[None, :]
        k_high = k_low + 16
    else:  # the checkpoint's layout: byte j holds elements 2j and 2j + 1
        k_low = blk[:, None] * 32 + byte[None, :] * 2
        k_high = k_low + 1
    a_low = tl.load(a_row + k_low, mask=in_blk[:, None], other=0.0).to(tl.float32)[None, :, :]  # [1, KB, 16]
    a_high = tl.load(a_row + k_high, mask=in_blk[:, None], other=0.0).to(tl.float32)[None, :, :]
    return a_low, a_high


@device_function
def tile_offsets(split, num_blocks_k, stride_w_row, stride_s_row, stride_s_k, TILE_N: tl.constexpr,
                 KB: tl.constexpr, RB: tl.constexpr):
    """Where an iteration's RB rows x KB blocks of K range `split` lie, relative to its first row: byte offsets
    [RB * KB, 16], scale offsets [RB * KB, 1], the K mask [RB * KB, 1] and each entry's row [RB * KB].

    The tile is loaded flat, block fastest, then viewed as [RB, KB, 16]: lanes next to each other take the blocks
    of one row, so the sum over a row's blocks stays inside a warp. The offsets are the same for every iteration
    (RB divides TILE_N: an iteration never crosses a tile of rows), which then adds one scalar offset."""
    flat = tl.arange(0, RB * KB)
    r_of = flat // KB
    b_of = (split * KB + flat % KB)[:, None]  # [RB * KB, 1] the block of each flat entry
    in_k = b_of < num_blocks_k
    byte = tl.arange(0, 16)
    if TILE_N == 1:
        w_inner = r_of[:, None] * stride_w_row + b_of * 16 + byte[None, :]
    else:  # `tile_rows`: TILE_N rows' block k side by side, then block k + 1
        w_inner = r_of[:, None] * 16 + b_of * (16 * TILE_N) + byte[None, :]
    s_inner = r_of[:, None] * stride_s_row + b_of * stride_s_k
    return w_inner, s_inner, in_k, r_of


@device_function
def rows_times_slice(w_expert, s_expert, tile, r0, row_end, a_low, a_high, stride_w_row, stride_s_row,
                     SWIZZLED: tl.constexpr, FOLD_SCALES: tl.constexpr, TILE_N: tl.constexpr,
                     EMULATE_BF16: tl.constexpr, KB: tl.constexpr, RB: tl.constexpr, SPLIT_NIBBLES: tl.constexpr):
    """[RB] float32: rows r0 .. r0 + RB of one expert's weights (`tile` from tile_offsets) times the activation
    slice; rows from row_end on give 0 (and read nothing)."""
    w_inner, s_inner, in_k, r_of = tile
    if TILE_N == 1:
        w_first = r0 * stride_w_row
    else:
        w_first = (r0 // TILE_N) * (stride_w_row * TILE_N) + (r0 % TILE_N) * 16
    in_tile = ((r0 + r_of) < row_end)[:, None] & in_k
    w_bytes = tl.load(w_expert + w_first + w_inner, mask=in_tile, other=0)  # [RB * KB, 16] uint8
    scale_bytes = tl.load(s_expert + r0 * stride_s_row + s_inner, mask=in_tile, other=0)  # [RB * KB, 1]
    w_bytes = tl.reshape(w_bytes, [RB, KB, 16])
    scale_bytes = tl.reshape(scale_bytes, [RB, KB]).to(tl.int32)
    if SWIZZLED:  # scaled bf16 values, widened
        w_low, w_high = _dequant_mxfp4_tile(w_bytes, scale_bytes, RB, KB, EMULATE_BF16, SWIZZLED, FOLD_SCALES,
                                            SPLIT_NIBBLES)
        part = _fma_sum(tl.zeros([RB, KB], dtype=tl.float32), w_low.to(tl.float32), a_low,
                        w_high.to(tl.float32), a_high)  # [RB, KB]
    else:  # values * 2^-6, each block's sum scaled once (powers of two: the same float32 products)
        w_low, w_high = _split_bytes_unscaled(w_bytes, EMULATE_BF16, SPLIT_NIBBLES)
        part = _fma_sum(tl.zeros([RB, KB], dtype=tl.float32), w_low, a_low, w_high, a_high)
        part = part * e4m3_block_scale(scale_bytes)  # [RB, KB]
    return tl.sum(part, axis=1)


@device_function
def _split_bytes_unscaled(w_bytes, EMULATE_BF16: tl.constexpr, SPLIT_NIBBLES: tl.constexpr):
    """Split-layout bytes [RB, KB, 16] (the checkpoint's if not SPLIT_NIBBLES) -> the low- and high-nibble values
    times 2^-6 as float32 [RB, KB, 16] each, without their scale (one asm for four bytes on a GPU)."""
    if EMULATE_BF16:
        low, high = split_bytes_e4m3(w_bytes, SPLIT_NIBBLES)
        return low.to(tl.float32), high.to(tl.float32)
    return tl.inline_asm_elementwise(SPLIT_BYTES_E4M3_F32_ASM if SPLIT_NIBBLES else PAIRED_BYTES_E4M3_F32_ASM,
                                     "=r,=r,=r,=r,=r,=r,=r,=r,r", [w_bytes], dtype=(tl.float32, tl.float32),
                                     is_pure=True, pack=4)


@device_function
def _fma_sum(acc, w_low, a_low, w_high, a_high):
    """acc [RB, KB] + the sum over the last axis of w_low * a_low + w_high * a_high ([RB, KB, n] each, a's
    broadcast), as one chain of fused multiply-adds: tl.sum would multiply, then add in a tree (1.5 instructions
    a product instead of 1)."""
    if w_low.shape[2] == 1:
        acc = acc + tl.reshape(w_low, acc.shape) * tl.reshape(a_low, [1, acc.shape[1]])
        acc = acc + tl.reshape(w_high, acc.shape) * tl.reshape(a_high, [1, acc.shape[1]])
    else:
        w_low0, w_low1 = _halves(w_low)
        a_low0, a_low1 = _halves(a_low)
        w_high0, w_high1 = _halves(w_high)
        a_high0, a_high1 = _halves(a_high)
        acc = _fma_sum(acc, w_low0, a_low0, w_high0, a_high0)
        acc = _fma_sum(acc, w_low1, a_low1, w_high1, a_high1)
    return acc


@device_function
def _halves(x):
    """x [A, B, n] -> its even and odd elements along the last axis, [A, B, n / 2] each (in-thread: no data moves)."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1], x.shape[2] // 2, 2]))


def moe_gemv_splitk(
    a: torch.Tensor,  # [rows, K]: the token's row (a_row_div = top_k) or the pairs' rows (a_row_div = 1)
    blocks: torch.Tensor,  # [num_local_experts, N, K / 32, 16] uint8
    scales: torch.Tensor,  # [num_local_experts, N, K / 32] uint8, any strides
    expert_ids: torch.Tensor,  # [num_pairs] global expert id of each pair
    first_expert: int,
    a_row_div: int,
    config: dict | None = None,
    split_nibbles: bool = False,
    tile_n: int = 1,
    swizzled: bool = False,
    fold_scales: bool = False,
) -> torch.Tensor:  # [splits, num_pairs, N] float32 partial sums (rows of other ranks' pairs unset)
    """The split-K workspace of moe_matmul.moe_matmul_splitk for a decode step's pairs (one by one), by
    matrix-vector products."""
    config = dict(DEFAULT_GEMV_CONFIG, **(config or {}))
    num_local_experts, n_rows, num_k_blocks = check_decode_operands(a, blocks, tile_n)
    kb, num_warps = config["KB"], config["num_warps"]
    rb = config["ROWS_PER_THREAD"] * 32 * num_warps // kb  # rows an iteration covers
    rows_per_program = max(rb, config["ROWS_PER_PROGRAM"] // rb * rb)
    if tile_n > 1 and tile_n % rb:
        raise ValueError(f"an iteration's {rb} rows must not cross a tile of {tile_n} rows")
    num_pairs = expert_ids.numel()
    splits = triton.cdiv(num_k_blocks, kb)
    row_chunks = triton.cdiv(n_rows, rows_per_program)
    ws = torch.empty((splits, max(num_pairs, 1), n_rows), dtype=torch.float32, device=a.device)
    launch(_moe_gemv_kernel, (num_pairs, row_chunks, splits),
           a, blocks, scales, ws, expert_ids,
           n_rows, num_k_blocks, a_row_div, rows_per_program, first_expert, num_local_experts,
           a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), scales.stride(2),
           ws.stride(0),
           SPLIT_NIBBLES=split_nibbles or swizzled, SWIZZLED=swizzled, FOLD_SCALES=fold_scales,
           TILE_N=tile_n, EMULATE_BF16=emulate_bf16(), KB=kb, RB=rb, num_warps=num_warps, num_stages=1)
    return ws
