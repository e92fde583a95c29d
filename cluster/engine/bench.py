"""Offline benchmark: a batch of random prompts of fixed input and output lengths (stop tokens ignored), all
arriving at once, run to completion through the engine.

Reports output tokens/s over the whole run, time to first token, and per-stream decode speed (each request's
tokens after its first, over the time since its first). Optionally a single-stream run first, and HF
transformers' generate on the same weights afterwards (see hf_baseline.py).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time

import torch
from tqdm import tqdm

from gptoss_serve.cluster.engine.llm_engine import LLMEngine
from gptoss_serve.cluster.engine.sampling_params import OutputKind, SamplingParams

NUM_ORDINARY_TOKENS = 199_998  # random prompts avoid the special ids


@dataclasses.dataclass
class OfflineResult:
    num_prompts: int
    input_len: int
    output_len: int
    seconds: float
    output_tokens_per_s: float
    total_tokens_per_s: float  # prompt and output tokens
    ttft_ms_median: float
    ttft_ms_p99: float
    per_stream_decode_tokens_per_s: float  # median over requests
    tpot_ms_median: float  # time per output token after the first, median over requests
    num_preemptions: int
    peak_kv_cache_usage: float
    num_cached_prompt_tokens: int  # found in the prefix cache: 0 unless a run's prompts repeat an earlier one's


def median_result(results: list[OfflineResult]) -> OfflineResult:
    """Each field's median over runs of one configuration (the runs' own medians; a run of one prompt has one
    TTFT, a single sample)."""
    fields = {}
    for field in dataclasses.fields(OfflineResult):
        values = [getattr(r, field.name) for r in results]
        fields[field.name] = type(values[0])(statistics.median(values))
    return OfflineResult(**fields)


def random_prompts(num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_ORDINARY_TOKENS, (num_prompts, input_len), generator=generator).tolist()


def warm_up(engine: LLMEngine, input_len: int = 64, num_prompts: int = 8) -> None:
    """Compiles kernels for the shapes to come (one prompt alone, then a batch) before timing."""
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, detokenize=False)
    input_len = max(1, min(input_len, engine.max_model_len - 8))
    for batch_size in (1, num_prompts):
        for i, prompt in enumerate(random_prompts(batch_size, input_len, seed=12345 + batch_size)):
            engine.add_request(f"warmup-{batch_size}-{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()


def profile_decode(engine: LLMEngine, num_seqs: int, input_len: int, num_steps: int = 20) -> dict:
    """Decode-only steps of num_seqs sequences: wall time per step, and the GPU time per kernel under the
    torch profiler (top 40 by self CUDA time). With programmatic dependent launch (kernels.triton_utils.PDL) a
    kernel's time includes its programs' wait for the kernel before, so the kernels sum to more than the step:
    GPTOSS_PDL=0 gives each kernel's own time."""
    from torch.profiler import ProfilerActivity, profile

    max_tokens = min(3 * num_steps + 10, engine.max_model_len - input_len - 1)
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(random_prompts(num_seqs, input_len, seed=777)):
        engine.add_request(f"profile-{i}", prompt, params)
    while any(seq.num_computed_tokens < seq.num_prompt_tokens
              for seq in list(engine.scheduler.waiting) + engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    _sync(engine)
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    _sync(engine)
    step_ms = (time.perf_counter() - start) / num_steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            engine.step()
        _sync(engine)
    engine.abort_request([f"profile-{i}" for i in range(num_seqs)])
    gpu_ms, top = _kernel_table(prof, num_steps)
    return {"num_seqs": num_seqs, "step_ms": step_ms, "gpu_ms_per_step": gpu_ms, "top_kernels_ms_per_step": top}


def profile_prefill(engine: LLMEngine, input_len: int, num_prompts: int = 5) -> dict:
    """Prompts alone, one after another, each new to the prefix cache and asked for one token: the wall time
    from add_request to its finished output (what a single stream's TTFT holds), then one more such prompt under
    the torch profiler (GPU time per kernel, top 40)."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True, detokenize=False)
    prompts = random_prompts(num_prompts + 1, input_len, seed=888)

    def one(i: int) -> float:
        _sync(engine)
        start = time.perf_counter()
        engine.add_request(f"prefill-{i}", prompts[i], params)
        while engine.has_unfinished_requests():
            engine.step()
        _sync(engine)
        return (time.perf_counter() - start) * 1e3

    wall_ms = [round(one(i), 2) for i in range(num_prompts)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        profiled_ms = one(num_prompts)
    gpu_ms, top = _kernel_table(prof, 1)
    return {"input_len": input_len, "wall_ms": wall_ms, "wall_ms_median": statistics.median(wall_ms),
            "profiled_wall_ms": profiled_ms, "gpu_ms": gpu_ms, "top_kernels_ms": top}


def _kernel_table(prof, num_steps: int) -> tuple[float, list]:
    """(GPU ms a step, [(kernel, ms a step, launches a step)] top 40 by self device time) from a profile of
    num_steps steps."""
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / num_steps
    return gpu_ms, [(e.key[:90], round(e.self_device_time_total / 1e3 / num_steps, 3), e.count // num_steps)
                    for e in events[:40]]


def run_offline(engine: LLMEngine, num_prompts: int, input_len: int, output_len: int, temperature: float = 1.0,
                seed: int = 0, progress: bool = True) -> OfflineResult:
    params = SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True, detokenize=False,
                            output_kind=OutputKind.FINAL_ONLY, seed=None)
    preemptions_before = engine.stats().num_preemptions
    _sync(engine)
    start = time.perf_counter()
    for i, prompt in enumerate(random_prompts(num_prompts, input_len, seed)):
        engine.add_request(f"bench-{i}", prompt, params, arrival_time=start)
    finished, peak_usage = [], 0.0
    with tqdm(total=num_prompts, desc=f"{num_prompts} x {input_len}->{output_len}", unit="req",
              disable=not progress or num_prompts < 2, leave=False) as bar:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished.append(output)
                    bar.update(1)
            peak_usage = max(peak_usage, engine.block_manager.usage)
    _sync(engine)
    seconds = time.perf_counter() - start
    num_output = sum(len(o.outputs[0].token_ids) for o in finished)
    ttfts = sorted((o.metrics.first_token_time - o.metrics.arrival_time) * 1e3 for o in finished)
    decode_times = [(o.metrics.finished_time - o.metrics.first_token_time) / max(1, len(o.outputs[0].token_ids) - 1)
                    for o in finished]
    return OfflineResult(
        num_prompts=num_prompts, input_len=input_len, output_len=output_len, seconds=seconds,
        output_tokens_per_s=num_output / seconds, total_tokens_per_s=(num_output + num_prompts * input_len) / seconds,
        ttft_ms_median=statistics.median(ttfts), ttft_ms_p99=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        per_stream_decode_tokens_per_s=1.0 / statistics.median(decode_times) if output_len > 1 else 0.0,
        tpot_ms_median=statistics.median(decode_times) * 1e3,
        num_preemptions=engine.stats().num_preemptions - preemptions_before, peak_kv_cache_usage=peak_usage,
        num_cached_prompt_tokens=sum(o.metrics.num_cached_prompt_tokens for o in finished))


def _sync(engine: LLMEngine) -> None:
    device = next(engine.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_engine(engine: LLMEngine | None) -> None:
    """Frees the KV cache and CUDA graphs (the model's weights stay with whoever holds the model), and hands
    cached device memory back."""
    if engine is not None:
        engine.model_runner.graphs = None
        engine.model_runner.kv_cache = None
        engine.kv_cache = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_table(rows: list[tuple[str, dict]]) -> str:
    """rows: (label, metrics); one line each, metrics in a fixed order where present."""
    columns = ["output_tokens_per_s", "per_stream_decode_tokens_per_s", "per_stream_tokens_per_s",
               "ttft_ms_median", "ttft_ms_p99", "tpot_ms_median", "seconds", "num_preemptions"]
    present = [c for c in columns if any(c in metrics for _, metrics in rows)]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'run':<{width}}  " + "  ".join(f"{c:>{max(len(c), 10)}}" for c in present)]
    for label, metrics in rows:
        cells = [f"{metrics[c]:>{max(len(c), 10)}.1f}" if c in metrics else " " * max(len(c), 10)
                 for c in present]
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
