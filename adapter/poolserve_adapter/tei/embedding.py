"""TEI's ``/embed`` and ``/embed_all``, as ``router/src/http/server.rs`` and ``core/src/infer.rs`` answer them.

``/embed``: one vector per text, ``[[f32]]`` (a single text too), from the model's pooled output as it is (never
normalised: TEI normalises itself), cut to ``dimensions`` first (any size up to the width; TEI has no Matryoshka
list) and then L2-normalised unless ``normalize`` is false. A SPLADE model answers its vocabulary-wide vector,
and only with ``normalize: false``. Checks in TEI's order: the batch (empty 400, too many 422), ``normalize`` on a
SPLADE model (424), ``dimensions: 0`` (422), the model not an embedding model (424), each text (empty,
``prompt_name``, too long), then ``dimensions`` over the width (422).

``/embed_all``: every token's vector, special tokens included, ``[[[f32]]]``. TEI answers it from the last hidden
states of any embedding model; here the models with a per-token output answer it: late-interaction models
(ColBERT) and BGE-M3, from their projected token vectors (``token_projected``, not normalised). A dense embedder
has no per-token output and answers a 424 saying so, a SPLADE model TEI's 424, a classifier TEI's
``Model is not an embedding model``."""

from __future__ import annotations

import orjson
from fastapi.responses import Response

from poolserve_adapter.base.embedding import EmbeddingPlan, token_rows
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.errors import Flavour
from poolserve_adapter.registry import ModelRegistry, ServedModel
from poolserve_adapter.tei.protocol import EmbedAllRequest, EmbedRequest
from poolserve_adapter.tei.serving import (
    VALIDATION,
    backend_error,
    check_batch,
    refuse_empty,
    tokenized_texts,
    validation_error,
)
from poolserve_adapter.tokenization import Encoded

NOT_EMBEDDING = "Model is not an embedding model"


def has_token_vectors(model: ServedModel) -> bool:
    """A model with a per-token vector output: late interaction (ColBERT), or BGE-M3's multi-vector side."""
    return "token_embed" in model.pooling_tasks


def refuse_non_embedding(model: ServedModel) -> None:
    if model.task not in ("embed", "token_embed"):
        raise backend_error(NOT_EMBEDDING)


class ServingEmbed(Serving[EmbedRequest]):
    capability = "can_embed"
    # TEI serves one model: the one named when it is served, else the first embedder, else any model (which then
    # answers TEI's 424).
    lenient = True
    fallback = "can_tokenize"
    flavour = Flavour.TEI

    @staticmethod
    def plan(ctx: ServeContext[EmbedRequest]) -> EmbeddingPlan:
        output = ctx.model.embedding_output if ctx.model.sparse else "pooled"
        return EmbeddingPlan(output, ctx.request.dimensions, ctx.request.normalize)

    def validate(self, ctx: ServeContext[EmbedRequest]) -> None:
        request, model = ctx.request, ctx.model
        check_batch(len(request.texts()), ctx.settings.max_items_per_request)
        if model.sparse and request.normalize:
            raise backend_error("`normalize` is not available for SPLADE models")
        if request.dimensions == 0:
            raise validation_error(f"{VALIDATION}`dimensions` should be positive")
        refuse_non_embedding(model)
        if model.late_interaction:
            raise backend_error(f"{NOT_EMBEDDING} with pooling: a late-interaction model gives a vector per token "
                                "(/embed_all)")
        refuse_empty(request.texts())

    def item_count(self, request: EmbedRequest) -> int:
        return len(request.texts())

    async def encode(self, ctx: ServeContext[EmbedRequest]) -> Encoded:
        encoded = await tokenized_texts(ctx.model, ctx.request)
        if (ctx.request.dimensions or 0) > ctx.model.embedding_size:
            raise validation_error(f"{VALIDATION}`dimensions` should be smaller than the maximum embedding dimension.")
        return encoded

    def output_name(self, ctx: ServeContext[EmbedRequest]) -> str:
        return self.plan(ctx).output

    def respond(self, ctx: ServeContext[EmbedRequest]) -> Response:
        rows = self.plan(ctx).finish(ctx.output)
        return Response(orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


class ServingEmbedAll(Serving[EmbedAllRequest]):
    capability = "can_embed_texts"
    flavour = Flavour.TEI

    def resolve(self, registry: ModelRegistry, request: EmbedAllRequest) -> ServedModel:
        """The model named when it is served, else the first with per-token vectors, else the first served (which
        then answers TEI's 424)."""
        named = registry.named(request.model) if request.model else None
        if named is not None:
            return named
        return next((model for model in registry if has_token_vectors(model)), next(iter(registry)))

    def validate(self, ctx: ServeContext[EmbedAllRequest]) -> None:
        request, model = ctx.request, ctx.model
        check_batch(len(request.texts()), ctx.settings.max_items_per_request)
        if model.sparse:
            raise backend_error("`embed_all` is not available for SPLADE models")
        refuse_non_embedding(model)
        if not has_token_vectors(model):
            raise backend_error("`embed_all` is not available for this model: it has no per-token output (served "
                                "for late-interaction models such as ColBERT, and BGE-M3)")
        refuse_empty(request.texts())

    def item_count(self, request: EmbedAllRequest) -> int:
        return len(request.texts())

    async def encode(self, ctx: ServeContext[EmbedAllRequest]) -> Encoded:
        return await tokenized_texts(ctx.model, ctx.request)

    def output_name(self, ctx: ServeContext[EmbedAllRequest]) -> str:
        return "token_projected"

    def respond(self, ctx: ServeContext[EmbedAllRequest]) -> Response:
        rows = token_rows(ctx.output, ctx.encoded.lengths)
        return Response(orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


serving_embed = ServingEmbed()
serving_embed_all = ServingEmbedAll()
