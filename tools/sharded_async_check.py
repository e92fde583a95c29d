"""A sharded replica (random weights of PRESET, --tp TP --ep EP) with synchronous then async scheduling: greedy
tokens of three prompts compared, then single-stream decode tok/s of each. SEQUENTIAL=1 sends the prompts one at
a time (the same batch shapes in both runs); LONG_TOKENS sets the timed stream's length (default 512).
E.g. python3 tools/sharded_async_check.py gpt-oss-120b 1 2 (on 2 GPUs; on CPU: tiny 2 1)"""
import asyncio, os, sys, time
import numpy as np
import ray
import torch
from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.shard.engine_client import ShardedEngineClient, shard_bundles
from gptoss_serve.cluster.shard.worker import ShardSpec

preset_name, tp, ep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray.init(include_dashboard=False, log_to_driver=False, num_cpus=8)
rng = np.random.default_rng(0)
prompts = [rng.integers(0, 200000, n).tolist() for n in (1024, 300, 37)]
greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
long = SamplingParams(temperature=1.0, max_tokens=int(os.environ.get("LONG_TOKENS", 512)), ignore_eos=True)

async def collect(client, rid, prompt, params):
    toks, first = [], None
    async for d in client.generate(rid, prompt, params):
        first = first or time.perf_counter()
        toks += d.token_ids
    return toks, first

async def run(async_scheduling):
    gpus = torch.cuda.is_available()
    group = ray.util.placement_group(shard_bundles(max(tp, ep), gpus), strategy="STRICT_PACK")
    ray.get(group.ready(), timeout=120)
    spec = ShardSpec(model_dir=None, preset=preset_name, seed=0, dtype="auto", kernels="auto", tp=tp, ep=ep,
                     engine_config=EngineConfig(max_num_seqs=16, max_model_len=2048, async_scheduling=async_scheduling),
                     max_queued_requests=16)
    loop = asyncio.get_running_loop()
    client = await asyncio.to_thread(ShardedEngineClient.start, spec, None, loop, group, gpus)
    try:
        await collect(client, "warm", prompts[0], greedy)
        if os.environ.get("SEQUENTIAL"):  # one request at a time: the same batch shapes in both modes
            outs = [await collect(client, f"g{i}", p, greedy) for i, p in enumerate(prompts)]
        else:
            outs = await asyncio.gather(*(collect(client, f"g{i}", p, greedy) for i, p in enumerate(prompts)))
        tokens = [o[0] for o in outs]
        toks, first = await collect(client, "single", prompts[0], long)
        rate = (len(toks) - 1) / (time.perf_counter() - first)
    finally:
        await client.shutdown()
        ray.util.remove_placement_group(group)
    return tokens, rate

sync_tokens, sync_rate = asyncio.run(run(False))
async_tokens, async_rate = asyncio.run(run(True))
same = [a == b for a, b in zip(async_tokens, sync_tokens)]
print(f"{preset_name} tp{tp} ep{ep}: greedy tokens async == sync: {same}; "
      f"single-stream decode sync {sync_rate:.1f} tok/s, async {async_rate:.1f} tok/s")
