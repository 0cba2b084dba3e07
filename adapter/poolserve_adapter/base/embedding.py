"""Embedding vectors as every embedding route returns them (``/v1/embeddings``, ``/v2/embed``, ``/pooling``
``task: embed``, SGLang's ``/encode``): which Triton output a request reads, the Matryoshka checks,
truncation then L2 normalisation, and the binary encodings (vLLM's base64 and ``bytes`` bodies,
Cohere's packed bits).

An embed model answers two Triton outputs: ``embeddings`` (pooled, then L2-normalised when the model's
card says ``normalizes``) and ``pooled`` (never normalised). A request reads ``embeddings`` unless it
turns normalisation off on a normalising model; normalising what the model does not is done here.
vLLM's head truncates to ``dimensions`` first and normalises after, so a truncated vector is
re-normalised (``EmbeddingPoolerHead.forward``). A sparse (SPLADE) model answers ``sparse`` instead, read
as it is: vLLM's ``SPLADESparsePooler`` applies no normalisation, whatever ``use_activation`` says.

A late-interaction (token_embed) model answers ``token_embeddings`` (every token's vector, L2-normalised)
and ``token_projected`` (not normalised), ``[n, longest, D]`` padded with zeros: :func:`token_rows` cuts
each sequence's ``[tokens, D]`` out of it.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
from fastapi.responses import Response
from pydantic import Field

from poolserve_adapter.base.protocol import OpenAIBaseModel
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.registry import ServedModel

EmbedDType = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"]
Endianness = Literal["native", "big", "little"]
NORM_EPSILON = 1e-12  # torch.nn.functional.normalize's floor on the norm, as vLLM's PoolerNormalize
# vLLM's fp8 embed_dtypes are torch's float8_e4m3fn and float8_e5m2 (vllm/utils/serial_utils.py).
FLOAT8_TYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
FLOAT8_E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448: e4m3fn has no infinity


class EncodingFields(OpenAIBaseModel):
    """vLLM's output-format fields of ``/v1/embeddings`` and ``/pooling`` (``EncodingRequestMixin``)."""

    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = Field(
        "float", description="float: JSON numbers; base64: each item's raw bytes, base64-encoded; bytes: one "
        "application/octet-stream body of every item's raw bytes, with a `metadata` header (JSON: each item's "
        "start, end, shape, embed_dtype and endianness); bytes_only: the body without the header.",
    )
    embed_dtype: EmbedDType = Field("float32", description="Element type of the base64 and bytes formats "
                                    "(bfloat16: rounded to nearest even, sent as its 16 bits; fp8_e4m3 / "
                                    "fp8_e5m2: float8 e4m3fn / e5m2 rounded to nearest even, one byte each).")
    endianness: Endianness = Field("native", description="Byte order of the base64 and bytes formats "
                                   "(native: this server's, little-endian on x86 and arm64).")


@dataclass(frozen=True)
class EmbeddingPlan:
    """How one request gets its vectors: the Triton output read, then the first ``dimensions`` columns,
    then L2 normalisation here when ``normalise``."""

    output: str
    dimensions: int | None = None
    normalise: bool = False

    def finish(self, rows: np.ndarray) -> np.ndarray:
        if self.dimensions is not None:
            rows = rows[:, :self.dimensions]
        if self.normalise:
            rows = l2_normalised(rows)
        return np.ascontiguousarray(rows, dtype=np.float32)


def plan_embeddings(model: ServedModel, use_activation: bool | None, dimensions: int | None) -> EmbeddingPlan:
    """``use_activation`` (vLLM's name for normalisation on embed models): None is the model's default.
    A truncated vector is normalised again when normalisation is on."""
    if model.sparse:
        return EmbeddingPlan("sparse", dimensions)
    activation = model.normalizes if use_activation is None else use_activation
    if model.normalizes and not activation:
        return EmbeddingPlan("pooled", dimensions)
    return EmbeddingPlan("embeddings", dimensions, activation and (dimensions is not None or not model.normalizes))


def l2_normalised(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32, copy=False)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.maximum(norms, NORM_EPSILON)


