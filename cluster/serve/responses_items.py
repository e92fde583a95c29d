"""Responses API items <-> chat-style messages, so the Responses API reuses the chat path to harmony.

Input items: messages (a role and text or text parts), `reasoning`, `function_call` and `function_call_output`.
Output items are built from a turn's events: `reasoning`, `message` (output_text) and `function_call`.
"""

from __future__ import annotations

import uuid
from typing import Any

from gptoss_serve.cluster.serve.errors import invalid_request
from gptoss_serve.cluster.serve.turn_events import ItemKind
from gptoss_serve.model.harmony.chat import ChatFormatError, content_text

_TEXT_PART_TYPES = ("input_text", "output_text", "text", "reasoning_text", "summary_text")
_MESSAGE_ROLES = ("user", "system", "developer", "assistant")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def normalize_input(input_value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items, a bare string becoming one user message."""
    if isinstance(input_value, str):
        return [{"type": "message", "role": "user", "content": input_value}]
    return list(input_value)


def items_to_chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        item_type = item.get("type", "message")
        if item_type == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise invalid_request(f"{where}: role must be one of {', '.join(_MESSAGE_ROLES)}, got {role!r}.",
                                      param=f"{where}.role")
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif item_type == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            messages.append({"role": "assistant", "reasoning_content": _text(parts, where)})
        elif item_type == "function_call":
            _require_strings(item, ("call_id", "name"), where)
            arguments = item.get("arguments", "{}")
            if not isinstance(arguments, str):
                raise invalid_request(f"{where}.arguments must be a JSON string.", param=f"{where}.arguments")
            messages.append({"role": "assistant", "tool_calls": [
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": arguments}}]})
        elif item_type == "function_call_output":
            _require_strings(item, ("call_id",), where)
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text(item.get("output"), where)})
        else:
            raise invalid_request(f"{where}: input items of type {item_type!r} are not supported.",
                                  param=f"{where}.type")
    return messages


def _require_strings(item: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if not isinstance(item.get(key), str) or not item[key]:
            raise invalid_request(f"{where}.{key} must be a non-empty string.", param=f"{where}.{key}")


def _text(content: Any, where: str) -> str:
    try:
        return content_text(content, where, _TEXT_PART_TYPES)
    except ChatFormatError as error:
        raise invalid_request(f"{error}.", param=f"{where}.content") from None


def function_tools_as_chat(tools: list[Any] | None) -> list[dict[str, Any]]:
    """Responses function tools ({type, name, description, parameters}) in chat format."""
    chat_tools = []
    for index, tool in enumerate(tools or []):
        if tool.type != "function" or not tool.name:
            raise invalid_request(f"tools[{index}]: only function tools with a name are supported "
                                  f"(got type {tool.type!r}).", param=f"tools[{index}]")
        function = {"name": tool.name, "description": tool.description or "",
                    "parameters": tool.parameters}
        chat_tools.append({"type": "function", "function": function})
    return chat_tools


def open_item(kind: ItemKind, function_name: str | None = None, call_id: str | None = None) -> dict[str, Any]:
    """An output item as it is announced, before any text."""
    if kind == ItemKind.REASONING:
        return {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
    if kind == ItemKind.TEXT:
        return {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    return {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call_id,
            "name": function_name, "arguments": ""}


def empty_part(kind: ItemKind) -> dict[str, Any]:
    if kind == ItemKind.REASONING:
        return {"type": "reasoning_text", "text": ""}
    return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}


def close_item(item: dict[str, Any], kind: ItemKind, text: str, status: str) -> dict[str, Any]:
    """The finished item: its whole text in place."""
    done = dict(item, status=status)
    if kind == ItemKind.TOOL_CALL:
        done["arguments"] = text
    else:
        done["content"] = [dict(empty_part(kind), text=text)]
    return done
