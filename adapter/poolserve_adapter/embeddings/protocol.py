"""vLLM ``POST /v1/embeddings`` (``vllm/entrypoints/pooling/embed/protocol.py``): the completion form
(``input``: texts or token ids) and the chat form (``messages``: one conversation, one vector).

vLLM also takes a list of conversations (``messages`` as a list of lists, or conversations in
``input``); this server does not, and says so in a 400.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, model_validator

from poolserve_adapter.base.embedding import EncodingFields
from poolserve_adapter.base.protocol import ChatRequest, CompletionRequest, OpenAIBaseModel, now, random_request_id

BATCHED_CHAT_REFUSED = ("Chat-form embedding requests with several conversations (a list of lists in `messages`, "
                        "or messages in `input`) are not supported by this server: send one conversation in "
                        "`messages` per request")


def is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


class EmbeddingFields(EncodingFields):
    dimensions: int | None = Field(
        None, description="Matryoshka models: keep the first `dimensions` values (normalised again when "
        "normalisation is on); any value on another model is a 400.")
    use_activation: bool | None = Field(
        None, description="L2 normalisation; null: the model's default (on when its sentence-transformers "
        "modules end with Normalize).")


class EmbeddingCompletionRequest(EmbeddingFields, CompletionRequest):
    @model_validator(mode="before")
    @classmethod
    def _refuse_conversations_in_input(cls, body: Any) -> Any:
        value = body.get("input") if isinstance(body, dict) else None
        if is_message_list(value) or (isinstance(value, list) and value and all(map(is_message_list, value))):
            raise ValueError(BATCHED_CHAT_REFUSED)
        return body


class EmbeddingChatRequest(EmbeddingFields, ChatRequest):
    @model_validator(mode="before")
    @classmethod
    def _refuse_batched_conversations(cls, body: Any) -> Any:
        value = body.get("messages") if isinstance(body, dict) else None
        if isinstance(value, list) and value and all(isinstance(item, list) for item in value):
            raise ValueError(BATCHED_CHAT_REFUSED)
        return body


def embedding_body_kind(body: Any) -> str:
    if isinstance(body, dict):
        return "chat" if "messages" in body else "completion"
    return "chat" if isinstance(body, EmbeddingChatRequest) else "completion"


EmbeddingRequest = Annotated[
    Annotated[EmbeddingCompletionRequest, Tag("completion")] | Annotated[EmbeddingChatRequest, Tag("chat")],
    Discriminator(embedding_body_kind),
]


class EmbeddingData(OpenAIBaseModel):
    index: int
    object: str = "embedding"
    embedding: list[float] | str


class EmbeddingUsage(OpenAIBaseModel):
    """vLLM 0.34's ``UsageInfo`` as the embeddings route writes it (``prompt_tokens_details`` left out)."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    completion_tokens_details: None = None


class EmbeddingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"embd-{random_request_id()}")
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
