"""Grouped MoE matmuls over MXFP4 expert weights, dequantized in registers (Triton); twin of moe_ref.

Each program computes one tile out^T[BLOCK_N weight rows, BLOCK_M pairs] = W_e[rows, :] @ A[pairs, :]^T for
the row block of one expert (see moe_routing.group_by_expert). The weight tile is the left operand because it
is produced in registers (FP4 nibbles -> bf16) and the pairs' activations are the small right operand. With few
tokens each expert's weight tiles are read from HBM once per step; an expert with more pairs than a row block
(BLOCK_M, chosen from the average pairs per expert) gets a second block whose programs run beside the first's
and mostly find the tiles in L2.

MXFP4 in registers: a 16-byte block holds 32 values, two per byte. The kernel dequantizes the low nibbles and
the high nibbles of a byte tile separately and multiplies them by the matching columns of A (two dots over
BLOCK_K/2), so nothing is interleaved in registers. In the checkpoint's layout byte j holds elements 2j and
2j+1 (A read with stride 2); `split_nibbles` (done once at load by TritonKernels.prepare_weights) re-lays each
block out so that byte j holds elements j and j+16, and A is read in contiguous runs of 16.
Nibble s|e1 e0|m to bf16, on the GPU (inline PTX, four nibbles at a time): the bits go to bf16 sign and to the
low exponent bits and top mantissa bit, giving value * 2^-126 exactly (e1 e0 = 0 lands on bf16 subnormals,
which are exactly 0 and 0.5 * 2^-126); two bf16x2 multiplies apply 2^126 and the E8M0 scale 2^(s - 127).
Under the interpreter (no inline asm there) the same nibble goes into float8 e4m3 bits, whose subnormals give
0 and 0.5 the same way, scaled by 2^(s - 121) in float32. Both are exact for every scale byte below 249.

Epilogues: the first matmul (w1, gate and linear rows interleaved) adds its bias and applies the clamped SwiGLU,
storing the activation rows in grouped order; the second (w2) adds its bias, multiplies by the routing weight
and stores each pair's row at its (token, slot) place; `combine` then sums a token's top_k rows in a fixed
order (deterministic, unlike atomics). Intermediate roundings to bf16 mirror the torch twin's.

Decode (`moe_experts_splitk`, taken at SPLITK_MAX_TOKENS tokens and fewer): the K dimension is split over
programs that store float32 partial sums; follow-up kernels sum the splits in a fixed order and apply the same
epilogues with the same roundings. `tile_rows` (done once at load after `split_nibbles`) lays the bytes of 64
rows' K block side by side, so one K step of a weight tile reads one contiguous run; both paths read either layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.moe_routing import ExpertGroups, group_by_expert
from gptoss_serve.kernels.mxfp4 import MXFP4_BLOCK_SIZE, MXFP4_BYTES_PER_BLOCK
from gptoss_serve.kernels.triton_utils import cast_rne, device_function, emulate_bf16, launch, next_pow2


# Four nibbles -> four bf16, times the scale: $2 holds four bytes, $3 and $4 the scales of elements (0, 1) and
# (2, 3) as bf16x2, $0 and $1 receive the values of elements (0, 1) and (2, 3). prmt spreads bytes 0, 1 (and
# 2, 3) to the two 16-bit halves; shifts and masks put magnitude bits at bf16 bits 8..6 and the sign at bit 15.
_NIBBLES_TO_BF16_ASM = """
{{
.reg .b32 z, k, t0, t1, m0, m1, s0, s1;
mov.b32 z, 0;
mov.b32 k, 0x7E807E80;
prmt.b32 t0, $2, z, 0x4140;
prmt.b32 t1, $2, z, 0x4342;
shl.b32 m0, t0, {mag_shift};
shl.b32 m1, t1, {mag_shift};
shl.b32 s0, t0, {sign_shift};
shl.b32 s1, t1, {sign_shift};
and.b32 m0, m0, 0x01C001C0;
and.b32 m1, m1, 0x01C001C0;
and.b32 s0, s0, 0x80008000;
and.b32 s1, s1, 0x80008000;
or.b32 m0, m0, s0;
or.b32 m1, m1, s1;
mul.rn.bf16x2 m0, m0, k;
mul.rn.bf16x2 m1, m1, k;
mul.rn.bf16x2 $0, m0, $3;
mul.rn.bf16x2 $1, m1, $4;
}}
"""
LOW_NIBBLES_ASM = tl.constexpr(_NIBBLES_TO_BF16_ASM.format(mag_shift=6, sign_shift=12))  # bits 2..0 -> 8..6, 3 -> 15
HIGH_NIBBLES_ASM = tl.constexpr(_NIBBLES_TO_BF16_ASM.format(mag_shift=2, sign_shift=8))  # bits 6..4 -> 8..6, 7 -> 15


@triton.jit
def _moe_matmul_kernel(
    a_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr, pair_weights_ptr,
    N, K, top_k, num_n_tiles,
    stride_a, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_bias_expert, stride_out,
    swiglu_alpha, swiglu_limit,
    SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER_TOKENS: tl.constexpr, SPLIT_NIBBLES: tl.constexpr,
    TILE_N: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid // num_n_tiles
    pid_n = pid % num_n_tiles
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # beyond the last row block: the grid is the static worst case
        return
    row_start = tl.load(block_row_start_ptr + pid_m)
    row_end = tl.load(block_row_end_ptr + pid_m)
    rows = row_start + tl.arange(0, BLOCK_M)  # rows of the grouped pair list
    in_rows = rows < row_end
    pairs = tl.load(sorted_pairs_ptr + rows, mask=in_rows, other=0)
    if GATHER_TOKENS:  # first matmul: the activations are the tokens' rows of x
        a_rows = (pairs // top_k).to(tl.int64)
    else:  # second matmul: the activations are already in grouped order
        a_rows = rows.to(tl.int64)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < N
    NUM_SCALES: tl.constexpr = BLOCK_K // 32
    HALF_K: tl.constexpr = BLOCK_K // 2
    # Byte tile [BLOCK_N, NUM_SCALES, 16] and scale tile [BLOCK_N, NUM_SCALES] of this expert's rows.
    n3 = n[:, None, None]
    blk3 = tl.arange(0, NUM_SCALES)[None, :, None]
    byte3 = tl.arange(0, 16)[None, None, :]
    W_BLK: tl.constexpr = 16 * TILE_N  # bytes from one K block of a row to the next
    if TILE_N == 1:  # rows of K / 32 blocks, one after the other
        w_tile_ptr = w_ptr + expert.to(tl.int64) * stride_w_expert + n3.to(tl.int64) * stride_w_row + blk3 * 16 \
            + byte3
    else:  # `tile_rows`: TILE_N rows' block k side by side, then block k + 1
        w_tile_ptr = w_ptr + expert.to(tl.int64) * stride_w_expert \
            + (n3 // TILE_N).to(tl.int64) * (stride_w_row * TILE_N) + (n3 % TILE_N) * 16 + blk3 * W_BLK + byte3
    s_tile_ptr = scales_ptr + expert.to(tl.int64) * stride_s_expert + n[:, None].to(tl.int64) * stride_s_row \
        + tl.arange(0, NUM_SCALES)[None, :]
    # Columns of A that meet the low and high nibbles: element kk of the half tile is block kk // 16, byte kk % 16.
    kk = tl.arange(0, HALF_K)
    if SPLIT_NIBBLES:  # byte j of a block holds elements j and j + 16
        k_low = (kk // 16) * 32 + kk % 16
        k_high = k_low + 16
    else:  # the checkpoint's layout: byte j holds elements 2j and 2j + 1
        k_low = (kk // 16) * 32 + (kk % 16) * 2
        k_high = k_low + 1
    a_tile_ptr = a_ptr + a_rows[None, :] * stride_a  # [1, BLOCK_M]
    num_blocks_k = K // 32

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # Scale rows are K/32 bytes apart, too narrow for asynchronous copies: load each step's scales one step
    # ahead, so their latency hides behind the current step instead of stalling it.
    scale_cols = tl.arange(0, NUM_SCALES)[None, :]
    next_scales = tl.load(s_tile_ptr, mask=in_n[:, None] & (scale_cols < num_blocks_k), other=0)
    for k0 in range(0, K, BLOCK_K):
        blk = k0 // 32
        w_mask = in_n[:, None, None] & (blk3 + blk < num_blocks_k)
        w_bytes = tl.load(w_tile_ptr + blk * W_BLK, mask=w_mask, other=0)  # [BLOCK_N, NUM_SCALES, 16] uint8
        scale_bytes = next_scales.to(tl.int32)
        next_blk = blk + NUM_SCALES
        next_scales = tl.load(s_tile_ptr + next_blk, mask=in_n[:, None] & (scale_cols + next_blk < num_blocks_k),
                              other=0)
        if EMULATE_BF16:
            # 2^(scale - 121) as float32 bits: the E8M0 scale times the 2^6 that e4m3 leaves out.
            scale = ((scale_bytes + 6) << 23).to(tl.float32, bitcast=True)[:, :, None]
            low = (((w_bytes & 0x07) << 2) | ((w_bytes & 0x08) << 4)).to(tl.float8e4nv, bitcast=True)
            high = (((w_bytes >> 2) & 0x1C) | (w_bytes & 0x80)).to(tl.float8e4nv, bitcast=True)
            w_low = tl.reshape(low.to(tl.float32) * scale, [BLOCK_N, HALF_K])
            w_high = tl.reshape(high.to(tl.float32) * scale, [BLOCK_N, HALF_K])
        else:
            # 2^(scale - 127) as bf16 bits (byte 0 is the subnormal 2^-127).
            scale = tl.where(scale_bytes == 0, 0x40, scale_bytes << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
            scale = tl.broadcast_to(scale[:, :, None], [BLOCK_N, NUM_SCALES, 16])
            w_low = tl.inline_asm_elementwise(LOW_NIBBLES_ASM, "=r,=r,r,r,r", [w_bytes, scale],
                                              dtype=tl.bfloat16, is_pure=True, pack=4)
            w_high = tl.inline_asm_elementwise(HIGH_NIBBLES_ASM, "=r,=r,r,r,r", [w_bytes, scale],
                                               dtype=tl.bfloat16, is_pure=True, pack=4)
            w_low = tl.reshape(w_low, [BLOCK_N, HALF_K])
            w_high = tl.reshape(w_high, [BLOCK_N, HALF_K])
        a_mask = in_rows[None, :] & (k0 + k_low[:, None] < K)
        a_low = tl.load(a_tile_ptr + (k0 + k_low[:, None]), mask=a_mask, other=0.0)  # [HALF_K, BLOCK_M]
        a_high = tl.load(a_tile_ptr + (k0 + k_high[:, None]), mask=a_mask, other=0.0)
        if EMULATE_BF16:
            acc = tl.dot(w_low, a_low.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(w_high, a_high.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w_low, a_low, acc)
            acc = tl.dot(w_high, a_high, acc)

    # The torch twin rounds the matmul, and the bias sum, to the activation dtype: do the same.
    act_dtype = a_ptr.dtype.element_ty
    h = cast_rne(acc, act_dtype, EMULATE_BF16).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_expert + n, mask=in_n, other=0.0)
        h = cast_rne(h + bias.to(tl.float32)[:, None], act_dtype, EMULATE_BF16).to(tl.float32)
    if SWIGLU:
        # Rows alternate gate (even) and linear (odd): pair them up, clamp, and gate.
        gate, linear = tl.split(tl.permute(tl.reshape(h, [BLOCK_N // 2, 2, BLOCK_M]), [0, 2, 1]))
        gate = tl.minimum(gate, swiglu_limit)
        linear = tl.minimum(tl.maximum(linear, -swiglu_limit), swiglu_limit)
        act = gate * (1.0 / (1.0 + tl.exp(-swiglu_alpha * gate))) * (linear + 1.0)
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out_mask = (cols < N // 2)[:, None] & in_rows[None, :]
        tl.store(out_ptr + rows[None, :].to(tl.int64) * stride_out + cols[:, None],
                 cast_rne(act, out_ptr.dtype.element_ty, EMULATE_BF16), mask=out_mask)
    else:
        weight = tl.load(pair_weights_ptr + pairs, mask=in_rows, other=0.0)
        out_mask = in_n[:, None] & in_rows[None, :]
        tl.store(out_ptr + pairs[None, :].to(tl.int64) * stride_out + n[:, None],
                 (h * weight[None, :]).to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_kernel(
    y_ptr, ids_ptr, out_ptr, hidden, first_expert, num_local_experts, stride_y, stride_out,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_cols = cols < hidden
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):  # a fixed order: the sum does not depend on scheduling
        local = tl.load(ids_ptr + token * TOP_K + slot) - first_expert
        if (local >= 0) & (local < num_local_experts):  # pairs routed to other ranks were never written
            total += tl.load(y_ptr + (token * TOP_K + slot) * stride_y + cols, mask=in_cols, other=0.0)
    tl.store(out_ptr + token * stride_out + cols, cast_rne(total, out_ptr.dtype.element_ty, EMULATE_BF16), mask=in_cols)


@device_function
def _dequant_mxfp4_tile(w_bytes, scale_bytes, BLOCK_N: tl.constexpr, NUM_SCALES: tl.constexpr,
                        EMULATE_BF16: tl.constexpr):
    """Byte tile [BLOCK_N, NUM_SCALES, 16] and its scale bytes [BLOCK_N, NUM_SCALES] (int32) -> the low- and
    high-nibble values, each [BLOCK_N, NUM_SCALES, 16]: bf16 on a GPU, float32 under the interpreter."""
    if EMULATE_BF16:
        scale = ((scale_bytes + 6) << 23).to(tl.float32, bitcast=True)[:, :, None]
        low = (((w_bytes & 0x07) << 2) | ((w_bytes & 0x08) << 4)).to(tl.float8e4nv, bitcast=True)
        high = (((w_bytes >> 2) & 0x1C) | (w_bytes & 0x80)).to(tl.float8e4nv, bitcast=True)
        w_low = low.to(tl.float32) * scale
        w_high = high.to(tl.float32) * scale
    else:
        scale = tl.where(scale_bytes == 0, 0x40, scale_bytes << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
        scale = tl.broadcast_to(scale[:, :, None], [BLOCK_N, NUM_SCALES, 16])
        w_low = tl.inline_asm_elementwise(LOW_NIBBLES_ASM, "=r,=r,r,r,r", [w_bytes, scale],
                                          dtype=tl.bfloat16, is_pure=True, pack=4)
        w_high = tl.inline_asm_elementwise(HIGH_NIBBLES_ASM, "=r,=r,r,r,r", [w_bytes, scale],
                                           dtype=tl.bfloat16, is_pure=True, pack=4)
    return w_low, w_high


@triton.jit
def _moe_matmul_splitk_kernel(
    a_ptr, w_ptr, scales_ptr, ws_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
    N, K, a_row_div, num_n_tiles, num_splits, blocks_per_split,
    stride_a, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_s_k, stride_ws_split,
    USE_DOT: tl.constexpr, SPLIT_NIBBLES: tl.constexpr, TILE_N: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode twin of _moe_matmul_kernel: one program = one row block x one BLOCK_N tile x one K range (split).

    Stores the float32 partial sums of its K range, unrounded, at ws[split, pair, n] (by pair index); the
    follow-up kernels sum the splits in a fixed order and apply the epilogues. USE_DOT: tensor cores (BLOCK_M
    >= 16); else BLOCK_M is 1 or 2 and the products are summed on the CUDA cores (no shared memory, no
    tensor-core waits, the next step's bytes loaded one step ahead in registers)."""
    pid = tl.program_id(0)
    split = pid % num_splits  # the splits of one tile are neighbours: together they read its rows end to end
    pid_n = (pid // num_splits) % num_n_tiles
    pid_m = pid // (num_splits * num_n_tiles)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # beyond the last row block: the grid is the static worst case
        return
    row_start = tl.load(block_row_start_ptr + pid_m)
    row_end = tl.load(block_row_end_ptr + pid_m)
    rows = row_start + tl.arange(0, BLOCK_M)
    in_rows = rows < row_end
    pairs = tl.load(sorted_pairs_ptr + rows, mask=in_rows, other=0)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < N
    NUM_SCALES: tl.constexpr = BLOCK_K // 32
    HALF_K: tl.constexpr = BLOCK_K // 2
    num_blocks_k = K // 32
    blk_begin = split * blocks_per_split
    blk_end = tl.minimum(blk_begin + blocks_per_split, num_blocks_k)
    n3 = n[:, None, None]
    blk3 = tl.arange(0, NUM_SCALES)[None, :, None]
    byte3 = tl.arange(0, 16)[None, None, :]
    W_BLK: tl.constexpr = 16 * TILE_N  # bytes from one K block of a row to the next
    if TILE_N == 1:  # rows of K / 32 blocks, one after the other
        w_tile_ptr = w_ptr + expert.to(tl.int64) * stride_w_expert + n3.to(tl.int64) * stride_w_row + blk3 * 16 \
            + byte3
    else:  # `tile_rows`: TILE_N rows' block k side by side, then block k + 1
        w_tile_ptr = w_ptr + expert.to(tl.int64) * stride_w_expert \
            + (n3 // TILE_N).to(tl.int64) * (stride_w_row * TILE_N) + (n3 % TILE_N) * 16 + blk3 * W_BLK + byte3
    scale_cols = tl.arange(0, NUM_SCALES)[None, :]
    s_tile_ptr = scales_ptr + expert.to(tl.int64) * stride_s_expert + n[:, None].to(tl.int64) * stride_s_row \
        + scale_cols * stride_s_k
    next_scales = tl.load(s_tile_ptr + blk_begin * stride_s_k,
                          mask=in_n[:, None] & (scale_cols + blk_begin < blk_end), other=0)

    if USE_DOT:
        kk = tl.arange(0, HALF_K)
        if SPLIT_NIBBLES:
            k_low = (kk // 16) * 32 + kk % 16
            k_high = k_low + 16
        else:
            k_low = (kk // 16) * 32 + (kk % 16) * 2
            k_high = k_low + 1
        a_rows = (pairs // a_row_div).to(tl.int64)
        a_tile_ptr = a_ptr + a_rows[None, :] * stride_a  # [1, BLOCK_M]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for blk in range(blk_begin, blk_end, NUM_SCALES):
            w_mask = in_n[:, None, None] & (blk3 + blk < blk_end)
            w_bytes = tl.load(w_tile_ptr + blk * W_BLK, mask=w_mask, other=0)
            scale_bytes = next_scales.to(tl.int32)
            next_blk = blk + NUM_SCALES
            next_scales = tl.load(s_tile_ptr + next_blk * stride_s_k,
                                  mask=in_n[:, None] & (scale_cols + next_blk < blk_end), other=0)
            w_low, w_high = _dequant_mxfp4_tile(w_bytes, scale_bytes, BLOCK_N, NUM_SCALES, EMULATE_BF16)
            w_low = tl.reshape(w_low, [BLOCK_N, HALF_K])
            w_high = tl.reshape(w_high, [BLOCK_N, HALF_K])
            k0 = blk * 32
            a_mask = in_rows[None, :] & (k0 + k_low[:, None] < blk_end * 32)
            a_low = tl.load(a_tile_ptr + (k0 + k_low[:, None]), mask=a_mask, other=0.0)  # [HALF_K, BLOCK_M]
            a_high = tl.load(a_tile_ptr + (k0 + k_high[:, None]), mask=a_mask, other=0.0)
            if EMULATE_BF16:
                acc = tl.dot(w_low, a_low.to(tl.float32), acc, input_precision="ieee")
                acc = tl.dot(w_high, a_high.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w_low, a_low, acc)
                acc = tl.dot(w_high, a_high, acc)
    else:
        # Columns of A met by the low and high nibbles, as a [NUM_SCALES, 16] tile like the bytes'.
        blk2 = tl.arange(0, NUM_SCALES)[:, None]
        byte2 = tl.arange(0, 16)[None, :]
        if SPLIT_NIBBLES:
            k_low2 = blk2 * 32 + byte2
            k_high2 = k_low2 + 16
        else:
            k_low2 = blk2 * 32 + byte2 * 2
            k_high2 = k_low2 + 1
        a_row0 = (tl.load(sorted_pairs_ptr + row_start) // a_row_div).to(tl.int64)
        a_row1 = a_row0
        if BLOCK_M == 2:
            a_row1 = (tl.load(sorted_pairs_ptr + row_start + 1, mask=row_start + 1 < row_end, other=0)
                      // a_row_div).to(tl.int64)
        a0_ptr = a_ptr + a_row0 * stride_a
        a1_ptr = a_ptr + a_row1 * stride_a
        acc0 = tl.zeros([BLOCK_N, NUM_SCALES], dtype=tl.float32)  # the 16 products of a block summed in-thread
        acc1 = tl.zeros([BLOCK_N, NUM_SCALES], dtype=tl.float32)
        next_bytes = tl.load(w_tile_ptr + blk_begin * W_BLK, mask=in_n[:, None, None] & (blk3 + blk_begin < blk_end),
                             other=0)
        for blk in range(blk_begin, blk_end, NUM_SCALES):
            w_bytes = next_bytes
            scale_bytes = next_scales.to(tl.int32)
            next_blk = blk + NUM_SCALES
            next_bytes = tl.load(w_tile_ptr + next_blk * W_BLK,
                                 mask=in_n[:, None, None] & (blk3 + next_blk < blk_end), other=0)
            next_scales = tl.load(s_tile_ptr + next_blk * stride_s_k,
                                  mask=in_n[:, None] & (scale_cols + next_blk < blk_end), other=0)
            w_low, w_high = _dequant_mxfp4_tile(w_bytes, scale_bytes, BLOCK_N, NUM_SCALES, EMULATE_BF16)
            w_low = w_low.to(tl.float32)
            w_high = w_high.to(tl.float32)
            k0 = blk * 32
            a_mask = blk2 + blk < blk_end
            a_low = tl.load(a0_ptr + k0 + k_low2, mask=a_mask, other=0.0).to(tl.float32)
            a_high = tl.load(a0_ptr + k0 + k_high2, mask=a_mask, other=0.0).to(tl.float32)
            acc0 += tl.sum(w_low * a_low[None, :, :] + w_high * a_high[None, :, :], axis=2)
            if BLOCK_M == 2:
                a_low = tl.load(a1_ptr + k0 + k_low2, mask=a_mask, other=0.0).to(tl.float32)
                a_high = tl.load(a1_ptr + k0 + k_high2, mask=a_mask, other=0.0).to(tl.float32)
                acc1 += tl.sum(w_low * a_low[None, :, :] + w_high * a_high[None, :, :], axis=2)
        part0 = tl.sum(acc0, axis=1)
        part1 = tl.sum(acc1, axis=1)
        acc = tl.where(tl.arange(0, BLOCK_M)[None, :] == 0, part0[:, None], part1[:, None])  # [BLOCK_N, BLOCK_M]

    out_mask = in_n[:, None] & in_rows[None, :]
    tl.store(ws_ptr + split * stride_ws_split + pairs[None, :].to(tl.int64) * N + n[:, None], acc, mask=out_mask)


@triton.jit
def _splitk_swiglu_kernel(
    ws_ptr, ids_ptr, bias_ptr, act_ptr, num_splits, N, first_expert, num_local_experts,
    stride_ws_split, stride_bias_expert, stride_act, swiglu_alpha, swiglu_limit,
    HAS_BIAS: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """act[pair, c] = SwiGLU(rows 2c, 2c + 1 of sum over splits + bias), for each pair routed to this rank."""
    pair = tl.program_id(0).to(tl.int64)
    local = tl.load(ids_ptr + pair) - first_expert
    if (local < 0) | (local >= num_local_experts):  # never read by the second matmul
        return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_cols = cols < N // 2
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    linear = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):  # a fixed order: deterministic
        row_ptr = ws_ptr + s * stride_ws_split + pair * N
        gate += tl.load(row_ptr + 2 * cols, mask=in_cols, other=0.0)
        linear += tl.load(row_ptr + 2 * cols + 1, mask=in_cols, other=0.0)
    act_dtype = act_ptr.dtype.element_ty
    gate = cast_rne(gate, act_dtype, EMULATE_BF16).to(tl.float32)
    linear = cast_rne(linear, act_dtype, EMULATE_BF16).to(tl.float32)
    if HAS_BIAS:
        bias_row = bias_ptr + local.to(tl.int64) * stride_bias_expert
        gate = cast_rne(gate + tl.load(bias_row + 2 * cols, mask=in_cols, other=0.0).to(tl.float32), act_dtype,
                        EMULATE_BF16).to(tl.float32)
        linear = cast_rne(linear + tl.load(bias_row + 2 * cols + 1, mask=in_cols, other=0.0).to(tl.float32),
                          act_dtype, EMULATE_BF16).to(tl.float32)
    gate = tl.minimum(gate, swiglu_limit)
    linear = tl.minimum(tl.maximum(linear, -swiglu_limit), swiglu_limit)
    act = gate * (1.0 / (1.0 + tl.exp(-swiglu_alpha * gate))) * (linear + 1.0)
    tl.store(act_ptr + pair * stride_act + cols, cast_rne(act, act_dtype, EMULATE_BF16), mask=in_cols)


@triton.jit
def _splitk_combine_kernel(
    ws_ptr, ids_ptr, weights_ptr, bias_ptr, out_ptr, num_splits, hidden, first_expert, num_local_experts,
    stride_ws_split, stride_bias_expert, stride_out,
    TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[token] = sum over its slots (fixed order) of weight * (sum over splits + bias), rounded as
    _moe_matmul_kernel's second-matmul epilogue and _combine_kernel round."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_cols = cols < hidden
    act_dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        local = tl.load(ids_ptr + pair) - first_expert
        if (local >= 0) & (local < num_local_experts):  # pairs routed to other ranks were never computed
            h = tl.zeros([BLOCK_H], dtype=tl.float32)
            for s in range(num_splits):
                h += tl.load(ws_ptr + s * stride_ws_split + pair * hidden + cols, mask=in_cols, other=0.0)
            h = cast_rne(h, act_dtype, EMULATE_BF16).to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + local.to(tl.int64) * stride_bias_expert + cols, mask=in_cols, other=0.0)
                h = cast_rne(h + bias.to(tl.float32), act_dtype, EMULATE_BF16).to(tl.float32)
            total += h * tl.load(weights_ptr + pair)
    tl.store(out_ptr + token * stride_out + cols, cast_rne(total, act_dtype, EMULATE_BF16), mask=in_cols)


def _tile_config(num_tokens: int, num_pairs: int, num_local_experts: int) -> dict:
    """Tile shapes by heuristic (no autotuning: nothing to time during graph capture, same choice every run).

    Decode (few tokens): row blocks about as tall as an expert's share of the pairs (the tensor cores work on
    every row of a block, used or not), small weight tiles so that a handful of experts still spreads over every
    SM. An expert with more pairs than a block gets a second block, which finds its weight tiles in L2 (the
    programs of one expert's blocks run side by side). Prefill: large tiles for the tensor cores.
    """
    pairs_per_expert = num_pairs / max(1, num_local_experts)
    if num_tokens <= 64:
        block_m = min(64, max(16, next_pow2(int(2 * pairs_per_expert))))
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    block_m = 64 if pairs_per_expert < 96 else 128 if pairs_per_expert < 384 else 256
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def moe_matmul(
    a: torch.Tensor,  # [num_tokens, K] (gathered through the pairs) or [num_pairs, K] (grouped order)
    blocks: torch.Tensor,  # [num_local_experts, N, K / 32, 16] uint8
    scales: torch.Tensor,  # [num_local_experts, N, K / 32] uint8
    bias: torch.Tensor | None,  # [num_local_experts, N]
    groups: ExpertGroups,
    top_k: int,
    out: torch.Tensor,  # swiglu: [num_pairs, N / 2] grouped order; else [num_pairs, N] float32 by pair
    config: dict,
    swiglu: tuple[float, float] | None = None,  # (alpha, limit): the first matmul's epilogue
    pair_weights: torch.Tensor | None = None,  # [num_pairs] float32: the second matmul's routing weights
    split_nibbles: bool = False,
    tile_n: int = 1,  # blocks re-laid out by `tile_rows(blocks, tile_n)`; 1 = rows one after the other
) -> None:
    num_local_experts, n_rows, num_k_blocks, block_bytes = blocks.shape
    k = num_k_blocks * MXFP4_BLOCK_SIZE
    if block_bytes != MXFP4_BYTES_PER_BLOCK or blocks.stride(3) != 1 or blocks.stride(2) != MXFP4_BYTES_PER_BLOCK:
        raise ValueError("MXFP4 blocks must be [experts, rows, K / 32, 16] with each row's bytes contiguous")
    if scales.stride(2) != 1 or a.stride(1) != 1:
        raise ValueError("scales and activations need unit stride along K")
    if a.shape[1] != k:
        raise ValueError(f"activations have {a.shape[1]} columns, the weights {k}")
    if n_rows % tile_n:
        raise ValueError(f"{n_rows} weight rows are not whole tiles of {tile_n}")
    block_n = config["BLOCK_N"]
    num_n_tiles = triton.cdiv(n_rows, block_n)
    grid = (groups.block_expert.numel() * num_n_tiles,)
    dummy = scales  # never read: the flags below switch off its use
    launch(_moe_matmul_kernel, grid,
           a, blocks, scales, bias if bias is not None else dummy, out,
           groups.sorted_pairs, groups.block_expert, groups.block_row_start, groups.block_row_end,
           pair_weights if pair_weights is not None else dummy,
           n_rows, k, top_k, num_n_tiles,
           a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
           bias.stride(0) if bias is not None else 0, out.stride(0),
           float(swiglu[0]) if swiglu else 0.0, float(swiglu[1]) if swiglu else 0.0,
           SWIGLU=swiglu is not None, HAS_BIAS=bias is not None, GATHER_TOKENS=swiglu is not None,
           SPLIT_NIBBLES=split_nibbles, TILE_N=tile_n, EMULATE_BF16=emulate_bf16(),
           BLOCK_N=block_n, BLOCK_M=config["BLOCK_M"], BLOCK_K=config["BLOCK_K"],
           num_warps=config["num_warps"], num_stages=config["num_stages"])


SPLITK_MAX_TOKENS = 1  # the split-K path up to this many tokens: where it won on an H200 (see _splitk_config)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any fixed number
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(num_programs: int, num_blocks_k: int, num_scales: int, target_programs: int) -> tuple[int, int]:
    """(splits, scale blocks per split) so that num_programs * splits reaches target_programs, every split
    getting at least one K step and no split left empty."""
    steps = triton.cdiv(num_blocks_k, num_scales)
    splits = max(1, min(steps, triton.cdiv(target_programs, max(1, num_programs))))
    blocks_per_split = triton.cdiv(steps, splits) * num_scales
    return triton.cdiv(num_blocks_k, blocks_per_split), blocks_per_split


def _splitk_config(num_tokens: int, device: torch.device) -> dict:
    """Decode tiles (no autotuning; static shapes only, so CUDA graphs replay the same grid).

    A token's top_k experts are distinct, so with BLOCK_M >= num_tokens every expert has one row block. One or
    two tokens: BLOCK_M = 1 or 2 and the CUDA cores (an expert meets at most two rows, the tensor cores would
    work on 16). More: tensor cores with 16-row blocks. The K dimension is split so that the grid holds about
    8 programs per SM (the 1-token grid without splits: 360 + 180 programs on 132 SMs).

    Measured on an H200 (docs/PERFORMANCE.md, 2026-11-22): at 1 token, 32-row tiles on the tiled-row layout
    71 us against the grouped path's 79 (20b), 76 against 90 (120b); at 2 tokens the 2-row CUDA-core
    variant lost (149 against 110 us) and at 4-64 tokens split-K tied with the grouped path, so
    moe_experts takes this path at SPLITK_MAX_TOKENS tokens and fewer only."""
    if num_tokens <= 2:
        config = dict(BLOCK_M=next_pow2(num_tokens), BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1)
    else:
        config = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    config["target_programs"] = 8 * _num_sms(device)
    return config


def moe_matmul_splitk(
    a: torch.Tensor,  # [rows, K]: token rows (a_row_div = top_k) or pair rows (a_row_div = 1)
    blocks: torch.Tensor,  # [num_local_experts, N, K / 32, 16] uint8
    scales: torch.Tensor,  # [num_local_experts, N, K / 32] uint8, any strides
    groups: ExpertGroups,
    a_row_div: int,
    num_pairs: int,
    config: dict,
    split_nibbles: bool = False,
    tile_n: int = 1,
) -> torch.Tensor:  # [splits, num_pairs, N] float32 partial sums by pair index (rows of other ranks' pairs unset)
    num_local_experts, n_rows, num_k_blocks, block_bytes = blocks.shape
    if block_bytes != MXFP4_BYTES_PER_BLOCK or blocks.stride(3) != 1 or blocks.stride(2) != MXFP4_BYTES_PER_BLOCK:
        raise ValueError("MXFP4 blocks must be [experts, rows, K / 32, 16] with each row's bytes contiguous")
    if a.stride(1) != 1 or a.shape[1] != num_k_blocks * MXFP4_BLOCK_SIZE:
        raise ValueError(f"activations [{a.shape[0]}, {a.shape[1]}] with unit stride along K expected")
    if n_rows % tile_n:
        raise ValueError(f"{n_rows} weight rows are not whole tiles of {tile_n}")
    block_n, block_m, block_k = config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_K"]
    use_dot = block_m >= 16
    if not use_dot and block_m not in (1, 2):
        raise ValueError("the split-K kernel takes BLOCK_M 1 or 2 (CUDA cores) or >= 16 (tensor cores)")
    num_n_tiles = triton.cdiv(n_rows, block_n)
    num_blocks = groups.block_expert.numel()
    if "splits" in config:  # fixed (tests, sweeps)
        blocks_per_split = triton.cdiv(triton.cdiv(num_k_blocks, block_k // 32), config["splits"]) * (block_k // 32)
        splits = triton.cdiv(num_k_blocks, blocks_per_split)
    else:
        splits, blocks_per_split = _num_splits(num_blocks * num_n_tiles, num_k_blocks, block_k // 32,
                                               config["target_programs"])
    ws = torch.empty((splits, max(num_pairs, 1), n_rows), dtype=torch.float32, device=a.device)
    launch(_moe_matmul_splitk_kernel, (num_blocks * num_n_tiles * splits,),
           a, blocks, scales, ws,
           groups.sorted_pairs, groups.block_expert, groups.block_row_start, groups.block_row_end,
           n_rows, num_k_blocks * MXFP4_BLOCK_SIZE, a_row_div, num_n_tiles, splits, blocks_per_split,
           a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), scales.stride(2),
           ws.stride(0),
           USE_DOT=use_dot, SPLIT_NIBBLES=split_nibbles, TILE_N=tile_n, EMULATE_BF16=emulate_bf16(),
           BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
           num_warps=config["num_warps"], num_stages=config["num_stages"])
    return ws


def moe_experts_splitk(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                       swiglu_alpha, swiglu_limit, first_expert=0, split_nibbles=False, config=None,
                       tile_n=1) -> torch.Tensor:
    """moe_experts for a few tokens (decode): split-K matmuls into float32 workspaces, then one kernel that
    sums the splits, adds the bias and applies SwiGLU (by pair), and one that sums the splits of the second
    matmul, adds its bias, weights and combines a token's slots. Same roundings as moe_experts; five launches,
    all grids from shapes only."""
    num_tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    num_local_experts = w1_blocks.shape[0]
    n1 = w1_blocks.shape[1]
    intermediate = n1 // 2
    num_pairs = num_tokens * top_k
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    if x.dtype != torch.bfloat16 and not emulate_bf16():
        raise ValueError(f"the MoE kernels take bf16 activations, got {x.dtype}")
    config = _splitk_config(num_tokens, x.device) if config is None else config
    groups = group_by_expert(expert_ids, first_expert, num_local_experts, config["BLOCK_M"])
    ids = expert_ids.reshape(-1)
    ws1 = moe_matmul_splitk(x, w1_blocks, w1_scales, groups, top_k, num_pairs, config, split_nibbles, tile_n)
    act = torch.empty((num_pairs, intermediate), dtype=x.dtype, device=x.device)  # by pair index
    block = min(1024, next_pow2(intermediate))
    launch(_splitk_swiglu_kernel, (num_pairs, triton.cdiv(intermediate, block)),
           ws1, ids, b1, act, ws1.shape[0], n1, first_expert, num_local_experts,
           ws1.stride(0), b1.stride(0), act.stride(0), float(swiglu_alpha), float(swiglu_limit),
           HAS_BIAS=True, EMULATE_BF16=emulate_bf16(), BLOCK=block, num_warps=4)
    ws2 = moe_matmul_splitk(act, w2_blocks, w2_scales, groups, 1, num_pairs, config, split_nibbles, tile_n)
    block_h = min(1024, next_pow2(hidden))
    launch(_splitk_combine_kernel, (num_tokens, triton.cdiv(hidden, block_h)),
           ws2, ids, expert_weights.reshape(-1), b2 if b2 is not None else ws2, out, ws2.shape[0], hidden,
           first_expert, num_local_experts, ws2.stride(0), b2.stride(0) if b2 is not None else 0, out.stride(0),
           TOP_K=top_k, HAS_BIAS=b2 is not None, EMULATE_BF16=emulate_bf16(), BLOCK_H=block_h, num_warps=4)
    return out


def moe_experts(
    x: torch.Tensor,  # [num_tokens, hidden]
    expert_weights: torch.Tensor,  # [num_tokens, top_k] float32
    expert_ids: torch.Tensor,  # [num_tokens, top_k] int, global expert ids
    w1_blocks: torch.Tensor,  # [num_local_experts, 2 * intermediate_local, hidden / 32, 16] uint8
    w1_scales: torch.Tensor,  # [num_local_experts, 2 * intermediate_local, hidden / 32] uint8
    b1: torch.Tensor,  # [num_local_experts, 2 * intermediate_local]
    w2_blocks: torch.Tensor,  # [num_local_experts, hidden, intermediate_local / 32, 16] uint8
    w2_scales: torch.Tensor,  # [num_local_experts, hidden, intermediate_local / 32] uint8
    b2: torch.Tensor | None,  # [num_local_experts, hidden]; None on tensor-parallel ranks but one
    swiglu_alpha: float,
    swiglu_limit: float,
    first_expert: int = 0,
    split_nibbles: bool = False,  # weights re-laid out by `split_nibbles` (TritonKernels.prepare_weights)
    config: dict | None = None,  # tile shapes; None = by heuristic
    tile_n: int = 1,  # w1 and w2 blocks re-laid out by `tile_rows(blocks, tile_n)`
) -> torch.Tensor:  # [num_tokens, hidden] in x's dtype
    """The MoE layer's experts for this rank. Up to SPLITK_MAX_TOKENS tokens (decode), or with a config that
    names `target_programs` or `splits`, the split-K path (moe_experts_splitk); else grouped matmuls with fused
    epilogues. The choice depends on shapes alone."""
    num_tokens, hidden = x.shape
    if (config is None and num_tokens <= SPLITK_MAX_TOKENS) or (config is not None and (
            "target_programs" in config or "splits" in config)):
        return moe_experts_splitk(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales,
                                  b2, swiglu_alpha, swiglu_limit, first_expert, split_nibbles, config, tile_n)
    top_k = expert_ids.shape[1]
    num_local_experts = w1_blocks.shape[0]
    intermediate = w1_blocks.shape[1] // 2
    num_pairs = num_tokens * top_k
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    if x.dtype != torch.bfloat16 and not emulate_bf16():
        raise ValueError(f"the MoE kernels take bf16 activations, got {x.dtype}")
    config = _tile_config(num_tokens, num_pairs, num_local_experts) if config is None else config
    groups = group_by_expert(expert_ids, first_expert, num_local_experts, config["BLOCK_M"])
    act = torch.empty((num_pairs, intermediate), dtype=x.dtype, device=x.device)  # grouped order
    moe_matmul(x, w1_blocks, w1_scales, b1, groups, top_k, act, config,
               swiglu=(swiglu_alpha, swiglu_limit), split_nibbles=split_nibbles, tile_n=tile_n)
    y = torch.empty((num_pairs, hidden), dtype=torch.float32, device=x.device)  # by (token, slot)
    moe_matmul(act, w2_blocks, w2_scales, b2, groups, top_k, y, config,
               pair_weights=expert_weights.reshape(-1), split_nibbles=split_nibbles, tile_n=tile_n)
    block_h = min(1024, next_pow2(hidden))
    launch(_combine_kernel, (num_tokens, triton.cdiv(hidden, block_h)),
           y, expert_ids, out, hidden, first_expert, num_local_experts, y.stride(0), out.stride(0),
           TOP_K=top_k, BLOCK_H=block_h, EMULATE_BF16=emulate_bf16(), num_warps=4)
    return out


def split_nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """Re-lays out MXFP4 bytes [..., 16] so that byte j of each block holds elements j (low nibble) and j + 16
    (high) instead of 2j and 2j + 1: the kernels then read activations in contiguous runs. Same size, same
    scales: still MXFP4, 4.25 bits a weight."""
    low, high = blocks & 0x0F, blocks >> 4  # elements 0, 2, 4, ... and 1, 3, 5, ... of each block
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., 32] nibbles in element order
    return (values[..., :16] | (values[..., 16:] << 4)).contiguous()


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
    values = torch.cat((blocks & 0x0F, blocks >> 4), dim=-1)  # [..., 32] nibbles in element order
    return (values[..., 0::2] | (values[..., 1::2] << 4)).contiguous()
