"""One local Ray cluster per test session, shared by every test that needs Ray (starting Ray is slow).

The cluster is bound to 127.0.0.1, with more logical CPUs than the machine has so that several
Serve replicas fit; token auth is off as for any local cluster. Serve's HTTP proxy is started on a free port
the first time a test asks for `serve_http`.
"""

from __future__ import annotations

import functools
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

    ray.init(address="local", num_cpus=NUM_LOGICAL_CPUS, num_gpus=NUM_FAKE_GPUS, include_dashboard=False,
             _node_ip_address="127.0.0.1", namespace="gptoss_tests", log_to_driver=False, configure_logging=False)
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


@pytest.fixture(scope="session")
def deploy_app(serve_http):
    """deploy_app(app, name, timeout_s=180) -> base URL: runs a Serve application under /name on the session's
    cluster and waits until its /health says ready."""
    return functools.partial(_run_app, serve_http)


def _run_app(serve_http: str, app, name: str, timeout_s: float = 180) -> str:
    import time

    import httpx
    from ray import serve

    serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"{serve_http}/{name}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return url
        except httpx.TimeoutException:  # a loaded machine: ask again
            pass
        assert time.monotonic() < deadline, f"application {name} never became healthy"
        time.sleep(0.5)
