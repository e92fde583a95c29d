"""The Grafana dashboards, as data: serving overview, cache and batching, MoE expert load, and the cluster.

Every panel reads Prometheus through the `datasource` variable and filters by the `model` variable; queries use
only the series docs/METRICS.md lists (ours, `gptoss_*`, and Ray's, `ray_*`). Panels are laid out two to a
row in the order given. `gptoss-serve dashboards` provisions these into Grafana; `--export` writes the JSON
files under deploy/grafana/ and the ConfigMap that Grafana's dashboard sidecar picks up on Kubernetes.
"""

from __future__ import annotations

import copy
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model=~"$model"'
RATE = "$__rate_interval"
TAGS = ["gptoss-serve"]
# Ray's node metrics that only GPU nodes report: empty, though valid, on a CPU-only cluster.
GPU_ONLY_SERIES = ("ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_gram_available")


# Panels ----------------------------------------------------------------------------------------------------------
def target(expr: str, legend: str = "", instant: bool = False, table: bool = False) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": not instant,
            "instant": instant, "format": "table" if table else "time_series"}


def timeseries(title: str, targets: list[dict], unit: str = "short", description: str = "",
               stacked: bool = False) -> dict[str, Any]:
    return {"type": "timeseries", "title": title, "description": description, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "custom": {
                "stacking": {"mode": "normal" if stacked else "none"}, "fillOpacity": 20 if stacked else 5}},
                "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> dict[str, Any]:
    return {"type": "stat", "title": title, "description": description, "targets": [target(expr)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area"}}


def heatmap(title: str, expr: str, legend: str, unit: str = "short", description: str = "",
            histogram: bool = False) -> dict[str, Any]:
    """Time along x. histogram: `expr` gives Prometheus buckets by `le`; otherwise each series is a row (its
    legend the row's label: an expert, a layer)."""
    return {"type": "heatmap", "title": title, "description": description,
            "targets": [{**target(expr, legend), "format": "heatmap" if histogram else "time_series"}],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"calculate": False, "cellGap": 1, "color": {"mode": "scheme", "scheme": "Turbo",
                                                                     "steps": 64, "exponent": 0.5},
                        "rowsFrame": {"layout": "auto" if histogram else "unknown"},
                        "yAxis": {"axisPlacement": "left", "unit": "short" if histogram else "none"},
                        "tooltip": {"mode": "single", "yHistogram": False}, "legend": {"show": True}}}


def percentiles(title: str, histogram: str, unit: str = "s", description: str = "") -> dict[str, Any]:
    """p50, p90 and p99 of a histogram over the selected models' replicas."""
    return timeseries(title, [
        target(f'histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{MODEL}}}[{RATE}])))', f"p{p}")
        for q, p in ((0.5, 50), (0.9, 90), (0.99, 99))], unit, description)


# Variables -------------------------------------------------------------------------------------------------------
def datasource_variable() -> dict[str, Any]:
    return {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "options": []}


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"type": "query", "name": name, "label": label, "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "sort": 3,
            "multi": True, "includeAll": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
            "options": [], "hide": 0}


MODEL_VARIABLE = query_variable("model", "Model", "label_values(gptoss_replica_up, model)")


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables: list[dict]) -> dict[str, Any]:
    """A dashboard with ids and a two-column layout given to its panels in order (full width for wide ones)."""
    laid_out, x, y = [], 0, 0
    for panel_id, panel in enumerate(copy.deepcopy(panels), start=1):
        width = panel.pop("width", 12)
        height = panel.pop("height", 8)
        if x + width > 24:
            x, y = 0, y + height
        laid_out.append({"id": panel_id, "datasource": DATASOURCE, **panel,
                         "gridPos": {"x": x, "y": y, "w": width, "h": height}})
        x += width
    return {"uid": uid, "title": title, "description": description, "tags": TAGS, "timezone": "browser",
            "editable": True, "schemaVersion": 39, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": [datasource_variable(), *variables]}, "annotations": {"list": []},
            "panels": laid_out}


