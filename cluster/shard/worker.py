"""One GPU of a sharded model replica: a Ray actor holding its rank's slice of the model.

Rank 0 also runs the engine (scheduler, sampling, the step loop in a thread) and serves the replica's requests;
every other rank runs the follow loop, receiving each step's metadata by one broadcast. Ray places and
supervises these actors; the per-step traffic goes over torch.distributed (NCCL on GPUs, gloo on CPUs), and
outputs reach the replica in per-step batches through poll(), never a Ray call per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# NVLink multicast stays off on the GPU machines we run on (it hangs there); Ray workers get these from us.
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What every rank loads: the same for all ranks but `rank`."""

    model_dir: str | None  # a checkpoint directory; None: random weights of `preset`
    preset: str | None
    seed: int
    dtype: str  # bfloat16 | float32 | auto (bfloat16 on a GPU, float32 on CPU)
    kernels: str  # torch | triton | auto (triton on a GPU, torch on CPU)
    tp: int
    ep: int
    engine_config: Any  # cluster.engine.config.EngineConfig
    max_queued_requests: int


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class ShardWorker:
    """A Ray actor (async: its event loop serves poll/submit while threads load weights and run steps)."""

    def __init__(self, rank: int, spec: ShardSpec):
        for key, value in GPU_ENV.items():
            os.environ.setdefault(key, value)
        self.rank, self.spec = rank, spec
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.model = None
        self.client = None  # rank 0: a LocalEngineClient over the engine
        self.broadcaster = None  # rank 0: sends each step to the other ranks
        self._outbox: list[tuple[str, Any]] = []
        self._outbox_ready = asyncio.Event()

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the process group's rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_tcp_port()

    async def load(self, master: tuple[str, int]) -> dict[str, Any]:
        """Joins the process group and loads this rank's slice of the weights (collective)."""
        return await asyncio.to_thread(self._load, master)

    def _load(self, master: tuple[str, int]) -> dict[str, Any]:
        from gptoss_serve.model.config import preset
        from gptoss_serve.model.loader import load_model, random_model
        from gptoss_serve.model.parallel import ShardGroups, ShardLayout

        spec = self.spec
        layout = ShardLayout(tp=spec.tp, ep=spec.ep, rank=self.rank)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=self.rank,
                                world_size=layout.world_size, device_id=self.device if backend == "nccl" else None)
        groups = ShardGroups.create(layout)
        dtype = getattr(torch, spec.dtype if spec.dtype != "auto" else
                        ("bfloat16" if self.device.type == "cuda" else "float32"))
        fast_all_reduce = groups.enable_fast_all_reduce(self.device, dtype)
        kernels = self._kernels()
        if spec.model_dir is not None:
            self.model = load_model(spec.model_dir, dtype, self.device, kernels, layout=layout, groups=groups)
        else:
            self.model = random_model(preset(spec.preset), spec.seed, dtype, self.device, kernels, layout=layout,
                                      groups=groups)
        return {"rank": self.rank, "device": str(self.device), "backend": backend, "fast_all_reduce": fast_all_reduce,
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None}

    def _kernels(self):
        from gptoss_serve.kernels.backend import get_kernels

        name = self.spec.kernels
        if name == "auto":
            name = "triton" if self.device.type == "cuda" else "torch"
        return get_kernels(name)

    def _broadcaster(self):
        from gptoss_serve.cluster.engine.step_broadcast import StepBroadcaster

        return StepBroadcaster(dist.group.WORLD, self.device)

    # Ranks 1..N-1 ------------------------------------------------------------------------------------------
    async def follow(self) -> int:
        """Runs the steps rank 0 broadcasts until it stops; returns how many ran."""
        return await asyncio.to_thread(self._follow)

    def _follow(self) -> int:
        from gptoss_serve.cluster.engine.llm_engine import run_follower

        broadcaster = self._broadcaster()  # collective with rank 0's start_engine
        try:
            return run_follower(self.model, self.spec.engine_config, broadcaster)
        finally:
            broadcaster.close()

    # Rank 0 ------------------------------------------------------------------------------------------------
    async def start_engine(self, tokenizer_dir: str | None) -> dict[str, Any]:
        """Builds the engine (collective with the followers' follow()) and starts its step loop."""
        from gptoss_serve.cluster.engine.llm_engine import LLMEngine
        from gptoss_serve.cluster.serve.local_engine import LocalEngineClient
        from gptoss_serve.model.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(tokenizer_dir)
        except (ImportError, OSError) as error:  # random weights on a machine without the vocabulary: ids only
            logger.warning("no tokenizer (%s): the engine returns token ids and no text", error)
            tokenizer = None
        self.broadcaster = await asyncio.to_thread(self._broadcaster)  # collective with the followers' follow()
        engine = await asyncio.to_thread(LLMEngine, self.model, self.spec.engine_config, tokenizer, self.broadcaster)
        self.client = LocalEngineClient(engine, self.spec.max_queued_requests, asyncio.get_running_loop())
        return dataclasses.asdict(self.client.info())

    async def submit(self, request_id: str, prompt_token_ids: list[int], params) -> None:
        """Starts a request; its deltas (or its error) come out of poll()."""
        asyncio.get_running_loop().create_task(self._stream(request_id, prompt_token_ids, params))

    async def _stream(self, request_id: str, prompt_token_ids: list[int], params) -> None:
        try:
            async for delta in self.client.generate(request_id, prompt_token_ids, params):
                self._post(request_id, delta)
        except Exception as error:  # delivered to the replica, which raises it to the request's caller
            self._post(request_id, error)

    def _post(self, request_id: str, item: Any) -> None:
        self._outbox.append((request_id, item))
        self._outbox_ready.set()

    async def poll(self) -> tuple[list[tuple[str, Any]], Any]:
        """Everything produced since the last poll (waiting for at least one item or a second), and the stats."""
        try:
            await asyncio.wait_for(self._outbox_ready.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        items, self._outbox = self._outbox, []
        self._outbox_ready.clear()
        return items, self.client.stats()

    async def abort(self, request_id: str) -> None:
        await self.client.abort(request_id)

    async def expert_token_counts(self) -> Any:
        return await self.client.expert_token_counts()

    def is_alive(self) -> bool:
        return self.client is None or self.client.is_alive()

    async def shutdown(self) -> None:
        """Stops the step loop and releases the followers (rank 0)."""
        if self.client is not None:
            await self.client.shutdown()  # the step loop has stopped: no step is being sent any more
            self.broadcaster.send_stop()
            self.broadcaster.close()
