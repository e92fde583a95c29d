"""Prefill and chunked-prefill attention over the paged KV cache (Triton), FlashAttention-2 style.

The twin of attention_ref.paged_attention_ref for any batch: sequence b's queries are the last q_len of its
context_len tokens, so a chunk attends to its cached prefix and causally to itself. A program takes BLOCK_Q
consecutive query tokens of one sequence and one KV head with its whole group of query heads, stacked as the
rows of one tile (rows = token * BLOCK_G + head in group), so each key/value row is loaded once per group.

Program ids map to (sequence, query tile) on the device from cu_seqlens_q, against a grid sized by the static
bound sum over b of ceil(q_len_b / BLOCK_Q) <= (num_tokens + num_seqs * (BLOCK_Q - 1)) / BLOCK_Q: no host
sync. The running max starts at the head's sink logit and the normaliser at 1 (l + exp(sink - m) in flash
form). With a sliding window, keys older than the window of the tile's first query are never loaded. Key
blocks that every row of the tile sees whole (before the tile's first position, inside every row's window)
skip the masks; only the blocks at the diagonal and at the window's far edge are masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.triton_utils import cast_rne, device_function, emulate_bf16, launch, next_pow2

LOG2E = 1.4426950408889634


@device_function
def _attend(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, head_offset, positions, d, in_d,
            key_lo, key_hi, block_size, stride_cache_block, stride_cache_slot, scale_log2, sliding_window,
            MASKED: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Online softmax over keys [key_lo, key_hi); MASKED applies bounds, causality and the window per row.
    The pages are loaded in the iteration that uses them, so Triton's pipeliner loads no key block ahead during the
    compute (as in decode: kernels/attention_decode.py, decode_plan). Carried a block ahead, K and V were buffered
    num_stages - 1 deep, and lost or tied on an H100 (2026-12-07, µs, 1k / 8k tokens, full attention): the default
    config (paged_attention_prefill) 60.1-60.5 / 1852-1856, carried at three stages 63.7-64.6 / 1868-1869, with 8
    warps carried 70.2-70.9 / 2267 (not carried 74.8-75.9 / 2447-2448)."""
    for key0 in range(key_lo, key_hi, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        if MASKED:
            in_keys = keys < key_hi
            page = tl.load(table_row + keys // block_size, mask=in_keys, other=0).to(tl.int64)
        else:
            page = tl.load(table_row + keys // block_size).to(tl.int64)
        row = page * stride_cache_block + (keys % block_size) * stride_cache_slot + head_offset  # [BLOCK_N]
        if MASKED:
            kv_mask = in_keys[:, None] & in_d[None, :]
            k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=in_d[None, :], other=0.0)
            v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=in_d[None, :], other=0.0)
        if EMULATE_BF16:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [ROWS, BLOCK_N], log2 units
        if MASKED:
            visible = in_keys[None, :] & (keys[None, :] <= positions[:, None])
            if sliding_window > 0:
                visible &= keys[None, :] > positions[:, None] - sliding_window
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: it starts at the sink
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EMULATE_BF16:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["num_seqs", "stride_tables"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr, sinks_ptr, out_ptr,
    scale_log2, sliding_window, num_seqs, block_size, head_dim,
    stride_q_token, stride_q_head, stride_cache_block, stride_cache_slot, stride_cache_head, stride_tables,
    stride_out_token, stride_out_head,
    QUERIES_PER_KV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SEQS: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Which sequence, and which of its query tiles, this program is: the sequences' tiles counted BLOCK_SEQS
    # sequences at a time (a fixed block, so that the number of sequences never asks for another compile).
    seq = num_seqs  # none yet
    q_start = num_seqs * 0
    q_len = num_seqs * 0
    first_tile = num_seqs * 0  # of the sequence found
    tiles_before = num_seqs * 0  # in the chunks already scanned
    for base in range(0, num_seqs, BLOCK_SEQS):
        seqs = base + tl.arange(0, BLOCK_SEQS)
        in_batch = seqs < num_seqs
        q_starts = tl.load(cu_seqlens_ptr + seqs, mask=in_batch, other=0)
        q_ends = tl.load(cu_seqlens_ptr + seqs + 1, mask=in_batch, other=0)
        tiles = (q_ends - q_starts + BLOCK_Q - 1) // BLOCK_Q
        tiles_end = tiles_before + tl.cumsum(tiles, axis=0)
        is_seq = in_batch & (tiles_end > tile) & (tiles_end - tiles <= tile)  # at most one, in one chunk
        found = tl.sum(is_seq.to(tl.int32), axis=0)
        seq = tl.where(found > 0, tl.sum(tl.where(is_seq, seqs, 0), axis=0), seq)
        q_start += tl.sum(tl.where(is_seq, q_starts, 0), axis=0)
        q_len += tl.sum(tl.where(is_seq, q_ends - q_starts, 0), axis=0)
        first_tile += tl.sum(tl.where(is_seq, tiles_end - tiles, 0), axis=0)
        tiles_before += tl.sum(tiles, axis=0)
    if seq >= num_seqs:
        return
    tile_in_seq = tile - first_tile
    context_len = tl.load(context_lens_ptr + seq)

    ROWS: tl.constexpr = BLOCK_Q * BLOCK_G
    r = tl.arange(0, ROWS)
    token_in_seq = tile_in_seq * BLOCK_Q + r // BLOCK_G  # [ROWS]
    g = r % BLOCK_G
    in_rows = (token_in_seq < q_len) & (g < QUERIES_PER_KV)
    heads = kv_head * QUERIES_PER_KV + g
    positions = context_len - q_len + token_in_seq  # [ROWS]
    d = tl.arange(0, BLOCK_D)
    in_d = d < head_dim
    tokens = (q_start + token_in_seq).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_token + heads[:, None] * stride_q_head + d[None, :],
                mask=in_rows[:, None] & in_d[None, :], other=0.0)  # [ROWS, BLOCK_D]
    if EMULATE_BF16:
        q = q.to(tl.float32)

    m_i = tl.load(sinks_ptr + heads, mask=g < QUERIES_PER_KV, other=0.0).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([ROWS], 1.0, dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    first_pos = context_len - q_len + tile_in_seq * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q, context_len) - 1
    key_start = 0
    full_start = 0  # keys from here up to first_pos are visible to every row of the tile
    if sliding_window > 0:
        key_start = tl.maximum(first_pos - sliding_window + 1, 0)
        full_start = tl.maximum(last_pos - sliding_window + 1, 0)
    full_start = tl.minimum(full_start, first_pos)
    full_end = full_start + (first_pos - full_start) // BLOCK_N * BLOCK_N
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_tables
    head_offset = kv_head * stride_cache_head
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, head_offset, positions, d,
                            in_d, key_start, full_start, block_size, stride_cache_block, stride_cache_slot,
                            scale_log2, sliding_window, True, BLOCK_N, EMULATE_BF16)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, head_offset, positions, d,
                            in_d, full_start, full_end, block_size, stride_cache_block, stride_cache_slot,
                            scale_log2, sliding_window, False, BLOCK_N, EMULATE_BF16)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, head_offset, positions, d,
                            in_d, full_end, last_pos + 1, block_size, stride_cache_block, stride_cache_slot,
                            scale_log2, sliding_window, True, BLOCK_N, EMULATE_BF16)

    out = acc / l_i[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_out_token + heads[:, None] * stride_out_head + d[None, :],
             cast_rne(out, out_ptr.dtype.element_ty, EMULATE_BF16), mask=in_rows[:, None] & in_d[None, :])


