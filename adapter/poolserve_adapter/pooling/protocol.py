"""vLLM ``POST /pooling`` (``vllm/entrypoints/pooling/pooling/protocol.py``), text models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from poolserve_adapter.base.embedding import EncodingFields
from poolserve_adapter.base.protocol import CompletionRequest, OpenAIBaseModel, UsageInfo, now, random_request_id


class PoolingRequest(EncodingFields, CompletionRequest):
    task: Literal["classify", "embed", "token_embed", "token_classify", "plugin"] | None = Field(
        None, description="The pooling task; null: the model's own (classify, embed, token_embed or token_classify)."
    )
    dimensions: int | None = Field(None, description="Not supported (a 400 when set), as vLLM's /pooling.")
    use_activation: bool | None = Field(
        None, description="Classifiers: false returns raw logits. Embedding models: L2 normalisation; null: the "
        "model's default. Late-interaction (token_embed) models: each token vector's L2 normalisation (default on). "
        "Token classifiers (token_classify): false returns every token's raw logits.")


class PoolingData(OpenAIBaseModel):
    index: int
    object: str = "pooling"
    data: list[float] | list[list[float]] | str  # a vector, a token matrix (token_embed, token_classify), or base64


class PoolingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"pooling-{random_request_id()}")
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[PoolingData]
    usage: UsageInfo
