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


@gluon.jit
def prefetch_l2_bulk(ptrs, sizes):
    """Asks L2 for sizes[i] bytes from ptrs[i] (both multiples of 16; 0 asks nothing), one bulk prefetch a warp
    from its lane 0's element (cp.async.bulk.prefetch.L2, sm_90): the other lanes' elements are ignored, so give
    each warp its own range there. A hint: holds no register, returns nothing, cannot read stale data."""
    gl.inline_asm_elementwise(
        "{\n.reg .pred p;\n.reg .b32 lane;\nmov.u32 lane, %laneid;\nsetp.eq.u32 p, lane, 0;\n"
        "@p setp.ne.u32 p, $2, 0;\n@p cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;\n}",
        "=r,l,r", [ptrs, sizes], dtype=gl.int32, is_pure=False, pack=1)
