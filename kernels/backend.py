"""Kernel backends: one object per implementation of the ops a shard runs, picked by name.

`torch` is the plain-PyTorch twin of every kernel and the CPU path; `triton` runs the Triton kernels (on a GPU,
or on CPU tensors under TRITON_INTERPRET=1). The model calls ops only through a backend, so swapping one for
the other changes no model code.
"""

from __future__ import annotations

from typing import Callable

import torch

from gptoss_serve.kernels.attention_front_ref import norm_qkv_rope_ref
from gptoss_serve.kernels.attention_ref import paged_attention_ref
from gptoss_serve.kernels.moe_ref import moe_experts_ref
from gptoss_serve.kernels.moe_router_ref import norm_and_route_ref
from gptoss_serve.kernels.rmsnorm_ref import rmsnorm_ref


class TorchKernels:
    """The reference ops. Every other backend has the same methods with the same signatures."""

    name = "torch"

    rmsnorm = staticmethod(rmsnorm_ref)
    norm_qkv_rope = staticmethod(norm_qkv_rope_ref)
    paged_attention = staticmethod(paged_attention_ref)
    norm_and_route = staticmethod(norm_and_route_ref)
    moe_experts = staticmethod(moe_experts_ref)

    def prepare_weights(self, model: torch.nn.Module) -> None:
        """Hook for a one-time re-layout of weights (expert weights, say) after loading; torch needs none."""


_BACKENDS: dict[str, Callable[[], object]] = {"torch": TorchKernels}


def register_backend(name: str, factory: Callable[[], object]) -> None:
    _BACKENDS[name] = factory


def get_kernels(name: str):
    if name == "triton" and "triton" not in _BACKENDS:
        import gptoss_serve.kernels.triton_backend  # noqa: F401  (registers itself; imports triton lazily)
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of torch, triton") from None
