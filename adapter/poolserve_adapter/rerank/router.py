from fastapi import APIRouter, Depends, Request

from poolserve_adapter.common.protocol import ERROR_RESPONSES, require_json, response_id
from poolserve_adapter.dependencies import GatewayDep, RegistryDep, SettingsDep
from poolserve_adapter.rerank.protocol import RerankRequest, RerankResponse
from poolserve_adapter.rerank.service import rerank

router = APIRouter(tags=["rerank"])
v1_rerank_router = APIRouter(tags=["rerank"])  # /v1/rerank, mounted when ADAPTER_RERANK_V1_FLAVOUR=vllm


async def create_rerank(
    body: RerankRequest, raw: Request, registry: RegistryDep, gateway: GatewayDep, settings: SettingsDep
) -> RerankResponse:
    model = registry.resolve(body.model, capability="can_score")
    return await rerank(body, model, gateway, settings, response_id("score", raw, body.request_id))


for path, summary, target in (
    ("/rerank", "Rerank documents for a query (vLLM, Jina)", router),
    ("/v2/rerank", "Rerank (Cohere v2 path, vLLM flavour)", router),
    ("/vllm/v1/rerank", "Rerank (vLLM flavour under its own path)", router),
    ("/v1/rerank", "Rerank (vLLM flavour, the default of ADAPTER_RERANK_V1_FLAVOUR)", v1_rerank_router),
):
    target.add_api_route(path, create_rerank, methods=["POST"], response_model=RerankResponse,
                         responses=ERROR_RESPONSES, dependencies=[Depends(require_json)], summary=summary,
                         operation_id=f"rerank_{path.strip('/').replace('/', '_')}")
