"""Decode attention tile and split sweep on a GPU (paged KV cache, gpt-oss heads), for choosing the defaults of
kernels/attention_decode.py. Times every variant as kernels/bench.py does (CUDA-graph replays over 4 caches) and
prints µs and % of the copy bandwidth measured in the same run. Stage 1 sweeps the number of context slices at
decode_plan's tiles; stage 2 sweeps tiles at the best slice count.

    python3 tools/attention_decode_sweep.py [--batches 1,32,128] [--contexts 1024,8192,32768] [--json FILE]

With --layouts token,head [--block-sizes 16,32] [--fused-merge 0,1] [--splits 0,2] [--tiles plan,128:8:2]
[--rounds N] [--layers L] it times decode_plan's tiles (and slice count where --splits says 0) instead, on each cache
layout, block size, way to merge the slices, slice count and tiles in turn, N rounds, L layers a graph: token-major
blocks [blocks, block size, KV heads, head_dim] against head-major ones (a KV head's rows of a block contiguous, the
engine's; the same shape through strides); slices merged by a kernel (0) or by the last slice (1); tiles
BLOCK_N:num_warps:num_stages[:EARLY_META] ("plan": decode_plan's for the slice count the plan picks; a field left
empty keeps the plan's; EARLY_META 1 loads the lengths and first pages before the PDL wait; a fifth field, ALIGN,
timed at 41e9bf6, is gone and ignored).

With --profile [--splits ...] [--tiles ...] it prints each launch's GPU time in a layer instead (profile_launches).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from gptoss_serve.kernels.attention_decode import paged_attention_decode
from gptoss_serve.kernels.bench import (NUM_COPIES, _bench, _bench_layers, _decode_inputs, _kv_setup, cold_copies,
                                         measure_ceilings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--contexts", default="1024,8192,32768")
    parser.add_argument("--json")
    parser.add_argument("--layouts", help="comma-separated token,head: the default on each layout instead of a sweep")
    parser.add_argument("--block-sizes", default="16")
    parser.add_argument("--fused-merge", default="0")
    parser.add_argument("--splits", default="0", help="with --layouts: slice counts (0: decode_plan's)")
    parser.add_argument("--tiles", default="plan", help="with --layouts: plan or N:W:S entries, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=NUM_COPIES,
                        help="with --layouts: layers a timed graph holds, over bench.cold_copies caches")
    parser.add_argument("--profile", action="store_true",
                        help="with --splits and --tiles: each launch's GPU time, PDL off, beside the layer's time "
                             "with PDL and without (head-major blocks)")
    args = parser.parse_args()
    if args.profile:
        return profile_launches(args)
    if args.layouts:
        return compare_layouts(args)
    ceil = measure_ceilings()
    print(f"copy {ceil['copy_gbs']:.0f} GB/s", flush=True)
    results = []
    for num_seqs in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            gen = torch.Generator().manual_seed(num_seqs * context)
            caches, tables = _kv_setup(num_seqs, context, 16, gen)
            q, lens, sinks, nbytes = _decode_inputs(num_seqs, context, gen)
            ref = paged_attention_decode(q, *caches[0], tables, lens, sinks, 0.125).float()

            def run(splits, tiles):
                out = paged_attention_decode(q, *caches[0], tables, lens, sinks, 0.125, num_splits=splits, tiles=tiles)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = _bench(lambda: [paged_attention_decode(q, kc, vc, tables, lens, sinks, 0.125, num_splits=splits,
                                                            tiles=tiles) for kc, vc in caches], rep_ms=60) / NUM_COPIES
                row = dict(batch=num_seqs, context=context, splits=splits, tiles=tiles, us=ms * 1e3,
                           hbm=nbytes / ms / 1e6 / ceil["copy_gbs"], err=err)
                results.append(row)
                print(f"batch {num_seqs:4d} ctx {context:6d} splits {str(splits):>4s} {json.dumps(tiles or {}):60s} "
                      f"{ms * 1e3:8.1f} us {row['hbm'] * 100:5.1f}% HBM err {err:.1e}", flush=True)
                return ms

            default = run(None, None)
            stage1 = {}
            # Powers of two and the counts between them (3 * 2^k): a grid of whole waves of programs may lie there.
            for splits in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128):
                if splits * 32 > context:
                    break
                try:
                    stage1[splits] = run(splits, None)
                except Exception as e:  # noqa: BLE001 - a sweep reports and goes on
                    print(f"splits {splits}: {type(e).__name__}: {str(e)[:120]}")
            best = sorted(stage1, key=stage1.get)[:1]
            for splits, (bn, nw, ns) in itertools.product(best, itertools.product((32, 64, 128), (4, 8), (2, 3))):
                tiles = dict(BLOCK_N=bn, num_warps=nw, num_stages=ns)
                if splits * bn > context:
                    continue
                try:
                    run(splits, tiles)
                except Exception as e:  # noqa: BLE001
                    print(f"{tiles}: {type(e).__name__}: {str(e)[:120]}")
            mine = [r for r in results if r["batch"] == num_seqs and r["context"] == context]
            top = min(mine, key=lambda r: r["us"])
            print(f"BEST batch {num_seqs} ctx {context}: {top['us']:.1f} us ({top['hbm'] * 100:.1f}%), splits "
                  f"{top['splits']} {top['tiles']}; default {default * 1e3:.1f} us", flush=True)
            del caches
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ceilings=ceil, rows=results), f, indent=1)


def compare_layouts(args) -> None:
    """decode_plan's default on each (layout, block size) in turn, args.rounds rounds a size; µs and % of the copy."""
    ceil = measure_ceilings()
    print(f"copy {ceil['copy_gbs']:.0f} GB/s", flush=True)
    variants = [(layout, int(bs), fused == "1", int(splits), tiles) for layout in args.layouts.split(",")
                for bs in args.block_sizes.split(",") for fused in args.fused_merge.split(",")
                for splits in args.splits.split(",") for tiles in args.tiles.split(",")]
    results = []
    for num_seqs in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            gen = torch.Generator().manual_seed(num_seqs * context)
            q, lens, sinks, nbytes = _decode_inputs(num_seqs, context, gen)
            copies = cold_copies(nbytes, args.layers)
            times = {v: [] for v in variants}
            held = None  # ((layout, block size), caches, tables): variants in a row share them (the same seed)
            for _ in range(args.rounds):
                for variant in variants:
                    layout, block_size, fused, splits, tiles = variant
                    tile_dict = parse_tiles(tiles)
                    if held is None or held[0] != (layout, block_size):
                        held = None
                        torch.cuda.empty_cache()
                        held = ((layout, block_size), *_kv_setup(num_seqs, context, block_size,
                                                                 torch.Generator().manual_seed(1),
                                                                 head_major=layout == "head", copies=copies))
                    _, caches, tables = held
                    try:
                        ms = _bench_layers(lambda kv: paged_attention_decode(
                            q, *kv, tables, lens, sinks, 0.125, num_splits=splits or None, fused_merge=fused,
                            tiles=tile_dict), caches, args.layers, rep_ms=100)
                    except Exception as e:  # noqa: BLE001 - a sweep reports and goes on
                        print(f"{num_seqs} x {context} {layout} {block_size} fused {fused} splits {splits} {tiles}: "
                              f"{type(e).__name__}: {str(e)[:120]}", flush=True)
                        ms = float("nan")
                    times[variant].append(ms * 1e3)
            held = caches = tables = None
            torch.cuda.empty_cache()
            for (layout, block_size, fused, splits, tiles), us in times.items():
                row = dict(batch=num_seqs, context=context, layout=layout, block_size=block_size, fused_merge=fused,
                           splits=splits, tiles=tiles, us=us,
                           hbm=[nbytes / (t * 1e-3) / 1e6 / ceil["copy_gbs"] for t in us])
                results.append(row)
                print(f"| {num_seqs} x {context} | {layout} | {block_size} | {'last slice' if fused else 'kernel'} | "
                      f"{splits or 'plan'} | {tiles} | "
                      + " / ".join(f"{t:.1f}" for t in us) + " | "
                      + " / ".join(f"{100 * h:.1f}%" for h in row["hbm"]) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ceilings=ceil, rows=results), f, indent=1)


