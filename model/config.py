"""The gpt-oss model configuration: presets, the two `config.json` dialects, validation.

Field names follow the original checkpoint's `original/config.json` (as in openai/gpt-oss), so an original
config loads field by field; the Hugging Face `config.json` is translated on the way in.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration that is missing fields, has wrong types or inconsistent values."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 36
    num_experts: int = 128
    experts_per_token: int = 4  # top-k of the router
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880  # per expert
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128  # keys a query sees on the even (sliding) layers, itself included
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    # Not in the original config; hard-coded in the reference implementation.
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        positive_ints = (
            "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
            "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
            "initial_context_length",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        positive_floats = ("swiglu_limit", "rope_theta", "rope_scaling_factor", "rms_norm_eps", "swiglu_alpha")
        for name in positive_floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of 32, the MXFP4 block size")
        if self.rope_scaling_factor > 1.0:
            low, high = self.yarn_low_high
            if not 0 < low < high < self.head_dim // 2 - 1:
                raise ConfigError(
                    f"YaRN correction range [{low:.3f}, {high:.3f}] must lie inside (0, {self.head_dim // 2 - 1}); "
                    f"check head_dim, rope_theta, initial_context_length and rope_ntk_alpha/beta")

    # Derived sizes ------------------------------------------------------------------------------------
    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def max_context_length(self) -> int:
        return int(self.initial_context_length * max(self.rope_scaling_factor, 1.0))

    @property
    def yarn_low_high(self) -> tuple[float, float]:
        """The NTK-by-parts correction range in rotary dimensions (not truncated, as in the reference)."""
        d_half = self.head_dim / 2

        def dim_for(num_rotations: float) -> float:
            return d_half * math.log(self.initial_context_length / (num_rotations * 2 * math.pi)) / math.log(
                self.rope_theta)

        return dim_for(self.rope_ntk_beta), dim_for(self.rope_ntk_alpha)

    def is_sliding_layer(self, layer_idx: int) -> bool:
        """Even layers attend over a window of `sliding_window` keys; odd layers over the whole context."""
        return layer_idx % 2 == 0

    @property
    def layer_types(self) -> list[str]:
        return ["sliding_attention" if self.is_sliding_layer(i) else "full_attention"
                for i in range(self.num_hidden_layers)]

    # Serialisation --------------------------------------------------------------------------------------
    def to_original_dict(self) -> dict[str, Any]:
        """The `original/config.json` content (the two hard-coded constants are left out, as upstream)."""
        d = dataclasses.asdict(self)
        del d["rms_norm_eps"], d["swiglu_alpha"]
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` for `GptOssForCausalLM`, as the upstream converter writes it."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "layer_types": self.layer_types,
            "initial_context_length": self.initial_context_length,
            "max_position_embeddings": self.max_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "truncate": False,
                "original_max_position_embeddings": self.initial_context_length,
            },
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.9,
            "use_cache": True,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
            },
        } | self._hf_special_token_ids()

    def _hf_special_token_ids(self) -> dict[str, int]:
        # <|return|> and <|endoftext|>, as upstream; left out of a small test vocabulary that lacks them.
        ids = {"eos_token_id": 200002, "pad_token_id": 199999}
        return {k: v for k, v in ids.items() if v < self.vocab_size}

    @classmethod
    def from_original_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        required = fields - {"rms_norm_eps", "swiglu_alpha"}
        missing = sorted(required - d.keys())
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**{k: _as_number(k, v, cls) for k, v in d.items() if k in fields})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "gpt_oss":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'gpt_oss'")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "yarn" if rope else None))
        if rope and rope_type not in ("yarn", "default"):
            raise ConfigError(f"{source}: unsupported rope_type {rope_type!r} (gpt-oss uses 'yarn')")
        if rope.get("truncate", False):
            raise ConfigError(f"{source}: rope_scaling.truncate=true is not how gpt-oss was trained")
        mapped: dict[str, Any] = {}
        renames = {
            "num_hidden_layers": "num_hidden_layers", "num_local_experts": "num_experts",
            "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
            "swiglu_limit": "swiglu_limit", "head_dim": "head_dim", "num_attention_heads": "num_attention_heads",
            "num_key_value_heads": "num_key_value_heads", "sliding_window": "sliding_window",
            "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
        }
        for hf_name, name in renames.items():
            if hf_name in d:
                mapped[name] = d[hf_name]
        top_k = d.get("num_experts_per_tok", d.get("experts_per_token"))
        if top_k is not None:
            mapped["experts_per_token"] = top_k
        if "rope_theta" not in mapped and "rope_theta" in rope:
            mapped["rope_theta"] = rope["rope_theta"]
        if rope_type == "yarn":
            mapped["rope_scaling_factor"] = rope.get("factor", 1.0)
            mapped["rope_ntk_beta"] = rope.get("beta_fast", 32.0)
            mapped["rope_ntk_alpha"] = rope.get("beta_slow", 1.0)
            initial = rope.get("original_max_position_embeddings", d.get("initial_context_length"))
        else:
            mapped["rope_scaling_factor"] = 1.0
            mapped["rope_ntk_beta"], mapped["rope_ntk_alpha"] = 32.0, 1.0
            initial = d.get("initial_context_length", d.get("max_position_embeddings"))
        if initial is not None:
            mapped["initial_context_length"] = initial
        if d.get("tie_word_embeddings"):
            raise ConfigError(f"{source}: tie_word_embeddings=true, but gpt-oss has a separate unembedding")
        required = {f.name for f in dataclasses.fields(cls)} - {"rms_norm_eps", "swiglu_alpha"}
        missing = sorted(required - mapped.keys())
        if missing:
            raise ConfigError(f"{source}: missing field(s) for {', '.join(missing)}")
        try:
            config = cls(**{k: _as_number(k, v, cls) for k, v in mapped.items()})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        layer_types = d.get("layer_types")
        if layer_types is not None and list(layer_types) != config.layer_types:
            raise ConfigError(
                f"{source}: layer_types must alternate sliding_attention/full_attention starting with sliding "
                f"(gpt-oss), got {layer_types}")
        return config

    def with_overrides(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _as_number(name: str, value: Any, cls: type) -> Any:
    """JSON numbers arrive as int or float; accept 7 for 7.0 but never a string or bool."""
    field_types = {f.name: f.type for f in dataclasses.fields(cls)}
    wanted = field_types[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if wanted in ("int", int):
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


# Presets ---------------------------------------------------------------------------------------------------
# The two released models, and small random-weight configs for tests and the embedded default. The small
# ones keep the real vocabulary (so the real tokenizer works) and every structural feature: even sliding
# layers with a short window, GQA, YaRN, MXFP4 experts, top-k routing.
PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-120b": ModelConfig(),
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    "tiny": ModelConfig(
        num_hidden_layers=2, num_experts=8, experts_per_token=4, hidden_size=64, intermediate_size=64,
        head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=16),
    "small": ModelConfig(
        num_hidden_layers=4, num_experts=16, experts_per_token=4, hidden_size=256, intermediate_size=256,
        head_dim=32, num_attention_heads=8, num_key_value_heads=2, sliding_window=32),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def config_from_json_dict(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Either dialect: a Hugging Face config has `model_type`; an original one has `num_experts`."""
    if isinstance(d, dict) and "model_type" in d:
        return ModelConfig.from_hf_dict(d, source)
    return ModelConfig.from_original_dict(d, source)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Reads `config.json` from a model directory (either dialect), or from its `original/` subfolder."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / "config.json", model_dir / "original" / "config.json"):
        if candidate.is_file():
            try:
                d = json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{candidate}: not valid JSON ({e})") from None
            return config_from_json_dict(d, str(candidate))
    raise ConfigError(f"{model_dir}: no config.json (looked in {model_dir} and {model_dir / 'original'})")
