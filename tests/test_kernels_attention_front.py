"""The attention sub-block's front (residual add, RMSNorm, qkv projection, RoPE, k and v written to the paged cache)
against its torch twin: on CPU under Triton's interpreter at awkward sizes, and at gpt-oss-20b's shape on a GPU
(marker gpu)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; the kernels re-read it at launch too

from gptoss_serve.kernels.attention_front import norm_qkv_rope  # noqa: E402
from gptoss_serve.kernels.attention_front_ref import norm_qkv_rope_ref  # noqa: E402
from gptoss_serve.kernels.triton_utils import arrival_counters  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED_LIMIT = 64  # the fused kernel is off by default (slower than the composed path, see attention_front.py)


@pytest.fixture(autouse=True)
def fused_front_on(monkeypatch):
    """Steps of up to FUSED_LIMIT tokens take the fused kernel, as with GPTOSS_FUSED_ATTN_FRONT_MAX_TOKENS=64."""
    import gptoss_serve.kernels.attention_front as af

    monkeypatch.setattr(af, "FUSED_MAX_TOKENS", FUSED_LIMIT)
BLOCK_SIZE = 16  # cache slots a block


def make_inputs(num_tokens, hidden, num_q_heads, num_kv_heads, head_dim, dtype, seed, has_residual=True,
                device=DEVICE) -> dict:
    """norm_qkv_rope's arguments by name, fresh random data. The first tokens' cache slots run across the end of
    block 0 into block 1, the others are scattered over the later blocks, and every third token from the third is
    a padding row (slot -1, stores nothing); the caches hold random values, so a stray store shows."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=gen, device=device)).to(dtype)

    num_rows = (num_q_heads + 2 * num_kv_heads) * head_dim
    num_blocks = 3 + num_tokens // BLOCK_SIZE
    num_across = min(num_tokens, 6)
    scattered = 2 * BLOCK_SIZE + torch.randperm((num_blocks - 2) * BLOCK_SIZE, generator=gen, device=device)
    slots = torch.cat([torch.arange(BLOCK_SIZE - 3, BLOCK_SIZE - 3 + num_across, device=device),
                       scattered[:num_tokens - num_across]])  # [num_tokens] int64, distinct
    slots[2::3] = -1
    return dict(
        h=randn(num_tokens, hidden), residual=randn(num_tokens, hidden, std=4.0) if has_residual else None,
        norm_scale=torch.rand(hidden, generator=gen, device=device) + 0.5, eps=1e-5,
        qkv_weight=randn(num_rows, hidden, std=hidden ** -0.5), qkv_bias=randn(num_rows, std=0.1),
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        positions=torch.randint(0, 131072, (num_tokens,), generator=gen, device=device),
        inv_freq=150000.0 ** -(torch.arange(0, head_dim, 2, device=device) / head_dim), concentration=1.35,
        k_cache=randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim),
        v_cache=randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), slot_mapping=slots)


def tolerances(dtype) -> dict:
    """One bf16 step of a projection output moves a rotated value by up to ~0.02 at these magnitudes; the interpreter
    is one rounding apart from the twin at most, a GPU sums in another order (and takes its own sin and cos)."""
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    return dict(rtol=1.6e-2, atol=2e-2 if DEVICE == "cpu" else 6e-2)


def check_against_twin(inputs, **options) -> tuple:
    """Runs the kernel on `inputs` and the twin on copies of its caches; checks q, the residual stream and both
    caches (written slots against the twin's, the others untouched). Returns the kernel's (q, residual_out)."""
    original_k, original_v = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    ref_inputs = dict(inputs, k_cache=original_k.clone(), v_cache=original_v.clone())
    q, residual_out = norm_qkv_rope(**inputs, **options)
    ref_q, ref_residual = norm_qkv_rope_ref(**ref_inputs)
    tol = tolerances(q.dtype)
    assert q.shape == ref_q.shape and q.dtype == ref_q.dtype
    torch.testing.assert_close(q, ref_q, **tol)
    if inputs["residual"] is None:  # layer 0: the stream is h itself
        assert residual_out is inputs["h"]
    else:
        assert torch.equal(residual_out, ref_residual)  # one rounded add, as the twin's
    slots = inputs["slot_mapping"]
    written = torch.zeros(original_k.shape[:2], dtype=torch.bool, device=slots.device).view(-1)
    written[slots[slots >= 0]] = True
    written = written.view(original_k.shape[:2])  # [num_blocks, block_size]
    for cache, ref_cache, original in ((inputs["k_cache"], ref_inputs["k_cache"], original_k),
                                       (inputs["v_cache"], ref_inputs["v_cache"], original_v)):
        torch.testing.assert_close(cache[written], ref_cache[written], **tol)
        assert torch.equal(cache[~written], original[~written])
    return q, residual_out


