"""One MoE layer (20b shape unless argv[2] names another expert count; the serving layout) run four times, for
Nsight Compute. argv[1] = tokens. E.g. (device tool, one GPU):

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        --section InstructionStats -k "regex:_moe|_topk|_group|_splitk|_combine" --launch-skip 15 --launch-count 5 \
        python3 tools/ncu_moe_layer.py 1
"""
import sys, torch
from gptoss_serve.kernels.bench import serving_blocks, serving_layout_args
from gptoss_serve.kernels.moe_matmul import moe_experts
from gptoss_serve.kernels.moe_routing import route
T = int(sys.argv[1]); E = int(sys.argv[2]) if len(sys.argv) > 2 else 32
g = torch.Generator(device="cuda").manual_seed(0)
w = []
for r, c in ((5760, 2880), (2880, 2880)):
    b = torch.randint(0, 256, (E, r, c // 32, 16), dtype=torch.uint8, device="cuda", generator=g)
    w += [serving_blocks(b), torch.randint(116, 124, (E, r, c // 32), dtype=torch.uint8, device="cuda", generator=g),
          torch.randn(E, r, device="cuda", generator=g).to(torch.bfloat16)]
x = torch.randn(T, 2880, device="cuda", generator=g).to(torch.bfloat16)
logits = torch.randn(T, E, device="cuda", generator=g)
for _ in range(4):
    wt, ids = route(logits, 4)
    moe_experts(x, wt, ids, *w, 1.702, 7.0, **serving_layout_args())
torch.cuda.synchronize()
print("done")
