"""How many model replicas: Serve's ongoing-requests rule, also weighing queue depth, KV-cache pressure and
time to first token (a custom Serve autoscaling policy, run by Serve's controller every control-loop tick).

Each signal asks for `running replicas * observed / target`; the policy asks for the largest. Serve then applies
the deployment's upscale/downscale delays, scaling factors and min/max replicas. The signals:

- requests: ongoing (queued and running) requests at handles and replicas, over `target_ongoing_requests` each
  (Serve's default policy);
- queue_depth: sequences waiting in the engines' queues, over `target_queue_depth` per replica;
- kv_cache: mean KV-cache use over `target_kv_cache_usage` (past it, engines preempt);
- ttft: mean time to first token over `target_ttft_s` (off when None): finished requests' TTFT and the age of
  requests still waiting for their first token, so a growing backlog counts before it is served.

The replicas report their numbers through Serve's `record_autoscaling_stats` (`replica_autoscaling_stats`),
averaged by Serve over `look_back_period_s`. An idle deployment reports zeros, so only the requests signal
decides the way down.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

logger = logging.getLogger(__name__)

STAT_NUM_WAITING = "gptoss_num_waiting_seqs"
STAT_KV_USAGE = "gptoss_kv_cache_usage"
STAT_TTFT_S = "gptoss_ttft_s"
METRICS_PUSH_INTERVAL_S = 1.0
HUB_RETRY_INTERVAL_S = 10.0


@dataclasses.dataclass(frozen=True)
class ScalingTargets:
    target_ongoing_requests: float  # per replica
    target_queue_depth: float = 4.0  # waiting sequences per replica
    target_kv_cache_usage: float = 0.8
    target_ttft_s: float | None = None


@dataclasses.dataclass(frozen=True)
class ScalingSignals:
    num_replicas: int  # running
    num_ongoing_requests: float  # total over the deployment
    mean_num_waiting: float  # per replica
    mean_kv_usage: float
    mean_ttft_s: float


def desired_replicas(signals: ScalingSignals, targets: ScalingTargets) -> dict[str, float]:
    """Replicas each signal asks for (fractional; Serve rounds up after its scaling factors)."""
    n = signals.num_replicas
    desired = {
        "requests": signals.num_ongoing_requests / targets.target_ongoing_requests,
        "queue_depth": n * signals.mean_num_waiting / targets.target_queue_depth,
        "kv_cache": n * signals.mean_kv_usage / targets.target_kv_cache_usage,
    }
    if targets.target_ttft_s is not None:
        desired["ttft"] = n * signals.mean_ttft_s / targets.target_ttft_s
    return desired


class GptossAutoscalingPolicy:
    """Serve builds it once per deployment from `policy_kwargs` and calls it with an AutoscalingContext."""

    def __init__(self, target_queue_depth: float = 4.0, target_kv_cache_usage: float = 0.8,
                 target_ttft_s: float | None = None):
        self._targets = dict(target_queue_depth=target_queue_depth, target_kv_cache_usage=target_kv_cache_usage,
                             target_ttft_s=target_ttft_s)
        self._metrics = None
        self._hub = None
        self._last_push_time = 0.0
        self._last_hub_lookup_time = -HUB_RETRY_INTERVAL_S

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:  # nothing reports yet: Serve's cold start path applies
            return ctx.target_num_replicas, {}
        targets = ScalingTargets(ctx.config.get_target_ongoing_requests(), **self._targets)
        desired = desired_replicas(signals_of(ctx), targets)
        self._publish(ctx, desired)
        return max(desired.values()), {}

    def _publish(self, ctx, desired: dict[str, float]) -> None:
        """Pushes the decision's series to the application's metrics hub, at most every second; never raises
        (this runs in Serve's controller)."""
        now = time.monotonic()
        if now - self._last_push_time < METRICS_PUSH_INTERVAL_S:
            return
        self._last_push_time = now
        try:
            from gptoss_serve.cluster.serve.metrics import AutoscalerMetrics

            if self._metrics is None:
                self._metrics = AutoscalerMetrics(ctx.deployment_name)
            self._metrics.set(ctx.current_num_replicas, ctx.target_num_replicas, desired)
            hub = self._find_hub(ctx.app_name, now)
            if hub is not None:
                hub.push.remote(f"autoscaler:{ctx.app_name}:{ctx.deployment_name}", self._metrics.snapshot())
        except Exception:
            logger.warning("autoscaler metrics push failed", exc_info=True)

    def _find_hub(self, app_name: str, now: float):
        if self._hub is None and now - self._last_hub_lookup_time >= HUB_RETRY_INTERVAL_S:
            import ray

            from gptoss_serve.cluster.serve.shared_actors import NAMESPACE, actor_name

            self._last_hub_lookup_time = now
            try:
                self._hub = ray.get_actor(actor_name(app_name, "metrics"), namespace=NAMESPACE)
            except ValueError:  # no replica created it yet
                pass
        return self._hub


def signals_of(ctx) -> ScalingSignals:
    metrics = ctx.aggregated_metrics or {}
    replicas = ctx.running_replicas
    return ScalingSignals(
        num_replicas=ctx.current_num_replicas, num_ongoing_requests=ctx.total_num_requests,
        mean_num_waiting=_mean(metrics.get(STAT_NUM_WAITING), replicas),
        mean_kv_usage=_mean(metrics.get(STAT_KV_USAGE), replicas),
        mean_ttft_s=_mean(metrics.get(STAT_TTFT_S), replicas))


def _mean(by_replica: Mapping[Any, float] | None, replicas) -> float:
    """Mean over running replicas; one that has not reported yet counts as idle."""
    if not by_replica or not replicas:
        return 0.0
    return sum(by_replica.get(replica, 0.0) for replica in replicas) / len(replicas)


class TtftWindow:
    """A replica's time-to-first-token signal between two autoscaling reports: the TTFT of requests whose first
    token came, and the age of those still waiting for one."""

    def __init__(self):
        self._sum_s = 0.0
        self._count = 0

    def observe(self, ttft_s: float) -> None:
        self._sum_s += ttft_s
        self._count += 1

    def take(self, waiting_ages_s: list[float]) -> float:
        """The mean since the last take (0 when nothing happened), and starts a new window."""
        total, count = self._sum_s + sum(waiting_ages_s), self._count + len(waiting_ages_s)
        self._sum_s, self._count = 0.0, 0
        return total / count if count else 0.0


def replica_autoscaling_stats(num_waiting: int, kv_usage: float, ttft_s: float) -> dict[str, float]:
    """What a replica's `record_autoscaling_stats` returns."""
    return {STAT_NUM_WAITING: float(num_waiting), STAT_KV_USAGE: float(kv_usage), STAT_TTFT_S: float(ttft_s)}
