"""Refusals under load and while starting, on the session's Ray cluster: 429 when a replica's queue is full,
503 while no model replica is up. Each uses a small application of its own beside any other test's."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

MODEL = "gpt-oss-default"
SMALL = {"dtype": "float32", "kernels": "torch", "device": "cpu", "kv_cache_memory_bytes": 16 * 2 ** 20}


def wait_until(predicate, timeout_s: float = 120.0, message: str = "timed out"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(message)


def test_429_when_the_queue_is_full(serve_http):
    from ray import serve

    from gptoss_serve.cluster.serve.app import build_app

    name = "queue_test"
    serve.run(build_app({**SMALL, "max_num_seqs": 1, "max_queued_requests": 0}), name=name,
              route_prefix=f"/{name}")
    url = f"{serve_http}/{name}"
    wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, message="never healthy")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    try:
        max_model_len = client.models.list().data[0].model_extra["max_model_len"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}],
                "max_tokens": max_model_len // 2, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as busy:
            assert busy.status_code == 200  # admitted: it holds the replica's only slot
            with pytest.raises(openai.RateLimitError) as refused:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Me too."}],
                                               max_tokens=4)
            assert refused.value.body["code"] == "queue_full"
            assert refused.value.response.headers["retry-after"] == "1"
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
        # The stream closed: its slot is free again.
        answer = wait_until(lambda: _try_chat(client), message="the slot was never released")
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        serve.delete(name)


def _try_chat(client):
    try:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Now?"}],
                                              max_tokens=4)
    except openai.RateLimitError:
        return None


def test_503_while_no_model_replica_is_up(serve_http):
    from ray import serve

    from gptoss_serve.cluster.serve.app import build_app

    name = "starting_test"
    # The model replica asks for a resource this cluster lacks, so it stays pending, as a replica does while
    # its node is provisioned or its weights load; the ingress is up meanwhile.
    app = build_app({**SMALL, "ray_actor_options": {"resources": {"gptoss_test_never_available": 1}},
                     "graceful_shutdown_timeout_s": 1})
    serve._run(app, _blocking=False, name=name, route_prefix=f"/{name}")  # serve.run would wait for RUNNING
    url = f"{serve_http}/{name}"
    try:
        health = wait_until(lambda: _health_while_starting(url), message="ingress never came up")
        assert health == {"status": "starting", "not_ready": [MODEL]}
        response = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                              json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_ready"
        assert int(response.headers["retry-after"]) > 0
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert unavailable.value.status_code == 503
        assert client.models.list().data[0].model_extra["ready"] is False
    finally:
        serve.delete(name)


def _health_while_starting(url: str):
    """/health's JSON once the ingress answers 503; None meanwhile (a busy machine may also time out)."""
    try:
        return _json_or_none(httpx.get(f"{url}/health", timeout=30))
    except httpx.TimeoutException:
        return None


def _json_or_none(response: httpx.Response):
    """The ingress's answer; None while the proxy does not route to the application yet."""
    if response.status_code != 503:
        return None
    try:
        return response.json()
    except ValueError:
        return None
