"""The sharded engine on Ray: one ShardWorker actor per (logical) GPU, gloo on CPU, against the unsharded engine.

The session's Ray cluster has fake GPU resources, so placement works as on a GPU node while each worker
computes on the CPU. Greedy tokens and float32 logprobs must equal the unsharded model's.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.llm import LLM
from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.serve.engine_client import EngineDeadError
from gptoss_serve.model.checkpoint_writer import write_checkpoint
from gptoss_serve.model.config import preset

CONFIG = preset("tiny").with_overrides(num_hidden_layers=3)
ENGINE = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory_bytes=8 * 2**20)
PROMPTS = [[5, 17, 300, 2, 99, 1000, 7] * 5, [42, 43], list(range(100, 160))]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    write_checkpoint(CONFIG, path, layout="original", seed=7)
    return path


@pytest.fixture(scope="module")
def unsharded(checkpoint):
    llm = LLM(str(checkpoint), dtype="float32", kernels="torch", device="cpu", progress=False,
              max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory_bytes=8 * 2**20)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, PARAMS)]


def _spec(checkpoint, tp: int, ep: int, async_scheduling: bool = True):
    import dataclasses

    from gptoss_serve.cluster.shard.worker import ShardSpec

    return ShardSpec(model_dir=str(checkpoint), preset=None, seed=0, dtype="float32", kernels="torch", tp=tp, ep=ep,
                     engine_config=dataclasses.replace(ENGINE, async_scheduling=async_scheduling),
                     max_queued_requests=16)


async def _collect(client, request_id: str, prompt: list[int]):
    token_ids, logprobs = [], []
    async for delta in client.generate(request_id, prompt, PARAMS):
        token_ids += delta.token_ids
        logprobs += delta.logprobs
    return token_ids, logprobs


async def _run_sharded(checkpoint, tp: int, ep: int, async_scheduling: bool = True):
    from gptoss_serve.cluster.shard.engine_client import ShardedEngineClient

    loop = asyncio.get_running_loop()
    spec = _spec(checkpoint, tp, ep, async_scheduling)
    client = await asyncio.to_thread(ShardedEngineClient.start, spec, None, loop, None, True)
    try:
        return await asyncio.gather(*(_collect(client, f"r{i}", p) for i, p in enumerate(PROMPTS)))
    finally:
        await client.shutdown()


@pytest.mark.parametrize("tp, ep, async_scheduling", [(2, 1, True), (1, 2, True), (2, 2, True), (1, 4, True),
                                                       (2, 1, False)])
def test_sharded_layouts_match_the_unsharded_engine(ray_cluster, checkpoint, unsharded, tp, ep, async_scheduling):
    """Async scheduling (the default): the engine's rank broadcasts each step's pending samples to the others."""
    results = asyncio.run(_run_sharded(checkpoint, tp, ep, async_scheduling))
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(results, unsharded):
        assert tokens == want_tokens
        got = torch.tensor([lp[t] for lp, t in zip(logprobs, tokens)])
        want = torch.tensor([lp[t] for lp, t in zip(want_logprobs, want_tokens)])
        assert torch.allclose(got, want, atol=1e-4)


def test_a_dead_worker_fails_its_requests_instead_of_hanging(ray_cluster, checkpoint):
    import ray

    from gptoss_serve.cluster.shard.engine_client import ShardedEngineClient

    async def scenario():
        loop = asyncio.get_running_loop()
        client = await asyncio.to_thread(ShardedEngineClient.start, _spec(checkpoint, 2, 1), None, loop, None, True)
        long_params = PARAMS.replace(max_tokens=10_000, logprobs=None)
        stream = client.generate("long", PROMPTS[0], long_params)
        await stream.__anext__()  # the request is running
        ray.kill(client._workers[1])  # a follower dies mid-request
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="shard worker 1"):
            async for _ in stream:
                pass
        assert time.monotonic() - started < 30
        assert not client.is_alive()
        with pytest.raises(EngineDeadError):
            await client.generate("after", PROMPTS[1], PARAMS).__anext__()
        await client.shutdown()

    asyncio.run(scenario())


def test_generate_cli_with_tp_and_ep_prints_the_unsharded_completion(ray_cluster, checkpoint, capsys):
    from gptoss_serve.cli import main

    argv = ["generate", "--model", str(checkpoint), "--prompt-ids", "5,17,300,2,99", "--max-tokens", "6",
            "--temperature", "0", "--dtype", "float32", "--json"]
    assert main(argv) == 0
    unsharded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(argv + ["--tp", "2", "--ep", "2"]) == 0  # on the session's Ray cluster
    sharded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sharded["token_ids"] == unsharded["token_ids"] and sharded["text"] == unsharded["text"]
    assert sharded["logprobs"] == pytest.approx(unsharded["logprobs"], abs=1e-4)


def test_a_sharded_replica_serves_http(deploy_app):
    """--tp 2 --ep 2 behind the real Serve app: the replica's placement group holds its two shard workers
    (logical GPUs), and /v1/completions returns the unsharded engine's greedy tokens and logprobs."""
    import httpx
    from ray import serve

    from gptoss_serve.cluster.serve.app import build_app

    name = "sharded_test"
    kv_bytes = 16 * 2**20
    app = build_app({"tensor_parallel_size": 2, "expert_parallel_size": 2, "dtype": "float32", "kernels": "torch",
                     "max_num_seqs": 8, "max_queued_requests": 8, "kv_cache_memory_bytes": kv_bytes})
    try:
        url = deploy_app(app, name)
        body = {"model": "gpt-oss-default", "prompt": [5, 17, 300, 2, 99], "max_tokens": 6, "temperature": 0,
                "logprobs": 1}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        offline = LLM(None, dtype="float32", kernels="torch", device="cpu", progress=False,
                      kv_cache_memory_bytes=kv_bytes).generate(
            [[5, 17, 300, 2, 99]], SamplingParams(temperature=0.0, max_tokens=6, logprobs=0))[0].outputs[0]
        assert choice["text"] == offline.text
        want = [lp[t] for lp, t in zip(offline.logprobs, offline.token_ids)]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
    finally:
        serve.delete(name)
