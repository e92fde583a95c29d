"""Kernel benchmark (`gptoss-serve bench kernels`): Triton kernels against the measured ceilings and torch.

Measures, in one run on one GPU: the HBM bandwidth (device-to-device copy, bytes read + written) and the bf16
matmul rate (torch, 8192^3), then the MoE layer at the 20b and 120b shapes, decode attention and prefill
attention, each on fresh random data (never zeros). Triton timings replay a CUDA graph of several layers'
calls on distinct weights / caches, so that neither launch gaps nor the L2 cache flatter them; medians of
triton.testing.do_bench. The torch column is the plain-torch twin where it fits in time and memory, else the
baseline the row names (a bf16 matmul on weights dequantized once; SDPA without sinks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

import torch

import triton
import triton.language as tl

GPT_OSS = dict(hidden=2880, intermediate=2880, top_k=4, num_q_heads=64, num_kv_heads=8, head_dim=64)
NUM_COPIES = 4  # layers' worth of distinct weights or caches in one timed graph
# Decode attention rows: launches a timed graph holds, a 20b decode step's attention layers. Each replay carries
# a fixed ~13 µs (after do_bench's L2 flush, a 256 MB memset: likely the flush's dirty lines written back as the
# first reads evict them); 4 launches a graph put 3.3 µs of it on each, 24 put 0.55 (H100, 2026-12-07: batch
# 32 x 1k 29.8 -> 27.1-27.2 µs, 1 x 32k 30.9-31.0 -> 28.1-28.3; docs/PERFORMANCE.md).
DECODE_LAYERS = 24
# MoE rows (and the MoE layer by launch with its read floor) likewise, a step's MoE layers, since 2026-12-07
# (seventeenth session, H100): 20b 1 token 36.8 -> 34.3 µs, 8 tokens 122.4 -> 119.2; the 1-token read floor 78% ->
# 90% of the copy.
MOE_LAYERS = DECODE_LAYERS
KV_HEAD_MAJOR = True  # KV cache blocks as KVCache stores them; --kv-layout token: token-major (comparisons)


def serving_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """MXFP4 bytes in the layout TritonKernels.prepare_weights serves (rows of 64 tiled; swizzled if SWIZZLE)."""
    from gptoss_serve.kernels.weight_layout import split_nibbles, swizzle_bits, tile_rows
    from gptoss_serve.kernels.triton_backend import TritonKernels

    split = split_nibbles(blocks)
    return tile_rows(swizzle_bits(split) if TritonKernels.SWIZZLE else split, TritonKernels.ROW_TILE)


def serving_layout_args() -> dict:
    from gptoss_serve.kernels.triton_backend import TritonKernels

    return dict(split_nibbles=True, swizzled=TritonKernels.SWIZZLE, fold_scales=True, tile_n=TritonKernels.ROW_TILE)


def _bench(fn, graph: bool = True, rep_ms: int = 200) -> float:
    """Median milliseconds of fn() over about rep_ms of runs; captured in a CUDA graph first when `graph`."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def _bench_layers(launch, copies: list, num_layers: int, **bench_args) -> float:
    """Milliseconds a launch: num_layers calls of launch(copy) in one timed graph (_bench), taking `copies` in turn."""
    return _bench(lambda: [launch(copies[i % len(copies)]) for i in range(num_layers)], **bench_args) / num_layers


def time_variant(run, layers: list, config, ref: torch.Tensor, num_layers: int = NUM_COPIES) -> tuple[float, float]:
    """(milliseconds a layer, relative error against ref) of run(weights, config), timed num_layers launches to a
    graph over the layers' weights in turn (the sweeps' method)."""
    out = run(layers[0], config)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    return _bench_layers(lambda w: run(w, config), layers, num_layers), err


def measure_ceilings() -> dict:
    src = torch.randn(2 ** 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), graph=False)
    copy_gbs = 2 * src.numel() * 4 / ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b, graph=False)
    del src, dst, a, b
    return dict(copy_gbs=copy_gbs, bf16_tflops=2 * 8192 ** 3 / ms / 1e9)


