"""POST /v1/responses on a model replica: harmony's native API, streamed as typed events or returned whole.

A turn's events become output items (reasoning, message, function_call) and, when streaming, the events
OpenAI's SDK expects, in order: response.created, response.in_progress, per item output_item.added,
content_part.added, *.delta, *.done, content_part.done, output_item.done, then response.completed (or
response.incomplete when max_output_tokens cut it short).

With `store` (the default) the request's input items and the response are saved in the application's shared
store, so a follow-up with `previous_response_id` continues the conversation on whichever replica serves it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, AsyncIterator, Protocol

from gptoss_serve.cluster.serve.assistant_turn import AssistantTurn, TurnRequest
from gptoss_serve.cluster.serve.engine_client import EngineClient
from gptoss_serve.cluster.serve.errors import not_found
from gptoss_serve.cluster.serve.harmony_prompt import HarmonyPrompt, build_harmony_prompt, resolve_tool_choice
from gptoss_serve.cluster.serve.metrics import RequestRecord
from gptoss_serve.cluster.serve.openai_protocol import ResponsesRequest
from gptoss_serve.cluster.serve.response_format import JsonFormat, check
from gptoss_serve.cluster.serve.responses_items import (
    close_item,
    empty_part,
    function_tools_as_chat,
    items_to_chat_messages,
    new_id,
    normalize_input,
    open_item,
)
from gptoss_serve.cluster.serve.sampling import resolve_max_tokens, sampling_params
from gptoss_serve.cluster.serve.streaming import sse
from gptoss_serve.cluster.serve.turn_events import ItemClosed, ItemDelta, ItemKind, ItemOpened, TurnFinished
from gptoss_serve.model.tokenizer import Tokenizer


class ResponseStore(Protocol):
    async def get(self, response_id: str) -> dict[str, Any] | None: ...

    async def put(self, response_id: str, record: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class PreparedResponse:
    request: ResponsesRequest
    response_id: str
    input_items: list[dict[str, Any]]  # the whole conversation so far, previous responses' items included
    prompt: HarmonyPrompt
    turn: TurnRequest
    created_at: int


async def prepare_response(request: ResponsesRequest, tokenizer: Tokenizer, max_model_len: int,
                           store: ResponseStore, response_id: str | None = None) -> PreparedResponse:
    """response_id: the id to store the result under (the ingress picks it for routing); None: a new one."""
    items = []
    if request.previous_response_id is not None:
        previous = await store.get(request.previous_response_id)
        if previous is None:
            raise not_found(f"No stored response has id {request.previous_response_id!r} (it was never stored, "
                            f"or has been evicted).", param="previous_response_id")
        items = previous["input_items"] + previous["response"]["output"]
    items += normalize_input(request.input)
    messages = items_to_chat_messages(items)
    if request.instructions:  # instructions apply to this request only, as at OpenAI
        messages.insert(0, {"role": "developer", "content": request.instructions})
    tools = function_tools_as_chat(request.tools)
    choice = request.tool_choice
    tool_choice = resolve_tool_choice(tools, choice if isinstance(choice, str) else None,
                                      None if isinstance(choice, (str, type(None))) else choice.name)
    effort = request.reasoning.effort if request.reasoning is not None else None
    prompt = build_harmony_prompt(tokenizer, messages, tools, tool_choice, effort, _json_format(request))
    max_tokens = resolve_max_tokens(request.max_output_tokens, len(prompt.prompt_token_ids), max_model_len,
                                    "max_output_tokens")
    response_id = response_id or new_id("resp")
    turn = TurnRequest(response_id, prompt.prompt_token_ids, sampling_params(request, max_tokens),
                       prompt.constraint)
    return PreparedResponse(request, response_id, items, prompt, turn, int(time.time()))


def _json_format(request: ResponsesRequest) -> JsonFormat | None:
    fmt = request.text.format if request.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JsonFormat("json_object", None)
    return JsonFormat(fmt.name or "response", fmt.schema_ or {}, fmt.description)


class _ResponseBuilder:
    """Turns turn events into output items and the stream's events."""

    def __init__(self, prepared: PreparedResponse, model_id: str):
        self._prepared = prepared
        self._model_id = model_id
        self._sequence_number = 0
        self.output: list[dict[str, Any]] = []
        self._output_index_by_item: dict[int, int] = {}
        self.finished: TurnFinished | None = None

    def event(self, event_type: str, **fields: Any) -> dict[str, Any]:
        payload = {"type": event_type, "sequence_number": self._sequence_number, **fields}
        self._sequence_number += 1
        return payload

    def on_turn_event(self, event: Any) -> list[dict[str, Any]]:
        if isinstance(event, ItemOpened):
            return self._opened(event)
        if isinstance(event, ItemDelta) and event.text:
            return self._delta(event)
        if isinstance(event, ItemClosed):
            return self._closed(event)
        if isinstance(event, TurnFinished):
            self.finished = event
        return []

    def _opened(self, event: ItemOpened) -> list[dict[str, Any]]:
        output_index = len(self.output)
        self._output_index_by_item[event.item_index] = output_index
        item = open_item(event.kind, event.function_name, event.call_id)
        self.output.append(item)
        events = [self.event("response.output_item.added", output_index=output_index, item=item)]
        if event.kind != ItemKind.TOOL_CALL:
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=output_index,
                                     content_index=0, part=empty_part(event.kind)))
        return events

    def _delta(self, event: ItemDelta) -> list[dict[str, Any]]:
        output_index = self._output_index_by_item[event.item_index]
        item_id = self.output[output_index]["id"]
        if event.kind == ItemKind.TOOL_CALL:
            return [self.event("response.function_call_arguments.delta", item_id=item_id, output_index=output_index,
                               delta=event.text)]
        event_type = "response.output_text.delta" if event.kind == ItemKind.TEXT else "response.reasoning_text.delta"
        extra = {"logprobs": []} if event.kind == ItemKind.TEXT else {}
        return [self.event(event_type, item_id=item_id, output_index=output_index, content_index=0,
                           delta=event.text, **extra)]

    def _closed(self, event: ItemClosed) -> list[dict[str, Any]]:
        output_index = self._output_index_by_item[event.item_index]
        item = close_item(self.output[output_index], event.kind, event.text, "completed")
        self.output[output_index] = item
        common = {"item_id": item["id"], "output_index": output_index}
        if event.kind == ItemKind.TOOL_CALL:
            events = [self.event("response.function_call_arguments.done", **common, name=event.function_name,
                                 arguments=event.text)]
        else:
            done_type = "response.output_text.done" if event.kind == ItemKind.TEXT else "response.reasoning_text.done"
            extra = {"logprobs": []} if event.kind == ItemKind.TEXT else {}
            events = [self.event(done_type, **common, content_index=0, text=event.text, **extra),
                      self.event("response.content_part.done", **common, content_index=0, part=item["content"][0])]
        events.append(self.event("response.output_item.done", output_index=output_index, item=item))
        return events

    def response(self, status: str) -> dict[str, Any]:
        request = self._prepared.request
        body: dict[str, Any] = {
            "id": self._prepared.response_id, "object": "response", "created_at": self._prepared.created_at,
            "status": status, "error": None, "incomplete_details": None, "model": self._model_id,
            "instructions": request.instructions, "output": self.output,
            "max_output_tokens": request.max_output_tokens, "previous_response_id": request.previous_response_id,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "reasoning": {"effort": request.reasoning.effort if request.reasoning else None, "summary": None},
            "store": request.store, "temperature": request.temperature, "top_p": request.top_p,
            "text": {"format": {"type": "text"}} if request.text is None or request.text.format is None
            else {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": request.tool_choice if isinstance(request.tool_choice, str) or request.tool_choice is None
            else request.tool_choice.model_dump(),
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
            "truncation": "disabled", "usage": None, "user": request.user, "metadata": request.metadata or {},
        }
        if self.finished is not None:
            usage = self.finished.usage
            body["usage"] = {
                "input_tokens": usage.num_prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.num_cached_prompt_tokens},
                "output_tokens": usage.num_output_tokens,
                "output_tokens_details": {"reasoning_tokens": usage.num_reasoning_tokens},
                "total_tokens": usage.num_prompt_tokens + usage.num_output_tokens,
            }
            if status == "incomplete":
                body["incomplete_details"] = {"reason": "max_output_tokens"}
            self._check_format(body)
        return body

    def _check_format(self, body: dict[str, Any]) -> None:
        json_format = self._prepared.prompt.json_format
        texts = [part["text"] for item in self.output if item["type"] == "message" for part in item["content"]]
        if json_format is not None and texts:
            _, error = check(json_format, "".join(texts))
            if error:
                body["response_format_error"] = error


