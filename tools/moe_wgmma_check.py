"""Where the wgmma MoE kernel (kernels/moe_wgmma.py) goes wrong, if it does: each config's output against the
default path's on the serving layout, three runs each (a race shows as runs that differ), with the token rows and
64-column tiles of the output that are off. Ring (PIPELINED) and plain (one slot, waited wgmma) configs at each
row-block size and row count, so that a fault of the ring tells itself apart from one of the layouts.
E.g. python3 tools/moe_wgmma_check.py [--cases 32x64,32x512,128x4096]"""
import argparse

import torch

from gptoss_serve.kernels import bench as kb
from gptoss_serve.kernels.moe_matmul import moe_experts
from gptoss_serve.kernels.moe_ref import route_ref

parser = argparse.ArgumentParser()
parser.add_argument("--cases", default="32x16,32x64,32x512,128x4096")
args = parser.parse_args()
h = i = 2880
# (BLOCK_T, M_REPS, STAGES, PIPELINED, num_warps)
CONFIGS = [(t, m, s, p, w) for t in (16, 64, 128) for m, w in ((1, 4), (2, 4))
           for s, p in ((8, False), (8, True), (4, True))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


for case in args.cases.split(","):
    num_experts, num_tokens = (int(v) for v in case.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(num_experts * 1000 + num_tokens)
    w = kb.serving_layers(num_experts, gen, h, i)[0]
    x = torch.randn(num_tokens, h, device="cuda", generator=gen).to(torch.bfloat16)
    weights, ids = route_ref(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), 4)
    layout = kb.serving_layout_args()
    ref = moe_experts(x, weights, ids, *w, 1.702, 7.0, **layout)
    print(f"\n{num_experts} experts, {num_tokens} tokens", flush=True)
    for block_t, m_reps, stages, pipelined, warps in CONFIGS:
        if block_t > 4 * num_tokens:  # more rows a block than the step has pairs
            continue
        config = dict(kernel="wgmma", BLOCK_T=block_t, M_REPS=m_reps, STAGES=stages, PIPELINED=pipelined,
                      num_warps=warps)
        label = f"T={block_t:3d} rows={16 * warps * m_reps:3d} stages={stages} {'ring ' if pipelined else 'plain'} w={warps}"
        try:
            outs = [moe_experts(x, weights, ids, *w, 1.702, 7.0, config=config, **layout) for _ in range(3)]
            torch.cuda.synchronize()
        except Exception as e:  # a config that fails to compile must not cost the rest
            print(f"  {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        errs = [rel(o, ref) for o in outs]
        spread = max((outs[0].float() - o.float()).abs().max().item() for o in outs[1:])
        row_err = ((outs[0].float() - ref.float()).norm(dim=1) / ref.float().norm(dim=1).clamp_min(1e-6))
        bad_rows = (~(row_err < 1e-2)).sum().item()
        tile_err = (outs[0].float() - ref.float()).reshape(num_tokens, -1, 64).abs().amax(dim=(0, 2))
        bad_tiles = (~(tile_err < 0.1)).nonzero().flatten().tolist()
        nan = (~torch.isfinite(outs[0].float())).sum().item()
        print(f"  {label} | errs {' '.join(f'{e:.1e}' for e in errs)} | run spread {spread:.2e} | "
              f"bad rows {bad_rows}/{num_tokens} | non-finite {nan} | bad 64-col tiles {bad_tiles[:12]}"
              f"{'...' if len(bad_tiles) > 12 else ''} ({len(bad_tiles)}/{tile_err.numel()})", flush=True)
