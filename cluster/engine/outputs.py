"""What the engine hands back per request and step, shaped like vLLM's RequestOutput."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # (a delta when the request streams with OutputKind.DELTA)
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per token: {sampled id: logprob, top alternatives...}
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return sum(entry[token_id] for token_id, entry in zip(self.token_ids, self.logprobs))


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float  # time.perf_counter() clock
    first_token_time: float | None
    finished_time: float | None
    num_prompt_tokens: int
    num_cached_prompt_tokens: int  # found in the prefix cache
    num_preemptions: int


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt: str | None = None


@dataclasses.dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of full-attention blocks held
    sliding_kv_cache_usage: float  # same for the sliding-layer pool (= kv_cache_usage without one)
    prefix_cache_hit_rate: float  # prompt tokens found in the cache / prompt tokens admitted
    num_preemptions: int
    num_kv_blocks: int
    num_sliding_kv_blocks: int | None
    num_prompt_tokens: int  # computed so far (prefills and recomputation)
    num_generated_tokens: int
