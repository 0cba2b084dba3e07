"""vLLM ``POST /rerank`` = ``/v1/rerank`` = ``/v2/rerank`` (Jina/Cohere-style)."""

from __future__ import annotations

from pydantic import Field

from poolserve_adapter.base.protocol import OpenAIBaseModel, ScoreItem, ScoringFields, random_request_id


class RerankRequest(ScoringFields):
    query: ScoreItem = Field(..., description="One query: a text, or {\"content\": [parts]} (multimodal models).")
    documents: ScoreItem | list[ScoreItem] = Field(
        ..., description="Documents to rank: texts or {\"content\": [parts]} items; one item is one document.")
    top_n: int = Field(0, ge=0, description="Return the best n; 0 (default) returns all.")


class RerankDocument(OpenAIBaseModel):
    text: str | None
    multi_modal: list[dict] | None = None  # a multimodal document's content parts, echoed


class RerankResult(OpenAIBaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"score-{random_request_id()}")
    model: str
    usage: RerankUsage
    results: list[RerankResult]
