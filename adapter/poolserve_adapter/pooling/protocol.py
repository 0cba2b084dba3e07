"""vLLM ``POST /pooling`` (``vllm/entrypoints/pooling/pooling/protocol.py``), text models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from poolserve_adapter.base.protocol import CompletionRequest, OpenAIBaseModel, UsageInfo, now, random_request_id


class PoolingRequest(CompletionRequest):
    task: Literal["classify", "embed", "token_embed", "token_classify", "plugin"] | None = Field(
        None, description="The pooling task; null: the model's own (classify or embed)."
    )
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes, base64-encoded."
    )
    embed_dtype: Literal["float32", "float16"] = Field("float32", description="Element type of base64 output.")
    endianness: Literal["native", "little", "big"] = Field("little", description="Byte order of base64 output.")
    dimensions: int | None = Field(None, description="Not supported (a 400 when set).")


class PoolingData(OpenAIBaseModel):
    index: int
    object: str = "pooling"
    data: list[float] | str


class PoolingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"pooling-{random_request_id()}")
    object: str = "list"
    created: int = Field(default_factory=now)
    model: str
    data: list[PoolingData]
    usage: UsageInfo
