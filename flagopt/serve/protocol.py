"""The request bodies the server accepts (OpenAI's and vLLM's field names) and the error envelope.

Pydantic checks only the *types* of fields here; ranges are ``GenerationParams``' business
(one table of limits for the library and the server), so a bad value reads the same in both.
Every failure is an ``APIError`` that the app turns into OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
from typing import Union

from pydantic import BaseModel, ConfigDict, ValidationError

Prompt = Union[str, list[str], list[int], list[list[int]]]


class APIError(Exception):
    """An HTTP error in OpenAI's shape: status, message, the field at fault, a type."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions``: OpenAI's fields, then vLLM's extras. Unknown fields are
    ignored, as OpenAI's API and vLLM ignore them; fields flagopt cannot honour are refused
    by the app rather than ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # as vLLM: left out or null (lm-eval) is the served model
    prompt: Prompt
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = None


class ChatRequest(CompletionRequest):
    """``POST /v1/chat/completions``: ``messages`` instead of ``prompt``."""

    prompt: Prompt | None = None  # type: ignore[assignment]
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None  # type: ignore[assignment]
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """``body`` as ``model``, or a 400 ``APIError`` naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {first['msg']}") from None
        shown = f"{loc}: " if loc else ""
        raise APIError(400, f"{shown}{first['msg']} (got {first.get('input')!r:.80})",
                       param=loc) from None


_LEADING_NAME = re.compile(r"^([a-z_]+)")


def param_error(exc: Exception) -> APIError:
    """A 400 from a ``GenerationParams`` error; its message starts with the field's name."""
    match = _LEADING_NAME.match(str(exc))
    return APIError(400, str(exc), param=match.group(1) if match else None)
