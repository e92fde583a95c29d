"""Harmony conversation data: plain frozen dataclasses, independent of the openai_harmony package."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
DEFAULT_CHANNELS = ("analysis", "commentary", "final")
FUNCTIONS_NAMESPACE = "functions"  # the namespace of developer-defined function tools
JSON_CONTENT_TYPE = "<|constrain|>json"  # what tool-call arguments are declared as


class Role(enum.StrEnum):
    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ReasoningEffort(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One callable tool; `parameters` is a JSON schema, None for a tool that takes no arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class ToolNamespace:
    """Tools rendered together as `## name` (`functions` for developer tools, `browser`/`python` built-ins)."""

    name: str
    tools: tuple[ToolSpec, ...] = ()
    description: str | None = None  # free text above the namespace; the whole section when there are no tools


def _check_unique_namespaces(namespaces: tuple[ToolNamespace, ...]) -> None:
    names = [namespace.name for namespace in namespaces]
    if len(set(names)) != len(names):
        raise ValueError(f"tool namespaces must have distinct names, got {names}")


@dataclasses.dataclass(frozen=True)
class SystemContent:
    """The model-level preamble. A None field leaves its line out."""

    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    conversation_start_date: str | None = None  # "YYYY-MM-DD"
    reasoning_effort: ReasoningEffort | None = ReasoningEffort.MEDIUM
    valid_channels: tuple[str, ...] = DEFAULT_CHANNELS
    channel_required: bool = True
    tools: tuple[ToolNamespace, ...] = ()  # built-in tools (browser, python)

    def __post_init__(self):
        _check_unique_namespaces(self.tools)


@dataclasses.dataclass(frozen=True)
class DeveloperContent:
    """The application's instructions and its function tools."""

    instructions: str | None = None
    tools: tuple[ToolNamespace, ...] = ()

    def __post_init__(self):
        _check_unique_namespaces(self.tools)

    @property
    def has_function_tools(self) -> bool:
        return any(namespace.name == FUNCTIONS_NAMESPACE and namespace.tools for namespace in self.tools)


@dataclasses.dataclass(frozen=True)
class Message:
    """One harmony message. For a tool result, `name` is the tool (`functions.get_weather`) and role is TOOL."""

    role: Role
    content: str | SystemContent | DeveloperContent
    name: str | None = None
    recipient: str | None = None  # `functions.x` on a tool call, `assistant` on a tool result
    channel: str | None = None
    content_type: str | None = None  # JSON_CONTENT_TYPE on tool calls

    def __post_init__(self):
        if isinstance(self.content, SystemContent) and self.role != Role.SYSTEM:
            raise ValueError("SystemContent belongs in a system message")
        if isinstance(self.content, DeveloperContent) and self.role != Role.DEVELOPER:
            raise ValueError("DeveloperContent belongs in a developer message")
        if self.role == Role.TOOL and not self.name:
            raise ValueError("a tool message needs the tool's name, e.g. functions.get_weather")

    @property
    def text(self) -> str:
        """The content of a text message ('' for system/developer content)."""
        return self.content if isinstance(self.content, str) else ""


def tool_call(function_name: str, arguments_json: str, namespace: str = FUNCTIONS_NAMESPACE) -> Message:
    """An assistant call of a function tool, as the model writes it."""
    return Message(
        Role.ASSISTANT,
        arguments_json,
        recipient=f"{namespace}.{function_name}",
        channel="commentary",
        content_type=JSON_CONTENT_TYPE,
    )


def tool_result(function_name: str, output: str, namespace: str = FUNCTIONS_NAMESPACE) -> Message:
    """The output of a function tool, handed back to the assistant."""
    return Message(Role.TOOL, output, name=f"{namespace}.{function_name}", recipient="assistant", channel="commentary")
