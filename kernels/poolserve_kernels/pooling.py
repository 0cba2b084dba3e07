"""Sequence pooling over packed hidden states: first token, last token, mean, normalised mean, and
an embedding model's pooled rows with their L2-normalised copy.

Layout: ``hidden`` is ``[total_tokens, hidden_size]`` (bf16 / fp16 / fp32, rows contiguous) with
the tokens of sequence ``i`` at rows ``cu_seqlens[i] : cu_seqlens[i + 1]``; the result is
``[num_seqs, hidden_size]`` in ``hidden``'s dtype. No padding is ever read.

    cls[i]             = hidden[cu[i]]
    last[i]            = hidden[cu[i + 1] - 1]
    mean[i]            = sum(hidden[cu[i] : cu[i + 1]]) / (cu[i + 1] - cu[i])      (fp32 accumulation)
    mean_normalized[i] = mean[i] / max(||mean[i]||_2, 1e-12)                      (as F.normalize)

:func:`pool_normalized_triton` serves embedding models (sentence-transformers ``Pooling`` then
``Normalize``): it returns both the fp32 pooled rows (cls, last or mean) and those rows
L2-normalised in ``hidden``'s dtype, from one pooling launch and one normalising launch; its
normalised mean equals ``mean_normalized`` bit for bit (the same kernels on the same workspace).

GPU: one program per (sequence, block of BLOCK_H columns); mean walks the sequence BLOCK_T rows at
a time, so every token row is read once, coalesced along the hidden dimension. The normalised mean
writes fp32 means to a workspace and a second, per-row kernel scales them (one launch cannot
reduce across the column blocks of a row); the embedding variant keeps that workspace as its
un-normalised output. CPU: the torch references at the end of this file.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

POOLING_METHODS = ("cls", "last", "mean", "mean_normalized")
EMBEDDING_POOLING = ("cls", "last", "mean")  # what an embedding model pools before its optional Normalize
_METHOD_CODE = {"cls": 0, "last": 1, "mean": 2, "mean_normalized": 2}

# Tile sizes, from the sweep in benchmarks/poolserve_bench/bench_kernels.py --sweep on an H100 (bf16, 1,024 and
# 4,096 sequences of 32-224 tokens, hidden 384 / 1,024 / 4,096; benchmarks/results/kernels_sweep_h100.csv).
# Mean: BLOCK_H 128/256/512 x BLOCK_T 8/16/32 x 2/4/8 warps; BLOCK_H=512, BLOCK_T=16, 4 warps was
# at most 0.6% from the best at all six sizes (even at hidden 384, where a quarter of its lanes
# are masked: one program per sequence row beats three narrower ones).
MEAN_BLOCK_H = 512
BLOCK_T = 16
NUM_WARPS = 4
# CLS / last: a pure row gather; GATHER_BLOCK_H 256/512/1,024/2,048 swept: 512 was at most 10.5%
# from the best everywhere (1,024 and 2,048 lose up to 2x at hidden 384 and 1,024).
GATHER_BLOCK_H = 512
NORMALIZE_BLOCK_H = 1024
NORMALIZE_EPS = 1e-12  # F.normalize's default


@triton.jit
def _pool_kernel(
    hidden_ptr,
    hidden_row_stride,
    cu_seqlens_ptr,
    out_ptr,
    out_row_stride,
    hidden_size,
    METHOD: tl.constexpr,  # 0 cls, 1 last, 2 mean
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    column_mask = columns < hidden_size
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    out_row = out_ptr + seq * out_row_stride + columns

    if METHOD == 0:
        row = tl.load(hidden_ptr + start * hidden_row_stride + columns, mask=column_mask, other=0.0)
        tl.store(out_row, row.to(out_ptr.dtype.element_ty), mask=column_mask)
    elif METHOD == 1:
        row = tl.load(hidden_ptr + (end - 1) * hidden_row_stride + columns, mask=column_mask, other=0.0)
        tl.store(out_row, row.to(out_ptr.dtype.element_ty), mask=column_mask)
    else:
        total = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        for first in range(start, end, BLOCK_T):
            rows = first + tl.arange(0, BLOCK_T)
            mask = (rows[:, None] < end) & column_mask[None, :]
            tile = tl.load(hidden_ptr + rows[:, None] * hidden_row_stride + columns[None, :], mask=mask, other=0.0)
            total += tile.to(tl.float32)
        mean = tl.sum(total, axis=0) / tl.maximum(end - start, 1).to(tl.float32)
        tl.store(out_row, mean.to(out_ptr.dtype.element_ty), mask=column_mask)


@triton.jit
def _normalize_rows_kernel(x_ptr, out_ptr, hidden_size, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    squares = tl.zeros([BLOCK_H], dtype=tl.float32)
    for first in range(0, hidden_size, BLOCK_H):
        columns = first + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + row * hidden_size + columns, mask=columns < hidden_size, other=0.0).to(tl.float32)
        squares += x * x
    scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(squares, axis=0)), eps)
    for first in range(0, hidden_size, BLOCK_H):
        columns = first + tl.arange(0, BLOCK_H)
        mask = columns < hidden_size
        x = tl.load(x_ptr + row * hidden_size + columns, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * hidden_size + columns, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, the CI tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for tensor in tensors:
        if tensor.device != device:
            raise ValueError(f"all tensors must be on one device, got {tensor.device} and {device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def check_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [total_tokens, hidden_size], got shape {tuple(hidden.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [num_seqs + 1] with num_seqs >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")


def _check_pool_inputs(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str, methods: tuple[str, ...]) -> None:
    check_packed(hidden, cu_seqlens)
    check_device(hidden, cu_seqlens)
    if method not in methods:
        raise ValueError(f"unknown pooling method {method!r}; expected one of {methods}")
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    if hidden.stride(1) != 1:
        raise ValueError("hidden rows must be contiguous (stride 1 along the hidden dimension)")
    if not cu_seqlens.is_contiguous():
        raise ValueError("cu_seqlens must be contiguous")


def pool_triton(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Launch the pooling kernel(s); see the module docstring for the formulas.

    ``out`` (optional) receives the result: ``[num_seqs, hidden]`` in ``hidden``'s dtype.
    """
    _check_pool_inputs(hidden, cu_seqlens, method, POOLING_METHODS)
    num_seqs, hidden_size = cu_seqlens.numel() - 1, hidden.shape[1]
    if out is None:
        out = torch.empty(num_seqs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    elif out.shape != (num_seqs, hidden_size) or out.dtype != hidden.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {hidden.dtype} tensor of shape {(num_seqs, hidden_size)}")
    if method == "mean_normalized":
        # The normalised mean goes through an fp32 workspace, scaled into `out` by the second kernel.
        means = torch.empty(num_seqs, hidden_size, dtype=torch.float32, device=hidden.device)
        _launch_pool(hidden, cu_seqlens, "mean", means)
        _launch_normalize(means, out)
    else:
        _launch_pool(hidden, cu_seqlens, method, out)
    return out


def pool_normalized_triton(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                           method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled, normalized)``: the rows pooled by ``method`` (cls, last or mean) in fp32, and the
    same rows L2-normalised (``max(||x||_2, 1e-12)``, as F.normalize) in ``hidden``'s dtype."""
    _check_pool_inputs(hidden, cu_seqlens, method, EMBEDDING_POOLING)
    num_seqs, hidden_size = cu_seqlens.numel() - 1, hidden.shape[1]
    pooled = torch.empty(num_seqs, hidden_size, dtype=torch.float32, device=hidden.device)
    normalized = torch.empty(num_seqs, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _launch_pool(hidden, cu_seqlens, method, pooled)
    _launch_normalize(pooled, normalized)
    return pooled, normalized


def _launch_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str, out: torch.Tensor) -> None:
    """One ``_pool_kernel`` launch writing ``out`` (contiguous, hidden's dtype or fp32)."""
    hidden_size = hidden.shape[1]
    block_h = GATHER_BLOCK_H if method in ("cls", "last") else MEAN_BLOCK_H
    grid = (cu_seqlens.numel() - 1, triton.cdiv(hidden_size, block_h))
    _pool_kernel[grid](
        hidden, hidden.stride(0), cu_seqlens, out, out.stride(0), hidden_size,
        METHOD=_METHOD_CODE[method], BLOCK_T=BLOCK_T, BLOCK_H=block_h, num_warps=NUM_WARPS,
    )


def _launch_normalize(rows: torch.Tensor, out: torch.Tensor) -> None:
    """One ``_normalize_rows_kernel`` launch: ``out`` = the fp32 ``rows`` L2-normalised."""
    hidden_size = rows.shape[1]
    block = min(NORMALIZE_BLOCK_H, triton.next_power_of_2(hidden_size))
    _normalize_rows_kernel[(rows.shape[0],)](rows, out, hidden_size, NORMALIZE_EPS, BLOCK_H=block)


def pool_reference(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str) -> torch.Tensor:
    """Torch implementation: the CPU path, and the reference the kernels are tested against."""
    check_packed(hidden, cu_seqlens)
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
            means = F.normalize(means, p=2.0, dim=1, eps=NORMALIZE_EPS)
        return means.to(hidden.dtype)
    raise ValueError(f"unknown pooling method {method!r}; expected one of {POOLING_METHODS}")


def pool_normalized_reference(hidden: torch.Tensor, cu_seqlens: torch.Tensor,
                              method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation of :func:`pool_normalized_triton` (fp64 stays fp64: the tests' reference)."""
    if method not in EMBEDDING_POOLING:
        raise ValueError(f"unknown pooling method {method!r}; expected one of {EMBEDDING_POOLING}")
    # Pooling the upcast rows keeps the fp32 mean unrounded, as the kernels' workspace does.
    pooled = pool_reference(hidden.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32),
                            cu_seqlens, method)
    normalized = F.normalize(pooled, p=2.0, dim=1, eps=NORMALIZE_EPS)
    return pooled, normalized.to(hidden.dtype)
