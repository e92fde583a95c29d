"""The OpenAI API end to end: a real Serve application (2 model replicas) on the session's Ray cluster, real
HTTP on 127.0.0.1, the official `openai` client, and the embedded tiny model (float32, torch kernels, CPU).

The tiny model has random weights, so its text is noise and it never writes harmony headers by itself:
what is checked is the API's shape and behaviour, and that served tokens equal the offline engine's.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from gptoss_serve.cluster.engine.sampling_params import SamplingParams

APP_NAME = "api_test"
MODEL = "gpt-oss-default"
KV_CACHE_BYTES = 64 * 2 ** 20
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]


@pytest.fixture(scope="module")
def base_url(deploy_app) -> str:
    from ray import serve

    from gptoss_serve.cluster.serve.app import build_app

    # Serve's default router: a previous_response_id follow-up must reach the other replica to show that the
    # response store is shared (ours would keep it with its conversation; test_router.py covers that).
    app = build_app({"num_replicas": 2, "dtype": "float32", "kernels": "torch", "device": "cpu",
                     "max_num_seqs": 32, "max_queued_requests": 32, "kv_cache_memory_bytes": KV_CACHE_BYTES,
                     "router": {"policy": "serve_default"}})
    url = deploy_app(app, APP_NAME, timeout_s=120)
    yield url
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline():
    """The engine's offline API on the same weights: the reference for served tokens."""
    from gptoss_serve.cluster.engine.llm import LLM

    return LLM(None, dtype="float32", kernels="torch", device="cpu", progress=False,
               kv_cache_memory_bytes=KV_CACHE_BYTES)


def chat_prompt_ids(messages, tools=None, reasoning_effort=None) -> list[int]:
    from gptoss_serve.model.harmony.chat import conversation_from_chat
    from gptoss_serve.model.harmony.render import render_conversation_for_completion

    return render_conversation_for_completion(conversation_from_chat(messages, tools, reasoning_effort))


def final_text(token_ids) -> str:
    """What the harmony parser makes of sampled ids: the text a client sees as `content`."""
    from gptoss_serve.model.harmony.parser import HarmonyStreamParser

    parser = HarmonyStreamParser()
    for token_id in token_ids:
        parser.feed(token_id)
    return parser.finish().final_text


# Chat completions ----------------------------------------------------------------------------------------------
def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


def test_chat_roles_reasoning_effort_and_usage(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy."},
        {"role": "user", "content": [{"type": "text", "text": "And of Spain?"}]},
    ]
    for effort in ("low", "medium", "high"):
        out = client.chat.completions.create(model=MODEL, messages=messages, reasoning_effort=effort,
                                             max_completion_tokens=12, temperature=0)
        choice = out.choices[0]
        assert choice.finish_reason in ("stop", "length")
        assert out.usage.completion_tokens == 12 or choice.finish_reason == "stop"
        assert out.usage.completion_tokens_details.reasoning_tokens is not None
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        assert "<|" not in (choice.message.content or "")  # no harmony tokens leak into the answer
        assert out.usage.prompt_tokens == len(chat_prompt_ids(messages, reasoning_effort=effort))


def test_chat_streamed_equals_non_streamed_and_offline(client, offline):
    messages = [{"role": "user", "content": "Tell me a story."}]
    body = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, temperature=0,
                                          extra_body={"return_token_ids": True})
    raw = body.model_extra
    assert raw["prompt_token_ids"] == chat_prompt_ids(messages)
    expected = offline.generate([{"prompt_token_ids": raw["prompt_token_ids"]}],
                                SamplingParams(temperature=0, max_tokens=80))[0].outputs[0]
    assert raw["output_token_ids"][0] == expected.token_ids
    assert body.choices[0].message.content == final_text(expected.token_ids)

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == body.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == body.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == body.usage.completion_tokens == 80


def test_chat_n_seed_stop_logprobs(client):
    messages = [{"role": "user", "content": "Count."}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=70, temperature=1.0, seed=7)
    first = client.chat.completions.create(n=2, **kwargs)
    again = client.chat.completions.create(n=2, **kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # seed + i per sample

    text = first.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.chat.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]

    scored = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=70, temperature=0,
                                            logprobs=True, top_logprobs=3)
    entries = scored.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)
    # One entry per content token: their bytes spell the content.
    assert bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace") == scored.choices[0].message.content


