"""RMSNorm fused with the residual add (Triton); the twin of rmsnorm_ref.

One program per token row: the row is read once (plus the residual row), the sum is rounded to the input dtype
exactly as the reference's bf16 add does, and both the new residual stream and the normed row are written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptoss_serve.kernels.triton_utils import cast_rne, emulate_bf16, launch, next_pow2, pdl_args, pdl_wait


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, scale_ptr, normed_ptr, residual_out_ptr,
    hidden, stride_x, stride_residual, stride_normed, stride_residual_out, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, EMULATE_BF16: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)  # the rows come from the kernel before
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < hidden
    h = tl.load(x_ptr + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + cols, mask=in_row, other=0.0).to(tl.float32)
        # The reference adds in the activation dtype: round the sum before normalising it.
        h = cast_rne(h + r, residual_out_ptr.dtype.element_ty, EMULATE_BF16)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, h, mask=in_row)
        h = h.to(tl.float32)
    mean_square = tl.sum(h * h, axis=0) / hidden
    scale = tl.load(scale_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    normed = h * (1.0 / tl.sqrt(mean_square + eps)) * scale
    tl.store(normed_ptr + row * stride_normed + cols, cast_rne(normed, normed_ptr.dtype.element_ty, EMULATE_BF16),
             mask=in_row)


def rmsnorm(
    x: torch.Tensor,  # [num_tokens, hidden]
    scale: torch.Tensor,  # [hidden] float32
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, residual_out) with residual_out = x + residual (or x itself), as rmsnorm_ref."""
    num_tokens, hidden = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rmsnorm needs rows with unit column stride")
    normed = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    if num_tokens == 0:
        return normed, residual_out
    block = next_pow2(hidden)
    residual_arg = residual if residual is not None else x
    launch(_rmsnorm_kernel, (num_tokens,),
           x, residual_arg, scale, normed, residual_out,
           hidden, x.stride(0), residual_arg.stride(0), normed.stride(0), residual_out.stride(0), eps,
           HAS_RESIDUAL=residual is not None, BLOCK=block, EMULATE_BF16=emulate_bf16(),
           num_warps=4 if block <= 2048 else 8, **pdl_args(x.device))
    return normed, residual_out
