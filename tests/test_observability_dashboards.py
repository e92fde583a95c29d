"""The Grafana dashboards: well-formed, in step with the files we ship, querying only series we export; and their
provisioning, idempotent.

No Grafana server can be installed on these machines, so provisioning runs against `FakeGrafana`, a local HTTP
server answering the Grafana API calls grafana-client makes (folders, datasources, dashboards, health) and
recording each one. It is the one stand-in in these tests; the real client library makes real HTTP calls.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from gptoss_serve.cluster.observability import dashboards
from gptoss_serve.cluster.observability.dashboard_specs import GPU_ONLY_SERIES, all_dashboards, panel_queries

REPO = Path(__file__).resolve().parents[1]
TOKEN = "glsa_test_token"
# Every series we export (docs/METRICS.md lists them) and the Ray series the cluster dashboard reads.
OUR_SERIES = re.findall(r"^\| `(gptoss_[a-z0-9_]+)`", (REPO / "docs/METRICS.md").read_text(), re.M)
RAY_SERIES = {"ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas",
              "ray_serve_autoscaling_desired_replicas", "ray_serve_num_ongoing_requests_at_replicas",
              "ray_cluster_active_nodes", "ray_resources", *GPU_ONLY_SERIES}
# Our series not labelled by model: the ingress's, the router's and the autoscaler's (labelled by deployment).
DEPLOYMENT_SERIES = ("gptoss_http_requests", "gptoss_router_", "gptoss_autoscaler_")
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "avg", "topk", "le", "model",
                "outcome", "status", "replica", "device", "layer", "expert", "application", "deployment",
                "node_type", "Name", "State", "ip", "GpuIndex", "CPU", "GPU", "error", "rejected", "aborted",
                "reason", "signal"}


def series_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (identifiers that are not functions, labels or values)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    return {w for w in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr) if w not in PROMQL_WORDS}


def exported_name(series: str) -> str:
    """The sample name -> its family in METRICS.md (histogram samples and counters' _total)."""
    return re.sub(r"_(bucket|sum|count)$", "", series)


# Dashboard JSON --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", list(all_dashboards()))
def test_dashboard_is_valid_and_uses_only_our_series(stem):
    board = json.loads((REPO / "deploy/grafana/dashboards" / f"{stem}.json").read_text())
    assert board == all_dashboards()[stem], "stale file: run `gptoss-serve dashboards --export deploy`"
    assert board["uid"].startswith("gptoss-") and board["title"] and board["panels"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]
    for title, expr in panel_queries(board):
        for name in series_names(expr):
            assert exported_name(name) in OUR_SERIES or name in RAY_SERIES, (title, name)
        if any(name.startswith("gptoss_") and not name.startswith(DEPLOYMENT_SERIES) for name in series_names(expr)):
            assert 'model=~"$model"' in expr, title  # every panel on model series follows the model selector
    queries = " ".join(v.get("definition", "") for v in variables.values())
    assert all(exported_name(n) in OUR_SERIES for n in re.findall(r"gptoss_[a-z0-9_]+", queries))


def test_moe_dashboard_has_a_layer_by_expert_heatmap():
    board = all_dashboards()["moe-expert-load"]
    kinds = {panel["type"] for panel in board["panels"]}
    assert "heatmap" in kinds
    repeated = [p for p in board["panels"] if p.get("repeat") == "layer"]
    assert repeated and repeated[0]["type"] == "heatmap" and 'layer=~"$layer"' in repeated[0]["targets"][0]["expr"]
    matrix = next(p for p in board["panels"] if p["type"] == "table")
    assert matrix["transformations"][0]["options"]["rowField"] == "layer"


def test_configmap_holds_every_dashboard():
    text = (REPO / "deploy/kuberay/base/grafana-dashboards.yaml").read_text()
    assert text == dashboards.configmap_yaml(), "stale file: run `gptoss-serve dashboards --export deploy`"
    configmap = yaml.safe_load(text)
    assert configmap["metadata"]["labels"] == {"grafana_dashboard": "1"}
    boards = {json.loads(v)["uid"] for v in configmap["data"].values()}
    assert boards == {b["uid"] for b in all_dashboards().values()}


def test_metrics_doc_lists_every_series_we_export():
    import numpy as np

    from gptoss_serve.cluster.serve.engine_client import EngineStats
    from gptoss_serve.cluster.serve.metrics import IngressMetrics, ReplicaMetrics

    replica = ReplicaMetrics("m", "r")
    replica.set_engine_stats(EngineStats(device="cpu"))
    replica.set_expert_token_counts(np.zeros((2, 4), dtype=np.int64))
    exported = {name + ("_total" if kind == "counter" else "") for snapshot in (replica.snapshot(),
                IngressMetrics("i").snapshot()) for name, kind, _, _ in snapshot}
    assert exported <= set(OUR_SERIES), exported - set(OUR_SERIES)


# Provisioning ----------------------------------------------------------------------------------------------------
class FakeGrafana:
    """Answers the Grafana HTTP API calls grafana-client makes for provisioning, keeping state in dicts and
    recording every call as (method, path)."""

    def __init__(self, datasources: list[dict] | None = None):
        self.folders: dict[str, dict] = {}
        self.datasources: list[dict] = list(datasources or [])
        self.dashboards: dict[str, dict] = {}  # uid -> {"dashboard": ..., "meta": {"folderUid": ...}}
        self.calls: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

            def do_PUT(self):
                fake.handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @property
    def writes(self) -> list[tuple[str, str]]:
        return [call for call in self.calls if call[0] != "GET"]

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        path = request.path.split("?")[0]
        self.calls.append((method, path))
        length = int(request.headers.get("Content-Length") or 0)
        body = json.loads(request.rfile.read(length)) if length else None
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(request, 401, {"message": "invalid API key"})
        status, answer = self.route(method, path, body)
        self.reply(request, status, answer)

    def route(self, method: str, path: str, body):
        if (method, path) == ("GET", "/api/health"):
            return 200, {"database": "ok", "version": "11.3.0"}
        if method == "GET" and path.startswith("/api/folders/"):
            folder = self.folders.get(path.rsplit("/", 1)[1])
            return (200, folder) if folder else (404, {"message": "folder not found"})
        if (method, path) == ("POST", "/api/folders"):
            if body["uid"] in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            self.folders[body["uid"]] = {"id": len(self.folders) + 1, **body}
            return 200, self.folders[body["uid"]]
        if (method, path) == ("GET", "/api/datasources"):
            return 200, self.datasources
        if (method, path) == ("POST", "/api/datasources"):
            self.datasources.append({"id": len(self.datasources) + 1, **body})
            return 200, {"message": "Datasource added", "datasource": self.datasources[-1]}
        if method == "GET" and path.startswith("/api/dashboards/uid/"):
            stored = self.dashboards.get(path.rsplit("/", 1)[1])
            return (200, stored) if stored else (404, {"message": "Dashboard not found"})
        if (method, path) == ("POST", "/api/dashboards/db"):
            board = body["dashboard"]
            previous = self.dashboards.get(board["uid"])
            version = previous["dashboard"]["version"] + 1 if previous else 1
            self.dashboards[board["uid"]] = {"dashboard": {**board, "id": 7, "version": version},
                                             "meta": {"folderUid": body.get("folderUid", "")}}
            return 200, {"status": "success", "uid": board["uid"], "version": version}
        return 404, {"message": f"not found: {method} {path}"}

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, answer) -> None:
        data = json.dumps(answer).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


