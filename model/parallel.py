"""How one model replica is split over `world_size` ranks: tensor-parallel attention, expert-parallel or
tensor-parallel experts, and the process groups that combine the pieces.

With --tp T --ep E the replica has world_size = max(T, E) ranks, and T and E must divide it:
- attention: query and KV heads split T ways; rank r holds head shard r % T. Ranks r and r' with
  r // T == r' // T form one attention group and all-reduce after the output projection. With T < world_size
  the groups compute the same thing (attention replicated), which keeps every rank's residual stream equal.
- experts: split E ways by expert id (rank r holds expert shard r // (world_size / E)), and within a shard the
  intermediate dimension is split world_size / E ways (tensor-parallel experts; r % (world_size / E)). Every
  rank runs the router on all tokens and only its own experts; one all-reduce over all ranks combines them.
Biases that the all-reduce would add several times (attention out, expert mlp2) live on one rank of each sum.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist

from gptoss_serve.kernels.mxfp4 import MXFP4_BLOCK_SIZE
from gptoss_serve.model.config import ModelConfig

logger = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A --tp/--ep choice that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    tp: int = 1  # attention tensor-parallel size
    ep: int = 1  # expert-parallel size
    rank: int = 0

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def attn_rank(self) -> int:  # which slice of the heads
        return self.rank % self.tp

    @property
    def expert_tp(self) -> int:  # ways the intermediate dimension is split inside an expert shard
        return self.world_size // self.ep

    @property
    def expert_shard(self) -> int:
        return self.rank // self.expert_tp

    @property
    def expert_tp_rank(self) -> int:
        return self.rank % self.expert_tp

    def validate(self, config: ModelConfig) -> None:
        if self.tp < 1 or self.ep < 1:
            raise LayoutError(f"--tp and --ep must be at least 1, got tp={self.tp} ep={self.ep}")
        if self.world_size % self.tp or self.world_size % self.ep:
            raise LayoutError(
                f"--tp {self.tp} and --ep {self.ep}: the larger must be a multiple of the smaller "
                f"(a replica has max(tp, ep) ranks)")
        if not 0 <= self.rank < self.world_size:
            raise LayoutError(f"rank {self.rank} outside a world of {self.world_size}")
        if config.num_key_value_heads % self.tp:
            raise LayoutError(
                f"--tp {self.tp} must divide the {config.num_key_value_heads} KV heads")
        if config.num_experts % self.ep:
            raise LayoutError(f"--ep {self.ep} must divide the {config.num_experts} experts")
        if config.intermediate_size % (self.expert_tp * MXFP4_BLOCK_SIZE):
            blocks = config.intermediate_size // MXFP4_BLOCK_SIZE
            raise LayoutError(
                f"--tp {self.tp} --ep {self.ep} would split each expert's intermediate dimension "
                f"{self.expert_tp} ways, but its {blocks} MXFP4 blocks of 32 do not divide evenly; "
                f"use --ep {self.world_size}")

    # Local sizes and the slices of the full tensors this rank holds --------------------------------------
    def num_q_heads(self, config: ModelConfig) -> int:
        return config.num_attention_heads // self.tp

    def num_kv_heads(self, config: ModelConfig) -> int:
        return config.num_key_value_heads // self.tp

    def num_local_experts(self, config: ModelConfig) -> int:
        return config.num_experts // self.ep

    def first_expert(self, config: ModelConfig) -> int:
        return self.expert_shard * self.num_local_experts(config)

    def intermediate_local(self, config: ModelConfig) -> int:
        return config.intermediate_size // self.expert_tp

    def expert_slice(self, config: ModelConfig) -> slice:
        first = self.first_expert(config)
        return slice(first, first + self.num_local_experts(config))

    def intermediate_slice(self, config: ModelConfig) -> slice:
        n = self.intermediate_local(config)
        return slice(self.expert_tp_rank * n, (self.expert_tp_rank + 1) * n)

    def owns_attn_out_bias(self) -> bool:
        return self.attn_rank == 0

    def owns_mlp2_bias(self) -> bool:
        return self.expert_tp_rank == 0


class SymmetricAllReduce:
    """An all-reduce through peer GPU memory (torch symmetric memory over NVLink) for decode-sized tensors: each
    rank copies its part into a buffer every rank can read, and one kernel sums the parts, where NCCL runs its
    ring protocol. `mode` is "two_shot" (in place, reduce-scatter then all-gather, barriers on both ends) or
    "one_shot". Larger tensors, and any dtype but the buffer's, go through NCCL.

    Off by default (GPTOSS_FAST_ALLREDUCE=two_shot|one_shot turns it on): both modes equal NCCL over many
    consecutive calls on 2 x H200, and are faster eagerly (36-41 µs against 52-68 µs), but inside the decode
    CUDA graphs NCCL already takes 18 µs against their 16-19 µs (docs/PERFORMANCE.md), so it buys nothing yet.
    """

    MAX_BYTES = 1 << 20

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, mode: str = "two_shot"):
        import torch.distributed._symmetric_memory as symm_mem

        if mode not in ("one_shot", "two_shot"):
            raise ValueError(f"unknown symmetric all-reduce mode {mode!r}")
        self.group_name, self.dtype, self.mode = group.group_name, dtype, mode
        self.buffer = symm_mem.empty(self.MAX_BYTES // dtype.itemsize, device=device, dtype=dtype)
        symm_mem.rendezvous(self.buffer, self.group_name)  # collective: every rank of the group

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The sum over the group, or None if x is not for this path."""
        if x.dtype != self.dtype or x.numel() > self.buffer.numel() or not x.is_contiguous():
            return None
        staged = self.buffer[:x.numel()]
        staged.copy_(x.view(-1))
        out = torch.empty_like(x)
        if self.mode == "one_shot":
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, out.view(-1))
        else:
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
            out.view(-1).copy_(staged)
        return out