def check_dimensions(model: ServedModel, dimensions: int | None) -> None:
    """vLLM's Matryoshka checks, in its order (``PoolingParams._set_default_parameters``)."""
    if dimensions is None:
        return
    if not model.is_matryoshka:
        raise BadRequestError(f"Model {model.name!r} does not support Matryoshka embeddings; dimensions must be "
                              f"unset (received dimensions={dimensions}).")
    if not 1 <= dimensions <= model.embedding_size:
        raise BadRequestError(f"Model {model.name!r} only supports dimensions in range [1, {model.embedding_size}], "
                              f"got {dimensions}.")
    if model.matryoshka_dimensions and dimensions not in model.matryoshka_dimensions:
        raise BadRequestError(f"Model {model.name!r} only supports Matryoshka dimensions "
                              f"{list(model.matryoshka_dimensions)}, got {dimensions}.")


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 rounded to nearest even (as ``torch.Tensor.to(torch.bfloat16)``), as uint16 bits."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def float8_bits(values: np.ndarray, embed_dtype: Literal["fp8_e4m3", "fp8_e5m2"]) -> np.ndarray:
    """float32 → float8 as torch's CPU ``Tensor.to(torch.float8_e4m3fn / float8_e5m2)`` (torch 2.13), as uint8
    bits: rounded to nearest even; e4m3fn saturates to ±448 beyond its range, infinities included, where
    ml_dtypes alone gives NaN; e5m2 overflows to ±inf as ml_dtypes does; a NaN is 0x7F with its sign bit in
    both (ml_dtypes writes e5m2's as 0x7E)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    in_range = np.clip(values, -FLOAT8_E4M3_MAX, FLOAT8_E4M3_MAX) if embed_dtype == "fp8_e4m3" else values
    with np.errstate(over="ignore", invalid="ignore"):  # e5m2's overflow to inf and NaN are meant
        bits = in_range.astype(FLOAT8_TYPES[embed_dtype]).view(np.uint8)
    nan_bits = np.where(np.signbit(values), np.uint8(0xFF), np.uint8(0x7F))
    return np.where(np.isnan(values), nan_bits, bits)


def to_binary(rows: np.ndarray, embed_dtype: EmbedDType, endianness: Endianness) -> np.ndarray:
    """The rows as vLLM's ``tensor2binary`` writes them: cast to ``embed_dtype`` (bfloat16 and float8 as their
    bits), byte order swapped only when the requested order is not this machine's (a no-op on float8's single
    bytes, as in vLLM). An array: ``.tobytes()`` is the wire."""
    if embed_dtype == "bfloat16":
        cast = bfloat16_bits(rows)
    elif embed_dtype in FLOAT8_TYPES:
        cast = float8_bits(rows, embed_dtype)
    else:
        cast = np.ascontiguousarray(rows, dtype=embed_dtype)
    order = sys.byteorder if endianness == "native" else endianness
    return cast.byteswap() if order != sys.byteorder else cast


Items = np.ndarray | Sequence[np.ndarray]  # one row per item, or one array per item (a token matrix each)


def binary_items(items: Items, embed_dtype: EmbedDType, endianness: Endianness) -> list[np.ndarray]:
    """Each item as :func:`to_binary` writes it (a matrix of rows converted in one go)."""
    if isinstance(items, np.ndarray):
        return list(to_binary(items, embed_dtype, endianness))
    return [to_binary(item, embed_dtype, endianness) for item in items]


def base64_rows(items: Items, embed_dtype: EmbedDType, endianness: Endianness) -> list[str]:
    """Each item's raw bytes, base64-encoded (a token matrix flattened: vLLM sends no shape)."""
    return [base64.b64encode(item.tobytes()).decode() for item in binary_items(items, embed_dtype, endianness)]


def bytes_response(rows: Items, fields: EncodingFields, *, response_id: str, created: int, model: str,
                   prompt_tokens: int) -> Response:
    """vLLM's ``bytes`` / ``bytes_only`` answer: every item's raw bytes in index order, one
    ``application/octet-stream`` body; ``bytes`` adds the ``metadata`` header saying where each item is and
    its shape (``[D]`` for a vector, ``[n_tokens, D]`` for a token matrix)."""
    binaries = binary_items(rows, fields.embed_dtype, fields.endianness)
    headers = None
    if fields.encoding_format == "bytes":
        ends = np.cumsum([binary.nbytes for binary in binaries]).tolist()
        items = [{"index": i, "embed_dtype": fields.embed_dtype, "endianness": fields.endianness,
                  "start": end - binary.nbytes, "end": end, "shape": list(binary.shape)}
                 for i, (binary, end) in enumerate(zip(binaries, ends))]
        # json.dumps as vLLM writes it: ensure_ascii escapes what a header cannot carry (HTTP headers are latin-1;
        # a request_id of any Unicode, echoed in the id, would otherwise fail the response).
        headers = {"metadata": json.dumps({"id": response_id, "created": created, "model": model, "data": items,
                                           "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})}
    return Response(b"".join(binary.tobytes() for binary in binaries), media_type="application/octet-stream",
                    headers=headers)


def token_embedding_output(use_activation: bool | None) -> EmbeddingPlan:
    """A late-interaction model's token vectors: L2-normalised unless ``use_activation`` is false (vLLM's
    token_embed default is on), read as the model computed them."""
    return EmbeddingPlan("token_projected" if use_activation is False else "token_embeddings")


def token_rows(output: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """A token-level Triton output ``[n, longest, D]`` (zeros past each sequence) as each sequence's own
    ``[tokens, D]`` rows."""
    return [np.ascontiguousarray(output[i, :length], dtype=np.float32) for i, length in enumerate(lengths.tolist())]


def packed_bits(rows: np.ndarray, signed: bool) -> list[list[int]]:
    """Cohere's ``binary`` / ``ubinary`` as vLLM packs them: one bit per dimension, set where the value is
    >= 0, most significant first, 8 dimensions a byte; ``binary`` is the byte minus 128."""
    if rows.shape[1] % 8:
        raise BadRequestError("Embedding dimension must be a multiple of 8 for binary embedding types, but got "
                              f"{rows.shape[1]}.")
    packed = np.packbits(rows >= 0, axis=-1).astype(np.int16)
    return (packed - 128 if signed else packed).tolist()
