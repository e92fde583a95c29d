"""Serve building blocks that need no Ray cluster: config and CLI flags, request validation, stop strings,
stream plumbing, metrics merging, and the local engine client on the tiny model."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from gptoss_serve.cluster.serve.errors import APIError

REPO = Path(__file__).resolve().parents[1]


# Config and CLI ------------------------------------------------------------------------------------------------
def test_example_serve_config_loads_and_builds():
    from gptoss_serve.cluster.serve.app import build_app
    from gptoss_serve.cluster.serve.config import load_serve_config

    document, configs = load_serve_config(REPO / "deploy/serve/gptoss-serve.yaml")
    assert document["applications"][0]["import_path"] == "gptoss_serve.cluster.serve.app:build_app"
    config = configs["gptoss"]
    assert config.served_model_id == "gpt-oss-default" and config.tensor_parallel_size == 1
    build_app(document["applications"][0]["args"])  # what `serve run` / `serve deploy` call


def test_config_refuses_typos_and_places_sharded_replicas():
    from pydantic import ValidationError

    from gptoss_serve.cluster.serve.config import AppConfig

    with pytest.raises(ValidationError, match="extra"):
        AppConfig(max_num_seq=4)
    with pytest.raises(ValidationError, match="multiple of the smaller"):
        AppConfig(tensor_parallel_size=2, expert_parallel_size=3)
    with pytest.raises(ValidationError, match="either model or random_weights"):
        AppConfig(model="x", random_weights="gpt-oss-120b")
    sharded = AppConfig(tensor_parallel_size=2, expert_parallel_size=2).model_replica_options()
    assert sharded["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert sharded["ray_actor_options"] == {"num_cpus": 1}
    gpu = AppConfig(device="cuda").model_replica_options()
    assert gpu["ray_actor_options"] == {"num_gpus": 1}
    # Random weights are made by a shard worker on its own GPU: the replica holds a group, not a GPU itself.
    random_gpu = AppConfig(device="cuda", random_weights="gpt-oss-20b").model_replica_options()
    assert random_gpu["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 1, "GPU": 1}]
    assert random_gpu["ray_actor_options"] == {"num_cpus": 1}
    bundles = [{"CPU": 1}, {"CPU": 1, "GPU": 1}]
    grouped = AppConfig(placement_group_bundles=bundles).model_replica_options()
    assert grouped["placement_group_bundles"] == bundles and grouped["placement_group_strategy"] == "STRICT_PACK"


def test_cli_flags():
    from gptoss_serve.cluster.serve.cli import add_down_parser, add_up_parser, app_config_from_args, run_up

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    add_up_parser(subparsers)
    add_down_parser(subparsers)
    args = parser.parse_args(["up", "--replicas", "2", "--max-num-seqs", "8", "--dtype", "float32"])
    config = app_config_from_args(args)
    assert (config.num_replicas, config.max_num_seqs, config.dtype, config.model) == (2, 8, "float32", None)
    assert args.func is run_up and (args.host, args.port) == ("127.0.0.1", 8000)
    sharded = app_config_from_args(parser.parse_args(["up", "--tp", "2", "--ep", "4"]))
    assert (sharded.tensor_parallel_size, sharded.expert_parallel_size, sharded.world_size) == (2, 4, 4)
    with pytest.raises(ValueError, match="multiple of the smaller"):
        app_config_from_args(parser.parse_args(["up", "--tp", "2", "--ep", "3"]))
    random = app_config_from_args(parser.parse_args(["up", "--random-weights", "gpt-oss-120b", "--tp", "2"]))
    assert random.served_model_id == "gpt-oss-120b-random"
    capped = app_config_from_args(parser.parse_args(["up", "--long-prefill-token-threshold", "1024"]))
    assert capped.long_prefill_token_threshold == 1024 and config.long_prefill_token_threshold is None
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        app_config_from_args(parser.parse_args(["up", "--long-prefill-token-threshold", "0"]))


def test_model_source_errors_are_clear(tmp_path):
    from gptoss_serve.cluster.serve.model_source import ModelSourceError, resolve_model

    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ModelSourceError, match="not a Hugging Face id"):
        resolve_model(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ModelSourceError, match="could not download gptoss-serve-tests/no-such-model.*--model DIR"):
        resolve_model("gptoss-serve-tests/no-such-model")  # offline here; a missing repository where online


# Requests ------------------------------------------------------------------------------------------------------
def test_request_validation_names_the_field():
    from gptoss_serve.cluster.serve.openai_protocol import ChatCompletionRequest, parse_request

    def error(body) -> APIError:
        with pytest.raises(APIError) as caught:
            parse_request(ChatCompletionRequest, body if isinstance(body, bytes) else json.dumps(body).encode())
        assert caught.value.status_code == 400
        return caught.value

    ok = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert error(b"{not json").code == "invalid_json"
    assert error(b"[1, 2]").code == "invalid_json"
    assert error({**ok, "temperature": "hot"}).param == "temperature"
    assert error({**ok, "n": 1.5}).param == "n"
    assert error({**ok, "messages": [{"role": "robot", "content": "x"}]}).param == "messages.0.role"
    assert error({"model": "m"}).param == "messages"
    assert error({**ok, "logit_bias": {"1": 5}}).param == "logit_bias"
    assert error({**ok, "top_logprobs": 2}).param == "top_logprobs"
    assert parse_request(ChatCompletionRequest, json.dumps({**ok, "unknown_field": 1}).encode()).model == "m"


def test_stop_string_matcher_holds_back_partial_matches():
    from gptoss_serve.cluster.serve.stop_strings import StopStringMatcher

    matcher = StopStringMatcher(["STOP", "halt"])
    assert matcher.push("abc S") == "abc "
    assert matcher.push("T") == ""
    assert matcher.push("x") == "STx"
    assert matcher.push("ha") == ""
    assert matcher.push("lt and more") == "" and matcher.matched == "halt"
    assert matcher.flush() == ""
    unmatched = StopStringMatcher(["STOP"])
    assert unmatched.push("end ST") == "end " and unmatched.flush() == "ST"


# Streams -------------------------------------------------------------------------------------------------------
def test_merge_interleaves_and_closes_every_source():
    from gptoss_serve.cluster.serve.streaming import merge

    closed = []

    async def source(name, count):
        try:
            for i in range(count):
                await asyncio.sleep(0)
                yield f"{name}{i}"
        finally:
            closed.append(name)

    async def take_all():
        return [item async for item in merge([source("a", 3), source("b", 2)])]

    items = asyncio.run(take_all())
    assert sorted(items) == [(0, "a0"), (0, "a1"), (0, "a2"), (1, "b0"), (1, "b1")]

    async def take_one():
        merged = merge([source("c", 100), source("d", 100)])
        first = await merged.__anext__()
        await merged.aclose()
        return first

    closed.clear()
    asyncio.run(take_one())
    assert sorted(closed) == ["c", "d"]  # leaving early closes (aborts) every source


def test_batched_joins_within_the_interval_and_sends_the_first_at_once():
    from gptoss_serve.cluster.serve.streaming import batched

    async def source():
        for i in range(6):
            yield str(i)
            await asyncio.sleep(0.01)

    async def collect():
        return [chunk async for chunk in batched(source(), 0.035)]

    chunks = asyncio.run(collect())
    assert "".join(chunks) == "012345" and chunks[0] == "0" and len(chunks) < 6


def test_metrics_render_unions_replicas():
    from gptoss_serve.cluster.serve.engine_client import EngineStats
    from gptoss_serve.cluster.serve.metrics import ReplicaMetrics, RequestRecord, render

    replicas = [ReplicaMetrics("m", name) for name in ("r1", "r2")]
    record = RequestRecord("chat", outcome="stop", num_output_tokens=5)
    record.tokens_arrived()
    replicas[0].observe(record)
    replicas[1].set_engine_stats(EngineStats(num_running=3, kv_blocks_used=4, kv_blocks_total=8))
    text = render(r.snapshot() for r in replicas).decode()
    assert text.count("# TYPE gptoss_kv_cache_usage_ratio gauge") == 1
    assert 'gptoss_kv_cache_usage_ratio{model="m",replica="r2"} 0.5' in text
    assert 'gptoss_requests_total{endpoint="chat",model="m",outcome="stop",replica="r1"} 1.0' in text


# The local engine client ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine():
    from gptoss_serve.cluster.engine.llm import LLM

    return LLM(None, dtype="float32", kernels="torch", device="cpu", progress=False, max_num_seqs=2,
               kv_cache_memory_bytes=16 * 2 ** 20).engine


def test_local_engine_client_streams_aborts_and_refuses(tiny_engine):
    from gptoss_serve.cluster.engine.sampling_params import SamplingParams
    from gptoss_serve.cluster.serve.engine_client import EngineOverloadedError
    from gptoss_serve.cluster.serve.local_engine import LocalEngineClient

    async def scenario():
        client = LocalEngineClient(tiny_engine, max_queued_requests=1, loop=asyncio.get_running_loop())
        try:
            deltas = [d async for d in client.generate("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=5))]
            assert sum(len(d.token_ids) for d in deltas) == 5 and deltas[-1].finish_reason == "length"

            long = SamplingParams(temperature=0, max_tokens=10_000)
            running = [client.generate(name, [4, 5, 6], long) for name in "bc"]
            for stream in running:
                await stream.__anext__()
            waiting = asyncio.create_task(client.generate("d", [4, 5], long).__anext__())
            await asyncio.sleep(0.2)  # b and c run, d waits: the client's capacity is 2 + 1
            assert client.stats().num_waiting == 1 and client.stats().kv_blocks_used > 0
            with pytest.raises(EngineOverloadedError):
                await client.generate("e", [7], long).__anext__()
            waiting.cancel()  # the callers leave: the engine aborts them and frees their blocks
            for stream in running:
                await stream.aclose()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if client.stats().kv_blocks_used == 0 and client.stats().num_in_flight_requests == 0:
                    break
            assert client.stats().kv_blocks_used == 0 and client.stats().num_running == 0
            with pytest.raises(ValueError, match="vocabulary|lie in"):
                async for _ in client.generate("f", [10 ** 7], SamplingParams(max_tokens=2)):
                    pass
        finally:
            await client.shutdown()

    asyncio.run(scenario())
