"""The MoE sub-block's front (residual add, RMSNorm, router logits, top-k, expert counts) against its torch twin:
on CPU under Triton's interpreter at awkward sizes, and at the real shapes on a GPU (marker gpu)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; the kernels re-read it at launch too

import torch.nn.functional as F  # noqa: E402

from gptoss_serve.kernels.moe_router import FUSED_MAX_TOKENS, norm_and_route  # noqa: E402
from gptoss_serve.kernels.moe_router_ref import norm_and_route_ref  # noqa: E402
from gptoss_serve.kernels.rmsnorm import rmsnorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(num_tokens, hidden, num_experts, dtype, seed, device=DEVICE):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
    residual = (4 * torch.randn(num_tokens, hidden, generator=gen, device=device)).to(dtype)
    scale = torch.rand(hidden, generator=gen, device=device) + 0.5
    gate_weight = (torch.randn(num_experts, hidden, generator=gen, device=device) / hidden ** 0.5).to(dtype)
    gate_bias = (0.1 * torch.randn(num_experts, generator=gen, device=device)).to(dtype)
    counted = (torch.rand(num_tokens, generator=gen, device=device) < 0.7).long()  # 0: a padding row
    return h, residual, scale, gate_weight, gate_bias, counted


def check_against_twin(out, ref, gate_weight, gate_bias, top_k):
    normed, residual_out, weights, ids = out
    ref_normed, ref_residual, ref_weights, ref_ids = ref
    assert torch.equal(residual_out, ref_residual)  # one rounded add, as the twin's
    torch.testing.assert_close(normed.float(), ref_normed.float(), rtol=1e-2 if normed.dtype == torch.bfloat16
                               else 1e-5, atol=1e-5)
    # The chosen experts: their twin logits equal the twin's top-k values (ties may pick another expert with the
    # same logit), best first; the weights are the softmax of those values.
    ref_logits = F.linear(ref_normed, gate_weight, gate_bias).float()
    top_values = ref_logits.topk(top_k, dim=-1).values
    chosen = ref_logits.gather(1, ids.long())
    if normed.dtype == torch.bfloat16:  # one bf16 step of the logits apart at most (the sums' order differs)
        torch.testing.assert_close(chosen, top_values, rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(chosen, top_values, rtol=1e-5, atol=1e-6)
        assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=2e-2, atol=1e-2)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()  # k distinct experts


@pytest.mark.parametrize("num_tokens,hidden,num_experts,top_k", [
    (1, 64, 8, 4),        # one token, one expert group
    (7, 200, 7, 3),       # hidden not a power of two, fewer experts than a group, an odd k
    (3, 2880, 32, 4),     # 20b's router
    (2, 2880, 128, 4),    # 120b's router (16 groups)
    (64, 96, 12, 1),      # the largest fused step, a group cut short, k = 1
    (129, 96, 12, 4),     # beyond FUSED_MAX_TOKENS: rmsnorm, a matmul, then top-k
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_route_matches_twin(num_tokens, hidden, num_experts, top_k, dtype):
    h, residual, scale, gate_weight, gate_bias, counted = make_inputs(num_tokens, hidden, num_experts, dtype, 0)
    counts = torch.arange(num_experts, device=DEVICE, dtype=torch.int64)  # counts add to what is there
    ref_counts = counts.clone()
    out = norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, top_k, counts, counted)
    ref = norm_and_route_ref(h, residual, scale, 1e-5, gate_weight, gate_bias, top_k, ref_counts, counted)
    check_against_twin(out, ref, gate_weight, gate_bias, top_k)
    # Counts follow the kernel's own choice (equal to the twin's whenever no two logits tie).
    expected = torch.arange(num_experts, device=DEVICE, dtype=torch.int64) + torch.bincount(
        out[3][counted.bool()].reshape(-1).long(), minlength=num_experts)
    assert torch.equal(counts, expected)
    assert counts.sum() - ref_counts.sum() == 0


def test_fused_norm_is_rmsnorm_bit_for_bit_and_both_paths_agree():
    h, residual, scale, gate_weight, gate_bias, _ = make_inputs(5, 2880, 32, torch.bfloat16, 1)
    fused = norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4)
    composed = norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4, max_fused_tokens=0)
    normed, residual_out = rmsnorm(h, scale, 1e-5, residual)
    assert torch.equal(fused[0], normed) and torch.equal(fused[1], residual_out)
    assert torch.equal(composed[0], normed) and torch.equal(composed[1], residual_out)
    assert torch.equal(fused[3], composed[3])
    torch.testing.assert_close(fused[2], composed[2], rtol=0, atol=1e-6)
    for experts_per_program in (1, 4, 16, 64):  # the group size changes nothing
        other = norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4,
                               experts_per_program=experts_per_program)
        assert all(torch.equal(a, b) for a, b in zip(other, fused))


def test_fused_max_tokens_picks_the_path(monkeypatch):
    import gptoss_serve.kernels.moe_router as mr

    h, residual, scale, gate_weight, gate_bias, _ = make_inputs(3, 64, 8, torch.float32, 3)
    launched = []
    real_rmsnorm = mr.rmsnorm
    monkeypatch.setattr(mr, "rmsnorm", lambda *a: (launched.append("rmsnorm"), real_rmsnorm(*a))[1])
    norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4)
    assert launched == []  # 3 <= FUSED_MAX_TOKENS: the fused kernel
    monkeypatch.setattr(mr, "FUSED_MAX_LOGITS", 3 * 8 - 1)  # 3 tokens x 8 experts: too many logits
    norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4)
    assert launched == ["rmsnorm"]  # the composed path
    monkeypatch.setattr(mr, "FUSED_MAX_LOGITS", 3 * 8)
    monkeypatch.setattr(mr, "FUSED_MAX_TOKENS", 2)  # GPTOSS_FUSED_ROUTER_MAX_TOKENS=2
    norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4)
    assert launched == ["rmsnorm"] * 2


def test_norm_and_route_no_tokens_and_bad_arguments():
    h, residual, scale, gate_weight, gate_bias, counted = make_inputs(3, 64, 8, torch.float32, 2)
    normed, residual_out, weights, ids = norm_and_route(h[:0], residual[:0], scale, 1e-5, gate_weight,
                                                        gate_bias, 4)
    assert normed.shape == (0, 64) and weights.shape == ids.shape == (0, 4)
    with pytest.raises(ValueError, match="int64"):
        norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4,
                       torch.zeros(8, dtype=torch.int32, device=DEVICE), counted)
    with pytest.raises(ValueError, match="int64"):
        norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4,
                       torch.zeros(8, dtype=torch.int64, device=DEVICE), None)
    with pytest.raises(ValueError, match="unit column stride"):
        norm_and_route(h, residual, scale, 1e-5, gate_weight.t().contiguous().t(), gate_bias, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_experts", [32, 128])
@pytest.mark.parametrize("num_tokens", [1, 8, FUSED_MAX_TOKENS, FUSED_MAX_TOKENS + 1])
def test_norm_and_route_real_shapes_gpu(num_experts, num_tokens):
    h, residual, scale, gate_weight, gate_bias, counted = make_inputs(num_tokens, 2880, num_experts,
                                                                      torch.bfloat16, num_tokens)
    counts, ref_counts = (torch.zeros(num_experts, dtype=torch.int64, device="cuda") for _ in range(2))
    out = norm_and_route(h, residual, scale, 1e-5, gate_weight, gate_bias, 4, counts, counted)
    ref = norm_and_route_ref(h, residual, scale, 1e-5, gate_weight, gate_bias, 4, ref_counts, counted)
    check_against_twin(out, ref, gate_weight, gate_bias, 4)
    assert torch.equal(counts, torch.bincount(out[3][counted.bool()].reshape(-1).long(), minlength=num_experts))
    # Captured in a CUDA graph and replayed on new inputs, as decode steps run it.
    static = [t.clone() for t in (h, residual)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = norm_and_route(static[0], static[1], scale, 1e-5, gate_weight, gate_bias, 4, counts, counted)
    h2, residual2 = make_inputs(num_tokens, 2880, num_experts, torch.bfloat16, 99)[:2]
    static[0].copy_(h2)
    static[1].copy_(residual2)
    counts.zero_()
    graph.replay()
    eager = norm_and_route(h2, residual2, scale, 1e-5, gate_weight, gate_bias, 4)
    assert all(torch.equal(a, b) for a, b in zip(captured, eager))
    assert torch.equal(counts, torch.bincount(eager[3][counted.bool()].reshape(-1).long(), minlength=num_experts))
