"""Grouped MoE matmuls on Hopper's warpgroup tensor cores (wgmma), MXFP4 words dequantized into A registers.

The grouped kernel of moe_matmul.py (plain Triton) spends about 8 SASS instructions a weight on prefill tiles
(tools/kernel_sass.py grouped): its byte tile goes through shared memory and comes back two bytes at a time,
to be packed for the dot operand. On 120b's prefill (128 pairs an expert, 64-pair row blocks) that issue work is
as long as the tensor cores' and the kernel reaches 30% of the bf16 peak (docs/PERFORMANCE.md). Here, in Gluon,
each thread loads whole 4-byte words of the split-nibble layout and one asm turns a word into its eight values
as f16 with the block's scale applied; those registers are the wgmma A operand as they sit.

Which word a thread needs: for A in registers, wgmma gives lane (4g + q) of a warp rows g and g + 8 of its 16
and, in each 32-wide K block, the K slots {2q, 2q + 1, 2q + 8, 2q + 9} and those + 16. Word q of a row's
block holds elements 4q .. 4q + 3 (low nibbles) and 16 + 4q .. 16 + 4q + 3 (high nibbles). So K is permuted
inside each 16-wide half: slot s (bits s3 s2 s1 s0) carries element s0 + 2 s3 + 4 s1 + 8 s2. The weights'
values land in slot order by a reshape and permute that move no data (checked at compile time); the
activations come in that order too (`to_f16_slots`, one small kernel before the first matmul; the first
matmul's epilogue writes its activations so for the second). The sum over K does not care in which order its
terms come, only that A and B agree.

Scales: each value of the e4m3 -> f16 conversion is the weight times 2^-6; one f16x2 multiply by 2^(s - 121) makes
it the weight, exactly while every scale byte s of the tensor is within F16_SCALE_RANGE (no f16 overflow, no bits
lost to subnormals); or (SCALE_AFTER, the 8-pair tiles) each K block's wgmma takes the unscaled values into an
accumulator of its own and the product is scaled by 2^(s - 121) in float32. Activations as f16: exact for normalized
MoE inputs and clamped SwiGLU outputs (see moe_mma.py); they are rounded to bf16 first, as the torch twin rounds
them. The accumulator is float32; the epilogues are those of moe_matmul's grouped kernel (bias and SwiGLU for w1,
written in grouped order; bias for w2, bf16 by pair, weighted by its combine kernel), with the same roundings.

A program: one row block of an expert's pairs (BLOCK_T, the wgmma N) and ROWS weight rows (the wgmma M: 64 a
warpgroup, M_REPS times), all of K, KB_PER_STEP 32-wide K blocks a step. Each block's activations [BLOCK_T, 32]
and weight bytes [ROWS, 16] arrive by asynchronous copies into shared-memory rings (one for each K block of a
step), COPY_AHEAD blocks ahead; the step's scale bytes are loaded while the copies land; each step's wgmmas end before
the next step's dequantization (see DEFAULT_WGMMA_CONFIG for why).

No interpreter runs Gluon: tested on GPUs only (tests/test_kernels_moe.py, marker gpu). Where it is the default:
moe_matmul.wgmma_config.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from gptoss_serve.kernels.moe_matmul import combine, split_bytes_e4m3_ptx
from gptoss_serve.kernels.moe_mma import SPLIT_WORD_F16_ASM, block_scale
from gptoss_serve.kernels.moe_routing import ExpertGroups, group_by_expert
from gptoss_serve.kernels.mxfp4 import MXFP4_BLOCK_SIZE
from gptoss_serve.kernels.gluon_utils import pdl_wait
from gptoss_serve.kernels.triton_utils import arrival_counters, largest_divisor, launch, pdl_args
from gptoss_serve.kernels.triton_utils import pdl_wait as triton_pdl_wait

F16_SCALE_RANGE = (104, 136)  # scale bytes whose 2^(s - 127) times an FP4 value is an exact f16
# PIPELINED False: plain loads into one shared slot and a waited wgmma each step (slow; a reference for the rings).
# STAGES: shared-memory slots for K blocks in all (rounded down to whole steps): a ring of STAGES // KB_PER_STEP
# slots for each K block of a step (block j of every step in ring j). A step's copies then write distinct buffers,
# so the compiler puts no barrier between them (it cannot tell slots of one buffer apart: a single ring of STAGES
# slots had 5 barriers a step at 3 K blocks, and 244 instructions in the loop at 16 pairs x 64 rows against 208
# with 4-slot rings, tools/kernel_sass.py). H100, 2026-12-06 (tools/moe_mma_sweep.py, µs, against the single
# ring): 20b 8 tokens 156.2 -> 145.8, 16 tokens 204.1 -> 192.9, 64 tokens 213.6 -> 204.9, 512 tokens 453.8 ->
# 412.3, 4096 tokens 2261 -> 2185; 120b 64 tokens 703.9 -> 659.2, 4096 tokens 3095 -> 2988; outputs bitwise equal.
# COPY_AHEAD: K blocks of copies in flight, whole steps (None: all but the step's own ring slots; from KB_PER_STEP
# to STAGES - KB_PER_STEP, since a step copies into the slots that the previous step freed).
# Each step's wgmma is waited for before the next step's dequantization: leaving one in flight (as first built)
# gave wrong sums at most tiles on an H200 (2026-12-04, tools/moe_wgmma_check.py: nan or 20-30% error at 16-pair
# and 128-pair row blocks, runs differing; copies fewer steps ahead did not help, waiting at once did at every
# tile). The loop writes the A operand into the same registers every step, so the next step's dequantization
# overwrote the registers of the wgmma still reading them. Waiting cost 0-4% (120b 4096 tokens, 128 x 128 tiles:
# 3324 -> 3442 us).
# KB_PER_STEP: at most this many K blocks a step (the largest count that divides the weight's K blocks), between
# two barriers: each block's wgmma stays in flight while the next block is dequantized into registers of its own,
# and the step ends with one wait. 1 when unpipelined.
# Three K blocks a step beat one at every size timed (H200, 2026-12-06: e.g. 120b 4096 tokens, 128 pairs x 128
# rows, 3595 -> 3163 us; 20b 64 tokens, 16 x 128, 287.5 -> 219.0 us); five beat three on the decode tiles of 8 and
# 16 pairs (moe_matmul.WGMMA_TILES).
# maxnreg: a register cap for ptxas (None: its own choice), so that more programs fit an SM.
# SCALE_AFTER: each K block's wgmma into an accumulator of its own from unscaled weights (FP4 value * 2^-6), the
# product times 2^(s - 121) added to the sum in float32 (BLOCK_T / 2 FFMA a thread and 64 rows, against 8 f16x2
# multiplies and the scales' conversion to f16); no scale-range condition then.
# VECTOR_STORE: the second matmul's rows go through shared memory into a layout of 8 rows of one pair a thread
# (16-byte stores) rather than straight from the accumulator's (2-byte stores, 64-bit addresses for each of a
# thread's BLOCK_T / 4 pairs: 255 registers and spills at 256 pairs). Compiled (Triton 3.6, w2 tiles): 128 x 128
# 1632 -> 1112 SASS instructions, 246 -> 219 registers, the same 92 KB of shared memory; 64 x 128 1016 -> 808.
# H100, 2026-12-06 (fourth session; tools/moe_mma_sweep.py, µs, 128-pair blocks with 16-pair tails): 120b 4096
# tokens 2302.8 -> 2280.2, 20b 4096 tokens 2011.1 -> 1932.0, 20b 2048 tokens 1080.8 -> 1060.9.
# CHAIN: both matmuls in one launch (_moe_wgmma_chain_kernel), where they take the same rings and no tail blocks.
DEFAULT_WGMMA_CONFIG = dict(BLOCK_T=64, M_REPS=1, num_warps=4, STAGES=9, PIPELINED=True, COPY_AHEAD=None,
                            KB_PER_STEP=3, maxnreg=None, SCALE_AFTER=False, VECTOR_STORE=True, CHAIN=False)


def _split_word_f16_scaled_asm() -> str:
    """PTX: one split-layout word ($4) and the f16x2 multiplier 2^(s - 121) ($5, $6: the same in both) -> the low
    nibbles' values ($0: bytes 0, 1; $1: bytes 2, 3) and the high nibbles' ($2, $3) as scaled f16 pairs."""
    lines = ["{", ".reg .b32 t, u, lo, hi, f<4>;", ".reg .b16 e<4>;"] + split_bytes_e4m3_ptx("$4")
    lines += [f"cvt.rn.f16x2.e4m3x2 f{i}, e{i};" for i in range(4)]
    lines += [f"mul.rn.f16x2 ${i}, f{i}, $5;" for i in range(4)]
    return "\n".join(lines + ["}"])


SPLIT_WORD_F16_SCALED_ASM = gl.constexpr(_split_word_f16_scaled_asm())
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # gl.thread_barrier in Triton 3.6, gl.barrier later
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared  # renamed after 3.6


def word_layout(num_warps: int, m_reps: int) -> gl.DistributedLinearLayout:
    """Where one K block's bytes [ROWS, 16] sit: registers bytes 0..3 of a word (one asm's input), then row + 8,
    then the further 64-row repetitions; lanes: the word (q) and the row within 8; warps: 16-row slices."""
    reg = [[0, 1], [0, 2], [8, 0]] + [[16 * num_warps << i, 0] for i in range(m_reps.bit_length() - 1)]
    lane = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << i, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                      shape=[16 * num_warps * m_reps, 16])


def b_smem_layout(block_t: int) -> gl.NVMMASharedLayout:
    """Shared memory of one step's activations [BLOCK_T, 32] f16, read by the wgmma as B (K-major)."""
    return gl.NVMMASharedLayout.get_default_for([block_t, 32], gl.float16)


