"""Compile a Triton kernel for an sm_90 GPU on a machine without one, and count the SASS it gives.

Triton's compiler and the ptxas/cuobjdump it ships need no driver, so instruction counts (what a weight costs in
the decode MoE loop, whether loads vectorize) can be read off before spending device time. Arguments are
specialized as the launcher does: pointers 16-byte aligned, integers equal to 1 made constants, integers
divisible by 16 marked so. Triton here is the PyPI build (3.9), the GPU image has 3.6: counts are indicative.

    python3 tools/kernel_sass.py gemv            # the matrix-vector MoE kernel at the 20b w1 shape
    python3 tools/kernel_sass.py mma             # the tensor-core decode kernel (Gluon) at the 20b w1 shape
    python3 tools/kernel_sass.py mma_fused       # the one-launch decode MoE kernel (Gluon) at 20b, one token
    python3 tools/kernel_sass.py fused           # the two-launch matrix-vector kernels (epilogues inside)
    python3 tools/kernel_sass.py wgmma           # the wgmma grouped kernel (Gluon) at the 20b w1 and w2 shapes
    python3 tools/kernel_sass.py chain           # both of its matmuls in one launch, at the decode tiles
    python3 tools/kernel_sass.py router          # the fused norm + router logits kernel at 20b
    python3 tools/kernel_sass.py front           # the fused norm + qkv + rope + cache write kernel at 20b
    python3 tools/kernel_sass.py attention       # decode attention (gpt-oss heads, 128-key blocks), with PDL and not
                                                 # (the lengths and first pages before its wait too),
                                                 # and the key blocks its loop loads ahead at 2-4 stages
    python3 tools/kernel_sass.py prefill         # prefill attention's configs: registers, spills, blocks loaded ahead
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_offline(kernel, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 1,
                    capability: int = 90, maxnreg: int | None = None):
    """kernel: a @triton.jit or @gluon.jit function; args: name -> a pointer type string ('*bf16', '*u8', ...),
    a scalar type string ('fp32') or an int; constexprs: name -> value; maxnreg: a register cap, as the
    launch's."""
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if value is None:  # an argument passed as None: a constexpr
            signature[name] = "constexpr"
            consts[name] = None
        elif isinstance(value, str):  # a pointer ('*bf16', 16-byte aligned) or a scalar type ('fp32')
            signature[name] = value
            if value.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    if getattr(kernel, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(kernel, signature, constexprs=consts, attrs=attrs)
    else:
        src = ASTSource(kernel, signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))


def _cuobjdump(compiled, flag: str) -> str:
    path = "/tmp/kernel_sass.cubin"
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    return subprocess.run([os.path.join(BIN, "cuobjdump"), flag, path], capture_output=True, text=True,
                          check=True).stdout


def sass(compiled) -> str:
    return _cuobjdump(compiled, "-sass")


def registers(compiled) -> str:
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", _cuobjdump(compiled, "-res-usage"))
    return f"{m.group(1)} registers, {m.group(2)} bytes of stack" if m else "registers unknown"


def opcode_counts(text: str) -> collections.Counter:
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", text)
    return collections.Counter(op + (suffix if op in ("LDG", "STG", "LDS", "STS") else "") for op, suffix in ops)


def loops(text: str) -> list[str]:
    """The SASS of each backward branch's body (a loop), smallest first (cuobjdump names branch targets by
    address)."""
    lines = text.splitlines()
    addr = {}
    for i, line in enumerate(lines):
        m = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if m:
            addr[int(m.group(1), 16)] = i
    bodies = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+0x([0-9a-f]+)", line)
        here = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if target and here and int(target.group(1), 16) < int(here.group(1), 16):
            bodies.append("\n".join(lines[addr[int(target.group(1), 16)]:i + 1]))
    return sorted(bodies, key=len)


def report(name: str, compiled, weights_per_thread_per_iter: int | None = None) -> None:
    text = sass(compiled)
    total = opcode_counts(text)
    print(f"== {name}: {sum(total.values())} SASS instructions, {registers(compiled)}")
    for i, body in enumerate(loops(text)):
        c = opcode_counts(body)
        n = sum(c.values())
        per = f", {n / weights_per_thread_per_iter:.2f} per weight" if weights_per_thread_per_iter else ""
        print(f"  loop {i}: {n} instructions{per}: " + " ".join(f"{k}={v}" for k, v in c.most_common(14)))


