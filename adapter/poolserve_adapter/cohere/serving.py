"""``/v2/embed``: Cohere's request over the same embedding pipeline as ``/v1/embeddings``
(``EmbedIOProcessor``'s Cohere path in vLLM): ``input_type`` picks a sentence-transformers prompt put
before each text, ``truncate`` / ``max_tokens`` set the truncation, ``embedding_types`` the encodings.

Knowingly different from vLLM: the prompt is always put before the text, as sentence-transformers
does; vLLM sends it as a system message instead when the model has a chat template.
"""

from __future__ import annotations

import base64

import numpy as np
import orjson
from fastapi.responses import Response

from poolserve_adapter.base.embedding import EmbeddingPlan, check_dimensions, packed_bits, plan_embeddings
from poolserve_adapter.base.protocol import random_request_id, truncation_options
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.cohere.protocol import CohereEmbedRequest
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.tokenization import Encoded


def input_texts(request: CohereEmbedRequest) -> list[str]:
    """``texts``, or each input's text parts joined by newlines."""
    if request.texts is not None:
        return list(request.texts)
    return ["\n".join(part.text for part in item.content) for item in request.inputs]


class ServingCohereEmbed(Serving[CohereEmbedRequest]):
    capability = "can_embed"

    @staticmethod
    def plan(ctx: ServeContext[CohereEmbedRequest]) -> EmbeddingPlan:
        return plan_embeddings(ctx.model, None, ctx.request.output_dimension)  # the model's own normalisation

    def validate(self, ctx: ServeContext[CohereEmbedRequest]) -> None:
        request, model = ctx.request, ctx.model
        if request.images or any(part.type == "image_url" for item in request.inputs or () for part in item.content):
            raise BadRequestError(f"Image inputs are not supported on /v2/embed: {model.name} embeds text only")
        if request.input_type is not None and request.input_type not in model.prompts:
            if not model.prompts:
                raise BadRequestError(f"Unsupported input_type {request.input_type!r}. This model does not define "
                                      "any input_type task instructions.")
            raise BadRequestError(f"Unsupported input_type {request.input_type!r}. Supported values: "
                                  f"{', '.join(sorted(model.prompts))}")
        # vLLM's _resolve_cohere_truncation: END keeps the first tokens, START the last, NONE all of them.
        keep = None if request.truncate == "NONE" else (request.max_tokens or -1)
        ctx.options = truncation_options(keep, "left" if request.truncate == "START" else None, model.max_model_len)

    def item_count(self, request: CohereEmbedRequest) -> int:
        return len(request.texts or request.images or request.inputs)

    async def encode(self, ctx: ServeContext[CohereEmbedRequest]) -> Encoded:
        request, model = ctx.request, ctx.model
        prompt = model.prompts.get(request.input_type or "", "")
        texts = [prompt + text for text in input_texts(request)]
        encoded = await model.encoder.encode_async(texts, None, ctx.settings.tokenize_in_thread_above, ctx.options)
        if request.truncate == "NONE" and request.max_tokens is not None:
            over = np.flatnonzero(encoded.lengths > request.max_tokens)
            if over.size:
                raise BadRequestError(f"Input of {int(encoded.lengths[over[0]])} tokens exceeds max_tokens="
                                      f"{request.max_tokens} with truncate=NONE. Set truncate to END or START to "
                                      "allow truncation.")
        check_dimensions(model, request.output_dimension)
        return encoded

    def output_name(self, ctx: ServeContext[CohereEmbedRequest]) -> str:
        return self.plan(ctx).output

    def respond(self, ctx: ServeContext[CohereEmbedRequest]) -> Response:
        request = ctx.request
        rows = self.plan(ctx).finish(ctx.output)
        requested = set(request.embedding_types)
        embeddings = {}  # in the order of Cohere's EmbedByTypeResponseEmbeddings fields, as vLLM dumps them
        if "float" in requested:
            embeddings["float"] = list(rows)
        if "binary" in requested:
            embeddings["binary"] = packed_bits(rows, signed=True)
        if "ubinary" in requested:
            embeddings["ubinary"] = packed_bits(rows, signed=False)
        if "base64" in requested:  # always little-endian float32 (struct.pack("<%df") in vLLM)
            embeddings["base64"] = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in rows]
        body = {"id": f"embd-{ctx.raw_request.headers.get('x-request-id') or random_request_id()}",
                "embeddings": embeddings}
        if request.texts is not None:
            body["texts"] = request.texts
        body["meta"] = {"api_version": {"version": "2"},
                        "billed_units": {"input_tokens": ctx.encoded.num_tokens, "image_tokens": 0}}
        body["response_type"] = "embeddings_by_type"
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


serving_cohere_embed = ServingCohereEmbed()
