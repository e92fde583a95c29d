"""The replica's main series, also through Ray's own metrics export (`ray.util.metrics`).

Ray's metrics agent on each node serves what that node's processes record, named with Ray's prefix and
labels: `gptoss_requests_total{model,replica,...}` appears there as `ray_gptoss_requests_total{...,
NodeAddress, SessionName, ...}`. So a Prometheus that already scrapes Ray (KubeRay's PodMonitor on every
pod's metrics port) gets the application's counters and gauges per node, without the ingress. The ingress's
/metrics stays the complete set: histograms and the MoE load (many series) are not mirrored.
"""

from __future__ import annotations

from typing import Any

MIRRORED = frozenset({
    "gptoss_requests", "gptoss_prompt_tokens", "gptoss_generation_tokens", "gptoss_reasoning_tokens",
    "gptoss_num_requests_running", "gptoss_num_requests_waiting", "gptoss_kv_cache_usage_ratio",
    "gptoss_prefix_cache_queries", "gptoss_prefix_cache_hits", "gptoss_num_preemptions", "gptoss_engine_steps",
    "gptoss_replica_up", "gptoss_device_memory_used_bytes",
})


class RayMetricsMirror:
    """Replays snapshots (see metrics.snapshot) into Ray metrics: gauges are set, counters grow by the change."""

    def __init__(self, names: frozenset[str] = MIRRORED):
        self._names = names
        self._metrics: dict[str, Any] = {}
        self._last_counts: dict[tuple, float] = {}

    def update(self, snapshot) -> None:
        for name, kind, documentation, samples in snapshot:
            if name not in self._names or kind not in ("counter", "gauge"):
                continue
            for sample_name, labels, value in samples:
                if kind == "counter" and sample_name != name + "_total":
                    continue  # the `_created` timestamps
                metric = self._metric(name, kind, documentation, labels)
                if kind == "gauge":
                    metric.set(value, tags=labels)
                    continue
                key = (name, tuple(sorted(labels.items())))
                increase = value - self._last_counts.get(key, 0.0)
                if increase > 0:
                    metric.inc(increase, tags=labels)
                self._last_counts[key] = value

    def _metric(self, name: str, kind: str, documentation: str, labels: dict[str, str]):
        metric = self._metrics.get(name)
        if metric is None:
            from ray.util import metrics

            cls = metrics.Counter if kind == "counter" else metrics.Gauge
            metric = self._metrics[name] = cls(name, documentation, tag_keys=tuple(sorted(labels)))
        return metric
