"""The application's settings: the `args` of a Serve config file, or the `gptoss-serve up` flags.

One frozen pydantic model, validated once where it enters (the application builder, the CLI). Unknown keys
are refused so that a typo in a YAML file is an error, not a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_APP_NAME = "gptoss"
DEFAULT_MODEL_ID = "gpt-oss-default"  # the served name of the embedded tiny model


class RouterSettings(BaseModel):
    """Which model replica takes each request (cluster/serve/router.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["prefix_affinity", "serve_default"] = "prefix_affinity"  # serve_default: Serve's power of two
    stats_period_s: float = Field(default=1.0, gt=0)  # how often replicas report load and cached prefixes
    imbalance_threshold: float = Field(default=8.0, ge=0)  # affinity yields to a replica this much less loaded
    min_prefix_match_tokens: int = Field(default=64, ge=1)  # a shorter lead in cached prefix decides nothing
    min_prefix_match_ratio: float = Field(default=0.5, ge=0, le=1)  # ... and one below this part of the prompt
    kv_pressure_weight: float = Field(default=8.0, ge=0)  # a full KV cache weighs like this many queued requests

    def serve_config(self) -> dict[str, Any]:
        """The deployment's `request_router_config`."""
        config: dict[str, Any] = {"request_routing_stats_period_s": self.stats_period_s}
        if self.policy == "prefix_affinity":
            config["request_router_class"] = "gptoss_serve.cluster.serve.router:PrefixAffinityRouter"
            config["request_router_kwargs"] = {
                "imbalance_threshold": self.imbalance_threshold,
                "min_prefix_match_tokens": self.min_prefix_match_tokens,
                "min_prefix_match_ratio": self.min_prefix_match_ratio,
                "kv_pressure_weight": self.kv_pressure_weight}
        return config


class AutoscalingSettings(BaseModel):
    """Serve autoscaling of the model deployment (cluster/serve/autoscaling.py); replaces num_replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # At least 1: the ingress answers 503 while no replica is up, so a request would never wake one.
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    initial_replicas: int | None = Field(default=None, ge=1)
    target_ongoing_requests: float | None = Field(default=None, gt=0)  # per replica; None: max_num_seqs / 2
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=120.0, ge=0)
    look_back_period_s: float = Field(default=10.0, gt=0)  # metrics are averaged over this window
    metrics_interval_s: float = Field(default=2.0, gt=0)  # how often replicas and handles report to Serve
    policy: Literal["gptoss", "serve_default"] = "gptoss"  # serve_default: ongoing requests only
    target_queue_depth: float = Field(default=4.0, gt=0)  # engine-queued sequences per replica
    target_kv_cache_usage: float = Field(default=0.8, gt=0, le=1)
    target_ttft_s: float | None = Field(default=None, gt=0)  # None: time to first token is not weighed

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingSettings":
        if not self.min_replicas <= (self.initial_replicas or self.min_replicas) <= self.max_replicas:
            raise ValueError(f"need min_replicas ({self.min_replicas}) <= initial_replicas "
                             f"({self.initial_replicas}) <= max_replicas ({self.max_replicas})")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must exceed metrics_interval_s (a window of several reports)")
        return self

    def serve_config(self, default_target_ongoing_requests: float) -> dict[str, Any]:
        """The deployment's `autoscaling_config`."""
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
            "initial_replicas": self.initial_replicas,
            "target_ongoing_requests": self.target_ongoing_requests or default_target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s, "metrics_interval_s": self.metrics_interval_s}
        if self.policy == "gptoss":
            config["policy"] = {
                "policy_function": "gptoss_serve.cluster.serve.autoscaling:GptossAutoscalingPolicy",
                "policy_kwargs": {"target_queue_depth": self.target_queue_depth,
                                  "target_kv_cache_usage": self.target_kv_cache_usage,
                                  "target_ttft_s": self.target_ttft_s}}
        return config


class AppConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    # What to serve.
    model: str | None = None  # a checkpoint directory or a Hugging Face id; None: the embedded default model
    random_weights: str | None = None  # instead of `model`: random weights of this preset made on each device
    model_id: str | None = None  # the name clients send as `model`; default: the HF id or the directory name
    tensor_parallel_size: int = Field(default=1, ge=1)
    expert_parallel_size: int = Field(default=1, ge=1)
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    kernels: Literal["auto", "torch", "triton"] = "auto"  # auto: triton on GPU, torch on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when Ray gave the replica a GPU
    seed: int = 0

    # The engine of each replica.
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=4096, ge=1)
    long_prefill_token_threshold: int | None = Field(default=None, ge=1)  # a prefill's most tokens per step
    max_model_len: int | None = Field(default=None, ge=1)
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_queued_requests: int = Field(default=128, ge=0)  # sequences admitted beyond max_num_seqs; then 429
    expert_load_metrics: bool = True  # count tokens per expert per layer for gptoss_expert_tokens_total

    # Serving.
    num_replicas: int = Field(default=1, ge=1)
    num_ingress_replicas: int = Field(default=1, ge=1)
    stream_batch_interval_s: float = Field(default=0.02, ge=0)  # streamed chunks within this interval travel together
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0)  # for a stopping replica's streams to finish
    response_store_max_items: int = Field(default=10000, ge=1)
    ray_actor_options: dict[str, Any] | None = None  # of each model replica (num_cpus, num_gpus, resources, ...)
    placement_group_bundles: list[dict[str, float]] | None = None  # a replica that owns GPU shard actors
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "STRICT_PACK"
    router: RouterSettings = RouterSettings()
    autoscaling: AutoscalingSettings | None = None  # None: a fixed num_replicas

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        world = self.world_size
        if world % self.tensor_parallel_size or world % self.expert_parallel_size:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} and expert_parallel_size "
                f"{self.expert_parallel_size}: the larger must be a multiple of the smaller (a replica has "
                f"max(tp, ep) ranks, one per GPU)")
        if self.random_weights is not None and self.model is not None:
            raise ValueError("give either model or random_weights, not both")
        if self.device == "cpu" and self.kernels == "triton":
            raise ValueError("kernels 'triton' needs device 'cuda' (or 'auto' on a GPU replica)")
        return self

    @property
    def served_model_id(self) -> str:
        if self.model_id:
            return self.model_id
        if self.random_weights is not None:
            return f"{self.random_weights}-random"
        if self.model is None:
            return DEFAULT_MODEL_ID
        path = Path(self.model).expanduser()
        return path.name if path.exists() else self.model

    @property
    def world_size(self) -> int:
        """Ranks (GPUs) of one replica."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)

    @property
    def max_num_model_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    @property
    def engine_capacity(self) -> int:
        """Sequences a replica admits at once; more are refused with 429."""
        return self.max_num_seqs + self.max_queued_requests

    def model_replica_options(self) -> dict[str, Any]:
        """`serve.deployment(...).options` of the model deployment."""
        options: dict[str, Any] = {
            "num_replicas": self.num_replicas,
            # Room for the requests the engine refuses (answered 429 at once) and for health/metrics calls.
            "max_ongoing_requests": self.engine_capacity + 16,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "request_router_config": self.router.serve_config(),
        }
        if self.autoscaling is not None:  # Serve takes one or the other
            del options["num_replicas"]
            options["autoscaling_config"] = self.autoscaling.serve_config(max(1, self.max_num_seqs // 2))
        actor_options = dict(self.ray_actor_options or {})
        bundles = self.placement_group_bundles
        if bundles is None and (self.world_size > 1 or self.random_weights is not None):
            # The replica drives shard workers (several GPUs, or weights made on the workers' devices).
            from gptoss_serve.cluster.shard.engine_client import shard_bundles

            bundles = shard_bundles(self.world_size, use_gpus=self.device != "cpu")
        if self.device == "cuda" and bundles is None:
            actor_options.setdefault("num_gpus", 1)
        if bundles is not None:  # the replica itself runs in bundle 0; its shard workers take the others
            actor_options.setdefault("num_cpus", bundles[0].get("CPU", 1))
            options["placement_group_bundles"] = bundles
            options["placement_group_strategy"] = self.placement_group_strategy
        if actor_options:
            options["ray_actor_options"] = actor_options
        return options


def load_serve_config(path: str | Path) -> tuple[dict[str, Any], dict[str, AppConfig]]:
    """A Serve config file (`serve run` / `serve deploy` / KubeRay serveConfigV2): the whole document checked
    by Ray's own schema, and the validated AppConfig of each application that uses our builder."""
    from ray.serve.schema import ServeDeploySchema

    document = yaml.safe_load(Path(path).read_text())
    ServeDeploySchema.model_validate(document)
    configs = {}
    for application in document.get("applications", []):
        if application.get("import_path", "").endswith(":build_app") and "gptoss_serve" in application["import_path"]:
            configs[application.get("name", "default")] = AppConfig.model_validate(application.get("args") or {})
    return document, configs
