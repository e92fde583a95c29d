"""Checkpoint names, the synthetic writer and the reader: round trips in both layouts and every broken file."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_serve.kernels.mxfp4 import dequantize_mxfp4
from gptoss_serve.model.checkpoint import CheckpointError, open_checkpoint
from gptoss_serve.model.checkpoint_names import expected_tensors, stored_tensors
from gptoss_serve.model.checkpoint_writer import (
    add_make_checkpoint_parser, random_tensors, write_checkpoint)
from gptoss_serve.model.config import ConfigError, ModelConfig, preset

# Small enough that a checkpoint is ~100 KB; tiny keeps the real 201088-token vocabulary (~50 MB).
SMALL = ModelConfig(
    num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=256, hidden_size=64,
    intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)


@pytest.fixture(scope="module")
def tiny_original(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_original")
    write_checkpoint(preset("tiny"), path, layout="original", seed=7)
    return path


@pytest.fixture(scope="module")
def tiny_hf_sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    write_checkpoint(preset("tiny"), path, layout="hf", seed=7, max_shard_bytes=10**7)
    return path


# Names and shapes --------------------------------------------------------------------------------------------
def test_expected_tensors_of_the_released_models():
    tensors_20b = expected_tensors(preset("gpt-oss-20b"))
    assert len(tensors_20b) == 24 * 15 + 3
    assert len(stored_tensors(preset("gpt-oss-20b"), "hf")) == 24 * 19 + 3
    assert tensors_20b["block.0.attn.qkv.weight"] == ((5120, 2880), torch.bfloat16)
    assert tensors_20b["block.3.mlp.mlp1_weight.blocks"] == ((32, 5760, 90, 16), torch.uint8)
    assert tensors_20b["block.3.mlp.mlp2_weight.scales"] == ((32, 2880, 90), torch.uint8)
    assert tensors_20b["block.23.attn.sinks"] == ((64,), torch.bfloat16)
    assert tensors_20b["unembedding.weight"] == ((201088, 2880), torch.bfloat16)

    def num_bytes(tensors):
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in tensors.values())
    assert num_bytes(tensors_20b) == 13_761_264_768
    assert round(num_bytes(expected_tensors(preset("gpt-oss-120b"))) / 1e9, 2) == 65.25


def test_hf_names_split_qkv_by_rows():
    hf = stored_tensors(SMALL, "hf")
    q, k, v = (hf[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert (q.row_start, q.row_stop, k.row_stop, v.row_stop) == (0, 64, 96, 128)
    assert {q.canonical_name, k.canonical_name, v.canonical_name} == {"block.1.attn.qkv.weight"}
    assert hf["model.layers.0.mlp.experts.gate_up_proj_blocks"].canonical_name == "block.0.mlp.mlp1_weight.blocks"
    assert hf["lm_head.weight"].canonical_name == "unembedding.weight"


# Round trips -------------------------------------------------------------------------------------------------
def test_original_round_trip(tiny_original):
    reader = open_checkpoint(tiny_original)
    assert reader.layout == "original"
    assert [p.name for p in reader.files] == ["model.safetensors"]
    assert reader.config == preset("tiny")
    for name, tensor in random_tensors(preset("tiny"), seed=7):
        assert torch.equal(reader.get(name), tensor), name
    tags = json.loads((tiny_original / "dtypes.json").read_text())
    assert tags["block.0.mlp.mlp1_weight.blocks"] == "FP4"
    assert tags["block.0.mlp.mlp1_weight.scales"] == "UE8"
    assert tags["block.0.attn.sinks"] == "BF16"


def test_hf_sharded_round_trip_equals_original(tiny_original, tiny_hf_sharded):
    hf, original = open_checkpoint(tiny_hf_sharded), open_checkpoint(tiny_original)
    assert hf.layout == "hf"
    num_shards = len(hf.files)
    assert num_shards > 1
    assert [p.name for p in hf.files] == [f"model-{i:05d}-of-{num_shards:05d}.safetensors"
                                          for i in range(1, num_shards + 1)]
    assert hf.config == preset("tiny")
    assert json.loads((tiny_hf_sharded / "config.json").read_text())["model_type"] == "gpt_oss"
    assert (tiny_hf_sharded / "generation_config.json").is_file()
    for name in expected_tensors(preset("tiny")):
        assert torch.equal(hf.get(name), original.get(name)), name


def test_original_sharded_names_and_index(tmp_path):
    files = write_checkpoint(SMALL, tmp_path, layout="original", max_shard_bytes=20_000)
    assert len(files) > 2
    assert files[0].name == f"model--00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected_tensors(SMALL))
    assert index["metadata"]["total_size"] == sum(f.stat().st_size for f in files) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    reader = open_checkpoint(tmp_path)
    for name, tensor in random_tensors(SMALL, seed=0):
        assert torch.equal(reader.get(name), tensor), name


@pytest.mark.parametrize("rows", [slice(0, 1), slice(60, 100), slice(63, 65), slice(100, None), slice(None, -5),
                                  slice(5, 5), slice(90, 80), slice(0, 1000)])
def test_row_slices(tiny_hf_sharded, tiny_original, rows):
    full = dict(random_tensors(preset("tiny"), seed=7))
    for path in (tiny_hf_sharded, tiny_original):
        reader = open_checkpoint(path)
        for name in ("block.1.attn.qkv.weight", "block.1.attn.qkv.bias", "block.0.mlp.mlp1_weight.blocks",
                     "block.0.mlp.mlp2_bias", "embedding.weight"):
            assert torch.equal(reader.get(name, rows=rows), full[name][rows]), (path.name, name, rows)


def test_expert_rows_read_only_those_experts(tiny_hf_sharded):
    reader = open_checkpoint(tiny_hf_sharded)
    blocks_ep_local = reader.get("block.1.mlp.mlp1_weight.blocks", rows=slice(2, 4))  # [2, 128, 2, 16]
    assert blocks_ep_local.shape == (2, 128, 2, 16) and blocks_ep_local.dtype == torch.uint8
    with pytest.raises(ValueError, match="contiguous"):
        reader.get("block.1.attn.qkv.weight", rows=slice(0, 10, 2))
    with pytest.raises(CheckpointError, match="block.9.attn.sinks"):
        reader.get("block.9.attn.sinks")


def test_same_seed_same_files_and_other_seed_differs(tmp_path):
    first = write_checkpoint(SMALL, tmp_path / "a", seed=3)
    again = write_checkpoint(SMALL, tmp_path / "b", seed=3)
    other = write_checkpoint(SMALL, tmp_path / "c", seed=4)
    assert first[0].read_bytes() == again[0].read_bytes()
    assert first[0].read_bytes() != other[0].read_bytes()


def test_hub_directory_prefers_root_then_original(tmp_path):
    write_checkpoint(SMALL, tmp_path / "original", layout="original")
    assert open_checkpoint(tmp_path).layout == "original"  # config found in original/ too
    write_checkpoint(SMALL, tmp_path, layout="hf")
    assert open_checkpoint(tmp_path).layout == "hf"


def test_random_weights_are_well_scaled(tiny_original):
    reader = open_checkpoint(tiny_original)
    config = reader.config
    for prefix, fan_in in (("mlp1", config.hidden_size), ("mlp2", config.intermediate_size)):
        weight = dequantize_mxfp4(reader.get(f"block.0.mlp.{prefix}_weight.blocks"),
                                  reader.get(f"block.0.mlp.{prefix}_weight.scales"), torch.float32)  # [E, out, in]
        assert weight.shape[-1] == fan_in
        assert 0.9 < weight.std().item() * math.sqrt(fan_in) < 1.1
    norm_scale = reader.get("block.0.attn.norm.scale").float()
    assert abs(norm_scale.mean().item() - 1) < 0.05
    assert reader.get("block.0.attn.qkv.bias").float().abs().max() < 0.2
    qkv = reader.get("block.0.attn.qkv.weight").float()
    assert 0.8 < qkv.std().item() * math.sqrt(config.hidden_size) < 1.2
    assert torch.isfinite(reader.get("embedding.weight").float()).all()


def test_make_checkpoint_cli(tmp_path):
    parser = argparse.ArgumentParser()
    add_make_checkpoint_parser(parser.add_subparsers())
    args = parser.parse_args(["make-checkpoint", "--preset", "tiny", "--layout", "hf", "--seed", "2",
                              "--out", str(tmp_path), "--max-shard-gb", "0.02"])
    assert args.func(args) == 0
    reader = open_checkpoint(tmp_path)
    assert reader.layout == "hf" and len(reader.files) > 1
    with pytest.raises(FileExistsError):
        args.func(args)



def test_hf_layout_loads_in_transformers(tmp_path):
    """The independent check that the HF layout is exact: transformers finds every tensor and no other."""
    transformers = pytest.importorskip("transformers")
    write_checkpoint(SMALL, tmp_path, layout="hf", max_shard_bytes=20_000)
    model, loading_info = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16,
        output_loading_info=True)
    assert not any(loading_info.values()), loading_info
    reader = open_checkpoint(tmp_path)
    mlp1 = dequantize_mxfp4(reader.get("block.1.mlp.mlp1_weight.blocks"),
                            reader.get("block.1.mlp.mlp1_weight.scales"))  # [E, 2 * intermediate, hidden]
    experts_hf = model.model.layers[1].mlp.experts
    assert torch.equal(mlp1.transpose(1, 2), experts_hf.gate_up_proj.data.to(torch.bfloat16))  # HF computes x @ W
    k_proj = reader.get("block.1.attn.qkv.weight", rows=slice(SMALL.q_size, SMALL.q_size + SMALL.kv_size))
    assert torch.equal(k_proj, model.model.layers[1].self_attn.k_proj.weight.data)
    logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits  # [1, 5, vocab]
    assert torch.isfinite(logits).all() and logits.float().std() > 0.1

# Broken checkpoints ------------------------------------------------------------------------------------------
def _rewrite(path, mutate):
    """Loads a safetensors file, lets `mutate` edit its tensor dict, saves it back."""
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)


@pytest.fixture
def small_original(tmp_path):
    write_checkpoint(SMALL, tmp_path, layout="original")
    return tmp_path


def test_missing_tensor(small_original):
    _rewrite(small_original / "model.safetensors", lambda t: t.pop("block.1.attn.sinks"))
    with pytest.raises(CheckpointError, match=r"block\.1\.attn\.sinks is missing: not in .*model\.safetensors"):
        open_checkpoint(small_original)


def test_missing_tensor_hf_sharded_names_the_hf_name(tmp_path):
    files = write_checkpoint(SMALL, tmp_path, layout="hf", max_shard_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").unlink()  # without an index, the header check must find it
    for path in files:
        _rewrite(path, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias", None))
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(tmp_path)
    assert "model.layers.0.self_attn.k_proj.bias (rows 64:96 of block.0.attn.qkv.bias) is missing" in str(error.value)
    assert f"any of the {len(files)} files in {tmp_path}" in str(error.value)


def test_index_pointing_at_missing_shard(tmp_path):
    files = write_checkpoint(SMALL, tmp_path, layout="original", max_shard_bytes=20_000)
    files[-1].unlink()
    with pytest.raises(CheckpointError, match=f"unembedding.weight in {files[-1]}, which does not exist"):
        open_checkpoint(tmp_path)


def test_wrong_shape(small_original):
    _rewrite(small_original / "model.safetensors",
             lambda t: t.update({"block.0.attn.out.weight": torch.zeros(64, 32, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"block\.0\.attn\.out\.weight in .*model\.safetensors has shape "
                                              r"\[64, 32\], expected \[64, 64\]"):
        open_checkpoint(small_original)


def test_wrong_dtype(small_original):
    def to_float(tensors):
        tensors["block.1.mlp.mlp2_weight.scales"] = tensors["block.1.mlp.mlp2_weight.scales"].float()
    _rewrite(small_original / "model.safetensors", to_float)
    with pytest.raises(CheckpointError, match=r"block\.1\.mlp\.mlp2_weight\.scales in .*model\.safetensors has "
                                              r"dtype F32 .*expected torch\.uint8"):
        open_checkpoint(small_original)


def test_unexpected_tensor(small_original):
    _rewrite(small_original / "model.safetensors",
             lambda t: t.update({"block.2.attn.sinks": torch.zeros(4, dtype=torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor block\.2\.attn\.sinks in .*model\.safetensors"):
        open_checkpoint(small_original)


def test_truncated_file(tmp_path):
    files = write_checkpoint(SMALL, tmp_path, layout="original", max_shard_bytes=20_000)
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"{files[-1]} is truncated: tensor unembedding.weight"):
        open_checkpoint(tmp_path)


def test_unknown_layout(tmp_path):
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout in .*model\.safetensors.*"
                                              r"found transformer\.h\.0\.attn\.c_attn\.weight"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [
    b"<html>not found</html>" * 10,  # a length field far beyond the file
    (16).to_bytes(8, "little") + b"{not json}      ",  # a plausible length, a header that is not JSON
    b"abc",  # shorter than the length field
])
def test_garbage_file(small_original, content):
    (small_original / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        open_checkpoint(small_original)


def test_missing_config(small_original):
    (small_original / "config.json").unlink()
    with pytest.raises(ConfigError, match=f"{small_original}: no config.json"):
        open_checkpoint(small_original)


def test_no_safetensors_files(small_original):
    shutil.move(small_original / "model.safetensors", small_original / "model.bin")
    with pytest.raises(CheckpointError, match=f"no \\*.safetensors files in {small_original}"):
        open_checkpoint(small_original)
