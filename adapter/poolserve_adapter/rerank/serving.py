"""Rerank: score each document against the query, sort (stable, descending), keep ``top_n``.

Cohere v1 and Jina object documents are scored by their ``text``, or by the request's ``rank_fields`` as
``field: value`` lines in that order (the YAML form Cohere recommends for structured documents, and what
langchain-cohere sends); the object is echoed as sent. ``return_documents: false`` leaves ``document`` out
of the results.
"""

from __future__ import annotations

import orjson
from fastapi.responses import Response

from poolserve_adapter.base.protocol import MultiModalItem, ScoreItem
from poolserve_adapter.base.scoring import ScoringServing
from poolserve_adapter.base.serving import ServeContext
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.rerank.protocol import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    TextDocument,
)


def echo(document: str | MultiModalItem | TextDocument) -> RerankDocument:
    """vLLM's echo: a text as ``text``; a multimodal document's parts as ``multi_modal``, text null; an object
    document with all its fields."""
    if isinstance(document, str):
        return RerankDocument(text=document)
    if isinstance(document, TextDocument):
        return RerankDocument(**document.model_dump())
    return RerankDocument(text=None, multi_modal=document.content)


def ranked_text(document: TextDocument, rank_fields: list[str] | None, index: int) -> str:
    """The text an object document is scored by: ``text``, or each of ``rank_fields`` as a ``field: value``
    line (a value that is not a string in JSON)."""
    if not rank_fields:
        return document.text
    fields = document.model_dump()
    missing = next((name for name in rank_fields if name not in fields), None)
    if missing is not None:
        raise BadRequestError(f"Document {index} has no field {missing!r}, which rank_fields names.",
                              param="rank_fields")
    return "\n".join(f"{name}: {value if isinstance(value, str) else orjson.dumps(value).decode()}"
                     for name, value in ((name, fields[name]) for name in rank_fields))


def documents_of(request: RerankRequest) -> list[str | MultiModalItem | TextDocument]:
    documents = request.documents
    return list(documents) if isinstance(documents, list) else [documents]


class ServingRerank(ScoringServing):
    def sides(self, request: RerankRequest) -> tuple[list[ScoreItem], list[ScoreItem]]:
        return [request.query], [ranked_text(document, request.rank_fields, index)
                                 if isinstance(document, TextDocument) else document
                                 for index, document in enumerate(documents_of(request))]

    def item_count(self, request: RerankRequest) -> int:
        return len(documents_of(request))

    def respond(self, ctx: ServeContext[RerankRequest]) -> RerankResponse | Response:
        scores, documents = ctx.output.tolist(), documents_of(ctx.request)
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)  # sorted() is stable
        if 0 < ctx.request.top_n < len(order):
            order = order[: ctx.request.top_n]
        tokens = ctx.encoded.usage_tokens
        with_documents = ctx.request.return_documents is not False
        response = RerankResponse(
            id=ctx.response_id("score"),
            model=ctx.model.name,
            usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens),
            results=[RerankResult(index=i, document=echo(documents[i]) if with_documents else None,
                                  relevance_score=scores[i]) for i in order],
        )
        if with_documents:
            return response
        # Rendered here: the route's response model would write the absent document as null.
        return Response(orjson.dumps(response.model_dump(exclude={"results": {"__all__": {"document"}}})),
                        media_type="application/json")


serving_rerank = ServingRerank()
