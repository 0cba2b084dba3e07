"""``/score``: one score per pair of the two sides (1:1, 1:N or N:N), over the shared pair scoring."""

from __future__ import annotations

from poolserve_adapter.base.protocol import ScoreItem, UsageInfo
from poolserve_adapter.base.scoring import ScoringServing
from poolserve_adapter.base.serving import ServeContext
from poolserve_adapter.score.protocol import ScoreData, ScoreRequest, ScoreResponse


class ServingScores(ScoringServing):
    def sides(self, request: ScoreRequest) -> tuple[list[ScoreItem], list[ScoreItem]]:
        return request.sides()

    def item_count(self, request: ScoreRequest) -> int:
        queries, documents = request.sides()
        return max(len(queries), len(documents))

    def respond(self, ctx: ServeContext[ScoreRequest]) -> ScoreResponse:
        return ScoreResponse(
            id=ctx.response_id("score"),
            model=ctx.model.name,
            data=[ScoreData(index=index, score=value) for index, value in enumerate(ctx.output.tolist())],
            usage=UsageInfo.of(ctx.encoded.usage_tokens),
        )


serving_scores = ServingScores()
