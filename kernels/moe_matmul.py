"""Grouped MoE matmuls over MXFP4 expert weights, dequantized in registers (Triton); twin of moe_ref.

Each program computes one tile out^T[BLOCK_N weight rows, BLOCK_M pairs] = W_e[rows, :] @ A[pairs, :]^T for
the row block of one expert (see moe_routing.group_by_expert). The weight tile is the left operand because it
is produced in registers (FP4 nibbles -> bf16) and the pairs' activations are the small right operand. With few
tokens each expert's weight tiles are read from HBM once per step; an expert with more pairs than a row block
(BLOCK_M, chosen from the average pairs per expert) gets a second block whose programs run beside the first's
and mostly find the tiles in L2.

MXFP4 in registers: a 16-byte block holds 32 values, two per byte. The kernel dequantizes the low nibbles and
the high nibbles of a byte tile (one asm for both) and joins them into one tile in element order for a single
dot a K step (JOIN_K, the default; else two dots over BLOCK_K/2 against the matching columns of A). In the
checkpoint's layout byte j holds elements 2j and 2j+1 (A read with stride 2); `split_nibbles` (weight_layout.py,
done once at load by TritonKernels.prepare_weights) re-lays each block out so that byte j holds elements j and
j+16, and A is read in contiguous runs of 16; within the byte their bits sit where float8 e4m3 wants them, or a
shift away (`pack_split_bytes`: element j's sign at bit 7 and magnitude at bits 4..2, one AND from an e4m3 byte).
Nibble s|e1 e0|m to bf16, on the GPU (inline PTX, four bytes at a time): the bits go to bf16 sign and to the
low exponent bits and top mantissa bit, giving value * 2^-126 exactly (e1 e0 = 0 lands on bf16 subnormals,
which are exactly 0 and 0.5 * 2^-126); two bf16x2 multiplies apply 2^126 and the E8M0 scale 2^(s - 127), or one
of 2^(s - 1) where the layer's scale bytes allow (fold_scales).
Under the interpreter (no inline asm there) the same nibble goes into float8 e4m3 bits, whose subnormals give
0 and 0.5 the same way, scaled by 2^(s - 121) in float32. Both are exact for every scale byte below 249.

Epilogues: the first matmul (w1, gate and linear rows interleaved) adds its bias and applies the clamped SwiGLU,
storing the activation rows in grouped order; the second (w2) adds its bias and stores each pair's row, in the
activation dtype, at its (token, slot) place; `combine` then weights a token's top_k rows by their routing
weights and sums them in float32 in a fixed order (deterministic, unlike atomics): the products the epilogue
would form (the rows are exact in bf16), at half the bytes of float32 rows. Intermediate roundings to bf16
mirror the torch twin's.

Decode (`moe_experts_splitk`, taken at SPLITK_MAX_TOKENS tokens and fewer, or where `takes_gemv`): the K
dimension is split over programs that store float32 partial sums; follow-up kernels sum the splits in a fixed
order and apply the same epilogues with the same roundings. The partial sums come from the split-K kernel
below, or, for steps whose pairs meet experts of their own, from the matrix-vector kernel of moe_gemv.py, or, for
3 to 8 tokens on a GPU, from the tensor-core decode kernel of moe_mma.py (Gluon).
`tile_rows` (done once at load after `split_nibbles`) lays the bytes of 64 rows' K block side by side, so one K
step of a weight tile reads one contiguous run; both paths read either layout.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.moe_routing import ExpertGroups, group_by_expert
from gptoss_serve.kernels.mxfp4 import MXFP4_BLOCK_SIZE, MXFP4_BYTES_PER_BLOCK
from gptoss_serve.kernels.triton_utils import (cast_rne, device_function, emulate_bf16, launch, next_pow2, pdl_args,
                                              pdl_wait)


# Four split-layout bytes -> their eight bf16 values, times the scale (one asm for both nibbles, so the byte
# spreading is shared). $4 holds four bytes, $5 and $6 the multipliers of elements (0, 1) and (2, 3) as bf16x2;
# out: $0, $1 the low nibbles' values (elements 0, 1 and 2, 3), $2, $3 the high nibbles'. prmt spreads bytes 0, 1
# (and 2, 3) to the two 16-bit halves; each half's magnitude bits go to bf16 bits 8..6 and its sign to bit 15, which
# reads as value * 2^-126 (e1 e0 = 0 lands on bf16 subnormals, exactly 0 and 0.5 * 2^-126). Folded: the multiplier
# is 2^(s - 1) = 2^126 * 2^(s - 127), one multiply a pair (every scale byte of the weight at most FOLD_MAX_SCALE);
# else 2^126 first, then 2^(s - 127). The high nibble's bits sit in three places (pack_split_bytes, laid out for
# the e4m3 moves of split_bytes_e4m3_ptx, which Hopper's kernels use): three pieces against the low nibble's two.
# Where each nibble's bits go, as pieces (shift: left if > 0, right if < 0; then mask) ORed together
# (pieces_ptx), by layout (True: the split layout's `pack_split_bytes`, False: the checkpoint's, nibbles at 3..0
# and 7..4): (low nibble, high nibble). BF16_PIECES: from a byte in each 16-bit half to a bf16 pair's bits.
BF16_PIECES = {
    True: (((4, 0x01C001C0), (8, 0x80008000)),  # magnitude at 4..2, sign at 7
           ((2, 0x01000100), (6, 0x00C000C0), (10, 0x80008000))),  # e1 at 6, e0 m at 1..0, sign at 5
    False: (((6, 0x01C001C0), (12, 0x80008000)), ((2, 0x01C001C0), (8, 0x80008000))),
}
# E4M3_PIECES: four bytes to four float8 e4m3 bytes (split_bytes_e4m3_ptx).
E4M3_PIECES = {
    True: (((0, 0x9C9C9C9C),),  # sign 7, magnitude 4..2: already in place
           ((2, 0x8C8C8C8C), (-2, 0x10101010))),  # sign 5 -> 7, e0 m 1..0 -> 3..2; e1 6 -> 4
    False: (((2, 0x1C1C1C1C), (4, 0x80808080)),  # magnitude 2..0 -> 4..2, sign 3 -> 7
            ((-2, 0x1C1C1C1C), (0, 0x80808080))),  # magnitude 6..4 -> 4..2, the sign stays at 7
}


def pieces_ptx(out: str, src: str, pieces: tuple[tuple[int, int], ...], tmp: str) -> list[str]:
    """PTX lines: out = the OR of (src shifted as each piece says) & its mask; tmp a scratch register."""
    lines = []
    for i, (shift, mask) in enumerate(pieces):
        dst = tmp if i else out
        if shift:
            lines.append(f"{'shl' if shift > 0 else 'shr'}.b32 {dst}, {src}, {abs(shift)};")
        lines.append(f"and.b32 {dst}, {dst if shift else src}, {mask:#010x};")
        if i:
            lines.append(f"or.b32 {out}, {out}, {tmp};")
    return lines


def _split_bytes_asm(folded: bool, split: bool = True) -> str:
    lines = ["{", ".reg .b32 z, k, t0, t1, m, s;", "mov.b32 z, 0;", "mov.b32 k, 0x7E807E80;",
             "prmt.b32 t0, $4, z, 0x4140;", "prmt.b32 t1, $4, z, 0x4342;"]
    low, high = BF16_PIECES[split]
    for out, src, pieces, mult in (("$0", "t0", low, "$5"), ("$1", "t1", low, "$6"), ("$2", "t0", high, "$5"),
                                   ("$3", "t1", high, "$6")):
        lines += pieces_ptx("m", src, pieces, "s")
        if not folded:
            lines.append("mul.rn.bf16x2 m, m, k;")
        lines.append(f"mul.rn.bf16x2 {out}, m, {mult};")
    return "\n".join(lines + ["}"])


SPLIT_BYTES_ASM = tl.constexpr(_split_bytes_asm(folded=False))
SPLIT_BYTES_FOLDED_ASM = tl.constexpr(_split_bytes_asm(folded=True))
PAIRED_BYTES_ASM = tl.constexpr(_split_bytes_asm(folded=False, split=False))  # the checkpoint's layout
PAIRED_BYTES_FOLDED_ASM = tl.constexpr(_split_bytes_asm(folded=True, split=False))

# The swizzled layout (`swizzle_bits`, done once at load after `split_nibbles`): the 8 nibbles of each 4-byte word
# of a block (L0..L3, the low nibbles of its bytes: elements 4g..4g+3; H0..H3, the high ones: elements 4g+16..)
# have their bits scattered so that each pair of values lands on bf16 bit places (sign 15/31, magnitude 8..6 /
# 24..22) with at most a shift and an AND: (L0, L1) an AND, (L2, L3) and (H0, H1) a shift and an AND, (H2, H3)
# three of each. One multiply per pair then applies 2^126 (bf16 subnormals -> values, as above) and the scale:
# folded into one multiplier 2^(s - 1) where every scale byte of the weight is at most 128, else two multiplies.
# About 2 instructions a weight instead of 4 for the split layout's asm above.
# (weight_layout.SWIZZLE_POSITIONS lists the places; the asm below reads them.)
def _swizzled_pairs_ptx(word: str, pairs: tuple[str, str, str, str], mult: str, folded: bool) -> str:
    """PTX putting the four bf16x2 value pairs of a swizzled word into `pairs` ((L0, L1), (L2, L3), (H0, H1),
    (H2, H3)), times the bf16x2 multiplier `mult` (2^126 applied first unless `folded`). Uses registers t, u, v, k."""
    p0, p1, p2, p3 = pairs
    lines = [f"and.b32 {p0}, {word}, 0x81C081C0;",
             f"shl.b32 t, {word}, 3;", f"and.b32 {p1}, t, 0x81C081C0;",
             f"shl.b32 t, {word}, 6;", f"and.b32 {p2}, t, 0x81C081C0;",
             f"shl.b32 t, {word}, 1;", "and.b32 t, t, 0x80008000;",
             f"shr.b32 u, {word}, 3;", "and.b32 u, u, 0x01800180;",
             f"shr.b32 v, {word}, 7;", "and.b32 v, v, 0x00400040;",
             "or.b32 t, t, u;", f"or.b32 {p3}, t, v;"]
    if not folded:
        lines += ["mov.b32 k, 0x7E807E80;"] + [f"mul.rn.bf16x2 {p}, {p}, k;" for p in pairs]
    lines += [f"mul.rn.bf16x2 {p}, {p}, {mult};" for p in pairs]
    return "\n".join(lines)


def _swizzled_words_asm(folded: bool) -> str:
    """One word in ($8), its block's multiplier as bf16 ($9); out: the bf16 values of slots L0..L3, H0..H3
    ($0..$7)."""
    unpack = "\n".join(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, p{i};" for i in range(4))
    return ("{\n.reg .b32 m, p0, p1, p2, p3, t, u, v, k;\nmov.b32 m, {$9, $9};\n"
            + _swizzled_pairs_ptx("$8", ("p0", "p1", "p2", "p3"), "m", folded) + "\n" + unpack + "\n}")


def _swizzled_bytes_asm(folded: bool) -> str:
    """The same on a byte tile (pack=4: $4 = one word's four bytes, $5/$6 = the multiplier; $0,$1 = the low slots
    (L0, L1), (L2, L3), $2,$3 = the high ones). Right only where each thread holds whole words in register order,
    as in the CUDA-core split-K path (16 bytes a thread, no dot to change the layout); measured right on an H200."""
    return "{\n.reg .b32 t, u, v, k;\n" + _swizzled_pairs_ptx("$4", ("$0", "$1", "$2", "$3"), "$5", folded) + "\n}"


SWIZZLED_FOLDED_ASM = tl.constexpr(_swizzled_words_asm(folded=True))  # $9 = 2^(s - 1): 2^126 folded in
SWIZZLED_ASM = tl.constexpr(_swizzled_words_asm(folded=False))  # $9 = 2^(s - 127)
SWIZZLED_BYTES_FOLDED_ASM = tl.constexpr(_swizzled_bytes_asm(folded=True))
SWIZZLED_BYTES_ASM = tl.constexpr(_swizzled_bytes_asm(folded=False))
FOLD_MAX_SCALE = 128  # 2^(s - 1) is a normal bf16 up to this scale byte
SWIZZLED_MIN_BLOCK_K = 128  # the tensor-core paths on the swizzled layout: dots of K = BLOCK_K / 8


@triton.jit
def _moe_matmul_kernel(
    a_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
    N, K, top_k, num_n_tiles,
    stride_a, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_bias_expert, stride_out,
    swiglu_alpha, swiglu_limit,
    SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER_TOKENS: tl.constexpr, SPLIT_NIBBLES: tl.constexpr,
    SWIZZLED: tl.constexpr, FOLD_SCALES: tl.constexpr, TILE_N: tl.constexpr,
    EMULATE_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    JOIN_K: tl.constexpr,
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
    k_join = tl.arange(0, BLOCK_K)  # JOIN_K: a step's joined tile holds its elements in order (see _joined_values)
    a_tile_ptr = a_ptr + a_rows[None, :] * stride_a  # [1, BLOCK_M]
    num_blocks_k = K // 32

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # Scale rows are K/32 bytes apart, too narrow for asynchronous copies: load each step's scales one step
    # ahead, so their latency hides behind the current step instead of stalling it.
    scale_cols = tl.arange(0, NUM_SCALES)[None, :]
    next_scales = tl.load(s_tile_ptr, mask=in_n[:, None] & (scale_cols < num_blocks_k), other=0)
    WORDS: tl.constexpr = BLOCK_K // 8
    if SWIZZLED:  # words, eight dots a step (see _swizzled_dot_step)
        w_off, s_off, k_word = _swizzled_word_offsets(expert, n, 0, stride_w_expert, stride_w_row, stride_s_expert,
                                                      stride_s_row, 1, TILE_N, WORDS)
        w_words = w_ptr.to(tl.pointer_type(tl.int32)) + w_off
        word_blk = tl.arange(0, WORDS) // 4
        for k0 in range(0, K, BLOCK_K):
            blk = k0 // 32
            w_mask = in_n[:, None] & (word_blk[None, :] + blk < num_blocks_k)
            a_mask = in_rows[None, :] & (k0 + k_word[:, None] < K)
            acc = _swizzled_dot_step(acc, w_words + blk * (4 * TILE_N), scales_ptr + s_off + blk, w_mask,
                                     a_tile_ptr + (k0 + k_word[:, None]), a_mask, EMULATE_BF16, FOLD_SCALES)
    else:
        for k0 in range(0, K, BLOCK_K):
            blk = k0 // 32
            w_mask = in_n[:, None, None] & (blk3 + blk < num_blocks_k)
            w_bytes = tl.load(w_tile_ptr + blk * W_BLK, mask=w_mask, other=0)  # [BLOCK_N, NUM_SCALES, 16] uint8
            scale_bytes = next_scales.to(tl.int32)
            next_blk = blk + NUM_SCALES
            next_scales = tl.load(s_tile_ptr + next_blk, mask=in_n[:, None] & (scale_cols + next_blk < num_blocks_k),
                                  other=0)
            if JOIN_K:  # one dot a step: the low and high nibbles' values side by side
                a_mask = in_rows[None, :] & (k0 + k_join[:, None] < K)
                w_low, w_high = _dequant_mxfp4_tile(w_bytes, scale_bytes, BLOCK_N, NUM_SCALES, EMULATE_BF16, False,
                                                    FOLD_SCALES, SPLIT_NIBBLES)
                acc = _dot_columns(acc, _joined_values(w_low, w_high, BLOCK_N, BLOCK_K, SPLIT_NIBBLES),
                                   a_tile_ptr + (k0 + k_join[:, None]), a_mask, EMULATE_BF16)
            else:
                a_mask = in_rows[None, :] & (k0 + k_low[:, None] < K)
                acc = _bytes_dot_step(acc, w_bytes, scale_bytes, a_tile_ptr + (k0 + k_low[:, None]),
                                      a_tile_ptr + (k0 + k_high[:, None]), a_mask, BLOCK_N, NUM_SCALES, EMULATE_BF16,
                                      FOLD_SCALES, SPLIT_NIBBLES)

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
        out_mask = in_n[:, None] & in_rows[None, :]  # h is already in the activation dtype: stored exactly
        tl.store(out_ptr + pairs[None, :].to(tl.int64) * stride_out + n[:, None], h.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


@triton.jit
def _combine_kernel(
    y_ptr, ids_ptr, weights_ptr, out_ptr, hidden, first_expert, num_local_experts, stride_y, stride_out,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, EMULATE_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """out[token] = sum over its slots, in slot order, of y[pair] (the second matmul's rows with their bias, in
    the activation dtype) times the pair's routing weight, in float32: the twin's product and sum."""
    pdl_wait(PDL)  # y comes from the kernel before
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_cols = cols < hidden
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):  # a fixed order: the sum does not depend on scheduling
        local = tl.load(ids_ptr + token * TOP_K + slot) - first_expert
        here = (local >= 0) & (local < num_local_experts)  # pairs routed to other ranks were never written
        # masked, not branched around: the slots' loads go out together (see _splitk_combine_kernel)
        y = tl.load(y_ptr + (token * TOP_K + slot) * stride_y + cols, mask=tl.where(here, in_cols, False), other=0.0)
        weight = tl.load(weights_ptr + token * TOP_K + slot)
        total = tl.where(here, total + y.to(tl.float32) * weight, total)
    tl.store(out_ptr + token * stride_out + cols, cast_rne(total, out_ptr.dtype.element_ty, EMULATE_BF16), mask=in_cols)


@device_function
def _dequant_mxfp4_tile(w_bytes, scale_bytes, BLOCK_N: tl.constexpr, NUM_SCALES: tl.constexpr,
                        EMULATE_BF16: tl.constexpr, SWIZZLED: tl.constexpr, FOLD_SCALES: tl.constexpr,
                        SPLIT_NIBBLES: tl.constexpr):
    """Byte tile [BLOCK_N, NUM_SCALES, 16] and its scale bytes [BLOCK_N, NUM_SCALES] (int32) -> the low- and
    high-nibble values, each [BLOCK_N, NUM_SCALES, 16]: bf16 on a GPU, float32 under the interpreter.
    SWIZZLED: bytes in `swizzle_bits`' layout, for the CUDA-core path (the tensor-core paths read words); else
    SPLIT_NIBBLES: bytes in `split_nibbles`' layout (their bits placed by `pack_split_bytes`), or the checkpoint's."""
    if EMULATE_BF16:
        if SWIZZLED:  # the CUDA-core split-K path (the tensor-core paths read words: _swizzled_dot_step)
            words = tl.reshape(w_bytes.to(tl.int32), [BLOCK_N, NUM_SCALES, 4, 4])  # [.., word, byte]
            byte_at = tl.arange(0, 4)[None, None, None, :]
            words = tl.sum(words << (8 * byte_at), axis=3)  # little-endian, [.., word]
            word_scales = tl.broadcast_to(scale_bytes[:, :, None], [BLOCK_N, NUM_SCALES, 4])
            l0, l1, l2, l3, h0, h1, h2, h3 = _dequant_swizzled_words(words, word_scales, EMULATE_BF16, FOLD_SCALES)
            # Slot j of word g is element 4g + j of the low (or high) half: [.., g, 2b + c] = slot 2b + c.
            w_low = tl.reshape(tl.join(tl.join(l0, l2), tl.join(l1, l3)), [BLOCK_N, NUM_SCALES, 16])
            w_high = tl.reshape(tl.join(tl.join(h0, h2), tl.join(h1, h3)), [BLOCK_N, NUM_SCALES, 16])
        else:
            scale = e4m3_block_scale(scale_bytes)[:, :, None]
            low, high = split_bytes_e4m3(w_bytes, SPLIT_NIBBLES)
            w_low = low.to(tl.float32) * scale
            w_high = high.to(tl.float32) * scale
    else:  # four bytes an asm: the swizzled layout's (CUDA-core split-K path only), the split or the checkpoint's
        mult = tl.broadcast_to(_bf16_multiplier(scale_bytes, FOLD_SCALES)[:, :, None], [BLOCK_N, NUM_SCALES, 16])
        if SWIZZLED:
            asm: tl.constexpr = SWIZZLED_BYTES_FOLDED_ASM if FOLD_SCALES else SWIZZLED_BYTES_ASM
        elif SPLIT_NIBBLES:
            asm: tl.constexpr = SPLIT_BYTES_FOLDED_ASM if FOLD_SCALES else SPLIT_BYTES_ASM
        else:
            asm: tl.constexpr = PAIRED_BYTES_FOLDED_ASM if FOLD_SCALES else PAIRED_BYTES_ASM
        w_low, w_high = tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r,r,r", [w_bytes, mult],
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    return w_low, w_high


def split_bytes_e4m3_ptx(word: str, split: bool = True) -> list[str]:
    """PTX lines: four split-layout bytes in `word` (the checkpoint's with split=False) -> their low nibbles as
    float8 e4m3 bytes in register lo and the high nibbles in hi, split into the e4m3 byte pairs e0, e1 (low) and
    e2, e3 (high); the bit moves of split_bytes_e4m3 (E4M3_PIECES), four bytes at a time (5 instructions, the
    checkpoint's bytes 7). The caller declares .b32 t, u, lo, hi and .b16 e<4>."""
    low, high = E4M3_PIECES[split]
    return (pieces_ptx("lo", word, low, "t") + pieces_ptx("hi", word, high, "t")
            + ["mov.b32 {e0, e1}, lo;", "mov.b32 {e2, e3}, hi;"])


@device_function
def split_bytes_e4m3(w_bytes, SPLIT: tl.constexpr):
    """Split-layout bytes (uint8, any shape; `pack_split_bytes`), or the checkpoint's where not SPLIT -> the low
    and high nibbles as float8 e4m3 bytes that read as value * 2^-6: s|e1 e0|m lands as s|0 0 e1 e0|m 0 0 (e1 e0
    = 0 on e4m3 subnormals, exactly 0 and 0.5 * 2^-6). The moves of E4M3_PIECES (the asm of moe_gemv.py,
    moe_mma.py and moe_wgmma.py: split_bytes_e4m3_ptx), one byte at a time."""
    if SPLIT:
        low = (w_bytes & 0x9C).to(tl.float8e4nv, bitcast=True)
        high = (((w_bytes << 2) & 0x8C) | ((w_bytes >> 2) & 0x10)).to(tl.float8e4nv, bitcast=True)
    else:
        low = (((w_bytes & 0x07) << 2) | ((w_bytes & 0x08) << 4)).to(tl.float8e4nv, bitcast=True)
        high = (((w_bytes >> 2) & 0x1C) | (w_bytes & 0x80)).to(tl.float8e4nv, bitcast=True)
    return low, high


@device_function
def e4m3_block_scale(scale_bytes):
    """E8M0 scale bytes (int32) -> 2^(s - 121) as float32: the scale 2^(s - 127) times the 2^6 that the e4m3
    values of split_bytes_e4m3 lack (exact for scale bytes up to 248)."""
    return ((scale_bytes + 6) << 23).to(tl.float32, bitcast=True)


@device_function
def _bf16_multiplier(scale_bytes, FOLD_SCALES: tl.constexpr):
    """The bf16 multiplier the dequantization asm applies for E8M0 scale bytes (int32): 2^(s - 1) = 2^126 *
    2^(s - 127) when FOLD_SCALES (a normal bf16 for scale bytes 0..FOLD_MAX_SCALE), else 2^(s - 127) (byte 0: the
    subnormal 2^-127), the asm multiplying by 2^126 first."""
    if FOLD_SCALES:
        bits = (scale_bytes + 126) << 7
    else:
        bits = tl.where(scale_bytes == 0, 0x40, scale_bytes << 7)
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@device_function
def _swizzled_slot(words, M_AT: tl.constexpr, E0_AT: tl.constexpr, E1_AT: tl.constexpr, S_AT: tl.constexpr):
    """The unscaled FP4 value (float32) of one nibble slot of each swizzled word (interpreter)."""
    m = ((words >> M_AT) & 1).to(tl.float32)
    e = ((words >> E0_AT) & 1) + 2 * ((words >> E1_AT) & 1)
    magnitude = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << e).to(tl.float32) * 0.5)
    return tl.where(((words >> S_AT) & 1) == 1, -magnitude, magnitude)


