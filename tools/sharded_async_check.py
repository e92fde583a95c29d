"""A sharded replica (random weights of PRESET, --tp TP --ep EP) with synchronous then async scheduling: greedy
tokens of three prompts compared, then single-stream decode tok/s of each. SEQUENTIAL=1 sends the prompts one at
a time (the same batch shapes in both runs); LONG_TOKENS sets the timed stream's length (default 512).
E.g. python3 tools/sharded_async_check.py gpt-oss-120b 1 2 (on 2 GPUs; on CPU: tiny 2 1)"""
import asyncio, os, sys, time
import numpy as np
import ray
from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.shard.bench import random_weights_spec, start_replica, stream_tokens

preset_name, tp, ep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray.init(include_dashboard=False, log_to_driver=False, num_cpus=8)
rng = np.random.default_rng(0)
prompts = [rng.integers(0, 200000, n).tolist() for n in (1024, 300, 37)]
greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
long = SamplingParams(temperature=1.0, max_tokens=int(os.environ.get("LONG_TOKENS", 512)), ignore_eos=True)

async def run(async_scheduling):
    spec = random_weights_spec(preset_name, tp, ep, EngineConfig(max_num_seqs=16, max_model_len=2048,
                                                                  async_scheduling=async_scheduling), 16)
    client, group = await start_replica(spec)
    try:
        await stream_tokens(client, "warm", prompts[0], greedy)
        if os.environ.get("SEQUENTIAL"):  # one request at a time: the same batch shapes in both modes
            outs = [await stream_tokens(client, f"g{i}", p, greedy) for i, p in enumerate(prompts)]
        else:
            outs = await asyncio.gather(*(stream_tokens(client, f"g{i}", p, greedy) for i, p in enumerate(prompts)))
        tokens = [o[2] for o in outs]
        _, first, toks = await stream_tokens(client, "single", prompts[0], long)
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
