"""MoE on the tensor-core decode kernel (kernels/moe_mma.py), up to 4 tokens on the two-launch matrix-vector kernels
(kernels/moe_gemv_fused.py), and from 16 tokens on the wgmma kernel (kernels/moe_wgmma.py), against the default
paths, on the serving layout.

For each experts x tokens case: the whole experts call (both matmuls, epilogues, combine; grouping where the
variant groups) timed as CUDA-graph replays over 4 layers' weights (kernels/bench.py's method), % of the copy
bandwidth measured first (bytes: the MXFP4 blocks and scales of the experts hit, as the bench counts them), and
each variant's relative error against the default path's output and against the torch twin's (on the
checkpoint layout, first case of each model only: it is slow).
E.g. python3 tools/moe_mma_sweep.py [--cases 32x1,32x8,128x1] [--configs default|all]"""
import argparse
import itertools

import torch

from gptoss_serve.kernels import bench as kb
from gptoss_serve.kernels.moe_matmul import WGMMA_SMALL_TILE, _tile_config, moe_experts
from gptoss_serve.kernels.weight_layout import merge_nibbles, untile_rows
from gptoss_serve.kernels.moe_gemv_fused import DEFAULT_GEMV_FUSED_CONFIG
from gptoss_serve.kernels.moe_mma import DEFAULT_MMA_CONFIG
from gptoss_serve.kernels.moe_ref import moe_experts_ref

parser = argparse.ArgumentParser()
parser.add_argument("--cases", default="32x1,128x1,32x2,128x2,32x4,128x4,32x8,128x8,32x16,32x32,32x64,128x64")
parser.add_argument("--configs", default="default", help="default: a few variants; all: the tile sweep")
parser.add_argument("--wgmma", default=None, help="the wgmma variants instead of the built-in grid: BLOCK_T:M_REPS:"
                    "STAGES:KB_PER_STEP[:TAIL_PAIRS[:MAXNREG[:SCALE_AFTER[:WARPS[:VECTOR_STORE]]]]] "
                    "(TAIL_PAIRS: each expert's last pairs, up to that many, in 16-pair tail blocks, 0 for none; "
                    "MAXNREG: a register cap, 0 for none; SCALE_AFTER: 1 scales each K block's product after its "
                    "wgmma, 0 before; WARPS: 4 (one warpgroup, the default) or 8 (two); VECTOR_STORE: 1 (the "
                    "default) stores the second matmul's rows 16 bytes at a time, 0 2 bytes), comma-separated; "
                    "with it, steps of more than 8 tokens also time the grouped kernel (its heuristic tiles) and "
                    "skip the tensor-core decode kernel; a tile ending in /chain runs both matmuls in one launch "
                    "(CHAIN)")
parser.add_argument("--no-gemv", action="store_true", help="skip the matrix-vector kernels' variants")
parser.add_argument("--no-mma", action="store_true", help="skip the tensor-core decode kernel's variants")
parser.add_argument("--mma-async", default="", help="the tensor-core decode kernel's default tile, staged at once, "
                    "with its weights copied asynchronously: GROUPS[:KB_MAX[:EARLY]] (ASYNC_GROUPS commit groups, K "
                    "blocks a program at most, 16 if not given; EARLY 1: the second matmul's copies before its PDL "
                    "wait), comma-separated, instead of the default variants")
parser.add_argument("--fused", default="", help="the one-launch kernel (kernels/moe_mma_fused.py) at one token: "
                    "Q:SLOTS:WARPS[:TMA] (K blocks a w1 stage, ring slots, 4, 8 or 16 warps; TMA 1: bulk tensor "
                    "copies), comma-separated")
parser.add_argument("--layers", type=int, default=kb.MOE_LAYERS, help="launches a timed graph, over 4 layers' "
                    "weights in turn (default: a 20b decode step's MoE layers; 4: the count before 2026-12-07)")
args = parser.parse_args()

ceil = kb.measure_ceilings()
print(f"copy {ceil['copy_gbs']:.0f} GB/s", flush=True)
h = i = 2880


