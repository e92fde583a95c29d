"""Tensor names, shapes and dtypes of the two gpt-oss checkpoint layouts.

Canonical names are the original layout's (`original/*.safetensors` in the hub repository). The Hugging Face
layout renames every tensor and splits the fused qkv projection by rows into q, k and v; its MXFP4 expert
blocks and scales are the original bytes under new names. A `StoredPart` says which stored tensor holds which
rows of a canonical tensor, so the reader and the writer share one mapping.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from gptoss_serve.kernels.mxfp4 import MXFP4_BLOCK_SIZE, MXFP4_BYTES_PER_BLOCK
from gptoss_serve.model.config import ModelConfig

LAYOUTS = ("original", "hf")

TensorSpec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype)


@dataclasses.dataclass(frozen=True)
class StoredPart:
    """One tensor as a file stores it: rows [row_start, row_stop) of a canonical tensor."""
    stored_name: str
    canonical_name: str
    row_start: int
    row_stop: int
    shape: tuple[int, ...]  # the stored shape: [row_stop - row_start, *canonical shape[1:]]
    dtype: torch.dtype


# Per-layer canonical suffix -> Hugging Face suffix under `model.layers.{n}.`; qkv is split, so it is not here.
_HF_LAYER_RENAMES = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_HF_GLOBAL_RENAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}
_BLOCK_NAME = re.compile(r"block\.(\d+)\.(.+)")


def expected_tensors(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every canonical tensor of a checkpoint for `config`, in file order, with its shape and dtype."""
    bf16, u8 = torch.bfloat16, torch.uint8
    hidden, num_experts = config.hidden_size, config.num_experts
    mlp1_rows = 2 * config.intermediate_size  # gate and up rows interleaved
    hidden_blocks = hidden // MXFP4_BLOCK_SIZE  # MXFP4 blocks along mlp1's input
    intermediate_blocks = config.intermediate_size // MXFP4_BLOCK_SIZE  # ... and along mlp2's input
    tensors: dict[str, TensorSpec] = {"embedding.weight": ((config.vocab_size, hidden), bf16)}
    for n in range(config.num_hidden_layers):
        layer = {
            "attn.norm.scale": ((hidden,), bf16),
            "attn.qkv.weight": ((config.qkv_size, hidden), bf16),
            "attn.qkv.bias": ((config.qkv_size,), bf16),
            "attn.sinks": ((config.num_attention_heads,), bf16),  # one per query head
            "attn.out.weight": ((hidden, config.q_size), bf16),
            "attn.out.bias": ((hidden,), bf16),
            "mlp.norm.scale": ((hidden,), bf16),
            "mlp.gate.weight": ((num_experts, hidden), bf16),  # the router
            "mlp.gate.bias": ((num_experts,), bf16),
            "mlp.mlp1_weight.blocks": ((num_experts, mlp1_rows, hidden_blocks, MXFP4_BYTES_PER_BLOCK), u8),
            "mlp.mlp1_weight.scales": ((num_experts, mlp1_rows, hidden_blocks), u8),
            "mlp.mlp1_bias": ((num_experts, mlp1_rows), bf16),
            "mlp.mlp2_weight.blocks": ((num_experts, hidden, intermediate_blocks, MXFP4_BYTES_PER_BLOCK), u8),
            "mlp.mlp2_weight.scales": ((num_experts, hidden, intermediate_blocks), u8),
            "mlp.mlp2_bias": ((num_experts, hidden), bf16),
        }
        tensors.update({f"block.{n}.{suffix}": spec for suffix, spec in layer.items()})
    tensors["norm.scale"] = ((hidden,), bf16)
    tensors["unembedding.weight"] = ((config.vocab_size, hidden), bf16)
    return tensors


def stored_parts(config: ModelConfig, layout: str) -> dict[str, list[StoredPart]]:
    """canonical name -> the stored tensors that make it up in `layout`, in row order, in file order."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    parts = {}
    for canonical_name, (shape, dtype) in expected_tensors(config).items():
        if layout == "original":
            row_ranges = [(canonical_name, 0, shape[0])]
        elif canonical_name in _HF_GLOBAL_RENAMES:
            row_ranges = [(_HF_GLOBAL_RENAMES[canonical_name], 0, shape[0])]
        else:
            row_ranges = _hf_layer_row_ranges(canonical_name, shape[0], config)
        parts[canonical_name] = [
            StoredPart(stored_name, canonical_name, start, stop, (stop - start, *shape[1:]), dtype)
            for stored_name, start, stop in row_ranges]
    return parts


def stored_tensors(config: ModelConfig, layout: str) -> dict[str, StoredPart]:
    """stored name -> its part, in file order."""
    return {part.stored_name: part for parts in stored_parts(config, layout).values() for part in parts}


def _hf_layer_row_ranges(canonical_name: str, num_rows: int, config: ModelConfig) -> list[tuple[str, int, int]]:
    """(HF name, row_start, row_stop) for a per-layer canonical tensor."""
    layer_idx, suffix = _BLOCK_NAME.fullmatch(canonical_name).groups()
    prefix = f"model.layers.{layer_idx}."
    if suffix in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]  # weight or bias
        q_stop, k_stop = config.q_size, config.q_size + config.kv_size
        return [(f"{prefix}self_attn.q_proj.{kind}", 0, q_stop),
                (f"{prefix}self_attn.k_proj.{kind}", q_stop, k_stop),
                (f"{prefix}self_attn.v_proj.{kind}", k_stop, num_rows)]
    return [(prefix + _HF_LAYER_RENAMES[suffix], 0, num_rows)]


def layout_of_name(stored_name: str) -> str | None:
    """'original' or 'hf' from the name alone (no config needed), None for a name of neither layout."""
    if stored_name.startswith("block.") or stored_name in _HF_GLOBAL_RENAMES:
        return "original"
    if stored_name.startswith("model.") or stored_name == "lm_head.weight":
        return "hf"
    return None



# safetensors header dtype tags. The checkpoints hold only BF16 and U8; the others let a wrong file be named.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPE_TAGS: dict[torch.dtype, str] = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}
