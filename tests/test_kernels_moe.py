"""Triton MoE kernels (routing, grouping, MXFP4 grouped matmuls) against their torch twins.

Without a GPU the kernels run in Triton's interpreter on small hidden sizes; the `gpu` tests repeat the
comparison at the real gpt-oss shapes on fresh random data.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; the kernels re-read it at launch too

from gptoss_serve.kernels.moe_matmul import moe_experts, split_nibbles  # noqa: E402
from gptoss_serve.kernels.moe_ref import moe_experts_ref, route_ref  # noqa: E402
from gptoss_serve.kernels.moe_routing import group_by_expert, max_row_blocks, route  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def distinct_logits(num_tokens: int, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """Router logits without ties (in bf16), so top-k has one right answer."""
    ranks = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(num_tokens)])
    return ((ranks.float() - num_experts / 2) / 16).to(torch.bfloat16)


def random_mxfp4(num_experts: int, rows: int, cols: int, gen: torch.Generator):
    blocks = torch.randint(0, 256, (num_experts, rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(116, 124, (num_experts, rows, cols // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


def make_moe(num_tokens, num_experts, hidden, intermediate, top_k, first_expert, num_local, has_b2, seed,
             device=DEVICE, skewed=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    logits = distinct_logits(num_tokens, num_experts, gen)
    if skewed:  # most tokens prefer the same few experts: some experts get many, others none
        logits[:, :3] += 8
    weights, ids = route_ref(logits, top_k)
    w1_blocks, w1_scales = random_mxfp4(num_local, 2 * intermediate, hidden, gen)
    w2_blocks, w2_scales = random_mxfp4(num_local, hidden, intermediate, gen)
    b1 = torch.randn(num_local, 2 * intermediate, generator=gen).to(torch.bfloat16)
    b2 = torch.randn(num_local, hidden, generator=gen).to(torch.bfloat16) if has_b2 else None
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


@pytest.mark.parametrize("num_tokens,num_experts,first_expert,num_local,block_m", [
    (1, 8, 0, 8, 16), (7, 32, 8, 16, 16), (129, 128, 0, 128, 64), (1000, 32, 5, 3, 128), (4, 4, 3, 1, 16)])
def test_group_by_expert_is_a_stable_blocked_sort(num_tokens, num_experts, first_expert, num_local, block_m):
    gen = torch.Generator().manual_seed(1)
    _, ids = route_ref(distinct_logits(num_tokens, num_experts, gen), min(4, num_experts))
    groups = group_by_expert(ids.to(DEVICE), first_expert, num_local, block_m)
    local = ids.reshape(-1).long() - first_expert
    is_local = (local >= 0) & (local < num_local)
    expected = [p for e in range(num_local) for p in torch.nonzero(local == e).flatten().tolist()]
    num_rows = int(is_local.sum())
    assert groups.sorted_pairs[:num_rows].cpu().tolist() == expected
    block_expert = groups.block_expert.cpu()
    starts, ends = groups.block_row_start.cpu(), groups.block_row_end.cpu()
    assert block_expert.numel() == max_row_blocks(ids.numel(), num_local, block_m)
    rows_seen = []
    for b in torch.nonzero(block_expert >= 0).flatten().tolist():
        assert 0 < ends[b] - starts[b] <= block_m
        rows = range(int(starts[b]), int(ends[b]))
        assert all(local[expected[r]] == block_expert[b] for r in rows)
        rows_seen.extend(rows)
    assert sorted(rows_seen) == list(range(num_rows))


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
    assert torch.equal(torch.cat((split & 15, split >> 4), dim=-1), in_order)
    out = moe_experts(x, w, ids, split_nibbles(w1b), w1s, b1, split_nibbles(w2b), w2s, b2, alpha, limit, first,
                      split_nibbles=True)
    torch.testing.assert_close(out, moe_experts(*args), rtol=0, atol=0)


# GPU: the real shapes ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_experts", [32, 128])
@pytest.mark.parametrize("num_tokens", [1, 64, 512])
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