def test_tool_choice_required_and_named_produce_tool_calls(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for tool_choice, allowed in (("required", {"get_weather", "get_time"}),
                                 ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
        out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                                             max_tokens=40, temperature=0)
        message = out.choices[0].message
        assert message.tool_calls, f"tool_choice={tool_choice} gave no tool call"
        assert message.tool_calls[0].function.name in allowed
        assert message.tool_calls[0].id.startswith("call_")
        assert out.choices[0].finish_reason in ("tool_calls", "length")

    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                            max_tokens=40, temperature=0, stream=True)
    deltas = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].function.name in {"get_weather", "get_time"} and deltas[0][0].id.startswith("call_")
    assert all(d[0].index == 0 for d in deltas)


def test_tool_call_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
                                           tools=TOOLS, tool_choice={"type": "function",
                                                                     "function": {"name": "get_weather"}},
                                           max_tokens=20, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=10,
                                            temperature=0, extra_body={"return_token_ids": True})
    assert second.model_extra["prompt_token_ids"] == chat_prompt_ids(history, TOOLS)
    bad = [*history[:2], {"role": "tool", "tool_call_id": "call_unknown", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model=MODEL, messages=bad, tools=TOOLS, max_tokens=5)


def test_response_format_json_is_instructed_and_checked(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Reply in JSON."}], max_tokens=20, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}},
        extra_body={"return_token_ids": True})
    # The schema reaches the model in the developer message, as harmony specifies.
    from gptoss_serve.model.tokenizer import load_tokenizer

    prompt_text = load_tokenizer().decode(out.model_extra["prompt_token_ids"])
    assert "# Response Formats" in prompt_text and '"answer"' in prompt_text
    content = out.choices[0].message.content
    try:
        json.loads(content)
        valid = True
    except json.JSONDecodeError:
        valid = False
    assert valid or "not valid JSON" in out.choices[0].model_extra["response_format_error"]


# Completions ---------------------------------------------------------------------------------------------------
def test_completions_token_ids_and_logprobs_equal_offline(client, offline):
    prompts = [[200006, 1428, 200008, 17, 18, 19], [1000, 2000, 3000]]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0, logprobs=2,
                                    extra_body={"return_token_ids": True})
    expected = offline.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0, max_tokens=12, logprobs=2))
    for choice, reference in zip(out.choices, expected):
        ref = reference.outputs[0]
        assert choice.model_extra["token_ids"] == ref.token_ids
        assert choice.text == ref.text
        served = choice.logprobs.token_logprobs
        assert served == pytest.approx([entry[t] for t, entry in zip(ref.token_ids, ref.logprobs)], abs=1e-4)
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)

    echoed = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello there")
    chunks = list(client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected[1].outputs[0].text


def test_32_concurrent_streams_equal_offline_greedy(base_url, offline):
    prompts = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(32)]
    max_tokens = 40
    expected = offline.generate([{"prompt_token_ids": chat_prompt_ids(m)} for m in prompts],
                                SamplingParams(temperature=0, max_tokens=max_tokens))

    async def one(client, messages):
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                      temperature=0, stream=True)
        content, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                content.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(content), finish

    async def run_all():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, m) for m in prompts))

    results = asyncio.run(run_all())
    for (content, finish), reference in zip(results, expected):
        assert finish == reference.outputs[0].finish_reason
        assert content == final_text(reference.outputs[0].token_ids)


# Responses -----------------------------------------------------------------------------------------------------
def test_responses_previous_response_id_across_replicas(client):
    first = client.responses.with_raw_response.create(model=MODEL, input="My name is Ada.", max_output_tokens=8,
                                                      instructions="Be brief.", temperature=0)
    first_replica, first = first.headers["x-gptoss-replica"], first.parse()
    assert first.status in ("completed", "incomplete") and first.output
    replicas = set()
    for attempt in range(30):
        follow = client.responses.with_raw_response.create(model=MODEL, input="What is my name?",
                                                           previous_response_id=first.id, max_output_tokens=4)
        replicas.add(follow.headers["x-gptoss-replica"])
        follow = follow.parse()
        # The follow-up's prompt holds the first exchange (and not its instructions, as at OpenAI).
        assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 40
        if replicas - {first_replica}:
            break
    assert replicas - {first_replica}, "no follow-up was served by the other replica"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_missing", max_output_tokens=2)
    assert client.responses.retrieve(first.id).id == first.id


