"""Rotary embedding (NeoX half-split pairs) on q and k, fused with writing k and v into the paged KV cache.

The torch twin of the Triton kernel and the CPU path. The rotation angles come from the caller's
`inv_freq` (YaRN-scaled, [head_dim / 2]) and `concentration` (YaRN's attention factor, multiplying both cos and
sin), so the kernel knows nothing about YaRN itself.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor,  # [num_tokens] int
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
    concentration: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_tokens, head_dim // 2] float32, built in float32 as the reference does."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return torch.cos(angles) * concentration, torch.sin(angles) * concentration


def apply_rope_ref(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, head_dim // 2] float32
    sin: torch.Tensor,  # [num_tokens, head_dim // 2] float32
) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_and_cache_write_ref(
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
    cos, sin = rope_cos_sin(positions, inv_freq, concentration)
    q_rot = apply_rope_ref(q, cos, sin)
    k_rot = apply_rope_ref(k, cos, sin)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k_rot[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)
    return q_rot, k_rot