def gemv_20b_w1(**overrides):
    from gptoss_serve.kernels.moe_gemv import _moe_gemv_kernel
    n, kblocks, e = 5760, 90, 32
    args = dict(a_ptr="*bf16", w_ptr="*u8", scales_ptr="*u8", ws_ptr="*fp32", expert_ids_ptr="*i32",
                N=n, num_blocks_k=kblocks, a_row_div=4, rows_per_program=64, first_expert=0, num_local_experts=e,
                stride_a=2880, stride_w_expert=n * kblocks * 16, stride_w_row=kblocks * 16,
                stride_s_expert=n * kblocks, stride_s_row=kblocks, stride_s_k=1, stride_ws_split=4 * n)
    const = dict(SPLIT_NIBBLES=True, SWIZZLED=False, FOLD_SCALES=True, TILE_N=64, EMULATE_BF16=False, KB=16, RB=16)
    const.update(overrides)
    return compile_offline(_moe_gemv_kernel, args, const, num_warps=4)


def fused_20b(which: str, rows_per_thread: int = 2, num_warps: int = 4, k_unroll: int = 1, k_stages: int = 1,
              **overrides):
    """The fused matrix-vector kernels of moe_gemv_fused.py: which = 'w1' (with SwiGLU) or 'w2' (with the combine)."""
    from gptoss_serve.kernels.moe_gemv_fused import _gemv_combine_kernel, _gemv_swiglu_kernel, rows_a_program
    n, kblocks = (5760, 90) if which == "w1" else (2880, 90)
    common = dict(w_ptr="*u8", scales_ptr="*u8", bias_ptr="*bf16", expert_ids_ptr="*i32", N=n, num_blocks_k=kblocks,
                  first_expert=0, num_local_experts=32, stride_w_expert=n * kblocks * 16, stride_w_row=kblocks * 16,
                  stride_s_expert=n * kblocks, stride_s_row=kblocks, stride_s_k=1, stride_bias_expert=n)
    const = dict(NUM_SPLITS=6, SPLIT_NIBBLES=True, SWIZZLED=False, FOLD_SCALES=True, TILE_N=64, EMULATE_BF16=False,
                 KB=16, RB=rows_a_program(16, rows_per_thread, num_warps), K_UNROLL=k_unroll, K_STAGES=k_stages)
    if which == "w1":
        args = dict(common, x_ptr="*bf16", act_ptr="*bf16", top_k=4, stride_x=2880, stride_act=2880,
                    swiglu_alpha=3, swiglu_limit=7)
        kernel = _gemv_swiglu_kernel
    else:
        args = dict(common, act_ptr="*bf16", weights_ptr="*fp32", out_ptr="*bf16", stride_act=2880, stride_out=2880)
        const.update(TOP_K=4, HAS_BIAS=True)
        kernel = _gemv_combine_kernel
    const.update(overrides)
    return compile_offline(kernel, args, const, num_warps=num_warps)


def wgmma_20b_w1(block_t=64, m_reps=1, num_warps=4, swiglu=True, stages=8, **overrides):
    from gptoss_serve.kernels.moe_wgmma import _moe_wgmma_kernel, b_smem_layout, word_layout
    n, kblocks = 5760, 90
    args = dict(a_ptr="*fp16", w_ptr="*u8", scales_ptr="*u8", bias_ptr="*bf16", out_ptr="*fp16" if swiglu else "*bf16",
                sorted_pairs_ptr="*i32", block_expert_ptr="*i32", block_row_start_ptr="*i32",
                block_row_end_ptr="*i32", N=n, top_k=4,
                num_n_tiles=n // (16 * num_warps * m_reps), stride_a=2880, stride_w_expert=n * kblocks * 16,
                stride_w_row=kblocks * 16, stride_s_expert=n * kblocks, stride_s_row=kblocks, stride_bias_expert=n,
                stride_out=2880, swiglu_alpha=3, swiglu_limit=7)
    const = dict(SWIGLU=swiglu, HAS_BIAS=True, GATHER_TOKENS=swiglu, TILE_N=64, NUM_KB=kblocks,
                 WORD_LAYOUT=word_layout(num_warps, m_reps), B_SMEM=b_smem_layout(block_t), BLOCK_T=block_t,
                 M_REPS=m_reps, NUM_WARPS=num_warps, STAGES=stages, PIPELINED=True, KB_PER_STEP=3,
                 EVEN_N=n % (16 * num_warps * m_reps) == 0, SCALE_AFTER=False, VECTOR_STORE=True, PDL=False,
                 EARLY_WEIGHTS=False)
    const.update(overrides)
    if const["PIPELINED"]:  # whole rings, copies ahead by all slots but the step's own, as moe_wgmma computes them
        const["STAGES"] -= const["STAGES"] % const["KB_PER_STEP"]
        const.setdefault("COPY_AHEAD", const["STAGES"] - const["KB_PER_STEP"])
    else:
        const.update(STAGES=1, COPY_AHEAD=1)
    return compile_offline(_moe_wgmma_kernel, args, const, num_warps=num_warps)


