"""POST /v1/completions on a model replica: raw prompts (text or token ids) in, raw continuations out.

No harmony here: the prompt goes to the engine as given. Text prompts are tokenized with special tokens
allowed, so a hand-written harmony prompt (`<|start|>user<|message|>...`) reaches the model as gpt-oss expects.
Each prompt is one engine request with the request's n; choice i*n+j is sample j of prompt i.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, AsyncIterator

from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.serve.engine_client import EngineClient, GenerationDelta
from gptoss_serve.cluster.serve.errors import invalid_request
from gptoss_serve.cluster.serve.metrics import RequestRecord
from gptoss_serve.cluster.serve.openai_protocol import CompletionRequest
from gptoss_serve.cluster.serve.sampling import resolve_max_tokens, sampling_params, stop_strings
from gptoss_serve.cluster.serve.streaming import SSE_DONE, merge, sse
from gptoss_serve.model.tokenizer import Tokenizer


@dataclasses.dataclass
class PreparedCompletion:
    request: CompletionRequest
    request_id: str
    prompts: list[list[int]]
    params: list[SamplingParams]  # per prompt
    created: int

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.request.n


@dataclasses.dataclass
class _Choice:
    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def prepare_completion(request: CompletionRequest, tokenizer: Tokenizer, max_model_len: int,
                       vocab_size: int) -> PreparedCompletion:
    if request.echo and request.logprobs is not None:
        raise invalid_request("echo with logprobs needs prompt logprobs, which this server does not compute.",
                              param="echo")
    prompts = [_prompt_ids(p, tokenizer, vocab_size, i) for i, p in enumerate(_prompt_list(request.prompt))]
    stops = stop_strings(request.stop)
    params = []
    for i, prompt in enumerate(prompts):
        max_tokens = resolve_max_tokens(request.max_tokens, len(prompt), max_model_len, "max_tokens")
        one = sampling_params(request, max_tokens, request.logprobs, stops, detokenize=True)
        params.append(one.replace(n=request.n))
    return PreparedCompletion(request, f"cmpl-{uuid.uuid4().hex}", prompts, params, int(time.time()))


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [prompt]
    return list(prompt)


def _prompt_ids(prompt: str | list[int], tokenizer: Tokenizer, vocab_size: int, index: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, allow_special=True)
    else:
        ids = list(prompt)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise invalid_request(f"prompt[{index}] holds token id {bad}, outside the vocabulary [0, {vocab_size}).",
                                  param="prompt")
    if not ids:
        raise invalid_request(f"prompt[{index}] is empty.", param="prompt")
    return ids


class Completions:
    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, model_id: str):
        self._engine = engine
        self._tokenizer = tokenizer
        self._model_id = model_id

    def _deltas(self, prepared: PreparedCompletion) -> AsyncIterator[tuple[int, GenerationDelta]]:
        return merge([self._engine.generate(f"{prepared.request_id}-{i}", prompt, params)
                      for i, (prompt, params) in enumerate(zip(prepared.prompts, prepared.params))])

    def _echo(self, prepared: PreparedCompletion, prompt_index: int) -> str:
        return self._tokenizer.decode(prepared.prompts[prompt_index]) if prepared.request.echo else ""

    async def complete(self, prepared: PreparedCompletion, record: RequestRecord) -> dict[str, Any]:
        n = prepared.request.n
        choices = [_Choice() for _ in range(prepared.num_sequences)]
        async for prompt_index, delta in self._deltas(prepared):
            if delta.token_ids:
                record.tokens_arrived(prompt_index * n + delta.index)
            choice = choices[prompt_index * n + delta.index]
            _apply(choice, delta)
        bodies = []
        for i, choice in enumerate(choices):
            echo = self._echo(prepared, i // n)
            body = {"index": i, "text": echo + "".join(choice.text), "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason, "logprobs": self._logprobs(prepared, choice.token_ids,
                                                                                   choice.logprobs, len(echo))}
            if prepared.request.return_token_ids:
                body["prompt_token_ids"], body["token_ids"] = prepared.prompts[i // n], choice.token_ids
            bodies.append(body)
        usage = self._usage(prepared, choices, record)
        return {"id": prepared.request_id, "object": "text_completion", "created": prepared.created,
                "model": self._model_id, "choices": bodies, "usage": usage}

    async def stream(self, prepared: PreparedCompletion, record: RequestRecord) -> AsyncIterator[str]:
        n = prepared.request.n
        choices = [_Choice() for _ in range(prepared.num_sequences)]
        num_chars = [len(self._echo(prepared, i // n)) for i in range(len(choices))]
        for i in range(len(choices)) if prepared.request.echo else ():
            yield self._chunk(prepared, {"index": i, "text": self._echo(prepared, i // n), "logprobs": None,
                                         "finish_reason": None})
        async for prompt_index, delta in self._deltas(prepared):
            index = prompt_index * n + delta.index
            if delta.token_ids:
                record.tokens_arrived(index)
            _apply(choices[index], delta)
            body = {"index": index, "text": delta.text, "finish_reason": delta.finish_reason,
                    "stop_reason": delta.stop_reason,
                    "logprobs": self._logprobs(prepared, list(delta.token_ids), list(delta.logprobs or ()),
                                               num_chars[index])}
            if prepared.request.return_token_ids:
                body["token_ids"] = list(delta.token_ids)
            num_chars[index] += len(delta.text)
            yield self._chunk(prepared, body)
        usage = self._usage(prepared, choices, record)
        if prepared.request.stream_options is not None and prepared.request.stream_options.include_usage:
            yield sse({"id": prepared.request_id, "object": "text_completion", "created": prepared.created,
                       "model": self._model_id, "choices": [], "usage": usage})
        yield SSE_DONE

    def _chunk(self, prepared: PreparedCompletion, choice: dict[str, Any]) -> str:
        return sse({"id": prepared.request_id, "object": "text_completion", "created": prepared.created,
                    "model": self._model_id, "choices": [choice]})

    def _logprobs(self, prepared: PreparedCompletion, token_ids: list[int], logprobs: list[dict[int, float]],
                  text_offset: int) -> dict[str, Any] | None:
        """The legacy completions layout: parallel lists of tokens, their logprobs and the top alternatives."""
        if prepared.request.logprobs is None:
            return None
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, logprobs):
            token = self._token_text(token_id)
            tokens.append(token)
            token_logprobs.append(entry.get(token_id))
            ranked = sorted(entry.items(), key=lambda item: -item[1])[: prepared.request.logprobs]
            top_logprobs.append({self._token_text(t): lp for t, lp in ranked})
            offsets.append(text_offset)
            text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    @staticmethod
    def _usage(prepared: PreparedCompletion, choices: list[_Choice], record: RequestRecord) -> dict[str, Any]:
        num_prompt = sum(len(p) for p in prepared.prompts)
        num_completion = sum(len(c.token_ids) for c in choices)
        record.num_prompt_tokens, record.num_output_tokens = num_prompt, num_completion
        reasons = {c.finish_reason for c in choices}
        record.outcome = "length" if "length" in reasons else "stop" if reasons <= {"stop"} else "aborted"
        return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
                "total_tokens": num_prompt + num_completion}


def _apply(choice: _Choice, delta: GenerationDelta) -> None:
    choice.text.append(delta.text)
    choice.token_ids += delta.token_ids
    choice.logprobs += delta.logprobs or ()
    if delta.finished:
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
