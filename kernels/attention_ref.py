"""Attention over a paged KV cache with learned sinks, grouped-query heads and an optional sliding window.

The plain-torch twin of the Triton kernels, and the CPU path. One call serves decode (one new token per
sequence), prefill and chunked prefill (several new tokens that attend to their cached prefix and to
themselves): sequence b owns queries cu_seqlens_q[b]:cu_seqlens_q[b+1], which are the last tokens of its
context_lens[b] cached tokens, so query i of a q_len-token chunk sits at position context_len - q_len + i.
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], rotary already applied
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, new tokens included
    sinks: torch.Tensor,  # [num_q_heads] float32, one learned logit per query head
    sm_scale: float,
    sliding_window: int = 0,  # keys a query sees, itself included; 0 = full causal attention
) -> torch.Tensor:  # [num_tokens, num_q_heads, head_dim] in q's dtype
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    queries_per_kv = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, context_len in enumerate(context_lens.tolist()):
        q_start, q_end = cu[b], cu[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        positions_q = torch.arange(context_len - q_len, context_len, device=q.device)  # [q_len]
        # Keys older than the window of the chunk's first query are never needed: with a sliding window the
        # cache may already have freed (and reused) their blocks, so they must not even be read.
        first_key = max(0, context_len - q_len - sliding_window + 1) if sliding_window else 0
        first_block, last_block = first_key // block_size, (context_len - 1) // block_size
        blocks = block_tables[b, first_block:last_block + 1].long()
        offset = first_block * block_size
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[first_key - offset:context_len - offset]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[first_key - offset:context_len - offset]
        positions_k = torch.arange(first_key, context_len, device=q.device)  # [num_keys]

        qb = q[q_start:q_end].float().view(q_len, num_kv_heads, queries_per_kv, head_dim)
        scores = torch.einsum("qhgd,khd->hgqk", qb, k.float()) * sm_scale  # [kv_heads, group, q_len, num_keys]
        visible = positions_k[None, :] <= positions_q[:, None]
        if sliding_window:
            visible &= positions_k[None, :] > positions_q[:, None] - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = sinks.float().view(num_kv_heads, queries_per_kv, 1, 1).expand(-1, -1, q_len, 1)
        # The sink is one more logit in each row's softmax, with no value vector: it only adds mass to the
        # denominator, so a row's weights over the real keys sum to less than one.
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        ob = torch.einsum("hgqk,khd->qhgd", probs, v.float())
        out[q_start:q_end] = ob.reshape(q_len, num_q_heads, head_dim).to(q.dtype)
    return out
