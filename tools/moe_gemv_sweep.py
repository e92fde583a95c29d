"""A decode step's MoE experts (one token, or --tokens) on one GPU: the default path and the split-K kernel
against the matrix-vector kernel (kernels/moe_gemv.py) over a sweep of its tiles, on the serving layout (split
nibbles, rows tiled by 64) and on the swizzled one; then the 20b engine's single-stream decode with each 1-token
kernel, in the same run.
Each variant is checked against the default path's output. Times: CUDA-graph replays over 4 layers' weights
(kernels/bench.py's method); % HBM of the copy bandwidth measured first.
E.g. python3 tools/moe_gemv_sweep.py [--engine] [--around-best] [--experts 32] [--quick]"""
import argparse, itertools, json
import torch
from gptoss_serve.kernels import bench as kb
from gptoss_serve.kernels import moe_gemv, moe_matmul
from gptoss_serve.kernels.moe_matmul import moe_experts
from gptoss_serve.kernels.weight_layout import split_nibbles, swizzle_bits, tile_rows
from gptoss_serve.kernels.moe_ref import route_ref

parser = argparse.ArgumentParser()
parser.add_argument("--engine", action="store_true", help="also the 20b engine's single stream with each kernel")
parser.add_argument("--quick", action="store_true", help="a few gemv configs only")
parser.add_argument("--around-best", action="store_true", help="the second sweep's configs")
parser.add_argument("--epilogue", action="store_true", help="the epilogue kernels' block sizes")
parser.add_argument("--tokens", type=int, default=1, help="tokens of the step (the gemv takes pairs one by one)")
parser.add_argument("--experts", default="32,128", help="expert counts (32: 20b, 128: 120b)")
parser.add_argument("--rows-per-thread", default="1,2", help="--around-best: rows a thread an iteration")
parser.add_argument("--layouts", default="split,swizzled", help="serving layouts to sweep: split, swizzled")
parser.add_argument("--json", default=None)
args = parser.parse_args()

ceil = kb.measure_ceilings()
print(f"copy {ceil['copy_gbs']:.0f} GB/s, bf16 {ceil['bf16_tflops']:.0f} TFLOP/s", flush=True)
h = i = 2880
k = 4
TILE = 64
configs = [dict(kernel="gemv", KB=kb_, ROWS_PER_THREAD=rpt, ROWS_PER_PROGRAM=rpp, num_warps=w)
           for kb_, rpt, rpp, w in itertools.product((4, 8, 16), (1, 2), (128, 512), (4,))]
configs += [dict(kernel="gemv", KB=8, ROWS_PER_THREAD=1, ROWS_PER_PROGRAM=256, num_warps=8),
            dict(kernel="gemv", KB=8, ROWS_PER_THREAD=4, ROWS_PER_PROGRAM=512, num_warps=4),
            dict(kernel="gemv", KB=32, ROWS_PER_THREAD=1, ROWS_PER_PROGRAM=256, num_warps=4)]
if args.around_best:  # the second sweep, around the first one's best (KB 8-16, 128 rows a program); on
    # 2026-12-01 it also tried loading the next step's bytes ahead (slower by 6-12 us, since removed)
    configs = [dict(moe_gemv.DEFAULT_GEMV_CONFIG, kernel="gemv", KB=kb_, ROWS_PER_THREAD=rpt, ROWS_PER_PROGRAM=rpp)
               for kb_, rpt, rpp in itertools.product((8, 16), [int(r) for r in args.rows_per_thread.split(",")],
                                                      (32, 64, 128))]
if args.epilogue:  # the default gemv tiles with smaller blocks in the SwiGLU and combine kernels (more programs)
    configs = [dict(moe_gemv.DEFAULT_GEMV_CONFIG, kernel="gemv", EPILOGUE_BLOCK=b) for b in (32, 64, 128, 256)]
if args.quick:
    configs = configs[:4]