@gluon.jit
def _slot_order(x, ROWS: gl.constexpr):
    """[ROWS, 2, 16] (half, element within the half) -> [ROWS, 32] in K-slot order: slot s0 + 2 s1 + 4 s2 + 8 s3
    + 16 half holds element s0 + 2 s3 + 4 s1 + 8 s2 of that half (element bits e3 e2 e1 e0 -> slot bits e1 e3
    e2 e0)."""
    x = gl.reshape(x, [ROWS, 2, 2, 2, 2, 2])  # [rows, half, e3, e2, e1, e0]
    return gl.reshape(gl.permute(x, [0, 1, 4, 2, 3, 5]), [ROWS, 32])  # [rows, half, e1, e3, e2, e0]


@gluon.jit
def _moe_wgmma_kernel(
    a_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
    N, top_k, num_n_tiles,
    stride_a, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_bias_expert, stride_out,
    swiglu_alpha, swiglu_limit,
    SWIGLU: gl.constexpr, HAS_BIAS: gl.constexpr, GATHER_TOKENS: gl.constexpr, TILE_N: gl.constexpr,
    NUM_KB: gl.constexpr, WORD_LAYOUT: gl.constexpr, B_SMEM: gl.constexpr, BLOCK_T: gl.constexpr,
    M_REPS: gl.constexpr, NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, PIPELINED: gl.constexpr,
    COPY_AHEAD: gl.constexpr, KB_PER_STEP: gl.constexpr, EVEN_N: gl.constexpr, SCALE_AFTER: gl.constexpr,
    VECTOR_STORE: gl.constexpr, PDL: gl.constexpr, EARLY_WEIGHTS: gl.constexpr,
):
    """Program (row block, weight-row tile): out^T[ROWS rows, the block's pairs] = W_e[rows, :] @ A[pairs, :]^T,
    then the epilogue (see moe_matmul._moe_matmul_kernel, whose arguments these are; A here is f16 in K-slot
    order, from to_f16_slots, and the first matmul writes its activations so too). With PDL (see
    triton_utils.PDL) the program waits for the kernel before at its start, or with EARLY_WEIGHTS (the block tables
    written at least two launches before) after reading its block and issuing its first steps' weight copies."""
    a_rings, w_rings = _rings(BLOCK_T, 16 * NUM_WARPS * M_REPS, STAGES, KB_PER_STEP, B_SMEM)
    pid = gl.program_id(0)
    _wgmma_tile(pid // num_n_tiles, pid % num_n_tiles, a_rings, w_rings, a_ptr, w_ptr, scales_ptr, bias_ptr,
                out_ptr, sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
                block_expert_ptr, N, top_k, 0, 0, stride_a, stride_w_expert, stride_w_row, stride_s_expert,
                stride_s_row, stride_bias_expert, stride_out, swiglu_alpha, swiglu_limit,
                SWIGLU, HAS_BIAS, GATHER_TOKENS, TILE_N, NUM_KB, WORD_LAYOUT, BLOCK_T, M_REPS, NUM_WARPS, STAGES,
                PIPELINED, COPY_AHEAD, KB_PER_STEP, EVEN_N, SCALE_AFTER, VECTOR_STORE, PDL, EARLY_WEIGHTS, READY=0)


