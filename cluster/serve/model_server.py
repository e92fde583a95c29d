"""The model deployment: each replica owns one engine and serves the OpenAI endpoints' model work.

The ingress validates the HTTP request and picks the model; the replica builds the harmony prompt, admits
the request against its engine's capacity (429 beyond it), runs it and formats the result. Each handler is
an async generator the ingress streams from. Its first item decides the HTTP status before any byte is sent:

    {"kind": "error", "error": {...APIError...}}     refused (400, 404, 429, 503)
    {"kind": "start", "replica": "<replica id>"}      accepted; then either
    {"kind": "body", "body": {...}}                    the whole JSON response (stream=false), or
    {"kind": "sse", "data": "data: ...\\n\\n..."}      batches of server-sent events (stream=true)

Cancelling the call (the client went away) cancels the handler, which aborts the engine request and frees its
KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from ray import serve

from gptoss_serve.cluster.observability.ray_export import RayMetricsMirror
from gptoss_serve.cluster.serve.autoscaling import TtftWindow, replica_autoscaling_stats
from gptoss_serve.cluster.serve.chat import ChatCompletions, prepare_chat
from gptoss_serve.cluster.serve.completions import Completions, prepare_completion
from gptoss_serve.cluster.serve.config import AppConfig
from gptoss_serve.cluster.serve.engine_client import EngineClient, EngineDeadError, EngineOverloadedError
from gptoss_serve.cluster.serve.errors import APIError, internal_error, queue_full, unavailable
from gptoss_serve.cluster.serve.metrics import ReplicaMetrics, RequestRecord
from gptoss_serve.cluster.serve.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from gptoss_serve.cluster.serve.prefix_summary import PrefixSummary, key_hash
from gptoss_serve.cluster.serve.responses import Responses, prepare_response
from gptoss_serve.cluster.serve.routing_hint import RoutingHint
from gptoss_serve.cluster.serve.shared_actors import MetricsHubActor, RayResponseStore, ResponseStoreActor, get_or_create
from gptoss_serve.cluster.serve.streaming import batched, sse

logger = logging.getLogger(__name__)

METRICS_PUSH_INTERVAL_S = 1.0
PREFIX_SUMMARY_MAX_KEYS = 1 << 14  # prefix blocks in the router's summary: 256k tokens, a 20 kB Bloom filter


class Admission:
    """Counts the sequences a replica has admitted; refuses new requests beyond its capacity.

    Checked and counted before the first await of a request, so the count is exact on the event loop.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.num_admitted = 0

    def admit(self, num_seqs: int) -> None:
        if self.num_admitted + num_seqs > self.capacity:
            raise queue_full(f"This replica's queue is full ({self.num_admitted} sequences admitted, capacity "
                             f"{self.capacity} = max_num_seqs + max_queued_requests); retry shortly.")
        self.num_admitted += num_seqs

    def release(self, num_seqs: int) -> None:
        self.num_admitted -= num_seqs


def load_engine(config: AppConfig, loop: asyncio.AbstractEventLoop) -> tuple[EngineClient, Any]:
    """(engine client, tokenizer) for this replica. Blocking: loads the weights."""
    if config.world_size > 1 or config.random_weights is not None:
        return load_sharded_engine(config, loop)
    import torch

    from gptoss_serve.cluster.engine.llm import LLM
    from gptoss_serve.cluster.serve.local_engine import LocalEngineClient
    from gptoss_serve.cluster.serve.model_source import resolve_model
    from gptoss_serve.model.tokenizer import load_tokenizer

    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    kernels = config.kernels if config.kernels != "auto" else ("triton" if device == "cuda" else "torch")
    model_dir = resolve_model(config.model)
    llm = LLM(model_dir, dtype=dtype, kernels=kernels, device=device, seed=config.seed, progress=False,
              max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
              long_prefill_token_threshold=config.long_prefill_token_threshold,
              max_model_len=config.max_model_len, kv_cache_memory_bytes=config.kv_cache_memory_bytes,
              enable_prefix_caching=config.enable_prefix_caching, enforce_eager=config.enforce_eager,
              count_expert_tokens=config.expert_load_metrics)
    tokenizer = llm.tokenizer or load_tokenizer(model_dir)
    return LocalEngineClient(llm.engine, config.max_queued_requests, loop), tokenizer