class Responses:
    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, model_id: str, store: ResponseStore):
        self._engine = engine
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._store = store

    async def _run(self, prepared: PreparedResponse, record: RequestRecord,
                   builder: _ResponseBuilder) -> AsyncIterator[dict[str, Any]]:
        turn = AssistantTurn(self._engine, self._tokenizer, prepared.turn, record.tokens_arrived)
        async for event in turn.events():
            for stream_event in builder.on_turn_event(event):
                yield stream_event

    async def _finish(self, prepared: PreparedResponse, record: RequestRecord, builder: _ResponseBuilder) -> dict:
        finished = builder.finished
        status = "incomplete" if finished.finish_reason == "length" else "completed"
        response = builder.response(status)
        usage = finished.usage
        record.num_prompt_tokens, record.num_output_tokens = usage.num_prompt_tokens, usage.num_output_tokens
        record.num_reasoning_tokens, record.num_harmony_anomalies = usage.num_reasoning_tokens, len(finished.anomalies)
        record.outcome = finished.finish_reason if finished.finish_reason != "abort" else "aborted"
        if prepared.request.store:
            await self._store.put(prepared.response_id, {"input_items": prepared.input_items, "response": response})
        return response

    async def complete(self, prepared: PreparedResponse, record: RequestRecord) -> dict[str, Any]:
        builder = _ResponseBuilder(prepared, self._model_id)
        async for _ in self._run(prepared, record, builder):
            pass
        return await self._finish(prepared, record, builder)

    async def stream(self, prepared: PreparedResponse, record: RequestRecord) -> AsyncIterator[str]:
        builder = _ResponseBuilder(prepared, self._model_id)
        for event_type in ("response.created", "response.in_progress"):
            yield _sse(builder.event(event_type, response=builder.response("in_progress")))
        async for stream_event in self._run(prepared, record, builder):
            yield _sse(stream_event)
        response = await self._finish(prepared, record, builder)
        final_type = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield _sse(builder.event(final_type, response=response))


def _sse(event: dict[str, Any]) -> str:
    return sse(event, event=event["type"])
