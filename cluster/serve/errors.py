"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with a matching HTTP status.

An `APIError` is raised anywhere between the HTTP edge and the replica's request handlers; it is plain data so
that it can also travel from a replica to the ingress as a dict (`to_dict`/`from_dict`).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class APIError(Exception):
    status_code: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None  # sent as Retry-After on 429 and 503

    def __str__(self) -> str:
        return f"{self.status_code} {self.type}: {self.message}"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "APIError":
        return cls(**data)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, available: list[str]) -> APIError:
    return APIError(
        404, f"The model {model!r} does not exist. Served models: {', '.join(available) or 'none'}.",
        "invalid_request_error", "model", "model_not_found")


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, "invalid_request_error", param, "not_found")


def queue_full(message: str, retry_after_s: float = 1.0) -> APIError:
    return APIError(429, message, "rate_limit_error", None, "queue_full", retry_after_s)


def unavailable(message: str, retry_after_s: float = 5.0) -> APIError:
    return APIError(503, message, "service_unavailable", None, "model_not_ready", retry_after_s)


def internal_error(message: str) -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")


def context_overflow(max_model_len: int, num_prompt_tokens: int, max_tokens: int | None, param: str) -> APIError:
    """The prompt (plus the requested completion) does not fit the context window: name all the numbers."""
    if max_tokens is None:
        message = (f"The prompt is {num_prompt_tokens} tokens, which leaves no room to generate in this model's "
                   f"context window of {max_model_len} tokens.")
    else:
        message = (f"This model's context window is {max_model_len} tokens, but the request needs "
                   f"{num_prompt_tokens + max_tokens} ({num_prompt_tokens} prompt tokens + {max_tokens} "
                   f"completion tokens from {param}). Shorten the prompt or lower {param}.")
    return APIError(400, message, "invalid_request_error", param if max_tokens is not None else "messages",
                    "context_length_exceeded")