@gluon.jit
def _moe_wgmma_chain_kernel(
    x_ptr, act_ptr, y_ptr, w1_ptr, s1_ptr, b1_ptr, w2_ptr, s2_ptr, b2_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr, ready_ptr,
    N1, N2, top_k, num_n_tiles1, num_n_tiles2, num_w1_programs,
    stride_x, stride_w1_expert, stride_w1_row, stride_s1_expert, stride_s1_row, stride_b1_expert, stride_act,
    stride_w2_expert, stride_w2_row, stride_s2_expert, stride_s2_row, stride_b2_expert, stride_y,
    swiglu_alpha, swiglu_limit,
    HAS_B1: gl.constexpr, HAS_B2: gl.constexpr, TILE_N: gl.constexpr, NUM_KB1: gl.constexpr,
    NUM_KB2: gl.constexpr, WORD_LAYOUT: gl.constexpr, B_SMEM: gl.constexpr, BLOCK_T: gl.constexpr,
    M_REPS: gl.constexpr, NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, COPY_AHEAD: gl.constexpr,
    KB_PER_STEP: gl.constexpr, EVEN_N1: gl.constexpr, EVEN_N2: gl.constexpr, SCALE_AFTER: gl.constexpr,
    VECTOR_STORE: gl.constexpr, PDL: gl.constexpr, EARLY_WEIGHTS: gl.constexpr,
):
    """Both matmuls of the experts in one launch (CHAIN): programs [0, num_w1_programs) are the first matmul's
    (row block, tile) programs, the rest the second's, each row block's tiles together. A first-matmul program
    counts its row block's tile as done (ready_ptr, one counter a row block) once its activations are stored; a
    second-matmul program issues its first weight copies, then waits until all num_n_tiles1 tiles of its row
    block are counted, then reads their activations. Programs start in the order of their ids, so a waiting
    program's row block has all its first-matmul programs started ahead of it: none waits on a program that cannot
    run. The second matmul's programs count themselves too, and the last of a row block sets its counter back to
    zero (triton_utils.arrival_counters). What it saves: the second launch's start and the first's last programs
    alone on the GPU, the second matmul's programs streaming their weights beside them."""
    a_rings, w_rings = _rings(BLOCK_T, 16 * NUM_WARPS * M_REPS, STAGES, KB_PER_STEP, B_SMEM)
    pid = gl.program_id(0)
    if pid < num_w1_programs:
        _wgmma_tile(pid // num_n_tiles1, pid % num_n_tiles1, a_rings, w_rings, x_ptr, w1_ptr, s1_ptr, b1_ptr,
                    act_ptr, sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
                    ready_ptr, N1, top_k, 0, 0, stride_x, stride_w1_expert, stride_w1_row, stride_s1_expert,
                    stride_s1_row, stride_b1_expert, stride_act, swiglu_alpha, swiglu_limit,
                    True, HAS_B1, True, TILE_N, NUM_KB1, WORD_LAYOUT, BLOCK_T, M_REPS, NUM_WARPS, STAGES,
                    True, COPY_AHEAD, KB_PER_STEP, EVEN_N1, SCALE_AFTER, VECTOR_STORE, PDL, EARLY_WEIGHTS, READY=1)
    else:
        pid2 = pid - num_w1_programs
        _wgmma_tile(pid2 // num_n_tiles2, pid2 % num_n_tiles2, a_rings, w_rings, act_ptr, w2_ptr, s2_ptr, b2_ptr,
                    y_ptr, sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
                    ready_ptr, N2, top_k, num_n_tiles1, num_n_tiles1 + num_n_tiles2, stride_act, stride_w2_expert,
                    stride_w2_row, stride_s2_expert, stride_s2_row, stride_b2_expert, stride_y, swiglu_alpha,
                    swiglu_limit, False, HAS_B2, False, TILE_N, NUM_KB2, WORD_LAYOUT, BLOCK_T, M_REPS, NUM_WARPS,
                    STAGES, True, COPY_AHEAD, KB_PER_STEP, EVEN_N2, SCALE_AFTER, VECTOR_STORE, PDL, EARLY_WEIGHTS,
                    READY=2)


