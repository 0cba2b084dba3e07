"""vLLM ``POST /classify`` (``vllm/entrypoints/pooling/classify/protocol.py``): the completion form
(``input``) and the chat form (``messages``). SGLang's native body on the same path is the sglang
slice's (``shared_paths/classify.py`` tells them apart)."""

from __future__ import annotations

from pydantic import Field

from poolserve_adapter.base.protocol import (
    ChatRequest,
    CompletionRequest,
    OpenAIBaseModel,
    UsageInfo,
    now,
    random_request_id,
)


# vLLM's names for the two forms on this path (OpenAPI shows them); the fields are the base's.
class ClassificationCompletionRequest(CompletionRequest):
    pass


class ClassificationChatRequest(ChatRequest):
    pass


class ClassificationData(OpenAIBaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"classify-{random_request_id()}")
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[ClassificationData]
    usage: UsageInfo
