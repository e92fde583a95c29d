"""gptoss-serve: serving gpt-oss-20b and gpt-oss-120b on Ray Serve, PyTorch and Triton.

The code lives in three folders installed under this namespace: ``gptoss_serve.kernels`` (Triton kernels and
their torch twins), ``gptoss_serve.model`` (the gpt-oss architecture, checkpoints, tokenizer, harmony) and
``gptoss_serve.cluster`` (engine, Ray workers, Serve deployments, HTTP). Dependencies point one way:
kernels <- model <- cluster.
"""

__version__ = "0.1.0"
