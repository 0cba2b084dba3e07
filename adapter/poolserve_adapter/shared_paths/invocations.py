"""``POST /invocations`` (SageMaker): one path, routed by body shape as vLLM does.

vLLM validates the body against each request type its model serves and dispatches to the first
that fits. Here, by the keys that tell those types apart: ``query`` + ``documents`` → rerank;
``queries`` / ``data_1`` / ``text_1`` → score; ``task`` or ``encoding_format`` → pooling;
``input`` / ``messages`` → classify on a classifier, pooling (embed) on an embedding model.
"""

import orjson
from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError

from poolserve_adapter.base.dependencies import RegistryDep
from poolserve_adapter.base.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.classify.protocol import ClassificationChatRequest, ClassificationCompletionRequest
from poolserve_adapter.classify.serving import serving_classification
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.pooling.protocol import PoolingRequest
from poolserve_adapter.pooling.serving import serving_pooling
from poolserve_adapter.rerank.protocol import RerankRequest
from poolserve_adapter.rerank.serving import serving_rerank
from poolserve_adapter.score.protocol import ScoreRequest
from poolserve_adapter.score.serving import serving_scores

router = APIRouter(tags=["invocations"])

# Each kind of body: its request type and the serving that answers it.
KINDS = {
    "rerank": (TypeAdapter(RerankRequest), serving_rerank),
    "score": (TypeAdapter(ScoreRequest), serving_scores),
    "pooling": (TypeAdapter(PoolingRequest), serving_pooling),
    "classify": (TypeAdapter(ClassificationCompletionRequest), serving_classification),
    "chat": (TypeAdapter(ClassificationChatRequest), serving_classification),
}


def invocation_kind(body: dict) -> str:
    if "query" in body and "documents" in body:
        return "rerank"
    if any(key in body for key in ("queries", "data_1", "text_1")):
        return "score"
    if "task" in body or "encoding_format" in body:
        return "pooling"
    if "messages" in body:
        return "chat"
    if "input" in body:
        return "classify"
    raise BadRequestError("Cannot find a suitable request type for this body: send a classify (input or messages), "
                          "score (queries/documents), rerank (query/documents) or pooling (input + task) request")


@router.post("/invocations", responses=ERROR_RESPONSES, dependencies=[Depends(require_json)],
             summary="SageMaker entry point: classify, score, rerank or pooling, by body shape (vLLM)")
async def invocations(raw: Request, registry: RegistryDep,
                      body: dict = Body(..., description="A /classify, /score, /rerank or /pooling request body.")):
    kind = invocation_kind(body)
    name = body.get("model") if isinstance(body.get("model"), str) else None  # a wrong type fails validation
    if kind in ("classify", "chat", "pooling"):
        model = registry.resolve(name, capability="can_classify_or_embed")
        if kind == "classify" and model.task != "classify":
            kind = "pooling"  # an embedding or token-level model has no classify: the body is served as pooling
        if kind == "chat" and model.task != "classify":
            raise BadRequestError("The chat form is served for classifiers only")
    else:
        model = registry.resolve(name, capability="can_score")
    adapter, serving = KINDS[kind]
    try:
        request = adapter.validate_python(body)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None
    result = await serving.run(request, raw, model)
    if isinstance(result, Response):  # pooling's bytes formats: the body is already rendered
        return result
    return Response(orjson.dumps(result.model_dump()), media_type="application/json")