# MoE -------------------------------------------------------------------------------------------------------------
def _moe_layer(num_experts: int, gen: torch.Generator, hidden: int, intermediate: int) -> list[torch.Tensor]:
    """[w1 blocks, w1 scales, b1, w2 blocks, w2 scales, b2] of random MXFP4 experts on the GPU, drawn on the
    generator's device (a CUDA generator makes 120b's gigabytes in a moment)."""
    def mxfp4(rows, cols):
        blocks = torch.randint(0, 256, (num_experts, rows, cols // 32, 16), dtype=torch.uint8, generator=gen,
                               device=gen.device)
        scales = torch.randint(116, 124, (num_experts, rows, cols // 32), dtype=torch.uint8, generator=gen,
                               device=gen.device)
        return blocks.cuda(), scales.cuda()

    w1b, w1s = mxfp4(2 * intermediate, hidden)
    w2b, w2s = mxfp4(hidden, intermediate)
    b1 = torch.randn(num_experts, 2 * intermediate, generator=gen, device=gen.device).to(torch.bfloat16).cuda()
    b2 = torch.randn(num_experts, hidden, generator=gen, device=gen.device).to(torch.bfloat16).cuda()
    return [w1b, w1s, b1, w2b, w2s, b2]


def serving_layers(num_experts: int, gen: torch.Generator, hidden: int, intermediate: int) -> list[list[torch.Tensor]]:
    """NUM_COPIES random MoE layers (_moe_layer) with their blocks in the serving layout (the sweeps' inputs)."""
    return [[serving_blocks(t) if j in (0, 3) else t for j, t in enumerate(_moe_layer(num_experts, gen, hidden,
                                                                                       intermediate))]
            for _ in range(NUM_COPIES)]


def sweep_case(num_experts: int, num_tokens: int, hidden: int, intermediate: int):
    """The sweeps' inputs for one experts x tokens case, seeded by it: (layers in the serving layout, x [tokens,
    hidden] bf16, routing weights, expert ids [tokens, 4]); CUDA only."""
    from gptoss_serve.kernels.moe_ref import route_ref

    gen = torch.Generator(device="cuda").manual_seed(num_experts * 1000 + num_tokens)
    layers = serving_layers(num_experts, gen, hidden, intermediate)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    weights, ids = route_ref(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), 4)
    return layers, x, weights, ids


def bench_moe(ceil: dict, token_counts: list[int], expert_counts: list[int], torch_max_tokens: int,
              num_layers: int = MOE_LAYERS) -> list[dict]:
    """MoE rows: `num_layers` launches a timed graph over NUM_COPIES layers' weights in turn (each launch reads 53 MB or
    more, so three others' reads lie between two of one copy's: cold)."""
    from gptoss_serve.kernels.moe_matmul import moe_experts
    from gptoss_serve.kernels.moe_ref import moe_experts_ref, route_ref, swiglu_ref
    from gptoss_serve.kernels.mxfp4 import dequantize_mxfp4

    h, i, k = GPT_OSS["hidden"], GPT_OSS["intermediate"], GPT_OSS["top_k"]
    rows = []
    for num_experts in expert_counts:
        gen = torch.Generator().manual_seed(num_experts)
        layers = [_moe_layer(num_experts, gen, h, i) for _ in range(NUM_COPIES)]
        # The serving layout, as TritonKernels.prepare_weights leaves it; the torch twins read `layers`.
        prepared = [[serving_blocks(t) if j in (0, 3) else t for j, t in enumerate(w)] for w in layers]
        bytes_per_expert = sum(t[0].numel() * t.element_size() for t in layers[0])
        for num_tokens in token_counts:
            x = torch.randn(num_tokens, h, generator=gen).to(torch.bfloat16).cuda()
            weights, ids = route_ref(torch.randn(num_tokens, num_experts, generator=gen).cuda(), k)
            num_active = torch.unique(ids).numel()
            ms = _bench_layers(lambda w: moe_experts(x, weights, ids, *w, 1.702, 7.0, **serving_layout_args()),
                               prepared, num_layers)
            nbytes = num_active * bytes_per_expert + x.numel() * 2 * 2
            flops = 2 * num_tokens * k * (h * 2 * i + i * h)
            row = dict(op=f"MoE {'20b' if num_experts == 32 else '120b' if num_experts == 128 else num_experts}",
                       shape=f"{num_tokens} tok, {num_active}/{num_experts} experts", ms=ms,
                       gbs=nbytes / ms / 1e6, tflops=flops / ms / 1e9)
            w = layers[0]
            if num_tokens <= torch_max_tokens:
                row["torch_ms"] = _bench(lambda: moe_experts_ref(x, weights, ids, *w, 1.702, 7.0), graph=False)
                row["torch_path"] = "moe_experts_ref"
            else:
                active = torch.unique(ids).tolist()
                deq = {e: (dequantize_mxfp4(w[0][e], w[1][e]), dequantize_mxfp4(w[3][e], w[4][e])) for e in active}
                pairs = {e: torch.nonzero(ids == e, as_tuple=True) for e in active}

                def bf16_once():
                    out = torch.zeros(num_tokens, h, dtype=torch.float32, device="cuda")
                    for e in active:
                        t_idx, s_idx = pairs[e]
                        a = swiglu_ref(x[t_idx] @ deq[e][0].T + w[2][e], 1.702, 7.0).to(torch.bfloat16)
                        out.index_add_(0, t_idx, (a @ deq[e][1].T + w[5][e]).float() * weights[t_idx, s_idx, None])
                    return out.to(torch.bfloat16)

                row["torch_ms"] = _bench(bf16_once, graph=False)
                row["torch_path"] = "bf16 weights dequantized once"
                del deq
            rows.append(row)
        del layers, prepared
        torch.cuda.empty_cache()
    return rows


def bench_moe_paths(ceil: dict, token_counts: list[int], expert_counts: list[int], sweep: bool) -> list[dict]:
    """The decode (split-K) path against the grouped path with fused epilogues, on the serving layout; with
    `sweep`, also split targets, tile widths and a K-major scale layout at 1 and 8 tokens. Both paths also on
    the tiled-row layout (`tile_rows`, 64 rows). Each variant is checked against the grouped path's output."""
    from gptoss_serve.kernels.moe_matmul import _num_sms, _splitk_config, _tile_config, moe_experts
    from gptoss_serve.kernels.weight_layout import split_nibbles, tile_rows

    from gptoss_serve.kernels.moe_ref import route_ref

    TILE = 64  # rows per tile of the tiled-row layout

    h, i, k = GPT_OSS["hidden"], GPT_OSS["intermediate"], GPT_OSS["top_k"]
    sms = _num_sms(torch.device("cuda"))
    rows = []
    for num_experts in expert_counts:
        gen = torch.Generator(device="cuda").manual_seed(num_experts)

        def mxfp4(r, c):
            b = torch.randint(0, 256, (num_experts, r, c // 32, 16), dtype=torch.uint8, device="cuda", generator=gen)
            sc = torch.randint(116, 124, (num_experts, r, c // 32), dtype=torch.uint8, device="cuda", generator=gen)
            return split_nibbles(b), sc

        layers = []
        for _ in range(NUM_COPIES):
            w1b, w1s = mxfp4(2 * i, h)
            w2b, w2s = mxfp4(h, i)
            b1 = torch.randn(num_experts, 2 * i, device="cuda", generator=gen).to(torch.bfloat16)
            b2 = torch.randn(num_experts, h, device="cuda", generator=gen).to(torch.bfloat16)
            layers.append([w1b, w1s, b1, w2b, w2s, b2])
        tiled = [[tile_rows(t, TILE) if j in (0, 3) else t for j, t in enumerate(w)] for w in layers]
        tiled_k_major = [[t.transpose(1, 2).contiguous().transpose(1, 2) if j in (1, 4) else t
                          for j, t in enumerate(w)] for w in tiled]
        bytes_per_expert = sum(t[0].numel() for j, t in enumerate(layers[0]) if j in (0, 1, 3, 4)) \
            + 2 * (2 * i + h)
        name = "20b" if num_experts == 32 else "120b" if num_experts == 128 else str(num_experts)
        for num_tokens in token_counts:
            x = torch.randn(num_tokens, h, device="cuda", generator=gen).to(torch.bfloat16)
            weights, ids = route_ref(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), k)
            num_active = torch.unique(ids).numel()
            nbytes = num_active * bytes_per_expert + x.numel() * 2 * 2
            old_cfg = _tile_config(num_tokens, num_tokens * k, num_experts)
            new_cfg = _splitk_config(num_tokens, x.device) if num_tokens <= 8 else \
                dict(old_cfg, target_programs=8 * sms)
            variants = [("grouped (old)", old_cfg, layers, 1), ("grouped, tiled rows", old_cfg, tiled, TILE),
                        ("split-K (new)", new_cfg, layers, 1), ("split-K, tiled rows", new_cfg, tiled, TILE)]
            if sweep and num_tokens == 1:
                variants.append(("split-K, tiled, BLOCK_N 32", dict(new_cfg, BLOCK_N=32), tiled, TILE))
                variants.append(("split-K, tiled, 4 programs/SM", dict(new_cfg, target_programs=4 * sms), tiled, TILE))
                variants.append(("split-K, tiled, tensor cores", dict(new_cfg, BLOCK_M=16, num_stages=3), tiled, TILE))
                variants.append(("split-K, tiled, K-major scales", new_cfg, tiled_k_major, TILE))
            if sweep and num_tokens == 8:
                variants.append(("split-K, tiled, 2 splits", dict(new_cfg, splits=2), tiled, TILE))
                variants.append(("split-K, tiled, K-major scales", new_cfg, tiled_k_major, TILE))
            ref = moe_experts(x, weights, ids, *layers[0], 1.702, 7.0, split_nibbles=True, config=old_cfg)
            for label, cfg, ws, tile_n in variants:
                try:
                    out = moe_experts(x, weights, ids, *ws[0], 1.702, 7.0, split_nibbles=True, config=cfg,
                                      tile_n=tile_n)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    ms = _bench(lambda: [moe_experts(x, weights, ids, *w, 1.702, 7.0, split_nibbles=True, config=cfg,
                                                     tile_n=tile_n) for w in ws]) / NUM_COPIES
                except Exception as e:  # a variant that fails to compile must not cost the rest of the run
                    print(f"{name} {num_tokens} tok {label}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append(dict(model=name, tokens=num_tokens, active=num_active, variant=label, ms=ms,
                                 gbs=nbytes / ms / 1e6, err=err))
                print(f"{name} {num_tokens:>3} tok {num_active:>3} exp | {label:<30} | {ms * 1e3:8.1f} us | "
                      f"{100 * nbytes / ms / 1e6 / ceil['copy_gbs']:4.0f}% HBM | err vs old {err:.1e}", flush=True)
        del layers, tiled, tiled_k_major
        torch.cuda.empty_cache()
    return rows


def format_paths_table(ceil: dict, rows: list[dict]) -> str:
    labels = ["grouped (old)", "grouped, tiled rows", "split-K (new)", "split-K, tiled rows"]
    header = " | ".join(f"{label} µs" for label in labels)
    lines = ["| model | tokens | experts hit | " + header + " | best vs old | best % HBM |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in labels) + " | ---: | ---: |"]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["model"], r["tokens"]), {})[r["variant"]] = r
    for (model, tokens), v in by_key.items():
        old = v.get("grouped (old)")
        if not old:
            continue
        best = min(v.values(), key=lambda r: r["ms"])
        cells = [f"{v[l]['ms'] * 1e3:.1f}" if l in v else "—" for l in labels]
        hbm_percent = 100 * best["gbs"] / ceil["copy_gbs"]
        lines.append(f"| {model} | {tokens} | {old['active']} | " + " | ".join(cells) +
                     f" | {old['ms'] / best['ms']:.2f}x ({best['variant']}) | {hbm_percent:.0f}% |")
    return "\n".join(lines)


@triton.jit
def _read_floor_kernel(src_ptr, out_ptr, num_words, WORDS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    """Reads WORDS_PER_PROGRAM int32 words (16 bytes a thread per load) and keeps one value so that nothing is
    optimised away: what a kernel that only streams the weights' bytes achieves."""
    start = tl.program_id(0) * WORDS_PER_PROGRAM
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for w in range(start, start + WORDS_PER_PROGRAM, BLOCK):
        offs = w + tl.arange(0, BLOCK)
        acc ^= tl.load(src_ptr + offs, mask=offs < num_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _read_floor_ms(copies: list[torch.Tensor], launches: int | None = None) -> dict[str, float]:
    """Milliseconds a launch of a kernel that only reads one of `copies` (contiguous tensors of whole int32 words;
    `launches` launches, default one a copy, taking the copies in turn, replayed in a CUDA graph as the ops are), by
    "programs x bytes a program loads at once" (132 to 2112 programs; 2 KB, and 8 KB: more bytes in flight, where a
    grid of 2 KB loads waits on latency)."""
    words = [c.view(-1).view(torch.int32) for c in copies]
    launches = launches or len(words)
    sink = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    floors = {}
    for block in (512, 2048):
        for programs in (132, 528, 1056, 2112):
            per_program = triton.cdiv(triton.cdiv(words[0].numel(), programs), block) * block
            grid = (triton.cdiv(words[0].numel(), per_program),)
            key = f"{grid[0]}x{block * 4 // 1024}K"
            if key not in floors:
                floors[key] = _bench_layers(lambda w: _read_floor_kernel[grid](
                    w, sink, w.numel(), WORDS_PER_PROGRAM=per_program, BLOCK=block), words, launches)
    return floors


def _launch_sequence(prof, layers: int) -> list[tuple[str, float]]:
    """One layer's kernels in launch order with each one's median GPU time (µs) over the profiled layers (the
    profiler's events of the replays, `layers` copies of the same sequence); [] where the events do not split
    evenly."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    if not kernels or len(kernels) % layers:
        return []
    per_layer = len(kernels) // layers
    out = []
    for j in range(per_layer):
        times = sorted(kernels[i * per_layer + j].time_range.elapsed_us() for i in range(layers))
        out.append((kernels[j].name[:40], times[len(times) // 2]))
    return out


@contextlib.contextmanager
def pdl_off():
    """Kernels launched inside run without programmatic dependent launch (triton_utils.PDL)."""
    from gptoss_serve.kernels import triton_utils

    held, triton_utils.PDL = triton_utils.PDL, False
    try:
        yield
    finally:
        triton_utils.PDL = held


def profile_graph_without_pdl(run, replays: int = 20):
    """The torch profiler over `replays` replays of a CUDA graph of run() captured without PDL, so that no kernel's
    GPU time includes its wait for the kernel before (run() once first: it compiles outside the capture)."""
    from torch.profiler import ProfilerActivity, profile

    with pdl_off():
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return prof


def bench_moe_launches(ceil: dict, token_counts: list[int], expert_counts: list[int],
                       num_layers: int = MOE_LAYERS) -> list[dict]:
    """Where one MoE layer's time goes: the whole layer as the model runs it (norm and routing, grouping,
    both expert matmuls, epilogue and combine kernels) captured in a CUDA graph over 4 layers' weights, then
    the torch profiler's GPU time per kernel over replays of that graph captured without programmatic dependent
    launch (with it a kernel's time would include its wait for the kernel before). Beside it, the read floor: a
    kernel that only reads the active experts' bytes, over as many programs as the two matmuls run together."""
    from gptoss_serve.kernels.moe_matmul import moe_experts
    from gptoss_serve.kernels.moe_router import norm_and_route

    h, i, k = GPT_OSS["hidden"], GPT_OSS["intermediate"], GPT_OSS["top_k"]
    rows = []
    for num_experts in expert_counts:
        gen = torch.Generator(device="cuda").manual_seed(num_experts + 1)
        layers = []
        for _ in range(NUM_COPIES):
            w = []
            for r, c in ((2 * i, h), (h, i)):
                blocks = torch.randint(0, 256, (num_experts, r, c // 32, 16), dtype=torch.uint8, device="cuda",
                                       generator=gen)
                w += [serving_blocks(blocks),
                      torch.randint(116, 124, (num_experts, r, c // 32), dtype=torch.uint8, device="cuda",
                                    generator=gen),
                      torch.randn(num_experts, r, device="cuda", generator=gen).to(torch.bfloat16)]
            gate = torch.nn.Linear(h, num_experts, dtype=torch.bfloat16, device="cuda")
            layers.append((gate, w))
        name = "20b" if num_experts == 32 else "120b" if num_experts == 128 else str(num_experts)
        bytes_per_expert = sum(t[0].numel() * t.element_size() for t in layers[0][1])
        for num_tokens in token_counts:
            attn_out = torch.randn(num_tokens, h, device="cuda", generator=gen).to(torch.bfloat16)
            residual = torch.randn(num_tokens, h, device="cuda", generator=gen).to(torch.bfloat16)
            norm_scale = torch.rand(h, device="cuda", generator=gen) + 0.5

            def layer(gate, w):
                x, _, weights, ids = norm_and_route(attn_out, residual, norm_scale, 1e-5, gate.weight, gate.bias, k)
                return moe_experts(x, weights, ids, w[0], w[1], w[2], w[3], w[4], w[5], 1.702, 7.0,
                                   **serving_layout_args())

            ids = norm_and_route(attn_out, residual, norm_scale, 1e-5, layers[0][0].weight, layers[0][0].bias, k)[3]
            num_active = torch.unique(ids).numel()
            ms = _bench_layers(lambda gate_w: layer(*gate_w), layers, num_layers)  # as served (PDL where it applies)
            replays = 20
            prof = profile_graph_without_pdl(lambda: [layer(gl, w) for gl, w in layers], replays)
            per_kernel = {}
            sequence = _launch_sequence(prof, replays * NUM_COPIES)
            for e in prof.key_averages():
                if e.self_device_time_total > 0:
                    per_kernel[e.key[:70]] = (e.self_device_time_total / replays / NUM_COPIES,
                                              e.count / replays / NUM_COPIES)
            # Read floor: the same bytes (active experts' w1 and w2 blocks, scales, biases) in one pass.
            nbytes = num_active * bytes_per_expert
            words = torch.randint(0, 2 ** 30, (NUM_COPIES, nbytes // 4), dtype=torch.int32, device="cuda",
                                  generator=gen)
            floors = _read_floor_ms(list(words), num_layers)
            del words
            best_floor = min(floors.values())
            row = dict(model=name, tokens=num_tokens, active=num_active, ms=ms, gbs=nbytes / ms / 1e6,
                       floor_ms=best_floor, floor_gbs=nbytes / best_floor / 1e6,
                       floors_us={p: round(t * 1e3, 1) for p, t in floors.items()},
                       kernels_us={n: (round(t, 1), c) for n, (t, c) in
                                   sorted(per_kernel.items(), key=lambda kv: -kv[1][0])},
                       launches_us=sequence)
            rows.append(row)
            print(f"\nMoE {name}, {num_tokens} tokens, {num_active}/{num_experts} experts, {nbytes / 1e6:.1f} MB: "
                  f"layer {ms * 1e3:.1f} us ({100 * row['gbs'] / ceil['copy_gbs']:.0f}% HBM); read floor "
                  f"{best_floor * 1e3:.1f} us ({100 * row['floor_gbs'] / ceil['copy_gbs']:.0f}% HBM; by programs "
                  f"{row['floors_us']})", flush=True)
            print("| kernel | µs per layer | launches per layer |\n| --- | ---: | ---: |")
            for n, (t, c) in row["kernels_us"].items():
                print(f"| {n} | {t} | {c:g} |", flush=True)
            if sequence:
                print("launches in order (µs, median over replays): "
                      + ", ".join(f"{n} {t:.1f}" for n, t in sequence), flush=True)
        del layers
        torch.cuda.empty_cache()
    return rows


def bench_grouping(token_counts: list[int], expert_counts: list[int]) -> list[dict]:
    """moe_routing.group_by_expert in one program against the three-launch form (a program a chunk of pairs),
    128-pair row blocks with 16-pair tails (the prefill policy), µs in a CUDA graph; random top-4 routing."""
    from gptoss_serve.kernels.moe_ref import route_ref
    from gptoss_serve.kernels.moe_routing import group_by_expert

    rows = []
    print("| experts | tokens | one program (µs) | a program a chunk (µs) |\n| ---: | ---: | ---: | ---: |")
    for num_experts in expert_counts:
        for num_tokens in token_counts:
            gen = torch.Generator(device="cuda").manual_seed(num_tokens)
            ids = route_ref(torch.randn(num_tokens, num_experts, device="cuda", generator=gen), 4)[1]
            times = [_bench(lambda: group_by_expert(ids, 0, num_experts, 128, tail=(16, 16), parallel=parallel))
                     for parallel in (False, True)]
            rows.append(dict(experts=num_experts, tokens=num_tokens, one_program_us=times[0] * 1e3,
                             chunked_us=times[1] * 1e3))
            print(f"| {num_experts} | {num_tokens} | {times[0] * 1e3:.1f} | {times[1] * 1e3:.1f} |", flush=True)
    return rows


# Attention -------------------------------------------------------------------------------------------------------
def _kv_setup(num_seqs: int, context: int, block_size: int, gen: torch.Generator, head_major: bool | None = None,
              copies: int = NUM_COPIES):
    """`copies` caches of num_seqs sequences of `context` keys, and their block tables [num_seqs, blocks a seq]
    (blocks shuffled); head_major None: KV_HEAD_MAJOR (--kv-layout)."""
    hkv, d = GPT_OSS["num_kv_heads"], GPT_OSS["head_dim"]
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = num_seqs * blocks_per_seq
    # A copy's K and V caches in one tensor [2, blocks, block size, KV heads, head_dim], which unpacks into the two
    # (k, v = caches[c]), so that the read floor reads a copy in one launch. head_major (as KVCache stores them):
    # stored [2, blocks, KV heads, block size, head_dim] and seen through the same shape by strides.
    head_major = KV_HEAD_MAJOR if head_major is None else head_major
    stored = (2, num_blocks, hkv, block_size, d) if head_major else (2, num_blocks, block_size, hkv, d)
    caches = [torch.empty(stored, dtype=torch.bfloat16, device="cuda").normal_() for _ in range(copies)]
    if head_major:
        caches = [c.transpose(2, 3) for c in caches]
    tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, blocks_per_seq).to(torch.int32).cuda()
    return caches, tables


def _decode_inputs(num_seqs: int, context: int, gen: torch.Generator):
    """One decode step's q [num_seqs, q heads, head_dim] bf16, context lengths [num_seqs] (all `context`), sinks
    [q heads], and the bytes the step moves: every K and V row once, q in and out."""
    hq, hkv, d = GPT_OSS["num_q_heads"], GPT_OSS["num_kv_heads"], GPT_OSS["head_dim"]
    q = torch.randn(num_seqs, hq, d, generator=gen).to(torch.bfloat16).cuda()
    lens = torch.full((num_seqs,), context, dtype=torch.int32, device="cuda")
    sinks = torch.randn(hq, generator=gen).cuda()
    return q, lens, sinks, num_seqs * context * hkv * d * 2 * 2 + 2 * q.numel() * 2


def cold_copies(nbytes: int, layers: int) -> int:
    """Distinct copies of a layer's `nbytes` that keep every read of `layers` layers in one graph cold (at least
    NUM_COPIES, and 256 MB, five L2s, between two reads of one copy)."""
    return min(layers, max(NUM_COPIES, 1 + math.ceil(256e6 / nbytes)))


def bench_decode(ceil: dict, batches: list[int], contexts: list[int], torch_max_tokens: int,
                 num_layers: int = DECODE_LAYERS) -> list[dict]:
    """Decode attention rows: `num_layers` launches a timed graph (DECODE_LAYERS, or NUM_COPIES as the other rows
    and the decode rows before 2026-12-07), over cold_copies caches; the read floor likewise."""
    from gptoss_serve.kernels.attention_decode import paged_attention_decode
    from gptoss_serve.kernels.attention_ref import paged_attention_ref

    hq, d = GPT_OSS["num_q_heads"], GPT_OSS["head_dim"]
    rows = []
    for num_seqs in batches:
        for context in contexts:
            gen = torch.Generator().manual_seed(num_seqs * context)
            q, lens, sinks, nbytes = _decode_inputs(num_seqs, context, gen)
            copies = cold_copies(nbytes, num_layers)
            caches, tables = _kv_setup(num_seqs, context, 16, gen, copies=copies)
            ms = _bench_layers(lambda kv: paged_attention_decode(q, *kv, tables, lens, sinks, 0.125), caches,
                               num_layers)
            row = dict(op="decode attn", shape=f"batch {num_seqs}, ctx {context}", ms=ms, gbs=nbytes / ms / 1e6,
                       tflops=4 * num_seqs * hq * d * context / ms / 1e9, layers=num_layers)
            # The read floor: one kernel that only reads the caches' bytes (every context is whole blocks here);
            # up to 4 GB a copy (the floor kernel's word offsets are int32), which leaves out batch 128 x 32k only.
            if caches[0].numel() * caches[0].element_size() <= 2 ** 32:
                floors = _read_floor_ms([c.transpose(2, 3) for c in caches], num_layers)  # as stored: contiguous
                row.update(floor_ms=min(floors.values()), floors_us={p: round(t * 1e3, 1) for p, t in floors.items()})
                print(f"decode attn batch {num_seqs}, ctx {context}: {nbytes / 1e6:.1f} MB, {ms * 1e3:.1f} us; read "
                      f"floor {row['floor_ms'] * 1e3:.1f} us ({nbytes / row['floor_ms'] / 1e6 / ceil['copy_gbs']:.0%} "
                      f"HBM; by programs {row['floors_us']}): the kernels at {row['floor_ms'] / ms:.0%} of the floor",
                      flush=True)
            if num_seqs * context <= torch_max_tokens:
                cu = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
                kc, vc = caches[0]
                row["torch_ms"] = _bench(lambda: paged_attention_ref(q, kc, vc, tables, cu, lens, sinks, 0.125),
                                         graph=False)
                row["torch_path"] = "paged_attention_ref"
            rows.append(row)
            del caches
            torch.cuda.empty_cache()
    return rows


def prefill_inputs(length: int, window: int):
    """One sequence's prefill of `length` tokens on NUM_COPIES caches (seeded by length and window): caches, block
    tables, q [length, q heads, head_dim] bf16, cu_seqlens, context lengths, sinks, and the attention's FLOPs."""
    hq, d = GPT_OSS["num_q_heads"], GPT_OSS["head_dim"]
    gen = torch.Generator().manual_seed(length + window)
    caches, tables = _kv_setup(1, length, 16, gen)
    q = torch.randn(length, hq, d, generator=gen).to(torch.bfloat16).cuda()
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    lens = torch.tensor([length], dtype=torch.int32, device="cuda")
    sinks = torch.randn(hq, generator=gen).cuda()
    keys_per_query = (length + 1) / 2 if window == 0 else min(window, (length + 1) / 2)
    return caches, tables, q, cu, lens, sinks, 4 * length * keys_per_query * hq * d


def sdpa_ms(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> float:
    """torch's causal SDPA (FlashAttention) on q [tokens, q heads, head_dim] and as many of the caches' rows, made
    contiguous (no pages, no sinks): the prefill rows' reference at lengths the torch twin cannot hold."""
    import torch.nn.functional as F

    length, d = q.shape[0], q.shape[2]
    qt = q.transpose(0, 1).unsqueeze(0)  # [1, q heads, tokens, head_dim]
    kt, vt = (c.reshape(-1, c.shape[2], d)[:length].transpose(0, 1).unsqueeze(0) for c in (k_cache, v_cache))
    return _bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True), graph=False)


def bench_prefill(ceil: dict, lengths: list[int], torch_max_tokens: int) -> list[dict]:
    from gptoss_serve.kernels.attention_prefill import paged_attention_prefill
    from gptoss_serve.kernels.attention_ref import paged_attention_ref

    rows = []
    for length in lengths:
        for window in (0, 128):
            caches, tables, q, cu, lens, sinks, flops = prefill_inputs(length, window)
            ms = _bench(lambda: [paged_attention_prefill(q, kc, vc, tables, cu, lens, sinks, 0.125, window)
                                 for kc, vc in caches]) / NUM_COPIES
            row = dict(op="prefill attn", shape=f"{length} tok, window {window or 'full'}", ms=ms,
                       tflops=flops / ms / 1e9)
            kc, vc = caches[0]
            if length <= torch_max_tokens:
                row["torch_ms"] = _bench(
                    lambda: paged_attention_ref(q, kc, vc, tables, cu, lens, sinks, 0.125, window), graph=False)
                row["torch_path"] = "paged_attention_ref"
            elif window == 0:
                row["torch_ms"] = sdpa_ms(q, kc, vc)
                row["torch_path"] = "SDPA, contiguous KV, no sinks"
            rows.append(row)
            del caches
            torch.cuda.empty_cache()
    return rows


def bench_norm_rope(ceil: dict) -> list[dict]:
    from gptoss_serve.kernels.rmsnorm import rmsnorm
    from gptoss_serve.kernels.rmsnorm_ref import rmsnorm_ref

    rows = []
    for num_tokens in (64, 8192):
        xs = [torch.randn(num_tokens, GPT_OSS["hidden"], device="cuda").to(torch.bfloat16) for _ in range(2)]
        scale = torch.rand(GPT_OSS["hidden"], device="cuda") + 0.5
        ms = _bench(lambda: rmsnorm(xs[0], scale, 1e-5, xs[1]))
        rows.append(dict(op="rmsnorm+residual", shape=f"{num_tokens} tok", ms=ms,
                         gbs=4 * xs[0].numel() * 2 / ms / 1e6,
                         torch_ms=_bench(lambda: rmsnorm_ref(xs[0], scale, 1e-5, xs[1])), torch_path="rmsnorm_ref"))
    return rows


def bench_router(ceil: dict, token_counts: list[int], expert_counts: list[int]) -> list[dict]:
    """The MoE sub-block's front (residual add, RMSNorm, router logits, top-k) as the model runs it
    (moe_router.norm_and_route), its expert-group sizes, and the composed path it replaces (rmsnorm kernel,
    cuBLAS, top-k kernel) in the torch column; over NUM_COPIES layers' router weights in one graph."""
    from gptoss_serve.kernels.moe_router import EXPERTS_PER_PROGRAM, norm_and_route

    hidden, top_k = GPT_OSS["hidden"], GPT_OSS["top_k"]
    rows = []
    for num_experts in expert_counts:
        gen = torch.Generator(device="cuda").manual_seed(num_experts)
        gates = [((torch.randn(num_experts, hidden, device="cuda", generator=gen) / hidden ** 0.5).to(torch.bfloat16),
                  torch.randn(num_experts, device="cuda", generator=gen).to(torch.bfloat16))
                 for _ in range(NUM_COPIES)]
        scale = torch.rand(hidden, device="cuda", generator=gen) + 0.5
        name = "20b" if num_experts == 32 else "120b" if num_experts == 128 else str(num_experts)
        for num_tokens in token_counts:
            h, residual = (torch.randn(num_tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
                           for _ in range(2))
            nbytes = num_experts * hidden * 2 + 4 * num_tokens * hidden * 2  # router weight, rows in and out

            def run(**options):
                return lambda: [norm_and_route(h, residual, scale, 1e-5, w, b, top_k, **options) for w, b in gates]

            composed_ms = _bench(run(max_fused_tokens=0)) / NUM_COPIES
            groups = [EXPERTS_PER_PROGRAM] + [g for g in (4, 16) if g != EXPERTS_PER_PROGRAM]
            for experts_per_program in groups:
                ms = _bench(run(experts_per_program=experts_per_program)) / NUM_COPIES
                label = "default" if experts_per_program == EXPERTS_PER_PROGRAM else "variant"
                rows.append(dict(op=f"norm + route {name} ({label}, {experts_per_program} experts a program)",
                                 shape=f"{num_tokens} tok, {num_experts} experts", ms=ms, gbs=nbytes / ms / 1e6,
                                 torch_ms=composed_ms, torch_path="rmsnorm + cuBLAS + top-k (composed)"))
    return rows


def bench_attention_front(ceil: dict, token_counts: list[int]) -> list[dict]:
    """The attention sub-block's front (residual add, RMSNorm, qkv projection, RoPE, k and v to the paged cache) at
    the 20b shape: the fused kernel (attention_front.norm_qkv_rope, at every size even where the model would not
    take it), and the composed path (rmsnorm kernel, cuBLAS, rope_and_cache_write kernel) in the torch column;
    over NUM_COPIES layers' qkv weights and caches in one graph. At 1 and 8 tokens, other splits of K than the
    default (fused_tiling's) as variants."""
    from gptoss_serve.kernels.attention_front import FUSED_MAX_TOKENS, ROWS, fused_tiling, norm_qkv_rope

    hidden, hq, hkv, d = (GPT_OSS[key] for key in ("hidden", "num_q_heads", "num_kv_heads", "head_dim"))
    num_rows, block_size = (hq + 2 * hkv) * d, 16
    num_blocks = max(token_counts) // block_size + 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    caches, _ = _kv_setup(1, num_blocks * block_size, block_size, torch.Generator().manual_seed(0))  # (k, v) a copy
    layers = [((torch.randn(num_rows, hidden, device="cuda", generator=gen) / hidden ** 0.5).to(torch.bfloat16),
               (0.1 * torch.randn(num_rows, device="cuda", generator=gen)).to(torch.bfloat16), *kv)
              for kv in caches]  # (qkv weight, qkv bias, k cache, v cache) a layer
    scale = torch.rand(hidden, device="cuda", generator=gen) + 0.5
    inv_freq = 150000.0 ** -(torch.arange(0, d, 2, device="cuda") / d)  # [head_dim // 2]: any angles will do
    rows = []
    for num_tokens in token_counts:
        h, residual = (torch.randn(num_tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
                       for _ in range(2))
        positions = 1000 + torch.arange(num_tokens, device="cuda")
        slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:num_tokens]
        # qkv weight and bias; h and residual in, the new residual and q out, k and v to the cache
        nbytes = num_rows * (hidden + 1) * 2 + 3 * num_tokens * hidden * 2 + num_tokens * num_rows * 2

        def run(max_fused_tokens, num_splits=None):
            return lambda: [norm_qkv_rope(h, residual, scale, 1e-5, w, b, hq, hkv, positions, inv_freq, 1.0, kc, vc,
                                          slots, max_fused_tokens=max_fused_tokens, num_splits=num_splits)
                            for w, b, kc, vc in layers]

        composed_ms = _bench(run(0)) / NUM_COPIES
        default_splits = fused_tiling(num_tokens, hidden, (hq + 2 * hkv) * d // 2 // ROWS)["SPLITS"]
        variants = [n for n in (1, 2, 8) if n != default_splits] if num_tokens in (1, 8) else []
        for num_splits in [default_splits] + variants:
            ms = _bench(run(num_tokens, num_splits)) / NUM_COPIES
            if num_splits != default_splits:
                label = "variant"
            else:
                label = "default" if num_tokens <= FUSED_MAX_TOKENS else "not the default"
            rows.append(dict(op=f"norm + qkv + rope + cache 20b (fused, {label}, {num_splits} splits of K)",
                             shape=f"{num_tokens} tok", ms=ms, gbs=nbytes / ms / 1e6, torch_ms=composed_ms,
                             torch_path="rmsnorm + cuBLAS + rope_and_cache_write (composed)"))
    return rows


def format_table(ceil: dict, rows: list[dict]) -> str:
    """The bench's markdown table: each row's µs, GB/s and its share of the copy measured in the same run (to a
    tenth of a percent: the targets sit at round numbers), TFLOP/s and the torch path's time beside it."""
    lines = [f"HBM copy bandwidth (read + write): {ceil['copy_gbs']:.0f} GB/s; "
             f"bf16 matmul 8192^3: {ceil['bf16_tflops']:.0f} TFLOP/s", "",
             "| op | shape | triton µs | GB/s | % HBM | TFLOP/s | % bf16 peak | torch µs | torch path | speed-up |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        gbs = r.get("gbs")
        tf = r.get("tflops")
        torch_ms = r.get("torch_ms")
        lines.append("| {} | {} | {:.1f} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["op"], r["shape"], r["ms"] * 1e3,
            f"{gbs:.0f}" if gbs else "", f"{100 * gbs / ceil['copy_gbs']:.1f}%" if gbs else "",
            f"{tf:.1f}" if tf else "", f"{100 * tf / ceil['bf16_tflops']:.0f}%" if tf else "",
            f"{torch_ms * 1e3:.1f}" if torch_ms else "—", r.get("torch_path", "—"),
            f"{torch_ms / r['ms']:.1f}x" if torch_ms else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss-serve bench kernels", description=__doc__)
    parser.add_argument("--sections", default="moe,decode,prefill,norm,router,attention-front",
                        help="comma-separated: moe, decode, prefill, norm, router (the fused norm + routing "
                             "against the composed path), attention-front (the fused norm + qkv + RoPE + cache "
                             "write against the composed path), moe-paths (split-K vs grouped MoE), "
                             "moe-launches (one MoE layer's time per kernel, and the read floor), grouping "
                             "(group_by_expert in one program and in a program a chunk)")
    parser.add_argument("--sweep", action="store_true", help="moe-paths: also sweep split-K variants")
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--tokens", help="moe, moe-launches, attention-front: these token counts (comma-separated) "
                                         "instead")
    parser.add_argument("--experts", help="moe, moe-launches: these expert counts (32: 20b, 128: 120b) instead")
    parser.add_argument("--kv-layout", choices=["head", "token"], default="head",
                        help="KV cache blocks of the decode, prefill and attention-front rows: head-major (as the "
                             "engine stores them) or token-major [blocks, block size, KV heads, head_dim]")
    parser.add_argument("--moe-layers", type=int, default=MOE_LAYERS,
                        help="moe, moe-launches: layers a timed graph holds, over 4 layers' weights in turn (default: "
                             "a 20b decode step's; 4: the count before 2026-12-07)")
    parser.add_argument("--decode-layers", type=int, default=DECODE_LAYERS,
                        help="decode: attention launches a timed graph holds (default: a 20b decode step's; 4: the "
                             "other rows' count)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    global KV_HEAD_MAJOR
    KV_HEAD_MAJOR = args.kv_layout == "head"
    if not torch.cuda.is_available():
        print("bench kernels needs a CUDA GPU", file=sys.stderr)
        return 1
    sections = set(args.sections.split(","))
    token_arg = [int(t) for t in args.tokens.split(",")] if args.tokens else None
    expert_arg = [int(e) for e in args.experts.split(",")] if args.experts else None
    ceil = measure_ceilings()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    if "moe" in sections:
        tokens = token_arg or ([1, 64] if args.quick else [1, 8, 64, 512, 4096])
        rows += bench_moe(ceil, tokens, expert_arg or [32, 128], torch_max_tokens=64, num_layers=args.moe_layers)
        print(format_table(ceil, rows), flush=True)
    if "moe-paths" in sections:
        path_rows = bench_moe_paths(ceil, [1, 2, 4, 8, 64], [32, 128], args.sweep)
        print(format_paths_table(ceil, path_rows), flush=True)
        rows += [dict(r, op=f"MoE {r['model']} {r['variant']}", shape=f"{r['tokens']} tok") for r in path_rows]
    if "moe-launches" in sections:
        rows += [dict(r, op=f"MoE {r['model']} layer by launch", shape=f"{r['tokens']} tok")
                 for r in bench_moe_launches(ceil, token_arg or ([1, 8, 64] if args.quick else [1, 2, 8, 64, 256]),
                                             expert_arg or ([32] if args.quick else [32, 128]), args.moe_layers)]
    if "grouping" in sections:
        grouping_rows = bench_grouping(token_arg or [8, 64, 512, 1024, 4096], expert_arg or [32, 128])
    if "decode" in sections:
        rows += bench_decode(ceil, [1, 32] if args.quick else [1, 32, 128], [1024, 8192] if args.quick else
                             [1024, 8192, 32768], torch_max_tokens=32 * 8192, num_layers=args.decode_layers)
    if "prefill" in sections:
        rows += bench_prefill(ceil, [1024] if args.quick else [1024, 8192], torch_max_tokens=1024)
    if "norm" in sections:
        rows += bench_norm_rope(ceil)
    if "router" in sections:
        rows += bench_router(ceil, [1, 64] if args.quick else [1, 8, 64, 256], [32, 128])
    if "attention-front" in sections:
        rows += bench_attention_front(ceil, token_arg or ([1, 64] if args.quick else [1, 8, 16, 64]))
    if sections - {"moe-paths", "moe-launches", "grouping"}:
        print(format_table(ceil, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), ceilings=ceil, rows=rows,
                           **({"grouping": grouping_rows} if "grouping" in sections else {})), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
