"""``POST /v1/embeddings`` (vLLM's OpenAI-compatible route)."""

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from poolserve_adapter.base.protocol import BYTES_RESPONSE, ERROR_RESPONSES, require_json
from poolserve_adapter.embeddings.protocol import EmbeddingRequest, EmbeddingResponse
from poolserve_adapter.embeddings.serving import serving_embedding

router = APIRouter(tags=["embeddings"])


@router.post(
    "/v1/embeddings", response_model=EmbeddingResponse, responses={**ERROR_RESPONSES, **BYTES_RESPONSE},
    dependencies=[Depends(require_json)], summary="Embed texts, token ids or a conversation (OpenAI / vLLM)",
    description="The OpenAI embeddings API as vLLM serves it: `input` (a text, texts, one token-id list or "
    "token-id lists) or `messages` (one conversation); `encoding_format` float, base64, bytes or bytes_only; "
    "`dimensions` for Matryoshka models; `use_activation` turns L2 normalisation on or off. A model that is not "
    "an embedding model answers 404 `{\"detail\": \"Not Found\"}` (vLLM registers no route for it).",
)
async def create_embedding(body: Annotated[EmbeddingRequest, Body()], raw: Request) -> Response:
    return await serving_embedding(body, raw)
