"""The benchmark's HF transformers baseline holds exactly our weights, whichever kernel backend prepared them."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.cluster.engine.hf_baseline import hf_model_from
from gptoss_serve.kernels.backend import get_kernels
from gptoss_serve.model.batch import KVCache, build_forward_batch
from gptoss_serve.model.config import preset
from gptoss_serve.model.loader import random_model

pytest.importorskip("transformers")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_hf_model_gives_our_logits(kernels):
    reference = random_model(preset("tiny"), seed=4, dtype=torch.float32)
    prepared = random_model(preset("tiny"), seed=4, dtype=torch.float32, kernels=get_kernels(kernels))
    hf = hf_model_from(prepared, dtype=torch.float32)
    tokens = list(range(1000, 1030))
    cache = KVCache.allocate(reference.config, 8, 4, torch.float32)
    batch = build_forward_batch([tokens], [0], [list(range(8))], 4, all_logits=True)
    ours = reference.compute_logits(reference(batch, cache))
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
