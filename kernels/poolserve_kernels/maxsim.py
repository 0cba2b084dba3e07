"""Late-interaction (ColBERT) MaxSim over packed token embeddings.

Layout: ``embeddings`` is ``[total_tokens, dim]`` (bf16 / fp16 / fp32, rows contiguous) with the
tokens of sequence ``i`` at rows ``cu_seqlens[i] : cu_seqlens[i + 1]``; ``query_index[i]`` names the
sequence sequence ``i`` is scored against. The result is fp32 ``[num_seqs]``:

    maxsim[i] = sum over query tokens q of  max over tokens d of sequence i of  <q, d>

with ``q`` the rows of sequence ``query_index[i]``. This is vLLM's ``compute_maxsim_score``
(``(q @ d.T).amax(-1).sum()``): a sum over the query, not a mean. No padding is read.

GPU: one program per sequence. It walks the query BLOCK_Q rows at a time; for each query block it
walks the document BLOCK_D rows at a time, accumulating the ``[BLOCK_Q, BLOCK_D]`` dot products
over the embedding width BLOCK_K columns at a time (``tl.dot`` of the rows upcast to fp32, in IEEE
precision: not TF32, whose 10-bit mantissa would cost fp32 inputs ~1e-3 per score; a bf16 product is
exact in fp32 anyway), and keeps each query row's running maximum. CPU: the torch reference at
the end of this file.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from poolserve_kernels.pooling import check_device, check_packed

# tl.dot needs every tile side >= 16. ColBERT widths are 96 or 128 (BGE-M3's 1,024 takes 16 steps of
# BLOCK_K); queries are short (32 tokens for most checkpoints), so a 16-row query block wastes little.
BLOCK_Q = 16
BLOCK_D = 32
BLOCK_K = 64
NUM_WARPS = 4


@triton.jit
def _maxsim_kernel(
    emb_ptr,
    emb_row_stride,
    cu_seqlens_ptr,
    query_index_ptr,
    out_ptr,
    dim,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    query = tl.load(query_index_ptr + seq).to(tl.int64)
    doc_start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    doc_end = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64)
    q_start = tl.load(cu_seqlens_ptr + query).to(tl.int64)
    q_end = tl.load(cu_seqlens_ptr + query + 1).to(tl.int64)

    total = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for q_first in range(q_start, q_end, BLOCK_Q):
        q_rows = q_first + tl.arange(0, BLOCK_Q)
        q_valid = q_rows < q_end
        best = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        for d_first in range(doc_start, doc_end, BLOCK_D):
            d_rows = d_first + tl.arange(0, BLOCK_D)
            d_valid = d_rows < doc_end
            dots = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
            for k_first in range(0, dim, BLOCK_K):
                columns = k_first + tl.arange(0, BLOCK_K)
                k_valid = columns < dim
                q = tl.load(emb_ptr + q_rows[:, None] * emb_row_stride + columns[None, :],
                            mask=q_valid[:, None] & k_valid[None, :], other=0.0)
                d = tl.load(emb_ptr + d_rows[:, None] * emb_row_stride + columns[None, :],
                            mask=d_valid[:, None] & k_valid[None, :], other=0.0)
                dots += tl.dot(q.to(tl.float32), tl.trans(d.to(tl.float32)), input_precision="ieee")
            dots = tl.where(d_valid[None, :], dots, float("-inf"))
            best = tl.maximum(best, tl.max(dots, axis=1))
        total += tl.where(q_valid, best, 0.0)
    tl.store(out_ptr + seq, tl.sum(total, axis=0))


def _check_maxsim_inputs(embeddings: torch.Tensor, cu_seqlens: torch.Tensor, query_index: torch.Tensor) -> None:
    check_packed(embeddings, cu_seqlens)
    if query_index.shape != (cu_seqlens.numel() - 1,):
        raise ValueError(f"query_index must be [num_seqs] = [{cu_seqlens.numel() - 1}], "
                         f"got {tuple(query_index.shape)}")
    if query_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"query_index must be int32 or int64, got {query_index.dtype}")


def maxsim_triton(embeddings: torch.Tensor, cu_seqlens: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """Launch the MaxSim kernel; see the module docstring. Returns fp32 ``[num_seqs]``."""
    _check_maxsim_inputs(embeddings, cu_seqlens, query_index)
    check_device(embeddings, cu_seqlens, query_index)
    if embeddings.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"embeddings must be bf16, fp16 or fp32, got {embeddings.dtype}")
    if embeddings.stride(1) != 1:
        raise ValueError("embeddings rows must be contiguous (stride 1 along the embedding dimension)")
    if not (cu_seqlens.is_contiguous() and query_index.is_contiguous()):
        raise ValueError("cu_seqlens and query_index must be contiguous")
    num_seqs = cu_seqlens.numel() - 1
    out = torch.empty(num_seqs, dtype=torch.float32, device=embeddings.device)
    _maxsim_kernel[(num_seqs,)](
        embeddings, embeddings.stride(0), cu_seqlens, query_index, out, embeddings.shape[1],
        BLOCK_Q=BLOCK_Q, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
    )
    return out


def maxsim_reference(embeddings: torch.Tensor, cu_seqlens: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """Torch implementation: the CPU path, and the tests' reference (fp64 input: fp64 result, else fp32)."""
    _check_maxsim_inputs(embeddings, cu_seqlens, query_index)
    accumulate = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    bounds = cu_seqlens.long().tolist()
    rows = embeddings.to(accumulate)
    scores = []
    for seq, query in enumerate(query_index.long().tolist()):
        q, d = rows[bounds[query]:bounds[query + 1]], rows[bounds[seq]:bounds[seq + 1]]
        scores.append((q @ d.T).amax(dim=-1).sum())
    return torch.stack(scores) if scores else torch.zeros(0, dtype=accumulate, device=embeddings.device)
