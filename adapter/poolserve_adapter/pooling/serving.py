"""``/pooling``: the model's pooled output per prompt, as vLLM returns it (floats, base64 strings or raw
bytes): class probabilities (or logits) of a classifier, the vector of an embedding model, every token's
vector of a late-interaction (ColBERT) model (``task: token_embed``: ``[n_tokens][D]`` floats; base64 holds
the flattened bytes; ``bytes`` metadata gives the shape ``[n_tokens, D]``), every token's label probabilities
of a token classifier (``task: token_classify``: ``[n_tokens][num_labels]``, or STEP pooling's
``[n_steps][k]``, :mod:`poolserve_adapter.base.token_classes`). BGE-M3 answers all three of its tasks from one
forward: ``embed`` its dense vector, ``token_embed`` its ColBERT vectors without the BOS row, ``token_classify``
one lexical weight per token without the BOS and EOS rows (``[n_tokens]``, as vLLM's ``BgeM3EmbeddingModel``)."""

from __future__ import annotations

from fastapi.responses import Response

from poolserve_adapter.base.embedding import (
    EmbeddingPlan,
    base64_rows,
    bytes_response,
    plan_embeddings,
    token_embedding_output,
    token_rows,
)
from poolserve_adapter.base.encoding import encode_prompts
from poolserve_adapter.base.protocol import UsageInfo, now
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.base.token_classes import bos_eos_filtered, lexical_weight_rows, token_class_rows
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.pooling.protocol import PoolingData, PoolingRequest, PoolingResponse
from poolserve_adapter.tokenization import Encoded


class ServingPooling(Serving[PoolingRequest]):
    capability = "can_classify_or_embed"

    @staticmethod
    def plan(ctx: ServeContext[PoolingRequest]) -> EmbeddingPlan:
        """An embedding model's vectors; a classifier's scores, or its logits with ``use_activation: false``."""
        task = ctx.request.task or ctx.model.task
        if task == "embed":
            return plan_embeddings(ctx.model, ctx.request.use_activation, None)
        if task == "token_embed":
            return token_embedding_output(ctx.request.use_activation)
        if task == "token_classify":  # logits always: the activation comes after STEP's columns
            return EmbeddingPlan("token_logits")
        return EmbeddingPlan("logits" if ctx.request.use_activation is False else "scores")

    def validate(self, ctx: ServeContext[PoolingRequest]) -> None:
        request, model = ctx.request, ctx.model
        if request.dimensions is not None:
            raise BadRequestError("dimensions is currently not supported", param="dimensions")
        task = request.task or model.task
        if task not in model.pooling_tasks:
            raise BadRequestError(f"Unsupported task: {task!r} Supported tasks: {model.pooling_tasks!r}")
        ctx.options = request.prompt_options(model.max_model_len, request.add_special_tokens)

    def item_count(self, request: PoolingRequest) -> int:
        return request.prompt_count()

    async def encode(self, ctx: ServeContext[PoolingRequest]) -> Encoded:
        return await encode_prompts(ctx.model, ctx.request, ctx.options, ctx.settings)

    def output_name(self, ctx: ServeContext[PoolingRequest]) -> str:
        return self.plan(ctx).output

    def respond(self, ctx: ServeContext[PoolingRequest]) -> PoolingResponse | Response:
        request, task = ctx.request, ctx.request.task or ctx.model.task
        if task == "token_embed" and ctx.model.lexical_weights:  # BGE-M3: the BOS row dropped, </s> kept
            rows = bos_eos_filtered(token_rows(ctx.output, ctx.encoded.lengths), ctx.encoded.input_ids,
                                    ctx.model.bos_token_id, None)
        elif task == "token_classify" and ctx.model.lexical_weights:
            rows = lexical_weight_rows(ctx.model, ctx.output, ctx.encoded.input_ids, ctx.encoded.lengths,
                                       request.use_activation)
        elif task == "token_embed":
            rows = token_rows(ctx.output, ctx.encoded.lengths)
        elif task == "token_classify":
            rows = token_class_rows(ctx.model, ctx.output, ctx.encoded.input_ids, ctx.encoded.lengths,
                                    request.use_activation)
        else:
            rows = self.plan(ctx).finish(ctx.output)
        response_id, tokens = ctx.response_id("pooling"), ctx.encoded.num_tokens
        if request.encoding_format in ("bytes", "bytes_only"):
            return bytes_response(rows, request, response_id=response_id, created=now(), model=ctx.model.name,
                                  prompt_tokens=tokens)
        values = ([row.tolist() for row in rows] if request.encoding_format == "float"
                  else base64_rows(rows, request.embed_dtype, request.endianness))
        return PoolingResponse(id=response_id, model=ctx.model.name, usage=UsageInfo.of(tokens),
                               data=[PoolingData(index=i, data=value) for i, value in enumerate(values)])


serving_pooling = ServingPooling()
