"""The `triton` kernel backend: the same ops as TorchKernels, run by the Triton kernels beside this file.

Imported lazily by backend.get_kernels("triton"), so that the torch path never needs Triton. On CUDA tensors
the kernels are compiled; on CPU tensors they run in Triton's interpreter when TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch

from gptoss_serve.kernels.attention_decode import paged_attention_decode
from gptoss_serve.kernels.attention_prefill import paged_attention_prefill
from gptoss_serve.kernels.backend import register_backend
from gptoss_serve.kernels.moe_matmul import moe_experts
from gptoss_serve.kernels.moe_routing import route
from gptoss_serve.kernels.rmsnorm import rmsnorm
from gptoss_serve.kernels.rope import rope_and_cache_write


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim], rotary already applied
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, new tokens included
    sinks: torch.Tensor,  # [num_q_heads] float32
    sm_scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:  # [num_tokens, num_q_heads, head_dim]
    """Decode kernel when every sequence brings one token (as many tokens as sequences: every sequence has at
    least one), else the prefill kernel; decided from shapes alone, so it is graph-safe."""
    if q.shape[0] == context_lens.shape[0]:
        return paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, sinks, sm_scale,
                                      sliding_window)
    return paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sinks,
                                   sm_scale, sliding_window)


class TritonKernels:
    """Triton twins of TorchKernels' ops, same methods and signatures."""

    name = "triton"

    rmsnorm = staticmethod(rmsnorm)
    rope_and_cache_write = staticmethod(rope_and_cache_write)
    paged_attention = staticmethod(paged_attention)
    route = staticmethod(route)
    moe_experts = staticmethod(moe_experts)

    def prepare_weights(self, model: torch.nn.Module) -> None:
        """The MoE kernels read the checkpoint's MXFP4 bytes and scales as they are: nothing to re-lay out."""


register_backend("triton", TritonKernels)
