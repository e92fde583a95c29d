"""Model configs: presets, both config.json dialects, and clear errors for bad ones."""

import json

import pytest

from gptoss_serve.model.config import PRESETS, ConfigError, ModelConfig, load_config, preset


def test_released_presets_match_the_spec():
    c20, c120 = preset("gpt-oss-20b"), preset("gpt-oss-120b")
    assert (c20.num_hidden_layers, c20.num_experts) == (24, 32)
    assert (c120.num_hidden_layers, c120.num_experts) == (36, 128)
    for c in (c20, c120):
        assert (c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads) == (2880, 2880, 64, 64)
        assert (c.num_key_value_heads, c.sliding_window, c.experts_per_token, c.vocab_size) == (8, 128, 4, 201088)
        assert c.max_context_length == 131072
        low, high = c.yarn_low_high
        assert low == pytest.approx(8.0928, abs=1e-4) and high == pytest.approx(17.3980, abs=1e-4)
        assert c.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]


def test_parameter_count_of_20b_matches_the_model_card():
    c = preset("gpt-oss-20b")
    attn = c.hidden_size + c.qkv_size * (c.hidden_size + 1) + c.num_attention_heads + c.hidden_size * (c.q_size + 1)
    expert = 2 * c.intermediate_size * (c.hidden_size + 1) + c.hidden_size * (c.intermediate_size + 1)
    mlp = c.hidden_size + c.num_experts * (c.hidden_size + 1) + c.num_experts * expert
    total = c.num_hidden_layers * (attn + mlp) + 2 * c.vocab_size * c.hidden_size + c.hidden_size
    assert total == 20_914_757_184


@pytest.mark.parametrize("name", list(PRESETS))
def test_both_dialects_round_trip(name, tmp_path):
    c = PRESETS[name]
    assert ModelConfig.from_original_dict(c.to_original_dict()) == c
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "config.json").write_text(json.dumps(c.to_original_dict()))
    assert load_config(tmp_path) == c  # an HF repo's original/ folder is found too
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
    assert load_config(tmp_path) == c


def test_transformers_reads_our_hf_config_the_same_way():
    from transformers import GptOssConfig

    c = preset("gpt-oss-20b")
    hf = GptOssConfig(**c.to_hf_dict())
    assert hf.num_local_experts == 32 and hf.num_experts_per_tok == 4 and hf.layer_types == c.layer_types
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rope["truncate"] is False and rope["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("change, message", [
    ({"num_experts": 0}, "num_experts must be a positive integer"),
    ({"num_experts": "32"}, "num_experts must be a number"),
    ({"experts_per_token": 64}, "exceeds num_experts"),
    ({"num_key_value_heads": 7}, "multiple of num_key_value_heads"),
    ({"hidden_size": 2881}, "multiple of 32"),
    ({"head_dim": 4}, "YaRN correction range"),
    ({"rope_theta": True}, "rope_theta must be a number"),
    ({"sliding_window": 1.5}, "sliding_window must be an integer"),
])
def test_bad_original_config_is_named(change, message):
    d = preset("gpt-oss-20b").to_original_dict() | change
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_original_dict(d, "x/config.json")


def test_missing_fields_and_wrong_model_type(tmp_path):
    d = preset("gpt-oss-20b").to_original_dict()
    del d["num_experts"], d["head_dim"]
    with pytest.raises(ConfigError, match=r"config.json: missing field\(s\) head_dim, num_experts"):
        ModelConfig.from_original_dict(d, "config.json")
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        ModelConfig.from_hf_dict({"model_type": "llama"})
    hf = preset("gpt-oss-20b").to_hf_dict()
    hf["layer_types"] = ["full_attention"] * 24
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.from_hf_dict(hf)
    hf = preset("gpt-oss-20b").to_hf_dict()
    hf["rope_scaling"]["truncate"] = True
    with pytest.raises(ConfigError, match="truncate"):
        ModelConfig.from_hf_dict(hf)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt-oss-7b")
