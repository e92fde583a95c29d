"""One broadcast per step carries the step's metadata from the engine (rank 0) to the other ranks of a replica.

The engine schedules, builds the step's HostBatch and sends it; every other rank receives it and runs the same
forward (eager, or the same CUDA graph bucket), so the collectives inside the model line up. The message is two
collectives on the model's process group: a fixed-size header (sizes and flags), then every int field packed
into one int64 tensor. On GPUs both are NCCL broadcasts enqueued on the stream, so rank 0 never waits for them.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:  # model_runner imports this module
    from gptoss_serve.cluster.engine.model_runner import HostBatch

HEADER_SIZE = 8


class StepKind(enum.IntEnum):
    EAGER = 0  # run the forward eagerly
    GRAPH = 1  # replay the decode CUDA graph of the batch's bucket
    STOP = 2  # leave the follow loop


class StepBroadcaster:
    def __init__(self, group: dist.ProcessGroup | None, device: torch.device):
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group) if group is not None else 0
        self._header = torch.zeros(HEADER_SIZE, dtype=torch.int64, device=device)

    def send(self, host: "HostBatch", kind: StepKind) -> None:
        """Rank 0: sends the step. A no-op without other ranks."""
        if self.group is None:
            return
        payload = pack(host)
        num_tokens, num_seqs = host.token_ids.shape[0], host.context_lens.shape[0]
        sliding_width = -1 if host.sliding_block_tables is None else host.sliding_block_tables.shape[1]
        header = torch.tensor([kind, num_tokens, num_seqs, host.block_tables.shape[1],
                               host.logits_indices.shape[0], sliding_width, payload.shape[0], 0], dtype=torch.int64)
        self._broadcast(header)
        self._broadcast(payload)

    def send_stop(self) -> None:
        if self.group is not None:
            self._broadcast(torch.tensor([StepKind.STOP] + [0] * (HEADER_SIZE - 1), dtype=torch.int64))

    def receive(self) -> tuple[StepKind, "HostBatch | None"]:
        """Other ranks: waits for the next step."""
        self._header.zero_()
        dist.broadcast(self._header, src=dist.get_global_rank(self.group, 0), group=self.group)
        kind, num_tokens, num_seqs, max_blocks, num_logits, sliding_width, size, _ = self._header.tolist()
        if kind == StepKind.STOP:
            return StepKind.STOP, None
        payload = torch.empty(size, dtype=torch.int64, device=self.device)
        dist.broadcast(payload, src=dist.get_global_rank(self.group, 0), group=self.group)
        return StepKind(kind), unpack(payload.cpu().numpy(), num_tokens, num_seqs, max_blocks, num_logits,
                                      sliding_width)

    def _broadcast(self, host_tensor: torch.Tensor) -> None:
        tensor = host_tensor
        if self.device.type == "cuda":
            tensor = host_tensor.pin_memory().to(self.device, non_blocking=True)
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)


def pack(host: "HostBatch") -> torch.Tensor:
    """Every field, flattened in a fixed order, as one int64 tensor [payload]."""
    parts = [host.token_ids, host.positions, host.cu_seqlens_q, host.context_lens, host.block_tables,
             host.slot_mapping, host.logits_indices]
    if host.sliding_block_tables is not None:
        parts += [host.sliding_block_tables, host.sliding_slot_mapping]
    return torch.from_numpy(np.concatenate([p.reshape(-1).astype(np.int64, copy=False) for p in parts]))


def unpack(payload: np.ndarray, num_tokens: int, num_seqs: int, max_blocks: int, num_logits: int,
           sliding_width: int) -> "HostBatch":
    """The inverse of pack; sliding_width is the sliding tables' width, or -1 without a sliding pool."""
    from gptoss_serve.cluster.engine.model_runner import HostBatch

    sliding = sliding_width >= 0
    sizes = [num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * max_blocks, num_tokens, num_logits]
    if sliding:
        sizes += [num_seqs * sliding_width, num_tokens]
    pieces = np.split(payload, np.cumsum(sizes)[:-1])
    return HostBatch(
        token_ids=pieces[0], positions=pieces[1], cu_seqlens_q=pieces[2].astype(np.int32),
        context_lens=pieces[3].astype(np.int32),
        block_tables=pieces[4].reshape(num_seqs, max_blocks).astype(np.int32),
        slot_mapping=pieces[5], logits_indices=pieces[6],
        sliding_block_tables=pieces[7].reshape(num_seqs, sliding_width).astype(np.int32) if sliding else None,
        sliding_slot_mapping=pieces[8] if sliding else None)


def agree_kv_plan(plan, broadcaster: StepBroadcaster | None):
    """The smallest of every rank's KV plan (free memory differs a little between GPUs): all ranks must hold
    the same number of blocks, since the engine's block ids address every rank's cache."""
    if broadcaster is None or broadcaster.group is None:
        return plan
    values = torch.tensor([plan.num_blocks, -1 if plan.num_sliding_blocks is None else plan.num_sliding_blocks],
                          dtype=torch.int64, device=broadcaster.device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN, group=broadcaster.group)
    num_blocks, num_sliding = values.tolist()
    return dataclasses.replace(plan, num_blocks=num_blocks, num_sliding_blocks=None if num_sliding < 0 else num_sliding)
