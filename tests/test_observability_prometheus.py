"""A real Prometheus (the Debian package) scraping a running application while load runs: every query of every
dashboard panel returns data, and the shipped scrape config passes promtool.

The application is the gpt-oss-20b RayService's own serveConfigV2, deployed through Serve's declarative API
(what KubeRay does through the dashboard agent) with its args switched to the tiny model on CPU; Prometheus
scrapes it with deploy/prometheus/prometheus.yml, its targets pointed at this test's Serve proxy and Ray node.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gptoss_serve.cluster.observability.dashboard_specs import GPU_ONLY_SERIES, all_dashboards, panel_queries

REPO = Path(__file__).resolve().parents[1]
APP = "prom_test"
MODEL = "gpt-oss-default"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Prometheus is not installed: `apt-get install -y prometheus` (the Makefile's install step does it)")
# The RayService's args that ask for GPUs and the real model, replaced for this CPU machine.
CPU_ARGS = {"model": None, "model_id": None, "device": "cpu", "dtype": "float32", "kernels": "torch",
            "max_num_seqs": 8, "max_queued_requests": 16, "kv_cache_memory_bytes": 32 * 2 ** 20,
            "num_ingress_replicas": 1, "graceful_shutdown_timeout_s": 1, "ray_actor_options": {"num_cpus": 1}}
# Grafana's variables, as they expand with "All" selected.
VARIABLES = {"$__rate_interval": "30s", "$__range": "10m", "$model": ".*", "$layer": ".*"}


def test_shipped_prometheus_config_passes_promtool():
    out = subprocess.run([PROMTOOL, "check", "config", str(REPO / "deploy/prometheus/prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def app_url(serve_http):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    rayservice = yaml.safe_load((REPO / "deploy/kuberay/overlays/gpt-oss-20b/rayservice.yaml").read_text())
    application = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    autoscaling = {**application["args"]["autoscaling"], "max_replicas": 2, "upscale_delay_s": 600}
    application.update(name=APP, route_prefix=f"/{APP}",
                       args={**application["args"], **CPU_ARGS, "autoscaling": autoscaling})
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [application]}))
    url = f"{serve_http}/{APP}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the application never became healthy"
        time.sleep(1)
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def prometheus(app_url, serve_http, tmp_path_factory):
    """Prometheus on 127.0.0.1 with the shipped config, scraping every second; yields its query URL."""
    import ray

    root = tmp_path_factory.mktemp("prometheus")
    ray_node = next(n for n in ray.nodes() if n["Alive"])
    (root / "ray_targets.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{ray_node['MetricsExportPort']}"]}]))
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["gptoss-serve"].update(metrics_path=f"/{APP}/metrics",
                                static_configs=[{"targets": [serve_http.removeprefix("http://")]}])
    jobs["ray"]["file_sd_configs"] = [{"files": [str(root / "ray_targets.json")]}]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=open(root / "log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (root / "log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def drive_load(url: str, seconds: float) -> None:
    """Chat (streamed and not), completions with two samples, a repeated prompt (prefix-cache hits), a prompt
    too long for the context (400 from a replica) and an unknown model (404 from the ingress)."""
    chat = {"model": MODEL, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about the weather in Paris today."}]}
    bodies = [("chat/completions", chat), ("chat/completions", {**chat, "stream": True}),
              ("completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "n": 2}),
              ("chat/completions", {**chat, "max_tokens": 10 ** 7}), ("chat/completions", {**chat, "model": "nope"})]

    def post(path_body):
        path, body = path_body
        with httpx.Client(timeout=120) as client:
            return client.post(f"{url}/v1/{path}", json=body).status_code

    deadline = time.monotonic() + seconds
    statuses = set()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline:
            statuses |= set(pool.map(post, bodies))
    assert {200, 400, 404} <= statuses, statuses


def query(prometheus: str, expr: str) -> dict:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]


def test_every_dashboard_query_returns_data(app_url, prometheus):
    drive_load(app_url, seconds=12)
    pending = {(board["uid"], title, expr) for board in all_dashboards().values()
               for title, expr in panel_queries(board)}
    gpu_only = {p for p in pending if any(series in p[2] for series in GPU_ONLY_SERIES)}
    for _, _, expr in gpu_only:  # this machine has no GPU: valid queries, but nothing to return
        query(prometheus, expr)
    pending -= gpu_only
    assert len(pending) >= 30
    deadline = time.monotonic() + 60  # Ray's agent exports every few seconds; our scrape is every second
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if not query(prometheus, p[2])["result"]}
        time.sleep(2)
    assert not pending, sorted(pending)


def test_ray_export_carries_the_mirrored_series(prometheus):
    """Through Ray's own metrics agent too: the replica's counters with Ray's prefix and node labels."""
    deadline = time.monotonic() + 30
    while not (result := query(prometheus, f'ray_gptoss_requests_total{{model="{MODEL}"}}')["result"]):
        assert time.monotonic() < deadline, "no ray_gptoss_requests_total from Ray's metrics agent"
        time.sleep(2)
    assert {"NodeAddress", "replica", "outcome"} <= set(result[0]["metric"])
