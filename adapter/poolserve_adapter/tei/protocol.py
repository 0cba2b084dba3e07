"""TEI's request bodies and answers (``router/src/http/types.rs``; ``Info`` and ``ModelType``: ``router/src/lib.rs``).

TEI ignores fields it does not know (serde's default), and so do these bodies. Each takes one field TEI has not,
``model``: which served model answers (TEI serves one model; unset or unknown, the first able to answer)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

TruncationDirection = Literal["Left", "Right", "left", "right"]


class TeiRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    truncate: bool | None = Field(None, description="Cut an input longer than the model's maximum length instead "
                                  "of refusing it (null: TEI's --auto-truncate default, off).")
    truncation_direction: TruncationDirection = Field(
        "Right", description="The side truncation cuts (lower case accepted, as TEI's serde aliases).")
    model: str | None = Field(None, description="Not TEI's (it serves one model): which served model answers; "
                              "unset or unknown, the first able to.")

    @property
    def direction(self) -> str:
        return self.truncation_direction.lower()


class TextsRequest(TeiRequest):
    """A body whose ``inputs`` are a text or texts (TEI's token-id inputs are not taken)."""

    inputs: str | list[str] = Field(description="A text or texts.")
    prompt_name: str | None = Field(None, description="A key of the model's sentence-transformers `prompts`; its "
                                    "text is prepended to every input.")

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class EmbedSparseRequest(TextsRequest):
    """``/embed_sparse``'s body: TEI's ``EmbedSparseRequest``."""


class SparseValue(BaseModel):
    index: int
    value: float


class EmbedRequest(TextsRequest):
    normalize: bool = Field(True, description="L2-normalise each vector (after the `dimensions` cut).")
    dimensions: int | None = Field(None, ge=0, description="Keep the first `dimensions` numbers of each vector "
                                   "(any size up to the model's width, as TEI; null: all).")


class EmbedAllRequest(TextsRequest):
    """``/embed_all``'s body: TEI's ``EmbedAllRequest``."""


EXPECTED_INPUTS = ("expected a string, a pair of strings [string, string] or a batch of mixed strings and pairs "
                   "[[string], [string, string], ...]")  # serde's words for a PredictInput it cannot read


def predict_sequences(value: object) -> object:
    """TEI's ``PredictInput`` rule: a string is one input; a list whose first item is a string is ONE input, a
    text or a pair (``["a", "b"]`` is a pair, not a batch of two); a list of lists is a batch whose items hold
    one or two strings. Anything else is left for the schema to refuse."""
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], str):
        if len(value) > 2:
            raise ValueError(f"invalid length 3, {EXPECTED_INPUTS}")
        return tuple(value)
    lengths = [len(item) for item in value if isinstance(item, list)]
    wrong = next((length for length in lengths if not 1 <= length <= 2), None) if value else 0
    if wrong is not None:
        raise ValueError(f"invalid length {wrong}, {EXPECTED_INPUTS}")
    return value


class PredictRequest(TeiRequest):
    inputs: Annotated[str | tuple[str] | tuple[str, str] | list[tuple[str] | tuple[str, str]],
                      BeforeValidator(predict_sequences)] = Field(
        description="A text, a pair [text, text] (one input), or a batch [[text], [text, text], ...].")
    raw_scores: bool = Field(False, description="The raw logits; false: softmax over the labels (sigmoid for one).")

    @property
    def is_batch(self) -> bool:
        return isinstance(self.inputs, list)

    def sequences(self) -> list[str | tuple[str, str]]:
        """Each input as a text or a (text, text) pair."""
        items = self.inputs if self.is_batch else [self.inputs]
        return [item if isinstance(item, str) else item[0] if len(item) == 1 else item for item in items]


class Prediction(BaseModel):
    score: float
    label: str


class RerankRequest(TeiRequest):
    query: str
    texts: list[str]
    raw_scores: bool = Field(False, description="The raw logit of each pair; false: its sigmoid.")
    return_text: bool = Field(False, description="Echo each text in its rank.")


class ClassifierModel(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class EmbeddingModel(BaseModel):
    pooling: str


class ModelType(BaseModel):
    """Serde's externally tagged enum: exactly one key set."""

    classifier: ClassifierModel | None = None
    embedding: EmbeddingModel | None = None
    reranker: ClassifierModel | None = None


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_dtype: str
    served_model_name: str
    model_type: ModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None
