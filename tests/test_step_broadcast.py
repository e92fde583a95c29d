"""The per-step metadata message from the engine's rank to the others (two processes, over each host channel
transport), and the pipe channel's framing and failure signals."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import pytest
import torch.multiprocessing as mp

from gptoss_serve.cluster.engine.model_runner import HostBatch
from gptoss_serve.cluster.engine.host_channel import PIPE_BUFFER_BYTES, ChannelClosed, PipeChannel
from gptoss_serve.cluster.engine.step_broadcast import StepBroadcaster, StepKind


def host_batch(num_seqs: int, num_blocks: int, sliding: bool) -> HostBatch:
    rng = np.random.default_rng(num_seqs)
    tokens = 3 * num_seqs

    def ints(*shape):
        return rng.integers(0, 1 << 40, shape)

    return HostBatch(
        token_ids=ints(tokens), positions=ints(tokens), cu_seqlens_q=np.arange(0, tokens + 1, 3, dtype=np.int32),
        context_lens=ints(num_seqs).astype(np.int32) % 1000, block_tables=(ints(num_seqs, num_blocks) % 999).astype(
            np.int32), slot_mapping=ints(tokens), logits_indices=ints(num_seqs),
        sliding_block_tables=(ints(num_seqs, 5) % 77).astype(np.int32) if sliding else None,
        sliding_slot_mapping=ints(tokens) if sliding else None)


# Small, with and without a sliding pool, and one larger than a pipe's buffer (several writes and reads).
STEPS = [(1, 4, False), (7, 9, True), (64, 4096, True)]
PENDING_SAMPLES = torch.tensor([11, 22, 33, 44, 55])  # the previous step's samples, for a step with pending tokens


def with_pending(host: HostBatch) -> HostBatch:
    rows = np.full(host.token_ids.shape[0], -1, dtype=np.int64)
    rows[2::3] = np.arange(rows[2::3].shape[0]) % PENDING_SAMPLES.shape[0]
    host.pending_rows = rows
    return host


def _rank(rank: int, init_file: str, out_dir: str, transport: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    broadcaster = StepBroadcaster(dist.group.WORLD, torch.device("cpu"), transport)
    received = []
    for i, spec in enumerate(STEPS):
        if rank == 0:
            broadcaster.send(host_batch(*spec), StepKind(i % 2))
        else:
            received.append(broadcaster.receive())
    if rank == 0:
        broadcaster.send(with_pending(host_batch(7, 9, True)), StepKind.GRAPH, PENDING_SAMPLES)
        broadcaster.send_stop()
    else:
        received.append(broadcaster.receive())  # the step with pending tokens
        received.append(broadcaster.receive())  # stop
        torch.save((received, type(broadcaster.channel).__name__), os.path.join(out_dir, "received.pt"))
    broadcaster.close()
    dist.destroy_process_group()


@pytest.mark.parametrize("transport, channel", [("auto", "PipeChannel"), ("gloo", "GlooChannel")])
def test_each_step_arrives_whole(tmp_path, monkeypatch, transport, channel):
    """'auto' takes pipes: both ranks run on this host."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # spawned ranks import this module
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(tmp_path), transport), nprocs=2,
                       start_method="spawn")
    received, channel_type = torch.load(tmp_path / "received.pt", weights_only=False)
    assert channel_type == channel
    assert received[-1] == (StepKind.STOP, None, None)
    assert host_batch(*STEPS[-1]).block_tables.size * 8 > PIPE_BUFFER_BYTES  # sent as int64
    wanted = [(StepKind(i % 2), host_batch(*spec), None) for i, spec in enumerate(STEPS)]
    wanted.append((StepKind.GRAPH, with_pending(host_batch(7, 9, True)), PENDING_SAMPLES))
    for (kind, got, samples), (want_kind, want, want_samples) in zip(received, wanted):
        assert kind == want_kind
        for field in HostBatch.__dataclass_fields__:
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None and b is None) or (np.array_equal(a, b) and a.dtype == b.dtype), field
        assert (samples is None and want_samples is None) or torch.equal(samples, want_samples)


def test_pipe_channel_frames_messages_of_any_size():
    read_fd, write_fd = os.pipe()
    writer, reader = PipeChannel([write_fd], None), PipeChannel(None, read_fd)
    messages = [np.arange(n, dtype=np.int64) * 7 - 3 for n in (0, 1, 5, 300_000, 2)]  # 2.4 MB > the pipe buffer
    sender = threading.Thread(target=lambda: [writer.send(m) for m in messages])
    sender.start()
    received = [reader.receive() for _ in messages]
    sender.join()
    assert all(np.array_equal(got, want) for got, want in zip(received, messages))
    writer.close()
    with pytest.raises(ChannelClosed, match="closed the step channel"):  # the engine's rank is gone
        reader.receive()
    reader.close()


def test_pipe_channel_names_a_reader_that_is_gone():
    read_fd, write_fd = os.pipe()
    writer = PipeChannel([write_fd], None)
    os.close(read_fd)  # the follower's process exited
    with pytest.raises(ChannelClosed, match="shard worker 1 stopped reading"):
        writer.send(np.arange(3, dtype=np.int64))
    writer.close()
