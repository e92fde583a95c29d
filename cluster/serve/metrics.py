"""Prometheus series of one process (a model replica or the ingress), and merging many into one /metrics page.

Each process keeps its own registry and labels its series with `replica`. A snapshot is plain data (families
of samples) so that it can be sent to the metrics hub actor; the ingress renders the union of every replica's
latest snapshot, so /metrics shows the whole application whichever ingress replica answers.
"""

from __future__ import annotations

import array
import dataclasses
import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gptoss_serve.cluster.serve.engine_client import CountHistogram, EngineStats

PREFIX = "gptoss_"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


@dataclasses.dataclass
class RequestRecord:
    """What a replica learned about one API request, observed once when it ends."""

    endpoint: str  # "chat", "completions", "responses"
    start_time: float = dataclasses.field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_reasoning_tokens: int = 0
    outcome: str = "aborted"  # "stop", "length", "tool_calls", "aborted", "error"
    num_harmony_anomalies: int = 0
    # Seconds between consecutive token deltas of one sample (one token each: the engine steps one at a time).
    inter_token_latencies_s: array.array = dataclasses.field(default_factory=lambda: array.array("d"))
    _last_token_time: dict[int, float] = dataclasses.field(default_factory=dict)  # per sample

    def tokens_arrived(self, sample: int = 0) -> None:
        """Called for each delta that carries tokens, of the request's sample `sample`."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        last = self._last_token_time.get(sample)
        if last is not None:
            self.inter_token_latencies_s.append(now - last)
        self._last_token_time[sample] = now


# A snapshot: [(name, type, documentation, [(sample name, labels, value)])]
Snapshot = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]


class ReplicaMetrics:
    """The model replica's series: requests by outcome, latencies, tokens, and the engine's load."""

    def __init__(self, model_id: str, replica: str):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model": model_id, "replica": replica}
        self._labels = labels
        names = list(labels)
        self._requests = Counter(f"{PREFIX}requests", "API requests finished on this replica, by outcome",
                                 names + ["endpoint", "outcome"], registry=self.registry)
        self._ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time from arrival to the first sampled token",
                               names + ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "Time from arrival to the last token",
                              names + ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._tpot = Histogram(f"{PREFIX}time_per_output_token_seconds",
                               "Mean time between output tokens of a request, after the first",
                               names + ["endpoint"], buckets=TOKEN_LATENCY_BUCKETS_S, registry=self.registry)
        self._itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "Time between consecutive output tokens",
                              names + ["endpoint"], buckets=TOKEN_LATENCY_BUCKETS_S, registry=self.registry)
        self._prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests", names,
                                      registry=self.registry)
        self._output_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated for finished requests", names,
                                      registry=self.registry)
        self._reasoning_tokens = Counter(f"{PREFIX}reasoning_tokens", "Generated tokens in the analysis channel",
                                         names, registry=self.registry)
        self._anomalies = Counter(f"{PREFIX}harmony_anomalies", "Harmony output the parser had to repair", names,
                                  registry=self.registry)
        self._running = Gauge(f"{PREFIX}num_requests_running", "Sequences in the engine's running batch", names,
                              registry=self.registry)
        self._waiting = Gauge(f"{PREFIX}num_requests_waiting", "Sequences waiting for admission", names,
                              registry=self.registry)
        self._kv_usage = Gauge(f"{PREFIX}kv_cache_usage_ratio", "Fraction of KV cache blocks held by sequences", names,
                               registry=self.registry)
        self._kv_used = Gauge(f"{PREFIX}kv_cache_used_blocks", "KV cache blocks held by sequences", names,
                              registry=self.registry)
        self._kv_total = Gauge(f"{PREFIX}kv_cache_total_blocks", "KV cache blocks in the pool", names,
                               registry=self.registry)
        self._prefix_hit = Gauge(f"{PREFIX}prefix_cache_hit_ratio", "Prompt tokens found in the prefix cache", names,
                                 registry=self.registry)
        self._engine = _EngineCollector(labels)
        self.registry.register(self._engine)

    def observe(self, record: RequestRecord) -> None:
        now = time.monotonic()
        self._requests.labels(**self._labels, endpoint=record.endpoint, outcome=record.outcome).inc()
        if record.first_token_time is not None:
            self._ttft.labels(**self._labels, endpoint=record.endpoint).observe(record.first_token_time
                                                                               - record.start_time)
        if record.outcome not in ("error", "aborted"):
            self._e2e.labels(**self._labels, endpoint=record.endpoint).observe(now - record.start_time)
        gaps = record.inter_token_latencies_s
        if gaps:
            self._tpot.labels(**self._labels, endpoint=record.endpoint).observe(sum(gaps) / len(gaps))
            itl = self._itl.labels(**self._labels, endpoint=record.endpoint)
            for gap in gaps:
                itl.observe(gap)
        self._prompt_tokens.labels(**self._labels).inc(record.num_prompt_tokens)
        self._output_tokens.labels(**self._labels).inc(record.num_output_tokens)
        self._reasoning_tokens.labels(**self._labels).inc(record.num_reasoning_tokens)
        self._anomalies.labels(**self._labels).inc(record.num_harmony_anomalies)

    def set_engine_stats(self, stats: EngineStats) -> None:
        self._running.labels(**self._labels).set(stats.num_running)
        self._waiting.labels(**self._labels).set(stats.num_waiting)
        self._kv_usage.labels(**self._labels).set(stats.kv_usage)
        self._kv_used.labels(**self._labels).set(stats.kv_blocks_used)
        self._kv_total.labels(**self._labels).set(stats.kv_blocks_total)
        self._prefix_hit.labels(**self._labels).set(stats.prefix_cache_hit_rate)
        self._engine.stats = stats

    def set_expert_token_counts(self, counts: Any) -> None:
        """[num_layers, num_experts] tokens routed to each expert since the engine started (None: not counted)."""
        self._engine.expert_token_counts = counts

    def snapshot(self) -> Snapshot:
        return snapshot(self.registry)


class IngressMetrics:
    """The ingress's series: every HTTP request by endpoint and status, errors answered before any replica."""

    def __init__(self, replica: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._replica = replica
        self._http = Counter(f"{PREFIX}http_requests", "HTTP requests answered by the ingress",
                             ["replica", "endpoint", "status"], registry=self.registry)

    def observe(self, endpoint: str, status: int) -> None:
        self._http.labels(replica=self._replica, endpoint=endpoint, status=str(status)).inc()

    def snapshot(self) -> Snapshot:
        return snapshot(self.registry)


class _EngineCollector:
    """Series read from the engine's cumulative stats when collected: steps, batch sizes, preemptions, prefix
    cache lookups, device memory, MoE load, and the replica itself."""

    def __init__(self, labels: dict[str, str]):
        self._labels = labels
        self.stats = EngineStats()
        self.expert_token_counts = None  # [num_layers, num_experts] int64 numpy

    def collect(self):
        names, values = list(self._labels), list(self._labels.values())
        stats = self.stats

        def family(cls, name, documentation, value, extra: dict[str, str] | None = None):
            metric = cls(PREFIX + name, documentation, labels=names + list(extra or {}))
            metric.add_metric(values + list((extra or {}).values()), value)
            return metric

        yield family(GaugeMetricFamily, "replica_up", "1 for each model replica that reports metrics", 1)
        yield family(CounterMetricFamily, "engine_steps", "Engine steps run", stats.num_steps)
        yield family(CounterMetricFamily, "num_preemptions", "Sequences preempted (blocks freed, recomputed later)",
                     stats.num_preemptions)
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     stats.num_prefix_queried_tokens)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache",
                     stats.num_prefix_hit_tokens)
        yield _histogram(PREFIX + "batch_size", "Sequences per engine step", names, values, stats.batch_size)
        yield _histogram(PREFIX + "tokens_per_step", "Tokens computed per engine step (decodes plus prefill chunks)",
                         names, values, stats.tokens_per_step)
        if stats.device:
            device = {"device": stats.device}
            yield family(GaugeMetricFamily, "device_memory_used_bytes",
                         "Memory in use on the engine's device: the whole GPU, or the replica process on CPU",
                         stats.device_memory_used_bytes, device)
            yield family(GaugeMetricFamily, "device_memory_total_bytes", "Memory of the engine's device",
                         stats.device_memory_total_bytes, device)
        counts = self.expert_token_counts
        if counts is not None:
            experts = CounterMetricFamily(PREFIX + "expert_tokens", "Tokens routed to each expert of each layer",
                                          labels=names + ["layer", "expert"])
            for layer, row in enumerate(counts.tolist()):
                for expert, count in enumerate(row):
                    experts.add_metric(values + [str(layer), str(expert)], count)
            yield experts


