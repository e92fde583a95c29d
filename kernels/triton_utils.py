"""Launching Triton kernels compiled on a GPU or interpreted on the CPU, chosen at launch time.

`triton.jit` decides at decoration (import) time whether a kernel is compiled or interpreted, from
TRITON_INTERPRET. Tests set that variable at their top, but other test modules may import these kernel modules
first; so every launch goes through `launch`, which re-reads the variable and rebuilds the kernel in the other
flavour if needed. Functions that kernels call are made with `device_function` instead of `triton.jit`: the
compiler sees an ordinary JITFunction, and the interpreter, calling it, is sent to an interpreted copy.

The interpreter also gets bf16 wrong (triton issue 11584): bf16 tl.dot and bf16 arithmetic silently, and casts
from float32 to bf16 truncate instead of rounding to nearest even. Kernels therefore take a constexpr flag,
set from `emulate_bf16()` at launch, under which they upcast dot operands to float32 and round with
`cast_rne` below.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_OTHER_FLAVOUR: dict[tuple[object, bool], object] = {}


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), read now, not at import."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), interpreted or compiled as TRITON_INTERPRET says at this moment."""
    want_interpreted = interpreting()
    if isinstance(kernel, InterpretedFunction) != want_interpreted:
        key = (kernel.fn, want_interpreted)
        if key not in _OTHER_FLAVOUR:
            _OTHER_FLAVOUR[key] = InterpretedFunction(kernel.fn) if want_interpreted else JITFunction(kernel.fn)
        kernel = _OTHER_FLAVOUR[key]
    if not want_interpreted:
        for a in args:
            if isinstance(a, torch.Tensor) and not a.is_cuda:
                raise ValueError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    kernel[grid](*args, **kwargs)


def emulate_bf16() -> bool:
    """Whether kernels must upcast bf16 operands of tl.dot (and bf16 arithmetic) to float32, and round to bf16
    by hand (their EMULATE_BF16 flag): under the interpreter (see the module docstring); on a GPU the tensor cores
    take bf16 operands and accumulate in float32, and casts round to nearest even."""
    return interpreting()


class _DeviceFunction(JITFunction):
    """A @triton.jit function callable from compiled and interpreted kernels alike."""

    def __call__(self, *args, **kwargs):
        if interpreting():
            if getattr(self, "_interpreted", None) is None:
                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def device_function(fn):
    return _DeviceFunction(fn)


@device_function
def cast_rne(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x.to(dtype), rounding float32 to bf16 to nearest even by integer arithmetic when EMULATE_BF16 (the
    interpreter's own cast truncates). Finite values only, which is all the kernels produce."""
    if EMULATE_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n up to at_most (K ranges or steps of whole blocks, no masks in a loop)."""
    return max(d for d in range(1, min(at_most, n) + 1) if n % d == 0)


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel before it
# on the stream still runs. Its programs do only what needs none of that kernel's results, then `pdl_wait`:
# griddepcontrol.wait (until the kernel before has finished and its writes are visible), then launch_dependents
# (the kernel after may start once every program has got here). Every program of such a kernel waits before it
# ends, so a kernel's end implies the end of every kernel before it; what a program may read before its wait is
# therefore constant data (weights) and what kernels at least two launches back wrote (block tables). What it
# saves: the launch and the first programs' start, hidden behind the previous kernel's last programs. H100,
# 2026-12-06 (tools/gpu_check.sh 24, on / off in one run): the 20b engine 399.7 / 379.6 tok/s one stream, 1594 /
# 1532 with 8 x 1k prompts; MoE 120b 8 tokens 163.1 / 168.7 us, 20b 8 tokens 138.5 / 142.5; decode attention
# batch 1 x 1k 6.0 / 7.2 us. GPTOSS_PDL=0 turns it off (the benchmarks compare both).
PDL = os.environ.get("GPTOSS_PDL", "1").lower() not in ("0", "false", "off", "no")


def pdl_args(device: torch.device) -> dict:
    """The launch arguments of a kernel that takes a PDL flag: dict(PDL=True, launch_pdl=True) where programmatic
    dependent launch applies (a Hopper or later GPU, compiled, PDL set), else dict(PDL=False)."""
    if PDL and device.type == "cuda" and not interpreting() and _capability(device.index)[0] >= 9:
        return dict(PDL=True, launch_pdl=True)
    return dict(PDL=False)


def _capability(index: int | None) -> tuple[int, int]:
    return _device_capability(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)  # asked at every launch of a PDL kernel: once per device
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@device_function
def pdl_wait(PDL: tl.constexpr):
    """With PDL: wait for the kernel before to finish (its writes visible), then let the kernel after launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


MIN_ARRIVAL_COUNTERS = 4096

# Per (user, device), arrival counters that are zero between launches (each user's kernel resets what it counted
# before it ends), so no launch clears them and CUDA graphs replay them as they are. Launches on concurrent streams
# must not share them (the engine runs one stream). A buffer outgrown stays referenced: a captured graph may still
# use it.
_arrival_counters: dict[tuple[str, torch.device], list[torch.Tensor]] = {}


def arrival_counters(user: str, count: int, device: torch.device) -> torch.Tensor:
    """[>= count] int32 zeros for the kernel named by user, kept for the process."""
    held = _arrival_counters.setdefault((user, device), [])
    if not held or held[-1].numel() < count:
        held.append(torch.zeros(max(count, MIN_ARRIVAL_COUNTERS), dtype=torch.int32, device=device))
    return held[-1]
