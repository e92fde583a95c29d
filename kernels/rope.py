"""Rotary embedding on q and k fused with storing k and v into the paged KV cache (Triton).

The twin of rope_ref.rope_and_cache_write_ref: NeoX half-split pairs, angles = position * inv_freq in float32,
cos and sin both multiplied by the YaRN concentration. One program per token does all of its heads, so cos/sin
are computed once per token and k is rotated, returned and cached in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.triton_utils import cast_rne, emulate_bf16, launch, next_pow2, pdl_args, pdl_wait


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, inv_freq_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    concentration, num_q_heads, num_kv_heads, half,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, block_size,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, EMULATE_BF16: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)  # q, k and v come from the kernel before
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    in_half = dims < half
    position = tl.load(positions_ptr + token).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + dims, mask=in_half, other=0.0)
    angle = position * inv_freq  # [1, BLOCK_HALF]
    cos = tl.cos(angle) * concentration
    sin = tl.sin(angle) * concentration
    head_dim = 2 * half

    # q: rotate and write to the contiguous output [num_tokens, num_q_heads, head_dim].
    q_mask = (heads < num_q_heads) & in_half
    q_row = q_ptr + token * stride_q_token + heads * stride_q_head
    q1 = tl.load(q_row + dims, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_row + half + dims, mask=q_mask, other=0.0).to(tl.float32)
    q_out_row = q_out_ptr + (token * num_q_heads + heads) * head_dim
    out_type = q_out_ptr.dtype.element_ty
    tl.store(q_out_row + dims, cast_rne(q1 * cos - q2 * sin, out_type, EMULATE_BF16), mask=q_mask)
    tl.store(q_out_row + half + dims, cast_rne(q2 * cos + q1 * sin, out_type, EMULATE_BF16), mask=q_mask)

    # k: rotate, write to the output and to the cache slot; v: copy to the cache slot.
    kv_mask = (heads < num_kv_heads) & in_half
    k_row = k_ptr + token * stride_k_token + heads * stride_k_head
    k1 = tl.load(k_row + dims, mask=kv_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_row + half + dims, mask=kv_mask, other=0.0).to(tl.float32)
    k1_rot = cast_rne(k1 * cos - k2 * sin, k_out_ptr.dtype.element_ty, EMULATE_BF16)
    k2_rot = cast_rne(k2 * cos + k1 * sin, k_out_ptr.dtype.element_ty, EMULATE_BF16)
    k_out_row = k_out_ptr + (token * num_kv_heads + heads) * head_dim
    tl.store(k_out_row + dims, k1_rot, mask=kv_mask)
    tl.store(k_out_row + half + dims, k2_rot, mask=kv_mask)

    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:  # a negative slot means: don't store this token (padding, or a cache-less pass)
        cache_offset = (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_slot \
            + heads * stride_cache_head
        tl.store(k_cache_ptr + cache_offset + dims, k1_rot.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(k_cache_ptr + cache_offset + half + dims, k2_rot.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        v_row = v_ptr + token * stride_v_token + heads * stride_v_head
        v1 = tl.load(v_row + dims, mask=kv_mask, other=0.0)
        v2 = tl.load(v_row + half + dims, mask=kv_mask, other=0.0)
        tl.store(v_cache_ptr + cache_offset + dims, v1.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(v_cache_ptr + cache_offset + half + dims, v2.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def rope_and_cache_write(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
    concentration: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64: block * block_size + offset; negative = don't store
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k, stores rotated k and v at their cache slots, returns (q_rotated, k_rotated)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    for t in (q, k, v):
        if t.stride(2) != 1:
            raise ValueError("rope_and_cache_write needs head_dim to be contiguous")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k and v caches must share one layout with head_dim contiguous")
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    launch(_rope_cache_kernel, (num_tokens,),
           q, k, v, positions, inv_freq, q_out, k_out, k_cache, v_cache, slot_mapping,
           float(concentration), num_q_heads, num_kv_heads, half,
           q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[1],
           BLOCK_HEADS=next_pow2(num_q_heads), BLOCK_HALF=next_pow2(half), EMULATE_BF16=emulate_bf16(), num_warps=4,
           **pdl_args(q.device))
    return q_out, k_out
