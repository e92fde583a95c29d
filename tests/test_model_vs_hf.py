"""Our model against Hugging Face transformers' GptOssForCausalLM (eager attention, float32).

transformers loads the HF-layout checkpoint that make-checkpoint wrote, through its own MXFP4 loader, so
this checks our reading of both layouts as well as the forward pass. The original layout written with the
same seed holds the same tensors, so our model loaded from it must give the same logits.
"""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.model.batch import KVCache, build_forward_batch
from gptoss_serve.model.checkpoint_writer import write_checkpoint
from gptoss_serve.model.config import ModelConfig, preset
from gptoss_serve.model.loader import load_model

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
BLOCK_SIZE = 8

CONFIGS = {
    "tiny": preset("tiny").with_overrides(vocab_size=1024),
    # Odd sizes everywhere: 6 heads over 3 KV heads, head_dim 24, 5 experts with top-3, a window of 8.
    "odd": ModelConfig(
        num_hidden_layers=3, num_experts=5, experts_per_token=3, vocab_size=777, hidden_size=96,
        intermediate_size=160, head_dim=24, num_attention_heads=6, num_key_value_heads=3, sliding_window=8),
    "top1": preset("tiny").with_overrides(vocab_size=500, experts_per_token=1, num_hidden_layers=3),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoints(request, tmp_path_factory):
    config = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    write_checkpoint(config, root / "hf", layout="hf", seed=11)
    write_checkpoint(config, root / "original", layout="original", seed=11)
    hf = transformers.GptOssForCausalLM.from_pretrained(
        root / "hf", dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    return config, root, hf


def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float()  # [len, vocab]


def prompts_for(config: ModelConfig, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def blocks_for(lengths: list[int]) -> list[list[int]]:
    tables, next_block = [], 0
    for n in lengths:
        num_blocks = -(-n // BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + num_blocks)))
        next_block += num_blocks
    return tables


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_prefill_logits_match_transformers(checkpoints, layout):
    config, root, hf = checkpoints
    model = load_model(root / layout, dtype=torch.float32)
    # Longer than the sliding window, and several sequences of different lengths in one batch.
    lengths = [3 * config.sliding_window + 5, 1, config.sliding_window + 1, 17]
    prompts = prompts_for(config, lengths)
    tables = blocks_for(lengths)
    cache = KVCache.allocate(config, sum(map(len, tables)), BLOCK_SIZE, torch.float32)
    batch = build_forward_batch(prompts, [0] * len(prompts), tables, BLOCK_SIZE, all_logits=True)
    ours = model.compute_logits(model(batch, cache))
    want = torch.cat([hf_logits(hf, p) for p in prompts])
    assert (ours - want).abs().max().item() < TOLERANCE


def test_incremental_decode_matches_transformers(checkpoints):
    """Prefill a prefix, then decode one token per step for several sequences at once (mixed lengths), and
    compare every step's logits with a full forward of the whole sequence."""
    config, root, hf = checkpoints
    model = load_model(root / "original", dtype=torch.float32)
    total_lengths = [2 * config.sliding_window + 3, config.sliding_window + 2, 9]
    prefix_lengths = [5, config.sliding_window - 1, 1]
    sequences = prompts_for(config, total_lengths, seed=1)
    tables = blocks_for(total_lengths)
    cache = KVCache.allocate(config, sum(map(len, tables)), BLOCK_SIZE, torch.float32)
    got = [[] for _ in sequences]
    batch = build_forward_batch([s[:n] for s, n in zip(sequences, prefix_lengths)], [0] * 3, tables, BLOCK_SIZE,
                                all_logits=True)
    logits = model.compute_logits(model(batch, cache))
    offset = 0
    for i, n in enumerate(prefix_lengths):
        got[i].append(logits[offset:offset + n])
        offset += n
    done = list(prefix_lengths)
    while any(d < len(s) for d, s in zip(done, sequences)):
        live = [i for i, s in enumerate(sequences) if done[i] < len(s)]
        batch = build_forward_batch([[sequences[i][done[i]]] for i in live], [done[i] for i in live],
                                    [tables[i] for i in live], BLOCK_SIZE)
        logits = model.compute_logits(model(batch, cache))
        for row, i in enumerate(live):
            got[i].append(logits[row:row + 1])
            done[i] += 1
    for seq, pieces in zip(sequences, got):
        assert (torch.cat(pieces) - hf_logits(hf, seq)).abs().max().item() < TOLERANCE


def test_both_layouts_load_identical_weights(checkpoints):
    _, root, _ = checkpoints
    a = load_model(root / "original", dtype=torch.float32).state_dict()
    b = load_model(root / "hf", dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_tracks_float32(checkpoints):
    config, root, _ = checkpoints
    prompt = prompts_for(config, [2 * config.sliding_window], seed=2)
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(root / "original", dtype=dtype)
        cache = KVCache.allocate(config, 8, BLOCK_SIZE, dtype)
        batch = build_forward_batch(prompt, [0], blocks_for([len(prompt[0])]), BLOCK_SIZE, all_logits=True)
        outputs[dtype] = model.compute_logits(model(batch, cache))
    f32, bf16 = outputs[torch.float32], outputs[torch.bfloat16]
    assert torch.isfinite(bf16).all()
    relative = (bf16 - f32).norm() / f32.norm()
    assert relative < 5e-2, relative
