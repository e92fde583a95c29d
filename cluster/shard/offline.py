"""`gptoss-serve generate --tp T --ep E`: one prompt through a sharded engine on a local Ray cluster."""

from __future__ import annotations

import asyncio
import os

from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.shard.engine_client import ShardedEngineClient, shard_bundles
from gptoss_serve.cluster.shard.worker import ShardSpec


def generate_sharded(spec: ShardSpec, prompt_token_ids: list[int], params: SamplingParams,
                     ) -> tuple[list[int], list[dict[int, float]], str]:
    """(token ids, logprobs per token, text) of one completion; starts Ray here unless RAY_ADDRESS names one."""
    import ray
    import torch
    from ray.util.placement_group import placement_group

    from gptoss_serve.model.parallel import ShardLayout

    world_size = ShardLayout(tp=spec.tp, ep=spec.ep).world_size
    use_gpus = torch.cuda.is_available()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, bound to this machine
    if not ray.is_initialized():
        # Logical CPUs: each shard worker holds one while it mostly waits on its device.
        ray.init(address=os.environ.get("RAY_ADDRESS"), num_cpus=None if os.environ.get("RAY_ADDRESS") else
                 max(os.cpu_count() or 1, world_size + 1), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    bundles = shard_bundles(world_size, use_gpus)
    group = placement_group(bundles, strategy="STRICT_PACK")
    try:
        ray.get(group.ready(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise SystemExit(f"the Ray cluster cannot place {world_size} shard workers on one node "
                         f"(bundles {bundles}; available {ray.available_resources()})") from None

    async def run():
        loop = asyncio.get_running_loop()
        client = await asyncio.to_thread(ShardedEngineClient.start, spec, spec.model_dir, loop, group, use_gpus)
        token_ids, logprobs, text = [], [], ""
        try:
            async for delta in client.generate("generate-0", prompt_token_ids, params):
                token_ids += delta.token_ids
                logprobs += delta.logprobs or ()
                text += delta.text
        finally:
            await client.shutdown()
        return token_ids, logprobs, text

    try:
        return asyncio.run(run())
    finally:
        ray.util.remove_placement_group(group)


def sharded_spec(model_dir: str, dtype: str, kernels: str, tp: int, ep: int, engine_config: EngineConfig
                 ) -> ShardSpec:
    return ShardSpec(model_dir=model_dir, preset=None, seed=0, dtype=dtype, kernels=kernels, tp=tp, ep=ep,
                     engine_config=engine_config, max_queued_requests=0)
