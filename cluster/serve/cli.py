"""`gptoss-serve up` and `gptoss-serve down`: run the Serve application on a local or existing Ray cluster.

`up` starts a local Ray head bound to 127.0.0.1 (or joins `--address`), deploys the application, waits until
/health answers 200, prints the URL and a curl line, and stays in the foreground (Ctrl-C stops everything it
started) unless `--detach`. `down` undoes a detached `up`: it shuts Serve down and stops the Ray cluster if
`up` started it (by the id of the `ray start --block` process it spawned: other Ray clusters on the machine
are left alone). What `up` started is remembered in a small state file in the cache directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gptoss_serve.cluster.serve.config import DEFAULT_APP_NAME

HEALTH_TIMEOUT_S = 1800  # loading 120b from a cold disk takes a while
_LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled"}  # a cluster bound to 127.0.0.1, for this user only


def state_file() -> Path:
    from gptoss_serve.model.default_model import cache_root

    return cache_root() / "up.json"


# Parsers -------------------------------------------------------------------------------------------------------
def add_up_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "up", help="serve a model over the OpenAI API on Ray Serve",
        description="Start (or join) a Ray cluster, deploy gpt-oss behind an OpenAI-compatible API and wait "
                    "until it is healthy. With no --model, serves the embedded small default model on CPU.")
    parser.add_argument("--model", help="checkpoint directory or Hugging Face id (e.g. openai/gpt-oss-20b)")
    parser.add_argument("--model-id", help="name clients send as `model` (default: the HF id or directory name)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel attention: heads split over this many GPUs of a replica")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel MoE: experts split over this many GPUs (a replica has max(tp, ep))")
    parser.add_argument("--random-weights", metavar="PRESET",
                        help="serve random weights of a preset (e.g. gpt-oss-120b) made on each GPU: benchmarks")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas, each with its own engine")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--kernels", choices=["auto", "torch", "triton"], default="auto",
                        help="auto: triton on GPU, torch on CPU")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when this machine has a GPU")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default %(default)s)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences each engine runs at once")
    parser.add_argument("--max-queued-requests", type=int, default=128,
                        help="sequences admitted beyond --max-num-seqs per replica; more get 429")
    parser.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    parser.add_argument("--long-prefill-token-threshold", type=int, default=None,
                        help="tokens one prompt's prefill may take in a step, leaving the rest of the step's "
                             "budget to other requests (default: the whole budget)")
    parser.add_argument("--app-name", default=DEFAULT_APP_NAME, help="Serve application name")
    parser.add_argument("--detach", action="store_true", help="return once healthy; stop later with `down`")
    _add_scaling_arguments(parser)
    parser.set_defaults(func=run_up)
    return parser


def _add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("routing and autoscaling (docs/serving.md)")
    group.add_argument("--router", choices=["prefix_affinity", "serve_default"], default="prefix_affinity",
                       help="prefix_affinity: prefix-cache and conversation affinity, else the less loaded of two "
                            "replicas; serve_default: Serve's power of two choices (default %(default)s)")
    group.add_argument("--min-replicas", type=int, help="autoscale the model replicas from this many (default 1)")
    group.add_argument("--max-replicas", type=int, help="... up to this many; giving either turns autoscaling on")
    group.add_argument("--target-ongoing-requests", type=float,
                       help="queued and running requests per replica to aim for (default: --max-num-seqs / 2)")
    group.add_argument("--upscale-delay-s", type=float, default=10.0, help="(default %(default)s)")
    group.add_argument("--downscale-delay-s", type=float, default=120.0, help="(default %(default)s)")
    group.add_argument("--target-queue-depth", type=float, default=4.0,
                       help="engine-queued sequences per replica to aim for (default %(default)s)")
    group.add_argument("--target-kv-cache-usage", type=float, default=0.8, help="(default %(default)s)")
    group.add_argument("--target-ttft-s", type=float, help="time to first token to aim for (default: not weighed)")
    group.add_argument("--autoscaling-policy", choices=["gptoss", "serve_default"], default="gptoss",
                       help="gptoss: also weigh queue depth, KV-cache use and TTFT (default %(default)s)")


def _scaling_options(args: argparse.Namespace) -> dict:
    """The AppConfig fields of the routing and autoscaling flags."""
    options: dict = {"router": {"policy": args.router}}
    if args.min_replicas is not None or args.max_replicas is not None:
        min_replicas = 1 if args.min_replicas is None else args.min_replicas
        options["autoscaling"] = {
            "min_replicas": min_replicas,
            "max_replicas": min_replicas if args.max_replicas is None else args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests, "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s, "target_queue_depth": args.target_queue_depth,
            "target_kv_cache_usage": args.target_kv_cache_usage, "target_ttft_s": args.target_ttft_s,
            "policy": args.autoscaling_policy}
    return options


def add_down_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("down", help="stop what `gptoss-serve up --detach` started",
                                   description="Shut down Serve and, if `up` started it, the local Ray cluster.")
    parser.add_argument("--address", help="the Ray cluster (default: the one `up` recorded)")
    parser.set_defaults(func=run_down)
    return parser


# up ------------------------------------------------------------------------------------------------------------
def app_config_from_args(args: argparse.Namespace):
    """The AppConfig the flags describe (a ValueError names a bad flag)."""
    from pydantic import ValidationError

    from gptoss_serve.cluster.serve.config import AppConfig

    try:
        return AppConfig(**_scaling_options(args), model=args.model, model_id=args.model_id,
                         random_weights=args.random_weights, tensor_parallel_size=args.tp,
                         expert_parallel_size=args.ep, num_replicas=args.replicas, dtype=args.dtype,
                         kernels=args.kernels, device=args.device, max_num_seqs=args.max_num_seqs,
                         max_queued_requests=args.max_queued_requests, max_model_len=args.max_model_len,
                         long_prefill_token_threshold=args.long_prefill_token_threshold)
    except ValidationError as error:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'flags'}: {e['msg']}"
                                   for e in error.errors())) from None


def run_up(args: argparse.Namespace) -> int:
    try:
        config = app_config_from_args(args)
        config = _resolve_locally(config)
    except Exception as error:
        print(f"gptoss-serve up: {error}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from gptoss_serve.cluster.serve.app import build_app

    head_pid = None
    if args.address is None:
        try:
            address, head_pid = _start_local_ray(num_cpus=config.max_num_model_replicas + config.num_ingress_replicas)
        except (RuntimeError, OSError) as error:
            print(f"gptoss-serve up: {error}", file=sys.stderr)
            return 1
    else:
        address = args.address
    _write_state({"address": address, "head_pid": head_pid, "app_name": args.app_name})
    ray.init(address=address, namespace="gptoss_serve", log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"deploying {config.served_model_id} ({config.num_replicas} replica(s)) ...", flush=True)
    serve.run(build_app(config), name=args.app_name, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    if not _wait_healthy(url, args.app_name):
        print("gptoss-serve up: the application did not become healthy; see `serve status` and the Ray logs",
              file=sys.stderr)
        _shutdown(address, args.app_name, head_pid)
        return 1
    _print_ready(url, config.served_model_id)
    if args.detach:
        print("running in the background; stop it with: gptoss-serve down")
        return 0
    print("press Ctrl-C to stop")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping ...")
    return _shutdown(address, args.app_name, head_pid)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _resolve_locally(config):
    """Fetch the weights here, with a visible progress bar, before any replica starts; pick the device."""
    from gptoss_serve.cluster.serve.model_source import resolve_model

    changes = {"model_id": config.served_model_id}
    if config.random_weights is None:
        changes["model"] = str(resolve_model(config.model))
    if config.device == "auto":
        import torch

        if torch.cuda.is_available():
            changes["device"] = "cuda"
    return config.model_copy(update=changes)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_local_ray(num_cpus: int) -> tuple[str, int]:
    """A Ray head on 127.0.0.1 as a child process (`ray start --block`), with at least one logical CPU per
    replica (the engines share the real cores). Returns (address, pid): stopping that one process stops
    this cluster and nothing else on the machine."""
    port = _free_port()
    command = [_ray_executable(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port",
               str(port), "--num-cpus", str(max(os.cpu_count() or 1, num_cpus)), "--include-dashboard", "false",
               "--disable-usage-stats"]
    _use_local_ray_env()
    log_path = state_file().with_name("ray-head.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting a local Ray cluster (log: {log_path})", flush=True)
    with open(log_path, "ab") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`{shlex.join(command)}` exited with {head.returncode}; see {log_path}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return f"127.0.0.1:{port}", head.pid
        time.sleep(0.5)
    head.terminate()
    raise RuntimeError(f"the Ray head did not open port {port} within 120 s; see {log_path}")


def _stop_local_ray(pid: int) -> None:
    """SIGTERM to the `ray start --block` we started (it stops its own Ray processes), if it still is ours."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    if cmdline and not (b"start" in cmdline and b"--block" in cmdline):
        return  # the id now belongs to another process
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _is_running(pid):
        time.sleep(0.5)


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _forget_address(address: str) -> None:
    """`ray start` records its address for later `ray.init()` calls; a stopped cluster must not stay there."""
    try:
        from ray._common.utils import get_ray_address_file

        address_file = Path(get_ray_address_file(None))
        if address_file.read_text().strip().endswith(address.rsplit(":", 1)[-1]):
            address_file.unlink()
    except Exception:  # a Ray version without the helper, or no file: nothing to forget
        pass


