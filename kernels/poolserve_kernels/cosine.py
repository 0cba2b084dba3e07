"""Cosine similarity between query and document embeddings, for bi-encoder scoring.

    score[i] = q[j] . d[i] / max(||q[j]||_2 * ||d[i]||_2, eps)     j = 0 (1:N) or j = i (N:N)

``queries`` is ``[1, hidden]`` (1:N: one query against every document) or ``[N, hidden]`` (N:N:
pairs in order); ``documents`` is ``[N, hidden]``; the result is fp32 ``[N]``. Dot product and
both norms accumulate in fp32 in one pass over the embeddings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from poolserve_kernels.pooling import check_device

# Sweep on an H100 (benchmarks/poolserve_bench/bench_kernels.py --sweep; 1,024 and 4,096 pairs, hidden 384 /
# 1,024 / 4,096; benchmarks/results/kernels_sweep_h100.csv): BLOCK_P 8/16/32 x BLOCK_H 64/128/256;
# BLOCK_P=8, BLOCK_H=256 was at most 14% from the best everywhere (6% on average).
BLOCK_P = 8
BLOCK_H = 256
NUM_WARPS = 4
EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


@triton.jit
def _cosine_kernel(
    query_ptr,
    query_row_stride,
    document_ptr,
    document_row_stride,
    out_ptr,
    num_pairs,
    hidden_size,
    eps,
    BROADCAST_QUERY: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pair_mask = pairs < num_pairs
    if BROADCAST_QUERY:
        query_rows = pairs * 0
    else:
        query_rows = pairs
    dot = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    query_squares = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    document_squares = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    for first in range(0, hidden_size, BLOCK_H):
        columns = first + tl.arange(0, BLOCK_H)
        mask = pair_mask[:, None] & (columns < hidden_size)[None, :]
        q = tl.load(query_ptr + query_rows[:, None] * query_row_stride + columns[None, :], mask=mask, other=0.0)
        d = tl.load(document_ptr + pairs[:, None] * document_row_stride + columns[None, :], mask=mask, other=0.0)
        q = q.to(tl.float32)
        d = d.to(tl.float32)
        dot += q * d
        query_squares += q * q
        document_squares += d * d
    norms = tl.sqrt(tl.sum(query_squares, axis=1)) * tl.sqrt(tl.sum(document_squares, axis=1))
    tl.store(out_ptr + pairs, tl.sum(dot, axis=1) / tl.maximum(norms, eps), mask=pair_mask)


def _check(queries: torch.Tensor, documents: torch.Tensor) -> None:
    if queries.dim() != 2 or documents.dim() != 2 or queries.shape[1] != documents.shape[1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and documents {tuple(documents.shape)} must be [*, hidden] with one hidden size"
        )
    if queries.shape[0] not in (1, documents.shape[0]):
        raise ValueError(f"queries must be 1 (1:N) or {documents.shape[0]} (N:N) rows, got {queries.shape[0]}")


def cosine_similarity_triton(
    queries: torch.Tensor, documents: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    _check(queries, documents)
    check_device(queries, documents)
    if queries.stride(1) != 1 or documents.stride(1) != 1:
        raise ValueError("embedding rows must be contiguous")
    num_pairs, hidden_size = documents.shape
    if out is None:
        out = torch.empty(num_pairs, dtype=torch.float32, device=documents.device)
    elif out.shape != (num_pairs,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {(num_pairs,)}")
    _cosine_kernel[(triton.cdiv(num_pairs, BLOCK_P),)](
        queries, queries.stride(0), documents, documents.stride(0), out, num_pairs, hidden_size, EPS,
        BROADCAST_QUERY=queries.shape[0] == 1 and num_pairs != 1, BLOCK_P=BLOCK_P, BLOCK_H=BLOCK_H,
        num_warps=NUM_WARPS,
    )
    return out


def cosine_similarity_reference(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    _check(queries, documents)
    compute = torch.float64 if documents.dtype == torch.float64 else torch.float32
    q, d = queries.to(compute).expand_as(documents), documents.to(compute)
    norms = q.norm(dim=1) * d.norm(dim=1)
    return (q * d).sum(dim=1) / norms.clamp(min=EPS)
