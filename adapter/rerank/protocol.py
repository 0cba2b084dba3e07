"""vLLM ``POST /rerank`` = ``/v1/rerank`` = ``/v2/rerank`` (Jina/Cohere-style)."""

from __future__ import annotations

from pydantic import Field

from adapter.common.protocol import OpenAIBaseModel, random_request_id
from adapter.score.protocol import ScoringFields


class RerankRequest(ScoringFields):
    query: str = Field(..., description="One query.")
    documents: str | list[str] = Field(..., description="Documents to rank; a bare string is one document.")
    top_n: int = Field(0, ge=0, description="Return the best n; 0 (default) returns all.")


class RerankDocument(OpenAIBaseModel):
    text: str | None
    multi_modal: None = None


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
