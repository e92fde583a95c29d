"""One local Ray cluster per test session, shared by every test that needs Ray (starting Ray is slow).

The cluster is bound to 127.0.0.1, with more logical CPUs than the machine has so that several
Serve replicas fit; token auth is off as for any local cluster. Serve's HTTP proxy is started on a free port
the first time a test asks for `serve_http`.
"""

from __future__ import annotations

import os
import socket

import pytest

NUM_LOGICAL_CPUS = 16
# Logical GPUs only: sharded replicas place one worker per "GPU", which runs on the CPU with gloo here.
NUM_FAKE_GPUS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", num_cpus=NUM_LOGICAL_CPUS, num_gpus=NUM_FAKE_GPUS, include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace="gptoss_tests", log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_http(ray_cluster) -> str:
    """The base URL of Serve's HTTP proxy (applications add their route prefix)."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"
