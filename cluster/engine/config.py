"""The engine's knobs: batch limits, KV cache size and layout, CUDA graphs. Frozen and validated once."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int = 4096  # tokens in one step: decodes plus prefill chunks
    # A prefill chunk takes at most this many tokens a step (None: the whole budget), leaving room in the step
    # for other prompts: a short prompt arriving behind a long one no longer waits for all of the long one.
    long_prefill_token_threshold: int | None = None
    max_model_len: int | None = None  # prompt plus output; None: the model's context, if the cache holds it
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.90  # of the GPU's memory, for weights, activations and KV cache together
    kv_cache_memory_bytes: int | None = None  # a fixed KV budget instead (the default on CPU: 512 MiB)
    num_kv_blocks: int | None = None  # exact full-attention pool size, overriding the budget (tests)
    num_sliding_kv_blocks: int | None = None  # exact sliding-layer pool size (with sliding_window_pool)
    sliding_window_pool: bool = True  # sliding layers keep only their window, in a pool of their own
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    # Launch each step before reading the previous one's sampled tokens, so that the engine's host work
    # (outputs, stops, scheduling, batch tensors) overlaps the device's step.
    async_scheduling: bool = True
    max_graph_batch_size: int = 256  # larger decode steps run eagerly
    count_expert_tokens: bool = False  # count the tokens routed to each expert of each layer (MoE load metrics)

    def __post_init__(self) -> None:
        positive = ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_graph_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("long_prefill_token_threshold", "max_model_len", "kv_cache_memory_bytes", "num_kv_blocks",
                     "num_sliding_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.num_sliding_kv_blocks is not None and self.num_kv_blocks is None:
            raise ValueError("num_sliding_kv_blocks needs num_kv_blocks too")
