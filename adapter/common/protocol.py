"""Shapes shared by every vLLM-style endpoint."""

from __future__ import annotations

import secrets
import time

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field


def random_request_id() -> str:
    """16 hex characters, as vLLM's ``random_uuid``-based ids."""
    return secrets.token_hex(8)


def now() -> int:
    return int(time.time())


class OpenAIBaseModel(BaseModel):
    """vLLM accepts and ignores unknown fields (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class PoolingRequestBase(OpenAIBaseModel):
    """Fields every vLLM pooling request has."""

    model: str | None = Field(None, description="Served model name; null or absent: the served model for this task.")
    user: str | None = Field(None, description="Accepted and ignored.")
    request_id: str = Field(default_factory=random_request_id, description="Used in the response id.")
    priority: int = Field(0, description="Accepted; requests are served first come, first served.")
    use_activation: bool | None = Field(
        None, description="false returns raw logits (classifiers) or unnormalised similarity; null: the model's default."
    )


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: None = None
    completion_tokens_details: None = None

    @classmethod
    def of(cls, prompt_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "Invalid request (validation, empty input, over-long input)"},
    404: {"model": ErrorResponse, "description": "Unknown model, or a route the model does not offer"},
    500: {"model": ErrorResponse, "description": "Internal error"},
    503: {"model": ErrorResponse, "description": "Triton is unavailable or its queue is full"},
}


async def require_json(request: Request) -> None:
    """vLLM answers a non-JSON content type with a 400 validation error, not 415."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise RequestValidationError(["Unsupported Media Type: Only 'application/json' is allowed"])


def response_id(prefix: str, request: Request, request_id: str) -> str:
    """``prefix-<X-Request-Id header, else the body's request_id>``."""
    return f"{prefix}-{request.headers.get('x-request-id') or request_id}"
