"""vLLM's rerank under ``/rerank``, ``/v2/rerank``, ``/vllm/v1/rerank`` and ``/v1/rerank`` (the last
mounted when ADAPTER_RERANK_V1_FLAVOUR=vllm)."""

from fastapi import APIRouter, Depends, Request

from poolserve_adapter.base.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.rerank.protocol import RerankRequest, RerankResponse
from poolserve_adapter.rerank.serving import serving_rerank

router = APIRouter(tags=["rerank"])
v1_rerank_router = APIRouter(tags=["rerank"])  # /v1/rerank, mounted when ADAPTER_RERANK_V1_FLAVOUR=vllm


async def create_rerank(body: RerankRequest, raw: Request) -> RerankResponse:
    return await serving_rerank(body, raw)


for path, summary, target in (
    ("/rerank", "Rerank documents for a query (vLLM, Jina)", router),
    ("/v2/rerank", "Rerank (Cohere v2 path, vLLM flavour)", router),
    ("/vllm/v1/rerank", "Rerank (vLLM flavour under its own path)", router),
    ("/v1/rerank", "Rerank (vLLM flavour, the default of ADAPTER_RERANK_V1_FLAVOUR)", v1_rerank_router),
):
    target.add_api_route(path, create_rerank, methods=["POST"], response_model=RerankResponse,
                         responses=ERROR_RESPONSES, dependencies=[Depends(require_json)], summary=summary,
                         operation_id=f"rerank_{path.strip('/').replace('/', '_')}")
