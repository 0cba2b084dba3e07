"""Pooling, score-head and late-interaction (MaxSim) operations on packed (unpadded) hidden states.

Every operation takes hidden states ``[total_tokens, hidden]`` and ``cu_seqlens`` ``[num_seqs + 1]``
(int32, starting at 0), so no padding is ever read. One function per operation: it launches the
Triton kernel for CUDA tensors and runs the torch reference otherwise (the CPU path).
``POOLING_KERNELS=torch`` in the environment forces the torch reference on CUDA too (to compare,
or to rule the kernels out).
"""

from __future__ import annotations

import os

import torch

from poolserve_kernels.fp8_quant import per_token_quant_reference, per_token_quant_triton
from poolserve_kernels.maxsim import maxsim_reference, maxsim_triton
from poolserve_kernels.pooling import (
    EMBEDDING_POOLING,
    POOLING_METHODS,
    pool_normalized_reference,
    pool_normalized_triton,
    pool_reference,
    pool_triton,
)
from poolserve_kernels.score_head import MAX_LABELS, score_head_reference, score_head_triton

__all__ = ["EMBEDDING_POOLING", "POOLING_METHODS", "MAX_LABELS", "implementation", "maxsim", "per_token_quant",
           "per_token_quant_reference", "pool", "pool_normalized", "score_head"]


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and os.environ.get("POOLING_KERNELS", "triton") != "torch"


def implementation(device: torch.device) -> str:
    """Which implementation the operations below use for tensors on ``device``."""
    return "triton" if _use_triton(torch.empty(0, device=device)) else "torch-reference"


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str) -> torch.Tensor:
    """``[num_seqs, hidden]`` pooled per sequence: cls, last, mean or mean_normalized."""
    if _use_triton(hidden):
        return pool_triton(hidden, cu_seqlens, method)
    return pool_reference(hidden, cu_seqlens, method)


def pool_normalized(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled, normalized)``: an embedding model's rows pooled by cls, last or mean (fp32) and the
    same rows L2-normalised (``hidden``'s dtype)."""
    if _use_triton(hidden):
        return pool_normalized_triton(hidden, cu_seqlens, method)
    return pool_normalized_reference(hidden, cu_seqlens, method)


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [tokens, features]`` as float8_e4m3fn rows with one fp32 scale each (``[tokens, 1]``, ``amax / 448``):
    the dynamic activation scales of an FP8 matmul."""
    if _use_triton(x):
        return per_token_quant_triton(x)
    return per_token_quant_reference(x)


def maxsim(embeddings: torch.Tensor, cu_seqlens: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """fp32 ``[num_seqs]``: each sequence's late-interaction (ColBERT) score against sequence
    ``query_index[i]``, the sum over the query's tokens of their best dot product with the sequence's."""
    if _use_triton(embeddings):
        return maxsim_triton(embeddings, cu_seqlens, query_index)
    return maxsim_reference(embeddings, cu_seqlens, query_index)


def score_head(x, weight, bias, activation, *, gather="rows", cu_seqlens=None, logit_mean=0.0, logit_sigma=1.0):
    """``(logits, scores)`` fp32: optional gather (cls/last), linear head, calibration, activation."""
    if _use_triton(x) and weight.shape[0] <= MAX_LABELS:
        return score_head_triton(x, weight, bias, activation, gather=gather, cu_seqlens=cu_seqlens,
                                 logit_mean=logit_mean, logit_sigma=logit_sigma)
    return score_head_reference(x, weight, bias, activation, gather=gather, cu_seqlens=cu_seqlens,
                                logit_mean=logit_mean, logit_sigma=logit_sigma)
