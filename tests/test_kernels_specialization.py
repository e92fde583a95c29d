"""Triton compiles a kernel again for every new pattern of its integer arguments (== 1, divisible by 16). Arguments
that change from one engine step to the next (sequences in a step, block-table widths, token counts) must not be
specialized on: otherwise a serving replica stalls for a JIT compile (about 2 s each on an H200, 2026-11-22) at
unpredictable moments, e.g. the first step with 16 sequences, or the first whose longest context passes 1024."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PER_STEP_ARGS = {
    "attention_prefill._prefill_kernel": {"num_seqs", "stride_tables"},
    "attention_decode._decode_kernel": {"stride_tables"},
    "moe_routing._topk_softmax_kernel": {"num_tokens"},
    "moe_routing._group_by_expert_kernel": {"num_pairs", "max_blocks", "max_tail_blocks"},
    "moe_routing._count_chunks_kernel": {"num_pairs"},
    "moe_routing._plan_chunks_kernel": {"num_chunks", "max_blocks", "max_tail_blocks"},
    "moe_routing._scatter_chunks_kernel": {"num_pairs"},
}


def test_per_step_arguments_are_not_specialized():
    # In a child process without TRITON_INTERPRET: the interpreter's functions do not keep the jit options.
    code = (
        "import importlib, json\n"
        f"names = {sorted(PER_STEP_ARGS)!r}\n"
        "out = {}\n"
        "for name in names:\n"
        "    module, kernel = name.split('.')\n"
        "    fn = getattr(importlib.import_module('gptoss_serve.kernels.' + module), kernel)\n"
        "    out[name] = [p.name for p in fn.params if p.do_not_specialize]\n"
        "print(json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    unspecialized = json.loads(result.stdout.strip().splitlines()[-1])
    for name, wanted in PER_STEP_ARGS.items():
        assert wanted <= set(unspecialized[name]), f"{name} specializes on {sorted(wanted - set(unspecialized[name]))}"
