"""Text-embeddings-inference's routes: ``/embed``, ``/embed_all``, ``/embed_sparse``, ``/predict``, ``/info`` and its
``POST /``, which answers as the route of the default model's kind (TEI's; ``huggingface_hub.InferenceClient``
pointed at a URL posts there). TEI's ``/rerank`` body shares ``/rerank`` with vLLM's (``rerank/api_router.py``)."""

import orjson
from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter, ValidationError

from poolserve_adapter.base.dependencies import GatewayDep, RegistryDep, SettingsDep
from poolserve_adapter.base.protocol import UNAUTHORIZED, require_json
from poolserve_adapter.tei.embedding import serving_embed, serving_embed_all
from poolserve_adapter.tei.info import model_info, tei_route
from poolserve_adapter.tei.protocol import (
    EmbedAllRequest,
    EmbedRequest,
    EmbedSparseRequest,
    Info,
    Prediction,
    PredictRequest,
    RerankRequest,
    SparseValue,
)
from poolserve_adapter.tei.scoring import serving_predict, serving_tei_rerank
from poolserve_adapter.tei.serving import serving_embed_sparse

router = APIRouter(tags=["text-embeddings-inference"])

TEI_ERRORS = ("Errors take TEI's shape `{\"error\", \"error_type\"}`: 400 Empty, 422 Validation (invalid body, too "
              "many inputs, too long without `truncate`), 424 Backend (a model that cannot answer this route), 429 "
              "Overloaded, 503 Unhealthy.")

# TEI's route for each kind of model: its request body and serving.
ROUTES = {
    "predict": (TypeAdapter(PredictRequest), serving_predict),
    "rerank": (TypeAdapter(RerankRequest), serving_tei_rerank),
    "embed": (TypeAdapter(EmbedRequest), serving_embed),
    "embed_all": (TypeAdapter(EmbedAllRequest), serving_embed_all),
    "embed_sparse": (TypeAdapter(EmbedSparseRequest), serving_embed_sparse),
}


def tei_post(path: str, response_model, summary: str, description: str):
    return router.post(path, response_model=response_model, responses=UNAUTHORIZED,
                       dependencies=[Depends(require_json)], summary=summary, description=f"{description} {TEI_ERRORS}")


@tei_post("/embed", list[list[float]], "Embeddings (text-embeddings-inference)",
          "TEI's `/embed`: `inputs` (a text or texts), `normalize` (default true), `dimensions` (the first n numbers, "
          "cut before normalising), `truncate`, `truncation_direction`, `prompt_name`; one vector per text.")
async def embed(body: EmbedRequest, raw: Request) -> Response:
    return await serving_embed(body, raw)


@tei_post("/embed_all", list[list[list[float]]], "Every token's vector (text-embeddings-inference)",
          "TEI's `/embed_all` on a model with per-token vectors (ColBERT, BGE-M3): each text's tokens' vectors, "
          "special tokens included; `truncate`, `truncation_direction`, `prompt_name`.")
async def embed_all(body: EmbedAllRequest, raw: Request) -> Response:
    return await serving_embed_all(body, raw)


@tei_post("/embed_sparse", list[list[SparseValue]], "SPLADE sparse vectors (text-embeddings-inference)",
          "TEI's `/embed_sparse` on a SPLADE model (or BGE-M3's lexical weights): `inputs` (a text or texts), "
          "`truncate`, `truncation_direction` (Left / Right), `prompt_name`; each text's non-zero vocabulary "
          "entries `[{\"index\", \"value\"}]` in index order.")
async def embed_sparse(body: EmbedSparseRequest, raw: Request) -> Response:
    return await serving_embed_sparse(body, raw)


@tei_post("/predict", list[Prediction] | list[list[Prediction]], "Classify (text-embeddings-inference)",
          "TEI's `/predict` on a classifier or re-ranker: `inputs` a text, a pair `[text, text]` (one input) or a "
          "batch `[[text], [text, text], ...]`; `raw_scores` (logits instead of softmax / sigmoid), `truncate`, "
          "`truncation_direction`. Each input's `[{\"score\", \"label\"}]`, highest score first.")
async def predict(body: PredictRequest, raw: Request) -> Response:
    return await serving_predict(body, raw)


@router.get("/info", response_model=Info, responses=UNAUTHORIZED, summary="The default model (text-embeddings-inference)",
            description="TEI's `/info` of the default model: its id, dtype, served name, TEI kind "
            "(`classifier` / `reranker` with labels, `embedding` with pooling) and the request limits.")
async def info(registry: RegistryDep, settings: SettingsDep, gateway: GatewayDep) -> Response:
    return Response(orjson.dumps(await model_info(next(iter(registry)), settings, gateway)),
                    media_type="application/json")


@router.post("/", responses=UNAUTHORIZED, dependencies=[Depends(require_json)],
             summary="TEI's route of the default model's kind (text-embeddings-inference)",
             description="As TEI: /predict on a classifier, /rerank (TEI's body) on a re-ranker, /embed on an "
             "embedding model, /embed_sparse on a SPLADE model (here also /embed_all on a late-interaction model). "
             "The body's `model`, when served, picks the model instead of the default. " + TEI_ERRORS)
async def root(raw: Request, registry: RegistryDep,
               body: dict = Body(..., description="The body of the route the model's kind takes.")) -> Response:
    named = body.get("model")
    model = registry.named(named) if isinstance(named, str) else None
    model = model or next(iter(registry))
    adapter, serving = ROUTES[tei_route(model)]
    try:
        request: BaseModel = adapter.validate_python(body)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None
    return await serving.run(request, raw, model)
