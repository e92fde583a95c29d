"""What one forward step needs to know about its batch, and the paged KV cache it reads and writes.

A step runs a flat list of tokens from several sequences (decodes and prefill chunks mixed). Sequence b owns
tokens cu_seqlens_q[b]:cu_seqlens_q[b+1]; they are the last of its context_lens[b] tokens, whose keys and values
live in cache blocks listed by block_tables[b].

Sliding-window layers may keep their keys and values in a pool of their own, so that a long context costs blocks
on the full-attention layers only: a sliding layer never reads keys older than the window of its chunk's first
query, so the engine frees those blocks early. Such a batch carries sliding_block_tables and
sliding_slot_mapping for the sliding layers; without them every layer uses block_tables and slot_mapping.
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
    # The sliding layers' own pool, by the same logical block index; entries before the window are never read.
    sliding_block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks_per_seq] int32
    sliding_slot_mapping: torch.Tensor | None = None  # [num_tokens] int64

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def cache_tables(self, sliding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_tables, slot_mapping) of a sliding or a full-attention layer."""
        if sliding and self.sliding_block_tables is not None:
            return self.sliding_block_tables, self.sliding_slot_mapping
        return self.block_tables, self.slot_mapping

    def to(self, device: torch.device | str) -> "ForwardBatch":
        return ForwardBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                               for f in dataclasses.fields(self)})


def build_forward_batch(
    new_token_ids: Sequence[Sequence[int]],  # per sequence, this step's tokens
    num_cached_tokens: Sequence[int],  # per sequence, tokens already in the cache before this step
    block_tables: Sequence[Sequence[int]],  # per sequence, its cache blocks in order
    block_size: int,
    all_logits: bool = False,  # logits for every token (scoring a prompt) instead of each sequence's last
    sliding_block_tables: Sequence[Sequence[int]] | None = None,  # per sequence, its sliding-pool blocks
) -> ForwardBatch:
    """Flattens a step's sequences into the tensors the model and kernels take (on CPU)."""
    token_ids: list[int] = []
    positions: list[int] = []
    logits_indices: list[int] = []
    cu_seqlens_q = [0]
    context_lens = []
    for tokens, num_cached in zip(new_token_ids, num_cached_tokens, strict=True):
        if not tokens:
            raise ValueError("every sequence in a step needs at least one new token")
        start = len(token_ids)
        token_ids.extend(tokens)
        positions.extend(range(num_cached, num_cached + len(tokens)))
        cu_seqlens_q.append(len(token_ids))
        context_lens.append(num_cached + len(tokens))
        logits_indices.extend(range(start, len(token_ids)) if all_logits else [len(token_ids) - 1])
    table, slots = _table_and_slots(block_tables, cu_seqlens_q, positions, block_size)
    sliding_table = sliding_slots = None
    if sliding_block_tables is not None:
        sliding_table, sliding_slots = _table_and_slots(sliding_block_tables, cu_seqlens_q, positions, block_size)
    return ForwardBatch(
        token_ids=torch.tensor(token_ids, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=table,
        slot_mapping=slots,
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64),
        sliding_block_tables=sliding_table,
        sliding_slot_mapping=sliding_slots,
    )


def _table_and_slots(block_tables: Sequence[Sequence[int]], cu_seqlens_q: list[int], positions: list[int],
                     block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded [num_seqs, max_blocks] table and each token's cache slot (block * block_size + offset)."""
    slots = []
    for b, blocks in enumerate(block_tables):
        slots.extend(blocks[pos // block_size] * block_size + pos % block_size
                     for pos in positions[cu_seqlens_q[b]:cu_seqlens_q[b + 1]])
    max_blocks = max(len(b) for b in block_tables)
    table = torch.zeros(len(block_tables), max_blocks, dtype=torch.int32)
    for b, blocks in enumerate(block_tables):
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return table, torch.tensor(slots, dtype=torch.int64)


@dataclasses.dataclass
class KVCache:
    """Per layer, key and value blocks [num_blocks, block_size, num_kv_heads_local, head_dim], stored head-major:
    a KV head's block_size rows of a block are contiguous (strides [heads * block_size * dim, dim, block_size * dim,
    1]), so decode attention, which reads one KV head's rows a program, reads whole runs of block_size * head_dim
    values rather than head_dim-long pieces a slot apart (H100, 2026-12-07, docs/PERFORMANCE.md: 88% -> 93% of the
    copy at batch 32 x 8k). Every kernel and twin takes the caches through their strides.

    With num_sliding_blocks, the sliding-window layers get a pool of that many blocks instead (the batch then
    addresses it through its sliding tables)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    num_sliding_blocks: int | None = None  # None: one pool for every layer

    @property
    def num_blocks(self) -> int:
        return max(k.shape[0] for k in self.k) if self.num_sliding_blocks is not None else self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @staticmethod
    def allocate(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_kv_heads: int | None = None,
                 num_sliding_blocks: int | None = None) -> "KVCache":
        def blocks(layer_idx: int) -> torch.Tensor:  # [blocks, block_size, heads, head_dim], stored head-major
            sliding = num_sliding_blocks is not None and config.is_sliding_layer(layer_idx)
            stored = (num_sliding_blocks if sliding else num_blocks, num_kv_heads or config.num_key_value_heads,
                      block_size, config.head_dim)
            return torch.zeros(stored, dtype=dtype, device=device).transpose(1, 2)

        layers = range(config.num_hidden_layers)
        return KVCache(k=[blocks(n) for n in layers], v=[blocks(n) for n in layers],
                       num_sliding_blocks=num_sliding_blocks)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype,
                        num_kv_heads: int | None = None, num_layers: int | None = None) -> int:
        """Bytes of one block over `num_layers` layers (all of them by default)."""
        per_layer = 2 * block_size * (num_kv_heads or config.num_key_value_heads) * config.head_dim
        layers = config.num_hidden_layers if num_layers is None else num_layers
        return per_layer * layers * torch.empty((), dtype=dtype).element_size()
