"""`gptoss-serve bench sharded`: a replica's parts over 2 GPUs (or 2 CPU processes with gloo), in one run.

1. collectives: the per-step control path (one step message from the engine's rank, over each host channel and,
   for comparison, by the device broadcast it replaced) and a decode-sized all-reduce, NCCL against the one-shot
   symmetric-memory path, eager and inside a CUDA graph;
2. layouts: the same random model unsharded, with --tp 2 and with --ep 2; greedy tokens and logits compared;
3. engine: the sharded engine on Ray (random weights of --preset): single-stream decode and a concurrent batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _timed(fn, device: torch.device, iters: int = 200) -> float:
    """Median µs of fn() (a CUDA graph replay or eager call), after warm-up."""
    for _ in range(10):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _arrival_us(send, receive, rank: int, iters: int = 200) -> float:
    """Median µs from rank 0 starting send() to rank 1 holding what receive() returns (sends 1 ms apart, so none
    waits behind another; perf_counter is one clock for every process of a host)."""
    stamps = []
    for _ in range(iters):
        if rank == 0:
            time.sleep(1e-3)
            stamps.append(time.perf_counter())
            send()
        else:
            receive()
            stamps.append(time.perf_counter())
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, stamps)
    return statistics.median(b - a for a, b in zip(gathered[0], gathered[1])) * 1e6


def _device_message(device: torch.device, words: np.ndarray):
    """The step message sent as before the host channel: staged into a fixed device buffer and broadcast by the
    device group; the receiver copies it to its host, waiting for its device. (send, receive) for comparison."""
    from gptoss_serve.cluster.engine.step_broadcast import HEADER_SIZE

    message = torch.zeros(HEADER_SIZE + (1 << 15), dtype=torch.int64, device=device)  # the old fixed size
    staged = torch.zeros_like(message, device="cpu", pin_memory=device.type == "cuda")
    staged[:words.shape[0]] = torch.from_numpy(words)

    def send() -> None:
        message.copy_(staged, non_blocking=True)
        dist.broadcast(message, src=0)

    def receive() -> np.ndarray:
        dist.broadcast(message, src=0)
        return message.cpu().numpy()
    return send, receive


def _collectives(rank: int, device: torch.device, results: dict) -> None:
    from gptoss_serve.cluster.engine.model_runner import HostBatch
    from gptoss_serve.cluster.engine.step_broadcast import StepBroadcaster, StepKind, pack
    from gptoss_serve.model.parallel import ShardGroups

    world = dist.group.WORLD
    broadcasters = {transport: StepBroadcaster(world, device, transport) for transport in ("pipe", "gloo")}
    for batch in (1, 64, 256):
        blocks = 64  # a 1k-token context at 16 tokens a block
        host = HostBatch(np.arange(batch), np.full(batch, 1000), np.arange(batch + 1, dtype=np.int32),
                         np.full(batch, 1001, dtype=np.int32), np.zeros((batch, blocks), dtype=np.int32),
                         np.arange(batch), np.arange(batch), np.zeros((batch, 10), dtype=np.int32), np.arange(batch))
        for transport, broadcaster in broadcasters.items():
            label = f"step message over {transport}, decode batch {batch}"
            step = (lambda: broadcaster.send(host, StepKind.EAGER)) if rank == 0 else broadcaster.receive
            results[f"{label}: rank 0 send (µs)"] = _timed(step, device, 100)
            results[f"{label}: arrival on rank 1 (µs)"] = _arrival_us(lambda: broadcaster.send(host, StepKind.EAGER),
                                                                    broadcaster.receive, rank)
        send, receive = _device_message(device, pack(host))
        results[f"step message by device broadcast (before), decode batch {batch}: arrival on rank 1 (µs)"] = \
            _arrival_us(send, receive, rank)
    for broadcaster in broadcasters.values():
        broadcaster.close()
    if device.type != "cuda":
        x = torch.randn(8, 2880)
        results["all-reduce gloo 8x2880 fp32 (µs)"] = _timed(lambda: dist.all_reduce(x), device, 100)
        return
    for tokens in (8, 64):
        x = torch.randn(tokens, 2880, device=device, dtype=torch.bfloat16)
        label = f"{tokens}x2880 bf16 ({tokens * 2880 * 2 // 1024} KiB)"
        results[f"all-reduce NCCL eager {label} (µs)"] = _timed(lambda: dist.all_reduce(x.clone()), device)
        graph = torch.cuda.CUDAGraph()
        y = x.clone()
        dist.all_reduce(y)
        with torch.cuda.graph(graph):
            dist.all_reduce(y)
        results[f"all-reduce NCCL in graph {label} (µs)"] = _timed(graph.replay, device)
        for mode in ("one_shot", "two_shot"):
            groups = ShardGroups(attn=None, world=world)
            if not groups.enable_fast_all_reduce(device, torch.bfloat16, mode):
                results[f"{mode}: unavailable"] = True
                continue
            # Many consecutive calls on fresh data, as in a forward pass: a buffer reused too early shows here.
            equal = True
            for i in range(50):
                z = torch.randn(tokens, 2880, device=device, dtype=torch.bfloat16) * (i + 1)
                want = z.clone()
                dist.all_reduce(want)
                equal &= bool(torch.equal(groups.fast_world(z), want) or
                              torch.allclose(groups.fast_world(z).float(), want.float(), rtol=1e-2, atol=1e-2))
            results[f"{mode} equals NCCL over 50 calls {label}"] = equal
            results[f"all-reduce {mode} eager {label} (µs)"] = _timed(lambda: groups.fast_world(x), device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                groups.fast_world(x)
            results[f"all-reduce {mode} in graph {label} (µs)"] = _timed(graph.replay, device)


def _layouts(rank: int, device: torch.device, preset_name: str, kernels_name: str, results: dict) -> None:
    """Greedy decode of one prompt with each layout; rank 0 records the tokens and the logits' distance."""
    from gptoss_serve.kernels.backend import get_kernels
    from gptoss_serve.model.batch import KVCache, build_forward_batch
    from gptoss_serve.model.config import preset
    from gptoss_serve.model.loader import random_model
    from gptoss_serve.model.parallel import ShardGroups, ShardLayout

    config = preset(preset_name)
    dtype = getattr(torch, os.environ.get("GPTOSS_BENCH_DTYPE", "bfloat16" if device.type == "cuda" else "float32"))
    kernels = get_kernels(kernels_name if device.type == "cuda" else "torch")
    prompt = torch.randint(0, config.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(layout: ShardLayout, groups: ShardGroups | None) -> tuple[list[int], torch.Tensor]:
        model = random_model(config, seed=1, dtype=dtype, device=device, kernels=kernels, layout=layout, groups=groups)
        cache = KVCache.allocate(config, 32, 16, dtype, device, num_kv_heads=layout.num_kv_heads(config))
        tokens, logits = list(prompt), []
        for step in range(16):
            new = tokens if step == 0 else tokens[-1:]
            batch = build_forward_batch([new], [len(tokens) - len(new)], [list(range(32))], 16).to(device)
            step_logits = model.compute_logits(model(batch, cache))[-1]
            logits.append(step_logits.float().cpu())
            tokens.append(int(step_logits.argmax()))
        del model, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return tokens[len(prompt):], torch.stack(logits)

    if rank == 0:
        reference = run(ShardLayout(), None)
    dist.barrier()
    for name, tp, ep in (("tp2", 2, 1), ("ep2", 1, 2)):
        layout = ShardLayout(tp=tp, ep=ep, rank=rank)
        groups = ShardGroups.create(layout)
        fast = groups.enable_fast_all_reduce(device, dtype)
        tokens, logits = run(layout, groups)
        name = f"{name} ({kernels.name} kernels, {'symmetric-memory' if fast else dist.get_backend()} all-reduce)"
        if rank == 0:
            results[f"{name}: greedy tokens equal unsharded"] = tokens == reference[0]
            results[f"{name}: max |logit diff| / max |logit|"] = float(
                (logits - reference[1]).abs().max() / reference[1].abs().max())
        dist.barrier()


def _rank_main(rank: int, sections: list[str], preset_name: str, kernels_name: str, init_file: str,
               out_file: str) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, device_id=device if cuda else None)
    results: dict = {}
    try:
        if "collectives" in sections:
            _collectives(rank, device, results)
        if "layouts" in sections:
            _layouts(rank, device, preset_name, kernels_name, results)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)


