"""Harmony rendering: a conversation becomes the exact token ids openai_harmony's HarmonyGptOss encoding gives.

A message is `<|start|>{header}<|message|>{content}<|end|>`, with `<|call|>` instead of `<|end|>` when the
assistant addresses a tool. Each header piece is tokenized on its own (role, ` to=...`, channel, content type),
so BPE never merges across piece boundaries; matching openai_harmony means cutting the text at the same places.
"""

from __future__ import annotations

from collections.abc import Sequence

from gptoss_serve.model.harmony.messages import (
    FUNCTIONS_NAMESPACE,
    DeveloperContent,
    Message,
    Role,
    SystemContent,
)
from gptoss_serve.model.harmony.tools import tools_section_text
from gptoss_serve.model.tokenizer import SpecialToken, Tokenizer, load_tokenizer

_CONSTRAIN_NAME = "<|constrain|>"


def system_text(content: SystemContent, conversation_has_function_tools: bool) -> str:
    """Identity/dates, reasoning effort, built-in tools and channel rules, as blank-line separated sections."""
    sections = []
    top_lines = []
    if content.model_identity is not None:
        top_lines.append(content.model_identity)
    if content.knowledge_cutoff is not None:
        top_lines.append(f"Knowledge cutoff: {content.knowledge_cutoff}")
    if content.conversation_start_date is not None:
        top_lines.append(f"Current date: {content.conversation_start_date}")
    if top_lines:
        sections.append("\n".join(top_lines))
    if content.reasoning_effort is not None:
        sections.append(f"Reasoning: {content.reasoning_effort.value}")
    if content.tools:
        sections.append(tools_section_text(content.tools))
    if content.valid_channels:
        channels_text = f"# Valid channels: {', '.join(content.valid_channels)}."
        if content.channel_required:
            channels_text += " Channel must be included for every message."
        if conversation_has_function_tools:
            channels_text += f"\nCalls to these tools must go to the commentary channel: '{FUNCTIONS_NAMESPACE}'."
        sections.append(channels_text)
    return "\n\n".join(sections)


def developer_text(content: DeveloperContent) -> str:
    sections = []
    if content.instructions is not None:
        sections += ["# Instructions", content.instructions]
    if content.tools:
        sections.append(tools_section_text(content.tools))
    return "\n\n".join(sections)


def render_message(
    message: Message, conversation_has_function_tools: bool = False, tokenizer: Tokenizer | None = None
) -> list[int]:
    """Token ids of one message. `conversation_has_function_tools` adds the commentary-channel rule to system text."""
    tokenizer = tokenizer or load_tokenizer()
    encode = tokenizer.encode
    ids = [SpecialToken.START]
    if message.role == Role.TOOL:
        ids += encode(message.name)  # a tool result is headed by the tool's name alone
    else:
        ids += encode(message.role.value)
        if message.name is not None:
            ids += encode(f":{message.name}")
    if message.recipient is not None and message.recipient != "all":
        ids += encode(f" to={message.recipient}")
    if message.channel is not None:
        ids += [SpecialToken.CHANNEL, *encode(message.channel)]
    if message.content_type is not None:
        if message.content_type.startswith(_CONSTRAIN_NAME):
            ids += [*encode(" "), SpecialToken.CONSTRAIN, *encode(message.content_type[len(_CONSTRAIN_NAME) :])]
        else:
            ids += encode(f" {message.content_type}")
    ids.append(SpecialToken.MESSAGE)
    if isinstance(message.content, SystemContent):
        ids += encode(system_text(message.content, conversation_has_function_tools))
    elif isinstance(message.content, DeveloperContent):
        ids += encode(developer_text(message.content))
    else:
        ids += encode(message.content)
    is_tool_call = message.role == Role.ASSISTANT and message.recipient is not None
    ids.append(SpecialToken.CALL if is_tool_call else SpecialToken.END)
    return [int(token_id) for token_id in ids]


def messages_to_render(messages: Sequence[Message], auto_drop_analysis: bool = True) -> list[Message]:
    """The messages that get rendered.

    When the last assistant message is a final answer, analysis messages before the first final message
    are dropped (openai_harmony's Python default): old chain-of-thought is not shown to the model again.
    Analysis between a tool call and its final answer stays, because it comes after no final message.
    """
    last_assistant = next((m for m in reversed(messages) if m.role == Role.ASSISTANT), None)
    if not (auto_drop_analysis and last_assistant is not None and last_assistant.channel == "final"):
        return list(messages)
    first_final_index = next(i for i, m in enumerate(messages) if m.channel == "final")
    return [m for i, m in enumerate(messages) if not (i < first_final_index and m.channel == "analysis")]


def _has_function_tools(messages: Sequence[Message]) -> bool:
    return any(isinstance(m.content, DeveloperContent) and m.content.has_function_tools for m in messages)


def render_conversation(
    messages: Sequence[Message], auto_drop_analysis: bool = True, tokenizer: Tokenizer | None = None
) -> list[int]:
    """Token ids of the whole conversation, with no next turn opened."""
    has_function_tools = _has_function_tools(messages)
    ids = []
    for message in messages_to_render(messages, auto_drop_analysis):
        ids += render_message(message, has_function_tools, tokenizer)
    return ids


def render_conversation_for_completion(
    messages: Sequence[Message],
    next_role: Role = Role.ASSISTANT,
    auto_drop_analysis: bool = True,
    tokenizer: Tokenizer | None = None,
) -> list[int]:
    """The prompt for sampling: the conversation, then `<|start|>assistant` for the model to continue."""
    tokenizer = tokenizer or load_tokenizer()
    prompt_ids = render_conversation(messages, auto_drop_analysis, tokenizer)
    return prompt_ids + [int(SpecialToken.START), *tokenizer.encode(next_role.value)]


def render_conversation_for_training(
    messages: Sequence[Message], auto_drop_analysis: bool = True, tokenizer: Tokenizer | None = None
) -> list[int]:
    """As render_conversation, but a trailing assistant final message ends in `<|return|>`, as sampled."""
    ids = render_conversation(messages, auto_drop_analysis, tokenizer)
    last = messages[-1] if messages else None
    if ids and last is not None and last.role == Role.ASSISTANT and last.channel == "final":
        ids[-1] = int(SpecialToken.RETURN)
    return ids
