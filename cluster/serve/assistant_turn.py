"""Samples one assistant turn and, where the request demands it, steers its answer by forcing harmony headers.

gpt-oss answers after its reasoning with a message whose header it writes itself. When the request leaves it
free (tool_choice auto/none, plain text), one engine request samples the whole turn. When it does not, the turn
is sampled in phases so that the answer is what was asked for, whatever the model would have preferred:

- tool_choice "required" or a named function: the answer must be a call. Phase A samples one message. If it is
  reasoning, it is kept; if it already is an allowed call, it runs to its end; anything else (a final answer)
  is dropped as soon as its header is complete, before any of its text is shown. Then the call's header
  `<|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>` is appended as if
  sampled and the model writes the arguments. With several tools and "required", the model first picks the
  name after a forced `... to=functions` (snapped to the closest declared tool).
- response_format json: the answer must be a final message, so the same is done with
  `<|start|>assistant<|channel|>final<|message|>`. The JSON itself is asked for in the developer message and
  checked afterwards (see response_format.py); it is not constrained token by token.

Forced header tokens are counted as output tokens: they are part of the assistant message a client replays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import AsyncIterator, Callable, Sequence

from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.serve.engine_client import EngineClient
from gptoss_serve.cluster.serve.turn_events import ItemKind, ItemOpened, TurnEvent, TurnFinished, TurnUsage
from gptoss_serve.cluster.serve.turn_parser import TurnParser
from gptoss_serve.model.tokenizer import SpecialToken, Tokenizer

MAX_NAME_TOKENS = 16  # sampling a function name after a forced `to=functions`
# A real header is a handful of tokens (`<|channel|>commentary to=functions.get_weather <|constrain|>json`); a
# first message whose header runs longer is text without a header, which a constrained answer cannot be.
MAX_FIRST_HEADER_TOKENS = 32


class AnswerKind(str, enum.Enum):
    FREE = "free"  # whatever the model writes
    FINAL = "final"  # a final message (tool calls too, when allow_tool_calls)
    TOOL_CALL = "tool_call"  # a call of one of tool_names


@dataclasses.dataclass(frozen=True)
class AnswerConstraint:
    kind: AnswerKind = AnswerKind.FREE
    tool_names: tuple[str, ...] = ()  # TOOL_CALL: the functions the call may name
    allow_tool_calls: bool = False  # FINAL: a tool call is an acceptable answer too
    drop_tool_calls: bool = False  # tool_choice "none": calls the model writes anyway are not returned


class _Decision(enum.Enum):
    REASONING = "reasoning"  # keep it, then force the answer
    ACCEPT = "accept"  # the first message already is an acceptable answer
    FORCE = "force"  # drop it and force the answer


@dataclasses.dataclass
class TurnRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens is the budget of the whole turn
    constraint: AnswerConstraint = AnswerConstraint()
    stop_strings: tuple[str, ...] = ()  # applied to answer text, not to reasoning
    num_top_logprobs: int | None = None  # None: no logprobs


class AssistantTurn:
    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, request: TurnRequest,
                 on_tokens: Callable[[], None] | None = None):
        """on_tokens: called for each engine delta that carries tokens (latency metrics)."""
        self._engine = engine
        self._on_tokens = on_tokens
        self._tokenizer = tokenizer
        self._request = request
        self._parser = self._new_parser()
        self._output_ids: list[int] = []  # the turn as the client sees it: kept, forced and sampled tokens
        self._num_prompt_tokens = len(request.prompt_token_ids)
        self._num_cached_prompt_tokens = 0
        self._engine_finish_reason: str | None = None

    def _new_parser(self) -> TurnParser:
        return TurnParser(self._tokenizer, self._request.stop_strings, self._request.constraint.drop_tool_calls,
                          self._request.num_top_logprobs)

    async def events(self) -> AsyncIterator[TurnEvent]:
        """The turn's events, TurnFinished last. Closing the iterator early aborts the engine request."""
        if self._request.constraint.kind == AnswerKind.FREE:
            phases = self._sample(self._request.request_id, ())
        else:
            phases = self._constrained()
        async with contextlib.aclosing(phases):
            async for event in phases:
                yield event
        for event in self._parser.finish():
            yield event
        yield self._finished()

    async def _constrained(self) -> AsyncIterator[TurnEvent]:
        decision = None
        end = (int(SpecialToken.END),)
        first_message = self._sample(self._request.request_id, end, self._header_too_long)
        async with contextlib.aclosing(first_message):
            async for event in first_message:
                if isinstance(event, ItemOpened) and decision is None:
                    decision = self._decide(event)
                    if decision == _Decision.FORCE:
                        break  # closing the sample aborts it; its header tokens were never shown
                yield event
        if decision is None:
            decision = _Decision.FORCE  # no message opened: header-less text, or a bare stop token
        if decision == _Decision.ACCEPT or self._parser.stopped_by_string:
            return
        if decision == _Decision.FORCE:
            self._output_ids, self._parser, self._engine_finish_reason = [], self._new_parser(), None
        elif self._engine_finish_reason != "stop" or self._out_of_budget():
            return  # the reasoning did not end with <|end|> (length or abort): nothing to force after it
        forced = self._forced_answer()
        async with contextlib.aclosing(forced):
            async for event in forced:
                yield event

    def _decide(self, opened: ItemOpened) -> _Decision:
        constraint = self._request.constraint
        if opened.kind == ItemKind.REASONING:
            return _Decision.REASONING
        if constraint.kind == AnswerKind.TOOL_CALL:
            ok = opened.kind == ItemKind.TOOL_CALL and opened.function_name in constraint.tool_names
        else:
            ok = opened.kind == ItemKind.TEXT or (opened.kind == ItemKind.TOOL_CALL and constraint.allow_tool_calls)
        return _Decision.ACCEPT if ok else _Decision.FORCE

    async def _forced_answer(self) -> AsyncIterator[TurnEvent]:
        constraint = self._request.constraint
        opener = [int(SpecialToken.START), *self._tokenizer.encode("assistant")] if self._output_ids else []
        if constraint.kind == AnswerKind.TOOL_CALL:
            name = constraint.tool_names[0]
            if len(constraint.tool_names) > 1:
                name = await self._choose_function(opener)
            header = self._tool_call_header(name)
        else:
            header = [int(SpecialToken.CHANNEL), *self._tokenizer.encode("final"), int(SpecialToken.MESSAGE)]
        for event in self._feed(opener + header, None):
            yield event
        if self._out_of_budget():
            self._engine_finish_reason = "length"
            return
        answer = self._sample(f"{self._request.request_id}.answer", (int(SpecialToken.END),))
        async with contextlib.aclosing(answer):
            async for event in answer:
                yield event

    def _tool_call_header(self, name: str) -> list[int]:
        encode = self._tokenizer.encode
        return [int(SpecialToken.CHANNEL), *encode(f"commentary to=functions.{name}"), *encode(" "),
                int(SpecialToken.CONSTRAIN), *encode("json"), int(SpecialToken.MESSAGE)]

    async def _choose_function(self, opener: list[int]) -> str:
        """Lets the model write the function name after a forced `to=functions`, then snaps it to a tool."""
        prefix = opener + [int(SpecialToken.CHANNEL), *self._tokenizer.encode("commentary to=functions")]
        stops = (int(SpecialToken.CONSTRAIN), int(SpecialToken.MESSAGE), int(SpecialToken.END))
        params = self._request.params.replace(n=1, max_tokens=MAX_NAME_TOKENS, stop_token_ids=stops, logprobs=None,
                                              stop=(), min_tokens=0)
        name_ids: list[int] = []
        prompt = self._request.prompt_token_ids + self._output_ids + prefix
        async with contextlib.aclosing(self._engine.generate(f"{self._request.request_id}.name", prompt, params)) as it:
            async for delta in it:
                name_ids += [t for t in delta.token_ids if not self._tokenizer.is_special(t)]
        written = self._tokenizer.decode(name_ids).strip().lstrip(".").split(" ")[0]
        return closest_tool_name(written, self._request.constraint.tool_names)

    def _header_too_long(self) -> bool:
        return self._parser.num_header_tokens > MAX_FIRST_HEADER_TOKENS

    async def _sample(self, engine_request_id: str, extra_stop_ids: Sequence[int],
                      give_up: Callable[[], bool] | None = None) -> AsyncIterator[TurnEvent]:
        """Samples from the prompt plus the turn so far, feeding the parser; stops early on a stop string or
        when `give_up()` says so."""
        budget = self._budget()
        params = self._request.params
        params = params.replace(max_tokens=budget, min_tokens=min(params.min_tokens, budget),
                                stop_token_ids=tuple(params.stop_token_ids) + tuple(extra_stop_ids), stop=())
        prompt = self._request.prompt_token_ids + self._output_ids
        self._engine_finish_reason = None
        async with contextlib.aclosing(self._engine.generate(engine_request_id, prompt, params)) as deltas:
            async for delta in deltas:
                if delta.token_ids and self._on_tokens is not None:
                    self._on_tokens()
                if not self._output_ids and not self._num_cached_prompt_tokens:
                    self._num_cached_prompt_tokens = delta.num_cached_prompt_tokens
                for event in self._feed(delta.token_ids, delta.logprobs):
                    yield event
                if delta.finished:
                    self._engine_finish_reason = delta.finish_reason
                if self._parser.stopped_by_string:
                    self._engine_finish_reason = "stop"
                    return
                if give_up is not None and give_up():
                    return

    def _feed(self, token_ids: Sequence[int], logprobs: Sequence[dict[int, float]] | None) -> list[TurnEvent]:
        events = []
        for i, token_id in enumerate(token_ids):
            self._output_ids.append(token_id)
            events += self._parser.feed(token_id, logprobs[i] if logprobs else None)
        return events

    def _budget(self) -> int:
        max_tokens = self._request.params.max_tokens
        return max_tokens - len(self._output_ids) if max_tokens is not None else 1 << 30

    def _out_of_budget(self) -> bool:
        return self._budget() <= 0 or self._engine_finish_reason == "length"

    def _finished(self) -> TurnFinished:
        if self._engine_finish_reason == "abort":
            reason = "abort"
        elif self._engine_finish_reason == "length" and not self._parser.stopped_by_string:
            reason = "length"
        elif self._parser.has_tool_call:
            reason = "tool_calls"
        else:
            reason = "stop"
        usage = TurnUsage(self._num_prompt_tokens, self._num_cached_prompt_tokens, len(self._output_ids),
                          self._parser.num_tokens_by_kind[ItemKind.REASONING])
        return TurnFinished(reason, usage, tuple(self._output_ids), tuple(self._parser.anomalies))


def closest_tool_name(written: str, tool_names: Sequence[str]) -> str:
    """The declared tool the model meant: exact match, else the longest common prefix, else the first tool."""
    if written in tool_names:
        return written

    def common_prefix(name: str) -> int:
        length = 0
        while length < min(len(name), len(written)) and name[length] == written[length]:
            length += 1
        return length

    return max(tool_names, key=common_prefix)  # max keeps the first of equals
