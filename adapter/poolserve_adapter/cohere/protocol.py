"""Cohere's ``POST /v2/embed`` as vLLM serves it (``CohereEmbedRequest`` of
``vllm/entrypoints/pooling/embed/protocol.py``): a plain pydantic model, so unknown keys are ignored. An
explicit ``null`` is a field's default, as the Cohere SDK sends the ``None`` it is given (beyond vLLM, which
refuses it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from poolserve_adapter.base.protocol import NullMeansDefault

EmbeddingType = Literal["float", "binary", "ubinary", "base64"]


class CohereModel(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class CohereImageUrl(CohereModel):
    url: str | None = None


class CohereEmbedContent(CohereModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: CohereImageUrl | None = None

    @model_validator(mode="after")
    def _has_its_value(self):
        if self.type == "text" and self.text is None:
            raise ValueError("CohereEmbedContent with type='text' requires text")
        if self.type == "image_url" and not (self.image_url and self.image_url.url):
            raise ValueError("CohereEmbedContent with type='image_url' requires image_url.url")
        return self


class CohereEmbedInput(CohereModel):
    content: list[CohereEmbedContent]


class CohereEmbedRequest(CohereModel, NullMeansDefault):
    model: str | None = Field(None, description="Served model name; null: the first embedding model.")
    input_type: str | None = Field(
        None, description="A name of the model's sentence-transformers prompts (config_sentence_transformers.json "
        "`prompts`): that prompt is put before every text. A name the model does not define is a 400.")
    texts: list[str] | None = Field(None, description="The texts to embed.")
    images: list[str] | None = Field(None, description="Image data URIs: refused (the served embedders read text).")
    inputs: list[CohereEmbedInput] | None = Field(
        None, description="Inputs of content parts; the text parts of one input are embedded as one text, joined "
        "by newlines. Image parts are refused.")
    output_dimension: int | None = Field(None, description="Matryoshka models: keep the first values (as vLLM's "
                                         "`dimensions`).")
    embedding_types: list[EmbeddingType] = Field(
        default_factory=lambda: ["float"], description="float, binary (bits packed, minus 128), ubinary (bits "
        "packed) and base64 (little-endian float32). int8 and uint8 are a 400, as vLLM.")
    truncate: Literal["NONE", "START", "END"] = Field(
        "END", description="END / START: keep the first / last max_tokens tokens (the model's maximum without "
        "max_tokens); NONE: a text longer than max_tokens (or the model's maximum) is a 400.")
    max_tokens: int | None = Field(None, ge=-1, description="END / START: the most tokens a text keeps (null, 0 "
                                   "or -1: the model's maximum); NONE: the most tokens a text may have.")
    priority: int = Field(0, description="Accepted; requests are served first come, first served.")

    @model_validator(mode="after")
    def _one_input_kind(self):
        given = [value for value in (self.texts, self.images, self.inputs) if value is not None]
        if len(given) != 1 or not given[0]:
            raise ValueError("Exactly one of texts, images, or inputs must be provided, and it must be non-empty")
        return self


class CohereApiVersion(CohereModel):
    version: str = "2"


class CohereBilledUnits(CohereModel):
    input_tokens: int
    image_tokens: int = 0


class CohereMeta(CohereModel):
    api_version: CohereApiVersion = Field(default_factory=CohereApiVersion)
    billed_units: CohereBilledUnits


class CohereEmbeddings(CohereModel):
    float_: list[list[float]] | None = Field(None, alias="float")
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereEmbedResponse(CohereModel):
    """Only the requested types appear in ``embeddings``; ``texts`` echoes ``texts`` only."""

    id: str
    embeddings: CohereEmbeddings
    texts: list[str] | None = None
    meta: CohereMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