def random_weights_spec(preset_name: str, tp: int, ep: int, engine_config, max_queued_requests: int):
    """A ShardSpec of random weights of `preset_name` laid out as --tp/--ep (dtype and kernels for the device)."""
    from gptoss_serve.cluster.shard.worker import ShardSpec

    return ShardSpec(model_dir=None, preset=preset_name, seed=0, dtype="auto", kernels="auto", tp=tp, ep=ep,
                     engine_config=engine_config, max_queued_requests=max_queued_requests)


async def start_replica(spec):
    """(client, placement group): a sharded replica of `spec` on the current Ray cluster (GPUs if there are)."""
    import ray

    from gptoss_serve.cluster.shard.engine_client import ShardedEngineClient, shard_bundles

    use_gpus = torch.cuda.is_available()
    group = ray.util.placement_group(shard_bundles(max(spec.tp, spec.ep), use_gpus), strategy="STRICT_PACK")
    await asyncio.to_thread(ray.get, group.ready(), timeout=120)
    client = await asyncio.to_thread(ShardedEngineClient.start, spec, None, asyncio.get_running_loop(), group,
                                     use_gpus)
    return client, group


async def stream_tokens(client, request_id: str, prompt: list[int], params) -> tuple[float, float, list[int]]:
    """(start, first-token time, token ids) of one request streamed through the client (perf_counter s)."""
    start, first, token_ids = time.perf_counter(), None, []
    async for delta in client.generate(request_id, prompt, params):
        first = first or time.perf_counter()
        token_ids += delta.token_ids
    return start, first, token_ids


