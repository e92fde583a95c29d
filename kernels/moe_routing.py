"""MoE routing (Triton): top-k experts per token, and the grouping of (token, slot) pairs by expert.

`route` is the twin of moe_ref.route_ref. `group_by_expert` is what the expert matmuls need: the pairs routed
to this rank's experts, sorted by expert (stable), cut into row blocks of BLOCK_M rows that never straddle two
experts. Everything stays on the device with sizes fixed by the number of tokens, so it can be captured in a
CUDA graph: the number of blocks is bounded by the static worst case and unused blocks are marked -1. A few
pairs are grouped by one program; more (GROUPING_MIN_CHUNKS chunks) by a program a chunk in three launches.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.triton_utils import device_function, launch, next_pow2, pdl_args, pdl_wait


@device_function
def topk_softmax(logits, experts, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_EXPERTS: tl.constexpr):
    """logits [T, BLOCK_EXPERTS] float32 (-inf beyond the real experts), experts = arange(BLOCK_EXPERTS) ->
    (weights [T, BLOCK_K] float32, ids [T, BLOCK_K] int32): the k largest logits, best first, ties to the lower
    expert id, and a softmax over just those k; slots from TOP_K on hold junk, the caller masks them."""
    slots = tl.arange(0, BLOCK_K)[None, :]
    top_values = tl.full([logits.shape[0], BLOCK_K], float("-inf"), dtype=tl.float32)
    top_ids = tl.zeros([logits.shape[0], BLOCK_K], dtype=tl.int32)
    remaining = logits
    for slot in tl.static_range(TOP_K):
        value = tl.max(remaining, axis=1)
        expert = tl.min(tl.where(remaining == value[:, None], experts[None, :], BLOCK_EXPERTS), axis=1)
        top_values = tl.where(slots == slot, value[:, None], top_values)
        top_ids = tl.where(slots == slot, expert[:, None], top_ids)
        remaining = tl.where(experts[None, :] == expert[:, None], float("-inf"), remaining)
    # Softmax over just those k values (slot 0 holds the largest).
    best = tl.max(top_values, axis=1)
    p = tl.where(slots < TOP_K, tl.exp(top_values - best[:, None]), 0.0)
    return p / tl.sum(p, axis=1)[:, None], top_ids


@triton.jit(do_not_specialize=["num_tokens"])
def _topk_softmax_kernel(
    logits_ptr, weights_ptr, ids_ptr, counts_ptr, counted_ptr, num_tokens, num_experts, stride_logits,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_EXPERTS: tl.constexpr,
    COUNT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)  # the logits come from the kernel before
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    experts = tl.arange(0, BLOCK_EXPERTS)
    in_tokens = tokens < num_tokens
    mask = in_tokens[:, None] & (experts[None, :] < num_experts)
    logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * stride_logits + experts[None, :],
                     mask=mask, other=float("-inf")).to(tl.float32)  # [BLOCK_TOKENS, BLOCK_EXPERTS]
    weights, top_ids = topk_softmax(logits, experts, TOP_K, BLOCK_K, BLOCK_EXPERTS)
    slots = tl.arange(0, BLOCK_K)[None, :]
    out_mask = in_tokens[:, None] & (slots < TOP_K)
    offsets = tokens[:, None] * TOP_K + slots
    tl.store(weights_ptr + offsets, weights, mask=out_mask)
    tl.store(ids_ptr + offsets, top_ids, mask=out_mask)
    if COUNT:  # the expert load: each token's k experts (distinct) gain its `counted` value
        counted = tl.load(counted_ptr + tokens, mask=in_tokens, other=0)
        tl.atomic_add(counts_ptr + top_ids, tl.zeros([BLOCK_TOKENS, BLOCK_K], dtype=tl.int64) + counted[:, None],
                      mask=out_mask)


def route(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
    expert_counts: torch.Tensor | None = None,  # [num_experts] int64, added to in place when given
    counted: torch.Tensor | None = None,  # [num_tokens] int64: 1 for tokens that count, 0 for padding rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights [num_tokens, top_k] float32, expert_ids [num_tokens, top_k] int32), best first; with
    expert_counts, also adds each token's `counted` to its experts' counts (moe_router_ref.count_routed_pairs)."""
    num_tokens, num_experts = router_logits.shape
    count = expert_counts is not None
    if count and (counted is None or expert_counts.dtype != torch.int64 or counted.dtype != torch.int64):
        raise ValueError("expert_counts and counted must both be int64 tensors")
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    expert_ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, expert_ids
    block_experts = next_pow2(num_experts)
    block_tokens = max(1, min(64, 4096 // block_experts))
    launch(_topk_softmax_kernel, (triton.cdiv(num_tokens, block_tokens),),
           router_logits, weights, expert_ids, expert_counts if count else expert_ids,
           counted if count else expert_ids, num_tokens, num_experts, router_logits.stride(0),
           TOP_K=top_k, BLOCK_K=next_pow2(top_k), BLOCK_TOKENS=block_tokens, BLOCK_EXPERTS=block_experts,
           COUNT=count, num_warps=4, **pdl_args(router_logits.device))
    return weights, expert_ids


@device_function
def _write_block_table(expert_ptr, row_start_ptr, row_end_ptr, blocks, first_row, end_row, experts, max_blocks,
                       BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One block table: blocks [BLOCK_EXPERTS] of each expert, cut from its rows [first_row, end_row) in blocks
    of BLOCK_M (the last one shorter); entries max_blocks, those beyond the last block marked expert -1 (rows 0).
    Each expert writes its own entries, its j-th block in pass j (as many passes as the busiest expert has
    blocks), then the unused entries CHUNK at a time: no search of an entry's expert."""
    block_start = tl.cumsum(blocks, axis=0) - blocks  # [BLOCK_EXPERTS] each expert's first entry
    num_blocks = tl.sum(blocks, axis=0)
    for j in range(0, tl.max(blocks, axis=0)):
        b = block_start + j
        mine = (j < blocks) & (b < max_blocks)
        start_row = first_row + j * BLOCK_M
        tl.store(expert_ptr + b, experts, mask=mine)
        tl.store(row_start_ptr + b, start_row, mask=mine)
        tl.store(row_end_ptr + b, tl.minimum(start_row + BLOCK_M, end_row), mask=mine)
    for start in range(num_blocks, max_blocks, CHUNK):
        b = start + tl.arange(0, CHUNK)
        unused = b < max_blocks
        tl.store(expert_ptr + b, tl.full([CHUNK], -1, tl.int32), mask=unused)
        tl.store(row_start_ptr + b, tl.zeros([CHUNK], tl.int32), mask=unused)
        tl.store(row_end_ptr + b, tl.zeros([CHUNK], tl.int32), mask=unused)


@device_function
def _local_experts(ids_ptr, pairs, num_pairs, first_expert, num_local_experts):
    """The local expert of each pair in `pairs` (-1 for pairs past the end or routed to another rank)."""
    local = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1) - first_expert
    return tl.where((local >= 0) & (local < num_local_experts), local, -1)


@device_function
def _count_chunk(ids_ptr, pairs, num_pairs, first_expert, num_local_experts, experts):
    """How many of `pairs` each local expert receives ([BLOCK_EXPERTS])."""
    local = _local_experts(ids_ptr, pairs, num_pairs, first_expert, num_local_experts)
    return tl.sum((local[:, None] == experts[None, :]).to(tl.int32), axis=0)


@device_function
def _scatter_chunk(ids_ptr, sorted_pairs_ptr, pairs, num_pairs, first_expert, num_local_experts, experts, placed):
    """Writes each local pair of `pairs` to its row: placed[e] (the chunk's first row of expert e) plus the
    pair's rank among the chunk's pairs of e, so rows keep the pairs' order (a stable sort). Returns the chunk's
    counts by expert."""
    local = _local_experts(ids_ptr, pairs, num_pairs, first_expert, num_local_experts)
    one_hot = (local[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, BLOCK_EXPERTS]
    rank = tl.cumsum(one_hot, axis=0) - one_hot  # earlier pairs of the same expert in this chunk
    row = tl.sum(one_hot * (rank + placed[None, :]), axis=1)
    tl.store(sorted_pairs_ptr + row, pairs, mask=local >= 0)
    return tl.sum(one_hot, axis=0)


@device_function
def _write_block_tables(counts, row_start, row_end, experts, block_expert_ptr, block_row_start_ptr,
                        block_row_end_ptr, tail_expert_ptr, tail_row_start_ptr, tail_row_end_ptr, max_blocks,
                        max_tail_blocks, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, TAIL_PAIRS: tl.constexpr,
                        TABLE_CHUNK: tl.constexpr):
    """Both block tables from each expert's rows [row_start, row_end) (counts of them). With tail blocks, an
    expert's last TAIL_PAIRS rows or fewer past its whole blocks of BLOCK_M go to blocks of TAIL_M in the second
    table instead of one more block of BLOCK_M."""
    whole = counts // BLOCK_M
    rest = counts - whole * BLOCK_M
    to_tail = (rest > 0) & (rest <= TAIL_PAIRS)
    main_end = tl.where(to_tail, row_start + whole * BLOCK_M, row_end)
    _write_block_table(block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
                       (main_end - row_start + BLOCK_M - 1) // BLOCK_M, row_start, main_end, experts, max_blocks,
                       BLOCK_M, TABLE_CHUNK)
    if TAIL_M > 0:
        _write_block_table(tail_expert_ptr, tail_row_start_ptr, tail_row_end_ptr,
                           tl.where(to_tail, (rest + TAIL_M - 1) // TAIL_M, 0), main_end, row_end, experts,
                           max_tail_blocks, TAIL_M, TABLE_CHUNK)


@triton.jit(do_not_specialize=["num_pairs", "max_blocks", "max_tail_blocks"])
def _group_by_expert_kernel(
    ids_ptr, sorted_pairs_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
    tail_expert_ptr, tail_row_start_ptr, tail_row_end_ptr,
    num_pairs, first_expert, num_local_experts, max_blocks, max_tail_blocks,
    BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, TAIL_PAIRS: tl.constexpr, BLOCK_EXPERTS: tl.constexpr,
    CHUNK: tl.constexpr, TABLE_CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    """The whole grouping in one program (few pairs: one launch)."""
    pdl_wait(PDL)  # the expert ids come from the kernel before
    experts = tl.arange(0, BLOCK_EXPERTS)
    # Pass 1: how many pairs each local expert receives.
    counts = tl.zeros([BLOCK_EXPERTS], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        counts += _count_chunk(ids_ptr, start + tl.arange(0, CHUNK), num_pairs, first_expert, num_local_experts,
                               experts)
    # Each expert's rows start after the previous experts'.
    row_end = tl.cumsum(counts, axis=0)
    row_start = row_end - counts
    # Pass 2: scatter each pair to its row, chunk after chunk.
    placed = row_start
    for start in range(0, num_pairs, CHUNK):
        placed += _scatter_chunk(ids_ptr, sorted_pairs_ptr, start + tl.arange(0, CHUNK), num_pairs, first_expert,
                                 num_local_experts, experts, placed)
    _write_block_tables(counts, row_start, row_end, experts, block_expert_ptr, block_row_start_ptr,
                        block_row_end_ptr, tail_expert_ptr, tail_row_start_ptr, tail_row_end_ptr, max_blocks,
                        max_tail_blocks, BLOCK_M, TAIL_M, TAIL_PAIRS, TABLE_CHUNK)


# The grouping of many pairs in three launches, a program a chunk of pairs where the work is (the single program
# above walks every chunk twice, one after another): count each chunk's pairs by expert; one program turns the
# counts into each chunk's first row of each expert and writes the block tables; each chunk scatters its pairs.
@triton.jit(do_not_specialize=["num_pairs"])
def _count_chunks_kernel(ids_ptr, chunk_counts_ptr, num_pairs, first_expert, num_local_experts,
                         BLOCK_EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    experts = tl.arange(0, BLOCK_EXPERTS)
    chunk = tl.program_id(0)
    counts = _count_chunk(ids_ptr, chunk * CHUNK + tl.arange(0, CHUNK), num_pairs, first_expert, num_local_experts,
                          experts)
    tl.store(chunk_counts_ptr + chunk * BLOCK_EXPERTS + experts, counts)


@triton.jit(do_not_specialize=["num_chunks", "max_blocks", "max_tail_blocks"])
def _plan_chunks_kernel(
    chunk_counts_ptr, chunk_rows_ptr, block_expert_ptr, block_row_start_ptr, block_row_end_ptr,
    tail_expert_ptr, tail_row_start_ptr, tail_row_end_ptr, num_chunks, max_blocks, max_tail_blocks,
    BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, TAIL_PAIRS: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr, CHUNKS_A_PASS: tl.constexpr, TABLE_CHUNK: tl.constexpr,
):
    """chunk_rows[c, e] = the first row of chunk c's pairs of expert e (rows grouped by expert, chunks in order),
    and the block tables."""
    experts = tl.arange(0, BLOCK_EXPERTS)
    counts = tl.zeros([BLOCK_EXPERTS], dtype=tl.int32)
    for first in range(0, num_chunks, CHUNKS_A_PASS):
        chunks = first + tl.arange(0, CHUNKS_A_PASS)
        tile = tl.load(chunk_counts_ptr + chunks[:, None] * BLOCK_EXPERTS + experts[None, :],
                       mask=(chunks < num_chunks)[:, None], other=0)  # [CHUNKS_A_PASS, BLOCK_EXPERTS]
        counts += tl.sum(tile, axis=0)
    row_end = tl.cumsum(counts, axis=0)
    row_start = row_end - counts
    placed = row_start
    for first in range(0, num_chunks, CHUNKS_A_PASS):
        chunks = first + tl.arange(0, CHUNKS_A_PASS)
        offsets = chunks[:, None] * BLOCK_EXPERTS + experts[None, :]
        in_chunks = (chunks < num_chunks)[:, None]
        tile = tl.load(chunk_counts_ptr + offsets, mask=in_chunks, other=0)
        tl.store(chunk_rows_ptr + offsets, tl.cumsum(tile, axis=0) - tile + placed[None, :], mask=in_chunks)
        placed += tl.sum(tile, axis=0)
    _write_block_tables(counts, row_start, row_end, experts, block_expert_ptr, block_row_start_ptr,
                        block_row_end_ptr, tail_expert_ptr, tail_row_start_ptr, tail_row_end_ptr, max_blocks,
                        max_tail_blocks, BLOCK_M, TAIL_M, TAIL_PAIRS, TABLE_CHUNK)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_chunks_kernel(ids_ptr, chunk_rows_ptr, sorted_pairs_ptr, num_pairs, first_expert, num_local_experts,
                           BLOCK_EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    experts = tl.arange(0, BLOCK_EXPERTS)
    chunk = tl.program_id(0)
    placed = tl.load(chunk_rows_ptr + chunk * BLOCK_EXPERTS + experts)
    _scatter_chunk(ids_ptr, sorted_pairs_ptr, chunk * CHUNK + tl.arange(0, CHUNK), num_pairs, first_expert,
                   num_local_experts, experts, placed)


@dataclasses.dataclass
class ExpertGroups:
    """(token, slot) pairs of one step grouped by this rank's experts, in row blocks for the matmuls."""

    sorted_pairs: torch.Tensor  # [num_pairs] int32, pair index token * top_k + slot; first rows used only
    block_expert: torch.Tensor  # [max_blocks] int32, local expert of each row block, -1 for unused blocks
    block_row_start: torch.Tensor  # [max_blocks] int32, first row (into sorted_pairs) of each block
    block_row_end: torch.Tensor  # [max_blocks] int32, one past its last row
    block_m: int  # rows per block
    tail: "ExpertGroups | None" = None  # rows the table above leaves: each expert's last few, in smaller blocks


# From this many chunks of pairs (of 16384 / experts pairs: 128 for 120b, 512 for 20b) the grouping runs a
# program a chunk in three launches instead of one program that walks the pairs twice. H100, 2026-12-06 (bench
# --sections grouping, µs, one program against a program a chunk, 128-pair blocks with tails; the block tables then
# written 128 or 512 blocks at a time): 20b 8 / 64 / 512 / 1024 / 4096 tokens 11.1 / 11.3 / 33.5 / 58.9 / 210.0
# against 14.4 / 15.6 / 16.1 / 16.1 / 16.3; 120b 34.3 / 47.5 / 134.1 / 232.2 / 823.2 against 23.4 / 26.8 / 27.3 /
# 27.7 / 32.5. With the tables 32 entries a pass (below), the same day: one program 7.6 / 10.4 / 43.2 at 20b 8 / 64 /
# 512 tokens against 11.8 / 13.3 / 13.7; 120b 11.9 / 41.0 at 8 / 64 tokens against 17.9 / 24.3 (2 chunks).
GROUPING_MIN_CHUNKS = 2
# Unused block-table entries a pass of _write_block_table. (When it searched each entry's expert in [entries,
# experts] tiles, those were most of the one-program grouping of a decode step with 128 experts: H100, 120b 8
# tokens, 34.3 µs with 128 entries a pass, 11.9 with 32; now each expert writes its own entries: 8.1, and the
# three-launch form at 120b 4096 tokens 32.7 -> 22.3, H100, 2026-12-06, fourth session.)
GROUPING_TABLE_CHUNK = 32


def max_row_blocks(num_pairs: int, num_local_experts: int, block_m: int) -> int:
    """Static worst case of sum over experts of ceil(count / block_m): each non-empty expert wastes under one
    block, and at most min(num_local_experts, num_pairs) experts are non-empty."""
    busy = min(num_local_experts, num_pairs)
    return max(1, (num_pairs + busy * (block_m - 1)) // block_m)


def max_tail_blocks(num_pairs: int, num_local_experts: int, tail_m: int, tail_pairs: int) -> int:
    """Static worst case of tail blocks: at most ceil(tail_pairs / tail_m) an expert, each holding a pair."""
    return max(1, min(num_pairs, num_local_experts * triton.cdiv(tail_pairs, tail_m)))


def _block_arrays(num_blocks: int, device: torch.device) -> dict:
    return {name: torch.empty(num_blocks, dtype=torch.int32, device=device)
            for name in ("block_expert", "block_row_start", "block_row_end")}


def group_by_expert(
    expert_ids: torch.Tensor,  # [num_tokens, top_k] int, global expert ids
    first_expert: int,
    num_local_experts: int,
    block_m: int,
    tail: tuple[int, int] | None = None,  # (tail_m, tail_pairs): see below
    parallel: bool | None = None,  # three launches, a program a chunk of pairs (None: from GROUPING_MIN_CHUNKS)
) -> ExpertGroups:
    """The pairs routed to [first_expert, first_expert + num_local_experts) sorted by expert, in row blocks of
    block_m. With `tail`, an expert whose rows past its whole blocks of block_m number tail_pairs or fewer gets
    those rows in blocks of tail_m, listed in `.tail` (same sorted pairs), instead of one more block of block_m:
    a kernel's small tile then works on them rather than a large tile mostly empty."""
    num_pairs = expert_ids.numel()
    device = expert_ids.device
    max_blocks = max_row_blocks(num_pairs, num_local_experts, block_m)
    groups = ExpertGroups(sorted_pairs=torch.empty(max(num_pairs, 1), dtype=torch.int32, device=device),
                          block_m=block_m, **_block_arrays(max_blocks, device))
    tail_m, tail_pairs = tail if tail is not None else (0, 0)
    if tail_m:
        if not 0 < tail_m <= block_m or tail_pairs < 1:
            raise ValueError(f"tail blocks of {tail_m} rows for up to {tail_pairs} rows beside blocks of {block_m}")
        max_tail = max_tail_blocks(num_pairs, num_local_experts, tail_m, tail_pairs)
        groups.tail = ExpertGroups(sorted_pairs=groups.sorted_pairs, block_m=tail_m,
                                   **_block_arrays(max_tail, device))
    tail_table = groups.tail or groups  # without tail blocks the kernel writes no second table
    block_experts = next_pow2(num_local_experts)
    chunk = max(16, min(256, 16384 // block_experts))  # pairs a program of the three-launch form
    ids = expert_ids.reshape(-1)
    tables = (groups.block_expert, groups.block_row_start, groups.block_row_end, tail_table.block_expert,
              tail_table.block_row_start, tail_table.block_row_end)
    sizes = dict(BLOCK_M=block_m, TAIL_M=tail_m, TAIL_PAIRS=tail_pairs, BLOCK_EXPERTS=block_experts,
                 TABLE_CHUNK=GROUPING_TABLE_CHUNK)
    num_chunks = triton.cdiv(num_pairs, chunk)
    if parallel is None:
        parallel = num_chunks >= GROUPING_MIN_CHUNKS
    if not parallel:
        launch(_group_by_expert_kernel, (1,), ids, groups.sorted_pairs, *tables, num_pairs, first_expert,
               num_local_experts, max_blocks, tail_table.block_expert.numel(), **sizes,
               CHUNK=max(16, min(256, 4096 // block_experts)), num_warps=8, **pdl_args(device))
        return groups
    chunk_counts = torch.empty((max(num_chunks, 1), block_experts), dtype=torch.int32, device=device)
    chunk_rows = torch.empty_like(chunk_counts)
    if num_chunks:
        launch(_count_chunks_kernel, (num_chunks,), ids, chunk_counts, num_pairs, first_expert, num_local_experts,
               BLOCK_EXPERTS=block_experts, CHUNK=chunk, num_warps=4)
    launch(_plan_chunks_kernel, (1,), chunk_counts, chunk_rows, *tables, num_chunks, max_blocks,
           tail_table.block_expert.numel(), **sizes,
           CHUNKS_A_PASS=max(1, min(64, 8192 // block_experts)), num_warps=8)
    if num_chunks:
        launch(_scatter_chunks_kernel, (num_chunks,), ids, chunk_rows, groups.sorted_pairs, num_pairs, first_expert,
               num_local_experts, BLOCK_EXPERTS=block_experts, CHUNK=chunk, num_warps=4)
    return groups