def prefill_config(sliding_window: int) -> dict:
    """Tiles a program: BLOCK_ROWS query rows (tokens x group heads), BLOCK_N keys a step. H100, 2026-12-07
    (tools/attention_prefill_sweep.py, µs, 1k / 8k tokens): at full attention 64-key blocks beat 32 (32 was 27%
    slower) and 64-row tiles (168 registers, 3 programs an SM: 2071 against 1836-1856 at 8k); at the 128-token
    window, where a tile's 16 tokens see at most 143 keys and every key block is masked, 32-key blocks waste fewer
    keys: 26.0 against 29.5 at 1k, 185.4 against 209 at 8k. Windows other than 128 were not timed; those up to 128
    take the 32-key blocks too."""
    block_n = 32 if 0 < sliding_window <= 128 else 64
    return dict(BLOCK_ROWS=128, BLOCK_N=block_n, BLOCK_SEQS=64, num_warps=4, num_stages=2)


def paged_attention_prefill(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], rotary already applied
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, new tokens included
    sinks: torch.Tensor,  # [num_q_heads] float32
    sm_scale: float,
    sliding_window: int = 0,
    config: dict | None = None,  # BLOCK_ROWS (query tokens x group heads), BLOCK_N, BLOCK_SEQS, warps, stages
) -> torch.Tensor:  # [num_tokens, num_q_heads, head_dim]
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = context_lens.shape[0]
    queries_per_kv = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("q and the caches need head_dim contiguous, and k and v caches one layout")
    config = prefill_config(sliding_window) | (config or {})
    block_g = next_pow2(queries_per_kv)
    block_q = max(1, config["BLOCK_ROWS"] // block_g)
    max_tiles = (num_tokens + num_seqs * (block_q - 1)) // block_q
    launch(_prefill_kernel, (max_tiles, num_kv_heads),
           q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sinks, out,
           sm_scale * LOG2E, sliding_window, num_seqs, block_size, head_dim,
           q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           block_tables.stride(0), out.stride(0), out.stride(1),
           QUERIES_PER_KV=queries_per_kv, BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_D=next_pow2(head_dim),
           BLOCK_N=config["BLOCK_N"], BLOCK_SEQS=config["BLOCK_SEQS"], EMULATE_BF16=emulate_bf16(),
           num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out
