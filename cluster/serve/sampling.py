"""OpenAI sampling fields -> the engine's SamplingParams, and the context-window check with its numbers."""

from __future__ import annotations

from gptoss_serve.cluster.engine.sampling_params import SamplingParams, SamplingParamsError
from gptoss_serve.cluster.serve.errors import context_overflow, invalid_request
from gptoss_serve.cluster.serve.openai_protocol import SamplingFields

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default, and what gpt-oss is tuned for


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, param: str) -> int:
    """The completion budget: as requested if prompt plus completion fit the window, else a 400 naming both."""
    if requested is None:
        if num_prompt_tokens >= max_model_len:
            raise context_overflow(max_model_len, num_prompt_tokens, None, param)
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + requested > max_model_len:
        raise context_overflow(max_model_len, num_prompt_tokens, requested, param)
    return requested


def sampling_params(request: SamplingFields, max_tokens: int, num_logprobs: int | None = None,
                    stop: tuple[str, ...] = (), seed_offset: int = 0, detokenize: bool = False) -> SamplingParams:
    """One sample's params. `seed_offset` separates the n samples of a seeded request."""
    seed = request.seed + seed_offset if request.seed is not None else None
    try:
        return SamplingParams(
            n=1,
            temperature=DEFAULT_TEMPERATURE if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            min_p=request.min_p or 0.0,
            seed=seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            max_tokens=max_tokens,
            stop=stop,
            ignore_eos=request.ignore_eos,
            logprobs=num_logprobs,
            detokenize=detokenize or bool(stop),
        )
    except SamplingParamsError as error:
        raise invalid_request(str(error)) from None


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 16:
        raise invalid_request("stop takes at most 16 strings.", param="stop")
    if any(not s for s in stops):
        raise invalid_request("stop strings must not be empty.", param="stop")
    return stops
