"""``POST /v2/embed`` (Cohere's embed API, as vLLM serves it)."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from poolserve_adapter.base.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.cohere.protocol import CohereEmbedRequest, CohereEmbedResponse
from poolserve_adapter.cohere.serving import serving_cohere_embed

router = APIRouter(tags=["embeddings"])


@router.post("/v2/embed", response_model=CohereEmbedResponse, response_model_by_alias=True,
             responses=ERROR_RESPONSES, dependencies=[Depends(require_json)],
             summary="Embed texts (Cohere v2, as vLLM serves it)")
async def create_cohere_embedding(body: CohereEmbedRequest, raw: Request) -> Response:
    return await serving_cohere_embed(body, raw)
