"""The `triton` kernel backend: the same ops as TorchKernels, run by the Triton kernels beside this file.

Imported lazily by backend.get_kernels("triton"), so that the torch path never needs Triton. On CUDA tensors
the kernels are compiled; on CPU tensors they run in Triton's interpreter when TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import weakref

import torch

from gptoss_serve.kernels.attention_decode import paged_attention_decode
from gptoss_serve.kernels.attention_front import norm_qkv_rope
from gptoss_serve.kernels.attention_prefill import paged_attention_prefill
from gptoss_serve.kernels.backend import register_backend
from gptoss_serve.kernels.moe_matmul import FOLD_MAX_SCALE, moe_experts
from gptoss_serve.kernels.moe_router import norm_and_route
from gptoss_serve.kernels.moe_wgmma import scales_fit_f16
from gptoss_serve.kernels.rmsnorm import rmsnorm
from gptoss_serve.kernels.weight_layout import (merge_nibbles, split_nibbles, swizzle_bits, tile_rows, unswizzle_bits,
                                                untile_rows)


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
    norm_qkv_rope = staticmethod(norm_qkv_rope)
    paged_attention = staticmethod(paged_attention)
    norm_and_route = staticmethod(norm_and_route)

    # Rows per tile of the serving layout (`tile_rows`): a K step of a 64-row weight tile reads one contiguous
    # run of bytes. H200, 2026-11-22: 3-5% off the grouped matmuls at 2-64 tokens, and with it the 1-token
    # split-K path goes from 77 to 71 us (20b).
    ROW_TILE = 64
    # The swizzled bit layout (`swizzle_bits`): dequantizes in ~2 instructions a weight instead of ~4. H200,
    # 2026-11-22: one token's MoE layer 69 -> 61 us (CUDA cores), but the tensor-core paths, which must read it
    # as whole words (eight dots of K = BLOCK_K / 8 a step), ran 2x slower at 8-4096 tokens (201 -> 416 us at
    # 8, 3.05 -> 6.04 ms at 4096). Off until the tensor-core paths read it as fast.
    SWIZZLE = False

    def __init__(self) -> None:
        # Expert weight buffers that prepare_weights re-laid out, by identity, with their row tile and whether
        # their layer's scale bytes all allow the folded multiplier: moe_experts must know which layout it is
        # handed (tests pass checkpoint-layout tensors too).
        self._split_blocks: dict[int, tuple[weakref.ref, int, bool]] = {}

    def prepare_weights(self, model: torch.nn.Module) -> None:
        """Re-lays out every expert weight's MXFP4 bytes in place (`split_nibbles`, `swizzle_bits` if SWIZZLE, then
        `tile_rows` where both of a layer's weights have whole tiles: same bytes, so the weights stay MXFP4 and
        no second copy is kept), one expert at a time to keep the temporary small.

        Call it once the model is on its device (the loaders do): moving the model afterwards makes new
        tensors that this backend no longer recognises as re-laid out. The torch backend cannot read them;
        `checkpoint_blocks` gives an expert's bytes back in the checkpoint's layout."""
        for block in getattr(model, "block", []):
            mlp = block.mlp
            pair = (mlp.mlp1_weight.blocks, mlp.mlp2_weight.blocks)
            tile = self.ROW_TILE if all(b.shape[1] % self.ROW_TILE == 0 for b in pair) else 1
            scales = (mlp.mlp1_weight.scales, mlp.mlp2_weight.scales)
            fold = all(s.numel() == 0 or int(s.max()) <= FOLD_MAX_SCALE for s in scales)
            for s in scales:  # read once here, so that choosing the wgmma kernel later never synchronizes
                scales_fit_f16(s)
            for blocks in pair:
                if self._is_split(blocks):
                    continue
                with torch.no_grad():
                    for e in range(blocks.shape[0]):
                        split = split_nibbles(blocks[e])
                        blocks[e].copy_(tile_rows(swizzle_bits(split) if self.SWIZZLE else split, tile))
                self._split_blocks[id(blocks)] = (weakref.ref(blocks), tile, fold)

    def _entry(self, blocks: torch.Tensor) -> tuple[weakref.ref, int, bool] | None:
        entry = self._split_blocks.get(id(blocks))
        return entry if entry is not None and entry[0]() is blocks else None

    def _layout(self, blocks: torch.Tensor) -> int | None:
        """The row tile of blocks that prepare_weights re-laid out, else None (the checkpoint's layout)."""
        entry = self._entry(blocks)
        return entry[1] if entry is not None else None

    def _is_split(self, blocks: torch.Tensor) -> bool:
        return self._layout(blocks) is not None

    def checkpoint_blocks(self, blocks: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert`'s MXFP4 bytes of `blocks` in the checkpoint's layout, whichever layout they are in."""
        tile = self._layout(blocks)
        if tile is None:
            return blocks[expert]
        untiled = untile_rows(blocks[expert], tile)
        return merge_nibbles(unswizzle_bits(untiled) if self.SWIZZLE else untiled)

    def moe_experts(self, x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                    swiglu_alpha, swiglu_limit, first_expert=0):
        entry, entry2 = self._entry(w1_blocks), self._entry(w2_blocks)
        if (entry is None) != (entry2 is None) or (entry is not None and entry[1:] != entry2[1:]):
            raise ValueError("w1 and w2 blocks must both be in the checkpoint layout or both re-laid out")
        prepared = entry is not None
        return moe_experts(x, expert_weights, expert_ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2,
                           swiglu_alpha, swiglu_limit, first_expert, split_nibbles=prepared,
                           tile_n=entry[1] if prepared else 1, swizzled=prepared and self.SWIZZLE,
                           fold_scales=prepared and entry[2])


register_backend("triton", TritonKernels)