def mma_variants(num_tokens: int) -> list[tuple[str, dict]]:
    """(label, config) of the tensor-core kernel: (BLOCK_T, KB_MAX, M_TILES, ROWS_PER_PROGRAM, num_warps,
    STAGE_ONCE, PREFETCH, ASYNC_GROUPS); BLOCK_T None = pairs one by one."""
    block_ts = [None] if num_tokens <= 2 else [None, 8] if num_tokens <= 8 else [16]
    if args.mma_async:
        specs = [_async_spec(spec) for spec in args.mma_async.split(",")]
        grid = [(t, spec[1], 1, 64, 4, True, False, spec[0], spec[2] == 1) for t in block_ts for spec in specs]
    elif args.configs == "all":
        block_ts = [None] if num_tokens == 1 else [None, 8, 16] if num_tokens <= 8 else [8, 16, 32]
        grid = list(itertools.product(block_ts, (8, 16, 32), (1, 2), (64, 128, 256), (4, 8), (False, True),
                                      (False, True), (0,), (False,)))
    else:  # the default tiles with each staging, and with the weights prefetched; blocks of 8 or 16 pairs too
        grid = [(t, 16, 1, 64, 4, once, pre, 0, False) for t in block_ts
                for once, pre in ((False, False), (True, False), (True, True), (False, True))]
    out = []
    for block_t, kb_max, m_tiles, rows, warps, stage_once, prefetch, groups, early in grid:
        if rows < 16 * warps * m_tiles or (prefetch and rows != 16 * warps * m_tiles):
            continue
        config = dict(DEFAULT_MMA_CONFIG, kernel="mma", BLOCK_T=block_t, KB_MAX=kb_max, M_TILES=m_tiles,
                      ROWS_PER_PROGRAM=rows, num_warps=warps, STAGE_ONCE=stage_once, PREFETCH=prefetch,
                      ASYNC_GROUPS=groups, EARLY_WEIGHTS=early)
        out.append((f"mma T={block_t} KB<={kb_max} mt={m_tiles} rows={rows} w={warps}"
                    f"{' staged at once' if stage_once else ''}{' prefetched' if prefetch else ''}"
                    f"{f' async x{groups}' if groups else ''}{' early' if early else ''}", config))
    return out


def _async_spec(spec: str) -> list[int]:
    """A --mma-async entry GROUPS[:KB_MAX[:EARLY]] -> [GROUPS, KB_MAX (16 if not given), EARLY (0 if not given)]."""
    values = [int(v) for v in spec.split(":")]
    if not 1 <= len(values) <= 3:
        raise SystemExit(f"--mma-async entry {spec!r}: GROUPS[:KB_MAX[:EARLY]]")
    return values + [16, 0][len(values) - 1:]


def one_launch_variants(num_tokens: int) -> list[tuple[str, dict]]:
    """(label, config) of the one-launch kernel from --fused (one token only)."""
    if num_tokens != 1 or not args.fused:
        return []
    specs = [[int(v) for v in spec.split(":")] + [0] for spec in args.fused.split(",")]
    return [(f"one launch Q={q} slots={slots} w={warps}{' TMA' if tma else ''}",
             dict(kernel="mma_fused", Q=q, SLOTS=slots, num_warps=warps, TMA=bool(tma)))
            for q, slots, warps, tma, *_ in specs]


def fused_variants(num_tokens: int) -> list[tuple[str, dict]]:
    """(label, config) of the two-launch matrix-vector kernels: rows a thread in w1 and in w2, warps, how many K
    ranges are unrolled and how many pipelined, and w2's own K range and warps (fewer rows a w2 program)."""
    if num_tokens > 4 or args.no_gemv:
        return []
    grid = [(2, 1, 4, 6, 1, None, None), (4, 2, 4, 6, 1, None, None), (2, 2, 4, 6, 1, None, None),
            (1, 1, 4, 6, 1, None, None), (2, 1, 8, 6, 1, None, None), (2, 1, 4, 1, 1, None, None),
            (2, 1, 4, 1, 2, None, None), (2, 1, 4, 6, 1, 32, None), (2, 1, 4, 6, 1, 16, 2), (2, 1, 4, 6, 1, 32, 2)]
    return [(f"gemv fused rows={rows}/{w2_rows} w={warps} unroll={unroll} stages={stages} w2 KB={w2_kb} w={w2_warps}",
             dict(DEFAULT_GEMV_FUSED_CONFIG, kernel="gemv_fused", ROWS_PER_THREAD=rows, W2_ROWS_PER_THREAD=w2_rows,
                  num_warps=warps, K_UNROLL=unroll, K_STAGES=stages, W2_KB=w2_kb, W2_NUM_WARPS=w2_warps))
            for rows, w2_rows, warps, unroll, stages, w2_kb, w2_warps in grid]