@pytest.mark.parametrize("num_tokens,hidden,num_q_heads,num_kv_heads,head_dim,has_residual,max_fused_tokens", [
    (1, 96, 4, 2, 64, True, None),      # one token
    (7, 200, 4, 2, 64, True, None),     # hidden not a power of two (a chunk of K cut short)
    (5, 96, 4, 2, 64, False, None),     # layer 0: no residual
    (9, 160, 8, 1, 64, True, None),     # 20b's heads over 8 tensor-parallel ranks: 8 q heads, 1 kv head
    (3, 96, 2, 1, 96, True, None),      # three pair blocks a head
    (64, 96, 2, 1, 32, True, None),     # the largest fused step; one pair block a head
    (80, 96, 2, 1, 32, True, 100),      # a larger limit (GPTOSS_FUSED_ATTN_FRONT_MAX_TOKENS): two token blocks
    (6, 96, 2, 1, 40, True, None),      # half of head_dim not a multiple of ROWS: the composed path
    (FUSED_LIMIT + 1, 96, 2, 1, 64, True, None),  # beyond the limit: the composed path
])
def test_norm_qkv_rope_matches_twin(num_tokens, hidden, num_q_heads, num_kv_heads, head_dim, has_residual,
                                    max_fused_tokens):
    inputs = make_inputs(num_tokens, hidden, num_q_heads, num_kv_heads, head_dim, torch.bfloat16, num_tokens,
                         has_residual)
    check_against_twin(inputs, max_fused_tokens=max_fused_tokens)


@pytest.mark.parametrize("has_residual", [True, False])
def test_norm_qkv_rope_float32(has_residual):
    check_against_twin(make_inputs(7, 200, 2, 1, 64, torch.float32, 5, has_residual))


def test_norm_qkv_rope_real_hidden_one_token():
    check_against_twin(make_inputs(1, 2880, 2, 1, 64, torch.bfloat16, 11))  # 8 tiles x 8 splits of 6 chunks of K


def launched_splits(monkeypatch) -> list[int]:
    """The number of K splits (the grid's third side) of each fused launch from now on."""
    import gptoss_serve.kernels.attention_front as af

    splits = []
    real_launch = af.launch
    monkeypatch.setattr(af, "launch", lambda kernel, grid, *a, **kw: (splits.append(grid[2]),
                                                                       real_launch(kernel, grid, *a, **kw))[1])
    return splits


@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("num_tokens,has_residual", [(5, True), (2, False)])
def test_norm_qkv_rope_forced_splits(monkeypatch, num_splits, num_tokens, has_residual):
    """hidden 600 is 10 chunks of 64, 9 and a bit whole: 2 splits of 5 chunks, or 3 of 4, 4 and the short rest."""
    splits = launched_splits(monkeypatch)
    check_against_twin(make_inputs(num_tokens, 600, 4, 2, 64, torch.bfloat16, num_tokens, has_residual),
                       num_splits=num_splits)
    assert splits == [num_splits]


def test_norm_qkv_rope_splits_repeat(monkeypatch):
    """Two calls in a row on the split path, the second on new data: each finds its tile counters at zero (the
    last program of a tile resets it), and leaves them so."""
    splits = launched_splits(monkeypatch)
    for seed in (1, 2):
        check_against_twin(make_inputs(3, 600, 2, 1, 64, torch.bfloat16, seed), num_splits=3)
    assert splits == [3, 3]
    device = torch.empty(0, device=DEVICE).device  # with its index, as the kernel's tensors carry it
    assert not arrival_counters("attention_front", 1, device).any()


def test_pick_num_splits():
    from gptoss_serve.kernels.attention_front import pick_num_splits

    # 20b, 160 tiles, 45 chunks of K: 4 splits (640 programs) at 1 to 8 tokens, then fewer as the norm's re-reads
    # of the rows grow with the tokens
    assert [pick_num_splits(160, n, 45) for n in (1, 8, 16, 32, 64)] == [4, 4, 2, 1, 1]
    assert pick_num_splits(20, 1, 45) == 8  # 20b over 8 ranks: MAX_SPLITS
    assert pick_num_splits(20, 1, 10) == 2  # a short K: splits of at least MIN_CHUNKS_PER_SPLIT chunks


def test_fused_max_tokens_picks_the_path(monkeypatch):
    import gptoss_serve.kernels.attention_front as af

    inputs = make_inputs(3, 64, 2, 1, 32, torch.float32, 3)
    launched = []
    real_rmsnorm = af.rmsnorm
    monkeypatch.setattr(af, "rmsnorm", lambda *a: (launched.append("rmsnorm"), real_rmsnorm(*a))[1])
    norm_qkv_rope(**inputs)
    assert launched == []  # 3 <= FUSED_LIMIT: the fused kernel
    monkeypatch.setattr(af, "FUSED_MAX_TOKENS", 2)  # GPTOSS_FUSED_ATTN_FRONT_MAX_TOKENS=2
    norm_qkv_rope(**inputs)
    assert launched == ["rmsnorm"]  # the composed path
    norm_qkv_rope(**make_inputs(1, 64, 2, 1, 40, torch.float32, 3))
    assert launched == ["rmsnorm"] * 2  # head_dim 40 never fuses


