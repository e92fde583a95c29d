"""Which part of each full checkpoint tensor a rank holds under a ShardLayout.

A rank's tensor is the concatenation, along dim 0, of one or more pieces of the full tensor, each an index of
slices (dim 0 first). Reading a piece through the checkpoint's memory map touches only its bytes, so a rank of
gpt-oss-120b over two GPUs reads about half of the experts. A bias whose sum lives on another rank is zeros.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from gptoss_serve.kernels.mxfp4 import MXFP4_BLOCK_SIZE
from gptoss_serve.model.config import ModelConfig
from gptoss_serve.model.parallel import ShardLayout

Index = tuple[slice, ...]
ALL = slice(None)

_LAYER_NAME = re.compile(r"block\.\d+\.(.+)")


def local_pieces(name: str, config: ModelConfig, layout: ShardLayout) -> list[Index] | None:
    """The pieces of full tensor `name` this rank holds, in order; None means a zero tensor (see module doc)."""
    match = _LAYER_NAME.fullmatch(name)
    if match is None or layout.world_size == 1:
        return [(ALL,)]  # embedding, final norm, unembedding: replicated
    part = match.group(1)
    d, a = config.head_dim, layout.attn_rank
    q_heads, kv_heads = layout.num_q_heads(config), layout.num_kv_heads(config)
    experts, inter = layout.expert_slice(config), layout.intermediate_slice(config)
    rows_1 = slice(2 * inter.start, 2 * inter.stop)  # gate/linear pairs stay together
    blocks_2 = slice(inter.start // MXFP4_BLOCK_SIZE, inter.stop // MXFP4_BLOCK_SIZE)
    if part in ("attn.qkv.weight", "attn.qkv.bias"):
        q0, k0, v0 = 0, config.q_size, config.q_size + config.kv_size
        q_rows, kv_rows = q_heads * d, kv_heads * d
        return [(slice(q0 + a * q_rows, q0 + (a + 1) * q_rows),),
                (slice(k0 + a * kv_rows, k0 + (a + 1) * kv_rows),),
                (slice(v0 + a * kv_rows, v0 + (a + 1) * kv_rows),)]
    if part == "attn.sinks":
        return [(slice(a * q_heads, (a + 1) * q_heads),)]
    if part == "attn.out.weight":
        return [(ALL, slice(a * q_heads * d, (a + 1) * q_heads * d))]
    if part == "attn.out.bias":
        return [(ALL,)] if layout.owns_attn_out_bias() else None
    if part in ("mlp.mlp1_weight.blocks", "mlp.mlp1_weight.scales", "mlp.mlp1_bias"):
        return [(experts, rows_1)]
    if part in ("mlp.mlp2_weight.blocks", "mlp.mlp2_weight.scales"):
        return [(experts, ALL, blocks_2)]
    if part == "mlp.mlp2_bias":
        return [(experts,)] if layout.owns_mlp2_bias() else None
    return [(ALL,)]  # norms and the router: replicated


def local_tensor(name: str, config: ModelConfig, layout: ShardLayout, shape: tuple[int, ...], dtype: torch.dtype,
                 read: Callable[[Index], torch.Tensor]) -> torch.Tensor:
    """This rank's tensor `name` of local `shape`, reading each piece with `read(index)`."""
    pieces = local_pieces(name, config, layout)
    if pieces is None:
        return torch.zeros(shape, dtype=dtype)
    tensors = [read(index) for index in pieces]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
