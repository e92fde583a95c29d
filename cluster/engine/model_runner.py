"""Runs one scheduled step on the model: builds the batch tensors, runs the forward (or replays a CUDA graph),
computes the logits of the sequences that sample, and samples.

`launch` only enqueues that work and starts copying the samples to the host (`LaunchedStep.host_copy`).
A step may be launched before the previous one's samples are read: a sequence whose last token is still on the
device (PENDING_TOKEN on the host) takes it from the previous step's sampled tensor on the device.

Batch metadata is built with numpy over all tokens at once (a Python loop runs per sequence, never per
token), written into pinned host buffers and copied to the GPU in one non-blocking copy per tensor. Decode
steps of up to `max_graph_batch_size` sequences replay a CUDA graph captured for the next larger bucket;
larger or mixed steps run eagerly.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
import torch

from gptoss_serve.cluster.engine.sampler import HostCopy, Sampler, to_device
from gptoss_serve.cluster.engine.scheduler import ScheduledBatch
from gptoss_serve.cluster.engine.sequence import PENDING_TOKEN
from gptoss_serve.cluster.engine.step_broadcast import StepBroadcaster, StepKind
from gptoss_serve.model.batch import ForwardBatch, KVCache
from gptoss_serve.model.transformer import GptOssModel

logger = logging.getLogger(__name__)

_INT_FIELDS = ("token_ids", "positions", "cu_seqlens_q", "context_lens", "block_tables", "slot_mapping",
               "logits_indices", "sliding_block_tables", "sliding_slot_mapping")


@dataclasses.dataclass
class LaunchedStep:
    """A step enqueued on the device: its samples are being copied to the host."""
    sampled: torch.Tensor | None  # [num_sampling] int64 on the device, rows in batch order (None: no sampler)
    sample_rows: dict[int, int]  # seq_id -> its row of `sampled`
    host_copy: HostCopy | None  # the samples on their way to the host, in `sampled`'s row order


@dataclasses.dataclass
class HostBatch:
    """A step's metadata as numpy arrays (see ForwardBatch for the meaning of each)."""
    token_ids: np.ndarray
    positions: np.ndarray
    cu_seqlens_q: np.ndarray
    context_lens: np.ndarray
    block_tables: np.ndarray
    slot_mapping: np.ndarray
    logits_indices: np.ndarray
    sliding_block_tables: np.ndarray | None
    sliding_slot_mapping: np.ndarray | None
    # [num_tokens] int64: for a PENDING_TOKEN input, its row of the previous step's samples (on the device),
    # else -1; None when every input token is on the host.
    pending_rows: np.ndarray | None = None


