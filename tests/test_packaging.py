"""Packaging: our `kernels` folder must not pass for the Hugging Face kernels hub, and imports point one way."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib.util, sys\n"
    "from transformers.utils.import_utils import is_kernels_available\n"
    "from transformers import GptOssForCausalLM\n"  # the model class transformers resolves kernels for
    "import gptoss_serve.kernels.backend\n"
    "print(is_kernels_available(), 'kernels' in sys.modules and "
    "'gptoss_serve' in (getattr(sys.modules['kernels'], '__file__', '') or ''))\n"
)


def _probe(cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_transformers_does_not_mistake_our_kernels_for_the_hub_package(tmp_path):
    # From anywhere: the install puts only `gptoss_serve` on the path, never a top-level `kernels`.
    assert _probe(tmp_path) == ["False", "False"]


def test_transformers_probe_from_the_checkout_root():
    # From the repository root the folder `kernels/` is on sys.path ('' first); the probe must still say no.
    assert _probe(REPO)[0] == "False"


def test_distribution_installs_no_top_level_kernels_model_or_cluster():
    import importlib.metadata

    tops = importlib.metadata.packages_distributions()
    for name in ("kernels", "model", "cluster"):
        assert "gptoss-serve" not in tops.get(name, []), name


def _imports(folder: str) -> set[str]:
    found = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


def test_dependencies_point_one_way():
    def banned(imports, prefixes):
        return sorted(i for i in imports if any(i == p or i.startswith(p + ".") for p in prefixes))

    assert banned(_imports("kernels"), ["gptoss_serve.model", "gptoss_serve.cluster", "ray", "fastapi"]) == []
    assert banned(_imports("model"), ["gptoss_serve.cluster", "ray", "fastapi", "starlette", "uvicorn"]) == []