rows = []
layouts = [{"split": False, "swizzled": True}[name] for name in args.layouts.split(",")]
for num_experts, swizzled in itertools.product([int(e) for e in args.experts.split(',')], layouts):
    gen = torch.Generator(device="cuda").manual_seed(num_experts)
    relay = (lambda b: tile_rows(swizzle_bits(split_nibbles(b)), TILE)) if swizzled else \
        (lambda b: tile_rows(split_nibbles(b), TILE))
    layers = [[relay(t) if j in (0, 3) else t for j, t in enumerate(kb._moe_layer(num_experts, gen, h, i))]
              for _ in range(kb.NUM_COPIES)]
    x = torch.randn(args.tokens, h, device="cuda", generator=gen).to(torch.bfloat16)
    weights, ids = route_ref(torch.randn(args.tokens, num_experts, device="cuda", generator=gen), k)
    nbytes = torch.unique(ids).numel() * sum(t[0].numel() * t.element_size() for t in layers[0])
    layout = dict(split_nibbles=True, tile_n=TILE, swizzled=swizzled, fold_scales=True)

    def run(w, config):
        return moe_experts(x, weights, ids, w[0], w[1], w[2], w[3], w[4], w[5], 1.702, 7.0, config=config, **layout)

    ref = run(layers[0], None)
    name = f"{'20b' if num_experts == 32 else '120b'}{' swizzled' if swizzled else ''} {args.tokens} tok"
    gemv = moe_matmul.takes_gemv(args.tokens, k, num_experts)
    path = 'gemv' if gemv else 'split-K' if args.tokens <= moe_matmul.SPLITK_MAX_TOKENS else 'grouped'
    baseline = f"default ({path})"
    splitk = moe_matmul._splitk_config(args.tokens, x.device)
    variants = [(baseline, None)] + ([("split-K, CUDA cores", splitk)] if args.tokens == 1 else [])
    variants += [(json.dumps({k_: v for k_, v in c.items() if k_ != "kernel"}), c) for c in configs]
    for label, config in variants:
        try:
            ms, err = kb.time_variant(run, layers, config, ref)
        except Exception as e:  # a config that fails to compile must not cost the rest of the run
            print(f"{name} {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        row = dict(model=name, variant=label, us=round(ms * 1e3, 1),
                   hbm_pct=round(100 * nbytes / ms / 1e6 / ceil["copy_gbs"], 1), err=err)
        rows.append(row)
        print(f"{name:<14} | {label:<75} | {row['us']:7.1f} us | {row['hbm_pct']:5.1f}% HBM | err {err:.1e}",
              flush=True)
    del layers
    torch.cuda.empty_cache()

best = {}
for r in rows:
    if r["variant"].startswith("{") and r["err"] < 1e-2:
        if r["model"] not in best or r["us"] < best[r["model"]]["us"]:
            best[r["model"]] = r
print("\n| layout | default µs | best gemv µs | % HBM | config |\n| --- | ---: | ---: | ---: | --- |")
for model, b in best.items():
    base = next(r for r in rows if r["model"] == model and r["variant"].startswith("default"))
    print(f"| {model} | {base['us']} | {b['us']} | {b['hbm_pct']}% | {b['variant']} |")

if args.engine:
    from gptoss_serve.cluster.engine import bench as eb
    from gptoss_serve.cluster.engine.config import EngineConfig
    from gptoss_serve.cluster.engine.llm_engine import LLMEngine
    from gptoss_serve.kernels.backend import get_kernels
    from gptoss_serve.model.config import preset
    from gptoss_serve.model.loader import random_model

    model = random_model(preset("gpt-oss-20b"), seed=0, dtype=torch.bfloat16, device="cuda",
                         kernels=get_kernels("triton"))
    pick = best.get(f"20b {args.tokens} tok") if not args.epilogue else None  # else the defaults
    for kernel in ("splitk", "gemv", "splitk"):
        if kernel == "gemv" and pick is not None:
            moe_gemv.DEFAULT_GEMV_CONFIG.update(json.loads(pick["variant"]))
        moe_matmul.GEMV_DECODE = kernel == "gemv"
        engine = LLMEngine(model, EngineConfig(max_model_len=2048, max_num_seqs=8, max_graph_batch_size=8))
        eb.warm_up(engine, 1024, 2)
        for streams in (1, 2):
            result = eb.run_offline(engine, streams, 1024, 512, progress=False)
            print(f"engine 20b, {streams} stream(s), decode MoE {kernel}: {result.per_stream_decode_tokens_per_s:.1f} "
                  f"tok/s a stream ({result.tpot_ms_median:.3f} ms/token), output {result.output_tokens_per_s:.1f} "
                  f"tok/s, TTFT {result.ttft_ms_median:.0f} ms", flush=True)
            rows.append(dict(engine=kernel, streams=streams, tok_s=result.per_stream_decode_tokens_per_s,
                             tpot_ms=result.tpot_ms_median))
        eb.release_engine(engine)
if args.json:
    with open(args.json, "w") as f:
        json.dump(dict(ceilings=ceil, rows=rows), f, indent=1)
