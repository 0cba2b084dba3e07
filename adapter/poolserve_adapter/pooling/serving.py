"""``/pooling``: the model's pooled output per prompt, as vLLM returns it (float or base64)."""

from __future__ import annotations

import base64
import sys

import numpy as np

from poolserve_adapter.classify.service import encode_prompts
from poolserve_adapter.common.protocol import UsageInfo
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.pooling.protocol import PoolingData, PoolingRequest, PoolingResponse
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.settings import Settings
from poolserve_adapter.triton_gateway import TritonGateway


def encode_row(row: np.ndarray, request: PoolingRequest) -> list[float] | str:
    if request.encoding_format == "float":
        return row.tolist()
    dtype = np.dtype(request.embed_dtype)
    byteorder = {"little": "<", "big": ">", "native": "<" if sys.byteorder == "little" else ">"}[request.endianness]
    return base64.b64encode(row.astype(dtype.newbyteorder(byteorder)).tobytes()).decode()


async def pool(request: PoolingRequest, model: ServedModel, gateway: TritonGateway, settings: Settings,
               response_id: str) -> PoolingResponse:
    gateway.refuse_if_busy(model.triton_model)
    task = request.task or model.task
    if task != model.task:
        raise BadRequestError(f"Unsupported task: {task!r} Supported tasks: ({model.task!r},)")
    if request.dimensions is not None:
        raise BadRequestError("dimensions is not supported by this model (no matryoshka embeddings)",
                              param="dimensions")
    if request.encoding_format in ("bytes", "bytes_only"):
        raise BadRequestError("encoding_format bytes / bytes_only is not supported by this server; use float or "
                              "base64", param="encoding_format")
    encoded = await encode_prompts(model, request, settings)
    if model.task == "embed":
        output = "embeddings"
    else:
        output = "logits" if request.use_activation is False else "scores"
    rows = (await gateway.infer(model.triton_model, encoded, (output,)))[output]
    return PoolingResponse(
        id=response_id, model=model.name, usage=UsageInfo.of(encoded.num_tokens),
        data=[PoolingData(index=i, data=encode_row(row, request)) for i, row in enumerate(rows)],
    )
