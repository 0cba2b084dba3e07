from fastapi import APIRouter, Depends, Request

from adapter.classify.protocol import ClassificationRequest, ClassificationResponse
from adapter.classify.service import classify
from adapter.common.protocol import ERROR_RESPONSES, require_json, response_id
from adapter.dependencies import GatewayDep, RegistryDep, SettingsDep

router = APIRouter(tags=["classify"])


@router.post(
    "/classify",
    response_model=ClassificationResponse,
    responses=ERROR_RESPONSES,
    dependencies=[Depends(require_json)],
    summary="Classify texts (vLLM)",
)
async def create_classification(
    body: ClassificationRequest, raw: Request, registry: RegistryDep, gateway: GatewayDep, settings: SettingsDep
) -> ClassificationResponse:
    model = registry.resolve(body.model, capability="can_classify")
    return await classify(body, model, gateway, settings, response_id("classify", raw, body.request_id))
