"""vLLM ``POST /rerank`` = ``/v1/rerank`` = ``/v2/rerank`` (Jina/Cohere-style), with the Cohere v1 and
Jina body fields their clients send: object documents, ``rank_fields`` and ``return_documents``."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, model_validator

from poolserve_adapter.base.protocol import (
    MultiModalItem,
    OpenAIBaseModel,
    ScoreItem,
    ScoringFields,
    random_request_id,
)


class TextDocument(OpenAIBaseModel):
    """A Cohere v1 (or Jina) object document: ``text`` and any other fields, all echoed as sent. Scored by
    its ``text``, or by the request's ``rank_fields``."""

    text: str

    @model_validator(mode="after")
    def _no_response_field(self):
        if "multi_modal" in (self.model_extra or {}):  # the echo's own field: it would be overwritten
            raise ValueError("a document object may not have a multi_modal field")
        return self


def document_kind(value: Any) -> str | None:
    """Which form a document has: an object with ``content`` is a multimodal item, any other object a
    text document."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, MultiModalItem) or (isinstance(value, dict) and "content" in value):
        return "multimodal"
    if isinstance(value, (TextDocument, dict)):
        return "object"
    return None


DocumentItem = Annotated[
    Annotated[str, Tag("text")] | Annotated[MultiModalItem, Tag("multimodal")] | Annotated[TextDocument, Tag("object")],
    Discriminator(document_kind, custom_error_type="document_type",
                  custom_error_message='A document is a text, an object with "text", or {"content": [parts]}'),
]


class RerankRequest(ScoringFields):
    query: ScoreItem = Field(..., description="One query: a text, or {\"content\": [parts]} (multimodal models).")
    documents: DocumentItem | list[DocumentItem] = Field(
        ..., description="Documents to rank: texts, objects with `text` and any other fields (Cohere v1, Jina; "
        "echoed as sent), or {\"content\": [parts]} items (multimodal models); one item is one document.")
    top_n: int = Field(0, ge=0, description="Return the best n; 0 (default) or null returns all.")
    rank_fields: list[str] | None = Field(
        None, description="Object documents (Cohere v1): score these fields, in this order, as `field: value` "
        "lines (a document without one of them is a 400); null: the `text` field. Text documents ignore it.")
    return_documents: bool | None = Field(
        None, description="false: results without `document` (Cohere v1, Jina); true or null: with it, as vLLM.")


class RerankDocument(OpenAIBaseModel):
    text: str | None
    multi_modal: list[dict] | None = None  # a multimodal document's content parts, echoed


class RerankResult(OpenAIBaseModel):
    index: int
    document: RerankDocument | None = Field(None, description="The document; absent when return_documents is false.")
    relevance_score: float


class RerankUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"score-{random_request_id()}")
    model: str
    usage: RerankUsage
    results: list[RerankResult]
