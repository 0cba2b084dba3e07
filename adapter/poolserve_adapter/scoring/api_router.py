from fastapi import APIRouter, Depends, Request

from poolserve_adapter.common.protocol import ERROR_RESPONSES, require_json, response_id
from poolserve_adapter.dependencies import GatewayDep, RegistryDep, SettingsDep
from poolserve_adapter.score.protocol import ScoreRequest, ScoreResponse
from poolserve_adapter.score.service import score

router = APIRouter(tags=["score"])


@router.post("/score", response_model=ScoreResponse, responses=ERROR_RESPONSES, dependencies=[Depends(require_json)],
             summary="Score text pairs 1:1, 1:N or N:N (vLLM)")
@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], include_in_schema=False)
async def create_score(
    body: ScoreRequest, raw: Request, registry: RegistryDep, gateway: GatewayDep, settings: SettingsDep
) -> ScoreResponse:
    model = registry.resolve(body.model, capability="can_score")
    return await score(body, model, gateway, settings, response_id("score", raw, body.request_id))