def test_norm_qkv_rope_no_tokens_and_bad_arguments():
    inputs = make_inputs(3, 64, 2, 1, 32, torch.float32, 2)
    k_before = inputs["k_cache"].clone()
    empty = dict(inputs, h=inputs["h"][:0], residual=inputs["residual"][:0], positions=inputs["positions"][:0],
                 slot_mapping=inputs["slot_mapping"][:0])
    q, residual_out = norm_qkv_rope(**empty)
    assert q.shape == (0, 2, 32) and residual_out.shape == (0, 64)
    assert torch.equal(inputs["k_cache"], k_before)
    with pytest.raises(ValueError, match="unit column stride"):
        norm_qkv_rope(**dict(inputs, qkv_weight=inputs["qkv_weight"].t().contiguous().t()))
    with pytest.raises(ValueError, match="one layout"):
        norm_qkv_rope(**dict(inputs, v_cache=inputs["v_cache"].repeat(1, 1, 1, 2)[..., :32]))  # rows 64 apart


def test_model_fused_front_matches_torch_backend(monkeypatch):
    """The tiny model with 32-wide heads (so that its attention front fuses): one prefill step, then a decode step
    with a padding row, on both backends."""
    import gptoss_serve.kernels.attention_front as af
    from gptoss_serve.kernels.backend import get_kernels
    from gptoss_serve.model.batch import KVCache, build_forward_batch
    from gptoss_serve.model.config import preset
    from gptoss_serve.model.loader import random_model

    launches = []
    real_launch = af.launch
    monkeypatch.setattr(af, "launch", lambda kernel, *a, **kw: (launches.append(kernel), real_launch(kernel, *a, **kw)))
    config = dataclasses.replace(preset("tiny"), head_dim=32)
    outputs = {}
    for name in ("torch", "triton"):
        model = random_model(config, seed=0, device=DEVICE, kernels=get_kernels(name))
        cache = KVCache.allocate(config, num_blocks=8, block_size=8, dtype=torch.bfloat16, device=DEVICE)
        prefill = build_forward_batch([[5, 6, 7, 8, 9], [10, 11]], [0, 0], [[0, 1], [2, 3]], 8).to(DEVICE)
        decode = build_forward_batch([[12], [13]], [5, 2], [[0, 1], [2, 3]], 8).to(DEVICE)
        decode.slot_mapping[-1] = -1  # a CUDA-graph padding row: computed, stores nothing
        outputs[name] = (model(prefill, cache), model(decode, cache), torch.stack(cache.k), torch.stack(cache.v))
    assert len(launches) == 2 * config.num_hidden_layers  # the fused kernel ran in every layer of both steps
    # Equal on the interpreter (when written); on a GPU two layers of differently ordered sums part by a few bf16
    # steps.
    tol = tolerances(torch.bfloat16) if DEVICE == "cpu" else dict(rtol=5e-2, atol=1e-1)
    for got, want in zip(outputs["triton"], outputs["torch"]):  # hidden states of both steps, k and v caches
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(64, 8), (8, 1)])  # 20b whole, and over 8 ranks
@pytest.mark.parametrize("num_tokens", [1, 8, 16, FUSED_LIMIT, FUSED_LIMIT + 1])  # 20b: 4, 4, 2, 1 splits of K
def test_norm_qkv_rope_real_shapes_gpu(num_q_heads, num_kv_heads, num_tokens):
    from gptoss_serve.model.config import preset
    from gptoss_serve.model.rope import yarn_inv_freq_and_concentration

    inv_freq, concentration = yarn_inv_freq_and_concentration(preset("gpt-oss-20b"))
    inputs = make_inputs(num_tokens, 2880, num_q_heads, num_kv_heads, 64, torch.bfloat16, num_tokens)
    inputs.update(inv_freq=inv_freq.cuda(), concentration=concentration)
    check_against_twin(inputs)
    # Captured in a CUDA graph and replayed on new inputs, as decode steps run it.
    static = {name: inputs[name].clone() for name in ("h", "residual", "positions", "slot_mapping")}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = norm_qkv_rope(**dict(inputs, **static))
    fresh = make_inputs(num_tokens, 2880, num_q_heads, num_kv_heads, 64, torch.bfloat16, 99)
    for name, tensor in static.items():
        tensor.copy_(fresh[name])
    graph.replay()
    k_replayed, v_replayed = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    eager = norm_qkv_rope(**dict(inputs, **{name: fresh[name] for name in static}))
    assert all(torch.equal(a, b) for a, b in zip(captured, eager))
    assert torch.equal(inputs["k_cache"], k_replayed) and torch.equal(inputs["v_cache"], v_replayed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_splits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_norm_qkv_rope_splits_gpu(num_splits, num_tokens):
    """At 20b's shape every split count matches the twin, and twice on the same data gives the same bits: the
    partials are summed in split order, whichever program arrives last."""
    inputs = make_inputs(num_tokens, 2880, 64, 8, 64, torch.bfloat16, num_tokens)
    first = check_against_twin(inputs, num_splits=num_splits)
    caches = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    again = norm_qkv_rope(**inputs, num_splits=num_splits)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(inputs["k_cache"], caches[0]) and torch.equal(inputs["v_cache"], caches[1])