def wgmma_chain_20b(block_t: int, stages: int, per_step: int, scale_after: bool, early: bool = True):
    """Both matmuls of the 20b experts in one launch (the chained wgmma kernel), 64-row programs, PDL on."""
    from gptoss_serve.kernels.moe_wgmma import _moe_wgmma_chain_kernel, b_smem_layout, word_layout
    n1, n2, kblocks = 5760, 2880, 90
    args = dict(x_ptr="*fp16", act_ptr="*fp16", y_ptr="*bf16", w1_ptr="*u8", s1_ptr="*u8", b1_ptr="*bf16",
                w2_ptr="*u8", s2_ptr="*u8", b2_ptr="*bf16", sorted_pairs_ptr="*i32", block_expert_ptr="*i32",
                block_row_start_ptr="*i32", block_row_end_ptr="*i32", ready_ptr="*i32", N1=n1, N2=n2, top_k=4,
                num_n_tiles1=n1 // 64, num_n_tiles2=n2 // 64, num_w1_programs="i32", stride_x=2880,
                stride_w1_expert=n1 * kblocks * 16, stride_w1_row=kblocks * 16, stride_s1_expert=n1 * kblocks,
                stride_s1_row=kblocks, stride_b1_expert=n1, stride_act=2880, stride_w2_expert=n2 * kblocks * 16,
                stride_w2_row=kblocks * 16, stride_s2_expert=n2 * kblocks, stride_s2_row=kblocks,
                stride_b2_expert=n2, stride_y=2880, swiglu_alpha=3, swiglu_limit=7)
    stages -= stages % per_step
    const = dict(HAS_B1=True, HAS_B2=True, TILE_N=64, NUM_KB1=kblocks, NUM_KB2=kblocks,
                 WORD_LAYOUT=word_layout(4, 1), B_SMEM=b_smem_layout(block_t), BLOCK_T=block_t, M_REPS=1,
                 NUM_WARPS=4, STAGES=stages, COPY_AHEAD=stages - per_step, KB_PER_STEP=per_step, EVEN_N1=True,
                 EVEN_N2=True, SCALE_AFTER=scale_after, VECTOR_STORE=True, PDL=True, EARLY_WEIGHTS=early)
    return compile_offline(_moe_wgmma_chain_kernel, args, const, num_warps=4)


def grouped_20b_w1(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3, **overrides):
    from gptoss_serve.kernels.moe_matmul import _moe_matmul_kernel
    n, kblocks = 5760, 90
    args = dict(a_ptr="*bf16", w_ptr="*u8", scales_ptr="*u8", bias_ptr="*bf16", out_ptr="*bf16",
                sorted_pairs_ptr="*i32", block_expert_ptr="*i32", block_row_start_ptr="*i32",
                block_row_end_ptr="*i32", N=n, K=2880, top_k=4, num_n_tiles=n // block_n,
                stride_a=2880, stride_w_expert=n * kblocks * 16, stride_w_row=kblocks * 16,
                stride_s_expert=n * kblocks, stride_s_row=kblocks, stride_bias_expert=n, stride_out=2880,
                swiglu_alpha=3, swiglu_limit=7)
    const = dict(SWIGLU=True, HAS_BIAS=True, GATHER_TOKENS=True, SPLIT_NIBBLES=True, SWIZZLED=False,
                 FOLD_SCALES=False, TILE_N=64, EMULATE_BF16=False, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
                 JOIN_K=False)
    const.update(overrides)
    return compile_offline(_moe_matmul_kernel, args, const, num_warps=num_warps, num_stages=num_stages)