@gluon.jit
def _rings(BLOCK_T: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr, KB_PER_STEP: gl.constexpr,
           B_SMEM: gl.constexpr):
    """Shared-memory rings: ring j holds the K blocks j, j + KB_PER_STEP, ... (STAGES // KB_PER_STEP slots), the
    activations' [BLOCK_T, 32] f16 and the weights' [ROWS, 16] bytes. A step's copies write distinct buffers, so
    the compiler puts no barrier between them (it cannot tell slots of one buffer apart)."""
    PLAIN: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    a_rings = ()
    w_rings = ()
    for j in gl.static_range(KB_PER_STEP):
        a_rings = a_rings + (gl.allocate_shared_memory(gl.float16, [STAGES // KB_PER_STEP, BLOCK_T, 32], B_SMEM),)
        w_rings = w_rings + (gl.allocate_shared_memory(gl.uint8, [STAGES // KB_PER_STEP, ROWS, 16], PLAIN),)
    return a_rings, w_rings


@gluon.jit
def _wgmma_tile(
    pid_m, pid_n, a_rings, w_rings, a_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr, ready_ptr,
    N, top_k, ready_count, ready_total,
    stride_a, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_bias_expert, stride_out,
    swiglu_alpha, swiglu_limit,
    SWIGLU: gl.constexpr, HAS_BIAS: gl.constexpr, GATHER_TOKENS: gl.constexpr, TILE_N: gl.constexpr,
    NUM_KB: gl.constexpr, WORD_LAYOUT: gl.constexpr, BLOCK_T: gl.constexpr,
    M_REPS: gl.constexpr, NUM_WARPS: gl.constexpr, STAGES: gl.constexpr, PIPELINED: gl.constexpr,
    COPY_AHEAD: gl.constexpr, KB_PER_STEP: gl.constexpr, EVEN_N: gl.constexpr, SCALE_AFTER: gl.constexpr,
    VECTOR_STORE: gl.constexpr, PDL: gl.constexpr, EARLY_WEIGHTS: gl.constexpr, READY: gl.constexpr,
):
    """One program of the wgmma kernel (see _moe_wgmma_kernel) on row block pid_m and weight-row tile pid_n, in the
    rings given. READY (the chained launch, _moe_wgmma_chain_kernel): 0 none; 1 count the tile on its row block's
    counter once its activations are stored; 2 wait, before the activations' copies, until the counter reaches
    ready_count (_wait_ready), then count the tile, the last of ready_total setting the counter back to zero."""
    ROWS: gl.constexpr = 16 * NUM_WARPS * M_REPS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                  instr_shape=[16, BLOCK_T, 16])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    COPY_L: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [NUM_WARPS, 1], [1, 0])  # 16-byte copies of [*, 32] f16
    BYTES_L: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [NUM_WARPS, 1], [1, 0])  # 8-byte copies, 64 rows a pass

    if not EARLY_WEIGHTS:
        pdl_wait(PDL)
    expert = gl.load(block_expert_ptr + pid_m)
    if expert < 0:  # the grid is the static worst case
        if EARLY_WEIGHTS:
            pdl_wait(PDL)  # every program waits before it ends (triton_utils.PDL)
        return
    if READY == 2 and not EARLY_WEIGHTS:
        _wait_ready(ready_ptr + pid_m, ready_count, ready_total)
    row_start = gl.load(block_row_start_ptr + pid_m)
    row_end = gl.load(block_row_end_ptr + pid_m)

    # Activation rows of the block's pairs, 32 slots a step.
    t_c = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, COPY_L))
    in_t = row_start + t_c < row_end
    if GATHER_TOKENS:  # first matmul: the tokens' rows
        pairs_c = gl.load(sorted_pairs_ptr + row_start + t_c, mask=in_t, other=0)
        a_rows = (pairs_c // top_k).to(gl.int64)
    else:  # second matmul: the activations are in grouped order already
        a_rows = (row_start + t_c).to(gl.int64)
    k_c = gl.arange(0, 32, layout=gl.SliceLayout(0, COPY_L))
    a_tile = a_ptr + a_rows[:, None] * stride_a + k_c[None, :]  # [BLOCK_T, 32]
    a_mask = in_t[:, None] & (k_c < 32)[None, :]

    # Weight bytes of the tile's rows (one K block a step, a row's 16 bytes a thread) and all their scales.
    r_c = gl.arange(0, ROWS, layout=gl.SliceLayout(1, BYTES_L))
    j_c = gl.arange(0, 16, layout=gl.SliceLayout(0, BYTES_L))
    n_c = pid_n * ROWS + r_c
    w_expert = w_ptr + expert.to(gl.int64) * stride_w_expert
    if TILE_N == 1:
        w_tile = w_expert + n_c.to(gl.int64)[:, None] * stride_w_row + j_c[None, :]
    else:  # `tile_rows`: TILE_N rows' block k side by side, then block k + 1
        w_tile = w_expert + (n_c // TILE_N).to(gl.int64)[:, None] * (stride_w_row * TILE_N) \
            + (n_c % TILE_N)[:, None] * 16 + j_c[None, :]
    if EVEN_N:  # whole tiles of rows: only the copies past the last K block are masked (in _copy_step)
        w_mask = (r_c < ROWS)[:, None] & (j_c < 16)[None, :]
    else:
        w_mask = (n_c < N)[:, None] & (j_c < 16)[None, :]

    if EARLY_WEIGHTS:  # steps 0 .. in flight before the loop: their weights before the wait, all in step 0's group
        for st in gl.static_range(COPY_AHEAD // KB_PER_STEP):
            _copy_step(a_rings, w_rings, a_tile, a_mask, w_tile, w_mask, st, NUM_KB, KB_PER_STEP, TILE_N,
                       COPY_A=False, COPY_W=True, COMMIT=False)
        pdl_wait(PDL)
        if READY == 2:
            _wait_ready(ready_ptr + pid_m, ready_count, ready_total)
        for st in gl.static_range(COPY_AHEAD // KB_PER_STEP):
            _copy_step(a_rings, w_rings, a_tile, a_mask, w_tile, w_mask, st, NUM_KB, KB_PER_STEP, TILE_N,
                       COPY_A=True, COPY_W=False, COMMIT=True)
    elif PIPELINED:
        for st in gl.static_range(COPY_AHEAD // KB_PER_STEP):  # steps 0 .. in flight before the loop
            _copy_step(a_rings, w_rings, a_tile, a_mask, w_tile, w_mask, st, NUM_KB, KB_PER_STEP, TILE_N,
                       COPY_A=True, COPY_W=True, COMMIT=True)
    # Scale bytes of each thread's rows (a row's 90 bytes share a few sectors: mostly L1 hits): the rows of its A
    # registers, or with SCALE_AFTER those of its accumulator (the same rows, in the accumulator's layout).
    S_ROWS: gl.constexpr = gl.SliceLayout(1, mma) if SCALE_AFTER else gl.SliceLayout(1, WORD_LAYOUT)
    n_w = pid_n * ROWS + gl.arange(0, ROWS, layout=S_ROWS)
    s_tile = scales_ptr + expert.to(gl.int64) * stride_s_expert + n_w.to(gl.int64) * stride_s_row
    in_n = n_w < N
    acc = gl.zeros([ROWS, BLOCK_T], gl.float32, mma)
    for step in range(NUM_KB // KB_PER_STEP):
        kb = step * KB_PER_STEP
        scales = ()  # the step's scale bytes, loaded while this thread waits for the copies
        for j in gl.static_range(KB_PER_STEP):
            if EVEN_N:  # unmasked: no zeroing of the destination before each load (SASS)
                scales = scales + (gl.load(s_tile + (kb + j)),)
            else:
                scales = scales + (gl.load(s_tile + (kb + j), mask=in_n, other=0),)
        if PIPELINED:  # two barriers a step, both here (the compiler adds one before a fence that follows reads)
            async_copy.wait_group(COPY_AHEAD // KB_PER_STEP - 1)  # this thread's copies of the step landed
            _barrier()  # every warp is past its wait for the previous step's wgmmas: their slots are free
            fence_async_shared()  # this thread's landed copies, for the wgmmas (async proxy) of every warp
            _copy_step(a_rings, w_rings, a_tile, a_mask, w_tile, w_mask, step + COPY_AHEAD // KB_PER_STEP,
                       NUM_KB, KB_PER_STEP, TILE_N, COPY_A=True, COPY_W=True,
                       COMMIT=True)  # into the slots the previous step freed
            _barrier()  # every thread's fence before any warp reads the step's slots
        else:  # plain loads and stores into one slot, the wgmma waited for: to tell a fault of the rings apart
            a_rings[0].index(0).store(gl.load(a_tile + kb * 32, mask=a_mask, other=0.0))
            w_rings[0].index(0).store(gl.load(w_tile + kb * (16 * TILE_N), mask=w_mask, other=0))
            fence_async_shared()
            _barrier()
        # The step's blocks one after another, each wgmma left in flight while the next block is dequantized:
        # every block's A operand is a value of its own, kept alive (deps) until the step's one wait.
        operands = ()
        slot = step % (STAGES // KB_PER_STEP)
        if SCALE_AFTER:  # each block's product unscaled into an accumulator of its own, scaled in float32 after
            parts = ()
            for j in gl.static_range(KB_PER_STEP):
                w = _a_operand_unscaled(w_rings[j].index(slot).load(WORD_LAYOUT), A_L, ROWS)
                part = warpgroup_mma(w, a_rings[j].index(slot).permute((1, 0)), acc, use_acc=False, is_async=True)
                parts = parts + (part,)
                operands = operands + (w,)
            waited = warpgroup_mma_wait(num_outstanding=0, deps=parts + operands)
            for j in gl.static_range(KB_PER_STEP):
                mult = block_scale(scales[j])  # 2^(s - 121)
                acc = acc + waited[j] * gl.expand_dims(mult, 1)
        else:
            for j in gl.static_range(KB_PER_STEP):
                w = _a_operand(w_rings[j].index(slot).load(WORD_LAYOUT), scales[j], WORD_LAYOUT, A_L, ROWS)
                acc = warpgroup_mma(w, a_rings[j].index(slot).permute((1, 0)), acc, is_async=True)
                operands = operands + (w,)
            waited = warpgroup_mma_wait(num_outstanding=0, deps=(acc,) + operands)
            acc = waited[0]
        if not PIPELINED:
            _barrier()  # every warp's wgmma has read the slot before the next step writes it
    if PIPELINED:
        async_copy.wait_group(0)
        # Every thread's copies (the zero-filled ones past the last step too) have landed before any thread's
        # epilogue: the rings' last use is their copies, so the epilogue's layout conversions may reuse their
        # shared memory, and a copy of another thread still in flight would overwrite them.
        _barrier()

    # Epilogue, with the grouped kernel's roundings (activations rounded to bf16, the twin's dtype).
    n_o = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma))  # the accumulator's weight rows
    h = acc.to(gl.bfloat16).to(gl.float32)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + expert.to(gl.int64) * stride_bias_expert + n_o, mask=n_o < N, other=0.0)
        h = (h + gl.expand_dims(bias.to(gl.float32), 1)).to(gl.bfloat16).to(gl.float32)
    if SWIGLU:  # rows alternate gate (even) and linear (odd): a layout with each row pair in one thread first
        PAIR_L: gl.constexpr = gl.BlockedLayout([2, 1], [32, 1], [1, NUM_WARPS], [0, 1])
        h = gl.convert_layout(h, PAIR_L)
        gate, linear = gl.split(gl.permute(gl.reshape(h, [ROWS // 2, 2, BLOCK_T]), [0, 2, 1]))
        gate = gl.minimum(gate, swiglu_limit)
        linear = gl.minimum(gl.maximum(linear, -swiglu_limit), swiglu_limit)
        act = gate * (1.0 / (1.0 + gl.exp(-swiglu_alpha * gate))) * (linear + 1.0)
        OUT_L: gl.constexpr = gl.BlockedLayout([2, 1], [16, 2], [1, NUM_WARPS], [0, 1])  # column pairs a thread
        act = gl.convert_layout(act.to(gl.bfloat16).to(gl.float16), OUT_L)
        cols = pid_n * (ROWS // 2) + gl.arange(0, ROWS // 2, layout=gl.SliceLayout(1, OUT_L))
        rows_g = row_start + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, OUT_L))
        out_mask = (cols < N // 2)[:, None] & (rows_g < row_end)[None, :]
        gl.store(out_ptr + rows_g.to(gl.int64)[None, :] * stride_out + slot_of_element(cols)[:, None], act,
                 mask=out_mask)
        if READY == 1:  # one count for the program once every thread has stored: the barrier orders the block's
            _barrier()  # stores before the one release add (its fence at the GPU's scope covers them all)
            gl.atomic_add(ready_ptr + pid_m, 1, sem="release", scope="gpu")
    elif VECTOR_STORE:  # h is bf16 already (stored exactly, unweighted); 8 rows of a pair a thread: 16-byte stores
        LANES_N: gl.constexpr = ROWS // 8 if ROWS < 256 else 32
        STORE_L: gl.constexpr = gl.BlockedLayout([8, 1], [LANES_N, 32 // LANES_N], [1, NUM_WARPS], [0, 1])
        y = gl.convert_layout(h.to(out_ptr.dtype.element_ty), STORE_L)
        n_s = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, STORE_L))
        rows_s = row_start + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, STORE_L))
        pairs_s = gl.load(sorted_pairs_ptr + rows_s, mask=rows_s < row_end, other=0)
        gl.store(out_ptr + pairs_s.to(gl.int64)[None, :] * stride_out + n_s[:, None], y,
                 mask=(n_s < N)[:, None] & (rows_s < row_end)[None, :])
    else:  # straight from the accumulator's layout: 2-byte stores
        rows_o = row_start + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma))
        in_rows = rows_o < row_end
        pairs_o = gl.load(sorted_pairs_ptr + rows_o, mask=in_rows, other=0)
        out_mask = (n_o < N)[:, None] & in_rows[None, :]
        gl.store(out_ptr + pairs_o.to(gl.int64)[None, :] * stride_out + n_o[:, None],
                 h.to(out_ptr.dtype.element_ty), mask=out_mask)


@gluon.jit
def _a_operand(w_bytes, scale, WORD_LAYOUT: gl.constexpr, A_L: gl.constexpr, ROWS: gl.constexpr):
    """One K block's bytes [ROWS, 16] (WORD_LAYOUT) and scale bytes [ROWS] -> the wgmma A operand [ROWS, 32] f16
    in K-slot order (A_L), the weights exact: one asm a word, the scale 2^(s - 121) applied in it."""
    mult = block_scale(scale).to(gl.float16)  # 2^(s - 121)
    mult = mult.to(gl.int16, bitcast=True)  # broadcast over the row's bytes as integers (x + 0 folds away)
    mult = (gl.expand_dims(mult, 1) + gl.zeros([ROWS, 16], gl.int16, WORD_LAYOUT)).to(gl.float16, bitcast=True)
    low, high = gl.inline_asm_elementwise(SPLIT_WORD_F16_SCALED_ASM, "=r,=r,=r,=r,r,r,r", [w_bytes, mult],
                                          dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    w = _slot_order(gl.permute(gl.join(low, high), [0, 2, 1]), ROWS)  # [ROWS, 32] in slot order
    return gl.convert_layout(w, A_L, assert_trivial=True)  # no data moves (checked at compile time)


@gluon.jit
def _a_operand_unscaled(w_bytes, A_L: gl.constexpr, ROWS: gl.constexpr):
    """One K block's bytes [ROWS, 16] -> the wgmma A operand [ROWS, 32] f16 in K-slot order (A_L), each value the
    weight's FP4 value times 2^-6 (the scale applied to the product: SCALE_AFTER)."""
    low, high = gl.inline_asm_elementwise(SPLIT_WORD_F16_ASM, "=r,=r,=r,=r,r", [w_bytes],
                                          dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    w = _slot_order(gl.permute(gl.join(low, high), [0, 2, 1]), ROWS)  # [ROWS, 32] in slot order
    return gl.convert_layout(w, A_L, assert_trivial=True)  # no data moves (checked at compile time)


@gluon.jit
def _copy_step(a_rings, w_rings, a_tile, a_mask, w_tile, w_mask, step, NUM_KB: gl.constexpr,
               KB_PER_STEP: gl.constexpr, TILE_N: gl.constexpr, COPY_A: gl.constexpr, COPY_W: gl.constexpr,
               COMMIT: gl.constexpr):
    """Asynchronous copies of one step's K blocks (block step * KB_PER_STEP + j into slot step % slots of ring j),
    the activations' (COPY_A) and the weights' (COPY_W), committed as one group with COMMIT (an empty group past
    the last step, so that every step waits for the same count); uncommitted copies join the next group."""
    slot = step % a_rings[0].shape[0]
    for j in gl.static_range(KB_PER_STEP):
        block = step * KB_PER_STEP + j
        if COPY_A:
            _async_load(a_rings[j].index(slot), a_tile + block * 32, mask=a_mask & (block < NUM_KB))
        if COPY_W:
            _async_load(w_rings[j].index(slot), w_tile + block * (16 * TILE_N), mask=w_mask & (block < NUM_KB))
    if COMMIT:
        async_copy.commit_group()


@gluon.jit
def _wait_ready(counter_ptr, ready_count, ready_total):
    """Spins until the counter reaches ready_count (acquiring the writes counted), then adds this program to it;
    the program that brings it to ready_total sets it back to zero for the next launch. One thread reads, the
    program's warps leave the loop together (the read's result goes through shared memory). Other ways to wait,
    timed 2026-12-07 and dropped (no gain beyond the run-to-run spread): relaxed reads, plain loads by every thread,
    nanosleeps between reads (docs/PERFORMANCE.md)."""
    seen = gl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < ready_count:
        seen = gl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    if gl.atomic_add(counter_ptr, 1, sem="relaxed", scope="gpu") == ready_total - 1:
        gl.store(counter_ptr, 0)


@gluon.jit
def slot_of_element(e):
    """Inverse of the K-slot order: the slot that carries element e (bits e3 e2 e1 e0 -> slot e1 e3 e2 e0)."""
    return (e & ~15) + (e & 1) + ((e >> 2) & 3) * 2 + ((e >> 1) & 1) * 8


_SCALE_RANGE_OK: dict[int, tuple[weakref.ref, bool]] = {}


def scales_fit_f16(scales: torch.Tensor) -> bool:
    """Whether every scale byte is in F16_SCALE_RANGE; read once per weight tensor (weights do not change) and
    remembered by the tensor's identity, so later calls (CUDA-graph capture included) do not synchronize."""
    entry = _SCALE_RANGE_OK.get(id(scales))
    if entry is None or entry[0]() is not scales:
        if scales.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # not read before capture (prepare_weights does it): the other paths, no sync
        low, high = F16_SCALE_RANGE
        entry = (weakref.ref(scales), bool(((scales >= low) & (scales <= high)).all()))
        _SCALE_RANGE_OK[id(scales)] = entry
    return entry[1]


@triton.jit
def _to_f16_slots_kernel(x_ptr, out_ptr, K, stride_x, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[row, slot] = x[row, element of the slot] as f16: the wgmma kernel's activation operand."""
    triton_pdl_wait(PDL)  # x comes from the kernel before
    row = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    element = (slots & ~15) + (slots & 1) + ((slots >> 3) & 1) * 2 + ((slots >> 1) & 3) * 4
    x = tl.load(x_ptr + row * stride_x + element, mask=element < K, other=0.0)
    tl.store(out_ptr + row * stride_out + slots, x.to(tl.float16), mask=slots < K)


def to_f16_slots(x: torch.Tensor) -> torch.Tensor:  # [rows, K] f16, K in slot order (K a multiple of 32)
    """x [rows, K] in K-slot order as f16 (values exact for normalized activations; see the module docstring)."""
    out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    if x.shape[0]:
        launch(_to_f16_slots_kernel, (x.shape[0], triton.cdiv(x.shape[1], 1024)), x, out, x.shape[1], x.stride(0),
               out.stride(0), BLOCK=1024, num_warps=4, **pdl_args(x.device))
    return out


def _plan(a: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, groups: ExpertGroups, config: dict,
          tile_n: int) -> dict:
    """The wgmma kernel's constexprs for one matmul (rings, steps, tiles), after checking its operands."""
    _, n_rows, num_k_blocks, _ = blocks.shape
    if not a.is_cuda:
        raise ValueError("the wgmma MoE kernel (Gluon) runs on CUDA tensors only: no interpreter runs it")
    if a.dtype != torch.float16 or a.shape[1] != num_k_blocks * MXFP4_BLOCK_SIZE or a.stride(1) != 1:
        raise ValueError("activations must be to_f16_slots' [rows, K] f16, K matching the weights")
    if n_rows % tile_n or groups.block_m > config["BLOCK_T"]:
        raise ValueError(f"{n_rows} weight rows must be whole tiles of {tile_n}, row blocks at most BLOCK_T")
    per_step = largest_divisor(num_k_blocks, config["KB_PER_STEP"]) if config["PIPELINED"] else 1
    stages = config["STAGES"] - config["STAGES"] % per_step if config["PIPELINED"] else 1  # whole rings
    ahead = stages - per_step if config["COPY_AHEAD"] is None else config["COPY_AHEAD"]
    if config["PIPELINED"] and (ahead % per_step or not per_step <= ahead <= stages - per_step):
        raise ValueError(f"the wgmma kernel's rings of {stages // per_step} slots hold 1 to {stages // per_step - 1} "
                         f"steps of {per_step} K blocks of copies ahead, not {ahead} blocks")
    if not config["SCALE_AFTER"] and not scales_fit_f16(scales):
        raise ValueError(f"the wgmma MoE kernel scales in f16: scale bytes must lie in {F16_SCALE_RANGE}")
    rows = 16 * config["num_warps"] * config["M_REPS"]
    return dict(NUM_KB=num_k_blocks, STAGES=stages, COPY_AHEAD=ahead, KB_PER_STEP=per_step,
                EVEN_N=n_rows % rows == 0, num_n_tiles=triton.cdiv(n_rows, rows))


def _launch_options(config: dict, a: torch.Tensor, tables_settled: bool) -> dict:
    """The constexprs and launch options both kernels take from the config and the device."""
    num_warps, m_reps, block_t = config["num_warps"], config["M_REPS"], config["BLOCK_T"]
    pdl = pdl_args(a.device)
    return dict(WORD_LAYOUT=word_layout(num_warps, m_reps), B_SMEM=b_smem_layout(block_t), BLOCK_T=block_t,
                M_REPS=m_reps, NUM_WARPS=num_warps, SCALE_AFTER=config["SCALE_AFTER"],
                VECTOR_STORE=config["VECTOR_STORE"], num_warps=num_warps,
                EARLY_WEIGHTS=pdl["PDL"] and tables_settled and bool(config["PIPELINED"]), **pdl,
                **({"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}))


def moe_wgmma(
    a: torch.Tensor,  # [num_tokens, K] (gathered through the pairs) or [num_pairs, K] (grouped order), f16 slots
    blocks: torch.Tensor,  # [num_local_experts, N, K / 32, 16] uint8, split-nibble layout (maybe tiled rows)
    scales: torch.Tensor,  # [num_local_experts, N, K / 32] uint8
    bias: torch.Tensor | None,  # [num_local_experts, N]
    groups: ExpertGroups,  # row blocks of at most config["BLOCK_T"] pairs
    top_k: int,
    out: torch.Tensor,  # swiglu: [num_pairs, N / 2] f16 slots, grouped order; else [num_pairs, N] bf16 by pair
    config: dict,
    swiglu: tuple[float, float] | None = None,  # (alpha, limit): the first matmul's epilogue
    tile_n: int = 1,
    tables_settled: bool = False,  # groups written at least two launches before this one (see triton_utils.PDL)
) -> None:
    """moe_matmul.moe_matmul on the wgmma kernel (activations as to_f16_slots gives them; split-nibble layout).
    With programmatic dependent launch and tables_settled, each program reads its row block and starts its weight
    copies before it waits for the kernel before."""
    config = dict(DEFAULT_WGMMA_CONFIG, **config)
    plan = _plan(a, blocks, scales, groups, config, tile_n)
    num_n_tiles = plan.pop("num_n_tiles")
    dummy = scales  # never read: the flags below switch off its use
    _moe_wgmma_kernel[(groups.block_expert.numel() * num_n_tiles,)](
        a, blocks, scales, bias if bias is not None else dummy, out,
        groups.sorted_pairs, groups.block_expert, groups.block_row_start, groups.block_row_end,
        blocks.shape[1], top_k, num_n_tiles,
        a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0),
        float(swiglu[0]) if swiglu else 0.0, float(swiglu[1]) if swiglu else 0.0,
        SWIGLU=swiglu is not None, HAS_BIAS=bias is not None, GATHER_TOKENS=swiglu is not None, TILE_N=tile_n,
        PIPELINED=config["PIPELINED"], **plan, **_launch_options(config, a, tables_settled))


def moe_wgmma_chain(x_slots, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, groups: ExpertGroups, top_k: int,
                    act: torch.Tensor, y: torch.Tensor, config: dict, swiglu: tuple[float, float],
                    tile_n: int = 1) -> bool:
    """Both matmuls of moe_experts_wgmma in one launch (_moe_wgmma_chain_kernel): x_slots [num_tokens, hidden] f16
    slots -> act [num_pairs, intermediate] f16 slots (grouped order) -> y [num_pairs, hidden] bf16 by pair, as the
    two moe_wgmma calls would write them. The block tables must be settled (written two launches before). False,
    launching nothing, where the two matmuls' rings differ (K blocks a step that divide one's K and not the
    other's) or the rings are unpipelined: the caller then makes the two launches. config: whole (every
    DEFAULT_WGMMA_CONFIG key), as moe_experts_wgmma holds it."""
    if not config["PIPELINED"]:
        return False
    plan1 = _plan(x_slots, w1_blocks, w1_scales, groups, config, tile_n)
    plan2 = _plan(act, w2_blocks, w2_scales, groups, config, tile_n)
    rings = ("STAGES", "COPY_AHEAD", "KB_PER_STEP")
    if any(plan1[key] != plan2[key] for key in rings):
        return False
    num_blocks = groups.block_expert.numel()  # the static worst case: programs of unused blocks return at once
    ready = arrival_counters("moe_wgmma_chain", num_blocks, x_slots.device)
    dummy = w1_scales  # never read: the flags below switch off its use
    _moe_wgmma_chain_kernel[(num_blocks * (plan1["num_n_tiles"] + plan2["num_n_tiles"]),)](
        x_slots, act, y, w1_blocks, w1_scales, b1 if b1 is not None else dummy, w2_blocks, w2_scales,
        b2 if b2 is not None else dummy, groups.sorted_pairs, groups.block_expert, groups.block_row_start,
        groups.block_row_end, ready, w1_blocks.shape[1], w2_blocks.shape[1], top_k, plan1["num_n_tiles"],
        plan2["num_n_tiles"], num_blocks * plan1["num_n_tiles"],
        x_slots.stride(0), w1_blocks.stride(0), w1_blocks.stride(1), w1_scales.stride(0), w1_scales.stride(1),
        b1.stride(0) if b1 is not None else 0, act.stride(0),
        w2_blocks.stride(0), w2_blocks.stride(1), w2_scales.stride(0), w2_scales.stride(1),
        b2.stride(0) if b2 is not None else 0, y.stride(0), float(swiglu[0]), float(swiglu[1]),
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, TILE_N=tile_n, NUM_KB1=plan1["NUM_KB"],
        NUM_KB2=plan2["NUM_KB"], EVEN_N1=plan1["EVEN_N"], EVEN_N2=plan2["EVEN_N"],
        **{key: plan1[key] for key in rings}, **_launch_options(config, x_slots, tables_settled=True))
    return True


def moe_experts_wgmma(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                      swiglu_alpha, swiglu_limit, first_expert=0, config=None, split_nibbles=False, tile_n=1,
                      swizzled=False) -> torch.Tensor:  # [num_tokens, hidden] bf16
    """moe_matmul.moe_experts (the same arguments) with both matmuls on the wgmma kernel: the tokens as f16 in
    slot order, grouped by expert into row blocks of BLOCK_T pairs, the first matmul's activations written as
    f16 slots too, the second's rows combined by moe_matmul's combine kernel. With config["TAIL"] (tile keys,
    BLOCK_T among them) and config["TAIL_PAIRS"], an expert's last TAIL_PAIRS pairs or fewer past its whole row
    blocks go to row blocks of TAIL["BLOCK_T"], each matmul a second launch with those tiles (see
    moe_routing.group_by_expert). The second matmul takes the first's tiles: on 64-row tiles of its own (w2's 2880
    rows are 22.5 tiles of 128, 45 of 64) it lost (H100, 2026-12-06, tools/moe_mma_sweep.py, 128-pair blocks, µs:
    120b 4096 tokens 2227 -> 2343, 20b 4096 1872 -> 2045, 20b 2048 1057 -> 1100)."""
    config = dict(DEFAULT_WGMMA_CONFIG, **(config or {}))
    if not split_nibbles or swizzled:
        raise ValueError("the wgmma MoE kernel reads the split-nibble layout, unswizzled")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the MoE kernels take bf16 activations, got {x.dtype}")
    num_tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    num_pairs = num_tokens * top_k
    tail_config = config.get("TAIL")  # each expert's last few pairs in small row blocks, a launch of their own
    tail = (tail_config["BLOCK_T"], config["TAIL_PAIRS"]) if tail_config else None
    groups = group_by_expert(expert_ids, first_expert, w1_blocks.shape[0], config["BLOCK_T"], tail=tail)
    tables = [(groups, config)] + ([(groups.tail, dict(config, **tail_config))] if tail else [])
    act = torch.empty((num_pairs, w1_blocks.shape[1] // 2), dtype=torch.float16, device=x.device)  # grouped order
    x_slots = to_f16_slots(x)
    y = torch.empty((num_pairs, hidden), dtype=torch.bfloat16, device=x.device)  # by (token, slot), unweighted
    # to_f16_slots came between the grouping and the matmuls: their tables are settled
    chained = config["CHAIN"] and not tail and moe_wgmma_chain(
        x_slots, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, groups, top_k, act, y, config,
        (swiglu_alpha, swiglu_limit), tile_n)
    if not chained:
        for table, table_config in tables:
            moe_wgmma(x_slots, w1_blocks, w1_scales, b1, table, top_k, act, table_config,
                      swiglu=(swiglu_alpha, swiglu_limit), tile_n=tile_n, tables_settled=True)
        for table, table_config in tables:
            moe_wgmma(act, w2_blocks, w2_scales, b2, table, top_k, y, table_config, tile_n=tile_n,
                      tables_settled=True)
    combine(y, expert_ids, expert_weights, out, first_expert, w1_blocks.shape[0])
    return out
