"""`gptoss-serve generate` and `gptoss-serve bench offline`: argparse wiring around the engine.

generate --json prints exactly one JSON line, {"token_ids": [...], "logprobs": [...], "text": "..."}, where
logprobs[i] is the model's log-probability (log_softmax over the whole vocabulary, float32) of token_ids[i].
Everything else (progress bars, warnings) goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from gptoss_serve.model.config import PRESETS


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded small model)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--kernels", choices=["auto", "torch", "triton"], default="auto",
                        help="kernel backend (auto: triton on a GPU, torch on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--long-prefill-token-threshold", type=int, default=None,
                        help="tokens a prompt's prefill may take in one step (default: the whole budget)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="wait for each step's tokens before scheduling the next")


def _engine_config(args: argparse.Namespace, max_model_len: int | None = None):
    from gptoss_serve.cluster.engine.config import EngineConfig

    return EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        max_model_len=args.max_model_len or max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, enable_prefix_caching=not args.no_prefix_caching,
        async_scheduling=not args.no_async_scheduling)


# generate ----------------------------------------------------------------------------------------------------
def add_generate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="complete one prompt offline",
        description="Complete one prompt (token ids, raw text, or a harmony chat message) with the engine.")
    _add_model_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", help="text, tokenized as is (see --chat)")
    parser.add_argument("--chat", action="store_true",
                        help="render --prompt as a harmony user message (default system message) and complete the "
                             "assistant turn")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="don't stop on <|return|>, <|call|>, <|endoftext|>")
    parser.add_argument("--json", action="store_true", help="print one JSON line: token_ids, logprobs, text")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel attention over this many GPUs (Ray)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel MoE over this many GPUs (Ray)")
    parser.set_defaults(func=run_generate)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from gptoss_serve.cluster.engine.llm import LLM

    if args.chat and args.prompt is None:
        raise SystemExit("--chat needs --prompt")
    if max(args.tp, args.ep) > 1:
        return _run_generate_sharded(args)
    llm = LLM(model=args.model, dtype=args.dtype, kernels=args.kernels, device=args.device,
              progress=not args.json, max_num_seqs=min(args.max_num_seqs, 8),
              max_num_batched_tokens=args.max_num_batched_tokens,
              long_prefill_token_threshold=args.long_prefill_token_threshold, max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              enable_prefix_caching=not args.no_prefix_caching, async_scheduling=not args.no_async_scheduling)
    if args.prompt_ids is not None:
        prompt = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
    elif args.chat:
        prompt = _chat_prompt(args.prompt, llm.tokenizer)
    else:
        prompt = args.prompt
    completion = llm.generate(prompt, _sampling_params(args), use_tqdm=False)[0].outputs[0]
    _print_completion(args, completion.token_ids, completion.logprobs, completion.text, llm.tokenizer is not None)
    return 0


def _sampling_params(args: argparse.Namespace):
    from gptoss_serve.cluster.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos, logprobs=0)


def _print_completion(args: argparse.Namespace, token_ids, logprobs, text: str, has_tokenizer: bool) -> None:
    if args.json:
        token_logprobs = [entry[token_id] for token_id, entry in zip(token_ids, logprobs)]
        print(json.dumps({"token_ids": list(token_ids), "logprobs": token_logprobs, "text": text}))
    else:
        print(text if has_tokenizer else " ".join(map(str, token_ids)))


def _run_generate_sharded(args: argparse.Namespace) -> int:
    """The same completion through shard workers on a local Ray cluster (imported only here: the engine
    itself knows nothing of Ray)."""
    from gptoss_serve.cluster.shard.offline import generate_sharded, sharded_spec
    from gptoss_serve.model.default_model import resolve_model_dir
    from gptoss_serve.model.tokenizer import load_tokenizer

    model_dir = str(resolve_model_dir(args.model))
    tokenizer = load_tokenizer(model_dir)
    if args.prompt_ids is not None:
        prompt = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t]
    elif args.chat:
        prompt = _chat_prompt(args.prompt, tokenizer)
    else:
        prompt = tokenizer.encode(args.prompt)
    engine_config = dataclasses.replace(_engine_config(args), max_num_seqs=min(args.max_num_seqs, 8))
    spec = sharded_spec(model_dir, args.dtype, args.kernels, args.tp, args.ep, engine_config)
    token_ids, logprobs, text = generate_sharded(spec, prompt, _sampling_params(args))
    _print_completion(args, token_ids, logprobs, text, True)
    return 0


def _chat_prompt(text: str, tokenizer) -> list[int]:
    from gptoss_serve.model.harmony.messages import Message, Role, SystemContent
    from gptoss_serve.model.harmony.render import render_conversation_for_completion

    if tokenizer is None:
        raise SystemExit("--chat needs the tokenizer's vocabulary file")
    messages = [Message(Role.SYSTEM, SystemContent()), Message(Role.USER, text)]
    return render_conversation_for_completion(messages, tokenizer=tokenizer)


# bench offline -----------------------------------------------------------------------------------------------
def add_bench_offline_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `offline` under the `bench` command's subparsers."""
    parser = subparsers.add_parser(
        "offline", help="offline throughput and latency benchmark",
        description="Random prompts of fixed lengths (stop tokens ignored), all at once, through the engine; "
                    "optionally HF transformers' generate on the same weights.")
    _add_model_arguments(parser)
    parser.add_argument("--preset", choices=list(PRESETS), default=None, help="model shape (with --random-weights)")
    parser.add_argument("--random-weights", action="store_true", help="random weights made on the device, no file")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single-stream", action="store_true", help="also time one prompt alone, first")
    parser.add_argument("--single-stream-runs", type=int, default=3,
                        help="with --single-stream: this many prompts alone, one after another (each new, so no "
                             "prefix-cache hit); each figure is the median over them (one TTFT is one sample)")
    parser.add_argument("--compare-sync", action="store_true",
                        help="with --single-stream: time it again with synchronous scheduling, same engine")
    parser.add_argument("--hf-baseline", action="store_true",
                        help="afterwards, run transformers' generate (bf16, eager) on the same weights")
    parser.add_argument("--hf-num-prompts", type=int, default=16, help="HF batch size")
    parser.add_argument("--hf-output-len", type=int, default=128)
    parser.add_argument("--profile-decode", type=int, nargs="*", default=[], metavar="NUM_SEQS",
                        help="afterwards, profile decode steps at these batch sizes (GPU time per kernel)")
    parser.add_argument("--profile-prefill", action="store_true",
                        help="afterwards, time prompts of --input-len alone to their one token (5 of them), and "
                             "profile one more (GPU time per kernel)")
    parser.add_argument("--json", action="store_true", help="also print all results as one JSON line")
    parser.set_defaults(func=run_bench_offline)
    return parser


