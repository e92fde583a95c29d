"""Request bodies of the OpenAI endpoints, validated once at the HTTP edge.

Validation is strict (JSON types are not coerced: `"max_tokens": "5"` is a 400, as at OpenAI), unknown fields
are ignored (clients send fields we do not use), and the few fields we cannot honour are refused by name
rather than ignored. Responses API input items stay plain dicts here: `responses_items.py` checks them.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from gptoss_serve.cluster.serve.errors import APIError, invalid_request


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ToolCallFunction(_Strict):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class SamplingFields(_Strict):
    """Sampling fields shared by all three endpoints (vLLM's extensions included)."""

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM extension: generate until the length limit (benchmarks)
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    return_token_ids: bool = False  # extension: prompt and sampled token ids in the response


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(default=16, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    best_of: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    stop: str | list[str] | None = None
    return_token_ids: bool = False


class ResponsesReasoning(_Strict):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None


class ResponsesTool(_Strict):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedToolChoice(_Strict):
    type: Literal["function"]
    name: str


class ResponsesTextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Strict):
    format: ResponsesTextFormat | None = None


class ResponsesRequest(SamplingFields):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ResponsesNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ResponsesReasoning | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    text: ResponsesText | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


def parse_request(model_cls: type[SamplingFields], body: bytes) -> SamplingFields:
    """The validated request, or a 400 APIError naming the first offending field."""
    try:
        request = model_cls.model_validate_json(body)
    except pydantic.ValidationError as error:
        raise _as_api_error(error) from None
    _refuse_unsupported(request)
    return request


def _as_api_error(error: pydantic.ValidationError) -> APIError:
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return invalid_request(f"The request body is not valid JSON: {first['msg']}", code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return invalid_request("The request body must be a JSON object.", code="invalid_json")
    # A union reports one error per alternative; the field path is what the client needs.
    loc = [str(part) for part in first["loc"] if not _is_union_branch(part)]
    param = ".".join(loc) or None
    num_errors = len(error.errors())
    more = f" ({num_errors - 1} more problems)" if num_errors > 1 and first["type"] != "missing" else ""
    message = f"Invalid value for '{param}': {first['msg']}{more}." if param else f"{first['msg']}."
    return invalid_request(message, param=param, code="invalid_type" if "type" in first["type"] else "invalid_value")


def _is_union_branch(part: Any) -> bool:
    return isinstance(part, str) and (part[:1].islower() and ("[" in part or part in ("str", "int", "float", "bool"))
                                      or part.startswith("function-") or part.startswith("literal["))


def _refuse_unsupported(request: SamplingFields) -> None:
    if request.logit_bias:
        raise invalid_request("logit_bias is not supported by this server.", param="logit_bias")
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise invalid_request("suffix is not supported by gpt-oss.", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise invalid_request("best_of other than n is not supported.", param="best_of")
        if isinstance(request.prompt, list) and not request.prompt:
            raise invalid_request("prompt must not be empty.", param="prompt")
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise invalid_request("top_logprobs needs logprobs=true.", param="top_logprobs")
        if request.response_format is not None and request.response_format.type == "json_schema" \
                and request.response_format.json_schema is None:
            raise invalid_request("response_format json_schema needs a json_schema object.",
                                  param="response_format.json_schema")