def load_sharded_engine(config: AppConfig, loop: asyncio.AbstractEventLoop) -> tuple[EngineClient, Any]:
    """A replica over several GPUs: one shard worker per GPU in this replica's placement group, the engine on
    rank 0 (also used for random weights, which are made on the workers' devices)."""
    from ray.util import get_current_placement_group

    from gptoss_serve.cluster.engine.config import EngineConfig
    from gptoss_serve.cluster.serve.model_source import resolve_model
    from gptoss_serve.cluster.shard.engine_client import ShardedEngineClient
    from gptoss_serve.cluster.shard.worker import ShardSpec
    from gptoss_serve.model.tokenizer import load_tokenizer

    model_dir = None if config.random_weights is not None else str(resolve_model(config.model))
    engine_config = EngineConfig(
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        long_prefill_token_threshold=config.long_prefill_token_threshold, max_model_len=config.max_model_len,
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        enable_prefix_caching=config.enable_prefix_caching, enforce_eager=config.enforce_eager,
        count_expert_tokens=config.expert_load_metrics)
    spec = ShardSpec(model_dir=model_dir, preset=config.random_weights, seed=config.seed, dtype=config.dtype,
                     kernels=config.kernels, tp=config.tensor_parallel_size, ep=config.expert_parallel_size,
                     engine_config=engine_config, max_queued_requests=config.max_queued_requests)
    client = ShardedEngineClient.start(spec, model_dir, loop, get_current_placement_group(),
                                       use_gpus=config.device != "cpu")
    return client, load_tokenizer(model_dir)


