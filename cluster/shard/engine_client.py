"""The replica's side of a sharded engine: starts one ShardWorker per GPU in the replica's placement group and
speaks the EngineClient protocol to rank 0.

Requests go to rank 0 one Ray call each; outputs come back through one long poll at a time that carries every
delta produced since the previous poll, so the Ray traffic per step does not grow with the batch. Each worker's
life is watched: if any dies, every request in flight ends with EngineDeadError naming the rank, the other
workers are killed (a follower stuck in a collective would otherwise hang), and the replica's health check
fails so that Serve replaces it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, AsyncIterator, Sequence

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.serve.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineInfo,
    EngineStats,
    GenerationDelta,
)
from gptoss_serve.cluster.shard.worker import GPU_ENV, ShardSpec, ShardWorker

logger = logging.getLogger(__name__)


def shard_bundles(world_size: int, use_gpus: bool) -> list[dict[str, float]]:
    """Placement-group bundles of a sharded replica: the replica's own (CPU), then one per rank. Each rank's
    bundle holds a CPU too, since an actor asks for one."""
    rank_bundle = {"CPU": 1.0, "GPU": 1.0} if use_gpus else {"CPU": 1.0}
    return [{"CPU": 1.0}] + [dict(rank_bundle) for _ in range(world_size)]


class ShardedEngineClient(EngineClient):
    def __init__(self, workers: list, info: EngineInfo, loop: asyncio.AbstractEventLoop,
                 follow_refs: list[ray.ObjectRef]):
        self._workers = workers
        self._info = info
        self._loop = loop
        self._streams: dict[str, asyncio.Queue] = {}
        self._stats = EngineStats()
        self._error: BaseException | None = None
        self._tasks = [loop.create_task(self._pump())]
        self._tasks += [loop.create_task(self._watch(rank + 1, ref)) for rank, ref in enumerate(follow_refs)]

    @staticmethod
    def start(spec: ShardSpec, tokenizer_dir: str | None, loop: asyncio.AbstractEventLoop,
              placement_group: PlacementGroup | None, use_gpus: bool) -> "ShardedEngineClient":
        """Blocking (call it from a thread): starts the workers, loads the weights, builds the engine."""
        from gptoss_serve.model.parallel import ShardLayout

        world_size = ShardLayout(tp=spec.tp, ep=spec.ep).world_size
        actor_class = ray.remote(ShardWorker)
        workers = []
        for rank in range(world_size):
            options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if use_gpus else 0, "max_concurrency": 64,
                                       "runtime_env": {"env_vars": GPU_ENV}, "max_restarts": 0}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=rank + 1)
            workers.append(actor_class.options(**options).remote(rank, spec))
        try:
            master = ray.get(workers[0].address.remote())
            loaded = ray.get([worker.load.remote(master) for worker in workers])
            logger.info("sharded replica: %s", loaded)
            # The engine's construction and the followers' loops plan and capture together (collectives).
            follow_refs = [worker.follow.remote() for worker in workers[1:]]
            info = EngineInfo(**ray.get(workers[0].start_engine.remote(tokenizer_dir)))
        except BaseException:
            for worker in workers:
                ray.kill(worker)
            raise
        return ShardedEngineClient(workers, info, loop, follow_refs)

    # EngineClient ------------------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats, num_in_flight_requests=len(self._streams))

    def is_alive(self) -> bool:
        return self._error is None

    async def expert_token_counts(self) -> Any:
        return None if self._error is not None else await self._workers[0].expert_token_counts.remote()

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        if self._error is not None:
            raise EngineDeadError(str(self._error))
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        num_unfinished = params.n
        try:
            await self._workers[0].submit.remote(request_id, list(prompt_token_ids), params)
            while num_unfinished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                num_unfinished -= item.finished
                yield item
        finally:
            del self._streams[request_id]
            if num_unfinished and self._error is None:  # the caller left early: free its blocks now
                self._workers[0].abort.remote(request_id)

    async def abort(self, request_id: str) -> None:
        if self._error is None:
            await self._workers[0].abort.remote(request_id)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._error is None:
            try:
                await asyncio.wait_for(self._workers[0].shutdown.remote(), timeout=30)
            except Exception:
                logger.warning("sharded engine shutdown failed", exc_info=True)
        for worker in self._workers:
            ray.kill(worker)

    # Background --------------------------------------------------------------------------------------------
    async def _pump(self) -> None:
        try:
            while True:
                items, stats = await self._workers[0].poll.remote()
                self._stats = stats
                for request_id, item in items:
                    stream = self._streams.get(request_id)
                    if stream is not None:
                        stream.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._die(f"shard worker 0 (the engine's rank) failed: {error}")

    async def _watch(self, rank: int, follow_ref: ray.ObjectRef) -> None:
        try:
            num_steps = await follow_ref  # returns only after shutdown() told the followers to stop
            self._die(f"shard worker {rank} stopped following after {num_steps} steps")
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._die(f"shard worker {rank} failed: {error}")

    def _die(self, reason: str) -> None:
        if self._error is not None:
            return
        logger.error("sharded engine is dead: %s", reason)
        self._error = EngineDeadError(reason)
        for stream in self._streams.values():
            stream.put_nowait(self._error)
        for worker in self._workers:  # a rank blocked in a collective with the dead one would hang forever
            ray.kill(worker)
