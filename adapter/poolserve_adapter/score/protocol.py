"""vLLM ``POST /score`` (``vllm/entrypoints/pooling/scoring/protocol.py``).

vLLM accepts four spellings of the two sides, tried in this order: ``queries``/``documents``,
``queries``/``items``, ``data_1``/``data_2`` and the legacy ``text_1``/``text_2``. Each side is a
string or a list of strings.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from poolserve_adapter.base.protocol import OpenAIBaseModel, ScoreItem, ScoringFields, UsageInfo, now, random_request_id

ScoreInput = ScoreItem | list[ScoreItem]
SIDE_NAMES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoreRequest(ScoringFields):
    queries: ScoreInput | None = Field(None, description="Side 1 (with `documents` or `items`).")
    documents: ScoreInput | None = None
    items: ScoreInput | None = None
    data_1: ScoreInput | None = None
    data_2: ScoreInput | None = None
    text_1: ScoreInput | None = None
    text_2: ScoreInput | None = None

    @model_validator(mode="after")
    def _one_pair_of_sides(self) -> ScoreRequest:
        if self.sides() is None:
            raise ValueError(
                "Score needs both sides: queries/documents, queries/items, data_1/data_2 or text_1/text_2"
            )
        return self

    def sides(self) -> tuple[list[ScoreItem], list[ScoreItem]] | None:
        for first, second in SIDE_NAMES:
            left, right = getattr(self, first), getattr(self, second)
            if left is not None and right is not None:
                return as_list(left), as_list(right)
        return None


def as_list(side: ScoreInput) -> list[ScoreItem]:
    return list(side) if isinstance(side, list) else [side]


class ScoreData(OpenAIBaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"score-{random_request_id()}")
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[ScoreData]
    usage: UsageInfo
