"""RMSNorm fused with the residual add: the plain-torch twin of the Triton kernel, and the CPU path."""

from __future__ import annotations

import torch


def rmsnorm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    scale: torch.Tensor,  # [hidden] float32
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, residual_out): residual_out = x + residual (or x), normed = RMSNorm(residual_out).

    Computed in float32, as the reference does, then cast back to x's dtype. Fusing the add lets the
    GPU kernel read the residual stream once per sub-block instead of twice.
    """
    h = x if residual is None else x + residual
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(dim=-1, keepdim=True) + eps) * scale.float()
    return normed.to(x.dtype), h
