"""The Serve application builder: `import_path: gptoss_serve.cluster.serve.app:build_app` with `args`.

Used alike by `serve run config.yaml`, `serve deploy config.yaml`, KubeRay's serveConfigV2 and
`gptoss-serve up`: the args are an AppConfig (see config.py), validated here once.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from gptoss_serve.cluster.serve.config import AppConfig
from gptoss_serve.cluster.serve.ingress import OpenAIIngress
from gptoss_serve.cluster.serve.model_server import ModelServer


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    server = ModelServer.options(**config.model_replica_options()).bind(config)
    routing_hints = config.router.policy == "prefix_affinity"
    return OpenAIIngress.options(num_replicas=config.num_ingress_replicas).bind({config.served_model_id: server},
                                                                               routing_hints=routing_hints)
