"""A decode step's experts in two launches: matrix-vector products with the epilogues inside them.

The matrix-vector path of moe_gemv.py takes four launches a layer: the first matmul's K ranges into a float32
workspace, a kernel that sums them and applies SwiGLU, the second matmul's K ranges, and a kernel that sums
those and combines a token's slots. At one token the two follow-up kernels were about a fifth of the experts'
time (docs/PERFORMANCE.md, 2026-12-01: SwiGLU 3.6 and combine 6.1 of 50.7 us), and every launch adds its own
ramp and tail. Here a program walks the whole K dimension of its rows instead of one K range:

- `_gemv_swiglu_kernel`, program (pair, RB rows of w1): the K ranges' row sums are added in order (the same
  float32 additions as the SwiGLU kernel's over the workspace), then bias and clamped SwiGLU on the gate and
  linear rows (interleaved: rows 2c and 2c + 1), and the RB / 2 activation columns are stored.
- `_gemv_combine_kernel`, program (token, RB rows of w2): for each of the token's slots in order, the row sums
  of its expert over all K ranges, then bias, routing weight and the sum over slots, as the combine kernel does;
  a slot routed to another rank reads nothing and adds nothing.

Both use moe_gemv.py's inner step (same tiles, same products, a row's K ranges added in the same order), so
the outputs are bit for bit those of the four-launch path under the interpreter (tested, with the same tiles);
on a GPU, w2's own tiles may group a row's in-warp sum differently. The price is parallelism: a program now
covers RB rows over all of K (the 20b's w2 at one token is 2880 / RB programs), so each keeps several K ranges'
loads in flight (`K_UNROLL`, `K_STAGES`), and w2 may take smaller programs (`W2_KB`, `W2_NUM_WARPS`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.moe_gemv import activation_slice, rows_times_slice, tile_offsets
from gptoss_serve.kernels.moe_matmul import add_slot, check_decode_operands, swiglu_of_sums
from gptoss_serve.kernels.triton_utils import cast_rne, device_function, emulate_bf16, launch

# Off by default: on an H200 (2026-12-04, docs/PERFORMANCE.md) it lost 22-28% to the tensor-core decode kernel at
# 1-4 tokens with every config tried. `moe_experts` takes it when a config names it (kernel="gemv_fused"), or for
# the steps that take the matrix-vector kernel once moe_matmul.GEMV_FUSED_DECODE is set.
# KB = 16 blocks a K range as in moe_gemv.py; 2 rows a thread over 4 warps gives RB = 16 rows a program (1440
# programs for the 20b's w1 at one token, 180 for its w2); w2 takes 1 row a thread (RB = 8, 360 programs).
# K_UNROLL 6 unrolls the 6 K ranges of K = 2880, so a program's loads can all go out before the first is used
# (a rolled loop waits a memory latency a K range: 24 in a row for a w2 program's 4 slots); a prediction.
# W2_KB and W2_NUM_WARPS (None: KB and num_warps) give w2 programs of fewer rows: the matrix-vector kernel lost
# 2-3x with fewer, longer programs (2026-12-01), and w2's (token, rows) programs are few at one token.
DEFAULT_GEMV_FUSED_CONFIG = dict(KB=16, ROWS_PER_THREAD=2, W2_ROWS_PER_THREAD=1, num_warps=4, K_UNROLL=6,
                                 K_STAGES=1, W2_KB=None, W2_NUM_WARPS=None)


@triton.jit
def _gemv_swiglu_kernel(
    x_ptr, w_ptr, scales_ptr, bias_ptr, act_ptr, expert_ids_ptr,
    N, num_blocks_k, top_k, first_expert, num_local_experts,
    stride_x, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_s_k, stride_bias_expert,
    stride_act, swiglu_alpha, swiglu_limit,
    NUM_SPLITS: tl.constexpr, SPLIT_NIBBLES: tl.constexpr, SWIZZLED: tl.constexpr, FOLD_SCALES: tl.constexpr,
    TILE_N: tl.constexpr, EMULATE_BF16: tl.constexpr, KB: tl.constexpr, RB: tl.constexpr,
    K_UNROLL: tl.constexpr, K_STAGES: tl.constexpr,
):
    """Program (pair, chunk): act[pair, RB / 2 columns] = SwiGLU(W1_e[RB rows] @ x[token] + b1_e)."""
    pair = tl.program_id(0)
    r0 = tl.program_id(1) * RB
    expert = tl.load(expert_ids_ptr + pair) - first_expert
    if (expert < 0) | (expert >= num_local_experts):  # routed to another rank's expert
        return
    x_row = x_ptr + (pair // top_k).to(tl.int64) * stride_x
    w_expert = w_ptr + expert.to(tl.int64) * stride_w_expert
    s_expert = scales_ptr + expert.to(tl.int64) * stride_s_expert
    acc = _rows_over_k(x_row, w_expert, s_expert, r0, N, num_blocks_k, stride_w_row, stride_s_row, stride_s_k,
                       NUM_SPLITS, SPLIT_NIBBLES, SWIZZLED, FOLD_SCALES, TILE_N, EMULATE_BF16, KB, RB, K_UNROLL,
                       K_STAGES)
    gate, linear = tl.split(tl.reshape(acc, [RB // 2, 2]))  # rows 2c and 2c + 1
    cols = r0 // 2 + tl.arange(0, RB // 2)
    in_cols = cols < N // 2
    act = swiglu_of_sums(gate, linear, bias_ptr + expert.to(tl.int64) * stride_bias_expert, cols, in_cols,
                         act_ptr.dtype.element_ty, swiglu_alpha, swiglu_limit, True, EMULATE_BF16)
    tl.store(act_ptr + pair.to(tl.int64) * stride_act + cols, act, mask=in_cols)


@triton.jit
def _gemv_combine_kernel(
    act_ptr, w_ptr, scales_ptr, bias_ptr, weights_ptr, out_ptr, expert_ids_ptr,
    N, num_blocks_k, first_expert, num_local_experts,
    stride_act, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_s_k, stride_bias_expert,
    stride_out,
    NUM_SPLITS: tl.constexpr, TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_NIBBLES: tl.constexpr,
    SWIZZLED: tl.constexpr, FOLD_SCALES: tl.constexpr, TILE_N: tl.constexpr, EMULATE_BF16: tl.constexpr,
    KB: tl.constexpr, RB: tl.constexpr, K_UNROLL: tl.constexpr, K_STAGES: tl.constexpr,
):
    """Program (token, chunk): out[token, RB rows] = sum over its slots of weight * (W2_e[RB rows] @ act[pair]
    + b2_e), slots in order."""
    token = tl.program_id(0).to(tl.int64)
    r0 = tl.program_id(1) * RB
    rows = r0 + tl.arange(0, RB)
    in_rows = rows < N
    total = tl.zeros([RB], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        local = tl.load(expert_ids_ptr + pair) - first_expert
        here = (local >= 0) & (local < num_local_experts)
        expert = tl.where(here, local, 0).to(tl.int64)
        k_blocks = tl.where(here, num_blocks_k, 0)  # a slot of another rank: every load masked off
        act_row = act_ptr + pair * stride_act
        w_expert = w_ptr + expert * stride_w_expert
        s_expert = scales_ptr + expert * stride_s_expert
        h = _rows_over_k(act_row, w_expert, s_expert, r0, N, k_blocks, stride_w_row, stride_s_row, stride_s_k,
                         NUM_SPLITS, SPLIT_NIBBLES, SWIZZLED, FOLD_SCALES, TILE_N, EMULATE_BF16, KB, RB, K_UNROLL,
                         K_STAGES)
        in_slot = tl.where(here, in_rows, False)  # (in_rows & here: a mask dtype Triton 3.9's interpreter refuses)
        total = add_slot(total, h, here, bias_ptr + expert * stride_bias_expert, rows, in_slot,
                         tl.load(weights_ptr + pair), out_ptr.dtype.element_ty, HAS_BIAS, EMULATE_BF16)
    tl.store(out_ptr + token * stride_out + rows, cast_rne(total, out_ptr.dtype.element_ty, EMULATE_BF16),
             mask=in_rows)


@device_function
def _rows_over_k(a_row, w_expert, s_expert, r0, N, num_blocks_k, stride_w_row, stride_s_row, stride_s_k,
                 NUM_SPLITS: tl.constexpr, SPLIT_NIBBLES: tl.constexpr, SWIZZLED: tl.constexpr,
                 FOLD_SCALES: tl.constexpr, TILE_N: tl.constexpr, EMULATE_BF16: tl.constexpr, KB: tl.constexpr,
                 RB: tl.constexpr, K_UNROLL: tl.constexpr, K_STAGES: tl.constexpr):
    """[RB] float32: rows r0 .. r0 + RB of one expert's weights times the activation row over all of K, the K
    ranges' sums added in order (as the epilogue kernels add the workspace's splits)."""
    acc = tl.zeros([RB], dtype=tl.float32)
    for split in tl.range(0, NUM_SPLITS, loop_unroll_factor=K_UNROLL, num_stages=K_STAGES):
        a_low, a_high = activation_slice(a_row, split, num_blocks_k, SPLIT_NIBBLES, KB)
        tile = tile_offsets(split, num_blocks_k, stride_w_row, stride_s_row, stride_s_k, TILE_N, KB, RB)
        acc += rows_times_slice(w_expert, s_expert, tile, r0, N, a_low, a_high, stride_w_row, stride_s_row,
                                SWIZZLED, FOLD_SCALES, TILE_N, EMULATE_BF16, KB, RB, SPLIT_NIBBLES)
    return acc


def rows_a_program(kb: int, rows_per_thread: int, num_warps: int) -> int:
    """RB, the weight rows of one program: its threads hold rows_per_thread rows of KB blocks each."""
    rb = rows_per_thread * 32 * num_warps // kb
    if rb < 2 or rb & (rb - 1) or kb & (kb - 1) or kb > 32 * num_warps:
        raise ValueError(f"KB {kb}, {rows_per_thread} rows a thread and {num_warps} warps give {rb} rows a "
                         "program: KB must be a power of two up to the threads, the rows a power of two >= 2")
    return rb


def moe_experts_gemv_fused(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                           swiglu_alpha, swiglu_limit, first_expert=0, config=None, split_nibbles=False, tile_n=1,
                           swizzled=False, fold_scales=False) -> torch.Tensor:  # [num_tokens, hidden]
    """moe_matmul.moe_experts for a decode step in two launches (the arguments are that function's); the same
    outputs, bit for bit, as its matrix-vector path with the same KB and rows a thread."""
    config = dict(DEFAULT_GEMV_FUSED_CONFIG, **(config or {}))
    num_tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    if x.dtype != torch.bfloat16 and not emulate_bf16():
        raise ValueError(f"the MoE kernels take bf16 activations, got {x.dtype}")
    num_local_experts, n1, k1_blocks = check_decode_operands(x, w1_blocks, tile_n)
    kb, num_warps = config["KB"], config["num_warps"]
    kb2, warps2 = config.get("W2_KB") or kb, config.get("W2_NUM_WARPS") or num_warps  # w2's own, for more programs
    rb1 = rows_a_program(kb, config["ROWS_PER_THREAD"], num_warps)
    rb2 = rows_a_program(kb2, config["W2_ROWS_PER_THREAD"], warps2)
    if tile_n > 1 and (tile_n % rb1 or tile_n % rb2):
        raise ValueError(f"a program's {rb1} and {rb2} rows must not cross a tile of {tile_n} rows")
    ids = expert_ids.reshape(-1)
    num_pairs = ids.numel()
    act = torch.empty((num_pairs, n1 // 2), dtype=x.dtype, device=x.device)  # by pair index
    _, _, k2_blocks = check_decode_operands(act, w2_blocks, tile_n)
    layout = dict(SPLIT_NIBBLES=split_nibbles or swizzled, SWIZZLED=swizzled, FOLD_SCALES=fold_scales, TILE_N=tile_n,
                  EMULATE_BF16=emulate_bf16(), K_UNROLL=config["K_UNROLL"], K_STAGES=config["K_STAGES"], num_stages=1)
    launch(_gemv_swiglu_kernel, (num_pairs, triton.cdiv(n1, rb1)),
           x, w1_blocks, w1_scales, b1, act, ids, n1, k1_blocks, top_k, first_expert, num_local_experts,
           x.stride(0), w1_blocks.stride(0), w1_blocks.stride(1), w1_scales.stride(0), w1_scales.stride(1),
           w1_scales.stride(2), b1.stride(0), act.stride(0), float(swiglu_alpha), float(swiglu_limit),
           NUM_SPLITS=triton.cdiv(k1_blocks, kb), KB=kb, RB=rb1, num_warps=num_warps, **layout)
    launch(_gemv_combine_kernel, (num_tokens, triton.cdiv(hidden, rb2)),
           act, w2_blocks, w2_scales, b2 if b2 is not None else b1, expert_weights.reshape(-1), out, ids,
           hidden, k2_blocks, first_expert, num_local_experts,
           act.stride(0), w2_blocks.stride(0), w2_blocks.stride(1), w2_scales.stride(0), w2_scales.stride(1),
           w2_scales.stride(2), b2.stride(0) if b2 is not None else 0, out.stride(0),
           NUM_SPLITS=triton.cdiv(k2_blocks, kb2), TOP_K=top_k, HAS_BIAS=b2 is not None, KB=kb2, RB=rb2,
           num_warps=warps2, **layout)
    return out