def mma_20b_w1(num_warps=4, m_tiles=1, block_t=8, pair_blocks=True, stage_once=False, prefetch=False,
               **overrides):
    from gptoss_serve.kernels.moe_mma import _moe_mma_kernel, byte_layout
    n, kblocks = 5760, 90
    args = dict(a_ptr="*bf16", w_ptr="*u8", scales_ptr="*u8", ws_ptr="*fp32", sorted_pairs_ptr="*i32",
                block_expert_ptr="*i32", block_row_start_ptr="*i32", block_row_end_ptr="*i32",
                N=n, a_row_div=4, rows_per_program=64 * m_tiles, first_expert=0, num_local_experts=32,
                stride_a=2880, stride_w_expert=n * kblocks * 16, stride_w_row=kblocks * 16,
                stride_s_expert=n * kblocks, stride_s_row=kblocks, stride_s_k=1, stride_ws_split=4 * n)
    const = dict(BYTE_LAYOUT=byte_layout(num_warps, m_tiles), PAIR_BLOCKS=pair_blocks, TILE_N=64, EVEN_ROWS=True,
                 KB=15, KB_P2=16, STAGE_ONCE=stage_once, PREFETCH=prefetch, BLOCK_T=block_t, M_TILES=m_tiles,
                 NUM_WARPS=num_warps, PDL=False, ASYNC_GROUPS=0, EARLY_WEIGHTS=False)
    const.update(overrides)
    return compile_offline(_moe_mma_kernel, args, const, num_warps=num_warps)


def mma_fused_20b(q=16, slots=6, num_warps=8, pdl=True, tma=False):
    """The one-launch decode MoE kernel (moe_mma_fused) at the 20b shapes, one token; tma: its bulk-copy variant."""
    from triton.experimental.gluon import language as gl
    from gptoss_serve.kernels.moe_mma_fused import _moe_fused_kernel, launch_constants
    h, n1, kblocks, e = 2880, 5760, 90, 32
    descs = [f"tensordesc<u8[{shape}],{gl.NVMMASharedLayout(0, 8, rank)!r}>"
             for shape, rank in ((f"1, {4 * q}, 256", 3), (f"1, {q}, 1, 4, 256", 5))] if tma else [None, None]
    args = dict(x_ptr="*bf16", ids_ptr="*i32", weights_ptr="*fp32", w1_ptr="*u8", s1_ptr="*u8", b1_ptr="*bf16",
                w2_ptr="*u8", s2_ptr="*u8", b2_ptr="*bf16", acc_ptr="*fp32", count_ptr="*i32", out_ptr="*bf16",
                w1_desc=descs[0], w2_desc=descs[1],
                num_units=360, first_expert=0, num_local_experts=e, swiglu_alpha="fp32", swiglu_limit="fp32",
                stride_w1_expert=n1 * kblocks * 16, stride_w1_row=kblocks * 16, stride_s1_expert=n1 * kblocks,
                stride_s1_row=kblocks, stride_s1_k=1, stride_b1_expert=n1, stride_w2_expert=h * kblocks * 16,
                stride_w2_row=kblocks * 16, stride_s2_expert=h * kblocks, stride_s2_row=kblocks, stride_s2_k=1,
                stride_b2_expert=h)
    const = dict(launch_constants(h, kblocks, q, slots, num_warps, 3, 64, True, tma), PDL=pdl)
    return compile_offline(_moe_fused_kernel, args, const, num_warps=num_warps)


def router(num_experts: int, experts_per_program: int = 8):
    from gptoss_serve.kernels.moe_router import _norm_logits_kernel

    args = {name: "*bf16" for name in ("h_ptr", "residual_ptr", "gate_w_ptr", "gate_b_ptr", "normed_ptr",
                                        "residual_out_ptr", "logits_ptr")}
    args.update(norm_scale_ptr="*fp32", num_experts=num_experts, stride_h=2880, stride_residual=2880,
                stride_normed=2880, stride_residual_out=2880, stride_gate=2880, stride_logits=num_experts,
                eps="fp32")
    const = dict(HIDDEN=2880, BLOCK_HIDDEN=4096, EXPERTS_PER_PROGRAM=experts_per_program, EMULATE_BF16=False,
                 PDL=False)
    return compile_offline(_norm_logits_kernel, args, const, num_warps=8)


