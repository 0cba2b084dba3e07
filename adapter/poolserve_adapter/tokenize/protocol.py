"""vLLM ``/tokenize`` and ``/detokenize`` (``vllm/entrypoints/serve/tokenize/protocol.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from poolserve_adapter.base.protocol import OpenAIBaseModel


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = Field(None, description="Not accepted per request (a 400 when set), as vLLM.")
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int] = Field(..., description="Token ids (each >= 0).")


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
