"""SGLang's request and response shapes (``python/sglang/srt/entrypoints/openai/protocol.py`` and
``managers/io_struct.py`` of SGLang 0.5.23).

SGLang's pydantic models ignore unknown fields (``extra="ignore"``), so vLLM-only fields sent to
these routes are dropped silently, as SGLang does.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SGLangModel(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# --- /v1/classify ---------------------------------------------------------------------------------


class ClassifyRequest(SGLangModel):
    model: str = Field("default", description="Accepted and not checked (SGLang serves one model).")
    input: str | list[str] | list[int] = Field(..., description="A text, a list of texts, or one token-id prompt.")
    user: str | None = None
    rid: str | list[str] | None = Field(None, description="Request id(s); not used in the response id.")
    priority: int | None = None
    lora_path: str | list[str | None] | None = Field(
        None, description="The LoRA adapter (by its lora_modules name) for every input, or one per input (null: "
        "the base model); null: the model `model` names.")


class ClassifyData(SGLangModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyUsage(SGLangModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None
    reasoning_tokens: int = 0
    completion_tokens_details: None = None


class ClassifyResponse(SGLangModel):
    id: str = Field(default_factory=lambda: f"classify-{secrets.token_hex(16)}")
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


# --- /v1/rerank -----------------------------------------------------------------------------------


class RerankRequest(SGLangModel):
    model: str | None = Field(
        None, description="Not in SGLang's API (it serves one model); here it picks among several served models. "
        "Absent: the first cross-encoder.")
    query: str = Field(..., description="The query.")
    documents: list[str] = Field(..., description="Documents to rank (a list; a bare string is a 400).")
    instruct: str | None = Field(None, description="Instruction for LLM-reranker templates (unused by cross-encoders).")
    top_n: int | None = Field(None, description="Return the best n (at least 1); null returns all.")
    return_documents: bool = Field(True, description="false leaves `document` out of each result.")
    long_documents: Literal["truncate", "max", "mean"] | None = Field(
        None, description="Not in SGLang's API (this adapter's, as on /rerank): a pair longer than the context "
        "length is refused (truncate), or its document cut into overlapping chunks whose max or mean score it gets. "
        "null: the model's long_documents parameter.")
    chunk_overlap_tokens: int | None = Field(
        None, ge=0, description="Tokens consecutive chunks share (as on /rerank); null: a quarter of a chunk's room.")

    @field_validator("top_n")
    @classmethod
    def _top_n_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("parameter top_n should be larger than 0.")
        return value


class RerankResult(SGLangModel):
    score: float
    document: str | None = None
    index: int
    meta_info: dict[str, Any] | None = None


# --- native /classify -----------------------------------------------------------------------------


class NativeEncodeRequest(SGLangModel):
    """SGLang's ``EmbeddingReqInput`` as its native ``/classify`` reads it (text models)."""

    model: str | None = Field(
        None, description="Not in SGLang's API (it serves one model); here it picks among several served models. "
        "Absent: the first classifier.")
    text: str | list[str] | list[list[str]] | None = Field(
        None, description="A text, a list of texts, or [query, document] pairs."
    )
    input_ids: list[int] | list[list[int]] | None = Field(None, description="One or several token-id prompts.")
    rid: str | list[str] | None = None
    priority: int | None = None
    lora_path: str | list[str | None] | None = Field(
        None, description="The LoRA adapter (by its lora_modules name) for every input, or one per input (null: "
        "the base model); null: the model `model` names.")
    dimensions: int | None = None
    sampling_params: dict[str, Any] | None = Field(None, description="Ignored (no generation).")


class NativeMetaInfo(SGLangModel):
    id: str
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    weight_version: str = "default"
    num_retractions: int = 0
    e2e_latency: float


class NativeEncodeResult(SGLangModel):
    embedding: list[float]
    meta_info: NativeMetaInfo


# --- /v1/tokenize, /v1/detokenize ----------------------------------------------------------------


class TokenizeRequest(SGLangModel):
    model: str = "default"
    prompt: str | list[str] = Field(..., description="A text or a list of texts.")
    add_special_tokens: bool = True


class TokenizeResponse(SGLangModel):
    tokens: list[int] | list[list[int]]
    count: int | list[int]
    max_model_len: int


class DetokenizeRequest(SGLangModel):
    model: str = "default"
    tokens: list[int] | list[list[int]]
    skip_special_tokens: bool = True


class DetokenizeResponse(SGLangModel):
    text: str | list[str]
