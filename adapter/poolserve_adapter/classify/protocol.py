"""``POST /classify``: vLLM's two request forms and SGLang's native body share the path.

vLLM (``vllm/entrypoints/pooling/classify/protocol.py``): the completion form (``input``) and the
chat form (``messages``). SGLang (``http_server.py::classify_request``): its native reward API, an
``EmbeddingReqInput`` with ``text`` or ``input_ids``. Dispatch rule, by body shape: a body with
``text`` or ``input_ids`` and neither ``input`` nor ``messages`` is SGLang's; one with ``messages``
is vLLM chat; anything else is vLLM completion (so its validation errors are vLLM's).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, model_validator

from poolserve_adapter.common.protocol import (
    OpenAIBaseModel,
    PoolingRequestBase,
    UsageInfo,
    now,
    random_request_id,
    reject_removed_parameters,
)
from poolserve_adapter.errors import SGLANG_NATIVE_TAG
from poolserve_adapter.sglang.protocol import NativeEncodeRequest


class ClassificationCompletionRequest(PoolingRequestBase):
    _reject_removed = model_validator(mode="before")(staticmethod(reject_removed_parameters))

    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A text, a list of texts, one token-id prompt, or a list of token-id prompts."
    )
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (CLS/SEP, BOS...).")


class ClassificationChatRequest(PoolingRequestBase):
    _reject_removed = model_validator(mode="before")(staticmethod(reject_removed_parameters))

    messages: list[dict[str, Any]] = Field(
        ..., description="A conversation, rendered with the model's chat template into one prompt."
    )
    add_special_tokens: bool = Field(
        False, description="Off by default: the chat template already writes the special tokens."
    )
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = Field(None, description="Not accepted per request (a 400 when set), as vLLM.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra variables for the chat template.")


def classify_body_kind(body: Any) -> str | None:
    if isinstance(body, dict):
        if ("text" in body or "input_ids" in body) and "input" not in body and "messages" not in body:
            return SGLANG_NATIVE_TAG
        return "chat" if "messages" in body else "completion"
    if isinstance(body, (ClassificationCompletionRequest, ClassificationChatRequest)):
        return "chat" if isinstance(body, ClassificationChatRequest) else "completion"
    if isinstance(body, NativeEncodeRequest):
        return SGLANG_NATIVE_TAG
    return None


ClassifyBody = Annotated[
    Annotated[ClassificationCompletionRequest, Tag("completion")]
    | Annotated[ClassificationChatRequest, Tag("chat")]
    | Annotated[NativeEncodeRequest, Tag(SGLANG_NATIVE_TAG)],
    Discriminator(classify_body_kind),
]


class ClassificationData(OpenAIBaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"classify-{random_request_id()}")
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[ClassificationData]
    usage: UsageInfo
