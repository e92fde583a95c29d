"""The `triton` kernel backend: the same ops as TorchKernels, run by the Triton kernels beside this file.

Imported lazily by backend.get_kernels("triton"), so that the torch path never needs Triton. On CUDA tensors
the kernels are compiled; on CPU tensors they run in Triton's interpreter when TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import weakref

import torch

from gptoss_serve.kernels.attention_decode import paged_attention_decode
from gptoss_serve.kernels.attention_prefill import paged_attention_prefill
from gptoss_serve.kernels.backend import register_backend
from gptoss_serve.kernels.moe_matmul import moe_experts, split_nibbles
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

    def __init__(self) -> None:
        # Expert weight buffers that prepare_weights re-laid out, by identity: moe_experts must know which
        # layout it is handed (tests pass checkpoint-layout tensors too).
        self._split_blocks: dict[int, weakref.ref] = {}

    def prepare_weights(self, model: torch.nn.Module) -> None:
        """Re-lays out every expert weight's MXFP4 bytes in place (`split_nibbles`: same bytes per block, so the
        weights stay MXFP4 and no second copy is kept), one expert at a time to keep the temporary small.

        Call it once the model is on its device (the loaders do): moving the model afterwards makes new
        tensors that this backend no longer recognises as re-laid out. The torch backend cannot read them."""
        for block in getattr(model, "block", []):
            for weight in (block.mlp.mlp1_weight, block.mlp.mlp2_weight):
                blocks = weight.blocks
                if self._is_split(blocks):
                    continue
                with torch.no_grad():
                    for e in range(blocks.shape[0]):
                        blocks[e].copy_(split_nibbles(blocks[e]))
                self._split_blocks[id(blocks)] = weakref.ref(blocks)

    def _is_split(self, blocks: torch.Tensor) -> bool:
        ref = self._split_blocks.get(id(blocks))
        return ref is not None and ref() is blocks

    def moe_experts(self, x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                    swiglu_alpha, swiglu_limit, first_expert=0):
        split = self._is_split(w1_blocks)
        if split != self._is_split(w2_blocks):
            raise ValueError("w1 and w2 blocks must both be in the checkpoint layout or both re-laid out")
        return moe_experts(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                           swiglu_alpha, swiglu_limit, first_expert, split_nibbles=split)


register_backend("triton", TritonKernels)
