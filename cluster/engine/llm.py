"""The offline Python API, in the shape vLLM users know:

    from gptoss_serve import LLM, SamplingParams
    llm = LLM(model="/path/to/gpt-oss-20b", dtype="bfloat16", kernels="triton")
    for out in llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.outputs[0].text)
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Sequence as Seq

import torch
from tqdm import tqdm

from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.llm_engine import LLMEngine
from gptoss_serve.cluster.engine.outputs import RequestOutput
from gptoss_serve.cluster.engine.sampling_params import OutputKind, SamplingParams
from gptoss_serve.model.transformer import GptOssModel

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

Prompt = str | list[int] | dict[str, Any]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_kernels(kernels: str, device: str | torch.device) -> str:
    """'auto': the Triton kernels on a GPU, their torch twins on CPU."""
    if kernels == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return kernels


def try_load_tokenizer(model_dir: str | Path | None):
    """The o200k_harmony tokenizer, or None where its vocabulary file cannot be found (text is then '')."""
    try:
        from gptoss_serve.model.tokenizer import load_tokenizer

        return load_tokenizer(model_dir)
    except Exception as error:  # a missing or broken vocabulary: token ids still work
        logger.warning("no tokenizer (%s): outputs carry token ids only", error)
        return None


class LLM:
    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype = "bfloat16",
                 kernels: str = "auto", device: str | torch.device | None = None, tokenizer=None,
                 seed: int = 0, progress: bool = True, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096, long_prefill_token_threshold: int | None = None,
                 max_model_len: int | None = None, block_size: int = 16,
                 gpu_memory_utilization: float = 0.90, kv_cache_memory_bytes: int | None = None,
                 enable_prefix_caching: bool = True, sliding_window_pool: bool = True,
                 enforce_eager: bool = False, count_expert_tokens: bool = False, async_scheduling: bool = True):
        """model: a checkpoint directory (either layout); None: the embedded small default model.
        kernels: 'torch', 'triton', or 'auto' (triton on a GPU, torch on CPU)."""
        from gptoss_serve.kernels.backend import get_kernels
        from gptoss_serve.model.default_model import resolve_model_dir
        from gptoss_serve.model.loader import load_model

        torch.manual_seed(seed)
        model_dir = resolve_model_dir(model)
        device = device or default_device()
        gpt = load_model(model_dir, resolve_dtype(dtype), device, get_kernels(resolve_kernels(kernels, device)),
                         progress=progress)
        config = EngineConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            long_prefill_token_threshold=long_prefill_token_threshold, max_model_len=max_model_len,
            block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes, enable_prefix_caching=enable_prefix_caching,
            sliding_window_pool=sliding_window_pool, enforce_eager=enforce_eager,
            count_expert_tokens=count_expert_tokens, async_scheduling=async_scheduling)
        self._init(gpt, config, tokenizer if tokenizer is not None else try_load_tokenizer(model_dir), progress)

    @classmethod
    def from_model(cls, model: GptOssModel, tokenizer=None, config: EngineConfig | None = None,
                   progress: bool = False) -> "LLM":
        """An LLM around a model already in memory (tests, benchmarks on random weights)."""
        llm = cls.__new__(cls)
        llm._init(model, config or EngineConfig(), tokenizer, progress)
        return llm

    def _init(self, model: GptOssModel, config: EngineConfig, tokenizer, progress: bool) -> None:
        self.engine = LLMEngine(model, config, tokenizer)
        self.tokenizer = tokenizer
        self.progress = progress
        self._request_ids = itertools.count()

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None
                 = None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Completes every prompt (text, token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."});
        returns one RequestOutput per prompt, in order."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        order = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
                token_ids, text = self._tokenize(prompt)
                request_id = f"generate-{next(self._request_ids)}"
                self.engine.add_request(request_id, token_ids, params.replace(output_kind=OutputKind.FINAL_ONLY),
                                        prompt=text)
                order[request_id] = i
        except Exception:  # a bad prompt: none of this call's requests stay behind in the engine
            self.engine.abort_request(list(order))
            raise
        results: list[RequestOutput | None] = [None] * len(prompts)
        show = self.progress if use_tqdm is None else use_tqdm
        with tqdm(total=len(prompts), desc="Generating", unit="prompt", disable=not show or len(prompts) < 2,
                  dynamic_ncols=True) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[order[output.request_id]] = output
                        bar.update(1)
                bar.set_postfix(generated=self.engine.num_generated_tokens, refresh=False)
        return results

    def _tokenize(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"]), prompt.get("prompt")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
            return self.tokenizer.encode(prompt), prompt
        return list(prompt), None


def _as_prompt_list(prompts) -> list[Prompt]:
    """One prompt (a string, a dict, or a flat list of ids) or a list of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]
    return prompts
