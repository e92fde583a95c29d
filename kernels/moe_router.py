"""The front of the MoE sub-block in two launches (Triton): residual add, RMSNorm and the router's logits in
one, top-k with the softmax over those k (and the expert load counts) in the other. The twin of
moe_router_ref.norm_and_route_ref.

Composed, that front is four or five launches a layer (RMSNorm, cuBLAS's split-K matrix-vector product and its
reduce, top-k, and index_add when the load is counted): at one token about 10 us of a 60 us MoE layer on an
H200 (docs/PERFORMANCE.md, moe-launches), almost all of it launch and drain, since the router reads only
num_experts x hidden bf16 (184 KB for 20b, 737 KB for 120b).

The logits kernel's program (token, group of EXPERTS_PER_PROGRAM experts) issues one load of its experts'
whole router rows, computes the new residual row and its norm meanwhile, and reduces the float32 products of
the normed row with each router row; group 0 also writes the new residual and normed rows. Whole rows, not
chunks of them: a chunked loop converts each normed chunk to the weights' layout through shared memory, and
its barriers kept the next chunk's loads from being issued early (SASS: 20 barriers). Every program redoes the
norm (a row is 11 KB, against 46 KB of router weights at 8 experts), so no program waits for another. The
logits are stored as nn.Linear gives them, and moe_routing.route takes the top-k.

Every token's programs read all of the router weight, so this suits decode-sized steps; larger steps
(`max_fused_tokens`) run the composed path, where one matrix multiply reads the weight once for all tokens.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gptoss_serve.kernels.moe_routing import route
from gptoss_serve.kernels.rmsnorm import rmsnorm
from gptoss_serve.kernels.triton_utils import cast_rne, emulate_bf16, launch, next_pow2, pdl_args, pdl_wait

# Steps of up to FUSED_MAX_TOKENS tokens, and of up to FUSED_MAX_LOGITS logits (tokens x experts), take the
# logits kernel (GPTOSS_FUSED_ROUTER_MAX_TOKENS sets the first for a process; 0 turns the kernel off). Every
# token's programs read all of the router weight: on an H200 (2026-12-06, `python3 -m gptoss_serve.kernels.bench
# --sections router`) the fused front took 5.6 / 6.4 / 7.3 us at 1 / 8 / 64 tokens of 20b against 10.3 / 11.7 /
# 12.5 composed, and 7.8 / 8.1 us at 1 / 8 tokens of 120b against 13.4, but 17.3 against 14.6 at 64 tokens of
# 120b (8,192 logits): so 20b fuses up to 64 tokens, 120b up to 16.
FUSED_MAX_TOKENS = int(os.environ.get("GPTOSS_FUSED_ROUTER_MAX_TOKENS", "64"))
FUSED_MAX_LOGITS = 2048
EXPERTS_PER_PROGRAM = 8


@triton.jit
def _norm_logits_kernel(
    h_ptr, residual_ptr, norm_scale_ptr, gate_w_ptr, gate_b_ptr, normed_ptr, residual_out_ptr, logits_ptr,
    num_experts, stride_h, stride_residual, stride_normed, stride_residual_out, stride_gate, stride_logits, eps,
    HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, EXPERTS_PER_PROGRAM: tl.constexpr,
    EMULATE_BF16: tl.constexpr, PDL: tl.constexpr,
):
    """Program (token row, expert group). All arithmetic is float32 (loads upcast), so the interpreter's bf16
    bugs never apply; roundings to bf16 go through cast_rne."""
    pdl_wait(PDL)  # the rows come from the kernel before
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK_HIDDEN)
    in_row = cols < HIDDEN
    experts = group * EXPERTS_PER_PROGRAM + tl.arange(0, EXPERTS_PER_PROGRAM)
    in_experts = experts < num_experts
    # The group's router rows and the norm's scale first, so that their latency overlaps the norm's sum.
    w = tl.load(gate_w_ptr + experts[:, None].to(tl.int64) * stride_gate + cols[None, :],
                mask=in_experts[:, None] & in_row[None, :], other=0.0)  # [EXPERTS_PER_PROGRAM, BLOCK_HIDDEN]
    scale = tl.load(norm_scale_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    # The new residual row and its norm, as rmsnorm's kernel computes them (same roundings, same sum).
    s = (tl.load(h_ptr + row * stride_h + cols, mask=in_row, other=0.0).to(tl.float32)
         + tl.load(residual_ptr + row * stride_residual + cols, mask=in_row, other=0.0).to(tl.float32))
    s = cast_rne(s, residual_out_ptr.dtype.element_ty, EMULATE_BF16)  # [BLOCK_HIDDEN]
    s32 = s.to(tl.float32)
    mean_square = tl.sum(s32 * s32, axis=0) / HIDDEN
    x = cast_rne(s32 * (1.0 / tl.sqrt(mean_square + eps)) * scale, normed_ptr.dtype.element_ty, EMULATE_BF16)
    writes = in_row & (cols * 0 + group == 0)  # group 0 writes the rows (a vector mask: the interpreter wants one)
    tl.store(residual_out_ptr + row * stride_residual_out + cols, s, mask=writes)
    tl.store(normed_ptr + row * stride_normed + cols, x, mask=writes)
    # The logits as nn.Linear gives them: float32 sums plus the bias, rounded to the output dtype.
    logits = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    logits += tl.load(gate_b_ptr + experts, mask=in_experts, other=0.0).to(tl.float32)
    tl.store(logits_ptr + row * stride_logits + experts,
             cast_rne(logits, logits_ptr.dtype.element_ty, EMULATE_BF16), mask=in_experts)


def norm_and_route(
    h: torch.Tensor,  # [num_tokens, hidden], the attention sub-block's output
    residual: torch.Tensor,  # [num_tokens, hidden]
    norm_scale: torch.Tensor,  # [hidden] float32
    eps: float,
    gate_weight: torch.Tensor,  # [num_experts, hidden]
    gate_bias: torch.Tensor,  # [num_experts]
    top_k: int,
    expert_counts: torch.Tensor | None = None,  # [num_experts] int64, added to in place when given
    counted: torch.Tensor | None = None,  # [num_tokens] int64
    max_fused_tokens: int | None = None,  # None: FUSED_MAX_TOKENS and FUSED_MAX_LOGITS
    experts_per_program: int = EXPERTS_PER_PROGRAM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed, residual_out, expert weights [num_tokens, top_k] float32, expert ids [num_tokens, top_k] int32),
    as norm_and_route_ref. The path is chosen from shapes alone, so CUDA graphs capture it."""
    num_tokens, hidden = h.shape
    num_experts = gate_weight.shape[0]
    limit = FUSED_MAX_TOKENS if max_fused_tokens is None else max_fused_tokens
    too_many_logits = max_fused_tokens is None and num_tokens * num_experts > FUSED_MAX_LOGITS
    if num_tokens > limit or too_many_logits:
        normed, residual_out = rmsnorm(h, norm_scale, eps, residual)
        expert_weights, expert_ids = route(F.linear(normed, gate_weight, gate_bias), top_k, expert_counts, counted)
        return normed, residual_out, expert_weights, expert_ids
    if h.stride(1) != 1 or residual.stride(1) != 1 or gate_weight.stride(1) != 1:
        raise ValueError("norm_and_route needs rows with unit column stride (activations and router weight)")
    normed, residual_out = torch.empty_like(h), torch.empty_like(h)
    logits = torch.empty((num_tokens, num_experts), dtype=h.dtype, device=h.device)  # as F.linear's output
    if num_tokens > 0:
        block_hidden = next_pow2(hidden)
        launch(_norm_logits_kernel, (num_tokens, triton.cdiv(num_experts, experts_per_program)),
               h, residual, norm_scale, gate_weight, gate_bias, normed, residual_out, logits,
               num_experts, h.stride(0), residual.stride(0), normed.stride(0), residual_out.stride(0),
               gate_weight.stride(0), logits.stride(0), eps,
               HIDDEN=hidden, BLOCK_HIDDEN=block_hidden, EXPERTS_PER_PROGRAM=experts_per_program,
               EMULATE_BF16=emulate_bf16(), **pdl_args(h.device),
               num_warps=4 if block_hidden <= 2048 else 8)  # rmsnorm's, so that the mean square sums alike
    expert_weights, expert_ids = route(logits, top_k, expert_counts, counted)
    return normed, residual_out, expert_weights, expert_ids
