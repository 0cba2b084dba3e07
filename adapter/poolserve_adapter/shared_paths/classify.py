"""``POST /classify``: vLLM's two request forms and SGLang's native body share the path.

vLLM (``vllm/entrypoints/pooling/classify/protocol.py``): the completion form (``input``) and the
chat form (``messages``). SGLang (``http_server.py::classify_request``): its native reward API, an
``EmbeddingReqInput`` with ``text`` or ``input_ids``. Dispatch rule, by body shape: a body with
``text`` or ``input_ids`` and neither ``input`` nor ``messages`` is SGLang's; one with ``messages``
is vLLM chat; anything else is vLLM completion (so its validation errors are vLLM's).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import Discriminator, Tag

from poolserve_adapter.base.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.classify.protocol import (
    ClassificationChatRequest,
    ClassificationCompletionRequest,
    ClassificationResponse,
)
from poolserve_adapter.classify.serving import serving_classification
from poolserve_adapter.errors import SGLANG_NATIVE_TAG
from poolserve_adapter.sglang.protocol import NativeEncodeRequest, NativeEncodeResult
from poolserve_adapter.sglang.serving import serving_native_classify


def classify_body_kind(body: Any) -> str | None:
    if isinstance(body, dict):
        if ("text" in body or "input_ids" in body) and "input" not in body and "messages" not in body:
            return SGLANG_NATIVE_TAG
        return "chat" if "messages" in body else "completion"
    if isinstance(body, (ClassificationCompletionRequest, ClassificationChatRequest)):
        return "chat" if isinstance(body, ClassificationChatRequest) else "completion"
    if isinstance(body, NativeEncodeRequest):
        return SGLANG_NATIVE_TAG
    return None


ClassifyBody = Annotated[
    Annotated[ClassificationCompletionRequest, Tag("completion")]
    | Annotated[ClassificationChatRequest, Tag("chat")]
    | Annotated[NativeEncodeRequest, Tag(SGLANG_NATIVE_TAG)],
    Discriminator(classify_body_kind),
]

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
async def create_classification(body: Annotated[ClassifyBody, Body()], raw: Request):
    if isinstance(body, NativeEncodeRequest):
        return await serving_native_classify(body, raw)
    return await serving_classification(body, raw)


# SGLang registers its native /classify for PUT as well (the vLLM forms answer there too: one handler).
router.add_api_route("/classify", create_classification, methods=["PUT"], include_in_schema=False,
                     dependencies=[Depends(require_json)])
