"""The front of the attention sub-block in one launch (Triton): residual add, RMSNorm, the qkv projection with
its bias, rotary embedding on q and k, and k and v written to the paged cache. The twin of
attention_front_ref.norm_qkv_rope_ref.

Composed, that front is three launches a layer (rmsnorm, cuBLAS's qkv matmul, rope_and_cache_write) plus a
normed row written and read back; at one token on an H200 (docs/PERFORMANCE.md, engine profile of 2026-12-02)
2.5 + 10.5 + 4.2 us a layer, of which only the matmul's 29.5 MB of weights (20b) are real work.

A program owns a block of tokens and ROWS rotary pairs of one head: rows d0 .. d0 + ROWS - 1 of the head and
their partners HALF later, so that the rotation needs nothing from another program. It first sums the new
residual rows' squares (chunks of BLOCK_K), then walks K again: normalizes each chunk as rmsnorm does (same
roundings of the sum and of the normed values) and takes two tensor-core dots, one per half. The epilogue adds
the bias, rounds as nn.Linear's output is rounded, and for a q head rotates and writes q; for a k head rotates
and writes the cache slot; for a v head writes the cache slot. The first program of each token block (head 0's
first ROWS pairs) also writes the new residual rows. The normed rows are never written: nothing else reads them.

The mean square is summed chunk by chunk, not over the whole row at once as the rmsnorm kernel does, so a normed
value can differ from that kernel's in the last bit now and then; the torch twin is the reference for both.

Every program walks all of K for its 32 weight rows (184 KB at 20b), and at 1 token the grid is 160 programs
(80 heads x 2 pair blocks), so this suits decode-sized steps; larger steps run the composed path, whose matmul
reads each weight once for all tokens. Not yet timed on a GPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gptoss_serve.kernels.attention_front_ref import split_qkv
from gptoss_serve.kernels.rmsnorm import rmsnorm
from gptoss_serve.kernels.rope import rope_and_cache_write
from gptoss_serve.kernels.triton_utils import cast_rne, emulate_bf16, launch, next_pow2

# Steps of up to this many tokens (one block of them) take the fused kernel; GPTOSS_FUSED_ATTN_FRONT_MAX_TOKENS
# sets it for a process. Off (0) by default: on an H100 (2026-12-06, `python3 -m gptoss_serve.kernels.bench
# --sections attention-front`) it took 30.9 / 31.2 / 57.3 us at 1 / 8 / 64 tokens of 20b against 22.9 / 22.9 /
# 24.0 composed. Its 160 programs (20b) each walk all of K over 184 KB of weights: 1.2 waves on 132 SMs, each
# program one long chain, where cuBLAS splits K. A faster version needs more programs than rotary pairs allow
# (split K with the rotation in a second pass, or fewer rows a program on the CUDA cores).
FUSED_MAX_TOKENS = int(os.environ.get("GPTOSS_FUSED_ATTN_FRONT_MAX_TOKENS", "0"))
ROWS = 16  # rotary pairs a program: 32 weight rows (the dot's N side is ROWS, at least 16 for tensor cores)
BLOCK_K = 128


@triton.jit(do_not_specialize=["num_tokens"])
def _norm_qkv_rope_kernel(
    h_ptr, residual_ptr, norm_scale_ptr, w_ptr, b_ptr, positions_ptr, inv_freq_ptr, slots_ptr,
    q_out_ptr, residual_out_ptr, k_cache_ptr, v_cache_ptr,
    num_tokens, num_q_heads, num_kv_heads, stride_h, stride_residual, stride_residual_out, stride_w,
    stride_cache_block, stride_cache_slot, stride_cache_head, block_size, eps, concentration,
    HIDDEN: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """Program (token block, head and pair block). Under EMULATE_BF16 (the interpreter) the dots take float32
    operands: the interpreter computes bf16 dots wrongly (triton issue 11584)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    PARTS: tl.constexpr = HALF // ROWS
    act = w_ptr.dtype.element_ty  # nn.Linear's output dtype
    pid_n = tl.program_id(1)
    head = pid_n // PARTS
    dims = (pid_n % PARTS) * ROWS + tl.arange(0, ROWS)  # [ROWS], positions within the first half
    rows = head * HEAD_DIM + dims  # their weight rows; the partners are rows + HALF
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_tokens = tokens < num_tokens
    h_rows = h_ptr + tokens.to(tl.int64)[:, None] * stride_h
    r_rows = residual_ptr + tokens.to(tl.int64)[:, None] * stride_residual
    ks = tl.arange(0, BLOCK_K)

    # Pass 1: the mean square of each new residual row.
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(0, HIDDEN, BLOCK_K, num_stages=3):
        k = k0 + ks
        mask = in_tokens[:, None] & (k < HIDDEN)[None, :]
        s = tl.load(h_rows + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:  # rounded to the activations' dtype, as the reference's add
            s = cast_rne(s + tl.load(r_rows + k[None, :], mask=mask, other=0.0).to(tl.float32),
                         residual_out_ptr.dtype.element_ty, EMULATE_BF16).to(tl.float32)
        squares += tl.sum(s * s, axis=1)
    inv_rms = 1.0 / tl.sqrt(squares / HIDDEN + eps)  # [BLOCK_M]

    # Pass 2: normalize each chunk and multiply it by the program's rows of both halves.
    acc1 = tl.zeros([BLOCK_M, ROWS], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, ROWS], dtype=tl.float32)
    writes_residual = in_tokens & (tokens * 0 + pid_n == 0)  # a vector mask: the interpreter wants one
    for k0 in range(0, HIDDEN, BLOCK_K):
        k = k0 + ks
        in_k = k < HIDDEN
        mask = in_tokens[:, None] & in_k[None, :]
        w1 = tl.load(w_ptr + rows[None, :].to(tl.int64) * stride_w + k[:, None], mask=in_k[:, None], other=0.0)
        w2 = tl.load(w_ptr + (rows + HALF)[None, :].to(tl.int64) * stride_w + k[:, None], mask=in_k[:, None],
                     other=0.0)  # [BLOCK_K, ROWS] each
        s = tl.load(h_rows + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s = cast_rne(s + tl.load(r_rows + k[None, :], mask=mask, other=0.0).to(tl.float32),
                         residual_out_ptr.dtype.element_ty, EMULATE_BF16)
            tl.store(residual_out_ptr + tokens.to(tl.int64)[:, None] * stride_residual_out + k[None, :], s,
                     mask=writes_residual[:, None] & in_k[None, :])
            s = s.to(tl.float32)
        scale = tl.load(norm_scale_ptr + k, mask=in_k, other=0.0).to(tl.float32)
        x = cast_rne(s * inv_rms[:, None] * scale[None, :], act, EMULATE_BF16)  # [BLOCK_M, BLOCK_K]
        if EMULATE_BF16:
            x, w1, w2 = x.to(tl.float32), w1.to(tl.float32), w2.to(tl.float32)
        # "ieee": float32 operands (a float32 model) multiply in full precision, as F.linear does, not as tf32;
        # bf16 operands take the tensor cores either way.
        acc1 = tl.dot(x, w1, acc1, input_precision="ieee")
        acc2 = tl.dot(x, w2, acc2, input_precision="ieee")

    # The projection's output as nn.Linear gives it: float32 sums plus the bias, rounded.
    y1 = cast_rne(acc1 + tl.load(b_ptr + rows).to(tl.float32)[None, :], act, EMULATE_BF16).to(tl.float32)
    y2 = cast_rne(acc2 + tl.load(b_ptr + rows + HALF).to(tl.float32)[None, :], act, EMULATE_BF16).to(tl.float32)
    slots = tl.load(slots_ptr + tokens, mask=in_tokens, other=-1).to(tl.int64)
    stores = (in_tokens & (slots >= 0))[:, None]  # a negative slot: don't store this token
    cache_rows = (slots // block_size) * stride_cache_block + (slots % block_size) * stride_cache_slot
    if head < num_q_heads + num_kv_heads:  # q or k: rotate (NeoX halves, angles in float32)
        position = tl.load(positions_ptr + tokens, mask=in_tokens, other=0).to(tl.float32)
        angle = position[:, None] * tl.load(inv_freq_ptr + dims)[None, :]  # [BLOCK_M, ROWS]
        cos = tl.cos(angle) * concentration
        sin = tl.sin(angle) * concentration
        rot1 = cast_rne(y1 * cos - y2 * sin, act, EMULATE_BF16)
        rot2 = cast_rne(y2 * cos + y1 * sin, act, EMULATE_BF16)
        if head < num_q_heads:
            q_rows = q_out_ptr + (tokens.to(tl.int64)[:, None] * num_q_heads + head) * HEAD_DIM
            tl.store(q_rows + dims[None, :], rot1, mask=in_tokens[:, None])
            tl.store(q_rows + HALF + dims[None, :], rot2, mask=in_tokens[:, None])
        else:
            at = k_cache_ptr + (cache_rows + (head - num_q_heads) * stride_cache_head)[:, None] + dims[None, :]
            tl.store(at, rot1.to(k_cache_ptr.dtype.element_ty), mask=stores)
            tl.store(at + HALF, rot2.to(k_cache_ptr.dtype.element_ty), mask=stores)
    else:  # v: as projected
        kv_head = head - num_q_heads - num_kv_heads
        at = v_cache_ptr + (cache_rows + kv_head * stride_cache_head)[:, None] + dims[None, :]
        tl.store(at, y1.to(v_cache_ptr.dtype.element_ty), mask=stores)
        tl.store(at + HALF, y2.to(v_cache_ptr.dtype.element_ty), mask=stores)


def norm_qkv_rope(
    h: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden]; None in layer 0
    norm_scale: torch.Tensor,  # [hidden] float32
    eps: float,
    qkv_weight: torch.Tensor,  # [(num_q_heads + 2 * num_kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor,  # [(num_q_heads + 2 * num_kv_heads) * head_dim]
    num_q_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,  # [num_tokens] int
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
    concentration: float,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative = don't store
    max_fused_tokens: int | None = None,  # None: FUSED_MAX_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q rotated [num_tokens, num_q_heads, head_dim], residual_out), as norm_qkv_rope_ref. The fused kernel
    takes steps of up to max_fused_tokens tokens whose heads split into whole blocks of ROWS pairs (head_dim a
    multiple of 32); the rest run rmsnorm, the matmul and rope_and_cache_write. Chosen from shapes alone, so
    CUDA graphs capture it."""
    num_tokens, hidden = h.shape
    head_dim = qkv_weight.shape[0] // (num_q_heads + 2 * num_kv_heads)
    limit = FUSED_MAX_TOKENS if max_fused_tokens is None else max_fused_tokens
    if num_tokens > limit or (head_dim // 2) % ROWS:
        normed, residual_out = rmsnorm(h, norm_scale, eps, residual)
        q, k, v = split_qkv(F.linear(normed, qkv_weight, qkv_bias), num_q_heads, num_kv_heads)
        q_rot, _ = rope_and_cache_write(q, k, v, positions, inv_freq, concentration, k_cache, v_cache,
                                        slot_mapping)
        return q_rot, residual_out
    if h.stride(1) != 1 or (residual is not None and residual.stride(1) != 1) or qkv_weight.stride(1) != 1:
        raise ValueError("norm_qkv_rope needs rows with unit column stride (activations and qkv weight)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k and v caches must share one layout with head_dim contiguous")
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=h.dtype, device=h.device)
    residual_out = torch.empty_like(h) if residual is not None else h
    if num_tokens == 0:
        return q_out, residual_out
    block_m = min(64, max(16, next_pow2(num_tokens)))
    grid = (triton.cdiv(num_tokens, block_m), (num_q_heads + 2 * num_kv_heads) * (head_dim // 2 // ROWS))
    launch(_norm_qkv_rope_kernel, grid,
           h, residual if residual is not None else h, norm_scale, qkv_weight, qkv_bias, positions, inv_freq,
           slot_mapping, q_out, residual_out, k_cache, v_cache,
           num_tokens, num_q_heads, num_kv_heads, h.stride(0),
           residual.stride(0) if residual is not None else h.stride(0), residual_out.stride(0),
           qkv_weight.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[1],
           eps, float(concentration),
           HIDDEN=hidden, HEAD_DIM=head_dim, ROWS=ROWS, BLOCK_M=block_m, BLOCK_K=min(BLOCK_K, next_pow2(hidden)),
           HAS_RESIDUAL=residual is not None, EMULATE_BF16=emulate_bf16(), num_warps=4, num_stages=3)
    return q_out, residual_out
