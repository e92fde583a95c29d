"""Which model replica takes a request: prefix-cache affinity first, else the less loaded of two (Serve's
pluggable request router, set through the model deployment's `request_router_config`).

The router lives in every process that holds a handle to the model deployment (the ingress replicas). For each
request it reads the `RoutingHint` the ingress passed (routing_hint.py) and each replica's load and prefix
summary, which the replica reports through Serve's `record_routing_stats` every `stats_period_s` (no call to
any replica per request). Then, in order:

1. conversation: a Responses follow-up (`previous_response_id`) goes to the replica that stored the previous
   response, whose prefix cache holds the conversation;
2. prefix: the replica holding the longest prefix of the prompt, if its lead over the replica holding the least
   is at least `min_prefix_match_tokens` and `min_prefix_match_ratio` of the prompt (a shared system prompt or
   template decides nothing: otherwise every new conversation would follow it to the replicas that served one,
   and a replica without it would never get one), among equals the least loaded;
3. least loaded of two replicas sampled at random (power of two choices), ties to the one this router sent
   fewer requests lately (a count decaying with a `recent_half_life_s` half-life): with think time between
   turns the instantaneous loads are mostly equal, and a new conversation brings its follow-ups along, so
   recent traffic is what keeps conversations, and so later load, evenly spread.

Affinity yields when its replica is busier than the least loaded one by more than `imbalance_threshold`
(reason `affinity_overloaded`): a cache hit is not worth a queue. Load is the replica's ongoing requests (Serve's
own count, fresh at every send), plus the requests this router has just decided to send it (so that requests
routed at the same moment see each other), plus up to `kv_pressure_weight` as its KV cache fills past half (from
the stats, which are up to a period old: below half they would only add noise). If the chosen replica refuses
(full), Serve tries the others, least loaded first.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import time
from typing import Any, Hashable, Optional, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from gptoss_serve.cluster.serve.metrics import RouterMetrics
from gptoss_serve.cluster.serve.prefix_summary import (
    ROUTING_BLOCK_TOKENS,
    BloomFilter,
    RoutedPrefixes,
    key_hash,
    matched_blocks,
)
from gptoss_serve.cluster.serve.routing_hint import ROUTING_KWARG, RoutingHint
from gptoss_serve.cluster.serve.shared_actors import MetricsHubActor, get_or_create

logger = logging.getLogger(__name__)

REASON_CONVERSATION = "conversation_affinity"
REASON_PREFIX = "prefix_affinity"
REASON_LEAST_LOADED = "least_loaded"
REASON_OVERLOADED = "affinity_overloaded"  # affinity known, but its replica was much busier
REASON_FALLBACK = "fallback"  # the chosen replica refused; another took the request
METRICS_PUSH_INTERVAL_S = 2.0
MAX_PENDING_DECISIONS = 10000
DECISION_VISIBLE_S = 2.0  # a decision counts as load until Serve's queue length has it
KV_PRESSURE_KNEE = 0.5  # KV-cache use below this adds no load


@dataclasses.dataclass(frozen=True)
class ReplicaView:
    """What the policy knows of one replica when a request is routed."""

    replica: Hashable
    load: float  # ongoing requests (and those being sent), plus KV-cache pressure
    matched_blocks: int = 0  # leading blocks of the prompt it holds
    holds_conversation: bool = False  # it stored the previous response of this conversation
    recent_requests: float = 0.0  # requests this router sent it lately (a decaying count)


@dataclasses.dataclass(frozen=True)
class Decision:
    replica: Hashable
    reason: str
    fallbacks: tuple[Hashable, ...]  # the others, least loaded first, if the replica refuses
    matched_blocks: int  # prompt blocks the chosen replica is expected to hold


class RoutingPolicy:
    """The decision itself, on plain data (no Ray): see the module docstring."""

    def __init__(self, imbalance_threshold: float = 8.0, min_prefix_match_tokens: int = 64,
                 min_prefix_match_ratio: float = 0.5, block_tokens: int = ROUTING_BLOCK_TOKENS,
                 rng: random.Random | None = None):
        self.imbalance_threshold = imbalance_threshold
        self.min_prefix_match_blocks = max(1, -(-min_prefix_match_tokens // block_tokens))
        self.min_prefix_match_ratio = min_prefix_match_ratio
        self._rng = rng or random.Random()

    def choose(self, views: Sequence[ReplicaView], hint: RoutingHint | None) -> Decision:
        least_load = min(view.load for view in views)
        overloaded = False
        for reason, holders in self._affinity(views, hint):
            best = min(holders, key=_load_key)
            if best.load <= least_load + self.imbalance_threshold:
                return self._decision(best, reason, views)
            overloaded = True
        sampled = self._rng.sample(list(views), min(2, len(views)))  # random order: ties go either way
        best = min(sampled, key=_load_key)
        return self._decision(best, REASON_OVERLOADED if overloaded else REASON_LEAST_LOADED, views)

    def _affinity(self, views: Sequence[ReplicaView], hint: RoutingHint | None):
        """(reason, replicas) to prefer, strongest first."""
        if hint is None:
            return
        holders = [view for view in views if view.holds_conversation]
        if holders:
            yield REASON_CONVERSATION, holders
        longest = max(view.matched_blocks for view in views)
        shortest = min(view.matched_blocks for view in views)
        lead_needed = max(self.min_prefix_match_blocks, self.min_prefix_match_ratio * len(hint.prefix_hashes))
        if longest - shortest >= lead_needed:
            yield REASON_PREFIX, [view for view in views if view.matched_blocks == longest]

    @staticmethod
    def _decision(chosen: ReplicaView, reason: str, views: Sequence[ReplicaView]) -> Decision:
        others = sorted((view for view in views if view is not chosen), key=_load_key)
        return Decision(chosen.replica, reason, tuple(view.replica for view in others), chosen.matched_blocks)


def _load_key(view: ReplicaView) -> tuple[float, float]:
    return view.load, view.recent_requests


class DecayingCounts:
    """Events per key, each counting 0.5 ** (age / half_life_s)."""

    def __init__(self, half_life_s: float, clock=time.monotonic):
        self.half_life_s = half_life_s
        self._clock = clock
        self._counts: dict[Hashable, tuple[float, float]] = {}  # key -> (count, as of when)

    def add(self, key: Hashable) -> None:
        self._counts[key] = (self.get(key) + 1.0, self._clock())

    def get(self, key: Hashable) -> float:
        count, since = self._counts.get(key, (0.0, 0.0))
        return count * 0.5 ** ((self._clock() - since) / self.half_life_s) if count else 0.0


class PrefixAffinityRouter(RequestRouter):
    """Serve's request-router plug-in around `RoutingPolicy`; kwargs come from `request_router_kwargs`."""

    def initialize_state(self, imbalance_threshold: float = 8.0, min_prefix_match_tokens: int = 64,
                         min_prefix_match_ratio: float = 0.5, kv_pressure_weight: float = 8.0,
                         memory_ttl_s: float = 30.0, memory_max_blocks: int = 1 << 17,
                         recent_half_life_s: float = 30.0, **_: Any) -> None:
        self._policy = RoutingPolicy(imbalance_threshold, min_prefix_match_tokens, min_prefix_match_ratio)
        self._kv_pressure_weight = kv_pressure_weight
        self._memory = RoutedPrefixes(memory_max_blocks, memory_ttl_s)
        self._recent = DecayingCounts(recent_half_life_s)
        # Decisions of requests not routed yet and when they were made, by internal request id, oldest first
        # (a request may be decided again after a refusal, or be cancelled before it is sent).
        self._pending: collections.OrderedDict[str, tuple[Decision, float]] = collections.OrderedDict()
        self._metrics = RouterMetrics(self._deployment_id.name, f"{self._handle_source.value}:{os.getpid()}")
        self._push_task: asyncio.Task | None = None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if self._push_task is None:
            self._push_task = self._event_loop.create_task(self._push_metrics())
        hint = _hint_of(pending_request)
        num_deciding = self._num_deciding()
        remembered = self._memory.matched_blocks(hint.prefix_hashes) if hint is not None else {}
        views = [self._view(replica, hint, num_deciding[replica.replica_id], remembered.get(replica.replica_id, 0))
                 for replica in candidate_replicas]
        decision = self._policy.choose(views, hint)
        if pending_request is not None:
            request_id = pending_request.metadata.internal_request_id
            self._pending.pop(request_id, None)
            self._pending[request_id] = (decision, time.monotonic())
            while len(self._pending) > MAX_PENDING_DECISIONS:
                self._pending.popitem(last=False)
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        ranks = [[by_id[decision.replica]]]
        if decision.fallbacks:
            ranks.append([by_id[replica_id] for replica_id in decision.fallbacks])
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._recent.add(replica_id)
        hint = _hint_of(pending_request)
        decision, _ = self._pending.pop(pending_request.metadata.internal_request_id, (None, 0.0))
        if hint is None or decision is None:
            return
        keys = [key_hash(hint.response_id)] if hint.response_id else []
        self._memory.record(hint.prefix_hashes, replica_id, keys)
        routed_as_chosen = decision.replica == replica_id
        num_matched_tokens = decision.matched_blocks * ROUTING_BLOCK_TOKENS if routed_as_chosen else 0
        self._metrics.observe(decision.reason if routed_as_chosen else REASON_FALLBACK,
                              len(hint.prefix_hashes) * ROUTING_BLOCK_TOKENS, num_matched_tokens)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._metrics.set_num_replicas(len(replicas))

    # Views -------------------------------------------------------------------------------------------------
    def _num_deciding(self) -> collections.Counter:
        """Requests decided for each replica a moment ago, not yet in Serve's queue lengths."""
        now, counts = time.monotonic(), collections.Counter()
        for decision, decided_s in reversed(self._pending.values()):
            if now - decided_s > DECISION_VISIBLE_S:
                break
            counts[decision.replica] += 1
        return counts

    def _view(self, replica: RunningReplica, hint: RoutingHint | None, num_deciding: int,
              num_remembered_blocks: int) -> ReplicaView:
        """num_remembered_blocks: leading prompt blocks this router itself sent to the replica lately."""
        stats = replica.routing_stats or {}
        num_ongoing = self._replica_queue_len_cache.get(replica.replica_id)  # None without Serve's cache
        if num_ongoing is None:
            num_ongoing = stats.get("num_running", 0) + stats.get("num_waiting", 0)
        kv_pressure = max(0.0, stats.get("kv_usage", 0.0) - KV_PRESSURE_KNEE) / (1 - KV_PRESSURE_KNEE)
        load = num_ongoing + num_deciding + self._kv_pressure_weight * kv_pressure
        view = ReplicaView(replica.replica_id, load, recent_requests=self._recent.get(replica.replica_id))
        if hint is None:
            return view
        bloom = BloomFilter(stats["prefix_bloom"]) if stats.get("prefix_bloom") else None
        num_matched = num_remembered_blocks
        if bloom is not None:
            num_matched = max(num_matched, matched_blocks(hint.prefix_hashes, bloom.__contains__))
        holds_conversation = False
        if hint.previous_response_id is not None:
            conversation = key_hash(hint.previous_response_id)
            holds_conversation = (self._memory.owner(conversation) == replica.replica_id
                                  or (bloom is not None and conversation in bloom))
        return dataclasses.replace(view, matched_blocks=num_matched, holds_conversation=holds_conversation)

    # Metrics -----------------------------------------------------------------------------------------------
    async def _push_metrics(self) -> None:
        source = f"router:{self._deployment_id.name}:{self._handle_source.value}:{os.getpid()}"
        hub = None
        while True:
            try:
                hub = hub or await get_or_create(MetricsHubActor, self.app_name, "metrics")
                await hub.push.remote(source, self._metrics.snapshot())
            except Exception:  # the hub restarting must not stop routing
                logger.warning("router metrics push failed", exc_info=True)
            await asyncio.sleep(METRICS_PUSH_INTERVAL_S)


def _hint_of(pending_request: Optional[PendingRequest]) -> RoutingHint | None:
    """The ingress's hint; None for calls without one (readiness probes, stored-response reads)."""
    if pending_request is None:
        return None
    hint = pending_request.kwargs.get(ROUTING_KWARG)
    return hint if isinstance(hint, RoutingHint) else None
