"""How many KV blocks each pool gets.

On a GPU the budget is what `gpu_memory_utilization` of the device leaves after the weights (and anything
else already there) and after the peak activations of the largest step, measured by running one. On CPU it
is a fixed byte budget. With a sliding pool, the sliding layers get what their windows need for a full batch,
twice over, or a tenth of the budget if that is more (the spare keeps freed window blocks findable for prefix
hits: a cached prefix is usable only while its last window is), and the full-attention layers get the rest.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.engine.sequence import Sequence
from gptoss_serve.model.batch import KVCache, build_forward_batch
from gptoss_serve.model.transformer import GptOssModel

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 512 * 2 ** 20
CUDA_GRAPH_RESERVE_BYTES = 512 * 2 ** 20  # graph pools and cuBLAS workspaces captured after planning
SLIDING_CACHE_SHARE = 0.1  # of the KV budget, at least, for the sliding pool


@dataclasses.dataclass(frozen=True)
class KVPlan:
    num_blocks: int  # full-attention layers (every layer without a sliding pool)
    num_sliding_blocks: int | None  # sliding-window layers; None: no separate pool


def uses_sliding_pool(model: GptOssModel, config: EngineConfig) -> bool:
    num_sliding = sum(model.config.is_sliding_layer(n) for n in range(model.config.num_hidden_layers))
    return config.sliding_window_pool and 0 < num_sliding < model.config.num_hidden_layers


def sliding_blocks_wanted(model: GptOssModel, config: EngineConfig) -> int:
    window_blocks = -(-(model.config.sliding_window - 1) // config.block_size) + 2  # window, partial ends
    chunk_blocks = -(-config.max_num_batched_tokens // config.block_size)  # a step's prefill chunks
    return 2 * (config.max_num_seqs * window_blocks + chunk_blocks)


def plan_kv_cache(model: GptOssModel, config: EngineConfig) -> KVPlan:
    sliding_pool = uses_sliding_pool(model, config)
    if config.num_kv_blocks is not None:
        num_sliding = None
        if sliding_pool:
            num_sliding = config.num_sliding_kv_blocks or sliding_blocks_wanted(model, config)
        return KVPlan(config.num_kv_blocks, num_sliding)

    budget = config.kv_cache_memory_bytes
    device = next(model.parameters()).device
    if budget is None:
        budget = gpu_kv_budget(model, config) if device.type == "cuda" else CPU_KV_CACHE_BYTES
    model_config, dtype, bs = model.config, model.dtype, config.block_size
    num_layers = model_config.num_hidden_layers
    num_sliding_layers = sum(model_config.is_sliding_layer(n) for n in range(num_layers))
    if not sliding_pool:
        num_blocks = budget // KVCache.bytes_per_block(model_config, bs, dtype)
        return KVPlan(_at_least_one(num_blocks, budget), None)
    per_full = KVCache.bytes_per_block(model_config, bs, dtype, num_layers=num_layers - num_sliding_layers)
    per_sliding = KVCache.bytes_per_block(model_config, bs, dtype, num_layers=num_sliding_layers)
    wanted = max(sliding_blocks_wanted(model, config), int(budget * SLIDING_CACHE_SHARE) // per_sliding)
    num_sliding = min(wanted, budget // 2 // per_sliding)
    num_blocks = (budget - num_sliding * per_sliding) // per_full
    return KVPlan(_at_least_one(num_blocks, budget), _at_least_one(num_sliding, budget))


def _at_least_one(num_blocks: int, budget: int) -> int:
    if num_blocks < 1:
        raise ValueError(f"a KV cache budget of {budget} bytes holds no block; raise gpu_memory_utilization or "
                         f"kv_cache_memory_bytes")
    return int(num_blocks)


@torch.inference_mode()
def gpu_kv_budget(model: GptOssModel, config: EngineConfig) -> int:
    """Bytes left for the KV cache: utilization x total, less what is in use now (weights, other processes),
    less the peak of one largest step (a full prefill chunk, then logits and sampling for a full batch)."""
    from gptoss_serve.cluster.engine.sampler import Sampler

    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    allocated_before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)

    num_tokens = config.max_num_batched_tokens
    if config.max_model_len is not None:
        num_tokens = min(num_tokens, config.max_model_len)
    num_blocks = -(-num_tokens // config.block_size)
    cache = KVCache.allocate(model.config, num_blocks, config.block_size, model.dtype, device)
    batch = build_forward_batch([torch.randint(0, model.config.vocab_size, (num_tokens,)).tolist()], [0],
                                [list(range(num_blocks))], config.block_size).to(device)
    hidden = model(batch, cache)
    rows = min(config.max_num_seqs, num_tokens)
    logits = model.compute_logits(hidden.expand(rows, -1).contiguous())
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.01, logprobs=20)
    Sampler(device)(logits, [Sequence("profile", 0, [0], params) for _ in range(rows)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - allocated_before - KVCache.bytes_per_block(
        model.config, config.block_size, model.dtype) * num_blocks
    del cache, batch, hidden, logits
    torch.cuda.empty_cache()

    reserve = 0 if config.enforce_eager else CUDA_GRAPH_RESERVE_BYTES
    budget = int(total * config.gpu_memory_utilization) - in_use - peak - reserve
    logger.info("KV budget %.2f GiB (total %.1f GiB x %.2f, in use %.2f GiB, step peak %.2f GiB)",
                budget / 2 ** 30, total / 2 ** 30, config.gpu_memory_utilization, in_use / 2 ** 30,
                peak / 2 ** 30)
    return budget