def run_bench_offline(args: argparse.Namespace) -> int:
    import torch

    from gptoss_serve.cluster.engine import bench
    from gptoss_serve.cluster.engine.llm import default_device, resolve_dtype, resolve_kernels
    from gptoss_serve.cluster.engine.llm_engine import LLMEngine
    from gptoss_serve.kernels.backend import get_kernels
    from gptoss_serve.kernels.triton_utils import pdl_args

    device = args.device or default_device()
    args.kernels = resolve_kernels(args.kernels, device)
    model = _bench_model(args, resolve_dtype(args.dtype), device, get_kernels(args.kernels))
    engine = LLMEngine(model, _engine_config(args, max_model_len=args.input_len + args.output_len + 16))
    bench.warm_up(engine, args.input_len, min(args.num_prompts, 8))
    rows, results = [], {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                         "kernels": args.kernels, "dtype": args.dtype,
                         "cuda_graphs": engine.model_runner.graphs is not None,
                         "programmatic_dependent_launch": args.kernels == "triton"
                         and pdl_args(torch.device(device))["PDL"],
                         "num_kv_blocks": engine.stats().num_kv_blocks}
    print(json.dumps(results), file=sys.stderr, flush=True)
    if args.single_stream:
        # Seeds apart from the batch's (args.seed): a prompt seen before would start from the prefix cache.
        runs = [bench.run_offline(engine, 1, args.input_len, args.output_len, args.temperature, args.seed + 1 + i)
                for i in range(max(1, args.single_stream_runs))]
        single = bench.median_result(runs)
        rows.append((f"ours, 1 stream (median of {len(runs)})", dataclasses.asdict(single)))
        results["single_stream"] = dataclasses.asdict(single)
        results["single_stream_ttft_ms_runs"] = [round(r.ttft_ms_median, 2) for r in runs]
        print(json.dumps(results["single_stream"]), file=sys.stderr, flush=True)  # survives a later kill
        if args.compare_sync and engine.async_scheduling:
            engine.async_scheduling = False
            sync = bench.run_offline(engine, 1, args.input_len, args.output_len, args.temperature,
                                     args.seed + 1 + len(runs))
            engine.async_scheduling = True
            rows.append(("ours, 1 stream, sync scheduling", dataclasses.asdict(sync)))
            results["single_stream_sync"] = dataclasses.asdict(sync)
            print(json.dumps(results["single_stream_sync"]), file=sys.stderr, flush=True)
    batch = bench.run_offline(engine, args.num_prompts, args.input_len, args.output_len, args.temperature, args.seed)
    rows.append((f"ours, {args.num_prompts} prompts", dataclasses.asdict(batch)))
    results["throughput"] = dataclasses.asdict(batch)
    print(json.dumps(results["throughput"]), file=sys.stderr, flush=True)
    if args.profile_prefill:
        results["profile_prefill"] = bench.profile_prefill(engine, args.input_len)
        print(json.dumps(results["profile_prefill"]), file=sys.stderr, flush=True)
    for num_seqs in args.profile_decode:
        results.setdefault("profile_decode", []).append(bench.profile_decode(engine, num_seqs, args.input_len))
        print(json.dumps(results["profile_decode"][-1]), file=sys.stderr, flush=True)
    bench.release_engine(engine)
    del engine
    if args.hf_baseline:
        from gptoss_serve.cluster.engine.hf_baseline import hf_model_from

        hf = hf_model_from(model, dtype=torch.bfloat16, progress=True)
        del model  # HF holds its own (dequantized) copy now
        bench.release_engine(None)
        results["hf"] = _hf_runs(hf, args, rows)
    print(bench.format_table(rows))
    if args.json:
        print(json.dumps(results))
    return 0


