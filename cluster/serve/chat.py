"""POST /v1/chat/completions on a model replica: request -> harmony prompt -> assistant turns -> chat JSON.

The reasoning comes back apart from the answer as `reasoning_content` (as vLLM returns it), tool calls as
`tool_calls`, and usage counts reasoning tokens in `completion_tokens_details.reasoning_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import uuid
from typing import Any, AsyncIterator

from gptoss_serve.cluster.serve.assistant_turn import AssistantTurn, TurnRequest
from gptoss_serve.cluster.serve.engine_client import EngineClient
from gptoss_serve.cluster.serve.harmony_prompt import HarmonyPrompt, build_harmony_prompt, resolve_tool_choice
from gptoss_serve.cluster.serve.metrics import RequestRecord
from gptoss_serve.cluster.serve.openai_protocol import ChatCompletionRequest
from gptoss_serve.cluster.serve.response_format import JsonFormat, check
from gptoss_serve.cluster.serve.sampling import resolve_max_tokens, sampling_params, stop_strings
from gptoss_serve.cluster.serve.streaming import SSE_DONE, merge, sse
from gptoss_serve.cluster.serve.turn_events import ItemDelta, ItemKind, ItemOpened, TurnFinished
from gptoss_serve.model.tokenizer import Tokenizer


@dataclasses.dataclass
class PreparedChat:
    request: ChatCompletionRequest
    request_id: str
    prompt: HarmonyPrompt
    turns: list[TurnRequest]  # one per choice
    created: int


@dataclasses.dataclass
class _Choice:
    """A choice being assembled from turn events."""

    content: list[str] = dataclasses.field(default_factory=list)
    reasoning: list[str] = dataclasses.field(default_factory=list)
    tool_calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tool_call_index: dict[int, int] = dataclasses.field(default_factory=dict)  # item index -> tool call index
    logprobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    finished: TurnFinished | None = None


def prepare_chat(request: ChatCompletionRequest, tokenizer: Tokenizer, max_model_len: int) -> PreparedChat:
    """Validates what the HTTP layer could not (tools, roles, context window) and builds the engine requests."""
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
    named = request.tool_choice.function.name if not isinstance(request.tool_choice, (str, type(None))) else None
    tool_choice = resolve_tool_choice(tools, request.tool_choice if isinstance(request.tool_choice, str) else None,
                                      named)
    messages = [message.model_dump(exclude_none=True) for message in request.messages]
    prompt = build_harmony_prompt(tokenizer, messages, tools, tool_choice, request.reasoning_effort,
                                  _json_format(request))
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(request.max_completion_tokens or request.max_tokens,
                                    len(prompt.prompt_token_ids), max_model_len, param)
    num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    stops = stop_strings(request.stop)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    turns = [
        TurnRequest(f"{request_id}-{i}", prompt.prompt_token_ids,
                    sampling_params(request, max_tokens, num_logprobs, seed_offset=i),
                    prompt.constraint, stops, num_logprobs)
        for i in range(request.n)
    ]
    return PreparedChat(request, request_id, prompt, turns, int(time.time()))


def _json_format(request: ChatCompletionRequest) -> JsonFormat | None:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JsonFormat("json_object", None)
    spec = response_format.json_schema
    return JsonFormat(spec.name, spec.schema_ or {}, spec.description)


class ChatCompletions:
    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, model_id: str):
        self._engine = engine
        self._tokenizer = tokenizer
        self._model_id = model_id

    def _events(self, prepared: PreparedChat, record: RequestRecord) -> AsyncIterator[tuple[int, Any]]:
        return merge([AssistantTurn(self._engine, self._tokenizer, turn, functools.partial(record.tokens_arrived, i))
                      .events() for i, turn in enumerate(prepared.turns)])

    async def complete(self, prepared: PreparedChat, record: RequestRecord) -> dict[str, Any]:
        choices = [_Choice() for _ in prepared.turns]
        async for index, event in self._events(prepared, record):
            _apply(choices[index], event)
        _record(record, choices)
        return {
            "id": prepared.request_id, "object": "chat.completion", "created": prepared.created,
            "model": self._model_id,
            "choices": [_choice_body(prepared, i, c) for i, c in enumerate(choices)],
            "usage": _usage([c.finished for c in choices]),
            **_token_ids(prepared, choices),
        }

    async def stream(self, prepared: PreparedChat, record: RequestRecord) -> AsyncIterator[str]:
        request = prepared.request
        choices = [_Choice() for _ in prepared.turns]
        for index in range(len(choices)):
            yield self._chunk(prepared, index, {"role": "assistant", "content": ""})
        async for index, event in self._events(prepared, record):
            choice = choices[index]
            _apply(choice, event)
            delta = _stream_delta(choice, event)
            if delta is not None:
                logprobs = [lp.to_chat_dict() for lp in event.logprobs] if isinstance(event, ItemDelta) else []
                yield self._chunk(prepared, index, delta, logprobs={"content": logprobs} if logprobs else None)
            if isinstance(event, TurnFinished):
                extra = {}
                if prepared.prompt.json_format is not None and not choice.tool_calls:
                    _, error = check(prepared.prompt.json_format, "".join(choice.content))
                    if error:
                        extra["response_format_error"] = error
                yield self._chunk(prepared, index, {}, finish_reason=event.finish_reason, **extra)
        _record(record, choices)
        if request.stream_options is not None and request.stream_options.include_usage:
            yield sse({"id": prepared.request_id, "object": "chat.completion.chunk", "created": prepared.created,
                       "model": self._model_id, "choices": [], "usage": _usage([c.finished for c in choices])})
        yield SSE_DONE

    def _chunk(self, prepared: PreparedChat, index: int, delta: dict[str, Any], logprobs: dict | None = None,
               finish_reason: str | None = None, **extra: Any) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
        return sse({"id": prepared.request_id, "object": "chat.completion.chunk", "created": prepared.created,
                    "model": self._model_id, "choices": [choice]})


def _choice_body(prepared: PreparedChat, index: int, choice: _Choice) -> dict[str, Any]:
    content = "".join(choice.content)
    body: dict[str, Any] = {"index": index, "finish_reason": choice.finished.finish_reason, "logprobs": None}
    json_format = prepared.prompt.json_format
    if json_format is not None and not choice.tool_calls:
        content, error = check(json_format, content)
        if error:
            body["response_format_error"] = error
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if choice.tool_calls else ""),
                               "reasoning_content": "".join(choice.reasoning) or None}
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
    body["message"] = message
    if prepared.request.logprobs:
        body["logprobs"] = {"content": choice.logprobs}
    return body


def _apply(choice: _Choice, event: Any) -> None:
    """Accumulates one event into the choice."""
    if isinstance(event, ItemOpened) and event.kind == ItemKind.TOOL_CALL:
        choice.tool_call_index[event.item_index] = len(choice.tool_calls)
        choice.tool_calls.append({"id": event.call_id, "type": "function",
                                  "function": {"name": event.function_name, "arguments": ""}})
    elif isinstance(event, ItemDelta):
        if event.kind == ItemKind.TEXT:
            choice.content.append(event.text)
            choice.logprobs += [lp.to_chat_dict() for lp in event.logprobs]
        elif event.kind == ItemKind.REASONING:
            choice.reasoning.append(event.text)
        else:
            call = choice.tool_calls[choice.tool_call_index[event.item_index]]
            call["function"]["arguments"] += event.text
    elif isinstance(event, TurnFinished):
        choice.finished = event


def _stream_delta(choice: _Choice, event: Any) -> dict[str, Any] | None:
    """The chunk delta an event shows the client, if any."""
    if isinstance(event, ItemOpened) and event.kind == ItemKind.TOOL_CALL:
        call_index = choice.tool_call_index[event.item_index]
        return {"tool_calls": [{"index": call_index, "id": event.call_id, "type": "function",
                                "function": {"name": event.function_name, "arguments": ""}}]}
    if isinstance(event, ItemDelta) and (event.text or event.logprobs):
        if event.kind == ItemKind.TEXT:
            return {"content": event.text}
        if event.kind == ItemKind.REASONING:
            return {"reasoning_content": event.text}
        if event.text:
            return {"tool_calls": [{"index": choice.tool_call_index[event.item_index],
                                    "function": {"arguments": event.text}}]}
    return None


def _record(record: RequestRecord, choices: list[_Choice]) -> None:
    finished = [c.finished for c in choices if c.finished is not None]
    usage = _usage(finished)
    record.num_prompt_tokens, record.num_output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    record.num_reasoning_tokens = usage["completion_tokens_details"]["reasoning_tokens"]
    record.num_harmony_anomalies = sum(len(f.anomalies) for f in finished)
    reasons = [f.finish_reason for f in finished]
    record.outcome = next((r for r in ("abort", "length", "tool_calls") if r in reasons), "stop")
    if record.outcome == "abort":
        record.outcome = "aborted"


def _usage(finished: list[TurnFinished | None]) -> dict[str, Any]:
    done = [f for f in finished if f is not None]
    num_prompt = done[0].usage.num_prompt_tokens if done else 0
    num_cached = done[0].usage.num_cached_prompt_tokens if done else 0
    num_completion = sum(f.usage.num_output_tokens for f in done)
    return {
        "prompt_tokens": num_prompt, "completion_tokens": num_completion, "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": num_cached},
        "completion_tokens_details": {"reasoning_tokens": sum(f.usage.num_reasoning_tokens for f in done)},
    }


def _token_ids(prepared: PreparedChat, choices: list[_Choice]) -> dict[str, Any]:
    if not prepared.request.return_token_ids:
        return {}
    return {"prompt_token_ids": prepared.prompt.prompt_token_ids,
            "output_token_ids": [list(c.finished.output_token_ids) for c in choices]}
