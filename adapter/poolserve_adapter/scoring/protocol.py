"""vLLM ``POST /score`` (``vllm/entrypoints/pooling/scoring/protocol.py``).

vLLM accepts four spellings of the two sides, tried in this order: ``queries``/``documents``,
``queries``/``items``, ``data_1``/``data_2`` and the legacy ``text_1``/``text_2``. Each side is a
string or a list of strings.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from poolserve_adapter.common.protocol import OpenAIBaseModel, PoolingRequestBase, UsageInfo, now, random_request_id


class MultiModalItem(OpenAIBaseModel):
    """vLLM's ``ScoreMultiModalParam``: ``{"content": [parts]}`` with text and image_url parts."""

    content: list[dict[str, Any] | str]


ScoreItem = str | MultiModalItem
ScoreInput = ScoreItem | list[ScoreItem]
SIDE_NAMES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoringFields(PoolingRequestBase):
    """vLLM's ``ScoringRequestMixin``: shared by /score and /rerank."""

    max_tokens_per_query: int = Field(0, description="Cut the query to this many tokens first; 0: no limit.")
    max_tokens_per_doc: int = Field(0, description="Cut each document to this many tokens first; 0: no limit.")
    instruction: str | None = Field(
        None, description="For LLM-reranker score templates; cross-encoders read the text pair and ignore it."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="For score templates; the keys chat_template, tools and tokenize are reserved (400)."
    )


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
