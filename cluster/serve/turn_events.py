"""What one sampled assistant turn looks like to the API layers: messages opening, text arriving, closing.

The harmony parser's messages are mapped to API kinds (reasoning, visible text, tool call) here once, so that
chat completions and the Responses API only differ in how they print these events.
"""

from __future__ import annotations

import dataclasses
import enum


class ItemKind(str, enum.Enum):
    REASONING = "reasoning"  # analysis channel -> reasoning_content / a reasoning item
    TEXT = "text"  # final answer, or a commentary preamble shown before tool calls -> content / a message item
    TOOL_CALL = "tool_call"  # a function call -> tool_calls / a function_call item


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple["TokenLogprob", ...] = ()  # the most likely alternatives, best first

    def to_chat_dict(self) -> dict:
        return {"token": self.token, "logprob": self.logprob, "bytes": list(self.bytes),
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in self.top]}


@dataclasses.dataclass(frozen=True)
class ItemOpened:
    item_index: int  # position among the turn's visible items
    kind: ItemKind
    function_name: str | None = None  # tool calls only
    call_id: str | None = None  # tool calls only


@dataclasses.dataclass(frozen=True)
class ItemDelta:
    item_index: int
    kind: ItemKind
    text: str  # may be '' when only logprobs arrive
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class ItemClosed:
    item_index: int
    kind: ItemKind
    text: str  # the whole text of the item, as streamed
    function_name: str | None = None
    call_id: str | None = None


@dataclasses.dataclass(frozen=True)
class TurnUsage:
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_output_tokens: int  # every token of the turn, forced header tokens included
    num_reasoning_tokens: int  # tokens of analysis messages, headers included


@dataclasses.dataclass(frozen=True)
class TurnFinished:
    finish_reason: str  # "stop", "length", "tool_calls" or "abort"
    usage: TurnUsage
    output_token_ids: tuple[int, ...]
    anomalies: tuple[str, ...]  # what the harmony parser had to repair


TurnEvent = ItemOpened | ItemDelta | ItemClosed | TurnFinished
