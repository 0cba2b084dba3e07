"""Rerank: score each document against the query, sort (stable, descending), keep ``top_n``."""

from __future__ import annotations

from poolserve_adapter.common.protocol import check_item_count
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.rerank.protocol import RerankDocument, RerankRequest, RerankResponse, RerankResult, RerankUsage
from poolserve_adapter.score.service import score_pairs, template_variables, truncate_sides
from poolserve_adapter.settings import Settings
from poolserve_adapter.triton_gateway import TritonGateway


def echo(document) -> RerankDocument:
    """vLLM's echo: a text as ``text``; a multimodal document's parts as ``multi_modal``, text null."""
    if isinstance(document, str):
        return RerankDocument(text=document)
    return RerankDocument(text=None, multi_modal=document.content)


async def rerank(
    request: RerankRequest, model: ServedModel, gateway: TritonGateway, settings: Settings, response_id: str
) -> RerankResponse:
    documents = list(request.documents) if isinstance(request.documents, list) else [request.documents]
    check_item_count(len(documents), settings.max_items_per_request)
    gateway.refuse_if_busy(model.triton_model)  # before truncate_sides tokenizes
    query, truncated = await truncate_sides(request, model, [request.query], documents)
    scores, prompt_tokens = await score_pairs(
        model, query, truncated, gateway, settings, request.use_activation,
        options=request.prompt_options(model.max_model_len), template_variables=template_variables(request),
    )
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)  # sorted() is stable
    if 0 < request.top_n < len(order):
        order = order[: request.top_n]
    return RerankResponse(
        id=response_id,
        model=model.name,
        usage=RerankUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        results=[
            RerankResult(index=i, document=echo(documents[i]), relevance_score=scores[i]) for i in order
        ],
    )
