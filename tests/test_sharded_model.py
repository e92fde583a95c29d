"""Every sharded layout against the unsharded model: one process per rank over gloo, float32.

This checks the model-level split (which slices each rank reads, where the all-reduces go, which rank owns
the biases). Running the ranks as Ray actors behind the engine is tested with the cluster code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptoss_serve.model.batch import KVCache, build_forward_batch
from gptoss_serve.model.checkpoint_writer import write_checkpoint
from gptoss_serve.model.config import preset
from gptoss_serve.model.loader import load_model, random_model
from gptoss_serve.model.parallel import LayoutError, ShardGroups, ShardLayout

CONFIG = preset("tiny").with_overrides(vocab_size=512, num_hidden_layers=3)
BLOCK_SIZE = 8
LENGTHS = [2 * CONFIG.sliding_window + 3, 5]


def run_model(model) -> torch.Tensor:
    """Prefill two prompts, then decode three steps; all logits [num_outputs, vocab]."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    tables = [list(range(0, 8)), list(range(8, 10))]
    cache = KVCache.allocate(CONFIG, 10, BLOCK_SIZE, torch.float32,
                             num_kv_heads=model.layout.num_kv_heads(CONFIG))
    outs = [model.compute_logits(model(build_forward_batch(prompts, [0, 0], tables, BLOCK_SIZE, True), cache))]
    for step in range(3):
        next_ids = [[(7 * step + i) % CONFIG.vocab_size] for i in range(2)]
        batch = build_forward_batch(next_ids, [n + step for n in LENGTHS], tables, BLOCK_SIZE)
        outs.append(model.compute_logits(model(batch, cache)))
    return torch.cat(outs)


def _rank_main(rank: int, tp: int, ep: int, source: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # several ranks share this machine's cores
    layout = ShardLayout(tp=tp, ep=ep, rank=rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=layout.world_size)
    try:
        groups = ShardGroups.create(layout)
        if source == "random":
            model = random_model(CONFIG, seed=5, dtype=torch.float32, layout=layout, groups=groups)
        else:
            model = load_model(source, dtype=torch.float32, layout=layout, groups=groups)
        torch.save(run_model(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_sharded(tp: int, ep: int, source: str, tmp_path, monkeypatch) -> list[torch.Tensor]:
    world = ShardLayout(tp=tp, ep=ep).world_size
    # The spawned ranks unpickle _rank_main by its module name, tests.test_sharded_model, with our sys.path.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    mp.start_processes(_rank_main, args=(tp, ep, source, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    write_checkpoint(CONFIG, path, layout="hf", seed=5)
    return path


@pytest.fixture(scope="module")
def unsharded_logits(checkpoint):
    return run_model(load_model(checkpoint, dtype=torch.float32))


@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2), (2, 2), (1, 4)])
def test_layout_matches_unsharded(tp, ep, checkpoint, unsharded_logits, tmp_path, monkeypatch):
    for rank_logits in run_sharded(tp, ep, str(checkpoint), tmp_path, monkeypatch):
        assert (rank_logits - unsharded_logits).abs().max().item() < 1e-4


def test_random_weights_shard_like_the_checkpoint(tmp_path, monkeypatch):
    """random_model under a layout holds the same model as unsharded random_model (GPU runs use it)."""
    want = run_model(random_model(CONFIG, seed=5, dtype=torch.float32))
    for rank_logits in run_sharded(2, 2, "random", tmp_path, monkeypatch):
        assert (rank_logits - want).abs().max().item() < 1e-4


def test_each_rank_holds_only_its_slice():
    layout = ShardLayout(tp=2, ep=2, rank=1)
    model = random_model(CONFIG, seed=5, dtype=torch.float32, layout=layout)
    mlp, attn = model.block[0].mlp, model.block[0].attn
    assert mlp.mlp1_weight.blocks.shape[0] == CONFIG.num_experts // 2 and mlp.first_expert == CONFIG.num_experts // 2
    assert attn.qkv.weight.shape[0] == CONFIG.qkv_size // 2
    assert torch.count_nonzero(attn.out.bias) == 0  # rank 0 of the attention group adds the bias


@pytest.mark.parametrize("tp, ep, message", [
    (3, 1, "must divide the 8 KV heads"),
    (1, 3, "must divide the 32 experts"),
    (2, 3, "multiple of the smaller"),
    (4, 1, "use --ep 4"),
])
def test_layouts_that_do_not_fit_say_why(tp, ep, message):
    with pytest.raises(LayoutError, match=message):
        ShardLayout(tp=tp, ep=ep).validate(preset("gpt-oss-20b"))
