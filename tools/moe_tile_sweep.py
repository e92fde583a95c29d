"""MoE tile sweep on the swizzled layout (TritonKernels.SWIZZLE) against the checkpoint layout's grouped path,
the run behind docs/PERFORMANCE.md's swizzled-layout figures. argv: copy GB/s, bf16 TFLOP/s (for the
percentages), optionally cases like 32x1,32x64 (experts x tokens). E.g. python3 tools/moe_tile_sweep.py 4300 790"""
import sys, torch
from gptoss_serve.kernels.moe_matmul import moe_experts, _tile_config, _num_sms
from gptoss_serve.kernels.weight_layout import split_nibbles, swizzle_bits, tile_rows
from gptoss_serve.kernels.moe_ref import route_ref
from gptoss_serve.kernels.bench import _bench, NUM_COPIES
copy_gbs, peak = float(sys.argv[1]), float(sys.argv[2])
which = sys.argv[3] if len(sys.argv) > 3 else "all"
sms = _num_sms(torch.device("cuda"))
H = I = 2880
def variants(T, E):
    d = _tile_config(T, 4 * T, E)
    v = [("default", None)]
    if T <= 8:
        tc = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, target_programs=8 * sms)
        v += [("splitK TC bn64", tc), ("splitK TC bn32", dict(tc, BLOCK_N=32)),
              ("splitK TC bn128", dict(tc, BLOCK_N=128)), ("splitK TC bk256", dict(tc, BLOCK_K=256)),
              ("splitK TC 4/SM", dict(tc, target_programs=4 * sms)),
              ("splitK TC 16/SM", dict(tc, target_programs=16 * sms)), ("splitK TC st2", dict(tc, num_stages=2)),
              ("splitK TC st4", dict(tc, num_stages=4)), ("grouped", d)]
        if T <= 2:
            cc = dict(BLOCK_M=T, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1, target_programs=8 * sms)
            v += [("splitK CC bn32", cc), ("splitK CC bn64", dict(cc, BLOCK_N=64)),
                  ("splitK CC w8 bn64", dict(cc, BLOCK_N=64, num_warps=8)), ("splitK CC bk256", dict(cc, BLOCK_K=256))]
    elif T <= 256:
        for bm in (16, 32, 64):
            for bn, bk, nw, ns in ((64, 128, 4, 3), (128, 128, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4)):
                v.append((f"grouped {bm},{bn},{bk},{nw},{ns}",
                          dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)))
    else:
        for c in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                  (64, 256, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 128, 8, 3)):
            v.append((f"grouped {c}", dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), c))))
    return v
cases = [(32, 1), (32, 2), (32, 4), (32, 8), (32, 16), (32, 64), (32, 256), (128, 1), (128, 8), (128, 64), (32, 4096)]
if which != "all":
    cases = [c for c in cases if f"{c[0]}x{c[1]}" in which.split(",")]
for E, T in cases:
    gen = torch.Generator(device="cuda").manual_seed(E + T)
    layers, raw = [], None
    for _ in range(NUM_COPIES):
        w = []
        for r, c in ((2 * I, H), (H, I)):
            b = torch.randint(0, 256, (E, r, c // 32, 16), dtype=torch.uint8, device="cuda", generator=gen)
            sc = torch.randint(116, 124, (E, r, c // 32), dtype=torch.uint8, device="cuda", generator=gen)
            bias = torch.randn(E, r, device="cuda", generator=gen).to(torch.bfloat16)
            w.append((b, sc, bias))
        if raw is None:
            raw = [t for trip in w for t in trip]
        served = [tile_rows(swizzle_bits(split_nibbles(w[j][0])), 64) for j in (0, 1)]
        layers.append([served[0], w[0][1], w[0][2], served[1], w[1][1], w[1][2]])
    x = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)
    wt, ids = route_ref(torch.randn(T, E, device="cuda", generator=gen), 4)
    active = torch.unique(ids).numel()
    nbytes = active * (2 * I * H // 32 * 17 + H * I // 32 * 17 + 2 * (2 * I + H))
    flops = 2 * T * 4 * (H * 2 * I + I * H)
    ref = moe_experts(x, wt, ids, *raw, 1.702, 7.0, config=_tile_config(T, 4 * T, E))  # checkpoint layout, grouped
    for label, cfg in variants(T, E):
        try:
            kw = dict(split_nibbles=True, swizzled=True, fold_scales=True, tile_n=64, config=cfg)
            out = moe_experts(x, wt, ids, *layers[0], 1.702, 7.0, **kw)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = _bench(lambda: [moe_experts(x, wt, ids, *l, 1.702, 7.0, **kw) for l in layers]) / NUM_COPIES
        except Exception as e:
            print(f"E={E} T={T} {label}: {type(e).__name__} {str(e)[:200]}", flush=True)
            continue
        print(f"E={E:3d} T={T:4d} act={active:3d} | {label:26s} | {ms*1e3:8.1f} us | "
              f"{nbytes/ms/1e6/copy_gbs*100:5.1f}% HBM | "
              f"{flops/ms/1e9:6.1f} TF {flops/ms/1e9/peak*100:4.1f}% | err {err:.1e}", flush=True)
    del layers, raw
    torch.cuda.empty_cache()