@device_function
def _dequant_swizzled_words(words, scale_bytes, EMULATE_BF16: tl.constexpr, FOLD_SCALES: tl.constexpr):
    """Word tile [BLOCK_N, WORDS] int32 of the swizzled layout and each word's scale byte (int32) -> the values
    of its slots L0..L3, H0..H3, eight tiles [BLOCK_N, WORDS]: bf16 on a GPU (one asm per word, so the result
    does not depend on how the tile is spread over threads), float32 under the interpreter."""
    if EMULATE_BF16:
        scale = tl.where(scale_bytes == 0, 0x00400000, scale_bytes << 23).to(tl.float32, bitcast=True)
        l0 = _swizzled_slot(words, 6, 7, 8, 15) * scale
        l1 = _swizzled_slot(words, 22, 23, 24, 31) * scale
        l2 = _swizzled_slot(words, 3, 4, 5, 12) * scale
        l3 = _swizzled_slot(words, 19, 20, 21, 28) * scale
        h0 = _swizzled_slot(words, 0, 1, 2, 9) * scale
        h1 = _swizzled_slot(words, 16, 17, 18, 25) * scale
        h2 = _swizzled_slot(words, 13, 10, 11, 14) * scale
        h3 = _swizzled_slot(words, 29, 26, 27, 30) * scale
    else:
        l0, l1, l2, l3, h0, h1, h2, h3 = tl.inline_asm_elementwise(
            SWIZZLED_FOLDED_ASM if FOLD_SCALES else SWIZZLED_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h",
            [words, _bf16_multiplier(scale_bytes, FOLD_SCALES)], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    return l0, l1, l2, l3, h0, h1, h2, h3


@device_function
def _dot_columns(acc, w, a_ptrs, a_mask, EMULATE_BF16: tl.constexpr):
    """acc += w [BLOCK_N, WORDS] @ A[columns of a_ptrs [WORDS, BLOCK_M]]."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    if EMULATE_BF16:
        return tl.dot(w, a.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, a, acc)


@device_function
def _joined_values(w_low, w_high, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_NIBBLES: tl.constexpr):
    """The low- and high-nibble values [BLOCK_N, NUM_SCALES, 16] of a step's bytes as one tile [BLOCK_N, BLOCK_K]
    in element order: split layout (byte j = elements j, j + 16) the halves one after the other, checkpoint
    layout (2j, 2j + 1) interleaved."""
    both = tl.join(w_low, w_high)  # [BLOCK_N, NUM_SCALES, 16, 2]
    if SPLIT_NIBBLES:
        both = tl.permute(both, [0, 1, 3, 2])
    return tl.reshape(both, [BLOCK_N, BLOCK_K])


@device_function
def _bytes_dot_step(acc, w_bytes, scale_bytes, a_low_ptrs, a_high_ptrs, a_mask, BLOCK_N: tl.constexpr,
                    NUM_SCALES: tl.constexpr, EMULATE_BF16: tl.constexpr, FOLD_SCALES: tl.constexpr,
                    SPLIT_NIBBLES: tl.constexpr):
    """One K step of a tensor-core matmul on a byte tile [BLOCK_N, NUM_SCALES, 16] (checkpoint or split layout)
    and its scale bytes: two dots, the low nibbles' values against the activation columns a_low_ptrs [HALF_K,
    BLOCK_M], the high nibbles' against a_high_ptrs."""
    HALF_K: tl.constexpr = NUM_SCALES * 16
    w_low, w_high = _dequant_mxfp4_tile(w_bytes, scale_bytes, BLOCK_N, NUM_SCALES, EMULATE_BF16, False, FOLD_SCALES,
                                        SPLIT_NIBBLES)
    acc = _dot_columns(acc, tl.reshape(w_low, [BLOCK_N, HALF_K]), a_low_ptrs, a_mask, EMULATE_BF16)
    return _dot_columns(acc, tl.reshape(w_high, [BLOCK_N, HALF_K]), a_high_ptrs, a_mask, EMULATE_BF16)


