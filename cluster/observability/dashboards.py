"""`gptoss-serve dashboards`: provision the Grafana dashboards (dashboard_specs.py) through Grafana's HTTP API.

In order: the folder (created when missing), a Prometheus datasource (created only when Grafana has none), then
each dashboard, written only when Grafana's copy differs from ours or sits in another folder. A second run
therefore changes nothing: no new folder, datasource or dashboard version. `--export DIR` writes the dashboards
as JSON files and as the ConfigMap Grafana's dashboard sidecar loads on Kubernetes, instead of calling Grafana.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from gptoss_serve.cluster.observability.dashboard_specs import all_dashboards

FOLDER_UID = "gptoss-serve"
FOLDER_TITLE = "gpt-oss serving"
DATASOURCE_UID = "gptoss-prometheus"
CONFIGMAP_NAME = "gptoss-grafana-dashboards"
# Fields Grafana adds to a stored dashboard: not ours to compare.
_SERVER_FIELDS = ("id", "version")


@dataclasses.dataclass
class ProvisionReport:
    folder_created: bool = False
    datasource_created: bool = False
    datasource_uid: str = ""
    dashboards_written: list[str] = dataclasses.field(default_factory=list)
    dashboards_unchanged: list[str] = dataclasses.field(default_factory=list)


def provision(api, prometheus_url: str, folder_uid: str = FOLDER_UID, folder_title: str = FOLDER_TITLE
              ) -> ProvisionReport:
    """Brings Grafana (a grafana_client.GrafanaApi) to our folder, datasource and dashboards; idempotent."""
    from grafana_client.client import GrafanaClientError

    report = ProvisionReport()
    try:
        api.folder.get_folder(folder_uid)
    except GrafanaClientError as error:
        if error.status_code != 404:
            raise
        api.folder.create_folder(folder_title, uid=folder_uid)
        report.folder_created = True

    datasource = _find_prometheus(api.datasource.list_datasources())
    if datasource is None:
        datasource = {"name": "Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
                      "url": prometheus_url, "isDefault": False, "jsonData": {"httpMethod": "POST"}}
        api.datasource.create_datasource(datasource)
        report.datasource_created = True
    report.datasource_uid = datasource["uid"]

    for board in all_dashboards().values():
        board = with_default_datasource(board, datasource)
        try:
            stored = api.dashboard.get_dashboard(board["uid"])
        except GrafanaClientError as error:
            if error.status_code != 404:
                raise
            stored = None
        if stored is not None and _same(stored, board, folder_uid):
            report.dashboards_unchanged.append(board["uid"])
            continue
        api.dashboard.update_dashboard({"dashboard": board, "folderUid": folder_uid, "overwrite": True,
                                        "message": "gptoss-serve dashboards"})
        report.dashboards_written.append(board["uid"])
    return report


def _find_prometheus(datasources: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Ours if present, else the default Prometheus, else any Prometheus."""
    prometheus = [d for d in datasources if d.get("type") == "prometheus"]
    for pick in (lambda d: d.get("uid") == DATASOURCE_UID, lambda d: d.get("isDefault"), lambda d: True):
        found = next((d for d in prometheus if pick(d)), None)
        if found is not None:
            return found
    return None


def with_default_datasource(board: dict[str, Any], datasource: dict[str, Any]) -> dict[str, Any]:
    """The dashboard with its `datasource` variable preset to the given datasource (still selectable)."""
    board = copy.deepcopy(board)
    for variable in board["templating"]["list"]:
        if variable["name"] == "datasource":
            variable["current"] = {"text": datasource["name"], "value": datasource["uid"]}
    return board


def _same(stored: dict[str, Any], board: dict[str, Any], folder_uid: str) -> bool:
    dashboard = {k: v for k, v in stored.get("dashboard", {}).items() if k not in _SERVER_FIELDS}
    return dashboard == board and stored.get("meta", {}).get("folderUid") == folder_uid


# Export ----------------------------------------------------------------------------------------------------------
def dashboard_json(board: dict[str, Any]) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def configmap_yaml(namespace: str | None = None) -> str:
    """The dashboards as one ConfigMap labelled for Grafana's sidecar (kube-prometheus-stack's convention)."""
    import yaml

    data = {f"gptoss-{stem}.json": dashboard_json(board) for stem, board in all_dashboards().items()}
    metadata: dict[str, Any] = {"name": CONFIGMAP_NAME, "labels": {"grafana_dashboard": "1"},
                                "annotations": {"grafana_folder": FOLDER_TITLE}}
    if namespace:
        metadata["namespace"] = namespace
    class BlockDumper(yaml.SafeDumper):  # the JSON documents as literal blocks, readable in the file
        pass

    def text(dumper, value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    BlockDumper.add_representer(str, text)
    header = "# Generated by `gptoss-serve dashboards --export deploy`; do not edit by hand.\n"
    return header + yaml.dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data},
                              Dumper=BlockDumper, sort_keys=False, width=1000)


def export(deploy_dir: Path) -> list[Path]:
    """Writes deploy_dir/grafana/dashboards/*.json and the ConfigMap beside the KubeRay manifests."""
    written = []
    for stem, board in all_dashboards().items():
        path = deploy_dir / "grafana" / "dashboards" / f"{stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dashboard_json(board))
        written.append(path)
    path = deploy_dir / "kuberay" / "base" / "grafana-dashboards.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(configmap_yaml())
    return written + [path]


# CLI -------------------------------------------------------------------------------------------------------------
def add_dashboards_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dashboards", help="provision the Grafana dashboards (or export them as files)",
        description="Create the gpt-oss folder, a Prometheus datasource if Grafana has none, and the four "
                    "dashboards (overview, cache and batching, MoE expert load, cluster). Running it again "
                    "changes nothing unless the dashboards changed.")
    parser.add_argument("--grafana-url", help="e.g. http://grafana.monitoring:3000")
    parser.add_argument("--token", help="a Grafana service-account token (Editor or Admin)")
    parser.add_argument("--prometheus-url", default="http://prometheus:9090",
                        help="used only if Grafana has no Prometheus datasource yet (default %(default)s)")
    parser.add_argument("--folder", default=FOLDER_TITLE, help="folder title (default %(default)r)")
    parser.add_argument("--export", metavar="DEPLOY_DIR", type=Path,
                        help="write DEPLOY_DIR/grafana/dashboards/*.json and the KubeRay ConfigMap instead")
    parser.set_defaults(func=run_dashboards)
    return parser


def run_dashboards(args: argparse.Namespace) -> int:
    if args.export is not None:
        for path in export(args.export):
            print(f"wrote {path}")
        return 0
    if not args.grafana_url or not args.token:
        raise SystemExit("gptoss-serve dashboards: --grafana-url and --token are required (or --export DIR)")
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(args.grafana_url, credential=args.token)
    report = provision(api, args.prometheus_url, folder_title=args.folder)
    print(f"folder {FOLDER_UID!r}: {'created' if report.folder_created else 'exists'}; "
          f"datasource {report.datasource_uid!r}: {'created' if report.datasource_created else 'exists'}")
    for uid in report.dashboards_written:
        print(f"dashboard {uid}: written  {args.grafana_url.rstrip('/')}/d/{uid}")
    for uid in report.dashboards_unchanged:
        print(f"dashboard {uid}: unchanged")
    return 0