@pytest.fixture
def grafana():
    server = FakeGrafana()
    yield server
    server.close()


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    dashboards.add_dashboards_parser(parser.add_subparsers())
    args = parser.parse_args(["dashboards", *argv])
    return args.func(args)


def test_provisioning_creates_everything_then_changes_nothing(grafana, capsys):
    assert cli("--grafana-url", grafana.url, "--token", TOKEN, "--prometheus-url", "http://prom:9090") == 0
    first = grafana.writes
    assert ("POST", "/api/folders") in first and ("POST", "/api/datasources") in first
    assert first.count(("POST", "/api/dashboards/db")) == 4
    assert grafana.datasources[0]["url"] == "http://prom:9090" and grafana.datasources[0]["type"] == "prometheus"
    for uid, stored in grafana.dashboards.items():
        assert stored["meta"]["folderUid"] == dashboards.FOLDER_UID
        current = stored["dashboard"]["templating"]["list"][0]["current"]
        assert current["value"] == dashboards.DATASOURCE_UID

    grafana.calls.clear()
    assert cli("--grafana-url", grafana.url, "--token", TOKEN) == 0
    assert grafana.writes == []  # idempotent: no folder, datasource or dashboard version added
    assert {stored["dashboard"]["version"] for stored in grafana.dashboards.values()} == {1}
    assert capsys.readouterr().out.count("unchanged") == 4


def test_provisioning_keeps_an_existing_prometheus_and_repairs_a_changed_dashboard():
    existing = {"id": 1, "uid": "prom-main", "name": "Main Prometheus", "type": "prometheus", "isDefault": True}
    grafana = FakeGrafana(datasources=[{"id": 2, "uid": "loki", "name": "Loki", "type": "loki"}, existing])
    try:
        from grafana_client import GrafanaApi

        api = GrafanaApi.from_url(grafana.url, credential=TOKEN)
        report = dashboards.provision(api, "http://unused:9090")
        assert not report.datasource_created and report.datasource_uid == "prom-main"
        assert ("POST", "/api/datasources") not in grafana.writes
        grafana.dashboards["gptoss-moe"]["dashboard"]["title"] = "edited by hand"
        grafana.calls.clear()
        report = dashboards.provision(api, "http://unused:9090")
        assert report.dashboards_written == ["gptoss-moe"] and grafana.writes == [("POST", "/api/dashboards/db")]
    finally:
        grafana.close()


def test_provisioning_reports_a_bad_token(grafana):
    from grafana_client.client import GrafanaUnauthorizedError

    with pytest.raises(GrafanaUnauthorizedError):
        cli("--grafana-url", grafana.url, "--token", "wrong")


def test_export_writes_the_shipped_files(tmp_path):
    assert cli("--export", str(tmp_path)) == 0
    for stem in all_dashboards():
        shipped = REPO / "deploy/grafana/dashboards" / f"{stem}.json"
        assert (tmp_path / "grafana/dashboards" / f"{stem}.json").read_text() == shipped.read_text()
    assert (tmp_path / "kuberay/base/grafana-dashboards.yaml").read_text() == \
        (REPO / "deploy/kuberay/base/grafana-dashboards.yaml").read_text()
