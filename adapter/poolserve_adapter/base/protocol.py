"""Shapes shared by every vLLM-style endpoint: the request fields all pooling requests have, the
completion (``input``) and chat (``messages``) prompt forms, the scoring fields of /score and
/rerank, usage, and the error bodies OpenAPI shows."""

from __future__ import annotations

import functools
import secrets
import time
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.tokenization import PromptOptions


def random_request_id() -> str:
    """16 hex characters, as vLLM's ``random_uuid``-based ids."""
    return secrets.token_hex(8)


def now() -> int:
    return int(time.time())


class OpenAIBaseModel(BaseModel):
    """vLLM accepts and ignores unknown fields (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


# The keys of a property's JSON schema that describe it rather than constrain its value.
SCHEMA_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's JSON schema that also admits null, written as pydantic writes ``X | None``."""
    if any(option.get("type") == "null" for option in schema.get("anyOf", ())):
        return schema
    annotations = {key: value for key, value in schema.items() if key in SCHEMA_ANNOTATIONS}
    value = {key: value for key, value in schema.items() if key not in SCHEMA_ANNOTATIONS}
    options = value["anyOf"] if set(value) == {"anyOf"} else [value]
    return {"anyOf": [*options, {"type": "null"}], **annotations}


class NullMeansDefault(BaseModel):
    """An explicit ``null`` for a field that has a default is that default, as if the field were absent.

    Cohere's SDK and the frameworks over it send every optional argument they were given, ``None`` as
    ``null`` (langchain-cohere's ``CohereRerank`` always sends ``"max_tokens_per_doc": null``, ``top_n``
    may be null); Jina's clients likewise. vLLM refuses these with a 400 (its fields are not nullable):
    accepting them is knowingly beyond vLLM. OpenAPI shows these fields nullable."""

    @classmethod
    @functools.cache
    def defaulted_fields(cls) -> frozenset[str]:
        """The names (and aliases) of the fields whose default is not null."""
        names = set()
        for name, field in cls.model_fields.items():
            if field.default_factory is not None or (not field.is_required() and field.default is not None):
                names.update(filter(None, (name, field.alias)))
        return frozenset(names)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaulted = cls.defaulted_fields()
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler.resolve_ref_schema(handler(core_schema))
        properties = schema.get("properties", {})
        for name in cls.defaulted_fields() & set(properties):
            properties[name] = nullable(properties[name])
        return schema


class PoolingRequestBase(OpenAIBaseModel):
    """Fields every vLLM pooling request has."""

    model: str | None = Field(None, description="Served model name; null or absent: the served model for this task.")
    user: str | None = Field(None, description="Accepted and ignored.")
    request_id: str = Field(default_factory=random_request_id, description="Used in the response id.")
    priority: int = Field(0, ge=-(2**63), le=2**63 - 1,
                          description="Accepted; requests are served first come, first served.")
    use_activation: bool | None = Field(
        None, description="false returns raw logits (classifiers) or unnormalised similarity; null: the model's default."
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1,
        description="null: a prompt longer than the model's maximum is a 400; -1: truncate to the maximum; k: keep k "
        "tokens (more than the maximum is a 400).",
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None,
        description="null: the tokenizer truncates and keeps its special tokens; right / left: keep the first / last "
        "k tokens of the full prompt, special tokens included.",
    )
    padding: Literal["max_length", "do_not_pad"] | None = Field(None, description="Accepted; the engine never pads.")
    mm_processor_kwargs: dict | None = Field(None, description="Not supported: a non-empty value is a 400.")
    cache_salt: str | None = Field(None, description="Accepted and ignored (there is no prefix cache).")

    @model_validator(mode="after")
    def _reject_unsupported(self):
        salt = self.cache_salt
        if salt is not None and (not salt or len(salt) > 128 or any(c in salt for c in "@/\\\x00")):
            raise ValueError("cache_salt must be 1 to 128 characters without '@', '/', '\\' or NUL")
        if self.mm_processor_kwargs:
            raise ValueError("mm_processor_kwargs is not supported by this server (text models only)")
        return self

    def prompt_options(self, max_model_len: int, add_special_tokens: bool = True) -> PromptOptions:
        return truncation_options(self.truncate_prompt_tokens, self.truncation_side, max_model_len, add_special_tokens)


def truncation_options(truncate_prompt_tokens: int | None, side: str | None, max_model_len: int,
                       add_special_tokens: bool = True) -> PromptOptions:
    """vLLM's truncation rules (``PoolingBaseServing._validate_request``): None keeps the whole prompt, -1
    truncates to ``max_model_len``, k keeps k tokens."""
    k = truncate_prompt_tokens
    if k is not None and k > max_model_len:
        raise BadRequestError(
            "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller truncation size."
        )
    if k == 0:
        raise BadRequestError("The decoder prompt cannot be empty")
    truncate_to = None if k is None else (max_model_len if k == -1 else k)
    return PromptOptions(add_special_tokens=add_special_tokens, truncate_to=truncate_to, side=side)


def reject_removed_parameters(body: dict) -> dict:
    """vLLM's 400s for parameters it removed (``reject_removed_pooling_parameters``, ``check_removed_pooling_task``)."""
    if isinstance(body, dict):
        if "normalize" in body:
            raise ValueError("Parameter `normalize` was removed; use `use_activation` instead.")
        if body.get("task") in ("score", "encode"):
            raise ValueError(f"The task `{body['task']}` was removed; use the pooling task of the model instead.")
    return body


