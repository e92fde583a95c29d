"""Sampled token ids of one assistant turn -> API items (reasoning, text, tool calls), never raising.

Wraps the harmony stream parser and adds what the API needs on top: which item each token belongs to (for
reasoning-token usage and per-token logprobs), stop strings on the answer text, tool-call ids, and dropping
tool calls the request did not allow (tool_choice "none").
"""

from __future__ import annotations

import uuid
from typing import Sequence

from gptoss_serve.cluster.serve.stop_strings import StopStringMatcher
from gptoss_serve.cluster.serve.turn_events import ItemClosed, ItemDelta, ItemKind, ItemOpened, TokenLogprob
from gptoss_serve.model.harmony.parser import Delta, HarmonyStreamParser, Kind
from gptoss_serve.model.tokenizer import SpecialToken, Tokenizer

_KIND_BY_PARSER_KIND = {
    Kind.REASONING: ItemKind.REASONING,
    Kind.PREAMBLE: ItemKind.TEXT,
    Kind.FINAL: ItemKind.TEXT,
    Kind.TOOL_CALL: ItemKind.TOOL_CALL,
}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class TurnParser:
    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), drop_tool_calls: bool = False,
                 num_top_logprobs: int | None = None):
        self._tokenizer = tokenizer
        self._parser = HarmonyStreamParser(tokenizer)
        self._stop = StopStringMatcher(stop_strings)
        self._drop_tool_calls = drop_tool_calls
        self._num_top_logprobs = num_top_logprobs  # None: no logprobs
        self._num_closed = 0  # harmony messages closed so far
        self._open_message: int | None = None  # index of the harmony message being streamed
        self._open_kind: ItemKind | None = None
        self._open_item: int | None = None  # its item index; None when dropped
        self._open_call: tuple[str, str] | None = None  # (function name, call id)
        self._open_text: list[str] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self._num_items = 0
        self._item_kinds: list[ItemKind] = []
        self._header_tokens: list[tuple[int, dict | None]] = []  # (id, logprobs) not yet known to belong to a message
        self.num_tokens_by_kind = {kind: 0 for kind in ItemKind}
        self.dropped_tool_calls: list[str] = []

    @property
    def stopped_by_string(self) -> bool:
        return self._stop.matched is not None

    @property
    def has_tool_call(self) -> bool:
        return any(kind == ItemKind.TOOL_CALL for kind in self._item_kinds)

    @property
    def num_header_tokens(self) -> int:
        """Tokens since the last message ended that have not opened a message yet."""
        return len(self._header_tokens)

    @property
    def anomalies(self) -> list[str]:
        return self._parser.anomalies

    def feed(self, token_id: int, logprobs: dict[int, float] | None = None) -> list:
        events: list = []
        if self.stopped_by_string:
            return events
        for delta in self._parser.feed(token_id):
            events += self._on_delta(delta)
        closed_now = self._count_closed()
        events += self._attribute(token_id, logprobs, closed_now)
        return events

    def finish(self) -> list:
        """Closes whatever is still open (sampling may stop anywhere)."""
        events: list = []
        result = self._parser.finish()
        for delta in result.tail_deltas:
            events += self._on_delta(delta)
        header, self._header_tokens = self._header_tokens, []
        self.num_tokens_by_kind[ItemKind.TEXT] += len(header)  # a cut header: its tokens count as answer text
        if self._open_message is not None:
            for token_id, logprobs in header:
                self._add_logprob(self._open_kind, token_id, logprobs)
            events += self._close()
        return events

    # Parser deltas -> items --------------------------------------------------------------------------------
    def _on_delta(self, delta: Delta) -> list:
        events = []
        if delta.message_index != self._open_message:
            if self._open_message is not None:
                events += self._close()
            events += self._open(delta)
        if delta.text and self._open_item is not None:
            events += self._text(delta.text)
        return events

    def _open(self, delta: Delta) -> list:
        self._open_message, self._open_text = delta.message_index, []
        self._open_kind = _KIND_BY_PARSER_KIND[delta.kind]
        self._open_call = None
        if self._open_kind == ItemKind.TOOL_CALL:
            name = (delta.recipient or "").removeprefix("functions.")
            if self._drop_tool_calls:
                self.dropped_tool_calls.append(name)
                self._open_item = None
                return []
            self._open_call = (name, new_call_id())
        self._open_item = self._num_items
        self._num_items += 1
        self._item_kinds.append(self._open_kind)
        name, call_id = self._open_call or (None, None)
        return [ItemOpened(self._open_item, self._open_kind, name, call_id)]

    def _text(self, text: str) -> list:
        if self._open_kind == ItemKind.TEXT:
            text = self._stop.push(text)
        if not text:
            return []
        self._open_text.append(text)
        logprobs, self._pending_logprobs = tuple(self._pending_logprobs), []
        return [ItemDelta(self._open_item, self._open_kind, text, logprobs)]

    def _close(self) -> list:
        events = []
        if self._open_item is not None:
            if self._open_kind == ItemKind.TEXT:
                tail = self._stop.flush()
                if tail:
                    events += self._text(tail)
            if self._pending_logprobs:
                events.append(ItemDelta(self._open_item, self._open_kind, "", tuple(self._pending_logprobs)))
                self._pending_logprobs = []
            name, call_id = self._open_call or (None, None)
            events.append(ItemClosed(self._open_item, self._open_kind, "".join(self._open_text), name, call_id))
        self._open_message = self._open_item = self._open_kind = None
        return events

    def _count_closed(self) -> bool:
        num_closed = len(self._parser.messages)
        closed_now = num_closed > self._num_closed
        self._num_closed = num_closed
        return closed_now

    # Tokens -> items ---------------------------------------------------------------------------------------
    def _attribute(self, token_id: int, logprobs: dict[int, float] | None, closed_now: bool) -> list:
        """Counts the token for the item it belongs to; header tokens wait for their message to open."""
        message_is_open = self._open_message is not None and self._open_message == self._num_closed
        events = []
        if message_is_open or closed_now:
            kind = self._open_kind or ItemKind.TEXT
            header, self._header_tokens = self._header_tokens, []
            self.num_tokens_by_kind[kind] += 1 + len(header)
            if token_id != SpecialToken.MESSAGE:  # the header was salvaged as text: its tokens are content
                for header_token_id, header_logprobs in header:
                    self._add_logprob(kind, header_token_id, header_logprobs)
            self._add_logprob(kind, token_id, logprobs)
        else:
            self._header_tokens.append((token_id, logprobs))
        if closed_now and self._open_message is not None and self._open_message < self._num_closed:
            events += self._close()
        return events

    def _add_logprob(self, kind: ItemKind, token_id: int, logprobs: dict[int, float] | None) -> None:
        if (logprobs and self._num_top_logprobs is not None and kind == ItemKind.TEXT
                and self._open_item is not None and not self._tokenizer.is_special(token_id)):
            self._pending_logprobs.append(self._token_logprob(token_id, logprobs))

    def _token_logprob(self, token_id: int, logprobs: dict[int, float]) -> TokenLogprob:
        top = sorted(logprobs.items(), key=lambda item: -item[1])[: self._num_top_logprobs]
        alternatives = tuple(token_logprob(self._tokenizer, t, lp) for t, lp in top)
        return token_logprob(self._tokenizer, token_id, logprobs.get(token_id, float("-inf")), alternatives)


def token_logprob(tokenizer: Tokenizer, token_id: int, logprob: float,
                  top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
    """A token as OpenAI prints it: its text (a split UTF-8 character shows as U+FFFD) and its raw bytes."""
    raw = tokenizer.token_bytes(token_id)
    return TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, tuple(raw), top)
