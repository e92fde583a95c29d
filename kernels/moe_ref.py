"""Mixture-of-experts with MXFP4 expert weights: routing and the two expert matmuls, in plain torch.

The twin of the Triton MoE kernels and the CPU path. Experts are dequantized one at a time, only those that
received tokens, so the weights stay MXFP4 in memory.

Parallel layouts: a rank holding experts [first_expert, first_expert + num_local_experts) skips tokens routed
elsewhere (expert parallelism); a rank holding a slice of the intermediate dimension gets w1 rows and w2
columns for that slice and no w2 bias except on one rank (tensor parallelism). Either way the caller sums the
ranks' outputs.
"""

from __future__ import annotations

import torch

from gptoss_serve.kernels.mxfp4 import dequantize_mxfp4


def route_ref(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token, weighted by a softmax over just those k logits (not over all experts).

    Returns (weights [num_tokens, top_k] float32, expert_ids [num_tokens, top_k] int32), best first.
    """
    values, expert_ids = torch.topk(router_logits, top_k, dim=-1, sorted=True)
    return torch.softmax(values.float(), dim=-1), expert_ids.to(torch.int32)


def swiglu_ref(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """h [..., 2n] with gate and linear interleaved (even, odd columns) -> [..., n], in float32.

    The gate is clamped from above only, the linear part on both sides; the linear part gets a +1.
    """
    gate, linear = h[..., 0::2].float(), h[..., 1::2].float()
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def moe_experts_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    expert_weights: torch.Tensor,  # [num_tokens, top_k] float32
    expert_ids: torch.Tensor,  # [num_tokens, top_k] int, global expert ids
    w1_blocks: torch.Tensor,  # [num_local_experts, 2 * intermediate_local, hidden / 32, 16] uint8
    w1_scales: torch.Tensor,  # [num_local_experts, 2 * intermediate_local, hidden / 32] uint8
    b1: torch.Tensor,  # [num_local_experts, 2 * intermediate_local]
    w2_blocks: torch.Tensor,  # [num_local_experts, hidden, intermediate_local / 32, 16] uint8
    w2_scales: torch.Tensor,  # [num_local_experts, hidden, intermediate_local / 32] uint8
    b2: torch.Tensor | None,  # [num_local_experts, hidden]; None on tensor-parallel ranks but one
    swiglu_alpha: float,
    swiglu_limit: float,
    first_expert: int = 0,
) -> torch.Tensor:  # [num_tokens, hidden] in x's dtype
    num_local_experts = w1_blocks.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    local_ids = expert_ids.long() - first_expert  # [num_tokens, top_k]
    for e in torch.unique(local_ids).tolist():
        if not 0 <= e < num_local_experts:
            continue
        token_idx, slot_idx = torch.nonzero(local_ids == e, as_tuple=True)
        w1 = dequantize_mxfp4(w1_blocks[e], w1_scales[e], x.dtype)  # [2 * intermediate_local, hidden]
        w2 = dequantize_mxfp4(w2_blocks[e], w2_scales[e], x.dtype)  # [hidden, intermediate_local]
        h = x[token_idx] @ w1.T + b1[e].to(x.dtype)  # [n, 2 * intermediate_local]
        a = swiglu_ref(h, swiglu_alpha, swiglu_limit).to(x.dtype)  # [n, intermediate_local]
        y = a @ w2.T  # [n, hidden]
        if b2 is not None:
            y = y + b2[e].to(x.dtype)
        out.index_add_(0, token_idx, y.float() * expert_weights[token_idx, slot_idx, None])
    return out.to(x.dtype)