def _use_local_ray_env() -> None:
    for key, value in _LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def _ray_executable() -> str:
    """The `ray` command of this Python environment, even when its bin/ is not on PATH."""
    ray_bin = Path(sys.executable).with_name("ray")
    return str(ray_bin) if ray_bin.exists() else "ray"


def _wait_healthy(url: str, app_name: str) -> bool:
    from ray import serve

    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "DEPLOY_FAILED":
            print(f"deploy failed: {status.message}", file=sys.stderr)
            return False
        time.sleep(2)
    return False


def _print_ready(url: str, model_id: str) -> None:
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello!"}]})
    print(f"\nserving {model_id} at {url}/v1 (OpenAI API)\n")
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}\n")


# down ----------------------------------------------------------------------------------------------------------
def run_down(args: argparse.Namespace) -> int:
    state = _read_state()
    address = args.address or state.get("address")
    if address is None:
        print("gptoss-serve down: nothing recorded by `up`; pass --address", file=sys.stderr)
        return 2
    head_pid = state.get("head_pid") if args.address is None else None
    if head_pid is not None:
        _use_local_ray_env()
    return _shutdown(address, state.get("app_name", DEFAULT_APP_NAME), head_pid)


def _shutdown(address: str, app_name: str, head_pid: int | None) -> int:
    """Serve and the shared actors go; so does the Ray cluster if `up` started it (head_pid)."""
    import ray
    from ray import serve

    from gptoss_serve.cluster.serve.shared_actors import kill_shared_actors

    try:
        if not ray.is_initialized():
            ray.init(address=address, namespace="gptoss_serve", log_to_driver=False)
        serve.shutdown()
        kill_shared_actors(app_name)
        ray.shutdown()
    except Exception as error:  # the cluster may already be gone
        print(f"could not reach the Ray cluster at {address}: {error}", file=sys.stderr)
    if head_pid is not None:
        _stop_local_ray(head_pid)
        _forget_address(address)
    state_file().unlink(missing_ok=True)
    print("stopped")
    return 0


def _write_state(state: dict) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))


def _read_state() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}