def _histogram(name: str, documentation: str, names: list[str], values: list[str],
               histogram: CountHistogram) -> HistogramMetricFamily:
    metric = HistogramMetricFamily(name, documentation, labels=names)
    buckets = [(str(float(b)), c) for b, c in zip(histogram.bounds, histogram.bucket_counts)]
    metric.add_metric(values, buckets + [("+Inf", histogram.count)], histogram.total)
    return metric


class RouterMetrics:
    """A model deployment's request router (one in each process holding a handle): its decisions by reason."""

    def __init__(self, deployment: str, router: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"deployment": deployment, "router": router}
        names = list(self._labels)
        self._decisions = Counter(f"{PREFIX}router_decisions", "Requests routed to a model replica, by reason "
                                  "(prefix_affinity, conversation_affinity, least_loaded, affinity_overloaded, "
                                  "fallback)", names + ["reason"], registry=self.registry)
        self._prompt_tokens = Counter(f"{PREFIX}router_prompt_tokens", "Prompt tokens of routed requests, in full "
                                      "routing blocks", names, registry=self.registry)
        self._matched_tokens = Counter(f"{PREFIX}router_prefix_matched_tokens", "Prompt tokens the chosen replica "
                                       "was expected to hold in its prefix cache", names, registry=self.registry)
        self._replicas = Gauge(f"{PREFIX}router_replicas", "Model replicas the router chooses from", names,
                               registry=self.registry)

    def observe(self, reason: str, num_prompt_tokens: int, num_matched_tokens: int) -> None:
        self._decisions.labels(**self._labels, reason=reason).inc()
        self._prompt_tokens.labels(**self._labels).inc(num_prompt_tokens)
        self._matched_tokens.labels(**self._labels).inc(num_matched_tokens)

    def set_num_replicas(self, num_replicas: int) -> None:
        self._replicas.labels(**self._labels).set(num_replicas)

    def snapshot(self) -> Snapshot:
        return snapshot(self.registry)