def test_responses_function_call_round_trip_and_stream_events(client):
    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"]} for t in TOOLS]
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=tools, tool_choice="required",
                                    max_output_tokens=30, reasoning={"effort": "low"})
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name in {"get_weather", "get_time"} and calls[0].call_id.startswith("call_")
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=tools, max_output_tokens=6,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": '{"temp_c": 21}'}])
    assert second.output and second.previous_response_id == first.id

    events = list(client.responses.create(model=MODEL, input="Weather?", tools=tools, tool_choice="required",
                                          max_output_tokens=30, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    for expected in ("response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done"):
        assert expected in types
    assert [e.sequence_number for e in events] == list(range(len(events)))

    text_events = [e.type for e in client.responses.create(model=MODEL, input="Hi", max_output_tokens=70,
                                                           temperature=0, stream=True)]
    for expected in ("response.content_part.added", "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done"):
        assert expected in text_events


# Errors --------------------------------------------------------------------------------------------------------
def test_errors_in_openai_format(client, base_url):
    url = f"{base_url}/v1/chat/completions"
    bad_json = httpx.post(url, content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}

    wrong_type = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                       "max_tokens": "5"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "max_tokens"
    not_a_list = httpx.post(url, json={"model": MODEL, "messages": "hello"})
    assert not_a_list.status_code == 400 and not_a_list.json()["error"]["param"] == "messages"

    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=200_000)
    message = overflow.value.body["message"]
    numbers = [int(n) for n in re.findall(r"\d+", message)]
    assert 131072 in numbers and 200_000 in numbers and overflow.value.body["code"] == "context_length_exceeded"

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert httpx.get(f"{base_url}/v1/nothing").status_code == 404


# Disconnects and metrics ---------------------------------------------------------------------------------------
def metric_values(base_url: str, name: str) -> dict[str, float]:
    """{replica: value} of a gauge or counter (summed over other labels) from /metrics."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            values[replica] = values.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def wait_for(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def test_disconnect_aborts_and_frees_kv_blocks(base_url):
    used = lambda: metric_values(base_url, "gptoss_kv_cache_used_blocks")  # noqa: E731
    assert wait_for(lambda: len(used()) == 2 and sum(used().values()) == 0), used()
    aborted_before = sum(metric_values(base_url, "gptoss_requests_total").values())
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write forever."}], "max_tokens": 100_000,
            "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the request is running
            assert wait_for(lambda: sum(used().values()) > 0), "the request never held KV blocks"
        # Leaving the block closed the connection mid-stream.
    assert wait_for(lambda: sum(used().values()) == 0), f"KV blocks still held after disconnect: {used()}"

    # A client that stops waiting for a non-streamed answer is no different.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json={**body, "stream": False}, timeout=2)
    assert wait_for(lambda: sum(used().values()) == 0), f"KV blocks still held after a timeout: {used()}"
    requests = httpx.get(f"{base_url}/metrics").text
    assert re.search(r'gptoss_requests_total\{[^}]*outcome="aborted"[^}]*\} [1-9]', requests)
    assert sum(metric_values(base_url, "gptoss_requests_total").values()) > aborted_before


def test_metrics_aggregate_every_replica(base_url):
    text = httpx.get(f"{base_url}/metrics").text
    for name in ("gptoss_requests_total", "gptoss_time_to_first_token_seconds_bucket",
                 "gptoss_e2e_request_latency_seconds_bucket", "gptoss_prompt_tokens_total",
                 "gptoss_generation_tokens_total", "gptoss_num_requests_running", "gptoss_num_requests_waiting",
                 "gptoss_kv_cache_usage_ratio", "gptoss_http_requests_total"):
        assert name in text, name
    assert len(metric_values(base_url, "gptoss_kv_cache_usage_ratio")) == 2  # both model replicas
