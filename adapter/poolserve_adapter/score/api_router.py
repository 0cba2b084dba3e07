"""``POST /score`` (also ``/v1/score``, not in the schema), vLLM."""

from fastapi import APIRouter, Depends, Request

from poolserve_adapter.base.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.score.protocol import ScoreRequest, ScoreResponse
from poolserve_adapter.score.serving import serving_scores

router = APIRouter(tags=["score"])


@router.post("/score", response_model=ScoreResponse, responses=ERROR_RESPONSES, dependencies=[Depends(require_json)],
             summary="Score text pairs 1:1, 1:N or N:N (vLLM)")
@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], include_in_schema=False)
async def create_score(body: ScoreRequest, raw: Request) -> ScoreResponse:
    return await serving_scores(body, raw)
