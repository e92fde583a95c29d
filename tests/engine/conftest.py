"""Shared fixtures: the tiny random model in float32 (built once), engines around it, random prompts."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.llm import LLM
from gptoss_serve.model.config import preset
from gptoss_serve.model.loader import random_model

# Small blocks against the tiny preset's window of 16, so a few dozen tokens span several windows and blocks.
ENGINE_DEFAULTS = dict(block_size=4, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=256)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model's ops are too small to share out; with other jobs on the machine, more threads than
    free cores make them spin and wait (ten times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model():
    return random_model(preset("tiny"), seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def make_llm(tiny_model):
    def make(tokenizer=None, **overrides) -> LLM:
        return LLM.from_model(tiny_model, tokenizer, EngineConfig(**(ENGINE_DEFAULTS | overrides)))

    return make


@pytest.fixture(scope="session")
def random_prompts():
    def prompts(lengths: list[int], seed: int = 0, vocab: int = 199_998) -> list[list[int]]:
        """Ordinary (non-special) token ids."""
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]

    return prompts
