"""Builds a GptOssModel and fills it from a checkpoint (either layout) or from random weights in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from gptoss_serve.model.config import ModelConfig
from gptoss_serve.model.rope import yarn_inv_freq_and_concentration
from gptoss_serve.model.transformer import GptOssModel


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, kernels=None) -> GptOssModel:
    """A model with uninitialised storage on `device`: no time is spent on initialising weights that the
    checkpoint overwrites anyway."""
    with torch.device("meta"):
        model = GptOssModel(config, dtype=dtype, kernels=kernels)
    model = model.to_empty(device=device)
    inv_freq, _ = yarn_inv_freq_and_concentration(config)  # not in checkpoints: computed from the config
    model.rope_inv_freq = inv_freq.to(device)
    return model.eval()


def _fill(model: GptOssModel, tensors: Iterable[tuple[str, torch.Tensor]], total: int, source: str,
          progress: bool) -> None:
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    targets.pop("rope_inv_freq")
    seen = set()
    for name, tensor in tqdm(tensors, total=total, desc=f"Loading {source}", unit="tensor",
                             disable=not progress, leave=False):
        target = targets.get(name)
        if target is None:
            raise KeyError(f"{source}: tensor {name!r} has no place in the model")
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise KeyError(f"{source}: no values for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
               kernels=None, progress: bool = False) -> GptOssModel:
    from gptoss_serve.model.checkpoint import CheckpointReader

    reader = CheckpointReader(model_dir)
    model = empty_model(reader.config, dtype, device, kernels)
    names = [name for name, _ in model.named_parameters()] + [
        name for name, _ in model.named_buffers() if name != "rope_inv_freq"]
    _fill(model, ((name, reader.get(name)) for name in names), len(names), str(model_dir), progress)
    model.kernels.prepare_weights(model)
    return model


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", kernels=None, progress: bool = False) -> GptOssModel:
    """Random weights drawn like the synthetic checkpoints', made straight on `device` (no file): how the
    GPU runs get real 20b and 120b shapes without writing 13 or 65 GB."""
    from gptoss_serve.model.checkpoint_writer import random_tensors

    model = empty_model(config, dtype, device, kernels)
    total = sum(1 for _ in model.named_parameters()) + sum(1 for _ in model.named_buffers()) - 1
    _fill(model, random_tensors(config, seed, device=device), total, f"random {config}", progress)
    model.kernels.prepare_weights(model)
    return model
