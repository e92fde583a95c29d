"""Decode attention over the paged KV cache (Triton): one new query token per sequence, split-K.

The twin of attention_ref.paged_attention_ref for batches where every sequence brings exactly one token.
A program takes one sequence, one KV head with its whole group of query heads (so each key and value row is
read once for the group), and one slice of the context: with few sequences and long contexts the slices keep
every SM busy (flash-decoding); a second small kernel merges the slices, or (FUSED_MERGE, two slices) the last of
a sequence's and KV head's slices to finish merges them in its program, with the same arithmetic. The sink is one
more logit with no value: slice 0 starts its running max at the sink and its normaliser at exp(sink - sink) = 1,
which is the flash form of l + exp(sink - m). Keys outside the sliding window are never loaded: their blocks may
be freed.
The number of slices is chosen from static shapes only (block table width), so the launch is graph-safe.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.triton_utils import (arrival_counters, cast_rne, device_function, emulate_bf16, launch,
                                                next_pow2, pdl_args, pdl_wait)

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# Launches of at most this many slices merge them in the last slice's program instead of a merge kernel (one launch
# fewer, but the merge of a (sequence, KV head) then runs in one program, after an atomic). H100, 2026-12-07
# (docs/PERFORMANCE.md, µs, head-major blocks, both merges then adding slices one by one): 2 slices won (batch
# 32 x 1k 32.9 -> 31.1, 128 x 1k 110.1 -> 103.7, 128 x 8k 733.4 -> 725.2), 8 lost (32 x 8k 192.4 -> 206.9) or
# tied (32 x 32k), 64 lost (1 x 32k 33.1 -> 37.4). Batch 32 x 1k has since gone to one slice (decode_plan).
# That merge of more than 8 slices holds [16, slices, 64] floats in registers. Merging them slice by slice instead
# (a running max, sum and output a head, unrolled, no reduction across threads; built at 2168d49) lost more: H100,
# 2026-12-07, 24 layers a graph, µs, merge kernel against it: 1 x 32k 28.1-28.3 / 34.6, 1 x 8k 10.5 / 16.6-16.7,
# 1 x 1k 5.0-5.1 / 6.3 (one program's chain of 64 slices from L2 against 64 programs of one slice's worth each).
# GPTOSS_DECODE_FUSED_MERGE_MAX_SPLITS overrides it for a process.
FUSED_MERGE_MAX_SPLITS = int(os.environ.get("GPTOSS_DECODE_FUSED_MERGE_MAX_SPLITS", "2"))


@functools.lru_cache(maxsize=256)  # eager decode asks once a layer a step, with a handful of distinct shapes
def decode_plan(num_seqs: int, num_kv_heads: int, max_keys: int, num_sms: int) -> tuple[int, dict]:
    """(context slices, tiles) for a decode launch, from static shapes only (CUDA graphs replay the same grid).
    The tiles dict is shared between calls: copy it before changing it.

    From the sweep on an H200 (tools/attention_decode_sweep.py, docs/PERFORMANCE.md 2026-12-02): about 16
    programs per SM, slices of at least one key block; where that leaves slices shorter than 512 keys, fewer slices
    while at least 3 programs per SM remain; two pipeline stages (three lost everywhere); 128-key blocks for slices
    of 2048 keys and more, or of 512 and more in a small grid, else 64.

    Then, on head-major KV blocks (an H100, 2026-12-07, µs): a context of at most 2048 keys stays whole in one
    program where that grid is one wave of two to four programs a SM, with no partials and no merge. One slice
    against the slices above: batch 32 x 1k 29.8-30.0 against 30.6 (two), 64 x 1k 51.1 against 54.8 (two), 32 x 2k
    52.0-52.4 against 54.6-55.6 (four), 64 x 2k 94.0 against 102.1-103.2 (four); 128-key blocks there (64: 62.8 and
    99.6). Past one wave it loses: 128 x 1k 113.6-114.2 against 106.7-107.1 (two). Other ways to more programs
    lost too (2026-12-07): several programs a KV head, each with some of its queries (K and V read by each, L2 or
    not), two of them 4-15% slower at batch 1, 32 x 1k and 128 x 1k; 8 warps at 32 x 1k 32.8 against 29.9.

    num_stages buffers nothing here: the K and V addresses come from a page loaded in the same iteration, and
    Triton's pipeliner (3.6 and 3.9) then gives K and V one shared-memory buffer at any stage count, so a block's
    copy waits for the block before to be computed (tools/kernel_sass.py attention). Loading the pages a block ahead
    and carrying them buffers K and V num_stages - 1 deep; timed on an H100 (2026-12-07, µs, the plan's slices) it
    lost or tied, the programs on an SM already overlapping one another: 32 x 1k 30.7-30.8 against 30.2-31.8 (2-4
    stages, 64- or 128-key blocks), 128 x 1k 110.1 against 112.6-119.2, 32 x 8k 192.7-193.2 against 196.8-209.4,
    1 x 32k 31.3 against 31.4-35.9, the largest shapes within 0.5%.

    EARLY_META: each program loads its length and its first block's pages before the PDL wait. On in the one-wave
    rule's 128-key launches, where it won every time on an H100 (2026-12-07, µs, two calls): 32 x 1k 29.4-29.7
    against 29.6-29.8, 32 x 2k 51.8-51.9 against 52.1-52.2, 64 x 1k 51.0 against 51.3, 64 x 2k 94.1-94.2 against
    94.3-94.4. Off elsewhere: 1 x 32k 31.1 against 30.7, batch 1 at 1k and 8k tied; at 64-key blocks it costs 8
    registers (64 -> 72: 7 programs a SM instead of 8), and 128 x 1k and 32 x 8k lost 7%. Slices of any length (528
    programs, 4 on every SM, at 1 x 32k) lost too: 31.0-31.1."""
    programs = num_seqs * num_kv_heads
    one_wave = max_keys <= 2048 and 1.9 * num_sms <= programs <= 4 * num_sms
    if one_wave:
        splits = 1  # whole contexts
    else:
        splits = _prev_pow2(max(1, min(MAX_SPLITS, triton.cdiv(16 * num_sms, programs))))
        splits = min(splits, _prev_pow2(max(1, max_keys // 64)))  # a slice holds at least one 64-key block
        while splits > 1 and triton.cdiv(max_keys, splits) < 512 and programs * splits // 2 >= 3 * num_sms:
            splits //= 2
    partition = triton.cdiv(max_keys, splits)
    wide = partition >= 2048 or (partition >= 512 and programs * splits <= 4 * num_sms)
    tiles = dict(BLOCK_N=128 if wide else 64, num_warps=4, num_stages=2)
    if one_wave and wide:
        tiles["EARLY_META"] = 1  # the lengths and first pages before the PDL wait, where it was timed a gain
    return splits, tiles


def _prev_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


@triton.jit(do_not_specialize=["stride_tables"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, sinks_ptr,
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, arrivals_ptr,
    scale_log2, sliding_window, partition_tokens, block_size, num_q_heads, head_dim,
    stride_q_token, stride_q_head, stride_cache_block, stride_cache_slot, stride_cache_head, stride_tables,
    stride_out_token, stride_out_head,
    QUERIES_PER_KV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, FUSED_MERGE: tl.constexpr, EARLY_META: tl.constexpr,
    EMULATE_BF16: tl.constexpr, PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_tables
    if EARLY_META:  # the step's lengths and tables come from kernels at least two launches back (triton_utils)
        context_len = tl.load(context_lens_ptr + seq)
        first_key = 0
        if sliding_window > 0:
            first_key = tl.maximum(context_len - sliding_window, 0)
        start = first_key + split * partition_tokens
        end = tl.minimum(context_len, start + partition_tokens)
        first_keys = start + tl.arange(0, BLOCK_N)
        first_pages = tl.load(table_row + first_keys // block_size, mask=first_keys < end, other=0)  # [BLOCK_N]
    pdl_wait(PDL)  # q and the cache's new rows come from the kernels before
    if not EARLY_META:  # the same lines after the wait (a shared helper compiled EARLY_META to 5 more registers)
        context_len = tl.load(context_lens_ptr + seq)
        first_key = 0
        if sliding_window > 0:
            first_key = tl.maximum(context_len - sliding_window, 0)
        start = first_key + split * partition_tokens
        end = tl.minimum(context_len, start + partition_tokens)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * QUERIES_PER_KV + g
    in_group = g < QUERIES_PER_KV
    d = tl.arange(0, BLOCK_D)
    in_d = d < head_dim
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_q_token + heads[:, None] * stride_q_head + d[None, :],
                mask=in_group[:, None] & in_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if EMULATE_BF16:
        q = q.to(tl.float32)
    if split == 0:
        m_i = tl.load(sinks_ptr + heads, mask=in_group, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_G], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    head_offset = kv_head * stride_cache_head
    for key0 in range(start, end, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        in_keys = keys < end
        if EARLY_META:  # the first block's pages are in hand
            page = tl.load(table_row + keys // block_size, mask=in_keys & (keys >= start + BLOCK_N),
                           other=first_pages)
        else:
            page = tl.load(table_row + keys // block_size, mask=in_keys, other=0)
        page = page.to(tl.int64)
        row = page * stride_cache_block + (keys % block_size) * stride_cache_slot + head_offset  # [BLOCK_N]
        kv_mask = in_keys[:, None] & in_d[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if EMULATE_BF16:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(in_keys[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EMULATE_BF16:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = in_group[:, None] & in_d[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_out_token + heads[:, None] * stride_out_head + d[None, :],
                 cast_rne(out, out_ptr.dtype.element_ty, EMULATE_BF16), mask=out_mask)
    else:
        part = (seq.to(tl.int64) * num_q_heads + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=out_mask)
        tl.store(part_max_ptr + part, m_i, mask=in_group)
        tl.store(part_sum_ptr + part, l_i, mask=in_group)
        if FUSED_MERGE:
            counter = arrivals_ptr + seq * tl.num_programs(1) + kv_head
            tl.debug_barrier()  # every thread's partials stored before the one atomic releases them
            if tl.atomic_add(counter, 1, sem="acq_rel") == NUM_SPLITS - 1:  # the last slice of the group to finish
                tl.store(counter, 0)  # zero for the next launch
                base = (seq.to(tl.int64) * num_q_heads + heads) * NUM_SPLITS  # [BLOCK_G]
                _merge_group(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, base,
                             seq.to(tl.int64) * stride_out_token + heads * stride_out_head, in_group, d, head_dim,
                             NUM_SPLITS, SPLITS_P2, BLOCK_D, EMULATE_BF16)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, num_q_heads, head_dim, stride_out_token, stride_out_head,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)  # the slices come from the kernel before
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P2)
    in_splits = splits < NUM_SPLITS
    part = (seq * num_q_heads + head) * NUM_SPLITS + splits
    m = tl.load(part_max_ptr + part, mask=in_splits, other=float("-inf"))  # slice 0 holds the sink: a finite max
    l = tl.load(part_sum_ptr + part, mask=in_splits, other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0))  # empty slices: exp2(-inf) = 0
    d = tl.arange(0, BLOCK_D)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], mask=in_splits[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + seq * stride_out_token + head * stride_out_head + d,
             cast_rne(out, out_ptr.dtype.element_ty, EMULATE_BF16), mask=d < head_dim)


@device_function
def _merge_group(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, base, out_offset, in_group, d, head_dim,
                 NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr,
                 EMULATE_BF16: tl.constexpr):
    """_merge_splits_kernel's arithmetic for a group of heads [G] at once (FUSED_MERGE): partial rows base (slice s
    at base + s), outputs at out_offset. At two slices each sum is one addition, so the bits are the merge kernel's;
    with more, the reductions' order may differ from its. Loads `.cg`: the other programs' partials are in L2,
    and an L1 line of an earlier launch's would be stale."""
    splits = tl.arange(0, SPLITS_P2)
    part = base[:, None] + splits[None, :]  # [G, SPLITS_P2]
    mask = in_group[:, None] & (splits < NUM_SPLITS)[None, :]
    m = tl.load(part_max_ptr + part, mask=mask, other=float("-inf"), cache_modifier=".cg")
    m = tl.where(in_group[:, None], m, 0.0)  # the group's padding heads: finite, never stored
    l = tl.load(part_sum_ptr + part, mask=mask, other=0.0, cache_modifier=".cg")
    weight = tl.exp2(m - tl.max(m, axis=1)[:, None])  # empty slices: exp2(-inf) = 0
    acc = tl.load(part_acc_ptr + part[:, :, None] * BLOCK_D + d[None, None, :], mask=mask[:, :, None], other=0.0,
                  cache_modifier=".cg")  # [G, SPLITS_P2, BLOCK_D]
    den = tl.where(in_group, tl.sum(l * weight, axis=1), 1.0)  # (padding heads: no 0 / 0)
    out = tl.sum(acc * weight[:, :, None], axis=1) / den[:, None]
    tl.store(out_ptr + out_offset[:, None] + d[None, :], cast_rne(out, out_ptr.dtype.element_ty, EMULATE_BF16),
             mask=in_group[:, None] & (d < head_dim)[None, :])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def paged_attention_decode(
    q: torch.Tensor,  # [num_seqs, num_q_heads, head_dim], one token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, the new token included
    sinks: torch.Tensor,  # [num_q_heads] float32
    sm_scale: float,
    sliding_window: int = 0,
    num_splits: int | None = None,  # slices of the context (any count >= 1); None = chosen from the shapes
    tiles: dict | None = None,  # BLOCK_N, num_warps, num_stages, EARLY_META over decode_plan's (sweeps)
    fused_merge: bool | None = None,  # slices merged by the last one's program; None = up to FUSED_MERGE_MAX_SPLITS
) -> torch.Tensor:  # [num_seqs, num_q_heads, head_dim]
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    queries_per_kv = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("q and the caches need head_dim contiguous, and k and v caches one layout")
    max_keys = block_tables.shape[1] * block_size  # static bound on the context
    if sliding_window:
        max_keys = min(max_keys, sliding_window)
    plan_splits, plan_tiles = decode_plan(num_seqs, num_kv_heads, max_keys, _num_sms(q.device))
    num_splits = num_splits if num_splits is not None else plan_splits  # any count (the plan's: powers of two)
    tiles = dict(plan_tiles, **(tiles or {}))
    block_n = tiles["BLOCK_N"]
    partition = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n
    block_d = next_pow2(head_dim)
    fused_merge = num_splits > 1 and (num_splits <= FUSED_MERGE_MAX_SPLITS if fused_merge is None else fused_merge)
    if num_splits > 1:
        part_acc = torch.empty((num_seqs, num_q_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_max = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused
    arrivals = arrival_counters("attention_decode", num_seqs * num_kv_heads, q.device) if fused_merge else out
    emulate = emulate_bf16()
    pdl = pdl_args(q.device)
    launch(_decode_kernel, (num_seqs, num_kv_heads, num_splits),
           q, k_cache, v_cache, block_tables, context_lens, sinks, out, part_acc, part_max, part_sum, arrivals,
           sm_scale * LOG2E, sliding_window, partition, block_size, num_q_heads, head_dim,
           q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           block_tables.stride(0), out.stride(0), out.stride(1),
           QUERIES_PER_KV=queries_per_kv, BLOCK_G=max(16, next_pow2(queries_per_kv)), BLOCK_D=block_d,
           BLOCK_N=block_n, NUM_SPLITS=num_splits, SPLITS_P2=next_pow2(num_splits), FUSED_MERGE=fused_merge,
           EARLY_META=bool(tiles.get("EARLY_META", 0)), EMULATE_BF16=emulate, num_warps=tiles["num_warps"],
           num_stages=tiles["num_stages"], **pdl)
    if num_splits > 1 and not fused_merge:
        launch(_merge_splits_kernel, (num_seqs, num_q_heads),
               part_acc, part_max, part_sum, out, num_q_heads, head_dim, out.stride(0), out.stride(1),
               NUM_SPLITS=num_splits, SPLITS_P2=next_pow2(num_splits), BLOCK_D=block_d, EMULATE_BF16=emulate,
               num_warps=max(1, next_pow2(num_splits) // 64), **pdl)  # one warp up to the plan's 64 slices
    return out
