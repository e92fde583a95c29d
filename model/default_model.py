"""The embedded default model: a small synthetic gpt-oss written on first use.

Nothing can be downloaded on the machines we test on, and a first run should work anywhere, so with no
`--model` the server and the CLI use random weights at the 'tiny' preset's shape, in the real original
checkpoint format. It is written once into a cache folder and reused; concurrent first uses (several Ray
replicas starting together) each write a private folder and the first rename wins.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0
# Bump when the checkpoint format or the random distributions change, so stale caches are not reused.
DEFAULT_MODEL_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("GPTOSS_SERVE_CACHE", Path.home() / ".cache" / "gptoss-serve"))


def default_model_dir() -> Path:
    from gptoss_serve.model.checkpoint_writer import write_checkpoint
    from gptoss_serve.model.config import preset

    final = cache_root() / f"default-{DEFAULT_PRESET}-seed{DEFAULT_SEED}-v{DEFAULT_MODEL_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=final.parent))
    try:
        write_checkpoint(preset(DEFAULT_PRESET), staging, layout="original", seed=DEFAULT_SEED)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # lost the race only if a complete copy now exists
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """A model directory from a path, or the embedded default for None."""
    if model is None:
        return default_model_dir()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    return path
