"""Decode MoE matmuls on the tensor cores (mma.sync) with MXFP4 weights dequantized straight into A fragments.

Written in Gluon (Triton's explicit-layout dialect), because the point is where each value sits. A program owns
one row block of an expert's pairs (up to BLOCK_T of them, the mma's N side; or a single pair when the pairs
go one by one), a range of weight rows and a K range of KB MXFP4 blocks. The weight rows are the mma's M side:
for each K block a thread loads one 4-byte word of each of its two rows (bytes 4c..4c+3 of the block, c = lane
% 4; 8 rows x 16 bytes a warp, contiguous on the tiled-row layout), turns the word into eight f16 values with one
asm (nibble -> float8 e4m3 bits that read as value * 2^-6 -> the hardware's e4m3 -> f16 conversion: 11
instructions), and those registers are the A fragment of the mma as they are: in the dot-operand layout with
k_width 4 a thread holds elements 4c..4c+3 and 16 + 4c..16 + 4c + 3 of each 32-wide K block, which on the
split-nibble layout are the low and the high nibbles of that one word. (tools/kernel_sass.py mma: no shuffles
between the asm and HMMA.)

Each block's product is a fresh mma (float32) scaled once by 2^(s - 121) (the E8M0 scale times the 2^6 the e4m3
values lack) and added to the accumulator: the products are exact (f16 values of two significant bits times f16
activations), the tensor cores sum a block's 32 in float32. The activations of the K range are staged once per
program in shared memory as f16 (bf16 values are exact in f16 between 2^-14 and 65504; smaller ones keep an
absolute error below 2^-25, larger ones overflow, which normalized MoE inputs and clamped SwiGLU outputs do not
reach). Partial sums go to the float32 workspace [splits, pairs, N] of moe_matmul.moe_matmul_splitk, whose
follow-up kernels (SwiGLU, combine) finish the layer.

No interpreter runs Gluon: on CPU tensors moe_experts takes the other decode kernels, and this one is tested on
GPUs (tests/test_kernels_moe.py, marker gpu) against the torch twin and the other paths.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from gptoss_serve.kernels.moe_matmul import check_decode_operands, split_bytes_e4m3_ptx
from gptoss_serve.kernels.moe_routing import ExpertGroups
from gptoss_serve.kernels.gluon_utils import pdl_wait
from gptoss_serve.kernels.triton_utils import largest_divisor, pdl_args


def _split_word_f16_asm() -> str:
    """PTX: one word of four split-layout bytes ($4) -> the low nibbles' values ($0: bytes 0, 1; $1: bytes 2, 3)
    and the high nibbles' ($2, $3) as f16 pairs, each value times 2^-6 (nibble s|e1 e0|m -> e4m3 s|0 0 e1 e0|m 0 0,
    whose subnormals give 0 and 0.5 * 2^-6; cvt reads two e4m3 bytes as an f16 pair, sm_89+)."""
    lines = ["{", ".reg .b32 t, u, lo, hi;", ".reg .b16 e<4>;"] + split_bytes_e4m3_ptx("$4")
    lines += [f"cvt.rn.f16x2.e4m3x2 ${i}, e{i};" for i in range(4)]
    return "\n".join(lines + ["}"])


SPLIT_WORD_F16_ASM = gl.constexpr(_split_word_f16_asm())
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # gl.thread_barrier in Triton 3.6, gl.barrier later
_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared  # renamed after 3.6

# H200, 2026-12-04, tools/moe_mma_sweep.py (docs/PERFORMANCE.md): K ranges of up to 16 blocks (15 of K = 2880's 90:
# 6 splits) and one 64-row tile a program won; ranges of 30 blocks, 8 blocks, and two row tiles a warp (128 rows a
# program) each lost 0.7-7 us at 1-2 tokens, and row blocks of 32 pairs lost everywhere. Where moe_experts takes this
# kernel: moe_matmul.mma_decode_config.
# STAGE_ONCE: the activations staged with one load, store and barrier instead of one of each a K block (15
# dependent rounds before the first weight load, in the SASS of the kernel measured); PREFETCH (one row tile a
# program): the tile's weight loads issued before the staging, so their latency and the staging's overlap.
# H200, 2026-12-04, same sweep: STAGE_ONCE won at every size from 1 to 8 tokens (20b 1 token 41.4 -> 35.9 us,
# 2 tokens 64.6 -> 57.7, 4 tokens 107.6 -> 100.2, 8 tokens 167.5 -> 160.1; 120b 8 tokens 205.1 -> 185.2), so on;
# PREFETCH never won, so off. Nor did it with programmatic dependent launch, the second matmul's weight loads put
# before the PDL wait (its routing two launches old): H100, 2026-12-06 (tools/gpu_check.sh 25, bench MoE rows, us,
# before the wait / after) 20b 1 token 37.6 / 36.4, 2 tokens 59.0 / 58.4, 120b 1 token 37.2 / 36.5: removed.
# ASYNC_GROUPS (one row tile a program): the program's weight bytes copied into shared memory by asynchronous
# copies (cp.async, 16 bytes a thread, no registers held) issued first, in that many commit groups, the scale bytes
# loaded into registers behind them, so that all of a program's bytes are in flight at once; 0: the weights loaded
# in the loop as before (Nsight Compute, H100, 20b w1 at one token: about three K blocks ahead of use, 12.5 cycles
# stalled on the long scoreboard per issue).
# EARLY_WEIGHTS (with ASYNC_GROUPS): the second matmul's copies issued before its PDL wait, streaming while SwiGLU
# runs (register loads there lost in the fifth session, see PREFETCH above).
DEFAULT_MMA_CONFIG = dict(KB_MAX=16, M_TILES=1, ROWS_PER_PROGRAM=64, num_warps=4, STAGE_ONCE=True, PREFETCH=False,
                          ASYNC_GROUPS=int(os.environ.get("GPTOSS_MMA_ASYNC_GROUPS", "0")),
                          EARLY_WEIGHTS=os.environ.get("GPTOSS_MMA_EARLY_WEIGHTS", "0") == "1")


def byte_layout(num_warps: int, m_tiles: int) -> gl.DistributedLinearLayout:
    """Where the bytes [rows, 16] of one K block sit: the A operand's dot-operand layout (mma v2, k_width 4) of
    [rows, 32] f16 without its register basis for the high nibbles (k + 16), so that the asm's two outputs,
    joined, are that operand with no data moving. Registers: bytes 0..3 of a word, then row + 8, then further
    row tiles of the program; lanes: the word (c) and the row within 8; warps: 16-row tiles."""
    reg = [[0, 1], [0, 2], [8, 0]] + [[16 * num_warps << i, 0] for i in range(m_tiles.bit_length() - 1)]
    lane = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << i, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                      shape=[16 * num_warps * m_tiles, 16])


@gluon.jit
def _moe_mma_kernel(
    a_ptr, w_ptr, scales_ptr, ws_ptr,
    sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
    N, a_row_div, rows_per_program, first_expert, num_local_experts,
    stride_a, stride_w_expert, stride_w_row, stride_s_expert, stride_s_row, stride_s_k, stride_ws_split,
    BYTE_LAYOUT: gl.constexpr, PAIR_BLOCKS: gl.constexpr, TILE_N: gl.constexpr, EVEN_ROWS: gl.constexpr,
    KB: gl.constexpr, KB_P2: gl.constexpr, STAGE_ONCE: gl.constexpr, PREFETCH: gl.constexpr, BLOCK_T: gl.constexpr,
    M_TILES: gl.constexpr, NUM_WARPS: gl.constexpr, PDL: gl.constexpr, ASYNC_GROUPS: gl.constexpr = 0,
    EARLY_WEIGHTS: gl.constexpr = False,
):
    """Program (row block, row chunk, K range): ws[split, pairs of the block, rows of the chunk] =
    W_e[rows, K range] @ A[the block's rows, K range]^T, KB blocks a range (KB divides the K blocks).
    EARLY_WEIGHTS (with ASYNC_GROUPS and PDL): the routing or block tables read and the weights' copies issued
    before the PDL wait, so that they stream while the kernel before finishes; only for a launch whose routing and
    block tables were written two launches back or earlier (the second matmul: SwiGLU runs between)."""
    if not EARLY_WEIGHTS:
        pdl_wait(PDL)  # the routing, the block tables or the activations come from the kernel before
    ROWS: gl.constexpr = 16 * M_TILES * NUM_WARPS  # weight rows an iteration
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, 8])
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    if STAGE_ONCE:
        STAGE_L: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, NUM_WARPS], [1, 0])
    else:
        STAGE_L: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [NUM_WARPS, 1], [1, 0])
    SMEM_L: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])

    block = gl.program_id(0)
    chunk = gl.program_id(1)
    split = gl.program_id(2)
    t_s = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, STAGE_L))
    t_o = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma))
    if PAIR_BLOCKS:  # pairs one by one: row block b is pair b, its expert straight from the routing
        expert = gl.load(block_expert_ptr + block) - first_expert
        if (expert < 0) | (expert >= num_local_experts):  # routed to another rank's expert
            if EARLY_WEIGHTS:
                pdl_wait(PDL)  # every program waits before it ends (triton_utils.pdl_wait)
            return
        count = 1
        pairs_s = block + t_s * 0
        pairs_o = block + t_o * 0
    else:
        expert = gl.load(block_expert_ptr + block)
        if expert < 0:  # beyond the last row block: the grid is the static worst case
            if EARLY_WEIGHTS:
                pdl_wait(PDL)
            return
        row_start = gl.load(block_row_start_ptr + block)
        count = gl.load(block_row_end_ptr + block) - row_start
        pairs_s = gl.load(sorted_pairs_ptr + row_start + t_s, mask=t_s < count, other=0)
        pairs_o = gl.load(sorted_pairs_ptr + row_start + t_o, mask=t_o < count, other=0)
    blk_begin = split * KB
    w_expert = w_ptr + expert.to(gl.int64) * stride_w_expert + blk_begin * (16 * TILE_N)
    s_expert = scales_ptr + expert.to(gl.int64) * stride_s_expert + blk_begin * stride_s_k
    row_begin = chunk * rows_per_program
    row_end = gl.minimum(row_begin + rows_per_program, N)

    if ASYNC_GROUPS > 0:  # one row tile a program: all its weight bytes in flight before anything else
        GROUP_KB: gl.constexpr = KB_P2 // ASYNC_GROUPS  # K blocks a commit group
        w_smem = _copy_weights(w_expert, row_begin, row_end, stride_w_row, KB, KB_P2, GROUP_KB, ROWS, TILE_N,
                               NUM_WARPS)
        w_rows, s_rows, in_b, in_o = _tile_pointers(w_expert, s_expert, row_begin, row_end, stride_w_row,
                                                    stride_s_row, BYTE_LAYOUT, mma, ROWS, TILE_N)
        scale_bytes = ()
        for kb in gl.static_range(KB):
            scale_bytes = scale_bytes + (_scale_loads(s_rows, in_o, kb, stride_s_k, EVEN_ROWS),)
    if EARLY_WEIGHTS:
        pdl_wait(PDL)  # the activations come from the kernel before
    if PREFETCH:  # one row tile a program: its weight loads go out before the activations are staged
        w_rows, s_rows, in_b, in_o = _tile_pointers(w_expert, s_expert, row_begin, row_end, stride_w_row,
                                                    stride_s_row, BYTE_LAYOUT, mma, ROWS, TILE_N)
        words = ()
        scale_bytes = ()
        for kb in gl.static_range(KB):
            w_bytes, s = _block_loads(w_rows, s_rows, in_b, in_o, kb, stride_s_k, TILE_N, EVEN_ROWS)
            words = words + (w_bytes,)
            scale_bytes = scale_bytes + (s,)

    # The K range of the block's activations as f16 in shared memory, staged once.
    a_range = a_ptr + (pairs_s // a_row_div).to(gl.int64)[:, None] * stride_a + blk_begin * 32  # [BLOCK_T, 1]
    if STAGE_ONCE:  # [BLOCK_T, KB * 32] (padded to KB_P2 blocks): one load, one store, one barrier
        k_s = gl.arange(0, KB_P2 * 32, layout=gl.SliceLayout(0, STAGE_L))
        staged = gl.load(a_range + k_s[None, :], mask=(t_s < count)[:, None] & (k_s < KB * 32)[None, :], other=0.0)
        b_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_T, KB_P2 * 32], SMEM_L, staged.to(gl.float16))
    else:  # [KB, BLOCK_T, 32], a block at a time: the compiler puts a barrier after each store (SASS)
        k_s = gl.arange(0, 32, layout=gl.SliceLayout(0, STAGE_L))
        a_rows = a_range + k_s[None, :]
        a_mask = (t_s < count)[:, None] & (k_s < 32)[None, :]
        b_smem = gl.allocate_shared_memory(gl.float16, [KB, BLOCK_T, 32], SMEM_L)
        for kb in gl.static_range(KB):
            b_smem.index(kb).store(gl.load(a_rows + kb * 32, mask=a_mask, other=0.0).to(gl.float16))
    if ASYNC_GROUPS > 0:
        async_copy.wait_group(ASYNC_GROUPS - 1)  # this thread's copies of the first group landed
    _barrier()

    r_o = gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma))
    ws_cols = ws_ptr + split * stride_ws_split + pairs_o.to(gl.int64)[None, :] * N  # [1, BLOCK_T]
    for r0 in range(row_begin, row_end, ROWS):
        if not PREFETCH and ASYNC_GROUPS == 0:
            w_rows, s_rows, in_b, in_o = _tile_pointers(w_expert, s_expert, r0, row_end, stride_w_row,
                                                        stride_s_row, BYTE_LAYOUT, mma, ROWS, TILE_N)
        acc = gl.zeros([ROWS, BLOCK_T], gl.float32, mma)
        for kb in gl.static_range(KB):
            if ASYNC_GROUPS > 0:
                if kb > 0 and kb % GROUP_KB == 0:  # the next group: every thread's copies of it landed
                    async_copy.wait_group(ASYNC_GROUPS - 1 - kb // GROUP_KB)
                    _barrier()
                w_bytes = w_smem.slice(kb * ROWS, ROWS, dim=0).load(BYTE_LAYOUT)
                s = scale_bytes[kb]
            elif PREFETCH:
                w_bytes = words[kb]
                s = scale_bytes[kb]
            else:
                w_bytes, s = _block_loads(w_rows, s_rows, in_b, in_o, kb, stride_s_k, TILE_N, EVEN_ROWS)
            w = a_fragment(w_bytes, A_L, ROWS)
            if STAGE_ONCE:
                a = b_smem.slice(kb * 32, 32, dim=1).permute([1, 0]).load(B_L)  # [32, BLOCK_T]
            else:
                a = b_smem.index(kb).permute([1, 0]).load(B_L)
            part = mma_v2(w, a, gl.zeros([ROWS, BLOCK_T], gl.float32, mma))
            acc = acc + part * gl.expand_dims(block_scale(s), 1)
        out = ws_cols + (r0 + r_o)[:, None]
        gl.store(out, acc, mask=(r0 + r_o < row_end)[:, None] & (t_o < count)[None, :])


@gluon.jit
def a_fragment(w_bytes, A_L: gl.constexpr, ROWS: gl.constexpr):
    """One K block's split-layout bytes [ROWS, 16] (byte_layout) -> the mma A operand [ROWS, 32] f16 in element
    order (byte j holds elements j and j + 16), each value the weight's FP4 value times 2^-6: one asm a word."""
    low, high = gl.inline_asm_elementwise(SPLIT_WORD_F16_ASM, "=r,=r,=r,=r,r", [w_bytes],
                                          dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
    w = gl.reshape(gl.permute(gl.join(low, high), [0, 2, 1]), [ROWS, 32])
    return gl.convert_layout(w, A_L, assert_trivial=True)  # no data moves (checked at compile time)


@gluon.jit
def block_scale(s):
    """Scale bytes -> float32 2^(s - 121): the E8M0 scale times the 2^6 the e4m3-decoded values lack."""
    return ((s.to(gl.int32) + 6) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _copy_weights(w_expert, row_begin, row_end, stride_w_row, KB: gl.constexpr, KB_P2: gl.constexpr,
                  GROUP_KB: gl.constexpr, ROWS: gl.constexpr, TILE_N: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Asynchronous copies of the K blocks 0..KB of weight rows row_begin.. (ROWS of them) into shared memory
    [KB_P2 * ROWS, 16] (block kb's rows at kb * ROWS), a row's 16 bytes a thread, GROUP_KB blocks a commit group;
    rows past row_end and blocks past KB are zero-filled. Returns the buffer."""
    COPY_L: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [NUM_WARPS, 1], [1, 0])
    # Unswizzled: a warp's 4-byte reads of BYTE_LAYOUT (8 rows x 16 bytes) fall in 32 distinct banks.
    w_smem = gl.allocate_shared_memory(gl.uint8, [KB_P2 * ROWS, 16],
                                       gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    q = gl.arange(0, GROUP_KB * ROWS, layout=gl.SliceLayout(1, COPY_L))  # block-in-group * ROWS + row
    j = gl.arange(0, 16, layout=gl.SliceLayout(0, COPY_L))
    n = row_begin + q % ROWS
    if TILE_N == 1:
        rows = w_expert + n.to(gl.int64)[:, None] * stride_w_row + ((q // ROWS) * 16)[:, None] + j[None, :]
    else:  # `tile_rows`: TILE_N rows' block k side by side, then block k + 1
        rows = w_expert + (n // TILE_N).to(gl.int64)[:, None] * (stride_w_row * TILE_N) \
            + ((q // ROWS) * (16 * TILE_N) + (n % TILE_N) * 16)[:, None] + j[None, :]
    for g in gl.static_range(KB_P2 // GROUP_KB):
        in_w = ((n < row_end) & (g * GROUP_KB + q // ROWS < KB))[:, None] & (j < 16)[None, :]
        _async_load(w_smem.slice(g * GROUP_KB * ROWS, GROUP_KB * ROWS, dim=0), rows + g * GROUP_KB * (16 * TILE_N),
                    mask=in_w)
        async_copy.commit_group()
    return w_smem


@gluon.jit
def _tile_pointers(w_expert, s_expert, r0, row_end, stride_w_row, stride_s_row, BYTE_LAYOUT: gl.constexpr,
                   MMA_LAYOUT: gl.constexpr, ROWS: gl.constexpr, TILE_N: gl.constexpr):
    """Pointers to the first K block's bytes [ROWS, 16] (BYTE_LAYOUT) and scale bytes [ROWS] (rows of MMA_LAYOUT)
    of weight rows r0.., and which of those rows are below row_end."""
    r_b = gl.arange(0, ROWS, layout=gl.SliceLayout(1, BYTE_LAYOUT))
    j_b = gl.arange(0, 16, layout=gl.SliceLayout(0, BYTE_LAYOUT))
    r_o = gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA_LAYOUT))
    n_b = r0 + r_b
    if TILE_N == 1:  # rows of K / 32 blocks one after the other
        w_rows = w_expert + n_b.to(gl.int64)[:, None] * stride_w_row + j_b[None, :]
    else:  # `tile_rows`: TILE_N rows' block k side by side, then block k + 1
        w_rows = w_expert + (n_b // TILE_N).to(gl.int64)[:, None] * (stride_w_row * TILE_N) \
            + (n_b % TILE_N)[:, None] * 16 + j_b[None, :]
    s_rows = s_expert + (r0 + r_o).to(gl.int64) * stride_s_row
    return w_rows, s_rows, (n_b < row_end)[:, None] & (j_b < 16)[None, :], r0 + r_o < row_end


@gluon.jit
def _block_loads(w_rows, s_rows, in_b, in_o, kb: gl.constexpr, stride_s_k, TILE_N: gl.constexpr,
                 EVEN_ROWS: gl.constexpr):
    """K block kb's bytes [ROWS, 16] uint8 and scale bytes [ROWS] of the tile of _tile_pointers."""
    if EVEN_ROWS:
        w_bytes = gl.load(w_rows + kb * (16 * TILE_N))
    else:
        w_bytes = gl.load(w_rows + kb * (16 * TILE_N), mask=in_b, other=0)
    return w_bytes, _scale_loads(s_rows, in_o, kb, stride_s_k, EVEN_ROWS)


@gluon.jit
def _scale_loads(s_rows, in_o, kb: gl.constexpr, stride_s_k, EVEN_ROWS: gl.constexpr):
    """K block kb's scale bytes [ROWS] of the tile of _tile_pointers."""
    if EVEN_ROWS:
        return gl.load(s_rows + kb * stride_s_k)
    return gl.load(s_rows + kb * stride_s_k, mask=in_o, other=0)


def moe_mma_splitk(
    a: torch.Tensor,  # [rows, K] bf16: token rows (a_row_div = top_k) or pair rows (a_row_div = 1)
    blocks: torch.Tensor,  # [num_local_experts, N, K / 32, 16] uint8, split-nibble layout (maybe tiled rows)
    scales: torch.Tensor,  # [num_local_experts, N, K / 32] uint8, any strides
    a_row_div: int,
    num_pairs: int,
    config: dict,
    tile_n: int = 1,
    groups: ExpertGroups | None = None,  # row blocks of pairs by expert (BLOCK_T pairs at most)
    pair_blocks: tuple[torch.Tensor, int] | None = None,  # (expert ids [num_pairs], first_expert): pairs one by one
    early_weights: bool = False,  # the routing / groups written two launches back or earlier (EARLY_WEIGHTS)
) -> torch.Tensor:  # [splits, num_pairs, N] float32 partial sums by pair index (rows of other ranks' pairs unset)
    config = dict(DEFAULT_MMA_CONFIG, **config)
    num_local_experts, n_rows, num_k_blocks = check_decode_operands(a, blocks, tile_n)
    kb = largest_divisor(num_k_blocks, config["KB_MAX"])  # every program's K range whole
    num_warps, m_tiles = config["num_warps"], config["M_TILES"]
    rows = 16 * num_warps * m_tiles
    rows_per_program = max(rows, config["ROWS_PER_PROGRAM"] // rows * rows)
    if (config["PREFETCH"] or config["ASYNC_GROUPS"]) and rows_per_program != rows:
        raise ValueError(f"PREFETCH and ASYNC_GROUPS load a program's one row tile early: ROWS_PER_PROGRAM must be "
                         f"{rows}")
    if config["PREFETCH"] and config["ASYNC_GROUPS"]:
        raise ValueError("PREFETCH and ASYNC_GROUPS are two ways to load the weights early: one at most")
    if early_weights and not config["ASYNC_GROUPS"]:
        raise ValueError("early_weights issues the ASYNC_GROUPS copies before the PDL wait: it needs ASYNC_GROUPS")
    kb_p2 = triton.next_power_of_2(kb)
    if config["ASYNC_GROUPS"] and kb_p2 % config["ASYNC_GROUPS"]:
        raise ValueError(f"ASYNC_GROUPS must divide the {kb_p2} K blocks (padded) a program")
    if not a.is_cuda:
        raise ValueError("the tensor-core decode kernel (Gluon) runs on CUDA tensors only: no interpreter runs it")
    splits = num_k_blocks // kb
    ws = torch.empty((splits, max(num_pairs, 1), n_rows), dtype=torch.float32, device=a.device)
    if pair_blocks is not None:
        ids, first_expert = pair_blocks
        table, num_blocks, block_t = (ids, ids, ids, ids), num_pairs, 8
    else:
        first_expert = 0
        table = (groups.sorted_pairs, groups.block_expert, groups.block_row_start, groups.block_row_end)
        num_blocks, block_t = groups.block_expert.numel(), max(8, config["BLOCK_T"])
    grid = (num_blocks, triton.cdiv(n_rows, rows_per_program), splits)
    _moe_mma_kernel[grid](
        a, blocks, scales, ws, *table,
        n_rows, a_row_div, rows_per_program, first_expert, num_local_experts,
        a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), scales.stride(2),
        ws.stride(0),
        BYTE_LAYOUT=byte_layout(num_warps, m_tiles), PAIR_BLOCKS=pair_blocks is not None, TILE_N=tile_n,
        EVEN_ROWS=n_rows % rows_per_program == 0, KB=kb, KB_P2=kb_p2,
        STAGE_ONCE=config["STAGE_ONCE"], PREFETCH=config["PREFETCH"], BLOCK_T=block_t, M_TILES=m_tiles,
        NUM_WARPS=num_warps, ASYNC_GROUPS=config["ASYNC_GROUPS"], EARLY_WEIGHTS=early_weights, num_warps=num_warps,
        **pdl_args(a.device))
    return ws
