"""Triton MoE kernels (routing, grouping, MXFP4 grouped matmuls) against their torch twins.

Without a GPU the kernels run in Triton's interpreter on small hidden sizes; the `gpu` tests repeat the
comparison at the real gpt-oss shapes on fresh random data.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; the kernels re-read it at launch too

from gptoss_serve.kernels.moe_gemv import DEFAULT_GEMV_CONFIG  # noqa: E402
from gptoss_serve.kernels.moe_matmul import (BF16_PIECES, E4M3_PIECES, FOLD_MAX_SCALE,  # noqa: E402
                                             SPLITK_MAX_TOKENS, WGMMA_SMALL_TILE, _tile_config, moe_experts,
                                             moe_experts_splitk, takes_gemv)
from gptoss_serve.kernels.weight_layout import (merge_nibbles, pack_split_bytes, split_nibbles,  # noqa: E402
                                                swizzle_bits, tile_rows, unpack_split_bytes, unswizzle_bits)
from gptoss_serve.kernels.moe_ref import moe_experts_ref, route_ref  # noqa: E402
from gptoss_serve.kernels.mxfp4 import fp4_lut  # noqa: E402
from gptoss_serve.kernels.moe_routing import (group_by_expert, max_row_blocks, max_tail_blocks,  # noqa: E402
                                              route)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def distinct_logits(num_tokens: int, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """Router logits without ties (in bf16), so top-k has one right answer."""
    ranks = torch.rand(num_tokens, num_experts, generator=gen, device=gen.device).argsort(dim=1)
    return ((ranks.float() - num_experts / 2) / 16).to(torch.bfloat16)


def random_mxfp4(num_experts: int, rows: int, cols: int, gen: torch.Generator):
    blocks = torch.randint(0, 256, (num_experts, rows, cols // 32, 16), dtype=torch.uint8, generator=gen,
                           device=gen.device)
    scales = torch.randint(116, 124, (num_experts, rows, cols // 32), dtype=torch.uint8, generator=gen,
                           device=gen.device)
    return blocks, scales


def make_moe(num_tokens, num_experts, hidden, intermediate, top_k, first_expert, num_local, has_b2, seed,
             device=DEVICE, skewed=False):
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where used: 120b's bytes in a moment on a GPU
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(torch.bfloat16)
    logits = distinct_logits(num_tokens, num_experts, gen)
    if skewed:  # most tokens prefer the same few experts: some experts get many, others none
        logits[:, :3] += 8
    weights, ids = route_ref(logits, top_k)
    w1_blocks, w1_scales = random_mxfp4(num_local, 2 * intermediate, hidden, gen)
    w2_blocks, w2_scales = random_mxfp4(num_local, hidden, intermediate, gen)
    b1 = torch.randn(num_local, 2 * intermediate, generator=gen, device=device).to(torch.bfloat16)
    b2 = torch.randn(num_local, hidden, generator=gen, device=device).to(torch.bfloat16) if has_b2 else None
    args = [x, weights, ids, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2]
    return [a.to(device) if a is not None else None for a in args] + [1.702, 7.0, first_expert]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 4), (7, 32, 4), (129, 128, 4), (1000, 32, 4),
                                                           (5, 5, 5), (3, 4, 1)])
def test_route_matches_ref(num_tokens, num_experts, top_k):
    logits = distinct_logits(num_tokens, num_experts, torch.Generator().manual_seed(num_tokens)).to(DEVICE)
    weights, ids = route(logits, top_k)
    ref_weights, ref_ids = route_ref(logits, top_k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_tokens,num_experts,first_expert,num_local,block_m,tail", [
    (1, 8, 0, 8, 16, None), (7, 32, 8, 16, 16, None), (129, 128, 0, 128, 64, None), (1000, 32, 5, 3, 128, None),
    (4, 4, 3, 1, 16, None),
    # tail blocks: each expert's last 1-48 rows past its whole blocks in blocks of 16 (0 or 49+ rows: none)
    (1000, 32, 5, 3, 128, (16, 48)), (129, 8, 0, 8, 64, (16, 16)), (700, 16, 0, 16, 128, (16, 48)),
    (7, 32, 8, 16, 16, (8, 8)), (300, 8, 2, 4, 32, (32, 32))])
def test_group_by_expert_is_a_stable_blocked_sort(num_tokens, num_experts, first_expert, num_local, block_m, tail):
    gen = torch.Generator().manual_seed(1)
    _, ids = route_ref(distinct_logits(num_tokens, num_experts, gen), min(4, num_experts))
    groups = group_by_expert(ids.to(DEVICE), first_expert, num_local, block_m, tail=tail, parallel=False)
    # The three-launch grouping (a program a chunk of pairs) writes the same rows and tables.
    chunked = group_by_expert(ids.to(DEVICE), first_expert, num_local, block_m, tail=tail, parallel=True)
    for one, other in ((groups, chunked), (groups.tail, chunked.tail)) if tail else ((groups, chunked),):
        for name in ("block_expert", "block_row_start", "block_row_end"):
            valid = one.block_expert >= 0
            assert torch.equal(getattr(one, name)[valid], getattr(other, name)[valid]), name
            assert torch.equal(valid, other.block_expert >= 0)
    local = ids.reshape(-1).long() - first_expert
    is_local = (local >= 0) & (local < num_local)
    expected = [p for e in range(num_local) for p in torch.nonzero(local == e).flatten().tolist()]
    num_rows = int(is_local.sum())
    assert groups.sorted_pairs[:num_rows].cpu().tolist() == expected
    assert chunked.sorted_pairs[:num_rows].cpu().tolist() == expected
    assert groups.block_expert.numel() == max_row_blocks(ids.numel(), num_local, block_m)
    tables = [(groups, block_m)]
    if tail is None:
        assert groups.tail is None
    else:
        assert groups.tail.sorted_pairs is groups.sorted_pairs and groups.tail.block_m == tail[0]
        assert groups.tail.block_expert.numel() == max_tail_blocks(ids.numel(), num_local, *tail)
        tables.append((groups.tail, tail[0]))
    rows_seen, tail_rows = [], {}
    for table, size in tables:
        block_expert = table.block_expert.cpu()
        starts, ends = table.block_row_start.cpu(), table.block_row_end.cpu()
        for b in torch.nonzero(block_expert >= 0).flatten().tolist():
            assert 0 < ends[b] - starts[b] <= size
            rows = range(int(starts[b]), int(ends[b]))
            assert all(local[expected[r]] == block_expert[b] for r in rows)
            rows_seen.extend(rows)
            if table is not groups:
                tail_rows[int(block_expert[b])] = tail_rows.get(int(block_expert[b]), 0) + len(rows)
    assert sorted(rows_seen) == list(range(num_rows))  # every row in exactly one block of one table
    if tail is not None:  # the tail holds exactly the rest past whole blocks, where that rest is 1..tail_pairs
        counts = torch.bincount(local[is_local], minlength=num_local).tolist()
        wanted = {e: c % block_m for e, c in enumerate(counts) if 0 < c % block_m <= tail[1]}
        assert tail_rows == wanted
        if num_tokens >= 129:
            assert wanted, "the case should exercise tail blocks"


@pytest.mark.parametrize("num_tokens,num_experts,hidden,intermediate,first_expert,num_local,has_b2", [
    (1, 8, 64, 64, 0, 8, True),          # one token: four experts, the others get nothing
    (7, 32, 64, 96, 0, 32, True),        # K of the second matmul not a multiple of the K tile
    (129, 16, 128, 64, 4, 8, True),      # expert parallelism: tokens routed outside [4, 12) are skipped
    (1000, 8, 64, 64, 0, 8, False),      # many tokens, several row blocks per expert, no w2 bias
    (33, 8, 64, 32, 0, 8, False),        # tensor parallelism: a slice of the intermediate dimension
])
def test_moe_experts_matches_ref(num_tokens, num_experts, hidden, intermediate, first_expert, num_local, has_b2):
    args = make_moe(num_tokens, num_experts, hidden, intermediate, 4, first_expert, num_local, has_b2, seed=2)
    out = moe_experts(*args)
    ref = moe_experts_ref(*args)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # The interpreter mirrors the twin's bf16 roundings exactly; on a GPU only summation order differs.
    assert rel_err(out, ref) < (1e-2 if DEVICE == "cuda" else 1e-3)


def test_moe_experts_skewed_routing_and_empty_experts():
    args = make_moe(200, 16, 64, 64, 4, 0, 16, True, seed=3, skewed=True)
    assert rel_err(moe_experts(*args), moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


def test_moe_experts_no_local_token_gives_zeros():
    args = make_moe(5, 16, 64, 64, 2, 0, 4, True, seed=4)
    args[11] = 100  # first_expert beyond every routed id
    assert torch.count_nonzero(moe_experts(*args)) == 0


def test_split_nibble_layout_gives_the_same_result():
    args = make_moe(9, 8, 64, 64, 4, 0, 8, True, seed=5)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    split = split_nibbles(w1b).cpu()
    in_order = torch.stack((w1b.cpu() & 15, w1b.cpu() >> 4), dim=-1).flatten(-2)  # [..., 32] element order
    assert torch.equal(torch.cat(unpack_split_bytes(split), dim=-1), in_order)
    assert torch.equal(merge_nibbles(split), w1b.cpu())
    out = moe_experts(x, w, ids, split_nibbles(w1b), w1s, b1, split_nibbles(w2b), w2s, b2, alpha, limit, first,
                      split_nibbles=True)
    torch.testing.assert_close(out, moe_experts(*args), rtol=0, atol=0)


def shifted_pieces(words: torch.Tensor, pieces) -> torch.Tensor:
    """What moe_matmul.pieces_ptx computes, on int64 words of 32 bits."""
    return sum(((words << shift) if shift >= 0 else (words >> -shift)) & mask for shift, mask in pieces)


def test_split_bytes_become_e4m3_bytes_through_the_asm_moves():
    """Every pair of nibbles: the split layout's byte unpacks to them, and the asm's moves (E4M3_PIECES, on 4-byte
    words whatever the neighbouring bytes) turn each nibble into an e4m3 byte that reads as its FP4 value * 2^-6;
    the checkpoint's bytes likewise through theirs."""
    nibbles = torch.arange(16, dtype=torch.uint8)
    low, high = nibbles.repeat_interleave(16), nibbles.repeat(16)
    packed = pack_split_bytes(low, high)
    assert packed.unique().numel() == 256
    assert all(torch.equal(a, b) for a, b in zip(unpack_split_bytes(packed), (low, high)))
    fp4 = fp4_lut()
    for split, layout_bytes in ((True, packed), (False, low | (high << 4))):
        for roll in range(4):  # each byte at each place of a word, beside other bytes
            in_words = layout_bytes.roll(roll).reshape(64, 4).long()
            words = sum(in_words[:, b] << (8 * b) for b in range(4))
            for pieces, nibble in zip(E4M3_PIECES[split], (low, high)):
                out = shifted_pieces(words, pieces)
                out_bytes = torch.stack([(out >> (8 * b)) & 0xFF for b in range(4)], dim=1).to(torch.uint8)
                values = out_bytes.reshape(-1).view(torch.float8_e4m3fn).float() * 64
                assert torch.equal(values, fp4[nibble.roll(roll).long()]), (split, pieces)


