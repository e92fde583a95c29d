"""The whole model on the triton backend gives torch's greedy tokens (tiny preset, random weights).

Each step mixes a chunked prefill (a chunk after a cached prefix), a fresh prompt and decodes, so every kernel
runs in both of its regimes and the sliding layers (window 16) see contexts past their window.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported; the kernels re-read it at launch too

from gptoss_serve.kernels.backend import get_kernels  # noqa: E402
from gptoss_serve.model.batch import KVCache, build_forward_batch  # noqa: E402
from gptoss_serve.model.config import preset  # noqa: E402
from gptoss_serve.model.loader import random_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 8


def greedy_tokens(kernels_name: str, prompts: list[list[int]], chunk: int, num_steps: int) -> list[list[int]]:
    config = preset("tiny")
    model = random_model(config, seed=0, device=DEVICE, kernels=get_kernels(kernels_name))
    cache = KVCache.allocate(config, num_blocks=64, block_size=BLOCK_SIZE, dtype=torch.bfloat16, device=DEVICE)
    tables = [list(range(16 * b, 16 * (b + 1))) for b in range(len(prompts))]  # 16 blocks = 128 tokens each
    cached = [0] * len(prompts)
    generated: list[list[int]] = [[] for _ in prompts]
    while min(len(g) for g in generated) < num_steps:
        new_tokens = []
        for b, prompt in enumerate(prompts):
            if cached[b] < len(prompt):  # still prefilling, `chunk` tokens at a time (chunk 0: whole prompt)
                take = len(prompt) - cached[b] if b == 0 else min(chunk, len(prompt) - cached[b])
                new_tokens.append(prompt[cached[b]:cached[b] + take])
            else:
                new_tokens.append([generated[b][-1]])
        batch = build_forward_batch(new_tokens, cached, tables, BLOCK_SIZE).to(DEVICE)
        logits = model.compute_logits(model(batch, cache))  # [num_seqs, vocab]
        for b, tokens in enumerate(new_tokens):
            cached[b] += len(tokens)
            if cached[b] >= len(prompts[b]):
                generated[b].append(int(logits[b].argmax()))
    return [g[:num_steps] for g in generated]


def test_triton_backend_greedy_tokens_match_torch():
    prompts = [[(7 * i + 3) % 1000 for i in range(11)], [(13 * i + 5) % 5000 for i in range(29)]]
    torch_tokens = greedy_tokens("torch", prompts, chunk=12, num_steps=6)
    assert greedy_tokens("triton", prompts, chunk=12, num_steps=6) == torch_tokens