class AutoscalerMetrics:
    """The model deployment's autoscaling policy (in Serve's controller): replicas running, targeted, and asked
    for by each signal before delays and bounds."""

    def __init__(self, deployment: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"deployment": deployment}
        names = list(self._labels)
        self._running = Gauge(f"{PREFIX}autoscaler_running_replicas", "Model replicas running", names,
                              registry=self.registry)
        self._target = Gauge(f"{PREFIX}autoscaler_target_replicas", "Model replicas the autoscaler targets", names,
                             registry=self.registry)
        self._desired = Gauge(f"{PREFIX}autoscaler_desired_replicas", "Replicas each signal asks for (requests, "
                              "queue_depth, kv_cache, ttft), before delays and bounds", names + ["signal"],
                              registry=self.registry)

    def set(self, num_running: int, num_target: int, desired_by_signal: dict[str, float]) -> None:
        self._running.labels(**self._labels).set(num_running)
        self._target.labels(**self._labels).set(num_target)
        for signal, desired in desired_by_signal.items():
            self._desired.labels(**self._labels, signal=signal).set(desired)

    def snapshot(self) -> Snapshot:
        return snapshot(self.registry)


def snapshot(registry: CollectorRegistry) -> Snapshot:
    return [(family.name, family.type, family.documentation,
             [(sample.name, dict(sample.labels), sample.value) for sample in family.samples])
            for family in registry.collect()]


def render(snapshots: Iterable[Snapshot]) -> bytes:
    """Prometheus text of the union of snapshots: samples of equal families are listed under one header."""
    families: dict[str, Metric] = {}
    for snap in snapshots:
        for name, kind, documentation, samples in snap:
            family = families.get(name)
            if family is None:
                family = families[name] = Metric(name, documentation, kind)
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, labels, value)

    class _Union:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Union())
    return generate_latest(registry)
