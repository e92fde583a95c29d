"""YaRN rotary frequencies for gpt-oss: NTK-by-parts interpolation and the concentration factor."""

from __future__ import annotations

import math

import torch

from gptoss_serve.model.config import ModelConfig


def yarn_inv_freq_and_concentration(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim // 2] float32, concentration).

    Rotary dimensions below the correction range keep the original frequency (extrapolation), those above it
    are slowed down by the scaling factor (interpolation), with a linear ramp between. The concentration,
    0.1 ln(factor) + 1, multiplies cos and sin alike, so it scales every attention logit by its square.
    """
    d = config.head_dim
    freq = config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # [d // 2]
    if config.rope_scaling_factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(config.rope_scaling_factor) + 1.0
    low, high = config.yarn_low_high
    extrapolation = 1.0 / freq
    interpolation = 1.0 / (config.rope_scaling_factor * freq)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1.0 - ramp
    inv_freq = interpolation * (1.0 - keep_original) + extrapolation * keep_original
    return inv_freq, concentration
