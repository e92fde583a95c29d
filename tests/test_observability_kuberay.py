"""The KubeRay manifests: each validates against KubeRay's strict CRD schemas (read from ../shared/kuberay/ beside
the checkout), the serveConfigV2 each RayService embeds builds our Serve application through our own config code,
and the pieces agree with each other (worker pods fit a replica, monitors find the pods, kustomize finds files)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO.parent / "shared" / "kuberay"
KUBERAY = REPO / "deploy" / "kuberay"
RAYSERVICES = {"gpt-oss-20b": KUBERAY / "overlays/gpt-oss-20b/rayservice.yaml",
               "gpt-oss-120b": KUBERAY / "overlays/gpt-oss-120b/rayservice.yaml"}
RAYCLUSTER = KUBERAY / "raycluster/raycluster.yaml"


def schema(kind: str) -> dict:
    path = SCHEMAS / f"{kind}_v1.json"
    if not path.exists():
        pytest.skip(f"KubeRay schemas not found at {SCHEMAS} (they live beside the checkout, see its README)")
    return json.loads(path.read_text())


def validate(document: dict, kind: str) -> None:
    schema_ = schema(kind)
    validator = jsonschema.validators.validator_for(schema_, default=jsonschema.Draft202012Validator)(schema_)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message[:300]}" for e in errors)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def cluster_spec(document: dict) -> dict:
    return document["spec"]["rayClusterConfig"] if document["kind"] == "RayService" else document["spec"]


def serve_application(document: dict) -> dict:
    return yaml.safe_load(document["spec"]["serveConfigV2"])["applications"][0]


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


# Schemas ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RAYSERVICES))
def test_rayservice_validates(name):
    validate(load(RAYSERVICES[name]), "rayservice")


def test_raycluster_validates():
    validate(load(RAYCLUSTER), "raycluster")


def test_schemas_are_strict():
    """A misspelt field is refused (the API server would drop it silently)."""
    document = load(RAYSERVICES["gpt-oss-20b"])
    document["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(AssertionError, match="maxReplica"):
        validate(document, "rayservice")


# serveConfigV2 -> our application -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RAYSERVICES))
def test_serve_config_builds_our_application(name, tmp_path):
    from ray.serve import Application

    from gptoss_serve.cluster.serve.app import build_app
    from gptoss_serve.cluster.serve.config import load_serve_config

    document = load(RAYSERVICES[name])
    (tmp_path / "serve.yaml").write_text(document["spec"]["serveConfigV2"])
    serve_config, configs = load_serve_config(tmp_path / "serve.yaml")  # Ray's schema, then AppConfig
    application = serve_config["applications"][0]
    assert application["import_path"] == "gptoss_serve.cluster.serve.app:build_app"
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # inside a pod
    config = configs[application["name"]]
    assert config.served_model_id == f"openai/{name}" and config.device == "cuda"
    assert isinstance(build_app(application["args"]), Application)

    # A GPU worker pod holds one whole replica (its placement group is STRICT_PACK), and Serve's maximum
    # matches the worker group's.
    options = config.model_replica_options()
    bundles = options.get("placement_group_bundles") or [options["ray_actor_options"]]
    replica_gpus = sum(b.get("GPU", b.get("num_gpus", 0)) for b in bundles)
    replica_cpus = sum(b.get("CPU", b.get("num_cpus", 1)) for b in bundles)
    group = cluster_spec(document)["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    assert replica_gpus == gpus(container) == config.world_size
    assert replica_cpus + config.num_ingress_replicas <= int(container["resources"]["limits"]["cpu"])
    assert "autoscaling_config" in options and "num_replicas" not in options
    assert config.autoscaling.max_replicas == group["maxReplicas"]
    assert config.autoscaling.min_replicas == group["minReplicas"]


def test_120b_is_sharded_over_one_node():
    from gptoss_serve.cluster.serve.config import AppConfig

    config = AppConfig.model_validate(serve_application(load(RAYSERVICES["gpt-oss-120b"]))["args"])
    options = config.model_replica_options()
    assert (config.tensor_parallel_size, config.expert_parallel_size) == (4, 4)
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert config.model.startswith("/models/")  # from the volume the download job fills


def test_120b_download_job_fills_the_model_directory():
    job = load(KUBERAY / "overlays/gpt-oss-120b/model-download-job.yaml")
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    model = serve_application(load(RAYSERVICES["gpt-oss-120b"]))["args"]["model"]
    assert command[:3] == ["hf", "download", "openai/gpt-oss-120b"]
    assert command[command.index("--local-dir") + 1] == model
    claim = load(KUBERAY / "base/model-volume.yaml")["metadata"]["name"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


# The pieces agree ------------------------------------------------------------------------------------------------
def all_pod_templates():
    for document in [load(p) for p in RAYSERVICES.values()] + [load(RAYCLUSTER)]:
        spec = cluster_spec(document)
        yield document, "head", spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            yield document, "worker", group["template"]


def test_pods_mount_the_models_and_declare_the_scraped_ports():
    monitors = list(yaml.safe_load_all((KUBERAY / "base/monitoring.yaml").read_text()))
    claim = load(KUBERAY / "base/model-volume.yaml")["metadata"]["name"]
    for document, node_type, template in all_pod_templates():
        labels = {**template["metadata"]["labels"], "ray.io/node-type": node_type}
        container = template["spec"]["containers"][0]
        ports = {port["name"] for port in container["ports"]}
        assert container["readinessProbe"] and container["livenessProbe"]
        assert container["resources"]["requests"] == container["resources"]["limits"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim
        assert {"mountPath": "/models", "name": "models"} in container["volumeMounts"]
        for monitor in monitors:
            selector = monitor["spec"]["selector"]["matchLabels"]
            if all(labels.get(k) == v for k, v in selector.items()):
                assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    scraped = {(m["metadata"]["name"]) for m in monitors}
    assert scraped == {"gptoss-serve", "gptoss-ray"}


def test_every_pod_is_scraped_for_ray_metrics_and_only_heads_for_the_application():
    monitors = {m["metadata"]["name"]: m["spec"]["selector"]["matchLabels"]
                for m in yaml.safe_load_all((KUBERAY / "base/monitoring.yaml").read_text())}
    for _, node_type, template in all_pod_templates():
        labels = {**template["metadata"]["labels"], "ray.io/node-type": node_type}
        assert all(labels.get(k) == v for k, v in monitors["gptoss-ray"].items())
        matches_app = all(labels.get(k) == v for k, v in monitors["gptoss-serve"].items())
        assert matches_app == (node_type == "head")  # /metrics holds every replica: one target per cluster


def test_upgrades_keep_serving():
    for path in RAYSERVICES.values():
        spec = load(path)["spec"]
        assert spec["upgradeStrategy"]["type"] == "NewCluster"
        args = serve_application({"spec": spec})["args"]
        group = spec["rayClusterConfig"]["workerGroupSpecs"][0]
        assert group["template"]["spec"]["terminationGracePeriodSeconds"] > args["graceful_shutdown_timeout_s"]
        assert spec["rayClusterDeletionDelaySeconds"] >= args["graceful_shutdown_timeout_s"]


def test_kustomizations_reference_existing_files_and_one_image():
    images = set()
    for kustomization in KUBERAY.rglob("kustomization.yaml"):
        document = load(kustomization)
        for resource in document["resources"]:
            target = kustomization.parent / resource
            assert target.exists(), f"{kustomization}: {resource}"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists()
        images |= {image["name"] for image in document.get("images", [])}
    used = set()
    for path in KUBERAY.rglob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            text = json.dumps(document)
            used |= {part.split('"')[0].split(":")[0] for part in text.split('"image": "')[1:]}
    assert used == images == {"gptoss-serve"}
