"""``POST /embed_sparse`` (text-embeddings-inference)."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from poolserve_adapter.base.protocol import UNAUTHORIZED, require_json
from poolserve_adapter.tei.protocol import EmbedSparseRequest, SparseValue
from poolserve_adapter.tei.serving import serving_embed_sparse

router = APIRouter(tags=["embeddings"])


@router.post(
    "/embed_sparse", response_model=list[list[SparseValue]], responses=UNAUTHORIZED,
    dependencies=[Depends(require_json)], summary="SPLADE sparse vectors (text-embeddings-inference)",
    description="TEI's `/embed_sparse` on a SPLADE model: `inputs` (a text or texts), `truncate`, "
    "`truncation_direction` (Left / Right), `prompt_name`; each text's non-zero vocabulary entries "
    "`[{\"index\", \"value\"}]` in index order. Errors take TEI's shape `{\"error\", \"error_type\"}`: 400 Empty "
    "(no inputs, an empty text), 422 Validation (invalid body, too many inputs, too long without `truncate`, "
    "unknown `prompt_name`), 424 Backend (the model is not a SPLADE model), 429 Overloaded, 503 Unhealthy.",
)
async def embed_sparse(body: EmbedSparseRequest, raw: Request) -> Response:
    return await serving_embed_sparse(body, raw)
