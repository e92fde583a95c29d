"""Autoscaling of the model deployment: the policy on plain numbers, then a load ramp on the session's Ray
cluster that takes the tiny model from 1 to 3 replicas and back to 1, every request answered in full."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gptoss_serve.cluster.serve.autoscaling import ScalingSignals, ScalingTargets, TtftWindow, desired_replicas

APP_NAME = "autoscaling_test"
MODEL = "gpt-oss-default"
MAX_TOKENS = 48
DRAIN_MAX_TOKENS = 160  # long enough to be in flight when a replica is told to stop


# The policy -------------------------------------------------------------------------------------------------
def test_each_signal_asks_for_replicas_in_proportion():
    targets = ScalingTargets(target_ongoing_requests=4, target_queue_depth=2, target_kv_cache_usage=0.5,
                             target_ttft_s=1.0)
    idle = desired_replicas(ScalingSignals(2, 0, 0, 0, 0), targets)
    assert max(idle.values()) == 0  # Serve rounds up to min_replicas
    busy = desired_replicas(ScalingSignals(2, num_ongoing_requests=12, mean_num_waiting=3, mean_kv_usage=0.25,
                                           mean_ttft_s=2.5), targets)
    assert busy == {"requests": 3.0, "queue_depth": 3.0, "kv_cache": 1.0, "ttft": 5.0}
    assert "ttft" not in desired_replicas(ScalingSignals(2, 0, 0, 0, 9), ScalingTargets(4))


def test_ttft_window_counts_requests_still_waiting():
    window = TtftWindow()
    window.observe(0.2)
    window.observe(0.4)
    assert window.take([1.2]) == pytest.approx(0.6)
    assert window.take([]) == 0.0


def test_config_validates_and_maps_to_serve():
    from pydantic import ValidationError

    from gptoss_serve.cluster.serve.config import AppConfig

    with pytest.raises(ValidationError, match="max_replicas"):
        AppConfig(autoscaling={"min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AppConfig(autoscaling={"min_replicas": 0})
    options = AppConfig(max_num_seqs=8, autoscaling={"max_replicas": 3, "target_ttft_s": 2}).model_replica_options()
    assert "num_replicas" not in options
    scaling = options["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 3, 4)
    assert scaling["policy"]["policy_kwargs"]["target_ttft_s"] == 2
    assert "policy" not in AppConfig(autoscaling={"policy": "serve_default"}).model_replica_options()[
        "autoscaling_config"]


def test_cli_flags_set_autoscaling_and_router():
    import argparse

    from gptoss_serve.cluster.serve.cli import add_up_parser, app_config_from_args

    parser = argparse.ArgumentParser()
    add_up_parser(parser.add_subparsers())
    config = app_config_from_args(parser.parse_args(
        ["up", "--min-replicas", "1", "--max-replicas", "4", "--target-ongoing-requests", "8",
         "--upscale-delay-s", "5", "--downscale-delay-s", "60", "--target-ttft-s", "1.5", "--router",
         "serve_default"]))
    assert config.autoscaling.max_replicas == 4 and config.autoscaling.target_ongoing_requests == 8
    assert (config.autoscaling.upscale_delay_s, config.autoscaling.target_ttft_s) == (5, 1.5)
    assert config.router.policy == "serve_default" and config.max_num_model_replicas == 4
    assert app_config_from_args(parser.parse_args(["up", "--replicas", "2"])).autoscaling is None


# On Serve -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_url(deploy_app) -> str:
    from ray import serve

    from gptoss_serve.cluster.serve.app import build_app

    app = build_app({
        "dtype": "float32", "kernels": "torch", "device": "cpu", "max_num_seqs": 8, "max_queued_requests": 64,
        "kv_cache_memory_bytes": 32 * 2 ** 20, "graceful_shutdown_timeout_s": 60,
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4, "upscale_delay_s": 0.5,
                        "downscale_delay_s": 4, "look_back_period_s": 1.5, "metrics_interval_s": 0.5}})
    url = deploy_app(app, APP_NAME, timeout_s=180)
    yield url
    serve.delete(APP_NAME)


def _replica_states() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications[APP_NAME].deployments["ModelServer"].replica_states)


def _num_running_replicas() -> int:
    return _replica_states().get("RUNNING", 0)


def _stream_completion(client: httpx.Client, seed: int, max_tokens: int, open_streams: dict) -> dict:
    """One streamed completion read to the end: what a client would call answered in full. While its body
    streams, the result sits in `open_streams` (keyed by its id), so that the test sees which replica each
    request in flight is on at any moment."""
    body = {"model": MODEL, "prompt": f"Request {seed}: tell me a long story.", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    result = {"status": None, "finish_reason": None, "usage": None, "done": False, "error": None,
              "max_tokens": max_tokens, "start": time.monotonic()}
    with client.stream("POST", "/v1/completions", json=body) as response:
        result["status"], result["replica"] = response.status_code, response.headers.get("x-gptoss-replica")
        open_streams[id(result)] = result
        try:
            _read_events(response, result)
        finally:
            del open_streams[id(result)]
    result["end"] = time.monotonic()
    return result


def _read_events(response: httpx.Response, result: dict) -> None:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            result["done"] = True
            continue
        event = json.loads(data)
        if "error" in event:
            result["error"] = event["error"]
        for choice in event.get("choices", []):
            result["finish_reason"] = choice.get("finish_reason") or result["finish_reason"]
        result["usage"] = event.get("usage") or result["usage"]


def _answered_in_full(result: dict) -> bool:
    usage = result["usage"] or {}
    return (result["status"] == 200 and result["done"] and result["error"] is None
            and (result["finish_reason"] == "stop"
                 or (result["finish_reason"] == "length" and usage.get("completion_tokens") == result["max_tokens"])))


def test_load_ramp_scales_1_to_3_and_back_without_losing_a_request(base_url):
    assert _num_running_replicas() == 1
    results, open_streams, stop_load, stop_trickle = [], {}, threading.Event(), threading.Event()

    def worker(index: int, stop: threading.Event, max_tokens: int) -> None:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            seed = index * 1000
            while not stop.is_set():
                results.append(_stream_completion(client, seed, max_tokens, open_streams))
                seed += 1

    with ThreadPoolExecutor(max_workers=20) as pool:
        for i in range(16):  # 16 ongoing / 4 per replica: 4 replicas wanted, 3 allowed
            pool.submit(worker, i, stop_load, MAX_TOKENS)
        deadline = time.monotonic() + 120
        while _num_running_replicas() < 3:
            assert time.monotonic() < deadline, "never reached 3 replicas"
            time.sleep(0.5)
        three_time = time.monotonic()
        while len({r["replica"] for r in results if r["start"] > three_time}) < 3:  # the new replicas take traffic
            assert time.monotonic() < deadline + 60, "the new replicas answered no request"
            time.sleep(0.5)
        for i in range(4):  # 1 replica wanted; its requests are in flight on every replica while two stop
            pool.submit(worker, 100 + i, stop_trickle, DRAIN_MAX_TOKENS)
        stop_load.set()
        # Each time fewer replicas run, the streams still open are in flight on the replicas told to stop (or on
        # the one kept): those must finish there, in full. Looked at the moment the count falls, not when the
        # stopped replicas are gone, so a loaded machine's slow status calls cannot hide them.
        deadline, running, in_flight_at_stops = time.monotonic() + 120, 3, []
        while (states := _replica_states()) != {"RUNNING": 1}:
            if states.get("RUNNING", 0) < running:
                running, in_flight_at_stops = states.get("RUNNING", 0), in_flight_at_stops + list(open_streams.values())
            assert time.monotonic() < deadline, f"never scaled back to 1 replica: {states}"
            time.sleep(0.1)
        gone_time = time.monotonic()
        # requests sent after the scale-down land on the replica kept; a slow machine takes seconds for one
        while not any(r["start"] > gone_time for r in results):
            assert time.monotonic() < gone_time + 120, "no request started after the scale-down finished"
            time.sleep(0.5)
        stop_trickle.set()
    incomplete = [result for result in results if not _answered_in_full(result)]
    assert len(results) > 32 and not incomplete, incomplete[:3]
    (kept,) = {r["replica"] for r in results if r["start"] > gone_time}
    drained = [r for r in in_flight_at_stops if r["replica"] != kept]
    assert drained, in_flight_at_stops  # requests on the replicas told to stop were finished there, in full
    page = httpx.get(f"{base_url}/metrics").text
    assert "gptoss_autoscaler_target_replicas" in page and "gptoss_autoscaler_desired_replicas" in page