def wgmma_variants(num_tokens: int, num_experts: int) -> list[tuple[str, dict]]:
    """(label, config) of the wgmma kernel: pairs a row block (BLOCK_T), 64-row repetitions a warpgroup, ring
    stages, warps (4: one warpgroup, 8: two), K blocks a step (at most; 3 of 20b's 90)."""
    if num_tokens < (2 if args.wgmma else 8):  # one token: no grouping, the pairs are the row blocks
        return []
    if args.wgmma:  # BLOCK_T:M_REPS:STAGES:KB_PER_STEP[:TAIL_PAIRS[:MAXNREG[:SCALE_AFTER[:WARPS[:VECTOR_STORE]]]]]
        grid = [(spec[0], spec[1], spec[2], spec[7] if len(spec) > 7 else 4, spec[3], spec[4] if len(spec) > 4 else 0,
                 spec[5] if len(spec) > 5 and spec[5] else None, len(spec) > 6 and spec[6] == 1,
                 len(spec) <= 8 or spec[8] == 1, chain)
                for spec, chain in ((tuple(int(v) for v in tile.split("/")[0].split(":")), _launch_option(tile))
                                    for tile in args.wgmma.split(","))]
    elif num_tokens <= 64:
        grid = [(16, 1, 8, 4, 1, 0, None), (16, 2, 8, 4, 1, 0, None), (16, 2, 8, 4, 2, 0, None),
                (16, 2, 12, 4, 3, 0, None), (16, 2, 8, 4, 3, 0, 64), (16, 1, 8, 4, 3, 0, None),
                (32, 2, 12, 4, 3, 0, None), (16, 1, 12, 8, 3, 0, None)]
    else:
        grid = [(64, 1, 8, 4, 1, 0, None), (64, 2, 8, 4, 2, 0, None), (64, 2, 9, 4, 3, 0, None),
                (64, 2, 9, 4, 3, 16, None), (128, 1, 8, 4, 1, 0, None), (128, 2, 8, 4, 2, 0, None),
                (128, 2, 9, 4, 3, 0, None), (128, 2, 9, 4, 3, 16, None), (128, 1, 9, 8, 3, 0, None)]
    if not args.wgmma:
        grid = [tile + (False, True, False) for tile in grid]  # scaled before the wgmma, 16-byte stores
    grouped = [("grouped, heuristic tiles", _tile_config(num_tokens, num_tokens * 4, num_experts))] \
        if args.wgmma and num_tokens > 8 else []
    return grouped + [(f"wgmma T={block_t} rows={16 * warps * m_reps} stages={stages} w={warps} kb/step<={per_step}"
                       + (f" tail<={tail}" if tail else "") + (f" regs<={maxnreg}" if maxnreg else "")
                       + (" scaled after" if scale_after else "") + ("" if vector else " 2-byte stores")
                       + (" chained" if chain else ""),
                       dict(kernel="wgmma", BLOCK_T=block_t, M_REPS=m_reps, STAGES=stages, num_warps=warps,
                            KB_PER_STEP=per_step, maxnreg=maxnreg, SCALE_AFTER=scale_after, VECTOR_STORE=vector,
                            CHAIN=chain,
                            **(dict(TAIL=WGMMA_SMALL_TILE, TAIL_PAIRS=tail) if tail else {})))
                      for block_t, m_reps, stages, warps, per_step, tail, maxnreg, scale_after, vector, chain in grid]


def _launch_option(tile: str) -> bool:
    """A --wgmma tile's suffix: "" (two launches) or "/chain" (one launch, CHAIN)."""
    option = tile.partition("/")[2]
    if option not in ("", "chain"):
        raise SystemExit(f"unknown option {option!r} in --wgmma tile {tile!r}: /chain or none")
    return option == "chain"


seen_models = set()
for case in args.cases.split(","):
    num_experts, num_tokens = (int(v) for v in case.split("x"))
    layers, x, weights, ids = kb.sweep_case(num_experts, num_tokens, h, i)
    hit = torch.unique(ids).numel()
    nbytes = hit * (2 * i * h + i * h) * (0.5 + 1 / 32)
    print(f"\n{num_experts} experts, {num_tokens} tokens: {hit} experts hit, {nbytes / 1e6:.1f} MB", flush=True)

    def run(w, config):
        return moe_experts(x, weights, ids, *w, 1.702, 7.0, config=config, **kb.serving_layout_args())

    ref = run(layers[0], None)
    if num_experts not in seen_models:  # the torch twin on the checkpoint layout of the same bytes
        seen_models.add(num_experts)
        w1b, w1s, b1, w2b, w2s, b2 = layers[0]
        tile = kb.serving_layout_args()["tile_n"]
        twin = moe_experts_ref(x, weights, ids, merge_nibbles(untile_rows(w1b, tile)), w1s, b1,
                               merge_nibbles(untile_rows(w2b, tile)), w2s, b2, 1.702, 7.0)
    else:
        twin = None
    variants = one_launch_variants(num_tokens) + fused_variants(num_tokens) \
        + wgmma_variants(num_tokens, num_experts) \
        + (mma_variants(num_tokens) if num_tokens <= (8 if args.wgmma else 64) and not args.no_mma else [])
    for label, config in [("default", None)] + variants:
        try:
            ms, err = kb.time_variant(run, layers, config, ref, args.layers)
        except Exception as e:  # a variant that fails to compile must not cost the rest of the run
            print(f"  {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        twin_err = "" if twin is None else \
            f" | vs twin {((run(layers[0], config).float() - twin.float()).norm() / twin.float().norm()).item():.1e}"
        gbs = nbytes / ms / 1e6
        tflops = 2 * num_tokens * 4 * 3 * i * h / ms / 1e9  # both matmuls: 2i x h and h x i a pair
        print(f"  {label:<44} | {ms * 1e3:8.1f} us | {gbs:6.0f} GB/s | {100 * gbs / ceil['copy_gbs']:4.1f}% HBM | "
              f"{tflops:6.1f} TFLOP/s {100 * tflops / ceil['bf16_tflops']:4.1f}% | vs default {err:.1e}{twin_err}",
              flush=True)
    del layers
    torch.cuda.empty_cache()