@serve.deployment(name="ModelServer", health_check_period_s=10)
class ModelServer:
    async def __init__(self, config: AppConfig):
        context = serve.get_replica_context()
        self._replica_id = context.replica_tag
        self._config = config
        self._model_id = config.served_model_id
        loop = asyncio.get_running_loop()
        self._engine, self._tokenizer = await asyncio.to_thread(load_engine, config, loop)
        self._info = self._engine.info()
        store_actor = await get_or_create(ResponseStoreActor, context.app_name, "responses",
                                          config.response_store_max_items)
        self._hub = await get_or_create(MetricsHubActor, context.app_name, "metrics")
        self._metrics = ReplicaMetrics(self._model_id, self._replica_id)
        self._ray_metrics = RayMetricsMirror()
        self._admission = Admission(config.engine_capacity)
        self._prefixes = PrefixSummary(PREFIX_SUMMARY_MAX_KEYS)  # resized to the KV cache in record_routing_stats
        self._ttft = TtftWindow()
        self._in_flight: dict[int, RequestRecord] = {}  # admitted requests, by id(record)
        self._chat = ChatCompletions(self._engine, self._tokenizer, self._model_id)
        self._completions = Completions(self._engine, self._tokenizer, self._model_id)
        self._store = RayResponseStore(store_actor)
        self._responses = Responses(self._engine, self._tokenizer, self._model_id, self._store)
        self._push_task = asyncio.create_task(self._push_metrics())
        logger.info("replica %s serves %s (max_model_len %d)", self._replica_id, self._model_id,
                    self._info.max_model_len)

    # Control -----------------------------------------------------------------------------------------------
    async def ready(self) -> dict[str, Any]:
        """What the ingress needs to list and validate the model; answering at all means the engine is up."""
        if not self._engine.is_alive():
            raise EngineDeadError("the engine has stopped")
        return {"model_id": self._model_id, "max_model_len": self._info.max_model_len,
                "replica": self._replica_id, "model": self._config.model}

    async def engine_stats(self) -> dict[str, Any]:
        return {"replica": self._replica_id, **dataclasses.asdict(self._engine.stats()),
                "num_admitted_seqs": self._admission.num_admitted}

    async def get_response(self, response_id: str) -> dict[str, Any] | None:
        record = await self._store.get(response_id)
        return None if record is None else record["response"]

    def check_health(self) -> None:
        if not self._engine.is_alive():
            raise RuntimeError("the engine step loop has stopped")

    async def __del__(self):
        """Serve stops routing here and waits for ongoing calls first; this also waits (within
        graceful_shutdown_timeout_s) for what the engine still runs, so that scaling down cuts nothing off."""
        deadline = time.monotonic() + self._config.graceful_shutdown_timeout_s
        while self._admission.num_admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self._push_task.cancel()
        await self._engine.shutdown()

    # Routing and autoscaling (Serve polls these) ----------------------------------------------------------
    async def record_routing_stats(self) -> dict[str, Any]:
        """Load and a Bloom filter of the prefixes served lately, for the router (router.py)."""
        stats = self._engine.stats()
        if stats.kv_blocks_total:
            self._prefixes.capacity = min(stats.kv_blocks_total, PREFIX_SUMMARY_MAX_KEYS)
        return {"num_running": stats.num_running, "num_waiting": stats.num_waiting, "kv_usage": stats.kv_usage,
                "prefix_bloom": self._prefixes.bloom().bits if len(self._prefixes) else b""}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Queue depth, KV-cache use and time to first token, for the autoscaling policy (autoscaling.py)."""
        stats, now = self._engine.stats(), time.monotonic()
        waiting_ages_s = [now - r.start_time for r in self._in_flight.values() if r.first_token_time is None]
        return replica_autoscaling_stats(stats.num_waiting, stats.kv_usage, self._ttft.take(waiting_ages_s))

    def _remember(self, routing: RoutingHint | None) -> None:
        if routing is not None:
            self._prefixes.add_prompt(routing.prefix_hashes)
            if routing.response_id is not None:
                self._prefixes.add([key_hash(routing.response_id)])

    async def _push_metrics(self) -> None:
        while True:
            try:
                self._metrics.set_engine_stats(self._engine.stats())
                self._metrics.set_expert_token_counts(await self._engine.expert_token_counts())
                snapshot = self._metrics.snapshot()
                self._ray_metrics.update(snapshot)
                await self._hub.push.remote(f"model:{self._replica_id}", snapshot)
            except Exception:  # the hub restarting must not stop the replica
                logger.warning("metrics push failed", exc_info=True)
            await asyncio.sleep(METRICS_PUSH_INTERVAL_S)

    # Endpoints ---------------------------------------------------------------------------------------------
    async def chat(self, request: ChatCompletionRequest,
                   routing: RoutingHint | None = None) -> AsyncIterator[dict[str, Any]]:
        def prepare():
            return prepare_chat(request, self._tokenizer, self._info.max_model_len)

        async for item in self._serve("chat", prepare, lambda p: len(p.turns), request.stream,
                                      self._chat.stream, self._chat.complete, routing):
            yield item

    async def completions(self, request: CompletionRequest,
                          routing: RoutingHint | None = None) -> AsyncIterator[dict[str, Any]]:
        def prepare():
            return prepare_completion(request, self._tokenizer, self._info.max_model_len, self._info.vocab_size)

        async for item in self._serve("completions", prepare, lambda p: p.num_sequences, request.stream,
                                      self._completions.stream, self._completions.complete, routing):
            yield item

    async def responses(self, request: ResponsesRequest,
                        routing: RoutingHint | None = None) -> AsyncIterator[dict[str, Any]]:
        async def prepare():
            return await prepare_response(request, self._tokenizer, self._info.max_model_len, self._store,
                                          response_id=routing.response_id if routing is not None else None)

        async for item in self._serve("responses", prepare, lambda p: 1, request.stream,
                                      self._responses.stream, self._responses.complete, routing):
            yield item

    async def _serve(self, endpoint: str, prepare: Callable[[], Any], num_seqs: Callable[[Any], int], stream: bool,
                     run_stream: Callable[..., AsyncIterator[str]],
                     run_complete: Callable[..., Awaitable[dict]],
                     routing: RoutingHint | None = None) -> AsyncIterator[dict[str, Any]]:
        record = RequestRecord(endpoint)
        try:
            prepared = prepare()
            if asyncio.iscoroutine(prepared):
                prepared = await prepared
            num_admitted = num_seqs(prepared)
            self._admission.admit(num_admitted)
        except Exception as error:
            api_error = _as_api_error(error, endpoint)
            record.outcome = "rejected" if api_error.status_code == 429 else "error"
            self._metrics.observe(record)
            yield {"kind": "error", "error": api_error.to_dict()}
            return
        self._remember(routing)
        self._in_flight[id(record)] = record
        try:
            yield {"kind": "start", "replica": self._replica_id}
            if stream:
                chunks = batched(run_stream(prepared, record), self._config.stream_batch_interval_s)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        yield {"kind": "sse", "data": chunk}
            else:
                yield {"kind": "body", "body": await run_complete(prepared, record)}
        except Exception as error:  # after the start: a streamed error event, or the error instead of the body
            record.outcome = "error"
            api_error = _as_api_error(error, endpoint)
            yield {"kind": "sse", "data": sse(api_error.body())} if stream else \
                {"kind": "error", "error": api_error.to_dict()}
        finally:
            self._admission.release(num_admitted)
            del self._in_flight[id(record)]
            if record.first_token_time is not None:
                self._ttft.observe(record.first_token_time - record.start_time)
            self._metrics.observe(record)


def _as_api_error(error: Exception, endpoint: str) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineOverloadedError):
        return queue_full(str(error))
    if isinstance(error, EngineDeadError):
        return unavailable(str(error))
    if isinstance(error, ValueError):  # the engine refused the request's values
        return APIError(400, str(error), "invalid_request_error")
    logger.error("%s request failed", endpoint, exc_info=error)
    return internal_error(f"{type(error).__name__}: {error}")