@pytest.mark.parametrize("split", [True, False])
def test_bf16_asm_pieces_give_every_nibble_times_2_to_the_minus_126(split):
    """The bf16 asm (the grouped kernel's on a GPU) ORs shifted, masked pieces of a byte into bf16 bits
    (BF16_PIECES): for every byte of either layout, each nibble's bits read as its FP4 value * 2^-126."""
    nibbles = torch.arange(16, dtype=torch.int64)
    low, high = nibbles.repeat_interleave(16), nibbles.repeat(16)
    byte = pack_split_bytes(low, high) if split else low | (high << 4)
    fp4 = fp4_lut(dtype=torch.float64)
    for pieces, nibble in zip(BF16_PIECES[split], (low, high)):
        bits = shifted_pieces(byte, pieces) & 0xFFFF  # the byte sits alone in its 16-bit half
        value = (bits << 16).to(torch.int32).view(torch.float32).double() * 2.0 ** 126
        assert torch.equal(value, fp4[nibble]), pieces


@pytest.mark.parametrize("join_k", [True, False])
@pytest.mark.parametrize("split", [True, False])
def test_one_dot_a_step_and_two_half_dots_agree(join_k, split):
    """JOIN_K (the default) takes one dot over a step's low and high nibbles side by side; the other form two."""
    args = make_moe(37, 8, 128, 96, 4, 0, 8, True, seed=6)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    relay = split_nibbles if split else (lambda b: b)
    config = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2, JOIN_K=join_k)
    out = moe_experts(x, w, ids, relay(w1b), w1s, b1, relay(w2b), w2s, b2, alpha, limit, first, split_nibbles=split,
                      config=config)
    assert rel_err(out, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


def test_one_dot_a_step_refuses_the_tiles_triton_gets_wrong():
    args = make_moe(3, 8, 64, 64, 4, 0, 8, True, seed=7)
    with pytest.raises(ValueError, match="BLOCK_K >= 128"):
        moe_experts(*args, config=dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2, JOIN_K=True))


# Split-K decode path ------------------------------------------------------------------------------------------
def splitk_config(num_tokens: int, splits: int) -> dict:
    """Small tiles so that the interpreter's K of 64-96 still gives several splits and K steps."""
    block_m = 16 if num_tokens > 2 else 1 if num_tokens == 1 else 2
    return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1, splits=splits)


@pytest.mark.parametrize("num_tokens,num_experts,hidden,intermediate,first_expert,num_local,has_b2,splits", [
    (1, 8, 64, 96, 0, 8, True, 3),        # CUDA-core path, one row per expert, K split 2 and 3 ways
    (2, 8, 64, 64, 0, 8, True, 2),        # two rows, some experts shared by both tokens
    (7, 32, 64, 96, 0, 32, True, 3),      # tensor-core path, most experts get no token
    (7, 16, 96, 64, 4, 8, True, 2),       # expert parallelism: pairs routed outside [4, 12) skipped
    (2, 8, 64, 32, 0, 8, False, 1),       # tensor parallelism: a slice of the intermediate, no w2 bias
    (1, 8, 64, 64, 2, 4, True, 2),        # the token may have no expert on this rank at all
])
def test_moe_experts_splitk_matches_ref(num_tokens, num_experts, hidden, intermediate, first_expert, num_local,
                                        has_b2, splits):
    args = make_moe(num_tokens, num_experts, hidden, intermediate, 4, first_expert, num_local, has_b2,
                    seed=10 + num_tokens)
    ref = moe_experts_ref(*args)
    for config in (splitk_config(num_tokens, splits), None):  # fixed splits; the default decode tiles
        out = moe_experts_splitk(*args, config=config)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert rel_err(out, ref) < (1e-2 if DEVICE == "cuda" else 1e-3)


