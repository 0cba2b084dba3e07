from fastapi import APIRouter, Depends, Request

from poolserve_adapter.common.protocol import ERROR_RESPONSES, require_json, response_id
from poolserve_adapter.dependencies import GatewayDep, RegistryDep, SettingsDep
from poolserve_adapter.pooling.protocol import PoolingRequest, PoolingResponse
from poolserve_adapter.pooling.service import pool

router = APIRouter(tags=["pooling"])


@router.post("/pooling", response_model=PoolingResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Raw pooled outputs: class probabilities or embeddings (vLLM)")
async def create_pooling(body: PoolingRequest, raw: Request, registry: RegistryDep, gateway: GatewayDep,
                         settings: SettingsDep) -> PoolingResponse:
    model = registry.resolve(body.model, capability="can_classify_or_embed")
    return await pool(body, model, gateway, settings, response_id("pooling", raw, body.request_id))
