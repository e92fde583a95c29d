"""The replica's request handlers without Ray or HTTP, on scripted engine output.

A random tiny model never writes harmony by itself, so what gpt-oss does write (reasoning, then an answer or a
tool call; sometimes something malformed) is scripted here as token ids and fed through the same handlers
the replicas run. The real engine behind the same protocol is covered by test_serve_api.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Callable

import pytest

from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.serve.chat import ChatCompletions, prepare_chat
from gptoss_serve.cluster.serve.engine_client import EngineClient, EngineInfo, EngineStats, GenerationDelta
from gptoss_serve.cluster.serve.metrics import RequestRecord
from gptoss_serve.cluster.serve.openai_protocol import ChatCompletionRequest, ResponsesRequest, parse_request
from gptoss_serve.cluster.serve.responses import Responses, prepare_response
from gptoss_serve.model.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time"}}]


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, allow_special=True)


REASONING = "<|channel|>analysis<|message|>The user wants the weather.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>"
CALL_BODY = '{"city": "Paris"}<|call|>'


class ScriptedEngine(EngineClient):
    """Answers each request with the ids its script picks for the prompt, honouring stop ids and max_tokens."""

    def __init__(self, script: Callable[[list[int]], str]):
        self._script = script
        self.prompts: list[list[int]] = []
        self.aborted: list[str] = []

    async def generate(self, request_id, prompt_token_ids, params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        prompt = list(prompt_token_ids)
        self.prompts.append(prompt)
        tokens = ids(self._script(prompt))[: params.max_tokens]
        stops = params.all_stop_token_ids
        end = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
        finish = "stop" if end is not None else "length" if len(tokens) == params.max_tokens else "stop"
        tokens = tokens[:end]
        finished = False
        try:
            for i, token_id in enumerate(tokens):
                last = i == len(tokens) - 1
                yield GenerationDelta(0, (token_id,), ({token_id: -0.5, 7: -1.5},), "", finish if last else None,
                                      None, len(prompt), 0)
                await asyncio.sleep(0)
            finished = True
        finally:
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def info(self):
        return EngineInfo(max_model_len=4096, max_num_seqs=8, max_queued_requests=8, vocab_size=TOKENIZER.vocab_size)

    def stats(self):
        return EngineStats()

    def is_alive(self):
        return True

    async def shutdown(self):
        pass


def ends_with(prompt: list[int], text: str) -> bool:
    suffix = ids(text)
    return prompt[-len(suffix):] == suffix


def chat_request(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 200, **fields}
    return parse_request(ChatCompletionRequest, json.dumps(body).encode())


def run_chat(engine: ScriptedEngine, **fields) -> dict:
    prepared = prepare_chat(chat_request(**fields), TOKENIZER, 4096)
    return asyncio.run(ChatCompletions(engine, TOKENIZER, "m").complete(prepared, RequestRecord("chat")))


def stream_chat(engine: ScriptedEngine, **fields) -> list[dict]:
    prepared = prepare_chat(chat_request(stream=True, **fields), TOKENIZER, 4096)

    async def collect():
        return [chunk async for chunk in ChatCompletions(engine, TOKENIZER, "m").stream(prepared, RequestRecord("c"))]

    return [json.loads(line[len("data: "):]) for chunk in asyncio.run(collect())
            for line in chunk.splitlines() if line.startswith("data: {")]


def test_reasoning_is_returned_apart_and_counted():
    engine = ScriptedEngine(lambda prompt: REASONING + FINAL)
    out = run_chat(engine, reasoning_effort="high")
    message = out["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["content"] == "It is sunny."
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(ids(REASONING + FINAL))
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(ids(REASONING))

    chunks = stream_chat(engine)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert (reasoning, content) == ("The user wants the weather.", "It is sunny.")


def test_auto_tool_call_is_parsed_and_streamed():
    call = "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>" + CALL_BODY
    engine = ScriptedEngine(lambda prompt: REASONING + call)
    out = run_chat(engine, tools=TOOLS)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    chunks = stream_chat(engine, tools=TOOLS)
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def forced_call_script(first_message: str) -> Callable[[list[int]], str]:
    """Writes `first_message` unless the prompt ends in a forced call header, then writes the arguments."""

    def script(prompt):
        if ends_with(prompt, " <|constrain|>json<|message|>"):
            return CALL_BODY
        if ends_with(prompt, "<|channel|>commentary to=functions"):
            return ".get_time <|constrain|>"
        return first_message

    return script


@pytest.mark.parametrize("tool_choice, name", [
    ("required", "get_time"),  # the model names the function after a forced `to=functions`
    ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
])
def test_required_tool_choice_forces_a_call_instead_of_an_answer(tool_choice, name):
    engine = ScriptedEngine(forced_call_script("<|channel|>final<|message|>I will not call anything.<|return|>"))
    out = run_chat(engine, tools=TOOLS, tool_choice=tool_choice)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None  # the refused answer was never shown
    assert choice["message"]["tool_calls"][0]["function"] == {"name": name, "arguments": '{"city": "Paris"}'}
    assert engine.aborted  # the answer was stopped as soon as its header showed it was not a call
    assert ends_with(engine.prompts[-1], f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>")


def test_required_tool_choice_keeps_the_reasoning_before_the_forced_call():
    engine = ScriptedEngine(forced_call_script(REASONING + FINAL))
    out = run_chat(engine, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = out["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    # The call follows the reasoning as a new assistant message.
    assert ends_with(engine.prompts[-1], REASONING + "<|start|>assistant<|channel|>commentary to=functions."
                                                     "get_weather <|constrain|>json<|message|>")


def test_tool_choice_none_hides_tools_and_drops_calls():
    call = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>" + CALL_BODY
    engine = ScriptedEngine(lambda prompt: call)
    out = run_chat(engine, tools=TOOLS, tool_choice="none")
    assert "tool_calls" not in out["choices"][0]["message"]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "get_weather" not in TOKENIZER.decode(engine.prompts[0])


def test_json_response_format_forces_a_final_message_and_checks_it():
    def script(prompt):
        if ends_with(prompt, "<|channel|>final<|message|>"):
            return '```json\n{"answer": "sunny"}\n```<|return|>'
        return REASONING + "<|start|>assistant<|channel|>commentary<|message|>not json<|end|>"

    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    engine = ScriptedEngine(script)
    out = run_chat(engine, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    choice = out["choices"][0]
    assert choice["message"]["content"] == '{"answer": "sunny"}'  # the code fence is removed
    assert "response_format_error" not in choice
    assert "# Response Formats" in TOKENIZER.decode(engine.prompts[0])

    bad = ScriptedEngine(lambda prompt: '<|channel|>final<|message|>{"answer": 3}<|return|>')
    out = run_chat(bad, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    assert "does not match the schema" in out["choices"][0]["response_format_error"]


def test_stop_strings_cut_the_answer_even_across_tokens():
    engine = ScriptedEngine(lambda prompt: REASONING + FINAL)
    out = run_chat(engine, stop=["sun"])  # "sunny" is split over tokens; the reasoning is not cut
    assert out["choices"][0]["message"]["content"] == "It is "
    assert out["choices"][0]["message"]["reasoning_content"] == "The user wants the weather."
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks = stream_chat(engine, stop=["sun"])
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "It is "


def test_malformed_harmony_never_kills_the_request():
    surprises = [
        "<|message|><|message|>text<|constrain|>more<|end|><|end|><|return|>",
        "<|channel|>final<|start|><|start|>assistant<|channel|><|message|>x<|call|>y",
        "<|reserved_200100|><|channel|>analysis<|message|>unfinished",
        "plain text without any header at all" + "<|endoftext|>",
        "<|channel|>commentary to=functions.missing <|constrain|>json<|message|>{broken<|call|>",
    ]
    for text in surprises:
        out = run_chat(ScriptedEngine(lambda prompt, text=text: text), tools=TOOLS)
        choice = out["choices"][0]
        assert choice["finish_reason"] in ("stop", "length", "tool_calls")
        assert "<|" not in (choice["message"]["content"] or "")
        chunks = stream_chat(ScriptedEngine(lambda prompt, text=text: text), tools=TOOLS)
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_logprobs_cover_the_answer_tokens_only():
    engine = ScriptedEngine(lambda prompt: REASONING + FINAL)
    out = run_chat(engine, logprobs=True, top_logprobs=1)
    entries = out["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == "It is sunny."
    assert all(e["logprob"] == -0.5 and len(e["top_logprobs"]) == 1 for e in entries)


class DictStore:
    def __init__(self):
        self.records = {}

    async def get(self, response_id):
        return self.records.get(response_id)

    async def put(self, response_id, record):
        self.records[response_id] = record


def test_responses_stream_events_and_previous_response():
    engine = ScriptedEngine(lambda prompt: REASONING + FINAL)
    store = DictStore()
    handler = Responses(engine, TOKENIZER, "m", store)

    async def stream(body):
        prepared = await prepare_response(parse_request(ResponsesRequest, json.dumps(body).encode()), TOKENIZER,
                                          4096, store)
        text = "".join([chunk async for chunk in handler.stream(prepared, RequestRecord("responses"))])
        return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]

    events = asyncio.run(stream({"model": "m", "input": "Weather?", "stream": True}))
    types = [t for i, t in enumerate(e["type"] for e in events) if i == 0 or events[i - 1]["type"] != t]
    assert types == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    response = events[-1]["response"]
    assert [item["type"] for item in response["output"]] == ["reasoning", "message"]
    assert response["output"][1]["content"][0]["text"] == "It is sunny."
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] == len(ids(REASONING))

    asyncio.run(stream({"model": "m", "input": "And tomorrow?", "previous_response_id": response["id"]}))
    follow_up_prompt = TOKENIZER.decode(engine.prompts[-1])
    assert "Weather?" in follow_up_prompt and "It is sunny." in follow_up_prompt and "And tomorrow?" in follow_up_prompt


def test_random_token_soup_never_raises():
    """Whatever ids the engine returns (harmony specials in any order, reserved ids, text), every answer mode
    still produces a well-formed response."""
    import random

    rng = random.Random(0)
    specials = [200002, 200003, 200005, 200006, 200007, 200008, 200012, 199999, 200100]
    pieces = specials + ids("analysis final commentary to=functions.get_weather json {\"a\": 1} hello é")

    for trial in range(60):
        soup = [rng.choice(pieces) for _ in range(rng.randint(0, 40))]
        text = TOKENIZER.decode(soup)
        mode = [{}, {"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "required"},
                {"response_format": {"type": "json_object"}}, {"stop": ["a"]}][trial % 5]
        engine = ScriptedEngine(lambda prompt, text=text: text)
        out = run_chat(engine, max_tokens=30, logprobs=True, **mode)
        assert out["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
        assert 0 <= out["usage"]["completion_tokens_details"]["reasoning_tokens"] <= out["usage"]["completion_tokens"]
        chunks = stream_chat(ScriptedEngine(lambda prompt, text=text: text), max_tokens=30, **mode)
        assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
