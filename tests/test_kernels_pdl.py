"""Programmatic dependent launch (kernels/triton_utils.PDL): the decode chains' kernels start while the kernel
before them still runs and wait for it inside. Their results must be those of serialized launches, bitwise. A
kernel that read what the kernel before it writes ahead of its wait would show here: each CUDA graph below first
copies fresh inputs (routing, activations, queries) into the buffers its kernels read, and the replays alternate
between two sets of inputs, so a stale read gives the other set's answer.

GPU only (griddepcontrol needs Hopper or later); without PDL (CPU, the interpreter) the kernels take PDL=False.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, as the other kernel tests set it

from gptoss_serve.kernels import triton_utils  # noqa: E402
from gptoss_serve.kernels.attention_decode import paged_attention_decode  # noqa: E402
from gptoss_serve.kernels.moe_matmul import moe_experts  # noqa: E402
from gptoss_serve.kernels.weight_layout import split_nibbles, tile_rows  # noqa: E402
from gptoss_serve.kernels.rope import rope_and_cache_write  # noqa: E402

needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                  reason="needs a Hopper (or later) GPU")

REPLAYS = 8


def replay_alternating(run, inputs: list[tuple[torch.Tensor, ...]], buffers: tuple[torch.Tensor, ...]) -> list:
    """run() captured in a CUDA graph after copies of an input set into `buffers` (inside the graph, so the first
    kernel of run() follows a write of what it reads); replayed REPLAYS times, the sets taken in turn; the
    outputs of each replay."""
    sources = tuple(torch.empty_like(b) for b in buffers)

    def step():
        for buffer, source in zip(buffers, sources):
            buffer.copy_(source)
        return run()

    for buffer, value in zip(sources, inputs[0]):
        buffer.copy_(value)
    step()  # compiles, and reads what is read once before capture (the wgmma path's scale range)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    outs = []
    for i in range(REPLAYS):
        for buffer, value in zip(sources, inputs[i % len(inputs)]):
            buffer.copy_(value)
        graph.replay()
        outs.append(out.clone())
    torch.cuda.synchronize()
    return outs


def serialized(monkeypatch, run, inputs, buffers) -> list:
    """run() eagerly with PDL off, once for each input set."""
    monkeypatch.setattr(triton_utils, "PDL", False)
    outs = []
    for values in inputs:
        for buffer, value in zip(buffers, values):
            buffer.copy_(value)
        outs.append(run().clone())
    monkeypatch.setattr(triton_utils, "PDL", True)
    return outs


HIDDEN = INTERMEDIATE = 2880  # gpt-oss's MoE shapes


def moe_weights(num_experts: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random MXFP4 experts in the serving layout (split nibbles, 64-row tiles): w1, s1, w2, s2, b1, b2."""
    def mxfp4(rows, cols):
        blocks = torch.randint(0, 256, (num_experts, rows, cols // 32, 16), dtype=torch.uint8, generator=gen,
                               device="cuda")
        scales = torch.randint(116, 124, (num_experts, rows, cols // 32), dtype=torch.uint8, generator=gen,
                               device="cuda")
        return tile_rows(split_nibbles(blocks), 64), scales

    w1, s1 = mxfp4(2 * INTERMEDIATE, HIDDEN)
    w2, s2 = mxfp4(HIDDEN, INTERMEDIATE)
    b1 = torch.randn(num_experts, 2 * INTERMEDIATE, generator=gen, device="cuda").to(torch.bfloat16)
    b2 = torch.randn(num_experts, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
    return w1, s1, w2, s2, b1, b2


def moe_routing(num_experts: int, num_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A step's tokens and their routing: x [num_tokens, HIDDEN] bf16, weights [num_tokens, 4], ids int32."""
    ids = torch.rand(num_tokens, num_experts, generator=gen, device="cuda").argsort(dim=1)[:, :4].int()
    weights = torch.rand(num_tokens, 4, generator=gen, device="cuda").softmax(dim=1)
    x = torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda").to(torch.bfloat16)
    return x, weights, ids


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("num_experts,num_tokens", [(32, 1), (32, 4), (32, 8), (32, 64), (128, 8), (128, 64),
                                                    (128, 512), (32, 2048)])
def test_moe_layer_with_pdl_equals_serialized_launches(monkeypatch, num_experts, num_tokens):
    # Every decode path (tensor-core decode kernel, wgmma 8- and 16-pair blocks) and a prefill one (tail blocks).
    gen = torch.Generator(device="cuda").manual_seed(num_experts * 10 + num_tokens)
    w1, s1, w2, s2, b1, b2 = moe_weights(num_experts, gen)
    inputs = [moe_routing(num_experts, num_tokens, gen), moe_routing(num_experts, num_tokens, gen)]
    buffers = tuple(torch.empty_like(t) for t in inputs[0])

    def run():
        x, weights, ids = buffers
        return moe_experts(x, weights, ids, w1, s1, b1, w2, s2, b2, 1.702, 7.0, 0, split_nibbles=True,
                           fold_scales=True, tile_n=64)

    expected = serialized(monkeypatch, run, inputs, buffers)
    assert not torch.equal(expected[0], expected[1])
    for i, out in enumerate(replay_alternating(run, inputs, buffers)):
        assert torch.equal(out, expected[i % 2]), f"replay {i} differs from the serialized launches"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("num_experts,num_tokens", [(32, 8), (32, 64), (128, 64)])
def test_chained_moe_in_a_graph_equals_two_serialized_launches(monkeypatch, num_experts, num_tokens):
    """The wgmma kernel's chained launch (CHAIN: both matmuls, the second's programs waiting on counters the
    first's fill) in a CUDA graph with PDL, replayed on alternating inputs: bitwise the two launches, serialized."""
    gen = torch.Generator(device="cuda").manual_seed(num_experts + num_tokens)
    w1, s1, w2, s2, b1, b2 = moe_weights(num_experts, gen)
    inputs = [moe_routing(num_experts, num_tokens, gen), moe_routing(num_experts, num_tokens, gen)]
    buffers = tuple(torch.empty_like(t) for t in inputs[0])
    tile = dict(kernel="wgmma", BLOCK_T=16, STAGES=10, KB_PER_STEP=5) if num_tokens > 8 else \
        dict(kernel="wgmma", BLOCK_T=8, STAGES=20, KB_PER_STEP=5, SCALE_AFTER=True)

    def run(chain):
        x, weights, ids = buffers
        return moe_experts(x, weights, ids, w1, s1, b1, w2, s2, b2, 1.702, 7.0, 0, split_nibbles=True,
                           tile_n=64, config=dict(tile, CHAIN=chain))

    expected = serialized(monkeypatch, lambda: run(False), inputs, buffers)
    for i, out in enumerate(replay_alternating(lambda: run(True), inputs, buffers)):
        assert torch.equal(out, expected[i % 2]), f"replay {i} differs from the two serialized launches"


BLOCK_SIZE, KV_HEADS, Q_HEADS, HEAD_DIM = 16, 8, 64, 64  # gpt-oss's attention heads, 16-slot cache blocks


def paged_cache(num_seqs: int, context: int, gen: torch.Generator):
    """Random K and V caches with room for each sequence's context, its blocks in shuffled places; sinks."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    k_cache = torch.randn(num_seqs * blocks_per_seq, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen,
                          device="cuda").to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_seqs * blocks_per_seq, generator=gen, device="cuda").int().view(num_seqs, -1)
    return k_cache, v_cache, tables, torch.randn(Q_HEADS, generator=gen, device="cuda")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("num_seqs,context", [(1, 32768), (32, 1024), (4, 5000)])
@pytest.mark.parametrize("fused_merge", [False, True])  # slices merged by a kernel, or by the last slice
@pytest.mark.parametrize("early_meta", [0, 1])  # lengths and first pages read before the wait, or after
def test_decode_attention_with_pdl_equals_serialized_launches(monkeypatch, num_seqs, context, fused_merge,
                                                              early_meta):
    gen = torch.Generator(device="cuda").manual_seed(num_seqs + context)
    k_cache, v_cache, tables, sinks = paged_cache(num_seqs, context, gen)

    def queries():
        lens = torch.randint(context // 2, context + 1, (num_seqs,), generator=gen, device="cuda").int()
        q = torch.randn(num_seqs, Q_HEADS, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16)
        return lens, q  # copied in this order: the lengths two launches before the attention, as the engine's are

    inputs = [queries(), queries()]
    buffers = tuple(torch.empty_like(t) for t in inputs[0])

    def run():
        lens, q = buffers
        return paged_attention_decode(q, k_cache, v_cache, tables, lens, sinks, HEAD_DIM ** -0.5,
                                      fused_merge=fused_merge, tiles=dict(EARLY_META=early_meta))

    expected = serialized(monkeypatch, run, inputs, buffers)
    for i, out in enumerate(replay_alternating(run, inputs, buffers)):
        assert torch.equal(out, expected[i % 2]), f"replay {i} differs from the serialized launches"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("num_seqs,context", [(1, 32768), (32, 1024)])
@pytest.mark.parametrize("early_meta", [0, 1])
def test_cache_write_then_decode_attention_with_pdl_equals_serialized_launches(monkeypatch, num_seqs, context,
                                                                               early_meta):
    """As the model runs them: the RoPE kernel writes q and the new token's K and V rows, then decode attention
    reads them. The new rows alternate between two sets: a read of the cache ahead of the wait would show."""
    gen = torch.Generator(device="cuda").manual_seed(num_seqs * 7 + context)
    k_cache, v_cache, tables, sinks = paged_cache(num_seqs, context, gen)
    lens = torch.randint(context // 2, context + 1, (num_seqs,), generator=gen, device="cuda").int()
    positions = (lens - 1).long()  # [num_seqs]
    slots = tables.gather(1, (positions // BLOCK_SIZE)[:, None])[:, 0].long() * BLOCK_SIZE + positions % BLOCK_SIZE
    inv_freq = 1.0 / 150000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)

    def new_rows():
        return tuple(torch.randn(num_seqs, heads, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16)
                     for heads in (Q_HEADS, KV_HEADS, KV_HEADS))

    inputs = [new_rows(), new_rows()]
    buffers = tuple(torch.empty_like(t) for t in inputs[0])

    def run():
        q, k, v = buffers
        q_rotated, _ = rope_and_cache_write(q, k, v, positions, inv_freq, 1.0, k_cache, v_cache, slots)
        return paged_attention_decode(q_rotated, k_cache, v_cache, tables, lens, sinks, HEAD_DIM ** -0.5,
                                      tiles=dict(EARLY_META=early_meta))

    expected = serialized(monkeypatch, run, inputs, buffers)
    for i, out in enumerate(replay_alternating(run, inputs, buffers)):
        assert torch.equal(out, expected[i % 2]), f"replay {i} differs from the serialized launches"


def test_pdl_launch_arguments_follow_the_switch_and_the_device(monkeypatch):
    monkeypatch.setattr(triton_utils, "PDL", True)
    assert triton_utils.pdl_args(torch.device("cpu")) == dict(PDL=False)
    if torch.cuda.is_available() and not triton_utils.interpreting():
        hopper = torch.cuda.get_device_capability()[0] >= 9
        assert triton_utils.pdl_args(torch.device("cuda")) == (dict(PDL=True, launch_pdl=True) if hopper
                                                               else dict(PDL=False))
    monkeypatch.setattr(triton_utils, "PDL", False)
    assert triton_utils.pdl_args(torch.device("cpu")) == dict(PDL=False)
    if torch.cuda.is_available():
        assert triton_utils.pdl_args(torch.device("cuda")) == dict(PDL=False)
