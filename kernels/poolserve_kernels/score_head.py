"""Fused score head: (optional pooling gather) × classifier weight + bias → calibration → activation.

    x[i]      = features[i]                 GATHER = rows (already pooled features)
              = hidden[cu[i]]               GATHER = cls  (pooling fused into the head)
              = hidden[cu[i + 1] - 1]       GATHER = last
    logits[i] = (x[i] @ weight.T + bias - logit_mean) / logit_sigma        (fp32 accumulation)
    scores[i] = identity | sigmoid | softmax over labels (logits[i])

``weight`` is ``[num_labels, hidden]`` (an ``nn.Linear``), ``num_labels`` 1..32; ``logits`` and
``scores`` are fp32 ``[num_seqs, num_labels]``. One launch replaces ``index_select`` + ``matmul`` +
bias + activation. The calibration follows vLLM's ``ClassifierPoolerHead`` (before the activation).

GPU: one program per block of BLOCK_N sequences; the hidden dimension is walked in BLOCK_H
columns, each step one ``tl.dot`` of ``[BLOCK_N, BLOCK_H] x [BLOCK_H, BLOCK_L]`` accumulating in
fp32. bf16 / fp16 operands go to the tensor cores as they are (their products are exact in fp32,
so this equals an fp32 head on the same inputs); fp32 operands use IEEE fp32, not tf32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from poolserve_kernels.pooling import check_device, interpreting

GATHER_CODES = {"rows": 0, "cls": 1, "last": 2}
ACTIVATION_CODES = {"identity": 0, "sigmoid": 1, "softmax": 2}
MAX_LABELS = 32

# Sweep on an H100 (benchmarks/poolserve_bench/bench_kernels.py --sweep; 1,024 and 4,096 sequences, hidden 384 /
# 1,024 / 4,096, 8 labels). The first version upcast every tile to fp32 and used IEEE dots with
# BLOCK_H=64: a serial chain of 64 small dots at hidden 4,096, 3x slower than torch's addmm. With
# native bf16 dots, BLOCK_H 64/128/256/512 x BLOCK_N 16/32/64 were swept (benchmarks/results/
# kernels_sweep_h100.csv): BLOCK_N=16, BLOCK_H=256 had the best mean ratio to the per-size best (1.21x; its
# worst, 1.9x, is a 7-microsecond case). tl.dot needs every block dimension >= 16, hence BLOCK_L
# >= 16 even for one label.
BLOCK_N = 16
BLOCK_H = 256
NUM_WARPS = 4


@triton.jit
def _score_head_kernel(
    x_ptr,
    x_row_stride,
    cu_seqlens_ptr,
    weight_ptr,
    weight_row_stride,
    bias_ptr,
    logits_ptr,
    scores_ptr,
    num_seqs,
    hidden_size,
    num_labels,
    logit_mean,
    inverse_sigma,
    GATHER: tl.constexpr,  # 0 rows as given, 1 first token of each sequence, 2 last token
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 identity, 1 sigmoid, 2 softmax
    DOT_FP32: tl.constexpr,  # fp32 (or mixed) operands: upcast and use IEEE fp32 dots
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    seqs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    seq_mask = seqs < num_seqs
    if GATHER == 0:
        rows = seqs
    elif GATHER == 1:
        rows = tl.load(cu_seqlens_ptr + seqs, mask=seq_mask, other=0).to(tl.int64)
    else:
        rows = tl.load(cu_seqlens_ptr + seqs + 1, mask=seq_mask, other=1).to(tl.int64) - 1
    labels = tl.arange(0, BLOCK_L)
    label_mask = labels < num_labels

    logits = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    for first in range(0, hidden_size, BLOCK_H):
        columns = first + tl.arange(0, BLOCK_H)
        column_mask = columns < hidden_size
        x = tl.load(
            x_ptr + rows[:, None] * x_row_stride + columns[None, :],
            mask=seq_mask[:, None] & column_mask[None, :],
            other=0.0,
        )
        w = tl.load(  # weight.T tile: [BLOCK_H, BLOCK_L]
            weight_ptr + labels[None, :] * weight_row_stride + columns[:, None],
            mask=column_mask[:, None] & label_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            logits += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            logits += tl.dot(x, w)

    if HAS_BIAS:
        logits += tl.load(bias_ptr + labels, mask=label_mask, other=0.0).to(tl.float32)[None, :]
    logits = (logits - logit_mean) * inverse_sigma

    if ACTIVATION == 0:
        scores = logits
    elif ACTIVATION == 1:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        masked = tl.where(label_mask[None, :], logits, float("-inf"))
        exponentials = tl.exp(masked - tl.max(masked, axis=1)[:, None])
        scores = exponentials / tl.sum(exponentials, axis=1)[:, None]

    offsets = seqs[:, None] * num_labels + labels[None, :]
    mask = seq_mask[:, None] & label_mask[None, :]
    tl.store(logits_ptr + offsets, logits, mask=mask)
    tl.store(scores_ptr + offsets, scores, mask=mask)


def _check_head(x, weight, bias, gather, activation, cu_seqlens):
    if gather not in GATHER_CODES:
        raise ValueError(f"gather must be one of {tuple(GATHER_CODES)}, got {gather!r}")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [*, hidden] and [labels, hidden]")
    if not 1 <= weight.shape[0] <= MAX_LABELS:
        raise ValueError(f"the fused head takes 1..{MAX_LABELS} labels, got {weight.shape[0]}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if gather != "rows" and (cu_seqlens is None or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
        raise ValueError(f"gather={gather!r} needs cu_seqlens [num_seqs + 1]")


def score_head_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    *,
    gather: str = "rows",
    cu_seqlens: torch.Tensor | None = None,
    logit_mean: float = 0.0,
    logit_sigma: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, scores)``, fp32 ``[num_seqs, num_labels]``, in one launch (into ``out`` if given)."""
    _check_head(x, weight, bias, gather, activation, cu_seqlens)
    tensors = [x, weight] + ([bias] if bias is not None else []) + ([cu_seqlens] if gather != "rows" else [])
    check_device(*tensors)
    if x.stride(1) != 1 or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        raise ValueError("x rows, weight and bias must be contiguous")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")

    num_seqs = x.shape[0] if gather == "rows" else cu_seqlens.numel() - 1
    num_labels, hidden_size = weight.shape
    if out is None:
        logits = torch.empty(num_seqs, num_labels, dtype=torch.float32, device=x.device)
        scores = torch.empty_like(logits)
    else:
        logits, scores = out
        for tensor in out:
            if tensor.shape != (num_seqs, num_labels) or tensor.dtype != torch.float32 or not tensor.is_contiguous():
                raise ValueError(f"out tensors must be contiguous fp32 of shape {(num_seqs, num_labels)}")
    _score_head_kernel[(triton.cdiv(num_seqs, BLOCK_N),)](
        x, x.stride(0), cu_seqlens if cu_seqlens is not None else x, weight, weight.stride(0),
        bias if bias is not None else weight, logits, scores, num_seqs, hidden_size, num_labels,
        float(logit_mean), 1.0 / float(logit_sigma),
        GATHER=GATHER_CODES[gather], HAS_BIAS=bias is not None, ACTIVATION=ACTIVATION_CODES[activation],
        # Triton's CPU interpreter multiplies bf16 tiles wrongly (numpy has no bf16): fp32 there.
        DOT_FP32=x.dtype == torch.float32 or weight.dtype != x.dtype or interpreting(),
        BLOCK_N=BLOCK_N, BLOCK_L=max(16, triton.next_power_of_2(num_labels)), BLOCK_H=BLOCK_H,
        num_warps=NUM_WARPS,
    )
    return logits, scores


def score_head_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    *,
    gather: str = "rows",
    cu_seqlens: torch.Tensor | None = None,
    logit_mean: float = 0.0,
    logit_sigma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch implementation (fp32, or fp64 for fp64 input): CPU path and test reference."""
    _check_head(x, weight, bias, gather, activation, cu_seqlens)
    if gather == "cls":
        x = x.index_select(0, cu_seqlens[:-1].long())
    elif gather == "last":
        x = x.index_select(0, cu_seqlens[1:].long() - 1)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = x.to(compute) @ weight.to(compute).T
    if bias is not None:
        logits = logits + bias.to(compute)
    logits = (logits - logit_mean) / logit_sigma
    if activation == "sigmoid":
        scores = torch.sigmoid(logits)
    elif activation == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = logits
    return logits, scores
