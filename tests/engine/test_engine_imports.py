"""The engine is plain Python over the model: importing it pulls in neither Ray nor an HTTP stack."""

import subprocess
import sys

MODULES = ["llm", "llm_engine", "scheduler", "block_manager", "sampler", "model_runner", "cuda_graphs", "stop",
           "bench", "cli", "hf_baseline", "kv_plan"]


def test_engine_imports_no_ray_or_http():
    code = "; ".join([f"import gptoss_serve.cluster.engine.{m}" for m in MODULES] + [
        "import sys",
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi', 'uvicorn', 'starlette'))",
        "assert not bad, bad"])
    subprocess.run([sys.executable, "-c", code], check=True)
