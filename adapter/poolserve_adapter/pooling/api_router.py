"""``POST /pooling`` (vLLM)."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from poolserve_adapter.base.protocol import BYTES_RESPONSE, ERROR_RESPONSES, require_json
from poolserve_adapter.pooling.protocol import PoolingRequest, PoolingResponse
from poolserve_adapter.pooling.serving import serving_pooling

router = APIRouter(tags=["pooling"])


@router.post("/pooling", response_model=PoolingResponse, responses={**ERROR_RESPONSES, **BYTES_RESPONSE},
             dependencies=[Depends(require_json)], summary="Raw pooled outputs: class probabilities or embeddings (vLLM)")
async def create_pooling(body: PoolingRequest, raw: Request) -> PoolingResponse | Response:
    return await serving_pooling(body, raw)