def test_moe_experts_splitk_is_the_decode_default_and_equals_the_grouped_path():
    args = make_moe(SPLITK_MAX_TOKENS, 8, 64, 64, 4, 0, 8, True, seed=20)
    old = moe_experts(*args, config=_tile_config(SPLITK_MAX_TOKENS, 4 * SPLITK_MAX_TOKENS, 8))
    new = moe_experts(*args)  # the dispatch picks split-K here
    if DEVICE == "cpu":  # the interpreter sums these short Ks exactly: both paths give the twin's roundings
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    assert rel_err(new, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


def test_moe_experts_splitk_split_nibbles_and_strided_scales():
    args = make_moe(2, 8, 64, 64, 4, 0, 8, True, seed=21)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    ref = moe_experts_ref(*args)
    t1s = w1s.transpose(1, 2).contiguous().transpose(1, 2)  # same values, scale blocks of one K step adjacent
    t2s = w2s.transpose(1, 2).contiguous().transpose(1, 2)
    for config in (splitk_config(2, 2), splitk_config(8, 2)):
        out = moe_experts_splitk(x, w, ids, split_nibbles(w1b), t1s, b1, split_nibbles(w2b), t2s, b2, alpha, limit,
                                 first, split_nibbles=True, config=config)
        assert rel_err(out, ref) < (1e-2 if DEVICE == "cuda" else 1e-3)


@pytest.mark.parametrize("num_tokens,tile_n", [(1, 16), (3, 32), (40, 16)])
def test_tiled_row_layout_gives_the_same_result(num_tokens, tile_n):
    # Both paths (split-K at 1 and 3 tokens, grouped at 40) on split-nibble bytes re-laid out by tile_rows.
    args = make_moe(num_tokens, 8, 64, 64, 4, 0, 8, True, seed=22)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    tiled = tile_rows(w1b, tile_n)
    assert tiled.shape == w1b.shape
    assert torch.equal(tiled.reshape(8, 128 // tile_n, 2, tile_n, 16)[:, 1, :, 3], w1b[:, tile_n + 3])
    config = splitk_config(num_tokens, 2) if num_tokens <= SPLITK_MAX_TOKENS else None
    out = moe_experts(x, w, ids, tile_rows(split_nibbles(w1b), tile_n), w1s, b1, tile_rows(split_nibbles(w2b), tile_n),
                      w2s, b2, alpha, limit, first, split_nibbles=True, config=config, tile_n=tile_n)
    assert rel_err(out, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


def serving_layout(blocks: torch.Tensor, tile_n: int) -> torch.Tensor:
    """What TritonKernels.prepare_weights makes of checkpoint bytes."""
    return tile_rows(swizzle_bits(split_nibbles(blocks)), tile_n)


def test_swizzle_bits_is_a_bit_permutation_within_each_word():
    gen = torch.Generator().manual_seed(24)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=gen)
    swizzled = swizzle_bits(blocks)
    assert torch.equal(unswizzle_bits(swizzled), blocks)
    popcount = lambda t: sum(((t.reshape(-1, 4).long() >> b) & 1).sum(1) for b in range(8))  # noqa: E731
    assert torch.equal(popcount(swizzled), popcount(blocks))  # bits move only within their 4-byte word
    one = torch.zeros(16, dtype=torch.uint8)
    one[1] = pack_split_bytes(torch.tensor(2), torch.tensor(0))  # L1 = element 1, nibble 0b0010: e0 -> bit 23
    assert swizzle_bits(one)[2] == 0x80 and int(swizzle_bits(one).count_nonzero()) == 1


@pytest.mark.parametrize("num_tokens,fold,config", [
    (1, True, None),                       # the decode default: pairs as row blocks, no grouping kernel
    (1, False, "cuda-cores"),              # scale bytes beyond the folded multiplier's range
    (1, True, "tensor-cores"),
    (3, True, None),                       # split-K with grouping
    (40, False, None),                     # grouped path
    (40, True, None),
])
def test_swizzled_layout_gives_the_same_result(num_tokens, fold, config):
    args = make_moe(num_tokens, 8, 64, 64, 4, 0, 8, True, seed=25 + num_tokens)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    gen = torch.Generator().manual_seed(26)
    # Edge scale bytes: 0 (the subnormal 2^-127) and the largest the folded multiplier takes, or beyond it.
    high = FOLD_MAX_SCALE if fold else 140
    for scales in (w1s, w2s):
        edges = torch.randint(0, 4, scales.shape, generator=gen).to(scales.device)
        scales[edges == 0] = 0
        scales[edges == 1] = high
    args[4], args[7] = w1s, w2s
    ref = moe_experts_ref(*args)
    cfg = {"cuda-cores": splitk_config(1, 2), "tensor-cores": dict(splitk_config(7, 2)), None: None}[config]
    out = moe_experts(x, w, ids, serving_layout(w1b, 16), w1s, b1, serving_layout(w2b, 16), w2s, b2, alpha, limit,
                      first, split_nibbles=True, swizzled=True, fold_scales=fold, tile_n=16, config=cfg)
    assert rel_err(out, ref) < (1e-2 if DEVICE == "cuda" else 1e-3)
    if DEVICE == "cpu" and num_tokens == 1 and config != "tensor-cores":
        # The CUDA-core path sums in the same order on both layouts (the tensor-core paths do eight dots a step
        # on this layout instead of two, so their float32 sums may round differently).
        torch.testing.assert_close(out, moe_experts(*args, config=cfg), rtol=0, atol=0)


# Matrix-vector decode path (kernels/moe_gemv.py) --------------------------------------------------------------
GEMV_CONFIGS = [dict(kernel="gemv", KB=2, ROWS_PER_THREAD=1, ROWS_PER_PROGRAM=48, num_warps=1),  # 16 rows a step
                dict(kernel="gemv", KB=4, ROWS_PER_THREAD=2, ROWS_PER_PROGRAM=16, num_warps=1)]  # K range > K


@pytest.mark.parametrize("num_tokens,num_experts,hidden,intermediate,first_expert,num_local,has_b2", [
    (1, 8, 64, 96, 0, 8, True),          # K = 64 and 96: one and several K ranges, the last one partial
    (1, 8, 96, 64, 2, 4, True),          # expert parallelism: the token may have no expert on this rank
    (2, 8, 64, 32, 0, 8, False),         # pairs one by one (a shared expert read twice), TP slice, no w2 bias
    (1, 16, 160, 64, 4, 8, True),        # rows not a multiple of a step's rows (160 and 128 of 16 or 32)
])
@pytest.mark.parametrize("config", GEMV_CONFIGS)
def test_moe_experts_gemv_matches_ref(num_tokens, num_experts, hidden, intermediate, first_expert, num_local,
                                      has_b2, config):
    args = make_moe(num_tokens, num_experts, hidden, intermediate, 4, first_expert, num_local, has_b2,
                    seed=60 + num_tokens + hidden)
    out = moe_experts(*args, config=config)
    ref = moe_experts_ref(*args)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < (1e-2 if DEVICE == "cuda" else 1e-3)


@pytest.mark.parametrize("swizzled", [False, True])
def test_moe_experts_gemv_reads_the_serving_layouts(swizzled):
    """Split nibbles, tiled rows, and the swizzled bits: the same as the checkpoint layout's result."""
    args = make_moe(1, 8, 64, 64, 4, 0, 8, True, seed=70)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    relay = serving_layout if swizzled else (lambda b, t: tile_rows(split_nibbles(b), t))
    config = GEMV_CONFIGS[0]
    out = moe_experts(x, w, ids, relay(w1b, 16), w1s, b1, relay(w2b, 16), w2s, b2, alpha, limit, first,
                      split_nibbles=True, swizzled=swizzled, fold_scales=True, tile_n=16, config=config)
    plain = moe_experts(*args, config=config)
    if DEVICE == "cpu":  # same products summed in the same order on every layout
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert rel_err(out, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


# Two-launch matrix-vector path (kernels/moe_gemv_fused.py) ---------------------------------------------------
def _fused_and_gemv(kb, rows_per_thread, w2_rows_per_thread, num_warps):
    fused = dict(kernel="gemv_fused", KB=kb, ROWS_PER_THREAD=rows_per_thread, W2_ROWS_PER_THREAD=w2_rows_per_thread,
                 num_warps=num_warps)
    return fused, dict(kernel="gemv", KB=kb, ROWS_PER_THREAD=rows_per_thread, ROWS_PER_PROGRAM=48,
                       num_warps=num_warps)


@pytest.mark.parametrize("num_tokens,num_experts,hidden,intermediate,first_expert,num_local,has_b2", [
    (1, 8, 64, 96, 0, 8, True),          # K = 64 and 96: one and several K ranges, the last one partial
    (1, 8, 96, 64, 2, 4, True),          # expert parallelism: some slots on other ranks
    (3, 8, 64, 32, 0, 8, False),         # pairs one by one (shared experts read twice), TP slice, no w2 bias
    (1, 16, 160, 64, 4, 8, True),        # rows not a multiple of a program's rows (160 of 16 or 32)
])
@pytest.mark.parametrize("tiles", [(2, 1, 1, 1), (4, 2, 1, 1), (2, 1, 2, 1)])
def test_moe_experts_gemv_fused_equals_the_four_launch_path(num_tokens, num_experts, hidden, intermediate,
                                                            first_expert, num_local, has_b2, tiles):
    """The epilogues inside the matrix-vector kernels add the same float32 sums in the same order."""
    args = make_moe(num_tokens, num_experts, hidden, intermediate, 4, first_expert, num_local, has_b2,
                    seed=160 + num_tokens + hidden)
    fused_config, gemv_config = _fused_and_gemv(*tiles)
    out = moe_experts(*args, config=fused_config)
    gemv = moe_experts(*args, config=gemv_config)
    if DEVICE == "cpu":
        torch.testing.assert_close(out, gemv, rtol=0, atol=0)
    assert rel_err(out, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


def test_moe_experts_gemv_fused_with_its_own_w2_tiles():
    args = make_moe(1, 8, 96, 64, 4, 0, 8, True, seed=78)
    fused_config, _ = _fused_and_gemv(2, 1, 1, 1)
    out = moe_experts(*args, config=dict(fused_config, W2_KB=4, W2_NUM_WARPS=2))  # w2: 16 rows a program, K 128
    assert rel_err(out, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


@pytest.mark.parametrize("swizzled", [False, True])
def test_moe_experts_gemv_fused_reads_the_serving_layouts(swizzled):
    args = make_moe(2, 8, 64, 64, 4, 0, 8, True, seed=71)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    relay = serving_layout if swizzled else (lambda b, t: tile_rows(split_nibbles(b), t))
    fused_config, _ = _fused_and_gemv(2, 1, 1, 1)
    out = moe_experts(x, w, ids, relay(w1b, 16), w1s, b1, relay(w2b, 16), w2s, b2, alpha, limit, first,
                      split_nibbles=True, swizzled=swizzled, fold_scales=True, tile_n=16, config=fused_config)
    if DEVICE == "cpu":
        torch.testing.assert_close(out, moe_experts(*args, config=fused_config), rtol=0, atol=0)
    assert rel_err(out, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


def test_gemv_fused_decode_switch_sends_the_gemv_steps_to_the_fused_kernels(monkeypatch):
    import gptoss_serve.kernels.moe_gemv_fused as fused
    import gptoss_serve.kernels.moe_matmul as mm

    calls = []
    real = fused.moe_experts_gemv_fused
    monkeypatch.setattr(fused, "moe_experts_gemv_fused", lambda *a, **k: calls.append(a[12]) or real(*a, **k))
    args = make_moe(1, 8, 64, 64, 4, 0, 8, True, seed=73)
    four_launches = moe_experts(*args)
    assert calls == []
    monkeypatch.setattr(mm, "GEMV_FUSED_DECODE", True)
    two_launches = moe_experts(*args)
    assert torch.equal(two_launches, four_launches) if DEVICE == "cpu" else rel_err(two_launches, four_launches) < 1e-3
    assert [c["kernel"] for c in calls] == ["gemv_fused"]
    moe_experts(*make_moe(9, 8, 64, 64, 4, 0, 8, True, seed=74))  # 9 tokens: not a matrix-vector step
    assert len(calls) == 1


def test_moe_experts_gemv_fused_no_local_slot_gives_zeros_and_bad_tiles_are_refused():
    args = make_moe(3, 16, 64, 64, 2, 0, 4, True, seed=72)
    args[11] = 100  # first_expert beyond every routed id
    fused_config, _ = _fused_and_gemv(2, 1, 1, 1)
    assert torch.count_nonzero(moe_experts(*args, config=fused_config)) == 0
    with pytest.raises(ValueError, match="rows a program"):
        moe_experts(*args, config=dict(fused_config, ROWS_PER_THREAD=3))
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    with pytest.raises(ValueError, match="must not cross a tile of 16 rows"):
        moe_experts(x, w, ids, tile_rows(w1b, 16), w1s, b1, tile_rows(w2b, 16), w2s, b2, alpha, limit, first,
                    tile_n=16, config=dict(fused_config, KB=1))


# GPU: the real shapes ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_experts", [32, 128])
@pytest.mark.parametrize("num_tokens", [1, 2, 4, 7, 8, 64, 512])
def test_moe_experts_real_shapes_gpu(num_experts, num_tokens):
    args = make_moe(num_tokens, num_experts, 2880, 2880, 4, 0, num_experts, True, seed=num_tokens, device="cuda")
    assert rel_err(moe_experts(*args), moe_experts_ref(*args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_experts_expert_and_tensor_parallel_slices_gpu():
    # 120b over 4 ranks by experts (rank 1), and 20b's intermediate dimension split in two (rank 1, no b2).
    args = make_moe(64, 128, 2880, 2880, 4, 32, 32, True, seed=7, device="cuda")
    assert rel_err(moe_experts(*args), moe_experts_ref(*args)) < 1e-2
    args = make_moe(64, 32, 2880, 1440, 4, 0, 32, False, seed=8, device="cuda")
    assert rel_err(moe_experts(*args), moe_experts_ref(*args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_tokens", [1, 2, 7])
def test_moe_experts_splitk_slices_gpu(num_tokens):
    # Decode sizes on the split-K path: 120b by experts (rank 1 of 4), 20b's intermediate split in two (no b2).
    args = make_moe(num_tokens, 128, 2880, 2880, 4, 32, 32, True, seed=30 + num_tokens, device="cuda")
    assert rel_err(moe_experts(*args), moe_experts_ref(*args)) < 1e-2
    args = make_moe(num_tokens, 32, 2880, 1440, 4, 0, 32, False, seed=40 + num_tokens, device="cuda")
    assert rel_err(moe_experts(*args), moe_experts_ref(*args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("swizzled", [False, True])
@pytest.mark.parametrize("shape", ["20b", "120b rank 1 of 4 by experts", "20b intermediate half"])
def test_moe_experts_gemv_real_shapes_gpu(swizzled, shape):
    from gptoss_serve.kernels.moe_gemv import DEFAULT_GEMV_CONFIG

    spec = {"20b": (32, 2880, 0, 32, True), "120b rank 1 of 4 by experts": (128, 2880, 32, 32, True),
            "20b intermediate half": (32, 1440, 0, 32, False)}[shape]
    num_experts, intermediate, first, num_local, has_b2 = spec
    args = make_moe(1, num_experts, 2880, intermediate, 4, first, num_local, has_b2, seed=80, device="cuda")
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    relay = serving_layout if swizzled else (lambda b, t: tile_rows(split_nibbles(b), t))
    out = moe_experts(x, w, ids, relay(w1b, 64), w1s, b1, relay(w2b, 64), w2s, b2, alpha, limit, first,
                      split_nibbles=True, swizzled=swizzled, fold_scales=True, tile_n=64,
                      config=dict(DEFAULT_GEMV_CONFIG, kernel="gemv"))
    assert rel_err(out, moe_experts_ref(*args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ["20b", "120b rank 1 of 4 by experts", "20b intermediate half"])
@pytest.mark.parametrize("num_tokens", [1, 2])
def test_moe_experts_gemv_fused_real_shapes_gpu(shape, num_tokens):
    from gptoss_serve.kernels.moe_gemv_fused import DEFAULT_GEMV_FUSED_CONFIG

    spec = {"20b": (32, 2880, 0, 32, True), "120b rank 1 of 4 by experts": (128, 2880, 32, 32, True),
            "20b intermediate half": (32, 1440, 0, 32, False)}[shape]
    num_experts, intermediate, first, num_local, has_b2 = spec
    args = make_moe(num_tokens, num_experts, 2880, intermediate, 4, first, num_local, has_b2, seed=81,
                    device="cuda")
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    served = [x, w, ids, tile_rows(split_nibbles(w1b), 64), w1s, b1, tile_rows(split_nibbles(w2b), 64), w2s, b2,
              alpha, limit, first]
    layout = dict(split_nibbles=True, fold_scales=True, tile_n=64)
    gemv = moe_experts(*served, config=dict(DEFAULT_GEMV_CONFIG, kernel="gemv"), **layout)
    for rows, w2_rows, unroll, stages, w2_kb, w2_warps in ((2, 1, 1, 1, None, None), (4, 2, 1, 1, None, None),
                                                          (2, 1, 6, 1, None, None), (2, 1, 1, 2, None, None),
                                                          (2, 1, 6, 1, 32, 2)):
        config = dict(DEFAULT_GEMV_FUSED_CONFIG, kernel="gemv_fused", ROWS_PER_THREAD=rows,
                      W2_ROWS_PER_THREAD=w2_rows, K_UNROLL=unroll, K_STAGES=stages, W2_KB=w2_kb,
                      W2_NUM_WARPS=w2_warps)
        out = moe_experts(*served, config=config, **layout)
        assert rel_err(out, moe_experts_ref(*args)) < 1e-2
        assert rel_err(out, gemv) < 1e-3  # the same products; only the order of a row's K ranges may differ


@pytest.mark.parametrize("swizzle", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 40])
def test_triton_backend_relays_out_experts_and_gives_checkpoint_bytes_back(swizzle, num_tokens):
    from gptoss_serve.kernels.triton_backend import TritonKernels

    args = make_moe(num_tokens, 8, 64, 64, 4, 0, 8, True, seed=23)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    ref = moe_experts_ref(*args)
    kernels = TritonKernels()
    kernels.SWIZZLE = swizzle
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    layer.mlp.mlp1_weight, layer.mlp.mlp2_weight = torch.nn.Module(), torch.nn.Module()
    w1, w2 = w1b.clone(), w2b.clone()
    layer.mlp.mlp1_weight.blocks, layer.mlp.mlp2_weight.blocks = w1, w2
    layer.mlp.mlp1_weight.scales, layer.mlp.mlp2_weight.scales = w1s, w2s
    model = torch.nn.Module()
    model.block = [layer]
    kernels.prepare_weights(model)
    kernels.prepare_weights(model)  # a second call leaves prepared weights alone
    assert kernels._layout(w1) == kernels._layout(w2) == 64 and not torch.equal(w1, w1b)
    assert all(torch.equal(kernels.checkpoint_blocks(w1, e), w1b[e]) for e in range(8))
    assert torch.equal(kernels.checkpoint_blocks(w2, 3), w2b[3])
    out = kernels.moe_experts(x, w, ids, w1, w1s, b1, w2, w2s, b2, alpha, limit, first)
    assert rel_err(out, ref) < (1e-2 if DEVICE == "cuda" else 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_experts", [32, 128])
@pytest.mark.parametrize("num_tokens", [1, 2, 8, 64, 512])
@pytest.mark.parametrize("fold", [True, False])
def test_serving_layout_real_shapes_gpu(num_experts, num_tokens, fold):
    # The swizzled, tiled layout TritonKernels.prepare_weights makes, folded and two-multiply dequantization.
    args = make_moe(num_tokens, num_experts, 2880, 2880, 4, 0, num_experts, True, seed=50 + num_tokens, device="cuda")
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    out = moe_experts(x, w, ids, serving_layout(w1b, 64), w1s, b1, serving_layout(w2b, 64), w2s, b2, alpha, limit,
                      first, split_nibbles=True, swizzled=True, fold_scales=fold, tile_n=64)
    assert rel_err(out, moe_experts_ref(*args)) < 1e-2



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_experts", [32, 128])
@pytest.mark.parametrize("num_tokens", [1, 2, 8, 64, 512, 4096])
def test_split_serving_layout_real_shapes_gpu(num_experts, num_tokens):
    # The layout TritonKernels.prepare_weights serves (split nibbles, rows tiled by 64, folded scales), through
    # every default path: the matrix-vector kernel, grouped decode tiles and the prefill tiles.
    args = make_moe(num_tokens, num_experts, 2880, 2880, 4, 0, num_experts, True, seed=70 + num_tokens, device="cuda")
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    assert int(w1s.max()) <= FOLD_MAX_SCALE and int(w2s.max()) <= FOLD_MAX_SCALE
    out = moe_experts(x, w, ids, tile_rows(split_nibbles(w1b), 64), w1s, b1, tile_rows(split_nibbles(w2b), 64), w2s,
                      b2, alpha, limit, first, split_nibbles=True, fold_scales=True, tile_n=64)
    assert rel_err(out, moe_experts_ref(*args)) < 1e-2


def test_decode_steps_take_the_gemv_where_their_pairs_meet_experts_of_their_own():
    assert takes_gemv(1, 4, 4) and takes_gemv(2, 4, 32) and not takes_gemv(4, 4, 32)  # 20b: 1 and 2 tokens
    assert takes_gemv(8, 4, 128) and not takes_gemv(16, 4, 128)  # 120b: up to 8 tokens
    assert takes_gemv(4, 4, 64) and not takes_gemv(8, 4, 64)  # 120b over 2 ranks by experts
    args = make_moe(2, 32, 64, 64, 4, 0, 32, True, seed=90)  # 2 tokens over 32 experts: the gemv by default
    out = moe_experts(*args)
    assert rel_err(out, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)
    torch.testing.assert_close(out, moe_experts(*args, config=dict(DEFAULT_GEMV_CONFIG, kernel="gemv")),
                               rtol=0, atol=0)


# The tensor-core decode kernel (Gluon: no interpreter runs it) ----------------------------------------------------
MMA_SHAPES = {  # experts, hidden, intermediate, first expert, local experts, b2, rows tile
    "20b": (32, 2880, 2880, 0, 32, True, 64),
    "120b rank 1 of 4 by experts": (128, 2880, 2880, 32, 32, True, 64),
    "20b intermediate half": (32, 2880, 1440, 0, 32, False, 64),
    "awkward": (8, 160, 96, 0, 8, True, 32),  # 5 and 3 K blocks, 160 rows: not whole 64-row programs
}


def _mma_case(shape: str, num_tokens: int, seed: int):
    num_experts, hidden, intermediate, first, num_local, has_b2, tile = MMA_SHAPES[shape]
    args = make_moe(num_tokens, num_experts, hidden, intermediate, 4, first, num_local, has_b2, seed=seed,
                    device="cuda")
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    served = [x, w, ids, tile_rows(split_nibbles(w1b), tile), w1s, b1, tile_rows(split_nibbles(w2b), tile), w2s, b2,
              alpha, limit, first]
    return args, served, dict(split_nibbles=True, fold_scales=True, tile_n=tile)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", list(MMA_SHAPES))
@pytest.mark.parametrize("num_tokens,block_t", [(1, None), (3, None), (3, 8), (40, 16), (64, 16), (64, 32)])
def test_moe_experts_mma_matches_twin_and_gemv_gpu(shape, num_tokens, block_t):
    from gptoss_serve.kernels.moe_mma import DEFAULT_MMA_CONFIG

    args, served, layout = _mma_case(shape, num_tokens, seed=100 + num_tokens)
    # ASYNC_GROUPS: the weights copied into shared memory first; EARLY_WEIGHTS: the second matmul's copies issued
    # before its PDL wait (PDL is on for these launches on Hopper)
    for m_tiles, rows, stage_once, prefetch, groups, early in (
            (1, 64, False, False, 0, False), (2, 256, False, False, 0, False), (1, 64, True, False, 0, False),
            (1, 64, True, True, 0, False), (2, 128, False, True, 0, False), (1, 64, True, False, 1, False),
            (1, 64, True, False, 4, False), (2, 128, False, False, 2, False), (1, 64, True, False, 2, True)):
        config = dict(DEFAULT_MMA_CONFIG, kernel="mma", BLOCK_T=block_t, M_TILES=m_tiles, ROWS_PER_PROGRAM=rows,
                      STAGE_ONCE=stage_once, PREFETCH=prefetch, ASYNC_GROUPS=groups, EARLY_WEIGHTS=early)
        out = moe_experts(*served, config=config, **layout)
        assert rel_err(out, moe_experts_ref(*args)) < 1e-2
        # f16 activations and tensor-core sums against the matrix-vector kernel's float32 FMAs: near-equal
        gemv = moe_experts(*served, config=dict(DEFAULT_GEMV_CONFIG, kernel="gemv"), **layout)
        assert rel_err(out, gemv) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_mma_checkpoint_rows_and_k_ranges_gpu():
    # Rows one after the other (no tiles) and K ranges of 1 or 7 blocks (K = 224) give the same sums.
    from gptoss_serve.kernels.moe_mma import DEFAULT_MMA_CONFIG

    args = make_moe(2, 8, 224, 64, 4, 0, 8, True, seed=5, device="cuda")
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    served = [x, w, ids, split_nibbles(w1b), w1s, b1, split_nibbles(w2b), w2s, b2, alpha, limit, first]
    ref = moe_experts_ref(*args)
    for kb_max, stage_once, prefetch, groups in ((1, False, False, 0), (16, False, False, 0), (16, True, True, 0),
                                                 (3, True, False, 0), (1, True, False, 1), (16, True, False, 2),
                                                 (16, False, False, 8)):
        config = dict(DEFAULT_MMA_CONFIG, kernel="mma", KB_MAX=kb_max, STAGE_ONCE=stage_once, PREFETCH=prefetch,
                      ASYNC_GROUPS=groups)
        assert rel_err(moe_experts(*served, config=config, split_nibbles=True), ref) < 1e-2


def test_moe_mma_refuses_cpu_tensors_and_other_layouts():
    from gptoss_serve.kernels.moe_mma import DEFAULT_MMA_CONFIG

    args = make_moe(1, 8, 64, 64, 4, 0, 8, True, seed=6, device="cpu")
    config = dict(DEFAULT_MMA_CONFIG, kernel="mma")
    with pytest.raises(ValueError, match="split-nibble layout"):
        moe_experts(*args, config=config)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    served = [x, w, ids, split_nibbles(w1b), w1s, b1, split_nibbles(w2b), w2s, b2, alpha, limit, first]
    with pytest.raises(ValueError, match="CUDA tensors only"):
        moe_experts(*served, config=config, split_nibbles=True)
    with pytest.raises(ValueError, match="ROWS_PER_PROGRAM must be 64"):
        moe_experts(*served, config=dict(config, PREFETCH=True, ROWS_PER_PROGRAM=128), split_nibbles=True)
    with pytest.raises(ValueError, match="ROWS_PER_PROGRAM must be 64"):
        moe_experts(*served, config=dict(config, ASYNC_GROUPS=1, ROWS_PER_PROGRAM=128), split_nibbles=True)
    with pytest.raises(ValueError, match="one at most"):
        moe_experts(*served, config=dict(config, ASYNC_GROUPS=1, PREFETCH=True), split_nibbles=True)
    with pytest.raises(ValueError, match="must divide the 2 K blocks"):  # K = 64: 2 blocks a program
        moe_experts(*served, config=dict(config, ASYNC_GROUPS=4), split_nibbles=True)
    from gptoss_serve.kernels.moe_mma import moe_mma_splitk

    with pytest.raises(ValueError, match="needs ASYNC_GROUPS"):
        moe_mma_splitk(x, served[3], w1s, 4, 4, dict(config, ASYNC_GROUPS=0), pair_blocks=(ids.reshape(-1), 0),
                       early_weights=True)


# The one-launch decode kernel (kernels/moe_mma_fused.py, Gluon: GPU only) ----------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", list(MMA_SHAPES))
def test_moe_experts_mma_fused_matches_twin_and_chain_gpu(shape):
    from gptoss_serve.kernels.moe_mma import DEFAULT_MMA_CONFIG

    for seed in range(200, 300):  # a token with pairs on this rank (and, by experts, on others too)
        args, served, layout = _mma_case(shape, 1, seed=seed)
        ids, first, num_local = args[2], args[-1], args[3].shape[0]
        here = (ids >= first) & (ids < first + num_local)
        if here.any() and (num_local == MMA_SHAPES[shape][0] or not here.all()):
            break
    twin = moe_experts_ref(*args)
    chain = moe_experts(*served, config=dict(DEFAULT_MMA_CONFIG, kernel="mma", BLOCK_T=None), **layout)
    # Q: K blocks a w1 stage (15: part of a slot and of the last stages empty; 1: one sub-block a stage); SLOTS: the
    # ring; 4, 8 or 16 warps (1, 2 or 4 sub-blocks at a time)
    tma = [(16, 6, 8, True), (4, 4, 16, True)] if layout["tile_n"] == 64 else []  # TMA: whole 64-row tiles
    for q, slots, warps, bulk in [(16, 6, 8, False), (15, 6, 4, False), (4, 4, 16, False), (1, 5, 4, False)] + tma:
        config = dict(kernel="mma_fused", Q=q, SLOTS=slots, num_warps=warps, TMA=bulk)
        out = moe_experts(*served, config=config, **layout)
        assert rel_err(out, twin) < 1e-2, (q, slots)
        # the chain rounds each pair's w2 row to bf16 (then again with the bias) before its weight, this kernel
        # sums in float32: a torch emulation of both orders differs by 2.6-3.5e-3 at these shapes (CPU, 3 seeds)
        assert rel_err(out, chain) < 6e-3, (q, slots)
        # the workspace and counter were zeroed (else about twice the output); the float32 atomics' order may
        # flip an element's last bf16 bit (~7e-5 each at 2880 rows)
        again = moe_experts(*served, config=config, **layout)
        assert rel_err(again, out) < 1e-3, (q, slots)
    with pytest.raises(ValueError, match="takes one token"):
        moe_experts(*_mma_case(shape, 3, seed=201)[1], config=dict(kernel="mma_fused"), **layout)
    if not tma:
        with pytest.raises(ValueError, match="TMA copies whole tiles of 64 rows"):
            moe_experts(*served, config=dict(kernel="mma_fused", TMA=True), **layout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_mma_fused_replays_in_a_cuda_graph_gpu():
    args, served, layout = _mma_case("20b", 1, seed=210)
    x = served[0]
    config = dict(kernel="mma_fused")
    eager = moe_experts(*served, config=config, **layout)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        moe_experts(*served, config=config, **layout)  # warm-up on the capture stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = moe_experts(*served, config=config, **layout)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, eager) < 1e-3  # the atomics' order: a last bit here and there
    x.copy_(torch.randn_like(x))  # new activations: a replay computes them
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, moe_experts_ref(*([x] + args[1:]))) < 1e-2


@pytest.mark.parametrize("num_warps,q_p2", [(4, 16), (8, 16), (16, 16), (8, 32), (4, 1), (8, 2)])
def test_one_launch_copies_cover_a_slot_once_and_read_whole_runs(num_warps, q_p2):
    # copy_layout: every 16 bytes of a slot [q_p2 * 64, 16] copied by one thread (a register, lane and warp each)
    # except by warps past the rows, which copy rows again; a warp's 32 rows of w1 are 32 consecutive rows of the
    # checkpoint (slot row r of a 64 holds row 2 (r % 32) + r // 32: gate rows, then linear rows)
    from gptoss_serve.kernels.moe_mma_fused import copy_layout

    layout = copy_layout(num_warps, q_p2)
    rows = q_p2 * 64
    reg, lane, warp = (list(map(tuple, b)) for b in (layout.reg_bases, layout.lane_bases, layout.warp_bases))
    assert reg[:4] == [(0, 1), (0, 2), (0, 4), (0, 8)]  # a row's 16 bytes in one thread's registers: one copy
    row_bases = [r for r, _ in reg[4:] + lane + warp if r]
    assert sorted(row_bases) == [1 << i for i in range(rows.bit_length() - 1)]  # each row exactly once
    assert all(r == 0 for r, _ in warp if r >= rows) and all(r < rows for r, _ in warp)

    def slot_row(lane_id, warp_id):  # the slot row a thread copies first (its registers' row bits zero)
        bits = [r for i, (r, _) in enumerate(lane) if lane_id >> i & 1]
        bits += [r for i, (r, _) in enumerate(warp) if warp_id >> i & 1]
        return sum(bits)

    for w in range(num_warps):
        slots = [slot_row(i, w) for i in range(32)]
        if rows < 64:  # fewer rows than a w1 unit: no coalescing to speak of
            continue
        checkpoint = sorted(64 * (r // 64) + 2 * (r % 32) + (r % 64) // 32 for r in slots)
        assert checkpoint == list(range(checkpoint[0], checkpoint[0] + 32)), (w, slots)


def test_moe_mma_fused_refuses_cpu_tensors_and_short_rings(monkeypatch):
    from gptoss_serve.kernels import moe_matmul, moe_mma_fused
    from gptoss_serve.kernels.moe_matmul import mma_fused_config as fused_config

    args = make_moe(1, 8, 64, 64, 4, 0, 8, True, seed=7, device="cpu")
    with pytest.raises(ValueError, match="split-nibble layout"):
        moe_experts(*args, config=dict(kernel="mma_fused"))
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    served = [x, w, ids, split_nibbles(w1b), w1s, b1, split_nibbles(w2b), w2s, b2, alpha, limit, first]
    with pytest.raises(ValueError, match="CUDA tensors only"):
        moe_experts(*served, config=dict(kernel="mma_fused"), split_nibbles=True)
    with pytest.raises(ValueError, match="SLOTS must be 4 or more"):
        moe_experts(*served, config=dict(kernel="mma_fused", SLOTS=3), split_nibbles=True)
    with pytest.raises(ValueError, match="G dividing Q"):
        moe_experts(*served, config=dict(kernel="mma_fused", Q=15, num_warps=8), split_nibbles=True)
    # TMA's views of the tiled weights: a w1 stage is one tile's Q K blocks, a w2 stage an expert's Q row tiles
    w1_tiled, w2_tiled = tile_rows(served[3], 64), torch.zeros(8, 128, 2, 16, dtype=torch.uint8)
    d1, d2 = moe_mma_fused._tma_descriptors(w1_tiled, w2_tiled, 16)
    assert d1.shape == [8 * 128 // 64, 2 * 4, 256] and d1.block_shape == [1, 64, 256]
    assert d2.shape == [8, 2, 2, 4, 256] and d2.block_shape == [1, 16, 1, 4, 256]
    assert d1.base.data_ptr() == w1_tiled.data_ptr() and list(d1.strides) == [8 * 256, 256, 1]
    monkeypatch.setattr(moe_matmul, "MMA_FUSED", True)
    assert fused_config(1, True, True, False)["kernel"] == "mma_fused"
    assert fused_config(2, True, True, False) is None  # one token only
    assert fused_config(1, False, True, False) is None and fused_config(1, True, True, True) is None
    assert fused_config(1, True, False, False) is None
    assert fused_config(1, True, True, False, tile_n=64) and fused_config(1, True, True, False, tile_n=96) is None
    monkeypatch.setattr(moe_matmul, "MMA_FUSED", False)
    assert fused_config(1, True, True, False) is None


# wgmma grouped path (kernels/moe_wgmma.py, Gluon: GPU only) -----------------------------------------------------
def test_f16_slot_order_carries_each_element_once_and_the_pairs_together():
    from gptoss_serve.kernels.moe_wgmma import to_f16_slots

    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(75)).to(torch.bfloat16).to(DEVICE)
    slots = to_f16_slots(x).cpu()
    assert slots.dtype == torch.float16
    s = torch.arange(96)
    element = (s & ~15) + (s & 1) + ((s >> 3) & 1) * 2 + ((s >> 1) & 3) * 4  # slot bits s3 s2 s1 s0 -> element
    assert sorted(element.tolist()) == list(range(96))  # a permutation within each 16
    assert torch.equal(element[0::2] + 1, element[1::2])  # slot pairs are element pairs: 4-byte copies
    torch.testing.assert_close(slots, x.cpu().float()[:, element].to(torch.float16), rtol=0, atol=0)


def test_f16_scale_range_is_exactly_where_scaled_fp4_values_stay_exact():
    """The wgmma kernel's dequantization in torch: nibble -> e4m3 bits (value * 2^-6) -> f16, times 2^(s - 121)
    in f16. F16_SCALE_RANGE must be the scale bytes where that gives value * 2^(s - 127) exactly, for all 16."""
    from gptoss_serve.kernels.moe_wgmma import F16_SCALE_RANGE

    nibbles = torch.arange(16, dtype=torch.uint8)
    values = (((nibbles & 7) << 2) | ((nibbles & 8) << 4)).view(torch.float8_e4m3fn).to(torch.float16)
    fp4 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
    exact = [s for s in range(121 - 24, 121 + 16)  # multipliers an f16 holds
             if torch.equal((values * torch.tensor(2.0 ** (s - 121)).to(torch.float16)).double(),
                            fp4 * 2.0 ** (s - 127))]
    assert (exact[0], exact[-1]) == F16_SCALE_RANGE and len(exact) == exact[-1] - exact[0] + 1


def test_moe_wgmma_refuses_cpu_tensors_other_layouts_and_wide_scales():
    from gptoss_serve.kernels.moe_wgmma import scales_fit_f16

    args = make_moe(2, 8, 64, 64, 4, 0, 8, True, seed=76, device="cpu")
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    config = dict(kernel="wgmma", BLOCK_T=16, KB_PER_STEP=1)
    with pytest.raises(ValueError, match="split-nibble layout"):
        moe_experts(*args, config=config)
    served = [x, w, ids, split_nibbles(w1b), w1s, b1, split_nibbles(w2b), w2s, b2, alpha, limit, first]
    with pytest.raises(ValueError, match="CUDA tensors only"):
        moe_experts(*served, config=config, split_nibbles=True)
    if DEVICE == "cuda":
        cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in served]
        with pytest.raises(ValueError, match="not 0"):  # STAGES - 2 steps ahead by default: none
            moe_experts(*cuda, config=dict(config, STAGES=2), split_nibbles=True)
        with pytest.raises(ValueError, match="not 8"):  # would overwrite the slot of the step being read
            moe_experts(*cuda, config=dict(config, STAGES=8, COPY_AHEAD=8), split_nibbles=True)
        with pytest.raises(ValueError, match="2 a step"):  # 2 K blocks a step (of 2), copies 1 ahead: too few
            moe_experts(*cuda, config=dict(config, STAGES=8, COPY_AHEAD=1, KB_PER_STEP=3), split_nibbles=True)
    assert scales_fit_f16(w1s) and not scales_fit_f16(torch.full((2, 3), 137, dtype=torch.uint8))


def test_wgmma_kernel_takes_steps_of_9_tokens_and_more_on_gpus_only(monkeypatch):
    import gptoss_serve.kernels.moe_matmul as mm

    scales = torch.full((2, 4, 3), 120, dtype=torch.uint8)
    gpu = dict(on_gpu=True, split_nibbles=True, swizzled=False, scales=(scales, scales))
    assert mm.wgmma_config(512, 4, 32, **gpu)["BLOCK_T"] == 64  # 20b, 64 pairs an expert
    assert mm.wgmma_config(4096, 4, 128, **gpu)["BLOCK_T"] == 128  # 120b, 128 pairs an expert
    assert mm.wgmma_config(4096, 4, 128, **gpu)["M_REPS"] == 2  # 128 weight rows a program
    assert mm.wgmma_config(4096, 4, 128, **gpu)["KB_PER_STEP"] == 3
    # each expert's last pairs past its whole row blocks in 16-pair tail blocks; none for decode steps
    assert mm.wgmma_config(4096, 4, 128, **gpu)["TAIL"]["BLOCK_T"] == 16
    assert mm.wgmma_config(4096, 4, 128, **gpu)["TAIL_PAIRS"] == mm.WGMMA_TAIL_PAIRS[128]
    for tokens, experts in ((512, 32), (64, 32), (5, 32), (512, 128)):  # 64-pair, 16-pair and 8-pair blocks
        assert "TAIL" not in mm.wgmma_config(tokens, 4, experts, **gpu)
    decode = mm.wgmma_config(64, 4, 32, **gpu)  # 20b, 8 pairs an expert: row blocks of 16
    assert (decode["BLOCK_T"], decode["M_REPS"], decode["STAGES"], decode["KB_PER_STEP"]) == (16, 1, 10, 5)
    assert (mm.WGMMA_SMALL_TILE["STAGES"], mm.WGMMA_SMALL_TILE["KB_PER_STEP"]) == (6, 3)  # tail blocks as timed
    assert mm.wgmma_config(8, 4, 32, **gpu)["KB_PER_STEP"] == 5  # 8-pair blocks: 5 K blocks a step, 20 stages
    assert mm.wgmma_config(5, 4, 32, **gpu)["M_REPS"] == 1  # 64 weight rows a program: more programs an SM
    assert mm.wgmma_config(512, 4, 128, **gpu)["BLOCK_T"] == 16  # 120b, 16 pairs an expert
    assert mm.wgmma_config(9, 4, 128, **gpu)["BLOCK_T"] == 8  # the first step past the tensor-core decode kernel
    few = mm.wgmma_config(64, 4, 128, **gpu)  # 120b, 2 pairs an expert: 8-pair blocks, scaled after the wgmma
    assert (few["BLOCK_T"], few["SCALE_AFTER"]) == (8, True) and not decode["SCALE_AFTER"]
    assert mm.wgmma_config(128, 4, 128, **gpu)["BLOCK_T"] == 16  # 120b, 4 pairs an expert
    assert mm.wgmma_config(8, 4, 128, **gpu)["BLOCK_T"] == 8  # 120b, 8 tokens: pairs apart, 8-pair blocks still
    assert mm.wgmma_config(7, 4, 128, **gpu) is None  # 120b, 7 tokens: pairs one by one on the mma.sync kernel
    assert mm.wgmma_config(4, 4, 32, **gpu) is None  # 20b, 4 tokens: likewise
    assert mm.wgmma_config(5, 4, 32, **gpu)["BLOCK_T"] == 8  # 20b, 5 tokens: pairs share experts, 8-pair blocks
    assert mm.wgmma_config(2048, 4, 32, **gpu)["BLOCK_T"] == 128  # 20b, 256 pairs an expert
    assert mm.wgmma_config(4096, 4, 32, **gpu)["BLOCK_T"] == 128  # 20b, 512 pairs an expert
    assert mm.wgmma_config(2048, 4, 32, **dict(gpu, on_gpu=False)) is None
    # one launch for both matmuls where a step hits few experts with few pairs each (timed faster there)
    assert all(mm.wgmma_config(tokens, 4, 32, **gpu)["CHAIN"] for tokens in (5, 8, 16, 32, 64))  # 20b
    assert mm.wgmma_config(8, 4, 128, **gpu)["CHAIN"]  # 120b 8 tokens: 32 pairs
    for tokens, experts in ((128, 32), (16, 128), (64, 128), (512, 128), (4096, 128), (512, 32)):
        assert not mm.wgmma_config(tokens, 4, experts, **gpu)["CHAIN"]
    monkeypatch.setattr(mm, "WGMMA_CHAIN", False)
    assert not mm.wgmma_config(8, 4, 32, **gpu)["CHAIN"]
    assert not mm.is_hopper(torch.device("cpu"))  # moe_experts asks is_hopper too: no wgmma before or after sm_90
    if DEVICE == "cuda":
        assert mm.is_hopper(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] == 9)
    wide = torch.full((2, 4, 3), 140, dtype=torch.uint8)  # beyond the f16 scaling's exact range
    assert mm.wgmma_config(2048, 4, 32, **dict(gpu, scales=(scales, wide))) is None
    monkeypatch.setattr(mm, "WGMMA_MOE", False)  # GPTOSS_WGMMA_MOE=0
    assert mm.wgmma_config(4096, 4, 128, **gpu) is None
    args = make_moe(20, 8, 64, 64, 4, 0, 8, True, seed=77)  # on the CPU the other paths run
    assert rel_err(moe_experts(*args), moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)


WGMMA_SHAPES = {  # experts, hidden, intermediate, first local expert, local experts, has b2, row tile
    "20b": (32, 2880, 2880, 0, 32, True, 64),
    "120b rank 1 of 4 by experts": (128, 2880, 2880, 32, 32, True, 64),
    "20b intermediate half, rows 160": (32, 160, 1440, 0, 32, False, 32)}


def wgmma_case(shape: str, num_tokens: int, seed: int, skewed: bool = False) -> tuple[list, list, dict]:
    """A WGMMA_SHAPES case on the GPU: make_moe's arguments (checkpoint layout), the same in the serving layout
    (split nibbles, rows tiled), and moe_experts' layout keywords for it."""
    num_experts, hidden, intermediate, first, num_local, has_b2, tile = WGMMA_SHAPES[shape]
    args = make_moe(num_tokens, num_experts, hidden, intermediate, 4, first, num_local, has_b2, seed=seed,
                    device="cuda", skewed=skewed)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    served = [x, w, ids, tile_rows(split_nibbles(w1b), tile), w1s, b1, tile_rows(split_nibbles(w2b), tile), w2s, b2,
              alpha, limit, first]
    return args, served, dict(split_nibbles=True, tile_n=tile)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", list(WGMMA_SHAPES))
@pytest.mark.parametrize("num_tokens", [8, 16, 64, 512, 4096])
def test_moe_experts_wgmma_matches_twin_and_grouped_path_gpu(shape, num_tokens):
    args, served, layout = wgmma_case(shape, num_tokens, seed=200 + num_tokens)
    ref = moe_experts_ref(*args) if num_tokens <= 512 else None  # the twin at 4096 tokens is slow
    grouped = moe_experts(*served, **layout)
    tail = dict(TAIL=WGMMA_SMALL_TILE)
    for block_t, m_reps, stages, pipelined, warps, per_step, extra in (
            (64, 1, 8, False, 4, 1, {}), (64, 1, 8, True, 4, 1, {}), (128, 2, 4, True, 4, 1, {}),
            (16, 1, 8, True, 4, 1, {}), (128, 1, 8, True, 8, 1, {}), (16, 2, 8, True, 4, 2, {}),
            (128, 2, 9, True, 4, 3, {}), (16, 2, 12, True, 4, 4, {}), (8, 2, 12, True, 4, 3, {}),
            (16, 1, 8, True, 4, 3, {}), (8, 1, 8, True, 4, 3, {}), (128, 2, 9, True, 4, 3, dict(tail, TAIL_PAIRS=16)),
            (64, 2, 9, True, 4, 3, dict(tail, TAIL_PAIRS=48)), (16, 1, 6, True, 4, 3, {}), (8, 1, 12, True, 4, 3, {}),
            (64, 2, 6, True, 4, 3, {}), (16, 1, 12, True, 4, 3, dict(COPY_AHEAD=3)), (16, 1, 8, True, 4, 2, {}),
            (8, 1, 12, True, 4, 3, dict(SCALE_AFTER=True)), (16, 1, 6, True, 4, 3, dict(SCALE_AFTER=True)),
            (16, 2, 8, True, 4, 2, dict(SCALE_AFTER=True)),
            (256, 1, 6, True, 4, 3, {}), (256, 1, 6, True, 8, 3, dict(tail, TAIL_PAIRS=32)),
            (128, 2, 9, True, 4, 3, dict(tail, TAIL_PAIRS=16, VECTOR_STORE=False)),
            (64, 2, 6, True, 4, 3, dict(VECTOR_STORE=False)), (16, 1, 6, True, 4, 3, dict(VECTOR_STORE=False)),
            (8, 1, 12, True, 4, 3, dict(SCALE_AFTER=True, VECTOR_STORE=False)),
            (8, 1, 20, True, 4, 5, dict(SCALE_AFTER=True)), (8, 1, 18, True, 4, 6, dict(SCALE_AFTER=True)),
            (8, 1, 27, True, 4, 9, dict(SCALE_AFTER=True)), (16, 1, 10, True, 4, 5, {}), (16, 1, 12, True, 4, 6, {})):
        # unpipelined first: the reference for the rings; 8 warps: two warpgroups; several K blocks a step (at most
        # 4: 3 of 90 or 45 blocks, 1 of 5; 5, 6 and 9, with 5 of 5 and of 45; stages rounded down to whole rings);
        # each expert's last 48 or 16 pairs in 16-pair tail blocks; copies a whole step ahead (of 3 rings of 4
        # slots) as well as all slots; each K block's product scaled after its wgmma (SCALE_AFTER); rows of 160 (w2
        # of the third shape): a partial tile; row blocks of 256 pairs (the largest wgmma N), on one warpgroup and
        # on two; the second matmul's rows stored straight from the accumulator's layout (VECTOR_STORE off) as well
        # as 16 bytes at a time
        config = dict(kernel="wgmma", BLOCK_T=block_t, M_REPS=m_reps, STAGES=stages, PIPELINED=pipelined,
                      num_warps=warps, KB_PER_STEP=per_step, **extra)
        out = moe_experts(*served, config=config, **layout)
        if ref is not None:
            assert rel_err(out, ref) < 1e-2, config
        assert rel_err(out, grouped) < 3e-3, config  # f16 operands against bf16 ones; both float32 sums


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", list(WGMMA_SHAPES))
@pytest.mark.parametrize("num_tokens", [5, 8, 16, 64, 512])
def test_wgmma_chain_equals_two_launches_gpu(monkeypatch, shape, num_tokens):
    """CHAIN: both matmuls in one launch, bitwise what the two launches give; on each decode tile and a prefill
    one, skewed routing at 64 tokens (some experts many pairs, some none), each call finding its row blocks'
    counters at zero and leaving them so. Where the two matmuls' K blocks a step differ (the third shape's 5 and
    45 K blocks at 3 a step) the two launches run instead."""
    import gptoss_serve.kernels.moe_wgmma as mw
    from gptoss_serve.kernels.triton_utils import arrival_counters, largest_divisor

    _, served, layout = wgmma_case(shape, num_tokens, seed=300 + num_tokens, skewed=num_tokens == 64)
    _, hidden, intermediate, *_ = WGMMA_SHAPES[shape]
    launched = []
    chain = mw.moe_wgmma_chain
    monkeypatch.setattr(mw, "moe_wgmma_chain", lambda *a, **k: launched.append(chain(*a, **k)) or launched[-1])
    tiles = (dict(BLOCK_T=8, STAGES=20, KB_PER_STEP=5, SCALE_AFTER=True), dict(BLOCK_T=16, STAGES=10, KB_PER_STEP=5),
             dict(BLOCK_T=64, M_REPS=2, STAGES=6, KB_PER_STEP=3))
    for tile_config in tiles:
        config = dict(kernel="wgmma", **tile_config)
        two = moe_experts(*served, config=config, **layout)
        one = moe_experts(*served, config=dict(config, CHAIN=True), **layout)
        per_step = tile_config["KB_PER_STEP"]
        same_rings = largest_divisor(hidden // 32, per_step) == largest_divisor(intermediate // 32, per_step)
        assert launched.pop() == same_rings, tile_config
        assert torch.equal(one, two), tile_config
        assert not arrival_counters("moe_wgmma_chain", 1, served[0].device).any()


def test_decode_steps_of_1_to_8_tokens_take_the_mma_kernel_on_a_gpu_only():
    from gptoss_serve.kernels.moe_matmul import mma_decode_config

    split = dict(on_gpu=True, split_nibbles=True, swizzled=False)
    assert mma_decode_config(4, 4, 32, **split)["BLOCK_T"] is None  # 20b, 4 tokens: pairs one by one
    assert mma_decode_config(8, 4, 32, **split)["BLOCK_T"] == 8  # 20b, 8 tokens: row blocks of 8 pairs
    assert mma_decode_config(8, 4, 128, **split)["BLOCK_T"] is None  # 120b, 8 tokens
    assert mma_decode_config(1, 4, 32, **split)["BLOCK_T"] is None  # 20b, 1 token
    assert mma_decode_config(1, 4, 32, **split)["STAGE_ONCE"]  # activations staged at once (timed, H200)
    assert mma_decode_config(0, 4, 32, **split) is None and mma_decode_config(9, 4, 32, **split) is None
    assert mma_decode_config(4, 4, 32, on_gpu=False, split_nibbles=True, swizzled=False) is None
    assert mma_decode_config(4, 4, 32, on_gpu=True, split_nibbles=True, swizzled=True) is None
    assert mma_decode_config(4, 4, 32, on_gpu=True, split_nibbles=False, swizzled=False) is None
    # On the CPU (the interpreter) a 4-token step keeps the other decode paths.
    args = make_moe(4, 8, 64, 64, 4, 0, 8, True, seed=91)
    x, w, ids, w1b, w1s, b1, w2b, w2s, b2, alpha, limit, first = args
    out = moe_experts(x, w, ids, split_nibbles(w1b), w1s, b1, split_nibbles(w2b), w2s, b2, alpha, limit, first,
                      split_nibbles=True)
    assert rel_err(out, moe_experts_ref(*args)) < (1e-2 if DEVICE == "cuda" else 1e-3)
