"""gptoss-serve: serving gpt-oss-20b and gpt-oss-120b on Ray Serve, PyTorch and Triton.

The code lives in three folders installed under this namespace: ``gptoss_serve.kernels`` (Triton kernels and
their torch twins), ``gptoss_serve.model`` (the gpt-oss architecture, checkpoints, tokenizer, harmony) and
``gptoss_serve.cluster`` (engine, Ray workers, Serve deployments, HTTP). Dependencies point one way:
kernels <- model <- cluster.
"""

__version__ = "0.1.0"

import os as _os

# Run from a checkout without installing (PYTHONPATH=<checkout>, as on the GPU machines), the folders beside
# this one are found as this package's subpackages too; an install maps them through pyproject.toml.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "kernels", "__init__.py")) and _checkout not in __path__:
    __path__.append(_checkout)


def __getattr__(name):  # `from gptoss_serve import LLM, SamplingParams` imports torch only then
    if name == "LLM":
        from gptoss_serve.cluster.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from gptoss_serve.cluster.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'gptoss_serve' has no attribute {name!r}")
