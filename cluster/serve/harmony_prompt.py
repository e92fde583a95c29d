"""Chat-style messages, tools, tool choice and output format -> the harmony prompt and the answer constraint.

Shared by chat completions and the Responses API (which first turns its input items into chat messages).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from gptoss_serve.cluster.serve.assistant_turn import AnswerConstraint, AnswerKind
from gptoss_serve.cluster.serve.errors import invalid_request
from gptoss_serve.cluster.serve.response_format import JsonFormat, developer_instructions
from gptoss_serve.model.harmony.chat import ChatFormatError, conversation_from_chat
from gptoss_serve.model.harmony.render import render_conversation_for_completion
from gptoss_serve.model.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto", "none" or "required"
    function_name: str | None = None  # a named function (mode "required")


@dataclasses.dataclass(frozen=True)
class HarmonyPrompt:
    prompt_token_ids: list[int]
    constraint: AnswerConstraint
    json_format: JsonFormat | None


def resolve_tool_choice(tools: Sequence[dict[str, Any]], mode: str | None, function_name: str | None,
                        param: str = "tool_choice") -> ToolChoice:
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise invalid_request("Function names in tools must be unique.", param="tools")
    if function_name is not None:
        if function_name not in names:
            raise invalid_request(f"tool_choice names the function {function_name!r}, which is not in tools "
                                  f"({', '.join(names) or 'none given'}).", param=param)
        return ToolChoice("required", function_name)
    mode = mode or ("auto" if tools else "none")
    if mode == "required" and not tools:
        raise invalid_request("tool_choice 'required' needs at least one tool in tools.", param=param)
    return ToolChoice(mode)


def build_harmony_prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                         tool_choice: ToolChoice, reasoning_effort: str | None,
                         json_format: JsonFormat | None) -> HarmonyPrompt:
    """tools are in chat format: [{"type": "function", "function": {"name", "description", "parameters"}}]."""
    if json_format is not None:
        messages = _with_format_instructions(messages, developer_instructions(json_format))
    offered_tools = tools if tool_choice.mode != "none" else []
    try:
        conversation = conversation_from_chat(messages, offered_tools or None, reasoning_effort)
    except ChatFormatError as error:
        raise invalid_request(str(error), param="messages") from None
    prompt_token_ids = render_conversation_for_completion(conversation, tokenizer=tokenizer)
    return HarmonyPrompt(prompt_token_ids, _constraint(tools, tool_choice, json_format), json_format)


def _constraint(tools: list[dict[str, Any]], tool_choice: ToolChoice, json_format: JsonFormat | None) -> AnswerConstraint:
    if tool_choice.mode == "required":
        names = (tool_choice.function_name,) if tool_choice.function_name else tuple(
            tool["function"]["name"] for tool in tools)
        return AnswerConstraint(AnswerKind.TOOL_CALL, tool_names=names)
    drop_tool_calls = tool_choice.mode == "none"
    if json_format is not None:
        return AnswerConstraint(AnswerKind.FINAL, allow_tool_calls=not drop_tool_calls and bool(tools),
                                drop_tool_calls=drop_tool_calls)
    return AnswerConstraint(AnswerKind.FREE, drop_tool_calls=drop_tool_calls)


def _with_format_instructions(messages: list[dict[str, Any]], instructions: str) -> list[dict[str, Any]]:
    """Adds the format section after the leading system/developer messages, which become one developer message."""
    num_leading = 0
    while num_leading < len(messages) and messages[num_leading].get("role") in ("system", "developer"):
        num_leading += 1
    return messages[:num_leading] + [{"role": "developer", "content": instructions}] + messages[num_leading:]
