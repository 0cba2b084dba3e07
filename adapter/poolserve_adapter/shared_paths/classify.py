from typing import Annotated

import orjson
from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from poolserve_adapter.classify.protocol import (
    ClassificationChatRequest,
    ClassificationCompletionRequest,
    ClassificationResponse,
    ClassifyBody,
)
from poolserve_adapter.classify.service import classify
from poolserve_adapter.common.protocol import ERROR_RESPONSES, require_json, response_id
from poolserve_adapter.dependencies import GatewayDep, RegistryDep, SettingsDep
from poolserve_adapter.errors import Flavour
from poolserve_adapter.sglang import service as sglang
from poolserve_adapter.sglang.protocol import NativeEncodeResult

router = APIRouter(tags=["classify"])


@router.post(
    "/classify",
    response_model=ClassificationResponse | NativeEncodeResult | list[NativeEncodeResult],
    responses=ERROR_RESPONSES,
    dependencies=[Depends(require_json)],
    summary="Classify texts (vLLM) or score with a reward model (SGLang native)",
    description="One path, two APIs, told apart by body shape: a body with `text` or `input_ids` (and neither "
    "`input` nor `messages`) is SGLang's native reward/classify request and gets the raw head output per input "
    "(`embedding` + `meta_info`; one input: an object, a batch: a list; errors `{\"error\": {\"message\"}}`). "
    "Anything else is vLLM's: `input` (completion form) or `messages` (chat form), labelled probabilities.",
)
async def create_classification(
    body: Annotated[ClassifyBody, Body()], raw: Request, registry: RegistryDep, gateway: GatewayDep,
    settings: SettingsDep,
):
    if isinstance(body, (ClassificationCompletionRequest, ClassificationChatRequest)):
        model = registry.resolve(body.model, capability="can_classify")
        return await classify(body, model, gateway, settings, response_id("classify", raw, body.request_id))
    return await classify_native(body, raw, registry, gateway, settings)


# SGLang registers its native /classify for PUT as well (the vLLM forms answer there too: one handler).
router.add_api_route("/classify", create_classification, methods=["PUT"], include_in_schema=False,
                     dependencies=[Depends(require_json)])


async def classify_native(body, raw: Request, registry, gateway, settings) -> Response:
    raw.state.flavour = Flavour.SGLANG_NATIVE
    model = registry.resolve_lenient(body.model, capability="can_classify", fallback="can_classify_or_embed")
    result = await sglang.classify_native(body, model, gateway, settings)
    content = [r.model_dump() for r in result] if isinstance(result, list) else result.model_dump()
    return Response(orjson.dumps(content), media_type="application/json")
