"""Where the weights come from: a local directory, the embedded default model, or the Hugging Face Hub."""

from __future__ import annotations

import re
from pathlib import Path

from gptoss_serve.model.default_model import default_model_dir

# Only the Hugging Face layout (config.json and safetensors at the top); original/ and metal/ are duplicates.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.tiktoken.gz"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(RuntimeError):
    """The model could not be found or fetched; the message says what to do instead."""


def resolve_model(model: str | None) -> Path:
    """A directory holding the checkpoint: the default model for None, the path if it exists, else a download."""
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"--model {model}: expected a checkpoint directory, got a file")
        return path
    if _HUB_ID.match(model):
        return download_from_hub(model)
    raise ModelSourceError(f"--model {model}: no such directory, and not a Hugging Face id (owner/name)")


def download_from_hub(repo_id: str) -> Path:
    """snapshot_download with its progress bars; a cached copy is used without network access."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True))
    except Exception:  # not cached (completely) yet: download below
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as error:
        reason = " ".join(str(error).split())
        raise ModelSourceError(
            f"could not download {repo_id} from the Hugging Face Hub ({type(error).__name__}: {reason}). "
            f"Check the id and the network (or HF_ENDPOINT / HF_TOKEN), or download the checkpoint where the "
            f"network allows and pass its directory with --model DIR.") from error
