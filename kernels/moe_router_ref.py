"""The front of the MoE sub-block, plain torch: residual add and RMSNorm, router logits, top-k routing, and the
expert load counts. The twin of moe_router.norm_and_route, and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptoss_serve.kernels.moe_ref import route_ref
from gptoss_serve.kernels.rmsnorm_ref import rmsnorm_ref


def count_routed_pairs(
    expert_counts: torch.Tensor,  # [num_experts] int64, added to in place
    expert_ids: torch.Tensor,  # [num_tokens, top_k] int
    counted: torch.Tensor,  # [num_tokens] int64: 1 for tokens that count, 0 for CUDA-graph padding rows
) -> None:
    expert_counts.index_add_(0, expert_ids.reshape(-1), counted[:, None].expand(expert_ids.shape).reshape(-1))


def norm_and_route_ref(
    h: torch.Tensor,  # [num_tokens, hidden], the attention sub-block's output
    residual: torch.Tensor,  # [num_tokens, hidden], the residual stream before it
    norm_scale: torch.Tensor,  # [hidden] float32
    eps: float,
    gate_weight: torch.Tensor,  # [num_experts, hidden]
    gate_bias: torch.Tensor,  # [num_experts]
    top_k: int,
    expert_counts: torch.Tensor | None = None,  # [num_experts] int64, added to in place when given
    counted: torch.Tensor | None = None,  # [num_tokens] int64, which tokens add to expert_counts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (normed [num_tokens, hidden], residual_out = h + residual, expert weights [num_tokens, top_k]
    float32, expert ids [num_tokens, top_k] int32): RMSNorm of the new residual stream, then route_ref of the
    router's logits (rounded to the activations' dtype, as nn.Linear gives them)."""
    normed, residual_out = rmsnorm_ref(h, norm_scale, eps, residual)
    expert_weights, expert_ids = route_ref(F.linear(normed, gate_weight, gate_bias), top_k)
    if expert_counts is not None:
        count_routed_pairs(expert_counts, expert_ids, counted)
    return normed, residual_out, expert_weights, expert_ids
