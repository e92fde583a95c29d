"""`generate --json` prints one JSON line whose logprobs are the model's own; `bench offline` runs end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from gptoss_serve.cluster.engine.cli import add_bench_offline_parser, add_generate_parser
from gptoss_serve.model.batch import KVCache, build_forward_batch
from gptoss_serve.model.checkpoint_writer import write_checkpoint
from gptoss_serve.model.config import preset
from gptoss_serve.model.loader import load_model
from gptoss_serve.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_checkpoint(preset("tiny"), path, layout="original", seed=3)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    bench = subparsers.add_parser("bench")
    add_bench_offline_parser(bench.add_subparsers(dest="bench_command", required=True))
    return parser.parse_args(argv)


def run(argv: list[str], capsys) -> str:
    args = parse(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_generate_json_from_token_ids(model_dir, capsys):
    out = run(["generate", "--model", str(model_dir), "--prompt-ids", "1,2,3,4000", "--max-tokens", "6",
               "--temperature", "0", "--dtype", "float32", "--ignore-eos", "--json"], capsys)
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"token_ids", "logprobs", "text"}
    assert len(result["token_ids"]) == len(result["logprobs"]) == 6
    tokens = [1, 2, 3, 4000] + result["token_ids"]
    model = load_model(model_dir, torch.float32)
    cache = KVCache.allocate(model.config, 4, 4, torch.float32)
    batch = build_forward_batch([tokens], [0], [list(range(4))], 4, all_logits=True)
    logprobs = torch.log_softmax(model.compute_logits(model(batch, cache)), dim=-1)[3:-1]
    assert result["token_ids"] == logprobs.argmax(dim=-1).tolist()  # greedy
    expected = logprobs.gather(1, torch.tensor(result["token_ids"])[:, None]).flatten().tolist()
    assert result["logprobs"] == pytest.approx(expected, abs=1e-4)
    assert result["text"] == load_tokenizer().decode(result["token_ids"])


def test_generate_text_and_chat_prompts(model_dir, capsys):
    common = ["--model", str(model_dir), "--max-tokens", "3", "--temperature", "0", "--dtype", "float32",
              "--ignore-eos", "--json"]
    raw = json.loads(run(["generate", "--prompt", "Hello there", *common], capsys))
    ids = load_tokenizer().encode("Hello there")
    same = json.loads(run(["generate", "--prompt-ids", ",".join(map(str, ids)), *common], capsys))
    assert raw == same
    chat = json.loads(run(["generate", "--prompt", "Hello there", "--chat", *common], capsys))
    assert len(chat["token_ids"]) == 3
    sampled = ["generate", "--prompt", "Hi", "--model", str(model_dir), "--max-tokens", "4", "--dtype", "float32",
               "--temperature", "1.0", "--top-p", "0.9", "--seed", "7", "--json", "--ignore-eos"]
    assert json.loads(run(sampled, capsys)) == json.loads(run(sampled, capsys))


def test_bench_offline_runs(capsys):
    out = run(["bench", "offline", "--preset", "tiny", "--random-weights", "--dtype", "float32", "--num-prompts",
               "4", "--input-len", "20", "--output-len", "5", "--single-stream", "--single-stream-runs", "3",
               "--compare-sync", "--profile-prefill", "--json"], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    ttfts = result["single_stream_ttft_ms_runs"]
    assert len(ttfts) == 3 and result["single_stream"]["ttft_ms_median"] == pytest.approx(sorted(ttfts)[1], abs=0.01)
    assert "ours, 1 stream (median of 3)" in out
    prefill = result["profile_prefill"]
    assert len(prefill["wall_ms"]) == 5 and all(ms > 0 for ms in prefill["wall_ms"]) and prefill["input_len"] == 20
    # every run's prompts new to the engine (the batch's first prompt once repeated the single stream's)
    assert all(result[key]["num_cached_prompt_tokens"] == 0 for key in ("single_stream", "single_stream_sync",
                                                                        "throughput"))
    assert result["throughput"]["num_prompts"] == 4 and result["throughput"]["output_tokens_per_s"] > 0
    assert result["single_stream"]["num_prompts"] == 1 and result["single_stream_sync"]["num_prompts"] == 1
    assert "ours, 1 stream, sync scheduling" in out
    assert result["programmatic_dependent_launch"] is False  # CPU, torch kernels: nothing is launched with it
