"""Prefill attention tile sweep on a GPU (paged KV cache, gpt-oss heads), for choosing paged_attention_prefill's
config. Times each config as kernels/bench.py times its prefill rows (CUDA-graph replays over its caches, one
sequence of LENGTH tokens, full attention and the 128-token window), checks it against the default config's
output, and prints µs, TFLOP/s and % of the bf16 matmul peak measured in the same run; beside them, at full
attention, torch's SDPA on the same q and as many of the caches' rows made contiguous (bench.sdpa_ms).

    python3 tools/attention_prefill_sweep.py [--lengths 1024,8192] [--windows 0,128] \\
        [--configs default,::8:3,256::8:2] [--rounds 2]

A config is BLOCK_ROWS:BLOCK_N:num_warps:num_stages ("default": the kernel's own; a field left empty keeps it).
"""
from __future__ import annotations

import argparse

import torch
from attention_decode_sweep import parse_tiles  # tools/, beside this script

from gptoss_serve.kernels.attention_prefill import paged_attention_prefill
from gptoss_serve.kernels.bench import NUM_COPIES, _bench, measure_ceilings, prefill_inputs, sdpa_ms

FIELDS = ("BLOCK_ROWS", "BLOCK_N", "num_warps", "num_stages")


def parse_config(spec: str) -> dict:
    return parse_tiles(spec, FIELDS, keep="default") or {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1024,8192")
    parser.add_argument("--windows", default="0,128")
    parser.add_argument("--configs", default="default")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ceil = measure_ceilings()
    print(f"bf16 matmul {ceil['bf16_tflops']:.0f} TFLOP/s", flush=True)
    configs = [(spec, parse_config(spec)) for spec in args.configs.split(",")]
    print("| tokens | window | config | µs (each round) | TFLOP/s | % of bf16 peak | rel. error |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for length in map(int, args.lengths.split(",")):
        for window in map(int, args.windows.split(",")):
            caches, tables, q, cu, lens, sinks, flops = prefill_inputs(length, window)
            ref = paged_attention_prefill(q, *caches[0], tables, cu, lens, sinks, 0.125, window).float()
            for spec, config in configs:
                out = paged_attention_prefill(q, *caches[0], tables, cu, lens, sinks, 0.125, window, config=config)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                times = [_bench(lambda: [paged_attention_prefill(q, kc, vc, tables, cu, lens, sinks, 0.125, window,
                                                                 config=config) for kc, vc in caches],
                                rep_ms=100) / NUM_COPIES for _ in range(args.rounds)]
                best = min(times)
                print(f"| {length} | {window or 'full'} | {spec} | {' / '.join(f'{t * 1e3:.1f}' for t in times)} | "
                      f"{flops / best / 1e9:.1f} | {flops / best / 1e9 / ceil['bf16_tflops']:.1%} | {err:.1e} |",
                      flush=True)
            if window == 0:
                ms = sdpa_ms(q, *caches[0])  # the bench's reference row
                print(f"| {length} | full | torch SDPA (contiguous, no sinks) | {ms * 1e3:.1f} | "
                      f"{flops / ms / 1e9:.1f} | {flops / ms / 1e9 / ceil['bf16_tflops']:.1%} | |", flush=True)
            del caches
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
