"""Each step's metadata goes from the engine (rank 0) to the other ranks of a replica as one host message.

The engine schedules, builds the step's HostBatch and sends it; every other rank receives it and runs the same
forward (eager, or the same CUDA graph bucket), so the collectives inside the model line up. The metadata
travels between the ranks' hosts (`host_channel.py`: a pipe per rank on one host), never through a device: a
follower receives the next step while its device still runs the current one and queues its launch behind it,
instead of waiting for its device once a step. With async scheduling a step's input may hold tokens sampled by
the previous step that the engine has not read yet: the engine's rank then also broadcasts that step's samples
from its device (a device collective, queued in stream order on every rank), and every rank fills them in.
A message is a header of sizes and flags, then every int field packed as int64.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from gptoss_serve.cluster.engine.host_channel import open_host_channel

if TYPE_CHECKING:  # model_runner imports this module
    from gptoss_serve.cluster.engine.model_runner import HostBatch

HEADER_SIZE = 8


class StepKind(enum.IntEnum):
    EAGER = 0  # run the forward eagerly
    GRAPH = 1  # replay the decode CUDA graph of the batch's bucket
    STOP = 2  # leave the follow loop


class StepBroadcaster:
    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, transport: str = "auto"):
        """group: the replica's ranks (the device collectives' group); None, or a group of one, has nobody to
        send to (send is a no-op). Otherwise collective over every rank of the default group, which opens the
        host channel (`host_channel.open_host_channel`, `transport`)."""
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group) if group is not None else 0
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        self.channel = open_host_channel(group, transport) if group is not None else None

    def send(self, host: "HostBatch", kind: StepKind, pending_samples: torch.Tensor | None = None) -> None:
        """Rank 0: sends the step, and with host.pending_rows the previous step's samples [num_prev] (int64,
        contiguous, on this rank's device). A no-op without other ranks."""
        if self.group is None:
            return
        payload = pack(host)
        sliding_width = -1 if host.sliding_block_tables is None else host.sliding_block_tables.shape[1]
        num_pending = 0 if host.pending_rows is None else pending_samples.shape[0]
        header = (kind, host.token_ids.shape[0], host.context_lens.shape[0], host.block_tables.shape[1],
                  host.logits_indices.shape[0], sliding_width, payload.shape[0], num_pending)
        self.channel.send(np.asarray(header, dtype=np.int64), payload)
        if num_pending:
            dist.broadcast(pending_samples, src=self._src, group=self.group)

    def send_stop(self) -> None:
        if self.group is not None:
            self.channel.send(np.asarray((StepKind.STOP,) + (0,) * (HEADER_SIZE - 1), dtype=np.int64))

    def receive(self) -> tuple[StepKind, "HostBatch | None", torch.Tensor | None]:
        """Other ranks: waits for the next step (on the host only); returns its kind, metadata and the previous
        step's samples that its pending tokens come from (None if it has none; their broadcast is queued on the
        device, not waited for)."""
        message = self.channel.receive()
        kind, num_tokens, num_seqs, max_blocks, num_logits, sliding_width, size, num_pending = \
            message[:HEADER_SIZE].tolist()
        if kind == StepKind.STOP:
            return StepKind.STOP, None, None
        payload = message[HEADER_SIZE:HEADER_SIZE + size]
        host = unpack(payload, num_tokens, num_seqs, max_blocks, num_logits, sliding_width, num_pending > 0)
        samples = None
        if num_pending:
            samples = torch.empty(num_pending, dtype=torch.int64, device=self.device)
            dist.broadcast(samples, src=self._src, group=self.group)
        return StepKind(kind), host, samples

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()


def pack(host: "HostBatch") -> np.ndarray:
    """Every field, flattened in a fixed order, as one int64 array [payload]."""
    parts = [host.token_ids, host.positions, host.cu_seqlens_q, host.context_lens, host.block_tables,
             host.slot_mapping, host.logits_indices]
    if host.sliding_block_tables is not None:
        parts += [host.sliding_block_tables, host.sliding_slot_mapping]
    if host.pending_rows is not None:
        parts.append(host.pending_rows)
    return np.concatenate([p.reshape(-1).astype(np.int64, copy=False) for p in parts])


def unpack(payload: np.ndarray, num_tokens: int, num_seqs: int, max_blocks: int, num_logits: int,
           sliding_width: int, has_pending: bool = False) -> "HostBatch":
    """The inverse of pack; sliding_width is the sliding tables' width, or -1 without a sliding pool."""
    from gptoss_serve.cluster.engine.model_runner import HostBatch

    sliding = sliding_width >= 0
    sizes = [num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * max_blocks, num_tokens, num_logits]
    if sliding:
        sizes += [num_seqs * sliding_width, num_tokens]
    if has_pending:
        sizes.append(num_tokens)
    pieces = np.split(payload, np.cumsum(sizes)[:-1])
    return HostBatch(
        token_ids=pieces[0], positions=pieces[1], cu_seqlens_q=pieces[2].astype(np.int32),
        context_lens=pieces[3].astype(np.int32),
        block_tables=pieces[4].reshape(num_seqs, max_blocks).astype(np.int32),
        slot_mapping=pieces[5], logits_indices=pieces[6],
        sliding_block_tables=pieces[7].reshape(num_seqs, sliding_width).astype(np.int32) if sliding else None,
        sliding_slot_mapping=pieces[8] if sliding else None, pending_rows=pieces[-1] if has_pending else None)


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
