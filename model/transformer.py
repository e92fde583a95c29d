"""The gpt-oss transformer in PyTorch, computing through a kernel backend.

Module names equal the original checkpoint's tensor names (`block.3.mlp.mlp1_weight.blocks`, ...), so loading
is one copy per name. Each block is pre-norm: x += Attn(RMSNorm(x)), then x += MoE(RMSNorm(x)); the residual
add is fused into the next norm, the attention sub-block's norm into its qkv projection and RoPE
(kernels.norm_qkv_rope), and the MoE sub-block's norm into its routing (kernels.norm_and_route).
"""

from __future__ import annotations

import torch
from torch import nn

from gptoss_serve.model.batch import ForwardBatch, KVCache
from gptoss_serve.model.config import ModelConfig
from gptoss_serve.model.parallel import ShardGroups, ShardLayout, all_reduce
from gptoss_serve.model.rope import yarn_inv_freq_and_concentration


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(hidden_size, dtype=torch.float32))  # kept in float32, as released


class MXFP4Weight(nn.Module):
    """An expert weight as stored: FP4 blocks and E8M0 scales, never dequantized as a whole."""

    def __init__(self, num_experts: int, rows: int, cols: int):
        super().__init__()
        self.register_buffer("blocks", torch.empty(num_experts, rows, cols // 32, 16, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(num_experts, rows, cols // 32, dtype=torch.uint8))


class AttentionBlock(nn.Module):
    """This rank's heads (all of them unless attention is tensor-parallel); the caller all-reduces the output."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, layout: ShardLayout):
        super().__init__()
        self.num_q_heads, self.num_kv_heads = layout.num_q_heads(config), layout.num_kv_heads(config)
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window if config.is_sliding_layer(layer_idx) else 0
        self.sm_scale = config.head_dim ** -0.5
        q_size, kv_size = self.num_q_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.norm = RMSNorm(config.hidden_size)
        self.qkv = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=True, dtype=dtype)
        self.sinks = nn.Parameter(torch.empty(self.num_q_heads, dtype=torch.float32))
        self.out = nn.Linear(q_size, config.hidden_size, bias=True, dtype=dtype)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, eps: float, batch: ForwardBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor, rope: tuple[torch.Tensor, float],
                kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous sub-block's output (the embeddings in layer 0), residual: the stream before it (None in
        layer 0), both [num_tokens, hidden]. Writes this step's k and v to the caches. Returns (this rank's share
        of the attention output, the new residual stream h + residual)."""
        num_tokens = h.shape[0]
        inv_freq, concentration = rope
        block_tables, slot_mapping = batch.cache_tables(sliding=self.sliding_window > 0)
        q, residual = kernels.norm_qkv_rope(  # q [num_tokens, q_heads, head_dim], rotated
            h, residual, self.norm.scale, eps, self.qkv.weight, self.qkv.bias, self.num_q_heads, self.num_kv_heads,
            batch.positions, inv_freq, concentration, k_cache, v_cache, slot_mapping)
        attn = kernels.paged_attention(
            q, k_cache, v_cache, block_tables, batch.cu_seqlens_q, batch.context_lens, self.sinks,
            self.sm_scale, self.sliding_window)  # [num_tokens, q_heads, head_dim]
        return self.out(attn.reshape(num_tokens, self.num_q_heads * self.head_dim)), residual


class MLPBlock(nn.Module):
    """The router over all experts and this rank's experts (or slice of each); the caller all-reduces."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, layout: ShardLayout):
        super().__init__()
        e, h, i = layout.num_local_experts(config), config.hidden_size, layout.intermediate_local(config)
        self.experts_per_token = config.experts_per_token
        self.first_expert = layout.first_expert(config)
        self.swiglu_alpha, self.swiglu_limit = config.swiglu_alpha, config.swiglu_limit
        self.norm = RMSNorm(h)
        self.gate = nn.Linear(h, config.num_experts, bias=True, dtype=dtype)  # the router
        self.mlp1_weight = MXFP4Weight(e, 2 * i, h)  # gate and linear rows interleaved
        self.mlp1_bias = nn.Parameter(torch.empty(e, 2 * i, dtype=dtype))
        self.mlp2_weight = MXFP4Weight(e, h, i)
        self.mlp2_bias = nn.Parameter(torch.empty(e, h, dtype=dtype))
        self.expert_token_counts: torch.Tensor | None = None  # [num_experts] int64, see count_expert_tokens()

    def forward(self, h: torch.Tensor, residual: torch.Tensor, eps: float, kernels,
                counted_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the attention sub-block's output, residual: the stream before it, both [num_tokens, hidden].
        Returns (this rank's share of the experts' output, the new residual stream h + residual).
        counted_tokens: [num_tokens] int64, 1 for the tokens whose routing is added to expert_token_counts."""
        counts = self.expert_token_counts if counted_tokens is not None else None
        x, residual, expert_weights, expert_ids = kernels.norm_and_route(
            h, residual, self.norm.scale, eps, self.gate.weight, self.gate.bias, self.experts_per_token, counts,
            counted_tokens)  # x [num_tokens, hidden]; weights, ids [num_tokens, top_k]
        out = kernels.moe_experts(
            x, expert_weights, expert_ids, self.mlp1_weight.blocks, self.mlp1_weight.scales, self.mlp1_bias,
            self.mlp2_weight.blocks, self.mlp2_weight.scales, self.mlp2_bias, self.swiglu_alpha, self.swiglu_limit,
            self.first_expert)
        return out, residual


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, layout: ShardLayout):
        super().__init__()
        self.attn = AttentionBlock(config, layer_idx, dtype, layout)
        self.mlp = MLPBlock(config, dtype, layout)


class GptOssModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16, kernels=None,
                 layout: ShardLayout = ShardLayout(), groups: ShardGroups | None = None):
        super().__init__()
        from gptoss_serve.kernels.backend import get_kernels

        layout.validate(config)
        self.config, self.dtype, self.layout = config, dtype, layout
        self.groups = groups or ShardGroups(attn=None, world=None)
        self.kernels = kernels if kernels is not None else get_kernels("torch")
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.block = nn.ModuleList(
            TransformerBlock(config, n, dtype, layout) for n in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size)
        self.unembedding = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        inv_freq, self.rope_concentration = yarn_inv_freq_and_concentration(config)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)  # [head_dim // 2] float32
        self.expert_token_counts: torch.Tensor | None = None  # [num_layers, num_experts] int64 once counting

    def count_expert_tokens(self) -> torch.Tensor:
        """From now on, every forward adds the tokens the router sends to each expert of each layer to the
        returned [num_layers, num_experts] int64 counts on the model's device (MoE load; no host sync, so CUDA
        graphs captured afterwards count too). The caller reads and zeroes it between steps."""
        if self.expert_token_counts is None:
            device = self.rope_inv_freq.device
            self.expert_token_counts = torch.zeros(len(self.block), self.config.num_experts, dtype=torch.int64,
                                                   device=device)
            for n, block in enumerate(self.block):
                block.mlp.expert_token_counts = self.expert_token_counts[n]
        return self.expert_token_counts

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Runs the step's tokens through every layer; returns the final-normed hidden states of the tokens
        whose logits are wanted, [num_outputs, hidden]."""
        eps = self.config.rms_norm_eps
        rope = (self.rope_inv_freq, self.rope_concentration)
        h = self.embedding(batch.token_ids)  # [num_tokens, hidden]
        # CUDA-graph padding rows store no key (slot -1): only real tokens count towards the expert load.
        counted = (batch.slot_mapping >= 0).long() if self.expert_token_counts is not None else None
        residual = None
        for n, block in enumerate(self.block):
            h, residual = block.attn(h, residual, eps, batch, kv_cache.k[n], kv_cache.v[n], rope, self.kernels)
            h = all_reduce(h, self.groups.attn, self.groups.fast_attn)
            h, residual = block.mlp(h, residual, eps, self.kernels, counted)  # the norm is fused into routing
            h = all_reduce(h, self.groups.world, self.groups.fast_world)
        h = h[batch.logits_indices]
        residual = residual[batch.logits_indices]
        x, _ = self.kernels.rmsnorm(h, self.norm.scale, eps, residual)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_outputs, hidden] -> [num_outputs, vocab] float32."""
        return self.unembedding(hidden).float()
