"""SGLang's OpenAI-style routes (flat error bodies) over the same Triton models.

``/v1/classify``, ``/v1/tokenize``, ``/v1/detokenize`` and SGLang's rerank under ``/sglang/v1/rerank``
(and under ``/v1/rerank`` when ``ADAPTER_RERANK_V1_FLAVOUR=sglang``); and SGLang's native ``/encode``.
SGLang does not check ``model``: a served name picks that model, anything else the first model able to
serve the route.
"""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from poolserve_adapter.base.dependencies import RegistryDep, SettingsDep
from poolserve_adapter.base.protocol import SGLANG_ERROR_RESPONSES, SGLANG_NATIVE_ERROR_RESPONSES, require_json
from poolserve_adapter.sglang import serving
from poolserve_adapter.sglang.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    NativeEncodeRequest,
    NativeEncodeResult,
    RerankRequest,
    RerankResult,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["sglang"])
v1_rerank_router = APIRouter(tags=["sglang"])

# Paths whose errors take SGLang's flat shape (read by poolserve_adapter.errors.flavour_of through app.state).
# /encode's own errors are SGLang's native {"error": {"message"}} (its serving says so); its validation
# errors are flat, as SGLang answers them.
SGLANG_PATHS = {"/v1/classify", "/sglang/v1/rerank", "/v1/tokenize", "/v1/detokenize", "/encode"}


@router.post("/v1/classify", response_model=ClassifyResponse, responses=SGLANG_ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Classify texts (SGLang: softmax over the logits)")
async def classify_v1(body: ClassifyRequest, raw: Request) -> ClassifyResponse:
    return await serving.serving_classify_v1(body, raw)


@router.post("/sglang/v1/rerank", response_model=list[RerankResult], responses=SGLANG_ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Rerank documents (SGLang: a bare list, raw logits)")
async def rerank_sglang(body: RerankRequest, raw: Request) -> Response:
    return await serving.serving_rerank(body, raw)


@v1_rerank_router.post("/v1/rerank", response_model=list[RerankResult], responses=SGLANG_ERROR_RESPONSES,
                       dependencies=[Depends(require_json)],
                       summary="Rerank (SGLang flavour, ADAPTER_RERANK_V1_FLAVOUR=sglang)")
async def rerank_v1(body: RerankRequest, raw: Request) -> Response:
    return await serving.serving_rerank(body, raw)


# SGLang accepts PUT on its rerank route too.
router.add_api_route("/sglang/v1/rerank", rerank_sglang, methods=["PUT"], include_in_schema=False,
                     dependencies=[Depends(require_json)])
v1_rerank_router.add_api_route("/v1/rerank", rerank_v1, methods=["PUT"], include_in_schema=False,
                               dependencies=[Depends(require_json)])


@router.post("/v1/tokenize", response_model=TokenizeResponse, responses=SGLANG_ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Tokenize (SGLang)")
async def tokenize_v1(body: TokenizeRequest, registry: RegistryDep, settings: SettingsDep) -> Response:
    model = registry.resolve_lenient(body.model, capability="can_tokenize")
    # JSON rendered by the service (in its worker thread when large), not by FastAPI on the event loop.
    return Response(await serving.tokenize(body, model, settings), media_type="application/json")


@router.post("/v1/detokenize", response_model=DetokenizeResponse, responses=SGLANG_ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Detokenize (SGLang)")
async def detokenize_v1(body: DetokenizeRequest, registry: RegistryDep, settings: SettingsDep) -> Response:
    model = registry.resolve_lenient(body.model, capability="can_tokenize")
    return Response(await serving.detokenize(body, model, settings), media_type="application/json")


@router.post("/encode", response_model=NativeEncodeResult | list[NativeEncodeResult],
             responses=SGLANG_NATIVE_ERROR_RESPONSES, dependencies=[Depends(require_json)],
             summary="Embed texts or token ids (SGLang native)",
             description="SGLang's `EmbeddingReqInput`: `text` (a text or a list) or `input_ids`; `dimensions` for "
             "Matryoshka models. One input: an object `{embedding, meta_info}`; a batch: a bare list of them.")
async def encode(body: NativeEncodeRequest, raw: Request) -> Response:
    return await serving.serving_native_encode(body, raw)


router.add_api_route("/encode", encode, methods=["PUT"], include_in_schema=False, dependencies=[Depends(require_json)])