def wide(panel: dict[str, Any], height: int = 8) -> dict[str, Any]:
    return {**panel, "width": 24, "height": height}


# Dashboards ------------------------------------------------------------------------------------------------------
def serving_overview() -> dict[str, Any]:
    requests = f"rate(gptoss_requests_total{{{MODEL}}}[{RATE}])"
    return dashboard("gptoss-overview", "gpt-oss serving: overview",
                     "Latency percentiles, throughput, queues and errors of every replica.", [
        {**stat("Model replicas", f"sum(gptoss_replica_up{{{MODEL}}})"), "width": 6, "height": 4},
        {**stat("Requests / s", f"sum({requests})", "reqps"), "width": 6, "height": 4},
        {**stat("Output tokens / s", f"sum(rate(gptoss_generation_tokens_total{{{MODEL}}}[{RATE}]))"),
         "width": 6, "height": 4},
        {**stat("Requests running", f"sum(gptoss_num_requests_running{{{MODEL}}})"), "width": 6, "height": 4},
        percentiles("Time to first token", "gptoss_time_to_first_token_seconds"),
        percentiles("End-to-end request latency", "gptoss_e2e_request_latency_seconds"),
        percentiles("Time per output token (mean per request)", "gptoss_time_per_output_token_seconds"),
        percentiles("Inter-token latency", "gptoss_inter_token_latency_seconds"),
        timeseries("Token throughput", [
            target(f"sum(rate(gptoss_prompt_tokens_total{{{MODEL}}}[{RATE}]))", "prompt"),
            target(f"sum(rate(gptoss_generation_tokens_total{{{MODEL}}}[{RATE}]))", "generated"),
            target(f"sum(rate(gptoss_reasoning_tokens_total{{{MODEL}}}[{RATE}]))", "of which reasoning")],
            "short", "Tokens per second over all replicas."),
        timeseries("Requests by outcome", [target(f"sum by (outcome) ({requests})", "{{outcome}}")], "reqps",
                   stacked=True),
        timeseries("Queue: running and waiting sequences", [
            target(f"sum by (replica) (gptoss_num_requests_running{{{MODEL}}})", "running {{replica}}"),
            target(f"sum by (replica) (gptoss_num_requests_waiting{{{MODEL}}})", "waiting {{replica}}")]),
        timeseries("Errors", [
            target(f'sum by (outcome) (rate(gptoss_requests_total{{{MODEL},outcome=~"error|rejected|aborted"}}'
                   f"[{RATE}]))", "replica: {{outcome}}"),
            target(f'sum by (status) (rate(gptoss_http_requests_total{{status=~"[45].."}}[{RATE}]))',
                   "HTTP {{status}}")], "reqps",
            "Requests a replica ended in error, refused (429) or saw aborted; HTTP 4xx/5xx answered by the ingress."),
    ], [MODEL_VARIABLE])


