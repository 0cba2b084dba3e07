"""``/pooling``: the model's pooled output per prompt, as vLLM returns it (float or base64)."""

from __future__ import annotations

import base64
import sys

import numpy as np

from poolserve_adapter.base.encoding import encode_prompts
from poolserve_adapter.base.protocol import UsageInfo
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.pooling.protocol import PoolingData, PoolingRequest, PoolingResponse
from poolserve_adapter.tokenization import Encoded


def encode_row(row: np.ndarray, request: PoolingRequest) -> list[float] | str:
    if request.encoding_format == "float":
        return row.tolist()
    dtype = np.dtype(request.embed_dtype)
    byteorder = {"little": "<", "big": ">", "native": "<" if sys.byteorder == "little" else ">"}[request.endianness]
    return base64.b64encode(row.astype(dtype.newbyteorder(byteorder)).tobytes()).decode()


class ServingPooling(Serving[PoolingRequest]):
    capability = "can_classify_or_embed"

    def validate(self, ctx: ServeContext[PoolingRequest]) -> None:
        request, model = ctx.request, ctx.model
        task = request.task or model.task
        if task != model.task:
            raise BadRequestError(f"Unsupported task: {task!r} Supported tasks: ({model.task!r},)")
        if request.dimensions is not None:
            raise BadRequestError("dimensions is not supported by this model (no matryoshka embeddings)",
                                  param="dimensions")
        if request.encoding_format in ("bytes", "bytes_only"):
            raise BadRequestError("encoding_format bytes / bytes_only is not supported by this server; use float or "
                                  "base64", param="encoding_format")
        ctx.options = request.prompt_options(model.max_model_len, request.add_special_tokens)

    def item_count(self, request: PoolingRequest) -> int:
        return request.prompt_count()

    async def encode(self, ctx: ServeContext[PoolingRequest]) -> Encoded:
        return await encode_prompts(ctx.model, ctx.request, ctx.options, ctx.settings)

    def output_name(self, ctx: ServeContext[PoolingRequest]) -> str:
        if ctx.model.task == "embed":
            return "embeddings"
        return "logits" if ctx.request.use_activation is False else "scores"

    def respond(self, ctx: ServeContext[PoolingRequest]) -> PoolingResponse:
        return PoolingResponse(
            id=ctx.response_id("pooling"), model=ctx.model.name, usage=UsageInfo.of(ctx.encoded.num_tokens),
            data=[PoolingData(index=i, data=encode_row(row, ctx.request)) for i, row in enumerate(ctx.output)],
        )


serving_pooling = ServingPooling()
