from fastapi import APIRouter, Depends, Request

from adapter.common.protocol import ERROR_RESPONSES, require_json, response_id
from adapter.dependencies import GatewayDep, RegistryDep, SettingsDep
from adapter.rerank.protocol import RerankRequest, RerankResponse
from adapter.rerank.service import rerank

router = APIRouter(tags=["rerank"])


@router.post("/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Rerank documents for a query (vLLM, Jina)")
@router.post("/v1/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Rerank (vLLM flavour)")
@router.post("/v2/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Rerank (Cohere v2 path)")
async def create_rerank(
    body: RerankRequest, raw: Request, registry: RegistryDep, gateway: GatewayDep, settings: SettingsDep
) -> RerankResponse:
    model = registry.resolve(body.model, capability="can_score")
    return await rerank(body, model, gateway, settings, response_id("score", raw, body.request_id))
