"""Hugging Face transformers' GptOssForCausalLM on our model's weights: the baseline the benchmark runs in the
same process on the same (random) weights.

The experts are dequantized from MXFP4 into HF's transposed layout (gate_up_proj [E, H, 2I], down_proj
[E, I, H]), qkv is split by rows, every other tensor is renamed. At the gpt-oss-20b shape the dequantized
model is about 42 GB in bfloat16; it is built layer by layer on the device, dequantizing one layer at a time.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from gptoss_serve.kernels.mxfp4 import dequantize_mxfp4
from gptoss_serve.model.transformer import GptOssModel


def hf_config(model: GptOssModel):
    import transformers

    d = model.config.to_hf_dict()
    del d["quantization_config"]  # the experts arrive dequantized
    return transformers.GptOssConfig(**d)


@torch.no_grad()  # not inference_mode: its parameters must stay usable in ordinary (autograd) code
def hf_model_from(model: GptOssModel, dtype: torch.dtype = torch.bfloat16, device=None, progress: bool = False):
    """A GptOssForCausalLM (eager attention) holding `model`'s weights, on `device` (default: the model's)."""
    import transformers

    device = torch.device(device or next(model.parameters()).device)
    config = model.config
    with torch.device(device):
        hf = transformers.GptOssForCausalLM._from_config(hf_config(model), dtype=dtype, attn_implementation="eager")
    hf.eval()
    q, kv = config.q_size, config.kv_size
    pairs = [(hf.model.embed_tokens.weight, model.embedding.weight), (hf.model.norm.weight, model.norm.scale),
             (hf.lm_head.weight, model.unembedding.weight)]
    for param, value in pairs:
        param.copy_(value)
    for n in tqdm(range(config.num_hidden_layers), desc="HF weights", disable=not progress, leave=False):
        ours, theirs = model.block[n], hf.model.layers[n]
        attn, mlp = theirs.self_attn, theirs.mlp
        qkv_w, qkv_b = ours.attn.qkv.weight, ours.attn.qkv.bias
        for proj, rows in ((attn.q_proj, slice(0, q)), (attn.k_proj, slice(q, q + kv)),
                           (attn.v_proj, slice(q + kv, q + 2 * kv))):
            proj.weight.copy_(qkv_w[rows])
            proj.bias.copy_(qkv_b[rows])
        pairs = [
            (theirs.input_layernorm.weight, ours.attn.norm.scale), (attn.sinks, ours.attn.sinks),
            (attn.o_proj.weight, ours.attn.out.weight), (attn.o_proj.bias, ours.attn.out.bias),
            (theirs.post_attention_layernorm.weight, ours.mlp.norm.scale),
            (mlp.router.weight, ours.mlp.gate.weight), (mlp.router.bias, ours.mlp.gate.bias),
            (mlp.experts.gate_up_proj_bias, ours.mlp.mlp1_bias), (mlp.experts.down_proj_bias, ours.mlp.mlp2_bias),
        ]
        for param, value in pairs:
            param.copy_(value)
        w1, w2 = ours.mlp.mlp1_weight, ours.mlp.mlp2_weight
        for e in range(config.num_experts):  # one expert at a time: no layer-sized float temporaries
            blocks = _checkpoint_blocks(model, w1.blocks, e)
            mlp.experts.gate_up_proj[e].copy_(dequantize_mxfp4(blocks, w1.scales[e], dtype).T)  # -> [H, 2I]
            blocks = _checkpoint_blocks(model, w2.blocks, e)
            mlp.experts.down_proj[e].copy_(dequantize_mxfp4(blocks, w2.scales[e], dtype).T)  # -> [I, H]
    return hf


def _checkpoint_blocks(model: GptOssModel, blocks: torch.Tensor, expert: int) -> torch.Tensor:
    """One expert's bytes in the checkpoint's layout: the kernel backend undoes its own re-layout where it has
    one (the triton backend's `checkpoint_blocks`: nibble split and row tiles)."""
    undo = getattr(model.kernels, "checkpoint_blocks", None)
    return undo(blocks, expert) if undo is not None else blocks[expert]


@torch.inference_mode()
def hf_generate_throughput(hf, prompts: list[list[int]], output_len: int) -> dict:
    """Greedy `generate` of exactly output_len tokens for equal-length prompts in one batch; tok/s."""
    device = next(hf.parameters()).device
    input_ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=199999)
    hf.generate(input_ids[:, :8], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=199999)
    _sync(device)
    start = time.perf_counter()
    out = hf.generate(input_ids, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    num_generated = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    return {"batch_size": len(prompts), "input_len": input_ids.shape[1], "output_len": output_len,
            "seconds": seconds, "output_tokens_per_s": num_generated / seconds,
            "per_stream_tokens_per_s": (out.shape[1] - input_ids.shape[1]) / seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
