"""Prefill MoE tiles on the serving layout: the default heuristic (_tile_config) against other row-block heights
and weight-tile widths, at the 20b and 120b shapes. Each variant is checked against the default's output; times
are CUDA-graph replays over 4 layers' weights (kernels/bench.py's method), TFLOP/s against the bf16 matmul peak
measured first. E.g. python3 tools/moe_prefill_sweep.py [--cases 128x4096,32x512]"""
import argparse

import torch

from gptoss_serve.kernels import bench as kb
from gptoss_serve.kernels.moe_matmul import _tile_config, moe_experts
from gptoss_serve.kernels.moe_ref import route_ref

parser = argparse.ArgumentParser()
parser.add_argument("--cases", default="128x4096,128x1024,32x512,32x1024", help="experts x tokens, comma-separated")
args = parser.parse_args()

ceil = kb.measure_ceilings()
print(f"copy {ceil['copy_gbs']:.0f} GB/s, bf16 {ceil['bf16_tflops']:.0f} TFLOP/s", flush=True)
h = i = 2880
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); one dot a K step. BLOCK_K 64 with BLOCK_M >= 128 is refused.
TILES = [(64, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
         (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (64, 128, 64, 4, 3)]
for case in args.cases.split(","):
    num_experts, num_tokens = (int(v) for v in case.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(num_experts + num_tokens)
    layers = kb.serving_layers(num_experts, gen, h, i)
    x = torch.randn(num_tokens, h, device="cuda", generator=gen).to(torch.bfloat16)
    weights, ids = route_ref(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), 4)
    flops = 2 * num_tokens * 4 * (h * 2 * i + i * h)
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    default = _tile_config(num_tokens, 4 * num_tokens, num_experts)
    print(f"\n{num_experts} experts, {num_tokens} tokens: pairs per expert {counts.float().mean():.0f} "
          f"(min {int(counts.min())}, max {int(counts.max())}); default {default}", flush=True)

    def run(w, config):
        return moe_experts(x, weights, ids, *w, 1.702, 7.0, config=config, **kb.serving_layout_args())

    ref = run(layers[0], None)
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    variants = [("default", None)] + [(str(t), dict(zip(names, t), JOIN_K=True)) for t in TILES]
    for label, config in variants:
        try:
            ms, err = kb.time_variant(run, layers, config, ref)
        except Exception as e:  # a tile that fails to compile must not cost the rest of the run
            print(f"  {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        tflops = flops / ms / 1e9
        pct = 100 * tflops / ceil["bf16_tflops"]
        print(f"  {label:<24} | {ms * 1e3:8.1f} us | {tflops:6.1f} TFLOP/s | {pct:4.1f}% of bf16 peak | "
              f"err vs default {err:.1e}", flush=True)
    del layers
    torch.cuda.empty_cache()
