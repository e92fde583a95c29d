"""Wall time of every engine step, 20b shape on one GPU: 64 x 1024-token prompts (32 tokens out) all at once, with
synchronous scheduling, then async, then synchronous again (each with the prefix cache emptied); then a
torch-profiler split of one 4,096-token prefill step. The run behind docs/PERFORMANCE.md's JIT-stall finding.
E.g. python3 tools/engine_step_times.py"""
import time, collections
import torch
from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.llm_engine import LLMEngine
from gptoss_serve.cluster.engine.sampling_params import SamplingParams, OutputKind
from gptoss_serve.cluster.engine import bench
from gptoss_serve.kernels.backend import get_kernels
from gptoss_serve.model.config import preset
from gptoss_serve.model.loader import random_model

model = random_model(preset("gpt-oss-20b"), seed=0, dtype=torch.bfloat16, device="cuda", kernels=get_kernels("triton"))
engine = LLMEngine(model, EngineConfig(max_model_len=2048, max_num_seqs=256))
bench.warm_up(engine, 1024, 8)
params = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, detokenize=False,
                        output_kind=OutputKind.FINAL_ONLY)
for mode in (False, True, False):
    engine.async_scheduling = mode
    engine.block_manager.full.forget_free_cached(); engine.block_manager.sliding.forget_free_cached()
    for i, p in enumerate(bench.random_prompts(64, 1024, seed=99)):
        engine.add_request(f"{mode}-{i}", p, params)
    torch.cuda.synchronize()
    rows, t0 = [], time.perf_counter()
    while engine.has_unfinished_requests():
        s = time.perf_counter()
        engine.step()
        rows.append((round((time.perf_counter() - s) * 1e3, 2), engine.last_step_num_seqs, engine.last_step_num_tokens))
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    print(f"async={mode} total {total:.2f} s, steps {len(rows)}")
    print("  first 24 steps (ms, seqs, tokens):", rows[:24])
    by = collections.defaultdict(list)
    for ms, n, t in rows:
        by["prefill" if t > n else "decode"].append(ms)
    print("  ", {k: (len(v), round(sum(v), 1), round(sorted(v)[len(v)//2], 2)) for k, v in by.items()})
# one 4096-token prefill step under the profiler
from torch.profiler import profile, ProfilerActivity
engine.async_scheduling = False
for i, p in enumerate(bench.random_prompts(4, 1024, seed=7)):
    engine.add_request(f"prof-{i}", p, SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False))
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    engine.step(); torch.cuda.synchronize()
print("prefill step tokens", engine.last_step_num_tokens)
ev = sorted([e for e in prof.key_averages() if e.self_device_time_total > 0], key=lambda e: -e.self_device_time_total)
print("gpu ms", round(sum(e.self_device_time_total for e in ev) / 1e3, 2))
for e in ev[:16]:
    print("  ", e.key[:80], round(e.self_device_time_total / 1e3, 2), e.count)
while engine.has_unfinished_requests(): engine.step()
