"""How one request is sampled and when it stops: a frozen dataclass, validated once where it enters."""

from __future__ import annotations

import dataclasses
import enum
import functools

# gpt-oss ends an assistant turn with <|return|> (final answer) or <|call|> (tool call); a raw completion ends
# with <|endoftext|>. The engine stops on all three unless told otherwise.
RETURN_TOKEN_ID, CALL_TOKEN_ID, ENDOFTEXT_TOKEN_ID = 200002, 200012, 199999
DEFAULT_STOP_TOKEN_IDS = (RETURN_TOKEN_ID, CALL_TOKEN_ID, ENDOFTEXT_TOKEN_ID)


class OutputKind(str, enum.Enum):
    CUMULATIVE = "cumulative"  # every step returns everything generated so far
    DELTA = "delta"  # every step returns only what is new (streaming)
    FINAL_ONLY = "final_only"  # one output, when the request finishes (offline generate)


class SamplingParamsError(ValueError):
    """A sampling parameter out of range or inconsistent with another."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # parallel samples of the same prompt; they share the prompt's cached blocks
    temperature: float = 1.0  # 0 = greedy (argmax), deterministic
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    seed: int | None = None  # a request-local generator: same seed, same prompt, same tokens
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and output tokens
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0  # stop tokens are masked out until this many tokens are generated
    stop: tuple[str, ...] = ()  # stop strings, cut from the text (even when they straddle tokens)
    stop_token_ids: tuple[int, ...] = ()  # stop tokens besides the defaults; they stay in token_ids
    ignore_eos: bool = False  # don't stop on DEFAULT_STOP_TOKEN_IDS (benchmarks; stop_token_ids still apply)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's logprob plus the top k
    skip_special_tokens: bool = True  # leave special tokens out of the text (they stay in token_ids)
    detokenize: bool = True
    output_kind: OutputKind = OutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        object.__setattr__(self, "output_kind", OutputKind(self.output_kind))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise SamplingParamsError(message)

        check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(_is_number(self.temperature) and self.temperature >= 0,
              f"temperature must be >= 0, got {self.temperature!r}")
        check(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be -1, 0 or positive, got {self.top_k!r}")
        check(_is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        check(self.seed is None or _is_int(self.seed), f"seed must be an integer or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check(_is_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
              f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        check(_is_int(self.min_tokens) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        check(all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop!r}")
        check(all(t >= 0 for t in self.stop_token_ids),
              f"stop_token_ids must be non-negative, got {self.stop_token_ids!r}")
        check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
              f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        check(not (self.stop and not self.detokenize), "stop strings need detokenize=True")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @functools.cached_property
    def all_stop_token_ids(self) -> frozenset[int]:
        """The ids that end the request once min_tokens is reached."""
        defaults = () if self.ignore_eos else DEFAULT_STOP_TOKEN_IDS
        return frozenset(self.stop_token_ids) | frozenset(defaults)

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