def attention_front(num_tokens: int, num_splits: int | None = None, has_residual: bool = True):
    """The fused front at 20b's shape, tiled and register-capped as norm_qkv_rope launches it for num_tokens."""
    from gptoss_serve.kernels.attention_front import ROWS, _norm_qkv_rope_kernel, fused_tiling, max_registers

    args = {name: "*bf16" for name in ("h_ptr", "residual_ptr", "w_ptr", "b_ptr", "q_out_ptr", "residual_out_ptr",
                                        "k_cache_ptr", "v_cache_ptr")}
    args.update(norm_scale_ptr="*fp32", positions_ptr="*i64", inv_freq_ptr="*fp32", slots_ptr="*i64",
                partials_ptr="*fp32", arrivals_ptr="*i32", num_tokens="i32", num_q_heads=64, num_kv_heads=8,
                stride_h=2880, stride_residual=2880, stride_residual_out=2880, stride_w=2880,
                stride_cache_block=16 * 8 * 64, stride_cache_slot=8 * 64, stride_cache_head=64, block_size=16,
                eps="fp32", concentration="fp32")
    tiling = fused_tiling(num_tokens, 2880, 80 * 64 // 2 // ROWS, num_splits)
    const = dict(HIDDEN=2880, HEAD_DIM=64, ROWS=ROWS, HAS_RESIDUAL=has_residual, EMULATE_BF16=False, **tiling)
    return tiling, compile_offline(_norm_qkv_rope_kernel, args, const, num_warps=4, maxnreg=max_registers(tiling))


def _paged_attention_args(**extra) -> dict:
    """The arguments both attention kernels share, at gpt-oss's heads (64 query, 8 KV, head_dim 64) over a 16-slot
    paged cache stored head-major, as KVCache stores it; extra: each kernel's own."""
    args = {name: "*bf16" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
    args.update(block_tables_ptr="*i32", context_lens_ptr="*i32", sinks_ptr="*fp32", scale_log2="fp32",
                sliding_window="i32", block_size=16, head_dim=64, stride_q_token=64 * 64, stride_q_head=64,
                stride_cache_block=8 * 16 * 64, stride_cache_slot=64, stride_cache_head=16 * 64,
                stride_tables="i32", stride_out_token=64 * 64, stride_out_head=64, **extra)
    return args


def attention_decode(block_n: int = 128, pdl: bool = True, fused_merge: bool = False, num_stages: int = 2,
                     early_meta: bool = False):
    """Decode attention, 2 slices (merged by the last one's program with fused_merge; the lengths and first pages
    loaded before the PDL wait with early_meta)."""
    from gptoss_serve.kernels.attention_decode import _decode_kernel

    args = _paged_attention_args(part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32",
                                 arrivals_ptr="*i32", partition_tokens=512, num_q_heads=64)
    const = dict(QUERIES_PER_KV=8, BLOCK_G=16, BLOCK_D=64, BLOCK_N=block_n, NUM_SPLITS=2, SPLITS_P2=2,
                 FUSED_MERGE=fused_merge, EARLY_META=early_meta, EMULATE_BF16=False, PDL=pdl)
    return compile_offline(_decode_kernel, args, const, num_warps=4, num_stages=num_stages)


def attention_prefill(num_stages: int = 2, num_warps: int = 4, block_rows: int = 128, block_n: int = 64):
    """Prefill attention, one config (rows = query tokens x the 8 heads of a KV head)."""
    from gptoss_serve.kernels.attention_prefill import _prefill_kernel

    args = _paged_attention_args(cu_seqlens_ptr="*i32", num_seqs="i32")
    const = dict(QUERIES_PER_KV=8, BLOCK_G=8, BLOCK_Q=block_rows // 8, BLOCK_D=64, BLOCK_N=block_n, BLOCK_SEQS=64,
                 EMULATE_BF16=False)
    return compile_offline(_prefill_kernel, args, const, num_warps=num_warps, num_stages=num_stages)


def copies_in_flight(compiled) -> str:
    """The longest loop's cp.async wait (DEPBAR.LE SB0, n: n commit groups may stay in flight) and the shared memory
    a program takes: how many key blocks ahead an attention kernel loads."""
    waits = re.findall(r"DEPBAR\.LE SB0, (0x[0-9a-f]+)", loops(sass(compiled))[-1])
    return f"loop waits until <= {', '.join(str(int(w, 16)) for w in waits)} groups in flight; " \
           f"{compiled.metadata.shared} bytes of shared memory"


def first_lines(text: str, opcodes: tuple[str, ...]) -> str:
    """Where each of opcodes first appears in the SASS (instruction index), to read what precedes the PDL wait."""
    index = {}
    for i, line in enumerate(l for l in text.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", l)):
        for op in opcodes:
            if op in line and op not in index:
                index[op] = i
    return ", ".join(f"{op} at {index.get(op, '-')}" for op in opcodes)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "gemv"
    if which == "gemv":
        # RB 16 rows x KB 16 blocks over 128 threads: 2 rows x 32 weights = 64 weights a thread an iteration
        report("gemv 20b w1 (split layout, folded scales)", gemv_20b_w1(), 64)
        report("gemv 20b w1 (swizzled, folded)", gemv_20b_w1(SWIZZLED=True), 64)
    elif which == "mma":
        # a row iteration: KB 15 blocks x 16 weights (two rows' words) a thread for each of its M_TILES row tiles
        for m_tiles in (1, 2):
            report(f"mma 20b w1, one token, {m_tiles} row tile(s) a warp", mma_20b_w1(m_tiles=m_tiles), 240 * m_tiles)
        report("mma 20b w1, row blocks of 16 pairs", mma_20b_w1(block_t=16, pair_blocks=False), 240)
        report("mma 20b w1, one token, activations staged at once", mma_20b_w1(stage_once=True), 240)
        report("mma 20b w1, one token, staged at once, weights prefetched",
               mma_20b_w1(stage_once=True, prefetch=True), 240)
        for groups in (1, 2, 4):
            report(f"mma 20b w1, one token, staged at once, weights copied asynchronously in {groups} group(s)",
                   mma_20b_w1(stage_once=True, ASYNC_GROUPS=groups), 240)
        report("mma 20b (w1 shape), one token, copies in 2 groups issued before the PDL wait (as the second matmul)",
               mma_20b_w1(stage_once=True, ASYNC_GROUPS=2, PDL=True, EARLY_WEIGHTS=True), 240)
    elif which == "mma_fused":
        # a stage: Q sub-blocks of 64 rows x 32 weights over 32 * num_warps threads (the loop holds both kinds)
        for q, slots, warps, tma in ((16, 6, 8, False), (16, 8, 8, False), (15, 6, 4, False), (16, 6, 4, False),
                                     (16, 6, 16, False), (32, 4, 8, False), (16, 6, 8, True), (16, 6, 16, True)):
            report(f"one-launch MoE 20b, Q={q}, {slots} slots, {warps} warps{', TMA' if tma else ''}",
                   mma_fused_20b(q, slots, warps, tma=tma), q * 2048 // (32 * warps))
    elif which == "fused":
        # a K range: RB rows x KB 16 blocks over 128 threads, rows_per_thread x 32 weights a thread
        for rows, unroll, stages in ((2, 1, 1), (2, 6, 1), (2, 1, 2), (4, 1, 1)):
            report(f"fused w1 + SwiGLU, {rows} rows a thread, unroll {unroll}, stages {stages}",
                   fused_20b("w1", rows, k_unroll=unroll, k_stages=stages), 32 * rows)
        for rows, unroll in ((1, 1), (1, 6), (2, 1)):
            report(f"fused w2 + combine, {rows} rows a thread, unroll {unroll} (4 slots)",
                   fused_20b("w2", rows, k_unroll=unroll), 32 * rows)
    elif which == "wgmma":
        # a step: KB_PER_STEP K blocks (3 unless named), 64 * m_reps rows x 32 weights each over 128 threads (16 *
        # m_reps weights a thread a block)
        from gptoss_serve.kernels.moe_matmul import WGMMA_TILES

        for tile in WGMMA_TILES.values():  # the shipped tiles (K blocks a step, stages, scaled after or before)
            block_t, m_reps, per_step = tile["BLOCK_T"], tile["M_REPS"], tile["KB_PER_STEP"]
            report(f"wgmma 20b w1 + SwiGLU, {block_t} pairs x {64 * m_reps} rows, {per_step} K blocks a step",
                   wgmma_20b_w1(block_t, m_reps, stages=tile["STAGES"], KB_PER_STEP=per_step,
                                SCALE_AFTER=tile["SCALE_AFTER"]), 16 * per_step * m_reps)
        for vector in (True, False):  # the second matmul's rows: 16-byte stores (the default) or 2-byte ones
            report(f"wgmma 20b w2, 128 pairs x 128 rows, 16-byte stores {vector}",
                   wgmma_20b_w1(128, 2, swiglu=False, stages=9, VECTOR_STORE=vector), 96)
        report("wgmma 20b w1, 16 x 128, one K block a step", wgmma_20b_w1(16, 2, KB_PER_STEP=1), 32)
        for early in (False, True):  # programmatic dependent launch: the wait at the start, or after the weights
            report(f"wgmma 20b w1 + SwiGLU, 8 x 64, PDL, weights before the wait {early}",
                   wgmma_20b_w1(8, 1, stages=12, SCALE_AFTER=True, PDL=True, EARLY_WEIGHTS=early), 48)
        for warps in (4, 8):  # row blocks of 256 pairs: 64 rows on one warpgroup, 128 on two
            report(f"wgmma 20b w1 + SwiGLU, 256 pairs x {16 * warps} rows", wgmma_20b_w1(256, 1, warps, stages=6), 48)
            for vector in (False, True):
                report(f"wgmma 20b w2, 256 pairs x {16 * warps} rows, 16-byte stores {vector}",
                       wgmma_20b_w1(256, 1, warps, False, stages=6, VECTOR_STORE=vector), 48)
        report("wgmma 20b w1, 64 x 64, not pipelined (the reference)",
               wgmma_20b_w1(PIPELINED=False, KB_PER_STEP=1), 16)
    elif which == "chain":  # both matmuls in one launch, at the decode tiles
        from gptoss_serve.kernels.moe_matmul import WGMMA_TILES

        for block_t in (8, 16):
            tile = WGMMA_TILES[block_t]
            report(f"wgmma chain 20b, {block_t} pairs x 64 rows, {tile['KB_PER_STEP']} K blocks a step",
                   wgmma_chain_20b(block_t, tile["STAGES"], tile["KB_PER_STEP"], tile["SCALE_AFTER"]),
                   16 * tile["KB_PER_STEP"])
    elif which == "router":
        for experts_per_program in (4, 8, 16):
            report(f"norm + router logits, 20b, {experts_per_program} experts a program",
                   router(32, experts_per_program))
    elif which == "front":
        for num_tokens, num_splits in ((1, None), (8, None), (16, None), (64, None), (1, 8), (16, 1)):
            tiling, compiled = attention_front(num_tokens, num_splits)
            report(f"norm + qkv + rope + cache, {num_tokens} tokens, " + ", ".join(f"{k} {v}" for k, v in
                                                                                   tiling.items()), compiled)
    elif which == "attention":
        for pdl, early_meta in ((False, False), (True, False), (True, True)):
            compiled = attention_decode(pdl=pdl, early_meta=early_meta)
            report(f"decode attention, 128-key blocks, PDL {pdl}"
                   + (", lengths and first pages before the wait" if early_meta else ""), compiled)
            print("  " + first_lines(sass(compiled), ("ACQBULK", "PREEXIT", "LDG", "LDGSTS")))
        report("decode attention, 128-key blocks, PDL, slices merged by the last one",
               attention_decode(fused_merge=True))
        for num_stages in (2, 3, 4):  # K and V are one group each: 2 in flight = one block ahead
            print(f"decode attention, 128-key blocks, {num_stages} stages: "
                  + copies_in_flight(attention_decode(num_stages=num_stages)))
    elif which == "prefill":
        for num_warps, num_stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
            compiled = attention_prefill(num_stages, num_warps)
            report(f"prefill attention, 128 rows x 64 keys, {num_warps} warps, {num_stages} stages", compiled)
            print("  " + copies_in_flight(compiled))
    elif which == "grouped":
        report("grouped 20b w1, 16x64x128 tiles (decode)", grouped_20b_w1(FOLD_SCALES=True), 64)
        for join in (False, True):
            report(f"grouped 20b w1, 256x128x64 tiles (prefill), one dot a step: {join}",
                   grouped_20b_w1(256, 128, 64, 8, 3, FOLD_SCALES=True, JOIN_K=join), 32)
