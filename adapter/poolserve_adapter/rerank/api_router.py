"""vLLM's rerank under ``/rerank``, ``/v2/rerank``, ``/vllm/v1/rerank`` and ``/v1/rerank`` (the last
mounted when ADAPTER_RERANK_V1_FLAVOUR=vllm).

``/rerank`` also takes text-embeddings-inference's body, told apart by its shape: a body with ``texts`` and no
``documents`` is TEI's (``query`` + ``texts``), answered by the tei slice in TEI's shape and errors; any other body
is vLLM's, exactly as before."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import Discriminator, Tag

from poolserve_adapter.base.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.errors import TEI_RERANK_TAG, VLLM_RERANK_TAG
from poolserve_adapter.rerank.protocol import RerankRequest, RerankResponse
from poolserve_adapter.rerank.serving import serving_rerank
from poolserve_adapter.tei.protocol import RerankRequest as TeiRerankRequest
from poolserve_adapter.tei.scoring import serving_tei_rerank

router = APIRouter(tags=["rerank"])
v1_rerank_router = APIRouter(tags=["rerank"])  # /v1/rerank, mounted when ADAPTER_RERANK_V1_FLAVOUR=vllm


async def create_rerank(body: RerankRequest, raw: Request) -> RerankResponse:
    return await serving_rerank(body, raw)


def rerank_body_kind(body: Any) -> str:
    if isinstance(body, TeiRerankRequest) or (isinstance(body, dict) and "texts" in body and "documents" not in body):
        return TEI_RERANK_TAG
    return VLLM_RERANK_TAG


RerankBody = Annotated[
    Annotated[RerankRequest, Tag(VLLM_RERANK_TAG)] | Annotated[TeiRerankRequest, Tag(TEI_RERANK_TAG)],
    Discriminator(rerank_body_kind),
]


@router.post(
    "/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES,
    dependencies=[Depends(require_json)], summary="Rerank documents for a query (vLLM, Jina; TEI's body)",
    description="vLLM's rerank (`query`, `documents`, `top_n`, ...). A body with `texts` and no `documents` is "
    "text-embeddings-inference's (`query`, `texts`, `raw_scores`, `return_text`, `truncate`, "
    "`truncation_direction`) and gets TEI's answer, a bare list `[{\"index\", \"text\"?, \"score\"}]`, highest "
    "score first, on a re-ranker (a classifier with one label); its errors take TEI's shape "
    "`{\"error\", \"error_type\"}`.",
    operation_id="rerank_rerank",
)
async def rerank_either(body: Annotated[RerankBody, Body()], raw: Request):
    if isinstance(body, TeiRerankRequest):
        return await serving_tei_rerank(body, raw)
    return await serving_rerank(body, raw)


for path, summary, target in (
    ("/v2/rerank", "Rerank (Cohere v2 path, vLLM flavour)", router),
    ("/vllm/v1/rerank", "Rerank (vLLM flavour under its own path)", router),
    ("/v1/rerank", "Rerank (vLLM flavour, the default of ADAPTER_RERANK_V1_FLAVOUR)", v1_rerank_router),
):
    target.add_api_route(path, create_rerank, methods=["POST"], response_model=RerankResponse,
                         responses=ERROR_RESPONSES, dependencies=[Depends(require_json)], summary=summary,
                         operation_id=f"rerank_{path.strip('/').replace('/', '_')}")