@device_function
def _swizzled_dot_step(acc, w_words_ptr, s_words_ptr, w_mask, a_ptrs, a_mask, EMULATE_BF16: tl.constexpr,
                       FOLD_SCALES: tl.constexpr):
    """One K step of a tensor-core matmul on the swizzled layout. w_words_ptr / s_words_ptr [BLOCK_N, WORDS]:
    word c of the step is word c % 4 of its K block c // 4, with that block's scale byte; a_ptrs [WORDS,
    BLOCK_M]: the activation of each word's slot L0 (element 32 (c // 4) + 4 (c % 4)); the other slots are
    1, 2, 3 and 16..19 further. Eight dots of K = WORDS, one per slot."""
    words = tl.load(w_words_ptr, mask=w_mask, other=0)
    scale_bytes = tl.load(s_words_ptr, mask=w_mask, other=0).to(tl.int32)
    l0, l1, l2, l3, h0, h1, h2, h3 = _dequant_swizzled_words(words, scale_bytes, EMULATE_BF16, FOLD_SCALES)
    acc = _dot_columns(acc, l0, a_ptrs, a_mask, EMULATE_BF16)
    acc = _dot_columns(acc, l1, a_ptrs + 1, a_mask, EMULATE_BF16)
    acc = _dot_columns(acc, l2, a_ptrs + 2, a_mask, EMULATE_BF16)
    acc = _dot_columns(acc, l3, a_ptrs + 3, a_mask, EMULATE_BF16)
    acc = _dot_columns(acc, h0, a_ptrs + 16, a_mask, EMULATE_BF16)
    acc = _dot_columns(acc, h1, a_ptrs + 17, a_mask, EMULATE_BF16)
    acc = _dot_columns(acc, h2, a_ptrs + 18, a_mask, EMULATE_BF16)
    acc = _dot_columns(acc, h3, a_ptrs + 19, a_mask, EMULATE_BF16)
    return acc


