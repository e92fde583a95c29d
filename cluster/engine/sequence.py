"""One sample of one request: its tokens, how many of them the KV cache holds, and where.

A request with n > 1 has n sequences sharing one prompt. The scheduler moves sequences between its queues; the
block manager fills `block_ids` / `sliding_block_ids`; the engine appends sampled tokens and finishes them.
"""

from __future__ import annotations

import enum
import itertools
import time

from gptoss_serve.cluster.engine.sampling_params import SamplingParams

NO_BLOCK = -1  # a sliding-pool entry whose block was freed: it lies before the window of every later query
PENDING_TOKEN = -1  # a sampled token still on the device (the engine runs the next step before reading it)

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then the generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose keys and values are in the cache
        self.block_ids: list[int] = []  # full-attention pool (every layer without a sliding pool), by block index
        self.sliding_block_ids: list[int] = []  # sliding-layer pool by block index; NO_BLOCK before the window
        self.num_sliding_blocks_freed = 0  # sliding_block_ids[:this] are all NO_BLOCK
        self.block_hashes: list[bytes] = []  # hash chain over the full blocks of token_ids
        self.num_cached_blocks = 0  # leading blocks already named in the prefix cache
        self.num_prefix_hit_tokens = 0  # tokens found in the prefix cache when it was last admitted
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.logprobs: list[dict[int, float]] = []  # per output token: {token_id: logprob}, sampled one first
        self.num_preemptions = 0
        # The pending last token reaches max_tokens or the context: the sequence ends once it is read, so it is
        # not scheduled again.
        self.ends_with_pending_token = False
        self.generator = None  # torch.Generator of a seeded request, made on first use by the sampler

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}:{self.index}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")