def profile_launches(args) -> None:
    """Where a decode layer's time goes: for each shape and variant (--splits, --tiles), the layer's µs as the bench
    times it with PDL and without, then each launch's median GPU time (torch profiler over replays of a graph
    captured without PDL, so that no kernel's time includes its wait for the one before); the rest of the layer
    without PDL is the gaps between launches."""
    from gptoss_serve.kernels.bench import _launch_sequence, pdl_off, profile_graph_without_pdl

    ceil = measure_ceilings()
    print(f"copy {ceil['copy_gbs']:.0f} GB/s", flush=True)
    print("| batch x context | slices | tiles | layer µs, PDL | layer µs, no PDL | launches (µs, no PDL) "
          "| gaps µs |")
    print("| --- | --- | --- | ---: | ---: | --- | ---: |")
    for num_seqs in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            gen = torch.Generator().manual_seed(num_seqs * context)
            q, lens, sinks, nbytes = _decode_inputs(num_seqs, context, gen)
            caches, tables = _kv_setup(num_seqs, context, 16, torch.Generator().manual_seed(1), head_major=True)
            for splits, tiles in itertools.product(map(int, args.splits.split(",")), args.tiles.split(",")):
                def layers():
                    return [paged_attention_decode(q, kc, vc, tables, lens, sinks, 0.125, num_splits=splits or None,
                                                   tiles=parse_tiles(tiles)) for kc, vc in caches]

                pdl_ms = _bench(layers, rep_ms=100) / NUM_COPIES
                with pdl_off():
                    plain_ms = _bench(layers, rep_ms=100) / NUM_COPIES
                replays = 20
                sequence = _launch_sequence(profile_graph_without_pdl(layers, replays), replays * NUM_COPIES)
                gaps = plain_ms * 1e3 - sum(t for _, t in sequence)
                print(f"| {num_seqs} x {context} | {splits or 'plan'} | {tiles} | {pdl_ms * 1e3:.1f} "
                      f"({nbytes / pdl_ms / 1e6 / ceil['copy_gbs']:.1%}) | {plain_ms * 1e3:.1f} | "
                      + ", ".join(f"{name.split('_kernel')[0]} {t:.1f}" for name, t in sequence)
                      + f" | {gaps:.1f} |", flush=True)
            del caches
            torch.cuda.empty_cache()


def parse_tiles(spec: str, names: tuple[str, ...] = ("BLOCK_N", "num_warps", "num_stages", "EARLY_META"),
                keep: str = "plan") -> dict | None:
    """`keep` -> None; 'a:b:c' -> {names[i]: int} over the kernel's own (a field left empty keeps its value): the
    tiles paged_attention_decode takes (tools/attention_prefill_sweep.py: its config)."""
    if spec == keep:
        return None
    return {name: int(value) for name, value in zip(names, spec.split(":")) if value}


if __name__ == "__main__":
    main()