@device_function
def _swizzled_word_offsets(expert, n, blk0, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row,
                           stride_s_k, TILE_N: tl.constexpr, WORDS: tl.constexpr):
    """Word offsets (int32 units) [BLOCK_N, WORDS] of K step 0 (blocks blk0..) of rows n, the matching scale
    byte offsets, and each word column's first element (relative to the step's first element) [WORDS]."""
    c = tl.arange(0, WORDS)
    blk = blk0 + c // 4
    n2 = n[:, None].to(tl.int64)
    if TILE_N == 1:
        byte = expert.to(tl.int64) * stride_w_expert + n2 * stride_w_row + blk[None, :] * 16 + (c % 4)[None, :] * 4
    else:
        byte = expert.to(tl.int64) * stride_w_expert + (n2 // TILE_N) * (stride_w_row * TILE_N) \
            + (n2 % TILE_N) * 16 + blk[None, :] * (16 * TILE_N) + (c % 4)[None, :] * 4
    scale = expert.to(tl.int64) * stride_s_expert + n2 * stride_s_row + blk[None, :].to(tl.int64) * stride_s_k
    return byte // 4, scale, (c // 4) * 32 + (c % 4) * 4


@triton.jit
def _moe_matmul_splitk_kernel(
    a_ptr, w_ptr, scales_ptr, ws_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
    N, K, a_row_div, num_n_tiles, num_splits, blocks_per_split, first_expert, num_local_experts,
    stride_a, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_s_k, stride_ws_split,
    USE_DOT: tl.constexpr, SPLIT_NIBBLES: tl.constexpr, SWIZZLED: tl.constexpr, FOLD_SCALES: tl.constexpr,
    PAIR_BLOCKS: tl.constexpr, TILE_N: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode twin of _moe_matmul_kernel: one program = one row block x one BLOCK_N tile x one K range (split).

    Stores the float32 partial sums of its K range, unrounded, at ws[split, pair, n] (by pair index); the
    follow-up kernels sum the splits in a fixed order and apply the epilogues. USE_DOT: tensor cores (BLOCK_M
    >= 16); else BLOCK_M is 1 or 2 and the products are summed on the CUDA cores (no shared memory, no
    tensor-core waits, the next step's bytes loaded one step ahead in registers).

    PAIR_BLOCKS (one token: its top_k experts are distinct): row block b is pair b, its expert read straight from
    the routing (block_expert_ptr = the expert ids), so no grouping kernel runs."""
    pid = tl.program_id(0)
    split = pid % num_splits  # the splits of one tile are neighbours: together they read its rows end to end
    pid_n = (pid // num_splits) % num_n_tiles
    pid_m = pid // (num_splits * num_n_tiles)
    if PAIR_BLOCKS:
        expert = tl.load(block_expert_ptr + pid_m) - first_expert
        if (expert < 0) | (expert >= num_local_experts):  # routed to another rank's expert
            return
        row_start = pid_m
        row_end = pid_m + 1
        rows = row_start + tl.arange(0, BLOCK_M)
        in_rows = rows < row_end
        pairs = rows
    else:
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
        WORDS: tl.constexpr = BLOCK_K // 8
        if SWIZZLED:  # words, eight dots a step (see _swizzled_dot_step)
            w_off, s_off, k_word = _swizzled_word_offsets(expert, n, 0, stride_w_expert, stride_w_row,
                                                          stride_s_expert, stride_s_row, stride_s_k, TILE_N, WORDS)
            w_words = w_ptr.to(tl.pointer_type(tl.int32)) + w_off
            word_blk = tl.arange(0, WORDS) // 4
            for blk in range(blk_begin, blk_end, NUM_SCALES):
                w_mask = in_n[:, None] & (word_blk[None, :] + blk < blk_end)
                a_mask = in_rows[None, :] & (blk * 32 + k_word[:, None] < blk_end * 32)
                acc = _swizzled_dot_step(acc, w_words + blk * (4 * TILE_N), scales_ptr + s_off + blk * stride_s_k,
                                         w_mask, a_tile_ptr + (blk * 32 + k_word[:, None]), a_mask, EMULATE_BF16,
                                         FOLD_SCALES)
        else:
            for blk in range(blk_begin, blk_end, NUM_SCALES):
                w_mask = in_n[:, None, None] & (blk3 + blk < blk_end)
                w_bytes = tl.load(w_tile_ptr + blk * W_BLK, mask=w_mask, other=0)
                scale_bytes = next_scales.to(tl.int32)
                next_blk = blk + NUM_SCALES
                next_scales = tl.load(s_tile_ptr + next_blk * stride_s_k,
                                      mask=in_n[:, None] & (scale_cols + next_blk < blk_end), other=0)
                k0 = blk * 32
                a_mask = in_rows[None, :] & (k0 + k_low[:, None] < blk_end * 32)
                acc = _bytes_dot_step(acc, w_bytes, scale_bytes, a_tile_ptr + (k0 + k_low[:, None]),
                                      a_tile_ptr + (k0 + k_high[:, None]), a_mask, BLOCK_N, NUM_SCALES, EMULATE_BF16,
                                      FOLD_SCALES, SPLIT_NIBBLES)
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
        if PAIR_BLOCKS:
            a_row0 = (row_start // a_row_div).to(tl.int64)
        else:
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
            w_low, w_high = _dequant_mxfp4_tile(w_bytes, scale_bytes, BLOCK_N, NUM_SCALES, EMULATE_BF16, SWIZZLED,
                                                FOLD_SCALES, SPLIT_NIBBLES)
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
    ws_ptr, ids_ptr, bias_ptr, act_ptr, N, first_expert, num_local_experts,
    stride_ws_split, stride_bias_expert, stride_act, swiglu_alpha, swiglu_limit,
    NUM_SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """act[pair, c] = SwiGLU(rows 2c, 2c + 1 of sum over splits + bias), for each pair routed to this rank."""
    pdl_wait(PDL)  # the partial sums come from the kernel before
    pair = tl.program_id(0).to(tl.int64)
    local = tl.load(ids_ptr + pair) - first_expert
    if (local < 0) | (local >= num_local_experts):  # never read by the second matmul
        return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_cols = cols < N // 2
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    linear = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):  # a fixed order: deterministic; unrolled, so the loads go out together
        row_ptr = ws_ptr + s * stride_ws_split + pair * N
        gate += tl.load(row_ptr + 2 * cols, mask=in_cols, other=0.0)
        linear += tl.load(row_ptr + 2 * cols + 1, mask=in_cols, other=0.0)
    act = swiglu_of_sums(gate, linear, bias_ptr + local.to(tl.int64) * stride_bias_expert, cols, in_cols,
                         act_ptr.dtype.element_ty, swiglu_alpha, swiglu_limit, HAS_BIAS, EMULATE_BF16)
    tl.store(act_ptr + pair * stride_act + cols, act, mask=in_cols)


@device_function
def swiglu_of_sums(gate, linear, bias_row, cols, in_cols, act_dtype: tl.constexpr, swiglu_alpha, swiglu_limit,
                   HAS_BIAS: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """The first matmul's epilogue on float32 sums of output columns `cols` (gate: rows 2c, linear: rows 2c + 1):
    rounded to act_dtype, plus the bias (rounded again), clamped SwiGLU, in act_dtype: the torch twin's roundings."""
    gate = cast_rne(gate, act_dtype, EMULATE_BF16).to(tl.float32)
    linear = cast_rne(linear, act_dtype, EMULATE_BF16).to(tl.float32)
    if HAS_BIAS:
        gate = cast_rne(gate + tl.load(bias_row + 2 * cols, mask=in_cols, other=0.0).to(tl.float32), act_dtype,
                        EMULATE_BF16).to(tl.float32)
        linear = cast_rne(linear + tl.load(bias_row + 2 * cols + 1, mask=in_cols, other=0.0).to(tl.float32),
                          act_dtype, EMULATE_BF16).to(tl.float32)
    gate = tl.minimum(gate, swiglu_limit)
    linear = tl.minimum(tl.maximum(linear, -swiglu_limit), swiglu_limit)
    act = gate * (1.0 / (1.0 + tl.exp(-swiglu_alpha * gate))) * (linear + 1.0)
    return cast_rne(act, act_dtype, EMULATE_BF16)


@triton.jit
def _splitk_combine_kernel(
    ws_ptr, ids_ptr, weights_ptr, bias_ptr, out_ptr, hidden, first_expert, num_local_experts,
    stride_ws_split, stride_bias_expert, stride_out,
    NUM_SPLITS: tl.constexpr, TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    """out[token] = sum over its slots (fixed order) of weight * (sum over splits + bias), rounded as
    _moe_matmul_kernel's second-matmul epilogue and _combine_kernel round. A slot routed to another rank adds
    nothing; its loads are masked off rather than branched around, so every slot's loads go out together (a
    branch a slot made four dependent rounds of loads, SASS)."""
    pdl_wait(PDL)  # the partial sums come from the kernel before
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_cols = cols < hidden
    act_dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        local = tl.load(ids_ptr + pair) - first_expert
        here = (local >= 0) & (local < num_local_experts)  # pairs routed to other ranks were never computed
        in_slot = tl.where(here, in_cols, False)  # (in_cols & here: a mask dtype Triton 3.9's interpreter refuses)
        h = tl.zeros([BLOCK_H], dtype=tl.float32)
        for s in tl.static_range(NUM_SPLITS):  # unrolled: the loads go out together
            h += tl.load(ws_ptr + s * stride_ws_split + pair * hidden + cols, mask=in_slot, other=0.0)
        total = add_slot(total, h, here, bias_ptr + local.to(tl.int64) * stride_bias_expert, cols, in_slot,
                         tl.load(weights_ptr + pair), act_dtype, HAS_BIAS, EMULATE_BF16)
    tl.store(out_ptr + token * stride_out + cols, cast_rne(total, act_dtype, EMULATE_BF16), mask=in_cols)


@device_function
def add_slot(total, h, here, bias_row, cols, in_slot, weight, act_dtype: tl.constexpr, HAS_BIAS: tl.constexpr,
             EMULATE_BF16: tl.constexpr):
    """total + weight * (h rounded to act_dtype, plus the bias, rounded again) where the slot is `here` (routed to
    this rank), else total: one slot of the second matmul's epilogue and the combine, with the twin's roundings."""
    h = cast_rne(h, act_dtype, EMULATE_BF16).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_row + cols, mask=in_slot, other=0.0)
        h = cast_rne(h + bias.to(tl.float32), act_dtype, EMULATE_BF16).to(tl.float32)
    return tl.where(here, total + h * weight, total)


def _tile_config(num_tokens: int, num_pairs: int, num_local_experts: int) -> dict:
    """Tile shapes by heuristic (no autotuning: nothing to time during graph capture, same choice every run).

    Decode (few tokens): row blocks about as tall as an expert's share of the pairs (the tensor cores work on
    every row of a block, used or not), small weight tiles so that a handful of experts still spreads over every
    SM. An expert with more pairs than a block gets a second block, which finds its weight tiles in L2 (the
    programs of one expert's blocks run side by side). Prefill: large tiles for the tensor cores.
    Both take one dot a step over the low and high nibbles' values side by side (JOIN_K), not two of half the K.
    H200, 2026-12-02 (docs/PERFORMANCE.md): 20b 8 / 64 / 512 / 4096 tokens 240 / 310 / 609 / 3084 -> 212 / 273 /
    544 / 2486 us in the sweep (the last: 264 -> 328 TFLOP/s; 342 in the bench run). With 64-wide K steps and row
    blocks of 128 or more the joined dot came out wrong on Triton 3.6 (2.3e-2 from the torch twin at 4096 tokens,
    against 1.4e-5 with 128-wide steps), so those blocks step 128 along K.
    """
    pairs_per_expert = num_pairs / max(1, num_local_experts)
    if num_tokens <= 64:
        block_m = min(64, max(16, next_pow2(int(2 * pairs_per_expert))))
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, JOIN_K=True)
    # 64-row blocks up to 192 pairs an expert (2026-12-02, tools/moe_prefill_sweep.py: at 128 pairs an expert,
    # 120b 4096 tokens 4269 -> 3993 us and 20b 1024 tokens 1040 -> 935 against 128-row blocks).
    block_m = 64 if pairs_per_expert < 192 else 128 if pairs_per_expert < 384 else 256
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64 if block_m == 64 else 128, num_warps=8, num_stages=3,
                JOIN_K=True)


def moe_matmul(
    a: torch.Tensor,  # [num_tokens, K] (gathered through the pairs) or [num_pairs, K] (grouped order)
    blocks: torch.Tensor,  # [num_local_experts, N, K / 32, 16] uint8
    scales: torch.Tensor,  # [num_local_experts, N, K / 32] uint8
    bias: torch.Tensor | None,  # [num_local_experts, N]
    groups: ExpertGroups,
    top_k: int,
    out: torch.Tensor,  # swiglu: [num_pairs, N / 2] grouped order; else [num_pairs, N] by pair (unweighted)
    config: dict,
    swiglu: tuple[float, float] | None = None,  # (alpha, limit): the first matmul's epilogue
    split_nibbles: bool = False,
    tile_n: int = 1,  # blocks re-laid out by `tile_rows(blocks, tile_n)`; 1 = rows one after the other
    swizzled: bool = False,  # bits re-laid out by `swizzle_bits` (after split_nibbles)
    fold_scales: bool = False,  # every scale byte <= FOLD_MAX_SCALE: the 2^126 of the dequantization folds in
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
    if swizzled:  # eight dots of K = BLOCK_K / 8 a step: the tensor cores need K >= 16
        config = dict(config, BLOCK_K=max(config["BLOCK_K"], SWIZZLED_MIN_BLOCK_K))
    block_n = config["BLOCK_N"]
    join_k = config.get("JOIN_K", False) and not swizzled
    if join_k and config["BLOCK_M"] >= 128 and config["BLOCK_K"] < 128:
        raise ValueError("JOIN_K with row blocks of 128 or more needs BLOCK_K >= 128: Triton 3.6 computes the "
                         "joined dot wrongly there (see _tile_config)")
    num_n_tiles = triton.cdiv(n_rows, block_n)
    grid = (groups.block_expert.numel() * num_n_tiles,)
    dummy = scales  # never read: the flags below switch off its use
    launch(_moe_matmul_kernel, grid,
           a, blocks, scales, bias if bias is not None else dummy, out,
           groups.sorted_pairs, groups.block_expert, groups.block_row_start, groups.block_row_end,
           n_rows, k, top_k, num_n_tiles,
           a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
           bias.stride(0) if bias is not None else 0, out.stride(0),
           float(swiglu[0]) if swiglu else 0.0, float(swiglu[1]) if swiglu else 0.0,
           SWIGLU=swiglu is not None, HAS_BIAS=bias is not None, GATHER_TOKENS=swiglu is not None,
           SPLIT_NIBBLES=split_nibbles or swizzled, SWIZZLED=swizzled, FOLD_SCALES=fold_scales,
           TILE_N=tile_n, EMULATE_BF16=emulate_bf16(),
           BLOCK_N=block_n, BLOCK_M=config["BLOCK_M"], BLOCK_K=config["BLOCK_K"],
           JOIN_K=join_k, num_warps=config["num_warps"], num_stages=config["num_stages"])


SPLITK_MAX_TOKENS = 1  # the split-K path up to this many tokens: where it won on an H200 (see _splitk_config)
# Decode steps whose pairs nearly all meet experts of their own go to the matrix-vector kernel (kernels/moe_gemv.py,
# the activation slice held in registers, pairs one by one): one token, or up to num_local_experts /
# (top_k * GEMV_EXPERTS_PER_PAIR) tokens. H200, 2026-12-01 (docs/PERFORMANCE.md), µs for the experts:
# 20b 1 token 62.8 -> 49.9 (split-K before), 2 tokens 95.0 -> 84.5; 120b 2 tokens 115 -> 86, 4 tokens 179 -> 152,
# 8 tokens 303 -> 277; but 20b at 4 and 8 tokens, whose pairs share experts, lost (145 -> 150, 203 -> 273).
# The 20b engine's single stream: 320 -> 356 tok/s. False: the split-K kernel at one token, grouped beyond.
GEMV_DECODE = True
GEMV_EXPERTS_PER_PAIR = 4
# Those steps in two launches instead of four (kernels/moe_gemv_fused.py: each program walks all of K, SwiGLU and
# the combine inside): the same sums (bit for bit under the interpreter); off until timed (tools/gpu_check.sh).
# GPTOSS_GEMV_FUSED_DECODE=1 turns it on for a process (an engine A/B run).
GEMV_FUSED_DECODE = os.environ.get("GPTOSS_GEMV_FUSED_DECODE", "0") == "1"
# Steps of more than MMA_MAX_TOKENS tokens on the wgmma kernel (kernels/moe_wgmma.py, Gluon, Hopper) where the layer's
# scale bytes allow its f16 scaling; GPTOSS_WGMMA_MOE=0 turns it off for a process. H200, 2026-12-04
# (tools/moe_wgmma_check.py, docs/PERFORMANCE.md), one K block a step, µs against the grouped kernel, 128 weight rows a
# program: 64-pair row blocks at 32 and 64 pairs an expert (20b 256 tokens 370.5 -> 336.1, 512 tokens 541.0 -> 490.1;
# 120b 1024 tokens 1532.9 -> 1393.5), 128-pair blocks at 128 and 256 (20b 1024 tokens 895.7 -> 751.9, 2048 tokens 1643.2
# -> 1324.8; 120b 4096 tokens 3961.3 -> 3428.5); it lost at 8 pairs an expert (20b 64 tokens 269.4 -> 293.3) and at 512.
# H200, 2026-12-06 (tools/moe_mma_sweep.py): three K blocks a step, and 16-pair row blocks for decode steps (at most
# WGMMA_DECODE_PAIRS_PER_EXPERT an expert), won at every size timed: 20b 16 tokens 254.0 -> 216.2, 64 tokens 269.0 ->
# 219.0; 120b 64 tokens 882.4 -> 704.4, 4096 tokens 3575.2 -> 3163.4. On an H100 the same day, against the grouped
# kernel: 20b 128 tokens 354.3 -> 298.3, 1024 tokens 899.1 -> 702.5, and at 512 pairs an expert (4096 tokens) 2389.7 ->
# 2282.7, so no step size is left to the grouped kernel on a Hopper GPU; 120b 16 tokens 428.1 -> 341.0, 512 tokens
# 1424.7 -> 1153.1. Decode steps of up to 8 tokens whose pairs share experts (not `pairs_apart`) take it too, with
# 8-pair row blocks (wgmma N = 8): H100, 20b 8 tokens 174.8 -> 163.1 against the tensor-core decode kernel's blocks of
# 8; where pairs went one by one that kernel stayed then (120b 8 tokens 203.8 against 211.0; since the rings see
# WGMMA_MIN_APART_TOKENS).
WGMMA_MOE = os.environ.get("GPTOSS_WGMMA_MOE", "1") == "1"
WGMMA_DECODE_PAIRS_PER_EXPERT = 16
# Steps of more than 8 tokens with at most this many pairs an expert on average take 8-pair row blocks: H100,
# 2026-12-06 (later), 120b 64 tokens (2 pairs an expert) 634.8 µs with 16-pair blocks against 603.3 with 8 (589.2
# scaled after); 20b 64 tokens (8 an expert, up to ~16: two blocks of 8 for many experts) 195.9 against 241.6.
WGMMA_SMALL_BLOCK_PAIRS_PER_EXPERT = 2
# Decode steps' row blocks (16 pairs; 8 where pairs share experts at up to 8 tokens) and tail blocks: 64 weight
# rows a program (58 registers, 12-17 KB of shared memory: 8 programs an SM, against 4 with 128 rows and 12
# stages, 98 registers; Nsight Compute on that tile at 20b 64 tokens: 3.65 warps a scheduler, issue slots 66%
# busy). H100, 2026-12-06 (tools/moe_mma_sweep.py, µs, one ring of 8 stages then, against 128 rows and 12 stages):
# 20b 8 tokens 164.8 -> 156.7, 16 tokens 223.6 -> 204.4, 32 tokens 224.2 -> 205.0, 64 tokens 226.6 -> 214.2; 120b
# 64 tokens 731.6 -> 705.9. Register caps (64 on 128 rows and 8 stages, 48 on 64 rows) lost. With a ring a K block
# (moe_wgmma.DEFAULT_WGMMA_CONFIG), 6 stages (2 slots a ring) beat 9 and 12 at 16 pairs (120b 64 tokens 659.2
# against 677.2 and 718.2 µs; 20b even), 12 beat 9 at 8 pairs (20b 8 tokens 145.8 against 150.3). Row blocks of
# 64 pairs likewise with 6 stages (20b 512 tokens 412.3 against 434.1 with 9), of 128 with 9 (120b 4096 tokens
# 2988 against 3037 with 6). 8-pair blocks scale each K block's product after its wgmma (SCALE_AFTER; 177 SASS
# instructions a step against 189): H100, 2026-12-06 (later), 20b 8 tokens 139.3 -> 135.9 µs, 120b 64 tokens (8-pair
# blocks) 603.3 -> 589.2; at 16 pairs it lost (20b 64 tokens 195.9 -> 217.6: 82 registers against 58).
# The decode tiles take 5 K blocks a step (of 90), the others 3: fewer instructions a weight (the loop's barriers,
# waits and address arithmetic shared by more blocks; tools/kernel_sass.py, 8 pairs x 64 rows: 3.69 -> 3.26 a
# weight, 68 -> 94 registers). H100, 2026-12-06 (sixth session, gpu_check 29; tools/moe_mma_sweep.py, µs, 3 / 5 / 6
# K blocks a step; outputs bitwise equal): 8-pair blocks with 12 / 20 / 18 stages: 20b 8 tokens 130.4 / 121.9 /
# 121.1, 120b 8 tokens 157.7 / 153.3 / 152.5, 120b 64 tokens 557.0 / 548.0 / 554.3 (9 a step lost: 126.2, 160.0,
# 579.0); 16-pair blocks with 6 / 10 / 12 stages: 20b 64 tokens 191.1 / 180.6 / 183.6.
WGMMA_TILES = {block_t: dict(BLOCK_T=block_t, M_REPS=m_reps, STAGES=stages, SCALE_AFTER=scale_after,  # by pairs a block
                             KB_PER_STEP=per_step)
               for block_t, m_reps, stages, scale_after, per_step in (
                   (8, 1, 20, True, 5), (16, 1, 10, False, 5), (64, 2, 6, False, 3), (128, 2, 9, False, 3))}
# Tail blocks of prefill steps (16 pairs, 3 K blocks a step as timed with the 128-pair blocks they follow).
WGMMA_SMALL_TILE = dict(WGMMA_TILES[16], STAGES=6, KB_PER_STEP=3)
# Decode steps whose pairs go one by one (`pairs_apart`) take the wgmma kernel's 8-pair blocks from this many
# tokens, the tensor-core decode kernel below. H100, 2026-12-06 (tools/moe_mma_sweep.py, µs, rings of 12 stages
# against the decode kernel): 120b 8 tokens 198.8 -> 186.0; it lost at 4 tokens (120b 105.1 against 120.4, 20b
# 103.4 against 105.3) and at 2 (61.3 against 80.6).
WGMMA_MIN_APART_TOKENS = 8
# Tail blocks (moe_routing.group_by_expert): with row blocks of 128 pairs, an expert's last pairs past its whole
# blocks, up to WGMMA_TAIL_PAIRS[128], take 16-pair blocks in a launch of their own rather than one more large block
# (most of whose tensor-core work would be on padding): 120b at 4096 tokens has 128 +- 11 pairs an expert, so about
# half its experts had a second 128-pair block holding a few pairs. H100, 2026-12-06 (tools/moe_mma_sweep.py, µs):
# 120b 4096 tokens 3303 -> 3106 (up to 16 pairs; 3087-3101 up to 32-48), 20b 1024 tokens 703 -> 664 (690 up to
# 32-64), 20b 4096 tokens 2265 -> 2254. Beside 64-pair blocks they lost at 20b 512 tokens (451 -> 467) and won
# little at 120b 2048 (2019 -> 1972), so those have none.
WGMMA_TAIL_PAIRS = {128: 16}
# Both matmuls in one launch (moe_wgmma's CHAIN: the second's programs wait on their row block only, not on the
# whole first launch) for steps that hit at most WGMMA_CHAIN_MAX_EXPERTS experts (pairs or local experts, the fewer)
# with at most WGMMA_CHAIN_MAX_PAIRS_PER_EXPERT pairs each on average; GPTOSS_WGMMA_CHAIN=0 turns it off for a
# process. It saves a few µs a step whatever its size (the second launch's start, the first's last programs alone on
# the GPU) and costs a share of larger steps (how its programs wait is not it: moe_wgmma._wait_ready). H100,
# 2026-12-07 (tenth session, gpu_check 35 and 37; tools/moe_mma_sweep.py, µs, two launches -> one): won at 20b 8
# tokens 122.2 -> 119.0 and 122.6 -> 120.2, 16 tokens 159.9 -> 155.6, 32 tokens 167.1 -> 162.2, 64 tokens 180.9 ->
# 177.3, 120b 8 tokens 152.9 -> 151.1; even at 20b 128 tokens 237.9 -> 238.9; lost at 120b 16 tokens 251.7 ->
# 253.9, 32 398.6 -> 405.1, 48 467.5 -> 476.3, 64 546.7 -> 578.0, 128 623.1 -> 627.8, 512 924.9 -> 964.1.
WGMMA_CHAIN = os.environ.get("GPTOSS_WGMMA_CHAIN", "1") == "1"
WGMMA_CHAIN_MAX_EXPERTS = 32
WGMMA_CHAIN_MAX_PAIRS_PER_EXPERT = 8


# Decode steps of MMA_MIN_TOKENS to MMA_MAX_TOKENS tokens go to the tensor-core kernel (kernels/moe_mma.py) on a GPU and
# the split-nibble layout: pairs one by one while they are at most half the local experts, else row blocks of 8 pairs by
# expert (on Hopper those take the wgmma kernel, see above). H200, 2026-12-04 (docs/PERFORMANCE.md,
# tools/moe_mma_sweep.py), µs for the experts against the paths before: 20b 4 tokens 134.1 -> 107.6 (pairs one by one),
# 8 tokens 199.3 -> 164.1 (blocks of 8); 120b 4 tokens 115.7 -> 108.8, 8 tokens 216.8 -> 198.4 (one by one). With its
# activations staged at once (STAGE_ONCE, a later sweep the same day) it also beat the matrix-vector kernel at 1 and 2
# tokens (20b 41.4 -> 35.9 and 64.6 -> 57.7, 120b 1 token 41.2 -> 35.9), so it starts at 1; from 16 tokens on the
# grouped path won.
MMA_DECODE = True
MMA_MIN_TOKENS, MMA_MAX_TOKENS = 1, 8


def mma_decode_config(num_tokens: int, top_k: int, num_local_experts: int, on_gpu: bool, split_nibbles: bool,
                      swizzled: bool) -> dict | None:
    """The tensor-core decode kernel's config where it is the default for this step, else None; shapes only."""
    if not (MMA_DECODE and on_gpu and split_nibbles and not swizzled
            and MMA_MIN_TOKENS <= num_tokens <= MMA_MAX_TOKENS):
        return None
    from gptoss_serve.kernels.moe_mma import DEFAULT_MMA_CONFIG

    return dict(DEFAULT_MMA_CONFIG, kernel="mma", BLOCK_T=None if pairs_apart(num_tokens, top_k, num_local_experts)
                else 8)


# The one-launch kernel (moe_mma_fused.py) for one-token steps: built 2026-12-08, not yet timed on a GPU, so off.
MMA_FUSED = os.environ.get("GPTOSS_MMA_FUSED", "0") == "1"


def mma_fused_config(num_tokens: int, on_gpu: bool, split_nibbles: bool, swizzled: bool,
                     tile_n: int = 1) -> dict | None:
    """The one-launch kernel's config where it is the default for this step (MMA_FUSED, one token, the split-nibble
    layout unswizzled with row tiles dividing 64, on a GPU), else None; shapes only."""
    if not (MMA_FUSED and on_gpu and split_nibbles and not swizzled and num_tokens == 1 and 64 % tile_n == 0):
        return None
    from gptoss_serve.kernels.moe_mma_fused import DEFAULT_FUSED_CONFIG

    return dict(DEFAULT_FUSED_CONFIG, kernel="mma_fused")


def pairs_apart(num_tokens: int, top_k: int, num_local_experts: int) -> bool:
    """Whether a decode step's (token, slot) pairs are few enough to take one by one: at most half the experts."""
    return 2 * num_tokens * top_k <= num_local_experts


def wgmma_config(num_tokens: int, top_k: int, num_local_experts: int, on_gpu: bool, split_nibbles: bool,
                 swizzled: bool, scales: tuple[torch.Tensor, ...]) -> dict | None:
    """The wgmma kernel's config where it is the default for this step, else None (decode steps of up to 8 tokens:
    8-pair row blocks where pairs share experts or from WGMMA_MIN_APART_TOKENS tokens; larger steps too up to
    WGMMA_SMALL_BLOCK_PAIRS_PER_EXPERT pairs an expert on average); row blocks of 16 pairs up to
    WGMMA_DECODE_PAIRS_PER_EXPERT pairs an expert, of 64 up to 64, else of 128 (each expert's last few pairs in
    16-pair tail blocks, WGMMA_TAIL_PAIRS); tiles by row block in WGMMA_TILES (K blocks a step too), both matmuls
    in one launch for small steps (WGMMA_CHAIN_MAX_EXPERTS); shapes (and the scales' range) only. The scale check
    reads each weight's scales once (TritonKernels.prepare_weights does it at load), later calls only look it up."""
    pairs_per_expert = num_tokens * top_k / max(1, num_local_experts)
    decode_blocks = 0 < num_tokens <= MMA_MAX_TOKENS and (
        num_tokens >= WGMMA_MIN_APART_TOKENS or not pairs_apart(num_tokens, top_k, num_local_experts))
    if not (WGMMA_MOE and on_gpu and split_nibbles and not swizzled and (num_tokens > MMA_MAX_TOKENS or decode_blocks)):
        return None
    from gptoss_serve.kernels.moe_wgmma import DEFAULT_WGMMA_CONFIG, scales_fit_f16

    if not all(scales_fit_f16(s) for s in scales):
        return None
    if decode_blocks or pairs_per_expert <= WGMMA_SMALL_BLOCK_PAIRS_PER_EXPERT:
        block_t = 8
    elif pairs_per_expert <= WGMMA_DECODE_PAIRS_PER_EXPERT:
        block_t = 16
    else:
        block_t = 64 if pairs_per_expert <= 64 else 128
    tail = dict(TAIL=WGMMA_SMALL_TILE, TAIL_PAIRS=WGMMA_TAIL_PAIRS[block_t]) if block_t in WGMMA_TAIL_PAIRS else {}
    chain = WGMMA_CHAIN and min(num_tokens * top_k, num_local_experts) <= WGMMA_CHAIN_MAX_EXPERTS \
        and pairs_per_expert <= WGMMA_CHAIN_MAX_PAIRS_PER_EXPERT
    return dict(DEFAULT_WGMMA_CONFIG, kernel="wgmma", **WGMMA_TILES[block_t], **tail, CHAIN=chain)


def takes_gemv(num_tokens: int, top_k: int, num_local_experts: int) -> bool:
    """Whether a step of num_tokens (no config given) runs on the matrix-vector kernel; from shapes alone."""
    return GEMV_DECODE and (num_tokens == 1 or num_tokens * top_k * GEMV_EXPERTS_PER_PAIR <= num_local_experts)


@functools.lru_cache(maxsize=None)
def is_hopper(device: torch.device) -> bool:
    """Whether the device has Hopper's wgmma (compute capability 9.x: H100, H200); later GPUs do not."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


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
    moe_experts takes this path at SPLITK_MAX_TOKENS tokens and fewer only (where `takes_gemv` does not)."""
    if num_tokens <= 2:
        config = dict(BLOCK_M=next_pow2(num_tokens), BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1)
    else:
        config = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    config["target_programs"] = 8 * _num_sms(device)
    return config


def check_decode_operands(a: torch.Tensor | None, blocks: torch.Tensor, tile_n: int) -> tuple[int, int, int]:
    """(local experts, weight rows N, K blocks) of a decode matmul's operands (the weights alone where a is None), or
    a ValueError naming the problem."""
    num_local_experts, n_rows, num_k_blocks, block_bytes = blocks.shape
    if block_bytes != MXFP4_BYTES_PER_BLOCK or blocks.stride(3) != 1 or blocks.stride(2) != MXFP4_BYTES_PER_BLOCK:
        raise ValueError("MXFP4 blocks must be [experts, rows, K / 32, 16] with each row's bytes contiguous")
    if a is not None and (a.stride(1) != 1 or a.shape[1] != num_k_blocks * MXFP4_BLOCK_SIZE):
        raise ValueError(f"activations [{a.shape[0]}, {a.shape[1]}] with unit stride along K expected")
    if n_rows % tile_n:
        raise ValueError(f"{n_rows} weight rows are not whole tiles of {tile_n}")
    return num_local_experts, n_rows, num_k_blocks


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
    swizzled: bool = False,
    fold_scales: bool = False,
    pair_blocks: tuple[torch.Tensor, int] | None = None,  # (expert ids [num_pairs], first_expert): one token
) -> torch.Tensor:  # [splits, num_pairs, N] float32 partial sums by pair index (rows of other ranks' pairs unset)
    num_local_experts, n_rows, num_k_blocks = check_decode_operands(a, blocks, tile_n)
    use_dot = config["BLOCK_M"] >= 16
    if swizzled and use_dot:  # eight dots of K = BLOCK_K / 8 a step: the tensor cores need K >= 16
        config = dict(config, BLOCK_K=max(config["BLOCK_K"], SWIZZLED_MIN_BLOCK_K))
    block_n, block_m, block_k = config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_K"]
    if not use_dot and block_m not in (1, 2):
        raise ValueError("the split-K kernel takes BLOCK_M 1 or 2 (CUDA cores) or >= 16 (tensor cores)")
    num_n_tiles = triton.cdiv(n_rows, block_n)
    num_blocks = num_pairs if pair_blocks is not None else groups.block_expert.numel()
    if "splits" in config:  # fixed (tests, sweeps)
        blocks_per_split = triton.cdiv(triton.cdiv(num_k_blocks, block_k // 32), config["splits"]) * (block_k // 32)
        splits = triton.cdiv(num_k_blocks, blocks_per_split)
    else:
        splits, blocks_per_split = _num_splits(num_blocks * num_n_tiles, num_k_blocks, block_k // 32,
                                               config["target_programs"])
    ws = torch.empty((splits, max(num_pairs, 1), n_rows), dtype=torch.float32, device=a.device)
    if pair_blocks is not None:  # row block b = pair b, its expert from the routing itself
        ids, first_expert = pair_blocks
        table = (ids, ids, ids, ids)  # only the first is read
    else:
        first_expert = 0
        table = (groups.sorted_pairs, groups.block_expert, groups.block_row_start, groups.block_row_end)
    launch(_moe_matmul_splitk_kernel, (num_blocks * num_n_tiles * splits,),
           a, blocks, scales, ws, *table,
           n_rows, num_k_blocks * MXFP4_BLOCK_SIZE, a_row_div, num_n_tiles, splits, blocks_per_split,
           first_expert, num_local_experts,
           a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), scales.stride(2),
           ws.stride(0),
           USE_DOT=use_dot, SPLIT_NIBBLES=split_nibbles or swizzled, SWIZZLED=swizzled,
           FOLD_SCALES=fold_scales, PAIR_BLOCKS=pair_blocks is not None, TILE_N=tile_n,
           EMULATE_BF16=emulate_bf16(),
           BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
           num_warps=config["num_warps"], num_stages=config["num_stages"])
    return ws


def moe_experts_splitk(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                       swiglu_alpha, swiglu_limit, first_expert=0, split_nibbles=False, config=None,
                       tile_n=1, swizzled=False, fold_scales=False) -> torch.Tensor:
    """moe_experts for a few tokens (decode): split-K matmuls into float32 workspaces, then one kernel that
    sums the splits, adds the bias and applies SwiGLU (by pair), and one that sums the splits of the second
    matmul, adds its bias, weights and combines a token's slots. Same roundings as moe_experts; five launches
    (four for one token: its pairs need no grouping), all grids from shapes only."""
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
    if config is None and takes_gemv(num_tokens, top_k, num_local_experts) and GEMV_FUSED_DECODE:
        from gptoss_serve.kernels.moe_gemv_fused import DEFAULT_GEMV_FUSED_CONFIG

        config = dict(DEFAULT_GEMV_FUSED_CONFIG, kernel="gemv_fused")
    elif config is None and takes_gemv(num_tokens, top_k, num_local_experts):
        from gptoss_serve.kernels.moe_gemv import DEFAULT_GEMV_CONFIG

        config = dict(DEFAULT_GEMV_CONFIG, kernel="gemv")
    elif config is None:
        config = _splitk_config(num_tokens, x.device)
    ids = expert_ids.reshape(-1)
    layout = dict(split_nibbles=split_nibbles, tile_n=tile_n, swizzled=swizzled, fold_scales=fold_scales)
    if config.get("kernel") == "gemv_fused":  # matrix-vector products over all of K, epilogues inside: 2 launches
        from gptoss_serve.kernels.moe_gemv_fused import moe_experts_gemv_fused

        return moe_experts_gemv_fused(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales,
                                      b2, swiglu_alpha, swiglu_limit, first_expert, config, split_nibbles, tile_n,
                                      swizzled, fold_scales)
    if config.get("kernel") == "gemv":  # matrix-vector products, pairs one by one, the activation in registers
        from gptoss_serve.kernels.moe_gemv import moe_gemv_splitk

        def matmul(a, blocks, scales, a_row_div, second=False):
            return moe_gemv_splitk(a, blocks, scales, ids, first_expert, a_row_div, config, **layout)
    elif config.get("kernel") == "mma":  # tensor cores, MXFP4 straight into mma fragments (Gluon, CUDA only)
        from gptoss_serve.kernels.moe_mma import moe_mma_splitk

        if not split_nibbles or swizzled:
            raise ValueError("the tensor-core decode kernel reads the split-nibble layout, unswizzled")
        if config.get("BLOCK_T") is None:  # pairs one by one (a token's experts are distinct)
            pair_args = dict(pair_blocks=(ids, first_expert))
        else:
            pair_args = dict(groups=group_by_expert(expert_ids, first_expert, num_local_experts, config["BLOCK_T"]))

        def matmul(a, blocks, scales, a_row_div, second=False):  # second: routing and groups two launches old
            early = second and bool(config.get("EARLY_WEIGHTS")) and config.get("ASYNC_GROUPS", 0) > 0
            return moe_mma_splitk(a, blocks, scales, a_row_div, num_pairs, config, tile_n=tile_n,
                                  early_weights=early, **pair_args)
    else:
        if num_tokens == 1:  # the pairs are the row blocks (a token's experts are distinct)
            groups, pair_blocks = None, (ids, first_expert)
        else:
            groups = group_by_expert(expert_ids, first_expert, num_local_experts, config["BLOCK_M"])
            pair_blocks = None

        def matmul(a, blocks, scales, a_row_div, second=False):
            return moe_matmul_splitk(a, blocks, scales, groups, a_row_div, num_pairs, config, pair_blocks=pair_blocks,
                                     **layout)
    ws1 = matmul(x, w1_blocks, w1_scales, top_k)
    act = torch.empty((num_pairs, intermediate), dtype=x.dtype, device=x.device)  # by pair index
    # Small blocks: a few pairs' rows still spread over many SMs (these kernels are latency-bound).
    epilogue_block = config.get("EPILOGUE_BLOCK", 256)
    block = min(epilogue_block, next_pow2(intermediate))
    pdl = pdl_args(x.device)
    launch(_splitk_swiglu_kernel, (num_pairs, triton.cdiv(intermediate, block)),
           ws1, ids, b1, act, n1, first_expert, num_local_experts,
           ws1.stride(0), b1.stride(0), act.stride(0), float(swiglu_alpha), float(swiglu_limit),
           NUM_SPLITS=ws1.shape[0], HAS_BIAS=True, EMULATE_BF16=emulate_bf16(), BLOCK=block, num_warps=2, **pdl)
    ws2 = matmul(act, w2_blocks, w2_scales, 1, second=True)
    block_h = min(epilogue_block, next_pow2(hidden))
    launch(_splitk_combine_kernel, (num_tokens, triton.cdiv(hidden, block_h)),
           ws2, ids, expert_weights.reshape(-1), b2 if b2 is not None else ws2, out, hidden,
           first_expert, num_local_experts, ws2.stride(0), b2.stride(0) if b2 is not None else 0, out.stride(0),
           NUM_SPLITS=ws2.shape[0], TOP_K=top_k, HAS_BIAS=b2 is not None, EMULATE_BF16=emulate_bf16(),
           BLOCK_H=block_h, num_warps=2, **pdl)
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
    swizzled: bool = False,  # bits re-laid out by `swizzle_bits` after `split_nibbles`
    fold_scales: bool = False,  # every scale byte of w1 and w2 <= FOLD_MAX_SCALE
) -> torch.Tensor:  # [num_tokens, hidden] in x's dtype
    """The MoE layer's experts for this rank. Decode steps of up to SPLITK_MAX_TOKENS tokens, or that
    `takes_gemv`, or that `mma_decode_config` gives the tensor-core decode kernel, or with a config that names
    `target_programs`, `splits` or `kernel`, take moe_experts_splitk (split-K, matrix-vector or tensor-core decode
    matmuls, then the epilogue kernels); a config naming kernel "wgmma", or `wgmma_config` where WGMMA_MOE is set,
    takes moe_wgmma.moe_experts_wgmma; else grouped matmuls with fused epilogues. The choice depends on shapes
    (and the weights' layout, and for the wgmma kernel their scale range, read once per tensor) alone."""
    num_tokens, hidden = x.shape
    if config is None:
        on_gpu = x.is_cuda and not emulate_bf16()
        top_k, num_local = expert_ids.shape[1], w1_blocks.shape[0]
        config = mma_fused_config(num_tokens, on_gpu, split_nibbles, swizzled, tile_n) \
            or wgmma_config(num_tokens, top_k, num_local, on_gpu and is_hopper(x.device), split_nibbles, swizzled,
                            (w1_scales, w2_scales)) \
            or mma_decode_config(num_tokens, top_k, num_local, on_gpu, split_nibbles, swizzled)
    if config is not None and config.get("kernel") == "mma_fused":  # one launch, tensor cores (Gluon, CUDA only)
        from gptoss_serve.kernels.moe_mma_fused import moe_experts_mma_fused

        if not split_nibbles or swizzled:
            raise ValueError("the one-launch decode kernel reads the split-nibble layout, unswizzled")
        return moe_experts_mma_fused(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales,
                                     b2, swiglu_alpha, swiglu_limit, first_expert, config, tile_n)
    if config is not None and config.get("kernel") == "wgmma":  # Hopper tensor cores, Gluon (CUDA only)
        from gptoss_serve.kernels.moe_wgmma import moe_experts_wgmma

        return moe_experts_wgmma(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                                 swiglu_alpha, swiglu_limit, first_expert, config, split_nibbles, tile_n, swizzled)
    few = num_tokens <= SPLITK_MAX_TOKENS or takes_gemv(num_tokens, expert_ids.shape[1], w1_blocks.shape[0])
    if (config is None and few) or (config is not None and (
            "target_programs" in config or "splits" in config or "kernel" in config)):
        return moe_experts_splitk(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales,
                                  b2, swiglu_alpha, swiglu_limit, first_expert, split_nibbles, config, tile_n,
                                  swizzled, fold_scales)
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
    layout = dict(split_nibbles=split_nibbles, tile_n=tile_n, swizzled=swizzled, fold_scales=fold_scales)
    moe_matmul(x, w1_blocks, w1_scales, b1, groups, top_k, act, config, swiglu=(swiglu_alpha, swiglu_limit),
               **layout)
    y = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)  # by (token, slot), unweighted
    moe_matmul(act, w2_blocks, w2_scales, b2, groups, top_k, y, config, **layout)
    combine(y, expert_ids, expert_weights, out, first_expert, num_local_experts)
    return out


def combine(
    y: torch.Tensor,  # [num_tokens * top_k, hidden] the second matmul's rows by (token, slot), unweighted
    expert_ids: torch.Tensor,  # [num_tokens, top_k] global expert ids (slots of other ranks' experts are skipped)
    expert_weights: torch.Tensor,  # [num_tokens, top_k] float32
    out: torch.Tensor,  # [num_tokens, hidden], written
    first_expert: int,
    num_local_experts: int,
) -> None:
    """Each token's rows weighted and summed in slot order (_combine_kernel)."""
    hidden = y.shape[1]
    block_h = min(1024, next_pow2(hidden))
    launch(_combine_kernel, (out.shape[0], triton.cdiv(hidden, block_h)),
           y, expert_ids, expert_weights.reshape(-1), out, hidden, first_expert, num_local_experts, y.stride(0),
           out.stride(0), TOP_K=expert_ids.shape[1], BLOCK_H=block_h, EMULATE_BF16=emulate_bf16(), num_warps=4,
           **pdl_args(out.device))
