"""Where the wgmma MoE kernel (kernels/moe_wgmma.py) goes wrong, if it does: each config's output against the
default path's on the serving layout, three runs each (a race shows as runs that differ), the token rows that
are off, and its time (kb.time_variant: CUDA-graph replays over 4 layers). Plain (one slot, waited wgmma) and
ring configs (copies COPY_AHEAD steps ahead) at each row-block size and row count, so that a fault of the ring
tells itself apart from one of the layouts.
E.g. GPTOSS_WGMMA_MOE=0 python3 tools/moe_wgmma_check.py [--cases 32x64,128x4096] [--tiles 64x2,128x2]
(GPTOSS_WGMMA_MOE=0: the default path it compares with is the grouped kernel wherever the wgmma kernel would be)"""
import argparse

import torch

from gptoss_serve.kernels import bench as kb
from gptoss_serve.kernels.moe_matmul import moe_experts

parser = argparse.ArgumentParser()
parser.add_argument("--cases", default="32x16,32x64,32x512,128x4096")
parser.add_argument("--tiles", default="16x1,64x1,64x2,128x2", help="BLOCK_T x M_REPS, comma-separated")
args = parser.parse_args()
h = i = 2880
# (BLOCK_T, M_REPS, STAGES, PIPELINED, num_warps, COPY_AHEAD): the plain reference, then the ring with copies 6
# and 7 steps ahead
TILES = [tuple(int(v) for v in tile.split("x")) for tile in args.tiles.split(",")]
CONFIGS = [(t, m, 8, p, 4, ahead) for t, m in TILES
           for p, ahead in ((False, None), (True, None), (True, 7))]

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


for case in args.cases.split(","):
    num_experts, num_tokens = (int(v) for v in case.split("x"))
    layers, x, weights, ids = kb.sweep_case(num_experts, num_tokens, h, i)

    def run(w, config):
        return moe_experts(x, weights, ids, *w, 1.702, 7.0, config=config, **kb.serving_layout_args())

    ref = run(layers[0], None)
    default_us = kb.time_variant(run, layers, None, ref)[0] * 1e3
    print(f"\n{num_experts} experts, {num_tokens} tokens: default path {default_us:.1f} us", flush=True)
    for block_t, m_reps, stages, pipelined, warps, ahead in CONFIGS:
        if block_t > 4 * num_tokens:  # more rows a block than the step has pairs
            continue
        config = dict(kernel="wgmma", BLOCK_T=block_t, M_REPS=m_reps, STAGES=stages, PIPELINED=pipelined,
                      num_warps=warps, COPY_AHEAD=ahead)
        ring = f"ring ahead={stages - 2 if ahead is None else ahead}" if pipelined else "plain"
        label = f"T={block_t:3d} rows={16 * warps * m_reps:3d} {ring:22s}"
        try:
            outs = [run(layers[0], config) for _ in range(3)]
            us = kb.time_variant(run, layers, config, ref)[0] * 1e3
        except Exception as e:  # a config that fails to compile must not cost the rest
            print(f"  {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        errs = [rel(o, ref) for o in outs]
        spread = max((outs[0].float() - o.float()).abs().max().item() for o in outs[1:])
        row_err = ((outs[0].float() - ref.float()).norm(dim=1) / ref.float().norm(dim=1).clamp_min(1e-6))
        bad_rows = (~(row_err < 1e-2)).sum().item()
        nan = (~torch.isfinite(outs[0].float())).sum().item()
        print(f"  {label} | {us:8.1f} us | errs {' '.join(f'{e:.1e}' for e in errs)} | run spread {spread:.2e} | "
              f"bad rows {bad_rows}/{num_tokens} | non-finite {nan}", flush=True)
