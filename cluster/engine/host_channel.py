"""Host-to-host messages from the engine's rank to the other ranks of a replica: each step's metadata.

The other ranks need a step's metadata in host memory (to build their batch and pick the graph bucket). Sent by
a device collective, it only reaches a rank's host after that rank's device has finished everything queued
before it, so every follower would wait for its device once a step and its device would then idle while its host
prepares the next launch. Over a host channel a follower receives step N + 1 while its device still runs step N,
and queues its launch behind it, as the engine's rank does with async scheduling.

Two transports, chosen at opening from where the ranks run:
- `PipeChannel` (every rank on the engine's host, as a replica's STRICT_PACK placement group makes them): one
  named pipe per other rank, written by the engine's rank. A blocked reader wakes as the bytes arrive (no
  polling), a message is one write per rank, and a rank that died shows as a broken pipe or an end of file.
- `GlooChannel` (ranks on several hosts): a broadcast over a gloo group of the same ranks.

A message is int64 words of any number, handed over in parts (joined once, behind a length word).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile

import numpy as np
import torch
import torch.distributed as dist

_F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's buffer size
PIPE_BUFFER_BYTES = 1 << 20  # a decode step of 256 sequences with 1k-token contexts (~160 KiB) goes in one write


class ChannelClosed(RuntimeError):
    """The other end of the channel is gone (its process exited or closed it)."""


class PipeChannel:
    """Rank 0 writes every message to one named pipe per other rank; each other rank reads its own."""

    def __init__(self, write_fds: list[int] | None, read_fd: int | None):
        self._write_fds, self._read_fd = write_fds, read_fd

    @classmethod
    def open(cls, group: dist.ProcessGroup, src: int) -> "PipeChannel":
        """Collective over `group` (every rank on one host); `src` is the writer's global rank."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        folder = [tempfile.mkdtemp(prefix="gptoss-steps-") if rank == 0 else None]
        if rank == 0:
            for reader in range(1, world):
                os.mkfifo(os.path.join(folder[0], str(reader)), 0o600)
        dist.broadcast_object_list(folder, src=src, group=group)
        path = os.path.join(folder[0], str(rank))
        if rank != 0:
            return cls(None, os.open(path, os.O_RDONLY))  # blocks until rank 0 opens the write end
        write_fds = []
        for reader in range(1, world):
            fd = os.open(os.path.join(folder[0], str(reader)), os.O_WRONLY)  # blocks until that reader opens
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BUFFER_BYTES)
            except OSError:  # over /proc/sys/fs/pipe-max-size: the default buffer only means more, smaller writes
                pass
            write_fds.append(fd)
        shutil.rmtree(folder[0])  # every end is open: the names are no longer needed
        return cls(write_fds, None)

    def send(self, *parts: np.ndarray) -> None:
        """One message of the parts' words, in order."""
        length = sum(part.shape[0] for part in parts)
        data = memoryview(np.concatenate([np.asarray([length], dtype=np.int64), *parts])).cast("B")
        for reader, fd in enumerate(self._write_fds, start=1):
            sent = 0
            while sent < len(data):
                try:
                    sent += os.write(fd, data[sent:])
                except BrokenPipeError as error:
                    raise ChannelClosed(f"shard worker {reader} stopped reading its steps (its process exited)"
                                        ) from error

    def receive(self) -> np.ndarray:
        length = self._read_exactly(np.empty(1, dtype=np.int64))[0]
        return self._read_exactly(np.empty(int(length), dtype=np.int64))

    def _read_exactly(self, out: np.ndarray) -> np.ndarray:
        view = memoryview(out).cast("B")
        got = 0
        while got < len(view):
            count = os.readv(self._read_fd, [view[got:]])
            if count == 0:
                raise ChannelClosed("the engine's rank closed the step channel")
            got += count
        return out

    def close(self) -> None:
        for fd in (self._write_fds or []) + ([self._read_fd] if self._read_fd is not None else []):
            os.close(fd)
        self._write_fds, self._read_fd = [], None


class GlooChannel:
    """A broadcast over a gloo group: a fixed-size length message, then the words."""

    def __init__(self, group: dist.ProcessGroup, src: int):
        self._group, self._src = group, src
        self._length = torch.zeros(1, dtype=torch.int64)

    def send(self, *parts: np.ndarray) -> None:
        words = np.concatenate(parts).astype(np.int64, copy=False)
        self._length[0] = words.shape[0]
        dist.broadcast(self._length, src=self._src, group=self._group)
        if words.shape[0]:
            dist.broadcast(torch.from_numpy(words), src=self._src, group=self._group)

    def receive(self) -> np.ndarray:
        dist.broadcast(self._length, src=self._src, group=self._group)
        words = torch.empty(int(self._length[0]), dtype=torch.int64)
        if words.shape[0]:
            dist.broadcast(words, src=self._src, group=self._group)
        return words.numpy()

    def close(self) -> None:
        pass


def open_host_channel(group: dist.ProcessGroup, transport: str = "auto") -> PipeChannel | GlooChannel:
    """Collective over every rank of the default group (a gloo group may be created). transport: 'pipe' (one
    host), 'gloo', or 'auto': pipes where every rank of `group` runs on one host, else gloo."""
    src = dist.get_global_rank(group, 0)
    if transport == "auto":
        hosts = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        transport = "pipe" if len(set(hosts)) == 1 else "gloo"
    if transport == "pipe":
        return PipeChannel.open(group, src)
    if transport == "gloo":
        return GlooChannel(dist.new_group(dist.get_process_group_ranks(group), backend="gloo"), src)
    raise ValueError(f"unknown host channel transport {transport!r}: pipe, gloo or auto")
