"""Sequence pooling over packed hidden states: first token, last token, mean, normalised mean.

Layout: ``hidden`` is ``[total_tokens, hidden_size]`` with the tokens of sequence ``i`` at rows
``cu_seqlens[i] : cu_seqlens[i + 1]``; the result is ``[num_seqs, hidden_size]``.

This module is the torch implementation: the CPU path of the runtime and the float64-checkable
reference for GPU kernels. Means accumulate in float32 (or float64 for float64 input) whatever the
input dtype, as the GPU kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLING_METHODS = ("cls", "last", "mean", "mean_normalized")


def _check_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [total_tokens, hidden_size], got shape {tuple(hidden.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [num_seqs + 1] with num_seqs >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")


def pool_reference(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str) -> torch.Tensor:
    """Pool each packed sequence; ``method`` is one of :data:`POOLING_METHODS`."""
    _check_packed(hidden, cu_seqlens)
    starts = cu_seqlens[:-1].long()
    ends = cu_seqlens[1:].long()
    if method == "cls":
        return hidden.index_select(0, starts)
    if method == "last":
        return hidden.index_select(0, ends - 1)
    if method in ("mean", "mean_normalized"):
        accumulate = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lengths = ends - starts
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths)
        sums = torch.zeros(lengths.numel(), hidden.shape[1], dtype=accumulate, device=hidden.device)
        sums.index_add_(0, segment, hidden.to(accumulate))
        means = sums / lengths.clamp(min=1).unsqueeze(1).to(accumulate)
        if method == "mean_normalized":
            means = F.normalize(means, p=2.0, dim=1)
        return means.to(hidden.dtype)
    raise ValueError(f"unknown pooling method {method!r}; expected one of {POOLING_METHODS}")


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str) -> torch.Tensor:
    """The runtime's entry point for pooling (the GPU kernel dispatch lands here)."""
    return pool_reference(hidden, cu_seqlens, method)