def _bench_model(args: argparse.Namespace, dtype, device: str, kernels):
    from gptoss_serve.model.config import preset
    from gptoss_serve.model.loader import load_model, random_model

    if args.random_weights:
        if args.preset is None:
            raise SystemExit("--random-weights needs --preset")
        return random_model(preset(args.preset), seed=args.seed, dtype=dtype, device=device, kernels=kernels,
                            progress=True)
    from gptoss_serve.model.default_model import resolve_model_dir

    return load_model(resolve_model_dir(args.model), dtype, device, kernels, progress=True)


def _hf_runs(hf, args: argparse.Namespace, rows: list) -> dict:
    from gptoss_serve.cluster.engine import bench
    from gptoss_serve.cluster.engine.hf_baseline import hf_generate_throughput

    out = {}
    prompts = bench.random_prompts(args.hf_num_prompts, args.input_len, args.seed)
    if args.single_stream:
        out["single_stream"] = hf_generate_throughput(hf, prompts[:1], args.hf_output_len)
        rows.append(("HF transformers, 1 stream", out["single_stream"]))
        print(json.dumps(out["single_stream"]), file=sys.stderr, flush=True)
    out["batch"] = hf_generate_throughput(hf, prompts, args.hf_output_len)
    rows.append((f"HF transformers, batch {args.hf_num_prompts}", out["batch"]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (python -m gptoss_serve.cluster.engine.cli generate|bench offline ...)."""
    parser = argparse.ArgumentParser(prog="gptoss-serve")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    bench_parser = subparsers.add_parser("bench", help="benchmarks")
    add_bench_offline_parser(bench_parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
