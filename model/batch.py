"""What one forward step needs to know about its batch, and the paged KV cache it reads and writes.

A step runs a flat list of tokens from several sequences (decodes and prefill chunks mixed). Sequence b owns
tokens cu_seqlens_q[b]:cu_seqlens_q[b+1]; they are the last of its context_lens[b] tokens, whose keys and values
live in cache blocks listed by block_tables[b].
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from gptoss_serve.model.config import ModelConfig


@dataclasses.dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32, this step's tokens included
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot (block * block_size + offset) of each token
    logits_indices: torch.Tensor  # [num_outputs] int64, tokens whose next-token logits are wanted

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def to(self, device: torch.device | str) -> "ForwardBatch":
        return ForwardBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def build_forward_batch(
    new_token_ids: Sequence[Sequence[int]],  # per sequence, this step's tokens
    num_cached_tokens: Sequence[int],  # per sequence, tokens already in the cache before this step
    block_tables: Sequence[Sequence[int]],  # per sequence, its cache blocks in order
    block_size: int,
    all_logits: bool = False,  # logits for every token (scoring a prompt) instead of each sequence's last
) -> ForwardBatch:
    """Flattens a step's sequences into the tensors the model and kernels take (on CPU)."""
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    cu_seqlens_q = [0]
    context_lens = []
    for tokens, num_cached, blocks in zip(new_token_ids, num_cached_tokens, block_tables, strict=True):
        if not tokens:
            raise ValueError("every sequence in a step needs at least one new token")
        start = len(token_ids)
        for i, token in enumerate(tokens):
            pos = num_cached + i
            token_ids.append(token)
            positions.append(pos)
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        cu_seqlens_q.append(len(token_ids))
        context_lens.append(num_cached + len(tokens))
        logits_indices.extend(range(start, len(token_ids)) if all_logits else [len(token_ids) - 1])
    max_blocks = max(len(b) for b in block_tables)
    table = torch.zeros(len(block_tables), max_blocks, dtype=torch.int32)
    for b, blocks in enumerate(block_tables):
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return ForwardBatch(
        token_ids=torch.tensor(token_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
    )


@dataclasses.dataclass
class KVCache:
    """Per layer, key and value blocks [num_blocks, block_size, num_kv_heads_local, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @staticmethod
    def allocate(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_kv_heads: int | None = None) -> "KVCache":
        shape = (num_blocks, block_size, num_kv_heads or config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        return KVCache(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                       v=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers])

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype,
                        num_kv_heads: int | None = None) -> int:
        per_layer = 2 * block_size * (num_kv_heads or config.num_key_value_heads) * config.head_dim
        return per_layer * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()
