"""The front of the attention sub-block in one launch (Triton): residual add, RMSNorm, the qkv projection with
its bias, rotary embedding on q and k, and k and v written to the paged cache. The twin of
attention_front_ref.norm_qkv_rope_ref.

Composed, that front is three launches a layer (rmsnorm, cuBLAS's qkv matmul, rope_and_cache_write) plus a
normed row written and read back; at one token on an H200 (docs/PERFORMANCE.md, engine profile of 2026-12-02)
2.5 + 10.5 + 4.2 us a layer, of which only the matmul's 29.5 MB of weights (20b) are real work.

A tile is a block of tokens and ROWS rotary pairs of one head: rows d0 .. d0 + ROWS - 1 of the head and their
partners HALF later, so that the rotation needs nothing from another tile. A tile's K is split into SPLITS
ranges of whole BLOCK_K chunks, a program each, so that a one-token step has enough programs to keep the
memory busy (20b: 160 tiles x 4 splits). A program issues its first two chunks of weights, sums the new residual
rows' squares over all of K (the norm needs the whole row; the rows come from L2), then walks its K range:
normalizes each chunk as rmsnorm does (same roundings of the sum and of the normed values) and takes two
tensor-core dots, one per half, loading the weights two chunks ahead meanwhile. With one split it finishes the tile
itself; with several it stores its float32 partial sums and counts its arrival on the tile's counter, and the
program that arrives last adds the partials in split order (so results do not depend on arrival order), resets
the counter and finishes the tile. Finishing adds the bias, rounds as nn.Linear's output is rounded, and for a
q head rotates and writes q; for a k head rotates and writes the cache slot; for a v head writes the cache
slot. The programs of the first tile of each token block (head 0's first ROWS pairs) write the new residual
rows, each its K range. The normed rows are never written: nothing else reads them.

The mean square is summed in chunks, not over the whole row at once as the rmsnorm kernel does, so a normed
value can differ from that kernel's in the last bit now and then; the torch twin is the reference for both.

Every split re-reads the token block's rows for the norm, so splits are fewer as steps grow (pick_num_splits);
larger steps run the composed path, whose matmul reads each weight once for all tokens.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gptoss_serve.kernels.attention_front_ref import split_qkv
from gptoss_serve.kernels.rmsnorm import rmsnorm
from gptoss_serve.kernels.rope import rope_and_cache_write
from gptoss_serve.kernels.triton_utils import (arrival_counters, cast_rne, device_function, emulate_bf16, launch,
                                              next_pow2)

# Steps of up to this many tokens (one block of them) take the fused kernel; GPTOSS_FUSED_ATTN_FRONT_MAX_TOKENS
# sets it for a process. Off (0) by default: it still loses. On an H100 (2026-12-06, `python3 -m
# gptoss_serve.kernels.bench --sections attention-front`) the one-program-a-tile version took 30.9 / 31.2 / 57.3
# us at 1 / 8 / 64 tokens of 20b against 22.9 / 22.9 / 24.0 composed; split over K it took 26.1 / 30.4 / 45.1 /
# 75.5 us at 1 / 8 / 16 / 64 tokens (4, 4, 2, 1 splits) against 22.1 / 23.0 / 23.6 / 24.2, and 28.4 / 36.3 us
# at 1 / 8 tokens with 8 splits. Turn it on (set this to N) only when that bench shows the default-split fused
# row faster than the composed path at N tokens and at every smaller size it times.
FUSED_MAX_TOKENS = int(os.environ.get("GPTOSS_FUSED_ATTN_FRONT_MAX_TOKENS", "0"))
ROWS = 16  # rotary pairs a tile: 32 weight rows (the dot's N side is ROWS, at least 16 for tensor cores)
BLOCK_K = 64
# Splits of K a tile: about TARGET_PROGRAMS programs at one token (~5 a multiprocessor on a 132-SM H100 or
# H200, all resident at once), at most MAX_SPLITS, each at least MIN_CHUNKS_PER_SPLIT chunks (below that a
# program's norm pass outweighs its share of weights), and splits x tokens at most NORM_READS_PER_TILE (each split
# re-reads the block's h and residual rows from L2 for the norm: at 16 tokens of 20b, 4 splits would read 4x the
# weights' bytes that way).
TARGET_PROGRAMS = 640
MAX_SPLITS = 8
MIN_CHUNKS_PER_SPLIT = 4
NORM_READS_PER_TILE = 32
# The norm pass reads [NORM_M, NORM_K] chunks of NORM_ELEMENTS: NORM_M the block's real tokens (a power of 2), so
# that at one token it takes a third of the row at once rather than a 16-row block of which 15 are masked.
NORM_ELEMENTS = 1024
# Registers a thread at 16-token blocks split over K: 5 programs of 4 warps fit a multiprocessor (5 x 128 x 96 <=
# 64K); the compiler left alone takes 98, which fits 4. At 96, tools/kernel_sass.py front (Triton 3.9) shows only
# the 32-byte stack of sin and cos's slow path, as uncapped; Triton 3.6 on an H200 reported 8-10 bytes of spills.
MAX_REGISTERS_SPLIT_16 = 96
def pick_num_splits(num_tiles: int, num_tokens: int, num_chunks: int) -> int:
    """Splits of K a tile, from shapes alone (so CUDA graphs capture it); see TARGET_PROGRAMS."""
    by_programs = TARGET_PROGRAMS // num_tiles
    by_norm_reads = NORM_READS_PER_TILE // num_tokens
    by_chunks = num_chunks // MIN_CHUNKS_PER_SPLIT
    return max(1, min(MAX_SPLITS, by_programs, by_norm_reads, by_chunks))


def fused_tiling(num_tokens: int, hidden: int, num_tiles_n: int, num_splits: int | None = None) -> dict:
    """The kernel's tiling constexprs for a step of num_tokens (num_tiles_n tiles a token block): BLOCK_M,
    BLOCK_K, NORM_M, NORM_K, CHUNKS_PER_SPLIT and SPLITS (num_splits, or pick_num_splits's, cut so that none is
    empty)."""
    block_m = min(64, max(16, next_pow2(num_tokens)))
    block_k = min(BLOCK_K, next_pow2(hidden))
    num_chunks = triton.cdiv(hidden, block_k)
    if num_splits is None:
        num_splits = pick_num_splits(triton.cdiv(num_tokens, block_m) * num_tiles_n, min(num_tokens, block_m),
                                     num_chunks)
    chunks_per_split = triton.cdiv(num_chunks, min(num_splits, num_chunks))
    norm_m = min(block_m, next_pow2(num_tokens))
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, NORM_M=norm_m,
                NORM_K=min(max(block_k, NORM_ELEMENTS // norm_m), next_pow2(hidden)),
                CHUNKS_PER_SPLIT=chunks_per_split, SPLITS=triton.cdiv(num_chunks, chunks_per_split))


def max_registers(tiling: dict) -> int | None:
    """The launch's register cap a thread for fused_tiling's tiling: MAX_REGISTERS_SPLIT_16 or none."""
    return MAX_REGISTERS_SPLIT_16 if tiling["BLOCK_M"] == 16 and tiling["SPLITS"] > 1 else None


@device_function
def _finish_tile(
    acc1, acc2, rows, dims, head, tokens, in_tokens,
    b_ptr, positions_ptr, inv_freq_ptr, slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    num_q_heads, num_kv_heads, stride_cache_block, stride_cache_slot, stride_cache_head, block_size, concentration,
    HEAD_DIM: tl.constexpr, ACT: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """From a tile's float32 dot sums acc1 and acc2 ([BLOCK_M, ROWS], the first and second halves' rows): the
    projection's output as nn.Linear gives it (sums plus the bias, rounded to ACT), rotated for q and k heads
    (NeoX halves, angles in float32), stored to q_out or the cache slots."""
    HALF: tl.constexpr = HEAD_DIM // 2
    y1 = cast_rne(acc1 + tl.load(b_ptr + rows).to(tl.float32)[None, :], ACT, EMULATE_BF16).to(tl.float32)
    y2 = cast_rne(acc2 + tl.load(b_ptr + rows + HALF).to(tl.float32)[None, :], ACT, EMULATE_BF16).to(tl.float32)
    slots = tl.load(slots_ptr + tokens, mask=in_tokens, other=-1).to(tl.int64)
    stores = (in_tokens & (slots >= 0))[:, None]  # a negative slot: don't store this token
    cache_rows = (slots // block_size) * stride_cache_block + (slots % block_size) * stride_cache_slot
    if head < num_q_heads + num_kv_heads:  # q or k: rotate
        position = tl.load(positions_ptr + tokens, mask=in_tokens, other=0).to(tl.float32)
        angle = position[:, None] * tl.load(inv_freq_ptr + dims)[None, :]  # [BLOCK_M, ROWS]
        cos = tl.cos(angle) * concentration
        sin = tl.sin(angle) * concentration
        rot1 = cast_rne(y1 * cos - y2 * sin, ACT, EMULATE_BF16)
        rot2 = cast_rne(y2 * cos + y1 * sin, ACT, EMULATE_BF16)
        if head < num_q_heads:
            q_rows = q_out_ptr + (tokens.to(tl.int64)[:, None] * num_q_heads + head) * HEAD_DIM
            tl.store(q_rows + dims[None, :], rot1, mask=in_tokens[:, None])
            tl.store(q_rows + HALF + dims[None, :], rot2, mask=in_tokens[:, None])
        else:
            at = k_cache_ptr + (cache_rows + (head - num_q_heads) * stride_cache_head)[:, None] + dims[None, :]
            tl.store(at, rot1.to(k_cache_ptr.dtype.element_ty), mask=stores)
            tl.store(at + HALF, rot2.to(k_cache_ptr.dtype.element_ty), mask=stores)
    else:  # v: as projected
        kv_head = head - num_q_heads - num_kv_heads
        at = v_cache_ptr + (cache_rows + kv_head * stride_cache_head)[:, None] + dims[None, :]
        tl.store(at, y1.to(v_cache_ptr.dtype.element_ty), mask=stores)
        tl.store(at + HALF, y2.to(v_cache_ptr.dtype.element_ty), mask=stores)


@device_function
def _load_weights(w1_rows, w2_rows, k, k_end, EMULATE_BF16: tl.constexpr):
    """Weights [BLOCK_K, ROWS] of both halves at K positions k ([BLOCK_K]) below k_end, zeros past it; as float32
    under EMULATE_BF16, the interpreter's dot operands."""
    in_k = (k < k_end)[:, None]
    w1 = tl.load(w1_rows + k[:, None], mask=in_k, other=0.0)
    w2 = tl.load(w2_rows + k[:, None], mask=in_k, other=0.0)
    if EMULATE_BF16:
        w1, w2 = w1.to(tl.float32), w2.to(tl.float32)
    return w1, w2


