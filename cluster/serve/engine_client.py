"""What a model replica needs from an engine: an async protocol, so the engine behind it can change.

A replica talks to its engine only through `EngineClient`. Today that is `LocalEngineClient` (the engine runs
in a thread of the replica process); the sharded engine over GPU actors implements the same three calls.
Everything here is plain data: it crosses no process boundary itself, but must be cheap to build per step.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, AsyncIterator, Sequence

from gptoss_serve.cluster.engine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class GenerationDelta:
    """What one sample of one request gained since its previous delta."""

    index: int  # which of the request's n samples
    token_ids: tuple[int, ...]  # new sampled tokens
    logprobs: tuple[dict[int, float], ...] | None  # per new token {token_id: logprob}, the sampled id first
    text: str  # new detokenized text ('' when the engine does not detokenize)
    finish_reason: str | None  # "stop", "length" or "abort" on the last delta of the sample, else None
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    num_prompt_tokens: int
    num_cached_prompt_tokens: int  # prompt tokens found in the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """Fixed properties of a running engine, for request validation and /v1/models."""

    max_model_len: int  # prompt plus generated tokens of one sequence
    max_num_seqs: int  # sequences that run at once
    max_queued_requests: int  # requests admitted beyond max_num_seqs before new ones are refused
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class CountHistogram:
    """A cumulative histogram of a per-step count, in Prometheus' shape (observations <= each bound)."""

    bounds: tuple[float, ...] = ()
    bucket_counts: tuple[int, ...] = ()  # per bound, the observations <= it
    count: int = 0  # all observations (the +Inf bucket)
    total: float = 0.0  # their sum

    @staticmethod
    def empty(bounds: tuple[float, ...]) -> "CountHistogram":
        return CountHistogram(bounds, (0,) * len(bounds))

    def add(self, value: float) -> "CountHistogram":
        counts = tuple(c + (value <= b) for b, c in zip(self.bounds, self.bucket_counts))
        return CountHistogram(self.bounds, counts, self.count + 1, self.total + value)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, taken between steps. Counts named num_* without `running`/`waiting`
    are cumulative since the engine started."""

    num_running: int = 0  # sequences in the running batch
    num_waiting: int = 0  # sequences waiting for admission
    num_in_flight_requests: int = 0  # requests admitted by the client and not finished
    kv_blocks_used: int = 0  # blocks held by sequences (free prefix-cache blocks do not count)
    kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    num_prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hit_tokens: int = 0  # of those, found there
    num_preemptions: int = 0
    num_steps: int = 0
    batch_size: CountHistogram = CountHistogram()  # sequences per step
    tokens_per_step: CountHistogram = CountHistogram()  # tokens computed per step
    device: str = ""  # where the engine's model lives ("cuda:0", "cpu")
    device_memory_used_bytes: int = 0  # the whole GPU's (every process), or this process's resident memory on CPU
    device_memory_total_bytes: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineError(RuntimeError):
    """Base of the errors an engine client raises to its callers."""


class EngineOverloadedError(EngineError):
    """The engine's queue is full; the caller should answer 429 and the client retry later."""


class EngineDeadError(EngineError):
    """The engine stopped (its step loop raised or it was shut down); the replica must be replaced."""


class EngineClient(abc.ABC):
    """The engine as a replica sees it. All calls are made from the replica's event loop."""

    @abc.abstractmethod
    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        """Deltas of every sample until each has finished. Closing the iterator early aborts the request.

        Raises EngineOverloadedError before the first delta when the queue is full, EngineDeadError when the
        engine stops underneath the request.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stops a request and frees its cache blocks; unknown or finished ids are ignored."""

    @abc.abstractmethod
    def info(self) -> EngineInfo:
        ...

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        ...

    async def expert_token_counts(self) -> Any:
        """Tokens routed to each expert of each layer since the engine started, a [num_layers, num_experts]
        int64 numpy array, refreshed about once a second; None when the engine does not count them."""
        return None

    @abc.abstractmethod
    def is_alive(self) -> bool:
        ...

    @abc.abstractmethod
    async def shutdown(self) -> None:
        ...
