"""The chained wgmma launch (both MoE matmuls in one launch, moe_wgmma's CHAIN) called many times in a row, eagerly
and as CUDA-graph replays over 4 layers' weights: each case prints its time a call, whether every output equals the
first and whether the row blocks' counters are back at zero. A case that hangs (a program waiting on a count that
never comes) stops the script; run it under `timeout`. Cases: EXPERTSxTOKENS:PAIRS_A_BLOCK, PAIRS_A_BLOCK 8 or 16
(the decode tiles of moe_matmul.WGMMA_TILES).

    python3 tools/chain_stress.py --cases 32x64:16,128x8:8 --calls 2000"""
import argparse
import time

import torch

from gptoss_serve.kernels import bench as kb
from gptoss_serve.kernels.moe_matmul import WGMMA_TILES, moe_experts
from gptoss_serve.kernels.triton_utils import PDL, arrival_counters

parser = argparse.ArgumentParser()
parser.add_argument("--cases", default="32x64:16,32x8:8")
parser.add_argument("--calls", type=int, default=2000, help="eager calls, then as many graph replays, a case")
args = parser.parse_args()
h, i = kb.GPT_OSS["hidden"], kb.GPT_OSS["intermediate"]
print(f"PDL {PDL}", flush=True)

for case in args.cases.split(","):
    shape, block_t = case.split(":")
    num_experts, num_tokens = (int(v) for v in shape.split("x"))
    config = dict(kernel="wgmma", **WGMMA_TILES[int(block_t)], CHAIN=True)
    layers, x, weights, ids = kb.sweep_case(num_experts, num_tokens, h, i)

    def run(w):
        return moe_experts(x, weights, ids, *w, 1.702, 7.0, config=config, **kb.serving_layout_args())

    print(f"{case}: first call", flush=True)
    first = run(layers[0]).clone()
    torch.cuda.synchronize()
    counters = arrival_counters("moe_wgmma_chain", 1, x.device)
    start = time.perf_counter()
    same = all([torch.equal(run(layers[0]), first) for _ in range(args.calls)])
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - start) / args.calls * 1e6
    print(f"{case}: {args.calls} eager calls {eager_us:.1f} us a call (with a compare), outputs equal {same}, "
          f"counters at zero {not counters.any().item()}", flush=True)
    for w in layers:  # each layer's scales checked once, before the capture (moe_wgmma.scales_fit_f16)
        run(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [run(w) for w in layers]
    start = time.perf_counter()
    for _ in range(args.calls):
        graph.replay()
    torch.cuda.synchronize()
    graph_us = (time.perf_counter() - start) / args.calls / len(layers) * 1e6
    print(f"{case}: {args.calls} graph replays {graph_us:.1f} us a call, first layer's output equal "
          f"{torch.equal(outs[0], first)}, counters at zero {not counters.any().item()}", flush=True)
    del layers, graph, outs
    torch.cuda.empty_cache()
