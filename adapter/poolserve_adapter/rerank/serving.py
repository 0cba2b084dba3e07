"""Rerank: score each document against the query, sort (stable, descending), keep ``top_n``."""

from __future__ import annotations

from poolserve_adapter.base.protocol import ScoreItem
from poolserve_adapter.base.scoring import ScoringServing
from poolserve_adapter.base.serving import ServeContext
from poolserve_adapter.rerank.protocol import RerankDocument, RerankRequest, RerankResponse, RerankResult, RerankUsage


def echo(document: ScoreItem) -> RerankDocument:
    """vLLM's echo: a text as ``text``; a multimodal document's parts as ``multi_modal``, text null."""
    if isinstance(document, str):
        return RerankDocument(text=document)
    return RerankDocument(text=None, multi_modal=document.content)


class ServingRerank(ScoringServing):
    def sides(self, request: RerankRequest) -> tuple[list[ScoreItem], list[ScoreItem]]:
        documents = request.documents
        return [request.query], (list(documents) if isinstance(documents, list) else [documents])

    def item_count(self, request: RerankRequest) -> int:
        return len(self.sides(request)[1])

    def respond(self, ctx: ServeContext[RerankRequest]) -> RerankResponse:
        scores, documents = ctx.output.tolist(), self.sides(ctx.request)[1]
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)  # sorted() is stable
        if 0 < ctx.request.top_n < len(order):
            order = order[: ctx.request.top_n]
        tokens = ctx.encoded.usage_tokens
        return RerankResponse(
            id=ctx.response_id("score"),
            model=ctx.model.name,
            usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens),
            results=[RerankResult(index=i, document=echo(documents[i]), relevance_score=scores[i]) for i in order],
        )


serving_rerank = ServingRerank()
