"""A decode step's MoE layer in one launch on the tensor cores: both MXFP4 matmuls, SwiGLU and the combine.

The four-launch chain of moe_mma (first matmul, SwiGLU, second matmul, combine) pays each launch's ramp and drain
on the critical path; at one token that is about 12 of its 34 us (20b, H100, docs/PERFORMANCE.md). Here a unit of
work needs nothing from another unit, so one persistent launch streams all the layer's weights without a pause:

- unit (pair p, intermediate block b): the 64 rows of w1 that give intermediates 32b..32b+31 (gate and linear
  interleaved) over all of K, their bias and clamped SwiGLU, then those 32 intermediates times K block b of w2, for
  every hidden row: the pair's contribution through block b, weighted by its routing weight.
- each program takes a contiguous run of units (about units / SMs of them) and walks their stages: S1 stages of w1
  (Q of its K blocks each) and S2 of w2 (64 * Q of its rows each), all Q * 64 rows x 16 bytes, so one ring of
  SLOTS equal slots serves both; a stage's bytes come by asynchronous copies (cp.async) SLOTS - 1 stages ahead, its
  scale bytes by register loads stored into the slot two stages later (their rows are 90 bytes apart: no copy
  engine moves them).
- w1's rows are copied with gate rows first and linear rows after (a permutation applied to the copy's source
  addresses, the reads stay coalesced), so SwiGLU pairs the halves of a 64-row accumulator through 256 bytes of
  shared memory.
- the weighted w2 products accumulate in shared memory [hidden] float32 while a program's units share a token,
  then go to a float32 workspace by atomic adds; the last program to finish (an arrival counter) rounds the
  workspace to bf16 into the output and zeroes it and the counter for the next call.

Roundings: the first matmul's sums, bias and SwiGLU round as the twin's; the second matmul's sums reach the
workspace in float32 without the twin's bf16 rounding of each pair's row before its weight (a pair's row is summed
across programs), so the output differs from the twin by about one bf16 rounding, and the float32 sum's order
varies from run to run (atomics): the last bit of an output may differ between two runs. The multi-launch paths
(GPTOSS_MMA_FUSED=0, moe_matmul.mma_fused_config) are deterministic.

Same fragments as moe_mma (weights dequantized straight into mma A fragments, f16 activations); Gluon, CUDA only,
tested on GPUs against the twin and the four-launch chain (tests/test_kernels_moe.py, marker gpu).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from gptoss_serve.kernels.gluon_utils import pdl_wait
from gptoss_serve.kernels.moe_matmul import _num_sms, check_decode_operands
from gptoss_serve.kernels.moe_mma import _async_load, _barrier, a_fragment, block_scale, byte_layout
from gptoss_serve.kernels.triton_utils import pdl_args

# Q: K blocks a w1 stage (and 64-row tiles a w2 stage); SLOTS: stages in the ring (SLOTS - 1 in flight while one
# is computed); num_warps 8: two sub-blocks at a time (Q even). 16: a 20b/120b unit is 6 w1 stages (90 of 96 K
# blocks real) and 3 w2 stages (2880 of 3072 rows).
DEFAULT_FUSED_CONFIG = dict(Q=16, SLOTS=6, num_warps=8, TMA=False)


def copy_layout(num_warps: int, q_p2: int) -> gl.DistributedLinearLayout:
    """Which thread copies which 16 bytes of a stage [q_p2 * 64, 16]: row bits 0-3 and 5 on the lanes, bit 4 and
    bits 6.. on the warps, the rest in registers; so that a warp's 32 rows of w1, which sit at even or odd rows of
    the checkpoint (gate rows first, then linear rows, within each 64), are 32 consecutive rows there."""
    warp_rows = [16] + [64 << i for i in range(num_warps.bit_length() - 2)]
    lane_rows = [32, 1, 2, 4, 8]
    reg_rows = [1 << i for i in range((q_p2 * 64).bit_length() - 1) if 1 << i not in warp_rows + lane_rows]
    warp_bases = [[r, 0] if r < q_p2 * 64 else [0, 0] for r in warp_rows]  # warps past the rows copy them again
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8]] + [[r, 0] for r in reg_rows],
                                      lane_bases=[[r, 0] for r in lane_rows], warp_bases=warp_bases, block_bases=[],
                                      shape=[q_p2 * 64, 16])


@gluon.jit
def _row_offsets(n, stride_row, TILE_N: gl.constexpr):
    """Byte offsets of rows n's first K block (moe_mma's layouts: rows one after the other, or `tile_rows`)."""
    if TILE_N == 1:
        return n * stride_row
    return (n // TILE_N) * (stride_row * TILE_N) + (n % TILE_N) * 16


@gluon.jit
def _thread_offsets(stride_w1_row, stride_s1_row, stride_s1_k, stride_w2_row, stride_s2_row, Q_P2: gl.constexpr,
                    TILE_N: gl.constexpr, PERMUTED: gl.constexpr, COPY_L: gl.constexpr, SCALE_L: gl.constexpr):
    """What each thread's copies and scale loads add to a stage's base (_stage_sources): byte offsets of its slot
    rows in w1 (the unit's 64 rows from row 0, gate rows first, K blocks from 0) and in w2 (rows from 0, K block 0),
    scale offsets likewise, and the sub-block and row of each (for the masks). TILE_N divides 64. PERMUTED: w1
    rows gate first (the copies'); else in the checkpoint's order (TMA's whole runs)."""
    rho = gl.arange(0, Q_P2 * 64, layout=gl.SliceLayout(1, COPY_L))  # a slot's row: sub-block rho // 64
    byte = gl.arange(0, 16, layout=gl.SliceLayout(0, COPY_L))[None, :]
    r = rho % 64
    w1 = _row_offsets((r % 32) * 2 + r // 32, stride_w1_row, TILE_N) + (rho // 64) * (16 * TILE_N)
    w2 = _row_offsets(rho, stride_w2_row, TILE_N)
    sq = gl.arange(0, Q_P2, layout=gl.SliceLayout(1, SCALE_L))[:, None]  # [Q_P2, 1]
    sr = gl.arange(0, 64, layout=gl.SliceLayout(0, SCALE_L))[None, :]  # [1, 64]
    if PERMUTED:
        s1 = ((sr % 32) * 2 + sr // 32) * stride_s1_row + sq * stride_s1_k
    else:
        s1 = sr * stride_s1_row + sq * stride_s1_k
    s2 = (sq * 64 + sr) * stride_s2_row
    return w1[:, None] + byte, w2[:, None] + byte, (rho // 64)[:, None] + byte * 0, rho[:, None] + byte * 0, \
        s1, s2, sq + sr * 0, sq * 64 + sr


@gluon.jit
def _next_stage(i, j, j2, n_units, S1: gl.constexpr):
    """The stage after (unit i, w1 stage j) or (unit i, w2 row range j2; j2 = -1 in the w1 stages): w1 stages unit
    by unit, then w2's: row range 0 for every unit, then row range 1, ...; counted, not divided, per stage."""
    if j2 < 0:
        j += 1
        if j == S1:
            j = 0
            i += 1
            if i == n_units:
                i = 0
                j2 = 0
    else:
        i += 1
        if i == n_units:
            i = 0
            j2 += 1
    return i, j, j2


@gluon.jit
def _stage_sources(i, j, j2, u_begin, ids_ptr, first_expert, num_local_experts, w1_ptr, s1_ptr, w2_ptr, s2_ptr,
                   stride_w1_expert, stride_w1_row, stride_s1_expert, stride_s1_row, stride_s1_k,
                   stride_w2_expert, stride_w2_row, stride_s2_expert, stride_s2_row, stride_s2_k,
                   w1_offs, w2_offs, w_q, w_rho, s1_offs, s2_offs, s_q, s_rho,
                   HIDDEN: gl.constexpr, NB: gl.constexpr, Q: gl.constexpr, S1: gl.constexpr, S2: gl.constexpr,
                   TILE_N: gl.constexpr):
    """The stage (unit i of the program's from u_begin, w1 stage j or w2 row range j2 as _next_stage counts):
    pointers to its weight bytes [Q_P2 * 64, 16] and scale bytes [Q_P2, 64], and their masks (off past the
    program's stages, for other ranks' experts, past K or the rows); the per-thread parts from _thread_offsets,
    the stage's own as scalars."""
    KB: gl.constexpr = HIDDEN // 32  # w1's K blocks
    is_w1 = j2 < 0
    pair = (u_begin + i) // NB
    b = (u_begin + i) % NB
    inside = j2 < S2
    expert = gl.load(ids_ptr + pair, mask=inside, other=-1).to(gl.int32) - first_expert
    live = inside & (expert >= 0) & (expert < num_local_experts)
    expert = gl.where(live, expert, 0).to(gl.int64)
    if is_w1:  # rows 64 b.., K blocks j Q..
        w_base = w1_ptr + expert * stride_w1_expert + _row_offsets(64 * b, stride_w1_row, TILE_N).to(gl.int64) \
            + j * (Q * 16 * TILE_N)
        w_ptrs = w_base + w1_offs
        w_mask = live & (w_q < Q) & (w_q < KB - j * Q)
        s_base = s1_ptr + expert * stride_s1_expert + (64 * b).to(gl.int64) * stride_s1_row + j * Q * stride_s1_k
        s_ptrs = s_base + s1_offs
        s_mask = live & (s_q < Q) & (s_q < KB - j * Q)
    else:  # rows j2 64 Q.., K block b
        w_base = w2_ptr + expert * stride_w2_expert \
            + _row_offsets(j2 * (64 * Q), stride_w2_row, TILE_N).to(gl.int64) + b * (16 * TILE_N)
        w_ptrs = w_base + w2_offs
        w_mask = live & (w_rho < 64 * Q) & (w_rho < HIDDEN - j2 * (64 * Q))
        s_base = s2_ptr + expert * stride_s2_expert + (j2 * (64 * Q)).to(gl.int64) * stride_s2_row \
            + b * stride_s2_k
        s_ptrs = s_base + s2_offs
        s_mask = live & (s_rho < 64 * Q) & (s_rho < HIDDEN - j2 * (64 * Q))
    return w_ptrs, w_mask, s_ptrs, s_mask, live, expert.to(gl.int32), b


@gluon.jit
def _issue_stage(slot, i, j, j2, w_smem, bars, w1_desc, w2_desc, u_begin, ids_ptr, first_expert, num_local_experts,
                 w1_ptr, s1_ptr, w2_ptr, s2_ptr, stride_w1_expert, stride_w1_row, stride_s1_expert, stride_s1_row,
                 stride_s1_k, stride_w2_expert, stride_w2_row, stride_s2_expert, stride_s2_row, stride_s2_k, offsets,
                 HIDDEN: gl.constexpr, NB: gl.constexpr, Q: gl.constexpr, Q_P2: gl.constexpr, S1: gl.constexpr,
                 S2: gl.constexpr, TILE_N: gl.constexpr, TMA: gl.constexpr):
    """Starts the copy of stage (i, j, j2) (_next_stage) into ring slot `slot` and returns its scale bytes [Q_P2,
    64] (register loads: their rows are 90 bytes apart, no copy engine moves them). TMA: one bulk tensor copy (of
    16-Q_P2 KB, the w1 rows in the checkpoint's order) that arrives on the slot's mbarrier; else every thread's
    16-byte cp.async copies, a commit group a stage."""
    w_ptrs, w_mask, s_ptrs, s_mask, live, expert, b = _stage_sources(
        i, j, j2, u_begin, ids_ptr, first_expert, num_local_experts, w1_ptr, s1_ptr, w2_ptr, s2_ptr,
        stride_w1_expert, stride_w1_row, stride_s1_expert, stride_s1_row, stride_s1_k,
        stride_w2_expert, stride_w2_row, stride_s2_expert, stride_s2_row, stride_s2_k, *offsets,
        HIDDEN, NB, Q, S1, S2, TILE_N)
    if TMA:
        bar = bars.index(slot)
        slot_bytes = w_smem.index(slot)  # [4 Q_P2, 256]
        mbarrier.expect(bar, Q_P2 * 1024, pred=live)
        if j2 < 0:  # tile b (rows 64 b..), K blocks j Q.. (4 rows of 256 bytes each; past the tile: zeros)
            tma.async_copy_global_to_shared(w1_desc, [expert * NB + b, j * Q * 4, 0], bar,
                                            slot_bytes._reinterpret(gl.uint8, [1, 4 * Q_P2, 256], w1_desc.layout),
                                            pred=live)
        else:  # the expert's row tiles j2 Q.. (past its rows: zeros), K block b
            tma.async_copy_global_to_shared(
                w2_desc, [expert, j2 * Q, b, 0, 0], bar,
                slot_bytes._reinterpret(gl.uint8, [1, Q_P2, 1, 4, 256], w2_desc.layout), pred=live)
        mbarrier.arrive(bar, pred=~live)  # nothing to copy: the phase completes all the same
    else:
        _async_load(w_smem.index(slot), w_ptrs, mask=w_mask)
        async_copy.commit_group()
    return gl.load(s_ptrs, mask=s_mask, other=0)


@gluon.jit
def _moe_fused_kernel(
    x_ptr, ids_ptr, weights_ptr,
    w1_ptr, s1_ptr, b1_ptr, w2_ptr, s2_ptr, b2_ptr,
    acc_ptr, count_ptr, out_ptr, w1_desc, w2_desc,
    num_units, first_expert, num_local_experts, swiglu_alpha, swiglu_limit,
    stride_w1_expert, stride_w1_row, stride_s1_expert, stride_s1_row, stride_s1_k, stride_b1_expert,
    stride_w2_expert, stride_w2_row, stride_s2_expert, stride_s2_row, stride_s2_k, stride_b2_expert,
    HIDDEN: gl.constexpr, NB: gl.constexpr, Q: gl.constexpr, Q_P2: gl.constexpr, S1: gl.constexpr,
    S1_P2: gl.constexpr, S2: gl.constexpr, SLOTS: gl.constexpr, MAX_UNITS: gl.constexpr, TILE_N: gl.constexpr,
    HAS_B2: gl.constexpr, BYTE_LAYOUT: gl.constexpr, STAGE_LAYOUT: gl.constexpr, COPY_L: gl.constexpr,
    NUM_WARPS: gl.constexpr, PDL: gl.constexpr, TMA: gl.constexpr = False,
):
    """out = sum over the token's pairs p (routed to this rank) of weight_p * (W2_e SwiGLU(W1_e x + b1_e) + b2_e),
    the program's share: units [pid * num_units / P, (pid + 1) * num_units / P) (at most MAX_UNITS), first the w1
    stages of each unit, then the w2 stages: row range j2 of every unit (summed in registers), then j2 + 1.
    A w1 stage goes G = NUM_WARPS / 4 sub-blocks at a time: warps 4g..4g + 3 take sub-block q0 + g (mma rows
    64g..64g + 63), whose activation block is the operand's column g. A w2 stage is one mma over all its rows.
    TMA (tiled rows of 64, w1_desc / w2_desc from _tma_descriptors): a stage's weights come by one bulk tensor copy
    issued by one thread, completing on the slot's mbarrier, instead of 1024 cp.async of 16 bytes."""
    pdl_wait(PDL)  # the routing and the activations come from the kernels before
    G: gl.constexpr = NUM_WARPS // 4
    ROWS: gl.constexpr = Q_P2 * 64  # a slot's rows
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, 8])
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    ROW_L: gl.constexpr = gl.SliceLayout(1, mma)
    SCALE_L: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [NUM_WARPS, 1], [1, 0])  # [Q_P2, 64]
    X_L: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 8, 4], [NUM_WARPS, 1, 1], [2, 1, 0])  # x_groups
    V_L: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])  # [32] intermediates
    H3_L: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 1, 32], [1, 1, NUM_WARPS], [2, 1, 0])  # [1, G, 32]
    OUT_L: gl.constexpr = gl.BlockedLayout([4], [32], [NUM_WARPS], [0])  # [ROWS] the output's rows
    FLAT: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    FLAT1: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    FLAT3: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[2, 1, 0])

    pid = gl.program_id(0)
    num_programs = gl.num_programs(0)
    u_begin = pid * num_units // num_programs
    n_units = (pid + 1) * num_units // num_programs - u_begin
    n_stages = n_units * (S1 + S2)

    # Unswizzled buffers. A memory view keeps its layout, whose rank is the view's or one less: buffers read a
    # 1-D row at a time have a 1-D layout and a view of more dimensions (_reinterpret, same bytes) for the rest.
    if TMA:  # [4 Q_P2, 256] bytes a slot (TMA's box), read as [ROWS, 16]; an mbarrier a slot
        w_smem = gl.allocate_shared_memory(gl.uint8, [SLOTS, 4 * Q_P2, 256],
                                           gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2))
        bars = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
        for k in gl.static_range(SLOTS):
            mbarrier.init(bars.index(k), count=1)
        fence_async_shared()
        _barrier()
    else:
        w_smem = gl.allocate_shared_memory(gl.uint8, [SLOTS, ROWS, 16], FLAT)
        bars = w_smem  # unused
    s_groups = gl.allocate_shared_memory(gl.uint8, [SLOTS * Q_P2 // G, 64 * G], FLAT1)  # G sub-blocks' scales a row
    s_slots = s_groups._reinterpret(gl.uint8, [SLOTS, Q_P2, 64], FLAT)  # a slot's, for their stores
    s_rows = s_groups._reinterpret(gl.uint8, [SLOTS, ROWS], FLAT1)  # a slot's, read at once (w2)
    # The activations as f16 [w1 stage * sub-block groups, 8, 32]: row c of group (j, i) is K block j * Q + i * G
    # + c for c < G (the w1 operand's column c), zero for c >= G.
    x_groups = gl.allocate_shared_memory(gl.float16, [S1_P2 * (Q_P2 // G), 8, 32], FLAT)
    h_smem = gl.allocate_shared_memory(gl.float32, [64 * G], FLAT1)  # a unit's w1 sums by warp group
    act_rows = gl.allocate_shared_memory(gl.float16, [MAX_UNITS * 8, 32], FLAT1)  # SwiGLU outputs, 8 copies a unit
    act_units = act_rows._reinterpret(gl.float16, [MAX_UNITS, 8, 32], FLAT)

    xi = gl.arange(0, S1_P2 * (Q_P2 // G), layout=gl.SliceLayout(1, gl.SliceLayout(2, X_L)))
    xc = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, X_L)))[None, :, None]
    xe = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, X_L)))[None, None, :]
    xq = (xi % (Q_P2 // G))[:, None, None] * G + xc
    xk = (xi // (Q_P2 // G))[:, None, None] * Q + xq
    xv = gl.load(x_ptr + xk * 32 + xe, mask=(xc < G) & (xq < Q) & (xk < HIDDEN // 32) & (xe < 32), other=0.0)
    x_groups._reinterpret(gl.float16, [S1_P2 * (Q_P2 // G), 8, 32], FLAT3).store(xv.to(gl.float16))

    offsets = _thread_offsets(stride_w1_row, stride_s1_row, stride_s1_k, stride_w2_row, stride_s2_row, Q_P2, TILE_N,
                              not TMA, COPY_L, SCALE_L)
    # The first SLOTS - 1 stages: copies in flight, scale bytes straight into their slots.
    ti = 0  # the next stage to copy (_next_stage)
    tj = 0
    tj2 = -1
    for t in range(SLOTS - 1):
        scales = _issue_stage(t, ti, tj, tj2, w_smem, bars, w1_desc, w2_desc, u_begin, ids_ptr, first_expert,
                              num_local_experts, w1_ptr, s1_ptr, w2_ptr, s2_ptr, stride_w1_expert, stride_w1_row,
                              stride_s1_expert, stride_s1_row, stride_s1_k, stride_w2_expert, stride_w2_row,
                              stride_s2_expert, stride_s2_row, stride_s2_k, offsets, HIDDEN, NB, Q, Q_P2, S1, S2,
                              TILE_N, TMA)
        s_slots.index(t).store(scales)
        ti, tj, tj2 = _next_stage(ti, tj, tj2, n_units, S1)
    scales_old = gl.zeros([Q_P2, 64], gl.uint8, SCALE_L)  # loaded two stages back, for stage s + SLOTS - 3
    scales_new = gl.zeros([Q_P2, 64], gl.uint8, SCALE_L)  # loaded one stage back
    acc1 = gl.zeros([64 * G, 8], gl.float32, mma)  # a unit's w1 sums, column g for warp group g
    acc2 = gl.zeros([ROWS, 8], gl.float32, mma)  # a w2 row range's weighted sums over the units, every column
    v32 = gl.arange(0, 32, layout=V_L)
    cols = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))[None, :]
    i = 0  # the stage computed (_next_stage)
    j = 0
    j2 = -1

    for s in range(n_stages):
        if s >= 2:  # the scale bytes loaded two stages back into their slot (read SLOTS - 3 stages from now)
            s_slots.index((s + SLOTS - 3) % SLOTS).store(scales_old)
        if TMA:
            mbarrier.wait(bars.index(s % SLOTS), (s // SLOTS) & 1)  # stage s's bytes landed
        else:
            async_copy.wait_group(SLOTS - 2)  # this thread's copies of stage s landed
        _barrier()  # everyone's, and stage s - 1 (whose slot the next copies take) is done with
        scales_old = scales_new
        scales_new = _issue_stage((s + SLOTS - 1) % SLOTS, ti, tj, tj2, w_smem, bars, w1_desc, w2_desc, u_begin,
                                  ids_ptr, first_expert, num_local_experts, w1_ptr, s1_ptr, w2_ptr, s2_ptr,
                                  stride_w1_expert, stride_w1_row, stride_s1_expert, stride_s1_row, stride_s1_k,
                                  stride_w2_expert, stride_w2_row, stride_s2_expert, stride_s2_row, stride_s2_k,
                                  offsets, HIDDEN, NB, Q, Q_P2, S1, S2, TILE_N, TMA)
        ti, tj, tj2 = _next_stage(ti, tj, tj2, n_units, S1)

        if TMA:
            slot_w = w_smem.index(s % SLOTS)._reinterpret(gl.uint8, [ROWS, 16], FLAT)
        else:
            slot_w = w_smem.index(s % SLOTS)
        pair = (u_begin + i) // NB  # the stage's unit: pair and intermediate block b
        b = (u_begin + i) % NB
        expert = gl.load(ids_ptr + pair).to(gl.int32) - first_expert
        here = (expert >= 0) & (expert < num_local_experts)  # else routed to another rank's expert: skipped
        if j2 < 0:  # w1 stage j of unit i
            if here:
                acc1 = _w1_stage(acc1, slot_w, s_groups, (s % SLOTS) * (Q_P2 // G), x_groups, j * (Q_P2 // G), Q,
                                 G, BYTE_LAYOUT, mma)
                if j == S1 - 1:  # SwiGLU of the unit's 32 intermediates, 8 copies for the w2 operand
                    rows = gl.arange(0, 64 * G, layout=ROW_L)[:, None]
                    h_smem.store(gl.sum(gl.where(cols == rows // 64, acc1, 0.0), axis=1))  # group g: column g
                    acc1 = gl.zeros([64 * G, 8], gl.float32, mma)
                    _barrier()
                    if TMA:  # rows in the checkpoint's order: 2c gate, 2c + 1 linear, in each group's 64
                        halves = h_smem._reinterpret(gl.float32, [G, 32, 2], FLAT3).permute([2, 0, 1])  # [2, G, 32]
                        gate = gl.convert_layout(gl.sum(gl.sum(halves.slice(0, 1).load(H3_L), axis=0), axis=0), V_L)
                        linear = gl.convert_layout(gl.sum(gl.sum(halves.slice(1, 1).load(H3_L), axis=0), axis=0),
                                                   V_L)
                    else:  # gate rows first, then linear rows (the copies permuted them)
                        gate = gl.zeros([32], gl.float32, V_L)
                        linear = gl.zeros([32], gl.float32, V_L)
                        for g in gl.static_range(G):
                            gate += h_smem.slice(64 * g, 32).load(V_L)
                            linear += h_smem.slice(64 * g + 32, 32).load(V_L)
                    bias_row = b1_ptr + expert.to(gl.int64) * stride_b1_expert + 64 * b + 2 * v32
                    act = _swiglu(gate, linear, gl.load(bias_row), gl.load(bias_row + 1), swiglu_alpha,
                                  swiglu_limit)
                    for c in gl.static_range(8):
                        act_rows.index(i * 8 + c).store(act)
        else:  # w2 rows j2 * 64 Q.. of unit i times its K block b, weighted, into acc2
            row_end = gl.minimum((j2 + 1) * (64 * Q), HIDDEN)  # the range's (the slot's last rows may be past it)
            if here:
                weight = gl.load(weights_ptr + pair)
                a = _weight_fragment(slot_w, 0, ROWS, STAGE_LAYOUT, mma)
                ab = act_units.index(i).permute([1, 0]).load(B_L)  # [32, 8]: every column the unit's SwiGLU
                part = mma_v2(a, ab, gl.zeros([ROWS, 8], gl.float32, mma))
                scale = block_scale(s_rows.index(s % SLOTS).load(ROW_L)) * weight
                acc2 = acc2 + part * gl.expand_dims(scale, 1)
                if HAS_B2 and b == 0:  # the pair's bias, once (with its first block)
                    rows = j2 * (64 * Q) + gl.arange(0, ROWS, layout=ROW_L)
                    bias = gl.load(b2_ptr + expert.to(gl.int64) * stride_b2_expert + rows, mask=rows < row_end,
                                   other=0.0)
                    acc2 = acc2 + gl.expand_dims(bias.to(gl.float32) * weight, 1)
            if i == n_units - 1:  # the row range's last unit: its sums to the workspace
                sums = gl.convert_layout(gl.sum(gl.where(cols == 0, acc2, 0.0), axis=1), OUT_L)
                ro = j2 * (64 * Q) + gl.arange(0, ROWS, layout=OUT_L)
                gl.atomic_add(acc_ptr + ro, sums, mask=ro < row_end, sem="relaxed")
                acc2 = gl.zeros([ROWS, 8], gl.float32, mma)
        i, j, j2 = _next_stage(i, j, j2, n_units, S1)
    if not TMA:
        async_copy.wait_group(0)

    # The last program to arrive rounds the workspace into the output and zeroes it for the next call.
    _fence_gpu()  # this thread's atomics before the count
    _barrier()
    arrived = gl.atomic_add(count_ptr, 1, sem="acq_rel")
    if arrived == num_programs - 1:
        _fence_gpu()  # every program's atomics before the reads
        for r0 in range(0, HIDDEN, ROWS):
            ro = r0 + gl.arange(0, ROWS, layout=OUT_L)
            sums = gl.load(acc_ptr + ro, mask=ro < HIDDEN, other=0.0, cache_modifier=".cg")
            gl.store(out_ptr + ro, sums.to(out_ptr.dtype.element_ty), mask=ro < HIDDEN)
            gl.store(acc_ptr + ro, gl.zeros([ROWS], gl.float32, OUT_L), mask=ro < HIDDEN)
        gl.store(count_ptr, 0)


@gluon.jit
def _fence_gpu():
    """fence.acq_rel.gpu: this thread's memory operations ordered against later ones, device-wide."""
    gl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _w1_stage(acc, slot_w, s_groups, scale_row, x_groups, x_row, Q: gl.constexpr, G: gl.constexpr,
              BYTE_LAYOUT: gl.constexpr, mma: gl.constexpr):
    """acc [64 G, 8] + a w1 stage: sub-blocks q0 + g (K blocks of the unit's 64 rows) times their activation
    blocks, G at a time, column g of the operand for warp group g."""
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    ROW_L: gl.constexpr = gl.SliceLayout(1, mma)
    for q0 in gl.static_range(0, Q, G):
        a = _weight_fragment(slot_w, q0 * 64, 64 * G, BYTE_LAYOUT, mma)
        xb = x_groups.index(x_row + q0 // G).permute([1, 0]).load(B_L)  # [32, 8]: column g = sub-block q0 + g
        part = mma_v2(a, xb, gl.zeros([64 * G, 8], gl.float32, mma))
        acc = acc + part * gl.expand_dims(block_scale(s_groups.index(scale_row + q0 // G).load(ROW_L)), 1)
    return acc


@gluon.jit
def _weight_fragment(slot_w, row0: gl.constexpr, ROWS: gl.constexpr, BYTE_LAYOUT: gl.constexpr,
                     mma: gl.constexpr):
    """Rows row0..row0 + ROWS of a slot (16 bytes each) as the mma A operand [ROWS, 32] f16 (moe_mma.a_fragment);
    BYTE_LAYOUT: moe_mma.byte_layout for ROWS rows."""
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    return a_fragment(slot_w.slice(row0, ROWS, dim=0).load(BYTE_LAYOUT), A_L, ROWS)


@gluon.jit
def _round_bf16(v):
    return v.to(gl.bfloat16).to(gl.float32)


@gluon.jit
def _swiglu(gate, linear, gate_bias, linear_bias, swiglu_alpha, swiglu_limit):
    """moe_matmul.swiglu_of_sums in Gluon: the sums rounded to bf16, plus the bias (rounded again), clamped
    SwiGLU rounded to bf16; returned as f16 (exact: clamped SwiGLU outputs are within f16's range)."""
    gate = _round_bf16(_round_bf16(gate) + gate_bias.to(gl.float32))
    linear = _round_bf16(_round_bf16(linear) + linear_bias.to(gl.float32))
    gate = gl.minimum(gate, swiglu_limit)
    linear = gl.minimum(gl.maximum(linear, -swiglu_limit), swiglu_limit)
    act = gate * (1.0 / (1.0 + gl.exp(-swiglu_alpha * gate))) * (linear + 1.0)
    return act.to(gl.bfloat16).to(gl.float16)


_WORKSPACES: dict = {}
_DESCRIPTORS: dict = {}


def _workspace(device: torch.device, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 sums [hidden] and the arrival counter, zero between calls (the kernel's last program zeroes
    them), one pair a device, width and stream: launches on one stream follow each other (with PDL too: every
    kernel waits for the one before to finish before it ends), launches on two streams do not share them."""
    key = (device, hidden, torch.cuda.current_stream(device).cuda_stream)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.zeros(hidden, dtype=torch.float32, device=device),
                            torch.zeros(1, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


def moe_experts_mma_fused(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                          swiglu_alpha, swiglu_limit, first_expert=0, config=None, tile_n=1) -> torch.Tensor:
    """moe_matmul.moe_experts for a one-token decode step in one launch (_moe_fused_kernel); weights in the
    split-nibble layout (rows tiled by tile_n or not), any scale strides. Returns [1, hidden] in x's dtype."""
    config = dict(DEFAULT_FUSED_CONFIG, **(config or {}))
    config.pop("kernel", None)
    num_tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    q, slots, num_warps = config["Q"], config["SLOTS"], config["num_warps"]
    if num_tokens != 1:
        raise ValueError(f"the one-launch decode MoE kernel takes one token, got {num_tokens}")
    if slots < 4:
        raise ValueError(f"SLOTS must be 4 or more (scale bytes land two stages after their load), got {slots}")
    if num_warps not in (4, 8, 16) or q % (num_warps // 4):
        raise ValueError(f"num_warps 4, 8 or 16 (1, 2 or 4 sub-blocks of 64 rows at a time, G) with G dividing Q: "
                         f"got num_warps={num_warps}, Q={q}")
    if not x.is_cuda:
        raise ValueError("the one-launch decode MoE kernel (Gluon) runs on CUDA tensors only: no interpreter runs it")
    if x.dtype != torch.bfloat16 or x.stride(1) != 1:
        raise ValueError(f"the MoE kernels take bf16 activations with unit stride, got {x.dtype}")
    if 64 % tile_n:
        raise ValueError(f"the one-launch kernel takes row tiles that divide 64, got {tile_n}")
    _, n1, kb1 = check_decode_operands(x, w1_blocks, tile_n)
    num_local_experts, n2, nb = w2_blocks.shape[:3]
    if n1 != 64 * nb or n2 != hidden:
        raise ValueError(f"w1 [{n1} rows] and w2 [{n2} rows, {nb} K blocks] do not make a gpt-oss MoE of hidden "
                         f"{hidden}")
    check_decode_operands(None, w2_blocks, tile_n)
    q_p2 = triton.next_power_of_2(q)
    rows = 64 * q_p2
    if rows < 16 * num_warps:
        raise ValueError(f"Q={q}: a stage's {rows} rows are fewer than the {num_warps} warps' 16 each")
    num_units = top_k * nb
    grid = min(_num_sms(x.device), num_units)
    acc, count = _workspace(x.device, hidden)
    out = torch.empty_like(x)
    use_tma = bool(config["TMA"])
    contiguous = w1_blocks.is_contiguous() and w2_blocks.is_contiguous()
    if use_tma and (tile_n != 64 or q != q_p2 or q > 64 or not contiguous):
        raise ValueError(f"TMA copies whole tiles of 64 rows (tile_n=64, contiguous blocks) with Q a power of two up "
                         f"to 64: got tile_n={tile_n}, Q={q}")
    w1_desc, w2_desc = _tma_descriptors(w1_blocks, w2_blocks, q) if use_tma else (None, None)
    _moe_fused_kernel[(grid,)](
        x, expert_ids.reshape(-1), expert_weights.reshape(-1), w1_blocks, w1_scales, b1, w2_blocks, w2_scales,
        b2 if b2 is not None else b1, acc, count, out, w1_desc, w2_desc,
        num_units, first_expert, num_local_experts, float(swiglu_alpha), float(swiglu_limit),
        w1_blocks.stride(0), w1_blocks.stride(1), w1_scales.stride(0), w1_scales.stride(1), w1_scales.stride(2),
        b1.stride(0), w2_blocks.stride(0), w2_blocks.stride(1), w2_scales.stride(0), w2_scales.stride(1),
        w2_scales.stride(2), b2.stride(0) if b2 is not None else 0,
        **launch_constants(hidden, nb, q, slots, num_warps, triton.cdiv(num_units, grid), tile_n, b2 is not None,
                           use_tma),
        num_warps=num_warps, **pdl_args(x.device))
    return out


def launch_constants(hidden: int, nb: int, q: int, slots: int, num_warps: int, max_units: int, tile_n: int,
                     has_b2: bool, tma: bool) -> dict:
    """_moe_fused_kernel's constexprs: hidden size, w2's K blocks (nb), the config, the most units a program
    takes, the row tile, whether there is a b2, TMA."""
    q_p2 = triton.next_power_of_2(q)
    s1, s2 = triton.cdiv(hidden // 32, q), triton.cdiv(hidden, 64 * q)
    return dict(HIDDEN=hidden, NB=nb, Q=q, Q_P2=q_p2, S1=s1, S1_P2=triton.next_power_of_2(s1), S2=s2, SLOTS=slots,
                MAX_UNITS=triton.next_power_of_2(max_units), TILE_N=tile_n, HAS_B2=has_b2,
                BYTE_LAYOUT=byte_layout(num_warps, 1),
                STAGE_LAYOUT=byte_layout(num_warps, 64 * q_p2 // (16 * num_warps)),
                COPY_L=copy_layout(num_warps, q_p2), NUM_WARPS=num_warps, TMA=tma)


def _tma_descriptors(w1_blocks: torch.Tensor, w2_blocks: torch.Tensor, q: int) -> tuple:
    """TMA descriptors of the weights tiled by 64 rows (`tile_rows`): w1 as [experts * row tiles, K blocks * 4, 256]
    bytes (a stage: one tile's Q K blocks, [1, 4 Q, 256]); w2 as [experts, row tiles, K blocks, 4, 256] (a stage: Q
    row tiles' block b, [1, Q, 1, 4, 256]). A box past a tile's K blocks or an expert's rows reads zeros.
    Unswizzled: the slot's bytes are in the order the kernel reads them."""
    key = (w1_blocks.data_ptr(), w2_blocks.data_ptr(), tuple(w1_blocks.shape), tuple(w2_blocks.shape), q)
    if key in _DESCRIPTORS:  # a descriptor holds only the base, shape and strides: built once a weight pair
        return _DESCRIPTORS[key]
    num_experts, n1, kb1, _ = w1_blocks.shape
    hidden, kb2 = w2_blocks.shape[1:3]
    w1 = w1_blocks.view(num_experts * n1 // 64, kb1 * 4, 256)
    w2 = w2_blocks.view(num_experts, hidden // 64, kb2, 4, 256)
    _DESCRIPTORS[key] = tuple(
        TensorDescriptor(w, list(w.shape), list(w.stride()), box,
                         gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=len(box)))
        for w, box in ((w1, [1, 4 * q, 256]), (w2, [1, q, 1, 4, 256])))
    return _DESCRIPTORS[key]
