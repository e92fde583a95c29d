"""CUDA graphs of the forward pass for decode steps: one graph per batch-size bucket, replayed on static inputs.

A decode step launches a few hundred small kernels; replaying a graph removes their launch cost. The graphs
read static input buffers sized for the largest bucket; a step of n sequences copies its metadata into the
first n rows, pads to the bucket with harmless rows (context of one token, no cache write), replays, and
keeps the first n outputs. Graphs share one memory pool and are captured largest first after a warm-up run.
The logits are computed outside the graph: one matmul gains nothing from it and the [batch, vocab] outputs
would cost memory per bucket.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from gptoss_serve.model.batch import ForwardBatch, KVCache
from gptoss_serve.model.transformer import GptOssModel

logger = logging.getLogger(__name__)


def bucket_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch_size]
    sizes += range(48, max_batch_size, 16)
    return sorted(set(sizes) | {max_batch_size})


class DecodeGraphs:
    def __init__(self, model: GptOssModel, kv_cache: KVCache, max_batch_size: int, max_blocks_per_seq: int,
                 sliding_pool: bool):
        self.model, self.kv_cache = model, kv_cache
        self.sizes = bucket_sizes(max_batch_size)
        self.device = next(model.parameters()).device
        size, device = self.sizes[-1], self.device
        self.token_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.cu_seqlens_q = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(size, dtype=torch.int64, device=device)
        self.sliding_block_tables = torch.zeros_like(self.block_tables) if sliding_pool else None
        self.sliding_slot_mapping = torch.full_like(self.slot_mapping, -1) if sliding_pool else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _batch(self, size: int) -> ForwardBatch:
        sliding = self.sliding_block_tables is not None
        return ForwardBatch(
            token_ids=self.token_ids[:size], positions=self.positions[:size],
            cu_seqlens_q=self.cu_seqlens_q[:size + 1], context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size],
            logits_indices=self.logits_indices[:size],
            sliding_block_tables=self.sliding_block_tables[:size] if sliding else None,
            sliding_slot_mapping=self.sliding_slot_mapping[:size] if sliding else None)

    @torch.inference_mode()
    def capture(self) -> bool:
        """Captures every bucket; False (and eager decode) if the kernels cannot be captured."""
        if getattr(self.model.kernels, "name", "torch") == "torch":
            logger.info("kernel backend 'torch' syncs with the host (per-sequence loops): no CUDA graphs")
            return False
        pool = None
        try:
            for size in reversed(self.sizes):
                batch = self._batch(size)
                self.model(batch, self.kv_cache)  # warm-up: compiles kernels, allocates workspaces
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(batch, self.kv_cache)
                pool = graph.pool()
                self.graphs[size] = graph
            torch.cuda.synchronize()
        except Exception as error:  # a kernel that syncs or allocates on the host side: stay eager
            logger.warning("CUDA graph capture failed, decode runs eagerly: %s", error)
            self.graphs.clear()
            self.outputs.clear()
            return False
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)
        return True

    def fits(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.sizes[-1]

    def run(self, host, fill=None) -> torch.Tensor:
        """Replays the bucket's graph on a decode step's metadata (a HostBatch); [num_seqs, hidden]. fill: if
        given, completes the token ids in the static input buffer (in place) before the replay."""
        n = host.token_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        rows = np.zeros((4 + (host.sliding_slot_mapping is not None), size), dtype=np.int64)
        rows[2, :] = 1  # padding rows: a context of one token...
        rows[3, :] = -1  # ...whose key is not stored
        rows[0, :n], rows[1, :n], rows[2, :n], rows[3, :n] = (
            host.token_ids, host.positions, host.context_lens, host.slot_mapping)
        tables = [host.block_tables]
        if host.sliding_slot_mapping is not None:
            rows[4, :] = -1
            rows[4, :n] = host.sliding_slot_mapping
            tables.append(host.sliding_block_tables)
        packed = np.concatenate([rows.ravel()] + [t.astype(np.int64).ravel() for t in tables])
        staged = torch.from_numpy(packed)
        if self.device.type == "cuda":
            staged = staged.pin_memory().to(self.device, non_blocking=True)
        self.token_ids[:size].copy_(staged[0:size])
        self.positions[:size].copy_(staged[size:2 * size])
        self.context_lens[:size].copy_(staged[2 * size:3 * size])
        self.slot_mapping[:size].copy_(staged[3 * size:4 * size])
        offset = rows.size
        if host.sliding_slot_mapping is not None:
            self.sliding_slot_mapping[:size].copy_(staged[4 * size:5 * size])
        width = host.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(staged[offset:offset + n * width].view(n, width))
        if host.sliding_slot_mapping is not None:
            offset += n * width
            sliding_width = host.sliding_block_tables.shape[1]
            self.sliding_block_tables[:n, :sliding_width].copy_(
                staged[offset:offset + n * sliding_width].view(n, sliding_width))
        if fill is not None:
            fill(self.token_ids[:n])
        self.graphs[size].replay()
        return self.outputs[size][:n]
