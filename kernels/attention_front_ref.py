"""The front of the attention sub-block, plain torch: residual add and RMSNorm, the qkv projection, rotary
embedding on q and k, and k and v written to the paged cache. The twin of attention_front.norm_qkv_rope, and
the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptoss_serve.kernels.rmsnorm_ref import rmsnorm_ref
from gptoss_serve.kernels.rope_ref import rope_and_cache_write_ref


def split_qkv(
    qkv: torch.Tensor,  # [num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim]
    num_q_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q [num_tokens, num_q_heads, head_dim], k and v [num_tokens, num_kv_heads, head_dim]."""
    num_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_q_heads + 2 * num_kv_heads)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    return q, k, v


def norm_qkv_rope_ref(
    h: torch.Tensor,  # [num_tokens, hidden], the previous sub-block's output (or the embeddings)
    residual: torch.Tensor | None,  # [num_tokens, hidden], the residual stream before h; None in layer 0
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q rotated [num_tokens, num_q_heads, head_dim], residual_out = h + residual, or h in layer 0);
    the rotated k and v go to their cache slots. The qkv projection's output is rounded to the activations'
    dtype, as nn.Linear gives it, before the rotation."""
    normed, residual_out = rmsnorm_ref(h, norm_scale, eps, residual)
    q, k, v = split_qkv(F.linear(normed, qkv_weight, qkv_bias), num_q_heads, num_kv_heads)
    q_rot, _ = rope_and_cache_write_ref(q, k, v, positions, inv_freq, concentration, k_cache, v_cache,
                                        slot_mapping)
    return q_rot, residual_out