def _engine(preset_name: str, tp: int, ep: int, prompt_counts: list[int], input_len: int, output_len: int,
            async_scheduling: bool = True) -> dict:
    """The sharded engine on Ray with random weights: decode tok/s of one stream, then output tok/s of each
    batch of concurrent prompts (all arriving at once), on one set of workers."""
    prompts = max(prompt_counts)
    import ray

    from gptoss_serve.cluster.engine.config import EngineConfig
    from gptoss_serve.cluster.engine.sampling_params import SamplingParams

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=8)
    spec = random_weights_spec(preset_name, tp, ep, EngineConfig(
        max_num_seqs=max(prompts, 1), max_num_batched_tokens=4096, max_model_len=input_len + output_len + 16,
        max_graph_batch_size=max(prompts, 1), async_scheduling=async_scheduling), max_queued_requests=prompts)
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
    rng = np.random.default_rng(0)

    def stream(client, request_id: str):
        return stream_tokens(client, request_id, rng.integers(0, 200000, input_len).tolist(), params)

    async def run() -> dict:
        started = time.perf_counter()
        client, _ = await start_replica(spec)
        out = {"load and capture (s)": round(time.perf_counter() - started, 1)}
        try:
            await stream(client, "warm-up")  # then a batch: kernels compile for the shapes to come, untimed
            await asyncio.gather(*(stream(client, f"warm-up-{i}") for i in range(min(8, prompts))))
            start, first, tokens = await stream(client, "single")
            out["single stream decode tok/s"] = round((len(tokens) - 1) / (time.perf_counter() - first), 1)
            out["single stream TTFT (ms)"] = round((first - start) * 1e3, 1)
            for count in prompt_counts:
                if count <= 1:
                    continue
                begin = time.perf_counter()
                runs = await asyncio.gather(*(stream(client, f"batch-{count}-{i}") for i in range(count)))
                wall = time.perf_counter() - begin
                out[f"{count} prompts output tok/s"] = round(sum(len(r[2]) for r in runs) / wall, 1)
                out[f"{count} prompts TTFT median (ms)"] = round(
                    1e3 * float(np.median([first - start for start, first, _ in runs])), 1)
        finally:
            await client.shutdown()
        return out

    try:
        return asyncio.run(run())
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss-serve bench sharded", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="collectives,layouts,engine")
    parser.add_argument("--preset", default="tiny", help="model shape for layouts (e.g. gpt-oss-20b)")
    parser.add_argument("--engine-preset", default=None, help="model shape for the engine (default: --preset)")
    parser.add_argument("--kernels", default="triton", help="kernel backend of the layouts section on GPUs")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--prompts", type=int, nargs="+", default=[64],
                        help="concurrent prompts of each engine batch run (e.g. 64 256)")
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="engine: wait for each step's tokens before scheduling the next")
    parser.add_argument("--output-len", type=int, default=256)
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (gloo)"}
    rank_sections = [s for s in sections if s in ("collectives", "layouts")]
    if rank_sections:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "results.json")
            mp.start_processes(_rank_main, args=(rank_sections, args.preset, args.kernels, os.path.join(tmp, "init"),
                                                 out_file),
                               nprocs=WORLD, join=True, start_method="spawn")
            with open(out_file) as f:
                results.update(json.load(f))
        print(json.dumps(results, indent=1), flush=True)
    if "engine" in sections:
        engine = _engine(args.engine_preset or args.preset, args.tp, args.ep, args.prompts, args.input_len,
                         args.output_len, not args.no_async_scheduling)
        results.update({f"engine {args.engine_preset or args.preset} tp{args.tp} ep{args.ep}: {k}": v
                        for k, v in engine.items()})
    width = max(len(k) for k in results)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