@dataclasses.dataclass
class ShardGroups:
    """The process groups a rank all-reduces over; None where the sum has a single member. The fast_* paths,
    when enabled on GPUs, take the small all-reduces of decode steps."""

    attn: dist.ProcessGroup | None
    world: dist.ProcessGroup | None
    fast_attn: SymmetricAllReduce | None = None
    fast_world: SymmetricAllReduce | None = None

    def enable_fast_all_reduce(self, device: torch.device, dtype: torch.dtype, mode: str | None = None) -> bool:
        """Collective. Sets up the symmetric-memory path (mode, else $GPTOSS_FAST_ALLREDUCE: off by default) on
        every group; False, and NCCL only, where it is off or cannot be set up."""
        mode = mode or os.environ.get("GPTOSS_FAST_ALLREDUCE", "0")
        if device.type != "cuda" or mode == "0":
            return False
        try:
            if self.attn is not None:
                self.fast_attn = SymmetricAllReduce(self.attn, device, dtype, mode)
            if self.world is not None:
                self.fast_world = SymmetricAllReduce(self.world, device, dtype, mode)
        except Exception as error:  # an older torch, no peer access: NCCL still works
            logger.warning("one-shot all-reduce unavailable, using NCCL: %s", error)
            self.fast_attn = self.fast_world = None
            return False
        return True

    @staticmethod
    def create(layout: ShardLayout) -> "ShardGroups":
        """Collective: every rank of the default group calls it with its own layout."""
        attn = None
        if layout.tp > 1:
            # new_group must be called by every rank for every group, in the same order.
            for first in range(0, layout.world_size, layout.tp):
                group = dist.new_group(list(range(first, first + layout.tp)))
                if first == layout.rank // layout.tp * layout.tp:
                    attn = group
        world = dist.group.WORLD if layout.world_size > 1 else None
        return ShardGroups(attn=attn, world=world)


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, fast: SymmetricAllReduce | None = None
               ) -> torch.Tensor:
    """The sum of x over group (x itself without one); may return a new tensor."""
    if group is None:
        return x
    if fast is not None:
        summed = fast(x)
        if summed is not None:
            return summed
    dist.all_reduce(x, group=group)
    return x
