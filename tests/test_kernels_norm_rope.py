"""Triton RMSNorm (+ residual) and RoPE (+ paged cache write) against their torch twins."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; the kernels re-read it at launch too

from gptoss_serve.kernels.rmsnorm import rmsnorm  # noqa: E402
from gptoss_serve.kernels.rmsnorm_ref import rmsnorm_ref  # noqa: E402
from gptoss_serve.kernels.rope import rope_and_cache_write  # noqa: E402
from gptoss_serve.kernels.rope_ref import rope_and_cache_write_ref  # noqa: E402
from gptoss_serve.model.config import preset  # noqa: E402
from gptoss_serve.model.rope import yarn_inv_freq_and_concentration  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter reproduces the twins bit for bit; on a GPU, fused multiply-adds and the hardware's rsqrt and
# sin/cos may move a result by one bf16 step.
ATOL = 0 if DEVICE == "cpu" else 0.07


@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 2880), (129, 100), (1000, 64)])
def test_rmsnorm_with_and_without_residual(num_tokens, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16).to(DEVICE)
    scale = (torch.rand(hidden, generator=gen) + 0.5).to(DEVICE)
    normed, residual_out = rmsnorm(x, scale, 1e-5, residual)
    ref_normed, ref_residual = rmsnorm_ref(x, scale, 1e-5, residual)
    assert torch.equal(residual_out, ref_residual)  # one rounded bf16 add either way
    torch.testing.assert_close(normed, ref_normed, rtol=0, atol=ATOL)
    normed, residual_out = rmsnorm(x, scale, 1e-5)
    assert residual_out is x
    torch.testing.assert_close(normed, rmsnorm_ref(x, scale, 1e-5)[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("preset_name", ["tiny", "gpt-oss-20b"])
def test_rope_and_cache_write(preset_name):
    config = preset(preset_name)
    inv_freq, concentration = yarn_inv_freq_and_concentration(config)
    h_q, h_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    gen = torch.Generator().manual_seed(0)
    # q, k, v as the model makes them: views into one fused qkv row.
    positions = torch.tensor([0, 1, 5, 127, 128, 129, 4000, 131071])
    num_tokens = positions.numel()
    qkv = torch.randn(num_tokens, (h_q + 2 * h_kv) * d, generator=gen).to(torch.bfloat16).to(DEVICE)
    q = qkv[:, :h_q * d].view(num_tokens, h_q, d)
    k = qkv[:, h_q * d:(h_q + h_kv) * d].view(num_tokens, h_kv, d)
    v = qkv[:, (h_q + h_kv) * d:].view(num_tokens, h_kv, d)
    block_size = 16
    k_cache = torch.randn(12, block_size, h_kv, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    v_cache = torch.randn(12, block_size, h_kv, d, generator=gen).to(torch.bfloat16).to(DEVICE)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([0, 17, -1, 33, 159, 15, -5, 191], device=DEVICE)  # negative: not stored
    out = rope_and_cache_write(q, k, v, positions.to(DEVICE), inv_freq.to(DEVICE), concentration,
                               k_cache, v_cache, slots)
    ref = rope_and_cache_write_ref(q, k, v, positions.to(DEVICE), inv_freq.to(DEVICE), concentration,
                                   ref_k_cache, ref_v_cache, slots)
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    torch.testing.assert_close(k_cache, ref_k_cache, rtol=0, atol=ATOL)
    assert torch.equal(v_cache, ref_v_cache)