def cache_and_batching() -> dict[str, Any]:
    return dashboard("gptoss-cache-batching", "gpt-oss serving: cache and batching",
                     "KV cache, prefix cache, batch sizes, tokens per step and preemptions of each engine.", [
        timeseries("KV cache usage", [
            target(f"max by (replica) (gptoss_kv_cache_usage_ratio{{{MODEL}}})", "{{replica}}")], "percentunit"),
        timeseries("KV cache blocks", [
            target(f"sum(gptoss_kv_cache_used_blocks{{{MODEL}}})", "used"),
            target(f"sum(gptoss_kv_cache_total_blocks{{{MODEL}}})", "total")]),
        timeseries("Prefix cache hit rate", [
            target(f"sum(rate(gptoss_prefix_cache_hits_total{{{MODEL}}}[{RATE}])) / "
                   f"sum(rate(gptoss_prefix_cache_queries_total{{{MODEL}}}[{RATE}]))", "in the window"),
            target(f"avg(gptoss_prefix_cache_hit_ratio{{{MODEL}}})", "since start")], "percentunit",
            "Prompt tokens found in the prefix cache, of those looked up."),
        timeseries("Engine steps and preemptions", [
            target(f"sum by (replica) (rate(gptoss_engine_steps_total{{{MODEL}}}[{RATE}]))", "steps {{replica}}"),
            target(f"sum by (replica) (rate(gptoss_num_preemptions_total{{{MODEL}}}[{RATE}]))",
                   "preemptions {{replica}}")], "ops"),
        timeseries("Batch size (sequences per step)", [
            target(f"sum(rate(gptoss_batch_size_sum{{{MODEL}}}[{RATE}])) / "
                   f"sum(rate(gptoss_batch_size_count{{{MODEL}}}[{RATE}]))", "mean"),
            target(f"histogram_quantile(0.99, sum by (le) (rate(gptoss_batch_size_bucket{{{MODEL}}}[{RATE}])))",
                   "p99")]),
        timeseries("Tokens per step", [
            target(f"sum(rate(gptoss_tokens_per_step_sum{{{MODEL}}}[{RATE}])) / "
                   f"sum(rate(gptoss_tokens_per_step_count{{{MODEL}}}[{RATE}]))", "mean"),
            target(f"histogram_quantile(0.99, sum by (le) (rate(gptoss_tokens_per_step_bucket{{{MODEL}}}[{RATE}])))",
                   "p99")]),
        timeseries("Routing decisions", [
            target(f"sum by (reason) (rate(gptoss_router_decisions_total[{RATE}]))", "{{reason}}")], "reqps",
            "Why the router picked each request's replica: prefix or conversation affinity, least loaded, ..."),
        timeseries("Prompt tokens routed to a replica holding their prefix", [
            target(f"sum(rate(gptoss_router_prefix_matched_tokens_total[{RATE}])) / "
                   f"sum(rate(gptoss_router_prompt_tokens_total[{RATE}]))", "matched")], "percentunit",
            "The router's expectation; the prefix cache hit rate above is what the engines found."),
        wide(heatmap("Batch size distribution",
                     f"sum by (le) (increase(gptoss_batch_size_bucket{{{MODEL}}}[{RATE}]))", "{{le}}",
                     histogram=True, description="Steps per batch-size bucket.")),
    ], [MODEL_VARIABLE])


def moe_expert_load() -> dict[str, Any]:
    layer = query_variable("layer", "Layer", f"label_values(gptoss_expert_tokens_total{{{MODEL}}}, layer)")
    per_expert = f"sum by (layer, expert) (rate(gptoss_expert_tokens_total{{{MODEL}}}[{RATE}]))"
    matrix = {"type": "table", "title": "Tokens per expert (columns) per layer (rows) over the time range",
              "description": "The whole model at a glance: each cell a layer's expert, coloured by its tokens.",
              "targets": [target(f"sum by (layer, expert) (increase(gptoss_expert_tokens_total{{{MODEL}}}"
                                 f"[$__range]))", instant=True, table=True)],
              "transformations": [{"id": "groupingToMatrix", "options": {
                  "columnField": "expert", "rowField": "layer", "valueField": "Value"}}],
              "fieldConfig": {"defaults": {"unit": "short", "color": {"mode": "continuous-GrYlRd"},
                                           "custom": {"cellOptions": {"type": "color-background"}}},
                              "overrides": []},
              "options": {"showHeader": True, "cellHeight": "sm"}}
    return dashboard("gptoss-moe", "gpt-oss serving: MoE expert load",
                     "Tokens the router sends to each expert of each layer: hot experts and imbalance.", [
        wide(matrix, height=12),
        wide(heatmap("Layer imbalance: busiest expert / mean expert",
                     f"max by (layer) ({per_expert}) / avg by (layer) ({per_expert})", "{{layer}}",
                     description="1 is a perfectly even layer; rows are layers."), height=10),
        wide({**heatmap("Tokens per expert, layer $layer",
                        f'sum by (expert) (rate(gptoss_expert_tokens_total{{{MODEL},layer=~"$layer"}}[{RATE}]))',
                        "{{expert}}", "short", "Rows are experts; one panel per selected layer."),
              "repeat": "layer", "repeatDirection": "v"}, height=8),
        timeseries("Hottest experts", [target(f"topk(8, {per_expert})", "layer {{layer}} expert {{expert}}")],
                   "short", "Tokens per second of the eight busiest (layer, expert) pairs."),
        timeseries("Routed tokens per layer", [target(f"sum by (layer) ({per_expert})", "layer {{layer}}")],
                   "short", "Tokens times experts-per-token, per second."),
    ], [MODEL_VARIABLE, layer])


