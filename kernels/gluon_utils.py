"""What the Gluon kernels (moe_mma, moe_wgmma) share that is not about their matmuls."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def pdl_wait(PDL: gl.constexpr):
    """triton_utils.pdl_wait for Gluon kernels: with PDL, wait for the kernel before (griddepcontrol.wait: it has
    finished and its writes are visible), then let the kernel after launch (griddepcontrol.launch_dependents)."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