@triton.jit(do_not_specialize=["num_tokens"])
def _norm_qkv_rope_kernel(
    h_ptr, residual_ptr, norm_scale_ptr, w_ptr, b_ptr, positions_ptr, inv_freq_ptr, slots_ptr,
    q_out_ptr, residual_out_ptr, k_cache_ptr, v_cache_ptr, partials_ptr, arrivals_ptr,
    num_tokens, num_q_heads, num_kv_heads, stride_h, stride_residual, stride_residual_out, stride_w,
    stride_cache_block, stride_cache_slot, stride_cache_head, block_size, eps, concentration,
    HIDDEN: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, NORM_M: tl.constexpr, NORM_K: tl.constexpr, CHUNKS_PER_SPLIT: tl.constexpr,
    SPLITS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """Program (token block, tile of ROWS pairs, split of K). partials_ptr: float32 [SPLITS, token blocks x
    tiles, BLOCK_M, 2 * ROWS], arrivals_ptr: int32 zeros [token blocks x tiles] (both unused with one split).
    Under EMULATE_BF16 (the interpreter) the dots take float32 operands: the interpreter computes bf16 dots
    wrongly (triton issue 11584)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    PARTS: tl.constexpr = HALF // ROWS
    act = w_ptr.dtype.element_ty  # nn.Linear's output dtype
    pid_n = tl.program_id(1)
    head = pid_n // PARTS
    dims = (pid_n % PARTS) * ROWS + tl.arange(0, ROWS)  # [ROWS], positions within the first half
    rows = head * HEAD_DIM + dims  # their weight rows; the partners are rows + HALF
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_tokens = tokens < num_tokens
    h_rows = h_ptr + tokens.to(tl.int64)[:, None] * stride_h
    r_rows = residual_ptr + tokens.to(tl.int64)[:, None] * stride_residual
    ks = tl.arange(0, BLOCK_K)
    w1_rows = w_ptr + rows[None, :].to(tl.int64) * stride_w  # [1, ROWS]
    w2_rows = w1_rows + HALF * stride_w
    split_k0 = tl.program_id(2) * (CHUNKS_PER_SPLIT * BLOCK_K)
    split_k_end = tl.minimum(split_k0 + CHUNKS_PER_SPLIT * BLOCK_K, HIDDEN)

    # The first two chunks' weights [BLOCK_K, ROWS] are on their way from memory while the norm pass runs.
    w1, w2 = _load_weights(w1_rows, w2_rows, split_k0 + ks, split_k_end, EMULATE_BF16)
    w1_next, w2_next = _load_weights(w1_rows, w2_rows, split_k0 + BLOCK_K + ks, split_k_end, EMULATE_BF16)

    # Pass 1: the mean square of each new residual row over all of K, in [NORM_M, NORM_K] chunks: as few
    # chunks as the block's real tokens allow (at one token, 1024 of a row at once), each a short wait on L2.
    norm_tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, NORM_M)
    in_norm_tokens = norm_tokens < num_tokens
    squares = tl.zeros([NORM_M, NORM_K], dtype=tl.float32)
    for k0 in tl.range(0, HIDDEN, NORM_K, num_stages=3):
        k = k0 + tl.arange(0, NORM_K)
        mask = in_norm_tokens[:, None] & (k < HIDDEN)[None, :]
        s = tl.load(h_ptr + norm_tokens.to(tl.int64)[:, None] * stride_h + k[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_RESIDUAL:  # rounded to the activations' dtype, as the reference's add
            r = tl.load(residual_ptr + norm_tokens.to(tl.int64)[:, None] * stride_residual + k[None, :], mask=mask,
                        other=0.0)
            s = cast_rne(s + r.to(tl.float32), residual_out_ptr.dtype.element_ty, EMULATE_BF16).to(tl.float32)
        squares += s * s
    inv_rms_norm = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / HIDDEN + eps)  # [NORM_M]
    same_token = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, NORM_M)[None, :]
    inv_rms = tl.sum(tl.where(same_token, inv_rms_norm[None, :], 0.0), axis=1)  # [BLOCK_M], 0 past NORM_M

    # Pass 2: over this split's K range, normalize each chunk and multiply it by the tile's rows of both halves.
    acc1 = tl.zeros([BLOCK_M, ROWS], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, ROWS], dtype=tl.float32)
    writes_residual = in_tokens & (tokens * 0 + pid_n == 0)  # a vector mask: the interpreter wants one
    for c in tl.range(0, CHUNKS_PER_SPLIT, num_stages=1):  # pipelined by hand: two chunks ahead load meanwhile
        k = split_k0 + c * BLOCK_K + ks
        in_k = k < split_k_end
        w1_after, w2_after = _load_weights(w1_rows, w2_rows, k + 2 * BLOCK_K, split_k_end, EMULATE_BF16)
        mask = in_tokens[:, None] & in_k[None, :]
        s = tl.load(h_rows + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s = cast_rne(s + tl.load(r_rows + k[None, :], mask=mask, other=0.0).to(tl.float32),
                         residual_out_ptr.dtype.element_ty, EMULATE_BF16)
            tl.store(residual_out_ptr + tokens.to(tl.int64)[:, None] * stride_residual_out + k[None, :], s,
                     mask=writes_residual[:, None] & in_k[None, :])
            s = s.to(tl.float32)
        scale = tl.load(norm_scale_ptr + k, mask=in_k, other=0.0).to(tl.float32)
        x = cast_rne(s * inv_rms[:, None] * scale[None, :], act, EMULATE_BF16)  # [BLOCK_M, BLOCK_K]
        if EMULATE_BF16:
            x = x.to(tl.float32)
        # "ieee": float32 operands (a float32 model) multiply in full precision, as F.linear does, not as tf32;
        # bf16 operands take the tensor cores either way.
        acc1 = tl.dot(x, w1, acc1, input_precision="ieee")
        acc2 = tl.dot(x, w2, acc2, input_precision="ieee")
        w1, w2, w1_next, w2_next = w1_next, w2_next, w1_after, w2_after

    if SPLITS == 1:
        _finish_tile(acc1, acc2, rows, dims, head, tokens, in_tokens, b_ptr, positions_ptr, inv_freq_ptr, slots_ptr,
                     q_out_ptr, k_cache_ptr, v_cache_ptr, num_q_heads, num_kv_heads, stride_cache_block,
                     stride_cache_slot, stride_cache_head, block_size, concentration, HEAD_DIM, act, EMULATE_BF16)
    else:
        tile = tl.program_id(0) * tl.num_programs(1) + pid_n
        split_stride = tl.num_programs(0) * tl.num_programs(1) * (BLOCK_M * 2 * ROWS)
        partials = (partials_ptr + (tile * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * (2 * ROWS)
                    + tl.arange(0, ROWS)[None, :])  # [BLOCK_M, ROWS], split 0's first half
        mine = partials + tl.program_id(2) * split_stride
        tl.store(mine, acc1, mask=in_tokens[:, None])
        tl.store(mine + ROWS, acc2, mask=in_tokens[:, None])
        tl.debug_barrier()  # every thread's partials stored before the one atomic releases them
        arrived_before = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel")
        if arrived_before == SPLITS - 1:  # the last of the tile's splits
            acc1 = tl.zeros([BLOCK_M, ROWS], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, ROWS], dtype=tl.float32)
            for split in tl.static_range(SPLITS):  # in split order, whichever arrived last
                # ".cg": from L2, where the other programs' partials are, not from a stale L1 line
                acc1 += tl.load(partials + split * split_stride, mask=in_tokens[:, None], other=0.0,
                                cache_modifier=".cg")
                acc2 += tl.load(partials + split * split_stride + ROWS, mask=in_tokens[:, None], other=0.0,
                                cache_modifier=".cg")
            tl.store(arrivals_ptr + tile, 0)  # zero for the next launch
            _finish_tile(acc1, acc2, rows, dims, head, tokens, in_tokens, b_ptr, positions_ptr, inv_freq_ptr,
                         slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, num_q_heads, num_kv_heads,
                         stride_cache_block, stride_cache_slot, stride_cache_head, block_size, concentration,
                         HEAD_DIM, act, EMULATE_BF16)


def norm_qkv_rope(
    h: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden]; None in layer 0
    norm_scale: torch.Tensor,  # [hidden] float32
    eps: float,
    qkv_weight: torch.Tensor,  # [(num_q_heads + 2 * num_kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor,  # [(num_q_heads + 2 * num_kv_heads) * head_dim]
    num_q_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,  # [num_tokens] int
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
    concentration: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative = don't store
    max_fused_tokens: int | None = None,  # None: FUSED_MAX_TOKENS
    num_splits: int | None = None,  # splits of K a tile; None: pick_num_splits (tests and the bench set it)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q rotated [num_tokens, num_q_heads, head_dim], residual_out), as norm_qkv_rope_ref. The fused kernel
    takes steps of up to max_fused_tokens tokens whose heads split into whole blocks of ROWS pairs (head_dim a
    multiple of 32); the rest run rmsnorm, the matmul and rope_and_cache_write. Chosen from shapes alone, so
    CUDA graphs capture it."""
    num_tokens, hidden = h.shape
    head_dim = qkv_weight.shape[0] // (num_q_heads + 2 * num_kv_heads)
    limit = FUSED_MAX_TOKENS if max_fused_tokens is None else max_fused_tokens
    if num_tokens > limit or (head_dim // 2) % ROWS:
        normed, residual_out = rmsnorm(h, norm_scale, eps, residual)
        q, k, v = split_qkv(F.linear(normed, qkv_weight, qkv_bias), num_q_heads, num_kv_heads)
        q_rot, _ = rope_and_cache_write(q, k, v, positions, inv_freq, concentration, k_cache, v_cache,
                                        slot_mapping)
        return q_rot, residual_out
    if h.stride(1) != 1 or (residual is not None and residual.stride(1) != 1) or qkv_weight.stride(1) != 1:
        raise ValueError("norm_qkv_rope needs rows with unit column stride (activations and qkv weight)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k and v caches must share one layout with head_dim contiguous")
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=h.dtype, device=h.device)
    residual_out = torch.empty_like(h) if residual is not None else h
    if num_tokens == 0:
        return q_out, residual_out
    num_tiles_n = (num_q_heads + 2 * num_kv_heads) * (head_dim // 2 // ROWS)
    tiling = fused_tiling(num_tokens, hidden, num_tiles_n, num_splits)
    block_m, num_splits = tiling["BLOCK_M"], tiling["SPLITS"]
    num_tiles = triton.cdiv(num_tokens, block_m) * num_tiles_n
    if num_splits > 1:
        partials = torch.empty((num_splits, num_tiles, block_m, 2 * ROWS), dtype=torch.float32, device=h.device)
        arrivals = arrival_counters("attention_front", num_tiles, h.device)
    else:  # unused by the kernel
        partials, arrivals = q_out, q_out
    launch(_norm_qkv_rope_kernel, (num_tiles // num_tiles_n, num_tiles_n, num_splits),
           h, residual if residual is not None else h, norm_scale, qkv_weight, qkv_bias, positions, inv_freq,
           slot_mapping, q_out, residual_out, k_cache, v_cache, partials, arrivals,
           num_tokens, num_q_heads, num_kv_heads, h.stride(0),
           residual.stride(0) if residual is not None else h.stride(0), residual_out.stride(0),
           qkv_weight.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[1],
           eps, float(concentration),
           HIDDEN=hidden, HEAD_DIM=head_dim, ROWS=ROWS, **tiling, HAS_RESIDUAL=residual is not None,
           EMULATE_BF16=emulate_bf16(), num_warps=4, maxnreg=max_registers(tiling))
    return q_out, residual_out
