"""Builds a GptOssModel and fills it from a checkpoint (either layout) or from random weights in memory.

Under a ShardLayout each rank builds only its part of the model and reads only its slices of the weights.
"""

from __future__ import annotations

from pathlib import Path
import functools
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from gptoss_serve.model.config import ModelConfig
from gptoss_serve.model.parallel import ShardGroups, ShardLayout
from gptoss_serve.model.rope import yarn_inv_freq_and_concentration
from gptoss_serve.model.shard_weights import Index, local_tensor
from gptoss_serve.model.transformer import GptOssModel


def empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, kernels=None,
                layout: ShardLayout = ShardLayout(), groups: ShardGroups | None = None) -> GptOssModel:
    """A model with uninitialised storage on `device`: no time is spent on initialising weights that the
    checkpoint overwrites anyway."""
    with torch.device("meta"):
        model = GptOssModel(config, dtype=dtype, kernels=kernels, layout=layout, groups=groups)
    model = model.to_empty(device=device)
    inv_freq, _ = yarn_inv_freq_and_concentration(config)  # not in checkpoints: computed from the config
    model.rope_inv_freq = inv_freq.to(device)
    return model.eval()


def _weight_targets(model: GptOssModel) -> dict[str, torch.Tensor]:
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    del targets["rope_inv_freq"]
    return targets


def _fill(model: GptOssModel, sources: Iterable[tuple[str, Callable[[Index], torch.Tensor]]], source: str,
          progress: bool) -> None:
    """Copies each weight's local part into the model. `sources` yields (name, read) in the source's own
    order, where read(index) returns that part of the full tensor."""
    targets = _weight_targets(model)
    missing = set(targets)
    for name, read in tqdm(sources, total=len(targets), desc=f"Loading {source}", unit="tensor",
                           disable=not progress, leave=False):
        target = targets.get(name)
        if target is None:
            raise KeyError(f"{source}: tensor {name!r} has no place in the model")
        tensor = local_tensor(name, model.config, model.layout, tuple(target.shape), target.dtype, read)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name!r} has local shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        missing.discard(name)
    if missing:
        raise KeyError(f"{source}: no values for {', '.join(sorted(missing)[:5])}")


def _read_part(reader, name: str, index: Index) -> torch.Tensor:
    return reader.get(name, rows=index[0], trailing=index[1:])


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
               kernels=None, progress: bool = False, layout: ShardLayout = ShardLayout(),
               groups: ShardGroups | None = None) -> GptOssModel:
    from gptoss_serve.model.checkpoint import CheckpointReader

    with CheckpointReader(model_dir) as reader:
        model = empty_model(reader.config, dtype, device, kernels, layout, groups)
        reads = ((name, functools.partial(_read_part, reader, name)) for name in _weight_targets(model))
        _fill(model, reads, str(model_dir), progress)
    model.kernels.prepare_weights(model)
    return model


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", kernels=None, progress: bool = False,
                 layout: ShardLayout = ShardLayout(), groups: ShardGroups | None = None) -> GptOssModel:
    """Random weights drawn like the synthetic checkpoints', made straight on `device` (no file): how the
    GPU runs get real 20b and 120b shapes without writing 13 or 65 GB. Every rank of a sharded model draws
    the same full tensors (one at a time) and keeps its part, so all layouts hold the same model."""
    from gptoss_serve.model.checkpoint_writer import random_tensors

    model = empty_model(config, dtype, device, kernels, layout, groups)
    reads = ((name, tensor.__getitem__) for name, tensor in random_tensors(config, seed, device=device))
    _fill(model, reads, f"random {config}", progress)
    model.kernels.prepare_weights(model)
    return model
