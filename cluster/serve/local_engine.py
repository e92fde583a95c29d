"""An engine in the replica's own process: `LLMEngine.step()` loops in a background thread.

The engine is not thread-safe, so only its thread touches it: requests and aborts reach it through a command
queue, and each step's outputs go back to the replica's event loop in one `call_soon_threadsafe` call, which
fans them out to one asyncio queue per request. Nothing per token crosses a process or a Ray call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import threading
import time
from typing import Any, AsyncIterator, Sequence

import torch

from gptoss_serve.cluster.engine.llm_engine import LLMEngine
from gptoss_serve.cluster.engine.outputs import RequestOutput
from gptoss_serve.cluster.engine.sampling_params import OutputKind, SamplingParams
from gptoss_serve.cluster.serve.engine_client import (
    CountHistogram,
    EngineClient,
    EngineDeadError,
    EngineInfo,
    EngineOverloadedError,
    EngineStats,
    GenerationDelta,
)

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0  # an idle engine thread still wakes now and then to publish stats
_SLOW_STATS_INTERVAL_S = 1.0  # expert counts and device memory wait for the device: read them this often
BATCH_SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKENS_PER_STEP_BOUNDS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclasses.dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclasses.dataclass(frozen=True)
class _Failed:
    """Sent to a request's queue when the engine refused it or died."""

    error: BaseException


class LocalEngineClient(EngineClient):
    def __init__(self, engine: LLMEngine, max_queued_requests: int, loop: asyncio.AbstractEventLoop):
        """loop: the replica's event loop, where generate() is called and deltas are delivered."""
        self._engine = engine
        self._loop = loop
        self._info = EngineInfo(
            max_model_len=engine.max_model_len, max_num_seqs=engine.config.max_num_seqs,
            max_queued_requests=max_queued_requests, vocab_size=engine.model.config.vocab_size)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        # Loop-thread state: the queue of each request in flight and the sequences they hold.
        self._streams: dict[str, asyncio.Queue] = {}
        self._num_in_flight_seqs = 0
        # Written by the engine thread only, by replacing whole objects that are never mutated once shared.
        self._stats = EngineStats(batch_size=CountHistogram.empty(BATCH_SIZE_BOUNDS),
                                  tokens_per_step=CountHistogram.empty(TOKENS_PER_STEP_BOUNDS))
        self._expert_token_totals = None  # [num_layers, num_experts] int64 numpy, when the engine counts
        self._device = next(engine.model.parameters()).device
        self._device_memory = (0, 0)  # (used, total) bytes
        self._slow_stats_time = float("-inf")
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
        self._thread.start()

    # EngineClient ------------------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats, num_in_flight_requests=len(self._streams))

    async def expert_token_counts(self) -> Any:
        return self._expert_token_totals

    def is_alive(self) -> bool:
        return self._error is None and self._thread.is_alive()

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        if not self.is_alive():
            raise EngineDeadError(f"the engine has stopped: {self._error!r}")
        capacity = self._info.max_num_seqs + self._info.max_queued_requests
        if self._num_in_flight_seqs + params.n > capacity:
            raise EngineOverloadedError(
                f"the engine queue is full ({self._num_in_flight_seqs} sequences admitted, limit {capacity} = "
                f"max_num_seqs {self._info.max_num_seqs} + max_queued_requests {self._info.max_queued_requests})")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._num_in_flight_seqs += params.n
        self._send(_Add(request_id, list(prompt_token_ids), params.replace(output_kind=OutputKind.DELTA)))
        num_unfinished = params.n
        try:
            while num_unfinished:
                item = await stream.get()
                if isinstance(item, _Failed):
                    raise item.error
                num_unfinished -= item.finished
                yield item
        finally:
            del self._streams[request_id]
            self._num_in_flight_seqs -= params.n
            if num_unfinished:  # the caller left early, or the engine failed: free the blocks now
                self._send(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join, 30)

    # Loop thread -------------------------------------------------------------------------------------------
    def _send(self, command: _Add | _Abort) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # its caller left; the abort is on its way
            metrics = output.metrics
            for completion in output.outputs:
                stream.put_nowait(GenerationDelta(
                    index=completion.index, token_ids=tuple(completion.token_ids),
                    logprobs=tuple(completion.logprobs) if completion.logprobs is not None else None,
                    text=completion.text, finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason, num_prompt_tokens=metrics.num_prompt_tokens,
                    num_cached_prompt_tokens=metrics.num_cached_prompt_tokens))

    def _fail(self, request_ids: list[str] | None, error: BaseException) -> None:
        """Ends the given requests (all of them for None) with an error."""
        for request_id in list(self._streams) if request_ids is None else request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(_Failed(error))

    # Engine thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if not self._engine.has_unfinished_requests():
                    self._publish_stats(stepped=False)
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                outputs = self._engine.step()
                # With async scheduling the last step() of a burst only reads the pending tokens: not a step.
                self._publish_stats(stepped=self._engine.last_step_num_seqs > 0)
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as error:  # the replica must learn of it: its health check reports it
            logger.exception("engine step loop failed")
            self._error = error
            dead = EngineDeadError(f"the engine failed: {error!r}")
            self._call_in_loop(self._fail, None, dead)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Abort):
                self._engine.abort_request(command.request_id)
                continue
            try:
                self._engine.add_request(command.request_id, command.prompt_token_ids, command.params)
            except ValueError as error:
                self._call_in_loop(self._fail, [command.request_id], error)

    def _publish_stats(self, stepped: bool) -> None:
        engine, previous = self._engine, self._stats
        stats = engine.stats()
        batch_size, tokens_per_step = previous.batch_size, previous.tokens_per_step
        if stepped:
            batch_size = batch_size.add(engine.last_step_num_seqs)
            tokens_per_step = tokens_per_step.add(engine.last_step_num_tokens)
        if time.monotonic() - self._slow_stats_time >= _SLOW_STATS_INTERVAL_S:
            self._read_slow_stats()
        self._stats = EngineStats(
            num_running=stats.num_running, num_waiting=stats.num_waiting,
            kv_blocks_used=round(stats.kv_cache_usage * stats.num_kv_blocks), kv_blocks_total=stats.num_kv_blocks,
            prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
            num_prefix_queried_tokens=engine.block_manager.num_prefix_queried_tokens,
            num_prefix_hit_tokens=engine.block_manager.num_prefix_hit_tokens, num_preemptions=stats.num_preemptions,
            num_steps=previous.num_steps + stepped, batch_size=batch_size, tokens_per_step=tokens_per_step,
            device=str(self._device), device_memory_used_bytes=self._device_memory[0],
            device_memory_total_bytes=self._device_memory[1])

    def _read_slow_stats(self) -> None:
        self._slow_stats_time = time.monotonic()
        counts = self._engine.take_expert_token_counts()
        if counts is not None:
            totals = self._expert_token_totals
            self._expert_token_totals = counts if totals is None else totals + counts
        self._device_memory = device_memory(self._device)

    def _call_in_loop(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the replica is going away
            pass


def device_memory(device: torch.device) -> tuple[int, int]:
    """(used, total) bytes: of the whole GPU, or on CPU this process's resident memory and the host's."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free, total
    page_size = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * page_size, os.sysconf("SC_PHYS_PAGES") * page_size
