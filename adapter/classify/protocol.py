"""vLLM ``POST /classify`` (``vllm/entrypoints/pooling/classify/protocol.py``)."""

from __future__ import annotations

from pydantic import Field

from adapter.common.protocol import OpenAIBaseModel, PoolingRequestBase, UsageInfo, now, random_request_id


class ClassificationRequest(PoolingRequestBase):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A text, a list of texts, one token-id prompt, or a list of token-id prompts."
    )


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