class CompletionRequest(PoolingRequestBase):
    """The completion form: prompts in ``input`` (vLLM's ``CompletionRequestMixin``)."""

    _reject_removed = model_validator(mode="before")(staticmethod(reject_removed_parameters))

    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A text, a list of texts, one token-id prompt, or a list of token-id prompts."
    )
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (CLS/SEP, BOS...).")

    def prompt_count(self) -> int:
        """How many prompts ``input`` holds (one list of ids is one prompt)."""
        value = self.input
        return 1 if isinstance(value, str) or (value and isinstance(value[0], int)) else len(value)


class ChatRequest(PoolingRequestBase):
    """The chat form: one conversation rendered into one prompt (vLLM's ``ChatRequestMixin``)."""

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

    def prompt_count(self) -> int:
        return 1


class MultiModalItem(OpenAIBaseModel):
    """vLLM's ``ScoreMultiModalParam``: ``{"content": [parts]}`` with text and image_url parts."""

    content: list[dict[str, Any] | str]


ScoreItem = str | MultiModalItem


class ScoringFields(PoolingRequestBase, NullMeansDefault):
    """vLLM's ``ScoringRequestMixin``: shared by /score and /rerank; ``null`` is a field's default
    (:class:`NullMeansDefault`)."""

    max_tokens_per_query: int = Field(0, description="Cut the query to this many tokens first; 0: no limit.")
    max_tokens_per_doc: int = Field(0, description="Cut each document to this many tokens first; 0: no limit.")
    instruction: str | None = Field(
        None, description="For LLM-reranker score templates; cross-encoders read the text pair and ignore it."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="For score templates; the keys chat_template, tools and tokenize are reserved (400)."
    )
    long_documents: Literal["truncate", "max", "mean"] | None = Field(
        None, description="A pair longer than the model's window: truncate (vLLM's rule: cut with "
        "truncate_prompt_tokens, else a 400), or cut the document into overlapping chunks, each scored with the "
        "query, and return their max or mean score. null: the model's long_documents parameter (truncate).",
    )
    chunk_overlap_tokens: int | None = Field(
        None, ge=0, description="Tokens consecutive chunks of a document share (less than the room a chunk has "
        "beside the query); null: a quarter of that room.",
    )


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: None = None
    completion_tokens_details: None = None

    @classmethod
    def of(cls, prompt_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class SGLangErrorResponse(BaseModel):
    object: str = "error"
    message: str
    type: str
    param: str | None = None
    code: int


class NativeErrorMessage(BaseModel):
    message: str


class NativeErrorResponse(BaseModel):
    error: NativeErrorMessage


UNAUTHORIZED = {401: {"description": 'API key missing or wrong (when one is set): {"error": "Unauthorized"}'}}
TOO_LARGE = {413: {"description": "Request body larger than ADAPTER_MAX_BODY_BYTES"}}

SGLANG_ERROR_RESPONSES = {
    400: {"model": SGLangErrorResponse, "description": "Invalid request (validation, empty input, over-long input)"},
    500: {"model": SGLangErrorResponse, "description": "Internal error"},
    503: {"model": SGLangErrorResponse, "description": "Triton is unavailable or its queue is full"},
    **UNAUTHORIZED, **TOO_LARGE,
}

# The 200 of the routes with vLLM's bytes formats: JSON, or the raw rows (encoding_format bytes / bytes_only).
BYTES_RESPONSE = {200: {"content": {"application/octet-stream": {}},
                        "description": "encoding_format float / base64: JSON; bytes / bytes_only: the raw rows, "
                        "one after another (bytes: where each is in the `metadata` header)"}}

SGLANG_NATIVE_ERROR_RESPONSES = {
    400: {"model": NativeErrorResponse, "description": "Invalid request (empty input, over-long input, dimensions); "
          "validation errors take SGLang's flat shape"},
    404: {"description": 'No served model can serve the route: {"detail": "Not Found"}'},
    500: {"model": NativeErrorResponse, "description": "Internal error"},
    503: {"model": NativeErrorResponse, "description": "Triton is unavailable or its queue is full"},
    **UNAUTHORIZED, **TOO_LARGE,
}

ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "Invalid request (validation, empty input, over-long input), or "
          "a route the model (named, or the only one served) does not offer"},
    404: {"model": ErrorResponse, "description": 'Unknown model; a route no served model offers: {"detail": '
          '"Not Found"}'},
    500: {"model": ErrorResponse, "description": "Internal error"},
    503: {"model": ErrorResponse, "description": "Triton is unavailable or its queue is full"},
    **UNAUTHORIZED, **TOO_LARGE,
}


async def require_json(request: Request) -> None:
    """vLLM answers a non-JSON content type with a 400 validation error, not 415."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise RequestValidationError(["Unsupported Media Type: Only 'application/json' is allowed"])


def response_id(prefix: str, request: Request, request_id: str) -> str:
    """``prefix-<X-Request-Id header, else the body's request_id>``."""
    return f"{prefix}-{request.headers.get('x-request-id') or request_id}"
