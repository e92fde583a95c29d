"""OpenAI chat-completions requests -> harmony messages, for the HTTP layer.

Mapping, as gpt-oss expects it:
- the harmony system message is always first and carries reasoning effort and date; the request's
  `system`/`developer` messages are the application's instructions, so they become developer instructions
  (leading ones merged into the one developer message that also lists the tools, later ones in place);
- `tools` (OpenAI function format) become the developer message's `functions` namespace;
- an assistant's `reasoning_content` (or `reasoning`) is an analysis message; its `content` is the final
  answer, or a commentary preamble when the same turn makes tool calls; each tool call is a commentary
  message to `functions.NAME` with JSON arguments;
- a `tool` message is a result from `functions.NAME`, the name found through its `tool_call_id`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gptoss_serve.model.harmony.messages import (
    DEFAULT_MODEL_IDENTITY,
    FUNCTIONS_NAMESPACE,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolNamespace,
    ToolSpec,
    tool_call,
    tool_result,
)

_INSTRUCTION_ROLES = ("system", "developer")


class ChatFormatError(ValueError):
    """A chat request that cannot be expressed in harmony (bad role, unknown tool call id, image parts...)."""


def content_text(content: Any, where: str, part_types: Sequence[str] = ("text",)) -> str:
    """A message's text: a string, None, or a list of text parts of `part_types` (joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") in part_types and isinstance(part.get("text"), str)):
                raise ChatFormatError(f"{where}: only text content parts are supported, got {part!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts")


def function_tools(tools: Sequence[Mapping[str, Any]]) -> ToolNamespace:
    """The `functions` namespace of OpenAI-format tools: [{"type": "function", "function": {...}}]."""
    specs = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type", "function") != "function":
            raise ChatFormatError(f"tools[{index}]: only function tools are supported")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ChatFormatError(f"tools[{index}]: a function needs a name")
        specs.append(ToolSpec(function["name"], function.get("description") or "", function.get("parameters")))
    return ToolNamespace(FUNCTIONS_NAMESPACE, tuple(specs))


def _assistant_messages(chat_message: Mapping[str, Any], where: str, names_by_call_id: dict[str, str]) -> list[Message]:
    messages = []
    reasoning = chat_message.get("reasoning_content") or chat_message.get("reasoning")
    if reasoning:
        messages.append(Message(Role.ASSISTANT, content_text(reasoning, where), channel="analysis"))
    calls = chat_message.get("tool_calls") or []
    text = content_text(chat_message.get("content"), where)
    if text:
        messages.append(Message(Role.ASSISTANT, text, channel="commentary" if calls else "final"))
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ChatFormatError(f"{where}.tool_calls[{index}]: expected {{'function': {{'name', 'arguments'}}}}")
        arguments = function.get("arguments") or "{}"
        if call.get("id") is not None:
            names_by_call_id[call["id"]] = function["name"]
        messages.append(tool_call(function["name"], arguments))
    return messages


def _tool_result_message(chat_message: Mapping[str, Any], where: str, names_by_call_id: dict[str, str]) -> Message:
    name = chat_message.get("name") or names_by_call_id.get(chat_message.get("tool_call_id"))
    if not name:
        raise ChatFormatError(f"{where}: tool message whose tool_call_id matches no earlier tool call")
    return tool_result(name, content_text(chat_message.get("content"), where))


def conversation_from_chat(
    chat_messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    reasoning_effort: str | None = None,
    conversation_start_date: str | None = None,
    model_identity: str = DEFAULT_MODEL_IDENTITY,
) -> list[Message]:
    """Harmony messages for a chat request; render them with render_conversation_for_completion."""
    try:
        effort = ReasoningEffort(reasoning_effort or ReasoningEffort.MEDIUM.value)
    except ValueError:
        raise ChatFormatError(f"reasoning_effort must be low, medium or high, got {reasoning_effort!r}") from None
    system = SystemContent(
        model_identity=model_identity, conversation_start_date=conversation_start_date, reasoning_effort=effort
    )
    messages = [Message(Role.SYSTEM, system)]

    num_leading_instructions = 0
    for chat_message in chat_messages:
        if chat_message.get("role") not in _INSTRUCTION_ROLES:
            break
        num_leading_instructions += 1
    instructions = [
        content_text(chat_messages[index].get("content"), f"messages[{index}]")
        for index in range(num_leading_instructions)
    ]
    namespaces = (function_tools(tools),) if tools else ()
    if instructions or namespaces:
        joined_instructions = "\n\n".join(instructions) if instructions else None
        messages.append(Message(Role.DEVELOPER, DeveloperContent(joined_instructions, namespaces)))

    names_by_call_id: dict[str, str] = {}
    for index in range(num_leading_instructions, len(chat_messages)):
        chat_message, where = chat_messages[index], f"messages[{index}]"
        role = chat_message.get("role")
        if role in _INSTRUCTION_ROLES:
            later_instructions = DeveloperContent(instructions=content_text(chat_message.get("content"), where))
            messages.append(Message(Role.DEVELOPER, later_instructions))
        elif role == "user":
            messages.append(Message(Role.USER, content_text(chat_message.get("content"), where)))
        elif role == "assistant":
            messages += _assistant_messages(chat_message, where, names_by_call_id)
        elif role == "tool":
            messages.append(_tool_result_message(chat_message, where, names_by_call_id))
        else:
            raise ChatFormatError(f"{where}: unknown role {role!r}")
    return messages