def cluster() -> dict[str, Any]:
    return dashboard("gptoss-cluster", "gpt-oss serving: cluster",
                     "Replicas, Serve autoscaling decisions, Ray nodes and resources, GPU memory.", [
        timeseries("Model replicas reporting", [
            target(f"sum by (model) (gptoss_replica_up{{{MODEL}}})", "{{model}}")]),
        timeseries("Serve replicas by deployment", [
            target("sum by (application, deployment) (ray_serve_deployment_replica_healthy)",
                   "healthy {{application}}/{{deployment}}")]),
        timeseries("Serve autoscaling decisions", [
            target("max by (application, deployment) (ray_serve_autoscaling_target_replicas)",
                   "target {{deployment}}"),
            target("max by (application, deployment) (ray_serve_autoscaling_desired_replicas)",
                   "desired {{deployment}}"),
            target("sum by (application, deployment) (ray_serve_deployment_replica_healthy)",
                   "running {{deployment}}")], "short",
            "What Serve's autoscaler decided (desired: the policy's raw answer; target: after smoothing and "
            "bounds) against the replicas running."),
        timeseries("gpt-oss autoscaling policy", [
            target("max by (deployment) (gptoss_autoscaler_running_replicas)", "running {{deployment}}"),
            target("max by (deployment) (gptoss_autoscaler_target_replicas)", "target {{deployment}}"),
            target("max by (deployment, signal) (gptoss_autoscaler_desired_replicas)", "wanted by {{signal}}")],
            "short", "Replicas each signal (requests, queue depth, KV cache, time to first token) asks for, and "
            "the target the policy settles on after delays and bounds."),
        timeseries("Ongoing requests per deployment", [
            target("sum by (deployment) (ray_serve_num_ongoing_requests_at_replicas)", "{{deployment}}")]),
        timeseries("Ray nodes", [target("sum by (node_type) (ray_cluster_active_nodes)", "{{node_type}}")],
                   "short", "Nodes the Ray autoscaler has brought up, by node type."),
        timeseries("Ray resources", [
            target('sum by (Name, State) (ray_resources{Name=~"CPU|GPU"})', "{{Name}} {{State}}")], "short",
            "Logical CPUs and GPUs of the cluster, used and available."),
        timeseries("Engine device memory", [
            target(f"sum by (replica, device) (gptoss_device_memory_used_bytes{{{MODEL}}})",
                   "used {{replica}} {{device}}"),
            target(f"sum by (replica, device) (gptoss_device_memory_total_bytes{{{MODEL}}})",
                   "total {{replica}} {{device}}")], "bytes",
            "The GPU of each replica's engine (its rank 0 when sharded), or the replica's memory on CPU."),
        timeseries("GPU utilization and memory (every GPU, from Ray)", [
            target("avg by (ip, GpuIndex) (ray_node_gpus_utilization)", "util % {{ip}} gpu {{GpuIndex}}"),
            target("sum by (ip, GpuIndex) (ray_node_gram_used) / (sum by (ip, GpuIndex) (ray_node_gram_used) + "
                   "sum by (ip, GpuIndex) (ray_node_gram_available)) * 100", "memory % {{ip}} gpu {{GpuIndex}}")],
            "percent", "Every GPU of every Ray node, sharded replicas' ranks included."),
    ], [MODEL_VARIABLE])


def all_dashboards() -> dict[str, dict[str, Any]]:
    """File stem -> dashboard."""
    return {"serving-overview": serving_overview(), "cache-batching": cache_and_batching(),
            "moe-expert-load": moe_expert_load(), "cluster": cluster()}


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(panel["title"], t["expr"]) for panel in board["panels"] for t in panel.get("targets", [])]
