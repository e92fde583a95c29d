"""Triton paged attention (decode split-K and prefill/chunked prefill) against the torch twin.

Awkward cases: contexts that cross cache blocks, contexts at a sliding window's edges, chunks attending to a
cached prefix, GQA groups, sinks, and blocks outside the window poisoned with NaN (they must never be read).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; the kernels re-read it at launch too

from gptoss_serve.kernels.attention_decode import MAX_SPLITS, decode_plan, paged_attention_decode  # noqa: E402
from gptoss_serve.kernels.attention_ref import paged_attention_ref  # noqa: E402
from gptoss_serve.kernels.triton_backend import paged_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, sliding_window, seed,
               device=DEVICE):
    """Random q, caches and block tables (blocks shuffled, spare table entries pointing at a NaN block); blocks
    wholly before each sequence's sliding window are NaN too, as if freed and reused."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(q_lens)
    blocks_per_seq = [(c + block_size - 1) // block_size for c in context_lens]
    table_width = max(blocks_per_seq) + 2
    num_blocks = sum(blocks_per_seq) + 1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    nan_block = num_blocks - 1
    k_cache[nan_block] = float("nan")
    v_cache[nan_block] = float("nan")
    order = torch.randperm(num_blocks - 1, generator=gen).tolist()
    table = torch.full((num_seqs, table_width), nan_block, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
        if sliding_window:
            first_needed = max(0, context_lens[b] - q_lens[b] - sliding_window + 1) // block_size
            for blk in table[b, :first_needed].tolist():
                k_cache[blk] = float("nan")
                v_cache[blk] = float("nan")
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_q_heads, head_dim, generator=gen).to(torch.bfloat16)
    sinks = torch.randn(num_q_heads, generator=gen) * 2
    args = (q, k_cache, v_cache, table, cu, torch.tensor(context_lens, dtype=torch.int32), sinks)
    return tuple(a.to(device) for a in args) + (head_dim ** -0.5, sliding_window)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(args, out=None):
    ref = paged_attention_ref(*args)
    out = paged_attention(*args) if out is None else out
    assert not torch.isnan(out).any()
    # The interpreter keeps probabilities in float32; the GPU rounds them to bf16 for the P @ V product.
    assert rel_err(out, ref) < (2e-2 if DEVICE == "cuda" else 1e-3)


@pytest.mark.parametrize("window", [0, 128, 5])
def test_decode_at_window_edges_and_block_boundaries(window):
    contexts = [127, 128, 129, 1, 16, 17, 300]
    check(make_batch([1] * len(contexts), contexts, 8, 2, 64, 16, window, seed=window))


# 3, 5 and 130: the merge masks its power-of-two range; 130: more slices than the plan's 64 (a wider merge on a GPU)
@pytest.mark.parametrize("num_splits", [2, 3, 4, 5, 8, 130])
def test_decode_split_k_merges_with_the_sink(num_splits):
    args = make_batch([1, 1, 1], [1, 200, 517], 4, 1, 32, 16, 0, seed=num_splits)
    q, k_cache, v_cache, table, _, context_lens, sinks, sm_scale, window = args
    check(args, paged_attention_decode(q, k_cache, v_cache, table, context_lens, sinks, sm_scale, window,
                                       num_splits=num_splits))


@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_decode_merge_in_the_last_slice_equals_the_merge_kernel(num_splits):
    """FUSED_MERGE: the last slice of a (sequence, KV head) to finish merges its group's slices: the merge kernel's
    arithmetic (its bits at two slices, where each sum is one addition; near them with more), empty slices and a
    sliding window too; the counters left at zero."""
    from gptoss_serve.kernels.triton_utils import arrival_counters

    for window in (0, 128):
        args = make_batch([1] * 3, [1, 200, 517], 8, 2, 64, 16, window, seed=num_splits + window)
        q, k_cache, v_cache, table, _, context_lens, sinks, sm_scale, window = args
        outs = [paged_attention_decode(q, k_cache, v_cache, table, context_lens, sinks, sm_scale, window,
                                       num_splits=num_splits, fused_merge=fused) for fused in (False, True)]
        assert torch.equal(outs[0], outs[1]) if num_splits == 2 else rel_err(outs[0], outs[1]) < 1e-6
        check(args, outs[1])
        assert not arrival_counters("attention_decode", 1, q.device).any()


@pytest.mark.parametrize("splits,block_n", [(1, 128), (2, 128), (4, 32)])
def test_decode_tiles_of_the_plan_give_the_same_result(splits, block_n):
    """The tiles decode_plan picks besides the default 64-key blocks, with slices cut at awkward places."""
    args = make_batch([1] * 4, [1, 129, 300, 517], 8, 2, 64, 16, 0, seed=block_n + splits)
    q, k_cache, v_cache, table, _, context_lens, sinks, sm_scale, window = args
    check(args, paged_attention_decode(q, k_cache, v_cache, table, context_lens, sinks, sm_scale, window,
                                       num_splits=splits, tiles=dict(BLOCK_N=block_n, num_warps=4, num_stages=2)))


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_lengths_and_first_pages_before_the_wait_give_the_same_bits(splits):
    """EARLY_META: the lengths and each slice's first pages loaded before the PDL wait, the first block's pages from
    those; empty slices, a sliding window and a slice of one key too."""
    for window in (0, 128):
        args = make_batch([1] * 4, [1, 129, 300, 517], 8, 2, 64, 16, window, seed=splits + window)
        q, k_cache, v_cache, table, _, context_lens, sinks, sm_scale, window = args
        outs = [paged_attention_decode(q, k_cache, v_cache, table, context_lens, sinks, sm_scale, window,
                                       num_splits=splits, tiles=dict(EARLY_META=early)) for early in (0, 1)]
        assert torch.equal(outs[0], outs[1])
        check(args, outs[1])


def test_decode_plan_is_a_function_of_static_shapes():
    for num_seqs in (1, 3, 32, 128, 256):
        for max_keys in (16, 128, 1000, 8192, 131072):
            splits, tiles = decode_plan(num_seqs, 8, max_keys, 132)
            assert splits & (splits - 1) == 0 and 1 <= splits <= MAX_SPLITS  # the plan's counts: powers of two
            assert splits == 1 or max_keys // splits >= 64  # every slice holds at least one key block
            assert tiles["BLOCK_N"] in (64, 128) and tiles["num_stages"] == 2
            assert not tiles.get("EARLY_META") or (splits == 1 and tiles["BLOCK_N"] == 128)  # where it was timed
            assert (splits, tiles) == decode_plan(num_seqs, 8, max_keys, 132)
    # Choices measured best on an H200 (132 SMs; docs/PERFORMANCE.md, 2026-12-02):
    assert decode_plan(1, 8, 32768, 132) == (64, dict(BLOCK_N=128, num_warps=4, num_stages=2))
    assert decode_plan(32, 8, 8192, 132) == (8, dict(BLOCK_N=64, num_warps=4, num_stages=2))
    assert decode_plan(128, 8, 8192, 132)[0] == 2
    # On head-major blocks, H100 (docs/PERFORMANCE.md, 2026-12-07): a context of at most 2048 keys whole in one
    # program where that grid is one wave of two to four programs a SM; fewer programs, or more, keep their slices.
    # There the lengths and first pages are loaded before the PDL wait (EARLY_META, H100, 2026-12-07).
    one_wave = dict(BLOCK_N=128, num_warps=4, num_stages=2, EARLY_META=1)
    assert decode_plan(32, 8, 1024, 132) == (1, one_wave)
    assert decode_plan(64, 8, 1024, 132) == (1, one_wave)
    assert decode_plan(32, 8, 2048, 132) == (1, one_wave)
    assert decode_plan(64, 8, 2048, 132) == (1, one_wave)
    assert decode_plan(32, 8, 128, 132) == (1, dict(BLOCK_N=64, num_warps=4, num_stages=2))  # a sliding window
    assert decode_plan(16, 8, 1024, 132)[0] == 4
    assert decode_plan(128, 8, 1024, 132)[0] == 2


@pytest.mark.parametrize("window", [0, 128, 7])
def test_prefill_and_chunked_prefill_with_cached_prefix(window):
    # a fresh prompt, chunks after a cached prefix (crossing blocks and the window), and decodes, mixed
    q_lens = [33, 20, 1, 129, 7]
    contexts = [33, 150, 100, 300, 7]
    check(make_batch(q_lens, contexts, 8, 2, 64, 16, window, seed=10 + window))


@pytest.mark.parametrize("block_n", [32, 64])
def test_prefill_key_blocks_of_either_width_at_the_window(block_n):
    # prefill_config gives window layers 32-key blocks and full ones 64; both widths at the window's edges, against
    # the twin and each other
    from gptoss_serve.kernels.attention_prefill import paged_attention_prefill, prefill_config

    assert prefill_config(128)["BLOCK_N"] == 32 and prefill_config(0)["BLOCK_N"] == 64
    assert prefill_config(4096)["BLOCK_N"] == 64
    args = make_batch([129, 1, 40], [129, 300, 168], 8, 2, 64, 16, 128, seed=20 + block_n)
    check(args, paged_attention_prefill(*args, config=dict(BLOCK_N=block_n)))


def test_prefill_finds_its_sequence_across_several_chunks_of_sequences():
    # BLOCK_SEQS=4: 11 sequences scanned in three chunks, query tiles of 16 tokens (two heads per KV head)
    from gptoss_serve.kernels.attention_prefill import paged_attention_prefill

    q_lens = [3, 1, 40, 1, 1, 17, 2, 1, 64, 5, 1]
    contexts = [3, 30, 40, 9, 100, 50, 2, 17, 64, 70, 33]
    args = make_batch(q_lens, contexts, 4, 2, 32, 16, 0, seed=12)
    check(args, paged_attention_prefill(*args, config=dict(BLOCK_SEQS=4, BLOCK_ROWS=32)))


def test_prefill_tiny_head_shapes_and_block_size():
    check(make_batch([9, 40], [9, 77], 4, 2, 16, 4, 16, seed=3))
    check(make_batch([5, 1], [5, 12], 3, 1, 16, 8, 0, seed=4))  # group of 3 query heads


def test_sinks_only_add_mass_to_the_denominator():
    args = list(make_batch([1, 4], [3, 4], 2, 1, 16, 16, 0, seed=5))
    args[6] = torch.full_like(args[6], -1e4)  # negligible sinks: plain softmax attention
    check(tuple(args))
    args[6] = torch.full_like(args[6], 30.0)  # dominant sinks: outputs shrink toward zero
    out = paged_attention(*args)
    assert out.float().abs().max() < 1e-3
    check(tuple(args), out)


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same blocks stored as KVCache stores them: each KV head's rows of a block contiguous, same shape."""
    return cache.transpose(1, 2).contiguous().transpose(1, 2)


def check_head_major_layout(args, num_splits=None):
    """Decode (one token a sequence), prefill and the RoPE cache write on head-major blocks (the engine's) give
    the bits they give on token-major ones: every kernel reads and writes the caches through their strides."""
    from gptoss_serve.kernels.attention_prefill import paged_attention_prefill
    from gptoss_serve.kernels.rope import rope_and_cache_write

    q, k_cache, v_cache, table, cu, lens, sinks, sm_scale, window = args
    stored = (head_major(k_cache), head_major(v_cache))
    assert stored[0].stride(1) == k_cache.shape[-1] and same_bits(stored[0], k_cache)
    last = q[cu[1:].long() - 1]  # each sequence's last token, as a decode step
    decodes = [paged_attention_decode(last, k, v, table, lens, sinks, sm_scale, window, num_splits=num_splits)
               for k, v in ((k_cache, v_cache), stored)]
    assert torch.equal(decodes[0], decodes[1])
    prefills = [paged_attention_prefill(q, k, v, table, cu, lens, sinks, sm_scale, window)
                for k, v in ((k_cache, v_cache), stored)]
    assert torch.equal(prefills[0], prefills[1])
    num_tokens, num_kv_heads, head_dim = q.shape[0], k_cache.shape[2], k_cache.shape[3]
    gen = torch.Generator(device=q.device).manual_seed(3)
    k_new, v_new = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen, device=q.device).to(q.dtype)
                    for _ in range(2))
    slots = torch.randperm(k_cache.shape[0] * k_cache.shape[1], generator=gen, device=q.device)[:num_tokens]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=q.device).float() / head_dim)
    written = []
    for k, v in ((k_cache.clone(), v_cache.clone()), (stored[0].clone(), stored[1].clone())):
        rope_and_cache_write(q, k_new, v_new, torch.arange(num_tokens, device=q.device), inv_freq, 1.0, k, v, slots)
        written.append((k, v))
    assert same_bits(written[0][0], written[1][0]) and same_bits(written[0][1], written[1][1])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two bf16 tensors, the NaN blocks (freed, reused) included."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("window", [0, 128])
def test_head_major_blocks_give_the_same_bits(window):
    args = make_batch([3, 1, 40], [300, 17, 517], 8, 2, 64, 16, window, seed=30 + window)
    for num_splits in (None, 2, 5):  # the plan's; two slices, merged by the last one; five, by the merge kernel
        check_head_major_layout(args, num_splits)


# GPU: the real head shapes and long contexts -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [0, 128])
def test_head_major_blocks_give_the_same_bits_gpu(window):
    check_head_major_layout(make_batch([1000, 1, 300], [1000, 5000, 2300], 64, 8, 64, 16, window, seed=22,
                                       device="cuda"))

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [0, 128])
def test_attention_real_shapes_gpu(window):
    check(make_batch([1] * 6, [1, 127, 128, 129, 4096, 8191], 64, 8, 64, 16, window, seed=20, device="cuda"))
    check(make_batch([1000, 1, 300], [1000, 5000, 2300], 64, 8, 64, 16, window, seed=21, device="cuda"))
