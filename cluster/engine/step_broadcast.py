"""One broadcast per step carries the step's metadata from the engine (rank 0) to the other ranks of a replica.

The engine schedules, builds the step's HostBatch and sends it; every other rank receives it and runs the same
forward (eager, or the same CUDA graph bucket), so the collectives inside the model line up. With async
scheduling a step's input may hold tokens sampled by the previous step that the engine has not read yet: the
engine's rank then also broadcasts that step's samples from its device, and every rank fills them in. The message
is a fixed-size buffer (a header of sizes and flags, then every int field packed as int64), so that a step is one
collective; a step whose metadata outgrows the buffer sends the rest in a second one. Rank 0 stages the message
in a pinned buffer allocated once, and on GPUs the copy and the NCCL broadcast are enqueued on the stream, so
rank 0 does not wait for the other ranks.
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
# int64 entries after the header. On GPUs a decode step of 256 sequences with 1k-token contexts (about 19k)
# fits; over gloo (CPU ranks, tests) a smaller message is cheaper and big steps take the second broadcast.
PAYLOAD_CAPACITY = {"cuda": 1 << 15, "cpu": 1 << 12}


class StepKind(enum.IntEnum):
    EAGER = 0  # run the forward eagerly
    GRAPH = 1  # replay the decode CUDA graph of the batch's bucket
    STOP = 2  # leave the follow loop


class StepBroadcaster:
    def __init__(self, group: dist.ProcessGroup | None, device: torch.device):
        """group: the replica's ranks; None, or a group of one, has nobody to send to (send is a no-op)."""
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group) if group is not None else 0
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        self.capacity = PAYLOAD_CAPACITY["cuda" if device.type == "cuda" else "cpu"]
        size = HEADER_SIZE + self.capacity
        self._message = torch.zeros(size, dtype=torch.int64, device=device)  # [header | payload]
        cuda = device.type == "cuda"
        self._staging = torch.zeros(size, dtype=torch.int64, pin_memory=cuda) if cuda else self._message
        self._staged = torch.cuda.Event() if cuda else None  # the last copy out of _staging

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
        self._send(header, payload)
        if num_pending:
            dist.broadcast(pending_samples, src=self._src, group=self.group)

    def send_stop(self) -> None:
        if self.group is not None:
            self._send((StepKind.STOP,) + (0,) * (HEADER_SIZE - 1), np.zeros(0, dtype=np.int64))

    def receive(self) -> tuple[StepKind, "HostBatch | None", torch.Tensor | None]:
        """Other ranks: waits for the next step; returns its kind, metadata and the previous step's samples that
        its pending tokens come from (None if it has none)."""
        dist.broadcast(self._message, src=self._src, group=self.group)
        message = self._message.cpu().numpy() if self.device.type == "cuda" else self._message.numpy().copy()
        kind, num_tokens, num_seqs, max_blocks, num_logits, sliding_width, size, num_pending = \
            message[:HEADER_SIZE].tolist()
        if kind == StepKind.STOP:
            return StepKind.STOP, None, None
        payload = message[HEADER_SIZE:HEADER_SIZE + min(size, self.capacity)]
        if size > self.capacity:
            rest = torch.empty(size - self.capacity, dtype=torch.int64, device=self.device)
            dist.broadcast(rest, src=self._src, group=self.group)
            payload = np.concatenate([payload, rest.cpu().numpy()])
        host = unpack(payload, num_tokens, num_seqs, max_blocks, num_logits, sliding_width, num_pending > 0)
        samples = None
        if num_pending:
            samples = torch.empty(num_pending, dtype=torch.int64, device=self.device)
            dist.broadcast(samples, src=self._src, group=self.group)
        return StepKind(kind), host, samples

    def _send(self, header: tuple[int, ...], payload: np.ndarray) -> None:
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copy out of the staging buffer has finished
        staging = self._staging.numpy()
        first = min(payload.shape[0], self.capacity)
        staging[:HEADER_SIZE] = header
        staging[HEADER_SIZE:HEADER_SIZE + first] = payload[:first]
        if self._staged is not None:
            self._message.copy_(self._staging, non_blocking=True)
            self._staged.record()
        dist.broadcast(self._message, src=self._src, group=self.group)
        if payload.shape[0] > first:
            rest = torch.from_numpy(payload[first:])
            dist.broadcast(rest.to(self.device), src=self._src, group=self.group)


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