def build_host_batch(batch: ScheduledBatch, block_size: int, sliding_pool: bool) -> HostBatch:
    seqs, num_new = batch.seqs, np.asarray(batch.num_new_tokens, dtype=np.int64)
    num_seqs = len(seqs)
    starts = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=num_seqs)
    cu = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(num_new, out=cu[1:])
    num_tokens = int(cu[-1])
    token_ids = np.empty(num_tokens, dtype=np.int64)
    for i, seq in enumerate(seqs):
        start = int(starts[i])
        token_ids[cu[i]:cu[i + 1]] = seq.token_ids[start:start + int(num_new[i])]
    seq_of_token = np.repeat(np.arange(num_seqs), num_new)  # [num_tokens]
    positions = starts[seq_of_token] + np.arange(num_tokens) - cu[seq_of_token]

    def table_and_slots(tables: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.fromiter(map(len, tables), dtype=np.int64, count=num_seqs)
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
        row_starts = np.cumsum(lengths) - lengths
        rows = np.repeat(np.arange(num_seqs), lengths)
        table = np.zeros((num_seqs, int(lengths.max())), dtype=np.int32)
        table[rows, np.arange(flat.size) - row_starts[rows]] = flat
        slots = table[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
        np.maximum(table, 0, out=table)  # freed sliding entries (never read) point at a real block
        return table, slots

    block_tables, slot_mapping = table_and_slots([seq.block_ids for seq in seqs])
    sliding_tables = sliding_slots = None
    if sliding_pool:
        sliding_tables, sliding_slots = table_and_slots([seq.sliding_block_ids for seq in seqs])
    samples = np.fromiter(batch.samples, dtype=bool, count=num_seqs)
    return HostBatch(
        token_ids=token_ids, positions=positions, cu_seqlens_q=cu.astype(np.int32),
        context_lens=(starts + num_new).astype(np.int32), block_tables=block_tables, slot_mapping=slot_mapping,
        logits_indices=(cu[1:] - 1)[samples], sliding_block_tables=sliding_tables,
        sliding_slot_mapping=sliding_slots)


class ModelRunner:
    def __init__(self, model: GptOssModel, kv_cache: KVCache, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool = True, max_graph_batch_size: int = 256,
                 broadcaster: StepBroadcaster | None = None):
        """broadcaster: with a sharded model, sends each step to the other ranks (see follow())."""
        self.model = model
        self.broadcaster = broadcaster
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.sliding_pool = kv_cache.num_sliding_blocks is not None
        self.device = next(model.parameters()).device
        self.sampler = Sampler(self.device)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.graphs = None
        if use_cuda_graphs and self.device.type == "cuda":
            from gptoss_serve.cluster.engine.cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(model, kv_cache, min(max_graph_batch_size, max_num_seqs),
                                  self.max_blocks_per_seq, self.sliding_pool)
            if graphs.capture():
                self.graphs = graphs

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Enqueues the step without waiting for the device. previous: the step before, whose samples are the
        inputs of this step's sequences that end in PENDING_TOKEN."""
        host = build_host_batch(batch, self.block_size, self.sliding_pool)
        samples = batch.samples
        use_graph = self.graphs is not None and batch.is_decode_only and self.graphs.fits(len(batch))
        kind = StepKind.GRAPH if use_graph else StepKind.EAGER
        host.pending_rows = self._pending_rows(batch, host, previous)
        pending_samples = previous.sampled if host.pending_rows is not None else None
        if self.broadcaster is not None:  # the other ranks get the pending tokens' samples from this rank
            self.broadcaster.send(host, kind, pending_samples)
        hidden = self._forward(host, kind, self._pending_fill(host, pending_samples))
        if use_graph and not all(samples):  # graphs give a row per sequence: keep those that sample
            hidden = hidden[to_device(np.flatnonzero(samples), torch.int64, self.device)]
        sampling_seqs = [seq for seq, s in zip(batch.seqs, samples) if s]
        if not sampling_seqs:
            return LaunchedStep(None, {}, None)
        logits = self.model.compute_logits(hidden)  # [num_sampling, vocab] float32
        sampled = self.sampler.sample(logits, sampling_seqs)
        return LaunchedStep(sampled.token_ids, {seq.seq_id: row for row, seq in enumerate(sampling_seqs)},
                            sampled.copy_to_host())

    @staticmethod
    def _pending_rows(batch: ScheduledBatch, host: HostBatch, previous: LaunchedStep | None) -> np.ndarray | None:
        """[num_tokens] int64: for each PENDING_TOKEN input, its row of previous.sampled, else -1; None if the
        step has no pending input."""
        pending_at = np.flatnonzero(host.token_ids == PENDING_TOKEN)
        if pending_at.size == 0:
            return None
        if previous is None:
            raise RuntimeError("a step has pending tokens but no previous step to take them from")
        seq_index = np.searchsorted(host.cu_seqlens_q[1:], pending_at, side="right")
        rows = np.full(host.token_ids.shape[0], -1, dtype=np.int64)
        rows[pending_at] = [previous.sample_rows[batch.seqs[i].seq_id] for i in seq_index.tolist()]
        return rows

    def _pending_fill(self, host: HostBatch, samples: torch.Tensor | None):
        """None if every input token is on the host, else a function that puts the pending ones, taken from the
        previous step's samples [num_prev] int64 on the device, into the step's token ids in place."""
        if host.pending_rows is None:
            return None
        rows = to_device(host.pending_rows, torch.int64, self.device)

        def fill(token_ids: torch.Tensor) -> None:  # [num_tokens] int64 on the device
            token_ids.copy_(torch.where(rows >= 0, samples[rows.clamp(min=0)], token_ids))
        return fill

    def _forward(self, host: HostBatch, kind: StepKind, fill=None) -> torch.Tensor:
        """fill: if given, completes the step's token ids on the device (in place) before the forward."""
        if kind == StepKind.GRAPH:
            return self.graphs.run(host, fill)  # [num_seqs, hidden]
        batch = self._to_device(host)
        if fill is not None:
            fill(batch.token_ids)
        return self.model(batch, self.kv_cache)  # [num_sampling, hidden]

    @torch.inference_mode()
    def follow(self) -> int:
        """On the other ranks of a sharded model: runs every step the engine's rank sends, the same way (eager or
        the same graph bucket) so the collectives inside the model line up, until it sends STOP. Returns the
        number of steps run."""
        num_steps = 0
        while True:
            kind, host, pending_samples = self.broadcaster.receive()
            if kind == StepKind.STOP:
                return num_steps
            self._forward(host, kind, self._pending_fill(host, pending_samples))
            num_steps += 1

    def _to_device(self, host: HostBatch) -> ForwardBatch:
        """Every field packed into one int64 buffer: one pinned host-to-device copy per step."""
        arrays = {name: getattr(host, name) for name in _INT_FIELDS if getattr(host, name) is not None}
        packed = torch.from_numpy(np.concatenate([a.reshape(-1).astype(np.int64, copy=False)
                                                  for a in arrays.values()]))
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        fields: dict[str, torch.Tensor | None] = dict.fromkeys(_INT_FIELDS)
        offset = 0
        for name, array in arrays.items():
            tensor = packed[offset:offset + array.size].view(array.shape)
            fields[name] = tensor.to(torch.int32) if array.dtype == np.int32 else tensor
            offset += array.size
        return ForwardBatch(**fields)
