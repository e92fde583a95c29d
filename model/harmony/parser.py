"""Streaming parser for sampled harmony: token ids in, text deltas and finished messages out.

Sampling starts after the prompt's trailing `<|start|>assistant`, so the first header has no role text:

    <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>
    <|channel|>commentary to=functions.f <|constrain|>json<|message|>{"x": 1}<|call|>

A model can emit anything, so nothing here raises on token ids: what does not fit the grammar is kept as
plain text where that loses nothing, dropped where it is a stray special token, and always written to
`anomalies` so the server can log it.
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import operator

from gptoss_serve.model.harmony.messages import DEFAULT_CHANNELS, Message, Role
from gptoss_serve.model.tokenizer import SpecialToken, Tokenizer, load_tokenizer

MAX_HEADER_TOKENS = 64  # a longer header is the model writing text without <|message|>; stream it as text
MAX_ANOMALIES = 100  # a garbage stream should not grow the log without bound

_CHANNEL_NAME = "<|channel|>"
_CONSTRAIN_NAME = "<|constrain|>"
_HEADER_SPECIALS = (SpecialToken.CHANNEL, SpecialToken.CONSTRAIN)  # specials that belong inside a header
_TURN_STOPS = (SpecialToken.RETURN, SpecialToken.CALL)
_NOT_TOOLS = (None, "all", "assistant", "user")  # recipients that do not make a message a tool call
_ROLE_NAMES = frozenset(role.value for role in Role)


class Kind(enum.StrEnum):
    """What a message means to the API."""

    REASONING = "reasoning"  # analysis channel: chain of thought
    PREAMBLE = "preamble"  # commentary without a recipient: text shown to the user before tool calls
    TOOL_CALL = "tool_call"  # any message with a tool recipient
    FINAL = "final"  # the answer; also text that arrived without a usable header


def message_kind(channel: str | None, recipient: str | None) -> Kind:
    if recipient not in _NOT_TOOLS:
        return Kind.TOOL_CALL
    if channel == "analysis":
        return Kind.REASONING
    if channel == "commentary":
        return Kind.PREAMBLE
    return Kind.FINAL


@dataclasses.dataclass(frozen=True)
class Delta:
    """New text of the message at `message_index`; every message opens with a delta whose text is ''."""

    message_index: int
    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str

    @property
    def kind(self) -> Kind:
        return message_kind(self.channel, self.recipient)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    recipient: str  # e.g. functions.get_weather
    arguments: str  # the JSON text as sampled; may be invalid JSON
    content_type: str | None

    @property
    def function_name(self) -> str:
        """The name without the `functions.` namespace; other recipients (browser.search) stay whole."""
        return self.recipient.removeprefix("functions.")


@dataclasses.dataclass(frozen=True)
class ParseResult:
    messages: tuple[Message, ...]
    anomalies: tuple[str, ...]
    stop_token_id: int | None  # the <|return|> or <|call|> that ended the stream; None if it ended otherwise
    truncated: bool  # sampling stopped inside a message (e.g. at max_tokens)
    tail_deltas: tuple[Delta, ...]  # text released by finish(): bytes of a cut UTF-8 sequence, a cut header

    def text_of(self, kind: Kind) -> str:
        """All text of one kind, concatenated exactly as its deltas streamed."""
        return "".join(m.text for m in self.messages if message_kind(m.channel, m.recipient) == kind)

    @property
    def reasoning_text(self) -> str:
        return self.text_of(Kind.REASONING)

    @property
    def final_text(self) -> str:
        return self.text_of(Kind.FINAL)

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(
            ToolCall(m.recipient, m.text, m.content_type)
            for m in self.messages
            if message_kind(m.channel, m.recipient) == Kind.TOOL_CALL
        )


@dataclasses.dataclass
class _Header:
    role: Role = Role.ASSISTANT
    name: str | None = None
    recipient: str | None = None
    channel: str | None = None
    content_type: str | None = None


class _State(enum.Enum):
    EXPECT_START = "expect_start"  # between messages
    HEADER = "header"  # after <|start|>, collecting ids up to <|message|>
    CONTENT = "content"  # after <|message|>, streaming text up to <|end|>/<|return|>/<|call|>


class HarmonyStreamParser:
    """Feed sampled ids one at a time; get deltas back; call finish() once sampling stops."""

    def __init__(self, tokenizer: Tokenizer | None = None, role: Role | None = Role.ASSISTANT):
        """`role` is the role already in the prompt (`<|start|>assistant`); None if sampling starts cold."""
        self._tokenizer = tokenizer or load_tokenizer()
        self._messages: list[Message] = []
        self._anomalies: list[str] = []
        self._stop_token_id: int | None = None
        self._turn_stopped = False  # a stop token came and nothing after it yet
        self._header_role = role
        self._header_ids: list[int] = []
        self._state = _State.HEADER if role is not None else _State.EXPECT_START
        self._header = _Header()
        self._text_parts: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def messages(self) -> list[Message]:
        """Messages finished so far."""
        return list(self._messages)

    @property
    def anomalies(self) -> list[str]:
        return list(self._anomalies)

    def feed(self, token_id: int) -> list[Delta]:
        try:
            token_id = operator.index(token_id)
        except TypeError:
            self._note(f"non-integer token {token_id!r} ignored")
            return []
        if not 0 <= token_id < self._tokenizer.vocab_size:
            self._note(f"token id {token_id} outside the vocabulary ignored")
            return []
        if self._turn_stopped:
            self._note(f"token {self._describe(token_id)} after the turn stopped; parsing on")
            self._stop_token_id, self._turn_stopped = None, False
        if self._state == _State.HEADER:
            return self._feed_header(token_id)
        if self._state == _State.CONTENT:
            return self._feed_content(token_id)
        return self._feed_between_messages(token_id)

    def finish(self) -> ParseResult:
        """Close whatever is open and return everything parsed. Sampling may have stopped anywhere."""
        inside_header = self._state == _State.HEADER and bool(self._header_ids)
        truncated = inside_header or self._state == _State.CONTENT
        tail_deltas = []
        if inside_header:
            self._note("sampling stopped inside a message header")
            tail_deltas = self._header_as_text()
        if self._state == _State.CONTENT:
            tail_deltas += self._close_message()
        self._state, self._header_role, self._header_ids = _State.EXPECT_START, None, []
        return ParseResult(
            messages=tuple(self._messages),
            anomalies=tuple(self._anomalies),
            stop_token_id=self._stop_token_id,
            truncated=truncated,
            tail_deltas=tuple(tail_deltas),
        )

    def _feed_between_messages(self, token_id: int) -> list[Delta]:
        if token_id == SpecialToken.START:
            self._begin_header(role=None)
            return []
        if token_id == SpecialToken.CHANNEL:
            self._note("<|channel|> without <|start|>; assuming an assistant header")
            self._begin_header(role=Role.ASSISTANT)
            self._header_ids.append(token_id)
            return []
        if token_id in _TURN_STOPS:
            self._note(f"{self._describe(token_id)} between messages")
            self._after_message_end(token_id)
            return []
        if self._tokenizer.is_special(token_id):
            self._note(f"stray {self._describe(token_id)} between messages dropped")
            return []
        self._note("text outside a message kept as a message without header")
        deltas = self._open_message(_Header())
        return deltas + self._feed_content(token_id)

    def _feed_header(self, token_id: int) -> list[Delta]:
        if token_id == SpecialToken.MESSAGE:
            return self._open_message(self._parse_header())
        if token_id in (SpecialToken.END, *_TURN_STOPS):
            self._note(f"{self._describe(token_id)} before <|message|>; header kept as text")
            deltas = self._salvage_header()
            self._state = _State.EXPECT_START
            self._after_message_end(token_id)
            return deltas
        if token_id == SpecialToken.START:
            self._note("<|start|> inside a header; header kept as text")
            deltas = self._salvage_header()
            self._begin_header(role=None)
            return deltas
        if self._tokenizer.is_special(token_id) and token_id not in _HEADER_SPECIALS:
            self._note(f"stray {self._describe(token_id)} in a header dropped")
            return []
        self._header_ids.append(token_id)
        if len(self._header_ids) > MAX_HEADER_TOKENS:
            self._note(f"header longer than {MAX_HEADER_TOKENS} tokens; kept as text")
            return self._header_as_text()
        return []

    def _feed_content(self, token_id: int) -> list[Delta]:
        if token_id == SpecialToken.END or token_id in _TURN_STOPS:
            deltas = self._close_message()
            self._after_message_end(token_id)
            return deltas
        if token_id == SpecialToken.START:
            self._note("<|start|> before the message ended; message closed")
            deltas = self._close_message()
            self._begin_header(role=None)
            return deltas
        if self._tokenizer.is_special(token_id):
            self._note(f"stray {self._describe(token_id)} in message content dropped")
            return []
        # The incremental decoder holds back the first bytes of a character split across tokens.
        return self._emit(self._utf8.decode(self._tokenizer.token_bytes(token_id)))

    def _begin_header(self, role: Role | None) -> None:
        self._state, self._header_role, self._header_ids = _State.HEADER, role, []

    def _open_message(self, header: _Header) -> list[Delta]:
        self._state, self._header, self._header_ids = _State.CONTENT, header, []
        self._text_parts = []
        self._utf8.reset()
        return [self._delta("")]

    def _salvage_header(self) -> list[Delta]:
        """A header cut short by an end or start token: keep its text as a finished message, if it had any."""
        if not self._header_ids:
            return []
        return self._header_as_text() + self._close_message()

    def _header_as_text(self) -> list[Delta]:
        """A header that never reached <|message|> is the model writing text: keep role and channel, text the rest."""
        header_text = self._tokenizer.decode(self._header_ids)
        header = _Header(role=self._header_role or Role.ASSISTANT)
        channel_start = header_text.find(_CHANNEL_NAME)
        if channel_start >= 0:
            header.channel, remainder = self._split_channel(header_text[channel_start + len(_CHANNEL_NAME) :])
            header_text = header_text[:channel_start] + remainder
        words = header_text.split(maxsplit=1)
        if self._header_role is None and words and words[0] in _ROLE_NAMES:
            header.role = Role(words[0])
            header_text = words[1] if len(words) > 1 else ""
        return self._open_message(header) + self._emit(header_text.lstrip() if channel_start >= 0 else header_text)

    def _emit(self, text: str) -> list[Delta]:
        if not text:
            return []
        self._text_parts.append(text)
        return [self._delta(text)]

    def _close_message(self) -> list[Delta]:
        deltas = self._emit(self._utf8.decode(b"", final=True))
        header = self._header
        text = "".join(self._text_parts)
        message = Message(header.role, text, header.name, header.recipient, header.channel, header.content_type)
        self._messages.append(message)
        self._state, self._text_parts = _State.EXPECT_START, []
        return deltas

    def _after_message_end(self, token_id: int) -> None:
        if token_id in _TURN_STOPS:
            self._stop_token_id, self._turn_stopped = token_id, True
            last = self._messages[-1] if self._messages else None
            if token_id == SpecialToken.CALL and (last is None or last.recipient in _NOT_TOOLS):
                self._note("<|call|> ended a message without a tool recipient")

    def _delta(self, text: str) -> Delta:
        header = self._header
        return Delta(len(self._messages), header.channel, header.recipient, header.content_type, text)

    @staticmethod
    def _split_channel(after_marker: str) -> tuple[str | None, str]:
        """The channel name runs up to whitespace or the next `<|...|>`; returns (channel, rest of header)."""
        end = next((i for i, char in enumerate(after_marker) if char.isspace() or char == "<"), len(after_marker))
        return after_marker[:end] or None, after_marker[end:]

    def _parse_header(self) -> _Header:
        """`role[ to=recipient]<|channel|>channel[ to=recipient][ <|constrain|>json]`, leniently."""
        text = self._tokenizer.decode(self._header_ids)
        header = _Header()
        channel_start = text.find(_CHANNEL_NAME)
        if channel_start >= 0:
            header.channel, remainder = self._split_channel(text[channel_start + len(_CHANNEL_NAME) :])
            text = text[:channel_start] + " " + remainder
            if header.channel is None:
                self._note("<|channel|> without a channel name")
        if header.channel not in DEFAULT_CHANNELS:
            self._note(f"message on unexpected channel {header.channel!r}")
        words = text.replace(_CONSTRAIN_NAME, " " + _CONSTRAIN_NAME).split()
        if self._header_role is not None:
            header.role = self._header_role
            if words and words[0] == header.role.value:
                words.pop(0)
        elif not words:
            self._note("empty message header; assuming assistant")
        else:
            author = words.pop(0)
            if author in _ROLE_NAMES:
                header.role = Role(author)
            else:
                header.role, header.name = Role.TOOL, author  # e.g. functions.get_weather
            if header.role != Role.ASSISTANT:
                self._note(f"sampled a message from {author!r}, not the assistant")
        for word in words:
            if word.startswith("to=") and header.recipient is None:
                header.recipient = word[len("to=") :]
            elif header.content_type is None and not word.startswith("to="):
                header.content_type = word
            else:
                self._note(f"unexpected header word {word!r} ignored")
        return header

    def _describe(self, token_id: int) -> str:
        if self._tokenizer.is_special(token_id):
            return f"{token_id} {self._tokenizer.special_name(token_id)}"
        return str(token_id)

    def _note(self, anomaly: str) -> None:
        if len(self._anomalies) < MAX_ANOMALIES:
            self._anomalies.append(anomaly)
