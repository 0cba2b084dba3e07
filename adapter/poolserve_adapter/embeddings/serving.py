"""``/v1/embeddings``: texts, token ids or one conversation → Triton ``embeddings`` (or ``pooled``) → one
vector per prompt, as floats, base64 strings or raw bytes (``ServingEmbedding`` of vLLM).

On a late-interaction (token_embed) model the route is vLLM's token-embedding one
(``token_embed/protocol.py::TokenEmbeddingRequest``): texts or token ids only, floats only, no
``dimensions``; each prompt's ``embedding`` is its ``[n_tokens][D]`` token vectors."""

from __future__ import annotations

import orjson
from fastapi.responses import Response

from poolserve_adapter.base.embedding import (
    EmbeddingPlan,
    base64_rows,
    bytes_response,
    check_dimensions,
    plan_embeddings,
    token_embedding_output,
    token_rows,
)
from poolserve_adapter.base.encoding import encode_prompts
from poolserve_adapter.base.protocol import now
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.embeddings.protocol import EmbeddingChatRequest, EmbeddingCompletionRequest
from poolserve_adapter.errors import InvalidFieldError
from poolserve_adapter.tokenization import Encoded

EmbeddingRequest = EmbeddingCompletionRequest | EmbeddingChatRequest


class ServingEmbedding(Serving[EmbeddingRequest]):
    capability = "can_embed_texts"

    @staticmethod
    def plan(ctx: ServeContext[EmbeddingRequest]) -> EmbeddingPlan:
        if ctx.model.task == "token_embed":
            return token_embedding_output(ctx.request.use_activation)
        return plan_embeddings(ctx.model, ctx.request.use_activation, ctx.request.dimensions)

    def validate(self, ctx: ServeContext[EmbeddingRequest]) -> None:
        if ctx.model.task == "token_embed":
            check_token_embedding_request(ctx.request)
        ctx.options = ctx.request.prompt_options(ctx.model.max_model_len, ctx.request.add_special_tokens)

    def item_count(self, request: EmbeddingRequest) -> int:
        return request.prompt_count()

    async def encode(self, ctx: ServeContext[EmbeddingRequest]) -> Encoded:
        encoded = await encode_prompts(ctx.model, ctx.request, ctx.options, ctx.settings)
        check_dimensions(ctx.model, ctx.request.dimensions)  # after tokenizing: vLLM's length errors come first
        return encoded

    def output_name(self, ctx: ServeContext[EmbeddingRequest]) -> str:
        return self.plan(ctx).output

    def respond(self, ctx: ServeContext[EmbeddingRequest]) -> Response:
        request, model = ctx.request, ctx.model
        if model.task == "token_embed":
            rows = token_rows(ctx.output, ctx.encoded.lengths)  # float only (validate): orjson writes the matrices
        else:
            rows = self.plan(ctx).finish(ctx.output)
        response_id, created, tokens = ctx.response_id("embd"), now(), ctx.encoded.num_tokens
        if request.encoding_format in ("bytes", "bytes_only"):
            return bytes_response(rows, request, response_id=response_id, created=created, model=model.name,
                                  prompt_tokens=tokens)
        vectors = list(rows) if request.encoding_format == "float" else base64_rows(rows, request.embed_dtype,
                                                                                      request.endianness)
        body = {
            "id": response_id, "object": "list", "created": created, "model": model.name,
            "data": [{"index": i, "object": "embedding", "embedding": vector} for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "completion_tokens_details": None},
        }
        # float32 arrays written by orjson: the shortest float32 digits, as vLLM's OPT_SERIALIZE_NUMPY writes them.
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def check_token_embedding_request(request: EmbeddingRequest) -> None:
    """What vLLM's TokenEmbeddingRequest refuses while parsing, as its validation errors: the chat form (the
    schema has no ``messages``, so ``input`` is missing), any encoding but float, any ``dimensions``."""
    if isinstance(request, EmbeddingChatRequest):
        raise InvalidFieldError("input", "missing", "Field required", request.model_dump(exclude_unset=True))
    if request.encoding_format != "float":
        raise InvalidFieldError("encoding_format", "literal_error", "Input should be 'float'",
                                request.encoding_format)
    if request.dimensions is not None:
        raise InvalidFieldError("dimensions", "none_required", "Input should be None", request.dimensions)


serving_embedding = ServingEmbedding()
