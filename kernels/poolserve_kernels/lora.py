"""Segmented multi-LoRA over the packed token stream: one base linear layer, many adapters, one batch.

Layout: ``x`` is ``[total_tokens, in_features]`` and ``y`` (the base layer's output, updated in
place) ``[total_tokens, out_features]``, both with contiguous rows. The stream is cut into
contiguous segments: segment ``s`` is rows ``seg_indptr[s] : seg_indptr[s + 1]`` and uses adapter
slot ``seg_adapter[s]`` (``-1``: the base model, no LoRA; its rows of ``y`` are never touched).
Adapters are stacked in slots, in PEFT's convention (``lora_A.weight`` is ``[r, in]``,
``lora_B.weight`` is ``[out, r]``, ``scaling = lora_alpha / r``) and zero-padded to the largest
rank; ``ranks[a]`` masks slot ``a``'s padding, so the padding is never read:

    lora_a  [num_adapters, max_rank, in_features]
    lora_b  [num_adapters, out_features, max_rank]
    y[rows of s] += scaling[a] * (x[rows of s] @ lora_a[a, :r].T) @ lora_b[a, :, :r].T
                    with a = seg_adapter[s], r = ranks[a]                 (fp32 accumulation)

This is a merged PEFT layer, ``x @ (W + scaling * B @ A).T``, without ever merging: the base
matmul runs once for the whole batch and each segment adds its own low-rank term.

Two launches, as Punica / S-LoRA, vLLM's ``lora_shrink`` / ``lora_expand`` and SGLang's
``sgemm_lora_a`` / ``sgemm_lora_b``, rather than one fused kernel. Shrink reduces over all of
``in_features`` to ``max_rank`` columns; expand spreads those few columns over all of
``out_features``. A fused program would own a block of tokens and either walk every output column
itself (one program per 32 tokens: far too few programs for a GPU at serving batch sizes) or split
the output columns over programs that each recompute the whole shrink (reading ``x`` once per
column block instead of once). The intermediate between the two launches is small (``[tokens,
max_rank]`` fp32: 64 bytes a token at rank 16) and is stored in fp32; expand keeps it fp32 when ``y`` or the
adapters are fp32, and otherwise rounds it to the adapters' bf16/fp16 for a tensor-core dot (as PEFT's bf16
layer rounds ``x @ A``, and vLLM's expand kernel does; ``y`` is rounded to that dtype anyway).

GPU: shrink runs one program per (segment, block of BLOCK_T tokens), walking ``in_features``
BLOCK_K columns at a time (``tl.dot`` of ``[BLOCK_T, BLOCK_K] x [BLOCK_K, BLOCK_R]``) and folds in
the adapter's scaling; expand runs one program per (segment, token block, BLOCK_N output columns),
one ``tl.dot`` of ``[BLOCK_T, BLOCK_R] x [BLOCK_R, BLOCK_N]`` accumulated in fp32, added to ``y`` in
fp32 and rounded once to ``y``'s dtype. The tile sizes are autotuned per layer shape (``SHRINK_CONFIGS``,
``EXPAND_CONFIGS``).
Segments of the base model, and token blocks past a segment's end, return at once. Each row
belongs to one segment, so every element of ``y`` has at most one writer: no atomics.
CPU: :func:`lora_reference` at the end of this file.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from poolserve_kernels.pooling import check_device, interpreting

BASE_MODEL = -1  # seg_adapter value for segments served by the base model alone

# Tiles. tl.dot needs every tile side >= 16, hence BLOCK_R >= 16 even for rank 4 (masked). On a GPU the
# launcher autotunes BLOCK_T and BLOCK_K / BLOCK_N among the configs below, once per layer shape (triton.autotune,
# keyed by features and rank); the interpreter (CPU tests) runs the first. With 32 x 64 tiles alone, 8 rank-16
# adapters mixed into a Qwen3-0.6B shape served at 51% of the base on an H100 (54% autotuned): expand's tiny
# programs (a [32, 64] tile of y each, 24k programs for one 16k-token gate projection) cost more than the bytes
# they move. The key holds no token count: the tiles chosen on the engine's serving-size warm-up batch also run
# the small batches of a single client (tuning per batch size would stall live requests).
SHRINK_CONFIGS = [triton.Config({"BLOCK_T": tokens, "BLOCK_K": columns}, num_warps=warps)
                  for tokens, columns, warps in ((32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8))]
EXPAND_CONFIGS = [triton.Config({"BLOCK_T": tokens, "BLOCK_N": columns}, num_warps=warps)
                  for tokens, columns, warps in ((32, 64, 4), (64, 128, 4), (128, 128, 8), (64, 256, 8),
                                                 (128, 256, 8))]
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    x_row_stride,
    seg_indptr_ptr,
    seg_adapter_ptr,
    lora_a_ptr,
    a_adapter_stride,
    a_rank_stride,
    a_in_stride,
    ranks_ptr,
    scaling_ptr,
    shrunk_ptr,
    shrunk_row_stride,
    in_features,
    max_rank,
    DOT_FP32: tl.constexpr,  # fp32 (or mixed) operands: upcast and use IEEE fp32 dots
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    adapter = tl.load(seg_adapter_ptr + segment).to(tl.int64)
    first_row = tl.load(seg_indptr_ptr + segment).to(tl.int64) + tl.program_id(1).to(tl.int64) * BLOCK_T
    end = tl.load(seg_indptr_ptr + segment + 1).to(tl.int64)
    if adapter >= 0 and first_row < end:
        rows = first_row + tl.arange(0, BLOCK_T)
        row_mask = rows < end
        rank_columns = tl.arange(0, BLOCK_R)
        rank_mask = (rank_columns < tl.load(ranks_ptr + adapter)) & (rank_columns < max_rank)
        a_base = lora_a_ptr + adapter * a_adapter_stride
        shrunk = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for first in range(0, in_features, BLOCK_K):
            columns = first + tl.arange(0, BLOCK_K)
            column_mask = columns < in_features
            x = tl.load(x_ptr + rows[:, None] * x_row_stride + columns[None, :],
                        mask=row_mask[:, None] & column_mask[None, :], other=0.0)
            a = tl.load(  # lora_a[adapter].T tile: [BLOCK_K, BLOCK_R]
                a_base + columns[:, None] * a_in_stride + rank_columns[None, :] * a_rank_stride,
                mask=column_mask[:, None] & rank_mask[None, :], other=0.0)
            if DOT_FP32:
                shrunk += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
            else:
                shrunk += tl.dot(x, a)
        shrunk *= tl.load(scaling_ptr + adapter).to(tl.float32)
        tl.store(shrunk_ptr + rows[:, None] * shrunk_row_stride + rank_columns[None, :], shrunk,
                 mask=row_mask[:, None] & (rank_columns < max_rank)[None, :])


@triton.jit
def _lora_expand_kernel(
    shrunk_ptr,
    shrunk_row_stride,
    seg_indptr_ptr,
    seg_adapter_ptr,
    lora_b_ptr,
    b_adapter_stride,
    b_out_stride,
    b_rank_stride,
    ranks_ptr,
    y_ptr,
    y_row_stride,
    out_features,
    max_rank,
    DOT_FP32: tl.constexpr,  # fp32 lora_b or y: IEEE fp32 dot; else the shrunk rows rounded to lora_b's dtype
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    segment = tl.program_id(0).to(tl.int64)
    adapter = tl.load(seg_adapter_ptr + segment).to(tl.int64)
    first_row = tl.load(seg_indptr_ptr + segment).to(tl.int64) + tl.program_id(1).to(tl.int64) * BLOCK_T
    end = tl.load(seg_indptr_ptr + segment + 1).to(tl.int64)
    if adapter >= 0 and first_row < end:
        rows = first_row + tl.arange(0, BLOCK_T)
        row_mask = rows < end
        rank_columns = tl.arange(0, BLOCK_R)
        rank_mask = (rank_columns < tl.load(ranks_ptr + adapter)) & (rank_columns < max_rank)
        columns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        column_mask = columns < out_features
        shrunk = tl.load(shrunk_ptr + rows[:, None] * shrunk_row_stride + rank_columns[None, :],
                         mask=row_mask[:, None] & rank_mask[None, :], other=0.0)
        b = tl.load(  # lora_b[adapter].T tile: [BLOCK_R, BLOCK_N]
            lora_b_ptr + adapter * b_adapter_stride + rank_columns[:, None] * b_rank_stride
            + columns[None, :] * b_out_stride,
            mask=rank_mask[:, None] & column_mask[None, :], other=0.0)
        if DOT_FP32:
            delta = tl.dot(shrunk, b.to(tl.float32), input_precision="ieee")
        else:  # tensor cores, as PEFT's bf16 layer rounds x @ A before @ B; fp32 accumulation either way
            delta = tl.dot(shrunk.to(b.dtype), b)
        tile = y_ptr + rows[:, None] * y_row_stride + columns[None, :]
        mask = row_mask[:, None] & column_mask[None, :]
        y = tl.load(tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(tile, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


# One choice per layer shape, made on its first call (the engine warms the adapters up at load). Benchmarking a
# config runs expand again, so y is restored after each trial.
_lora_shrink_tuned = triton.autotune(SHRINK_CONFIGS, key=["in_features", "max_rank", "DOT_FP32"])(
    _lora_shrink_kernel)
_lora_expand_tuned = triton.autotune(EXPAND_CONFIGS, key=["out_features", "max_rank", "DOT_FP32"],
                                     restore_value=["y_ptr"])(_lora_expand_kernel)


class LoraSegments(NamedTuple):
    """The segments of one packed batch: ``indptr`` [S + 1] and ``adapter`` [S] (int32), and the
    longest segment that uses an adapter (sizes the launch grid without reading the device)."""

    indptr: torch.Tensor
    adapter: torch.Tensor
    max_lora_length: int


def lora_segments(cu_seqlens, sequence_adapters, device=None) -> LoraSegments:
    """Segments for a packed batch: sequence ``i`` (rows ``cu_seqlens[i] : cu_seqlens[i + 1]``) uses
    adapter slot ``sequence_adapters[i]`` (``-1``: base model). Neighbouring sequences of one adapter
    become one segment (longer segments fill more of each token block); sequences of one adapter
    that are not neighbours stay separate segments, so the packed order is kept as it is."""
    bounds = [int(bound) for bound in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    adapters = [int(adapter) for adapter in (
        sequence_adapters.tolist() if torch.is_tensor(sequence_adapters) else sequence_adapters)]
    if len(bounds) != len(adapters) + 1:
        raise ValueError(f"cu_seqlens has {len(bounds)} entries for {len(adapters)} sequences; expected one more")
    if any(adapter < BASE_MODEL for adapter in adapters):
        raise ValueError(f"adapter slots are >= 0, or {BASE_MODEL} for the base model; got {adapters}")
    indptr, segment_adapters = [bounds[0]], []
    for sequence, adapter in enumerate(adapters):
        if segment_adapters and segment_adapters[-1] == adapter:
            indptr[-1] = bounds[sequence + 1]
        else:
            segment_adapters.append(adapter)
            indptr.append(bounds[sequence + 1])
    max_lora_length = max((indptr[s + 1] - indptr[s] for s, adapter in enumerate(segment_adapters)
                           if adapter != BASE_MODEL), default=0)
    return LoraSegments(torch.tensor(indptr, dtype=torch.int32, device=device),
                        torch.tensor(segment_adapters, dtype=torch.int32, device=device), max_lora_length)


def stack_lora_weights(adapters, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lora_a, lora_b, ranks)`` from ``[(A [r, in], B [out, r]), ...]`` (PEFT's ``lora_A.weight``
    and ``lora_B.weight``), slot ``i`` the ``i``-th pair, zero-padded to the largest rank."""
    if not adapters:
        raise ValueError("stack_lora_weights needs at least one adapter")
    in_features, out_features = adapters[0][0].shape[1], adapters[0][1].shape[0]
    for slot, (a, b) in enumerate(adapters):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (a.shape[1], b.shape[0]) != (in_features,
                                                                                                     out_features):
            raise ValueError(f"adapter {slot}: A {tuple(a.shape)} and B {tuple(b.shape)} must be [r, {in_features}] "
                             f"and [{out_features}, r]")
    dtype = dtype or adapters[0][0].dtype
    device = device or adapters[0][0].device
    max_rank = max(a.shape[0] for a, _ in adapters)
    lora_a = torch.zeros(len(adapters), max_rank, in_features, dtype=dtype, device=device)
    lora_b = torch.zeros(len(adapters), out_features, max_rank, dtype=dtype, device=device)
    with torch.no_grad():  # PEFT's weights are parameters; the stack is a plain inference buffer
        for slot, (a, b) in enumerate(adapters):
            lora_a[slot, :a.shape[0]] = a
            lora_b[slot, :, :a.shape[0]] = b
    ranks = torch.tensor([a.shape[0] for a, _ in adapters], dtype=torch.int32, device=device)
    return lora_a, lora_b, ranks


def _check_lora_inputs(y, x, seg_indptr, seg_adapter, lora_a, lora_b, ranks, scaling) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be [total_tokens, in] and [total_tokens, out]")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} must be "
                         "[adapters, max_rank, in] and [adapters, out, max_rank]")
    num_adapters, max_rank, in_features = lora_a.shape
    out_features = y.shape[1]
    if in_features != x.shape[1] or lora_b.shape != (num_adapters, out_features, max_rank):
        raise ValueError(f"lora_a must be [adapters, max_rank, {x.shape[1]}] and lora_b [adapters, {out_features}, "
                         f"max_rank], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if ranks.shape != (num_adapters,) or scaling.shape != (num_adapters,):
        raise ValueError(f"ranks and scaling must be [{num_adapters}], got {tuple(ranks.shape)} and "
                         f"{tuple(scaling.shape)}")
    if seg_indptr.dim() != 1 or seg_indptr.numel() < 1 or seg_adapter.shape != (seg_indptr.numel() - 1,):
        raise ValueError(f"seg_indptr must be [segments + 1] and seg_adapter [segments], got "
                         f"{tuple(seg_indptr.shape)} and {tuple(seg_adapter.shape)}")
    for name, tensor in (("seg_indptr", seg_indptr), ("seg_adapter", seg_adapter), ("ranks", ranks)):
        if tensor.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {tensor.dtype}")


def apply_lora(y: torch.Tensor, x: torch.Tensor, seg_indptr: torch.Tensor, seg_adapter: torch.Tensor,
               lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor, scaling: torch.Tensor,
               *, max_lora_length: int | None = None) -> torch.Tensor:
    """Launch shrink and expand; see the module docstring. Adds into ``y`` in place and returns it.

    ``max_lora_length`` (the longest segment that uses an adapter, :class:`LoraSegments` carries it)
    sizes the grid; without it, it is read from the device (one synchronisation). The segments must
    be ordered and within ``x``, the adapter slots below ``num_adapters`` and the ranks at most
    ``max_rank``: :func:`lora_reference` checks that, this launcher does not (it would synchronise)."""
    _check_lora_inputs(y, x, seg_indptr, seg_adapter, lora_a, lora_b, ranks, scaling)
    check_device(y, x, seg_indptr, seg_adapter, lora_a, lora_b, ranks, scaling)
    for name, tensor in (("x", x), ("y", y), ("lora_a", lora_a), ("lora_b", lora_b)):
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be bf16, fp16 or fp32, got {tensor.dtype}")
    if not scaling.dtype.is_floating_point:
        raise ValueError(f"scaling must be a float tensor, got {scaling.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y rows must be contiguous (stride 1 along the features)")
    if not (seg_indptr.is_contiguous() and seg_adapter.is_contiguous() and ranks.is_contiguous()
            and scaling.is_contiguous()):
        raise ValueError("seg_indptr, seg_adapter, ranks and scaling must be contiguous")
    num_segments = seg_adapter.numel()
    if max_lora_length is None:
        lengths = (seg_indptr[1:] - seg_indptr[:-1]).masked_fill(seg_adapter < 0, 0)
        max_lora_length = int(lengths.max()) if num_segments else 0
    if max_lora_length == 0 or y.shape[1] == 0:
        return y

    max_rank = lora_a.shape[1]
    block_r = max(16, triton.next_power_of_2(max_rank))
    # Only the rows of LoRA segments are written, and only those are read back by expand.
    shrunk = torch.empty(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    # Triton's CPU interpreter multiplies bf16 tiles wrongly (numpy has no bf16): fp32 there.
    interpreter = interpreting()
    shrink, expand = (_lora_shrink_kernel, _lora_expand_kernel) if interpreter else (_lora_shrink_tuned,
                                                                                      _lora_expand_tuned)
    shrink_tiles = SHRINK_CONFIGS[0].kwargs if interpreter else {}
    expand_tiles = EXPAND_CONFIGS[0].kwargs if interpreter else {}
    shrink[lambda meta: (num_segments, triton.cdiv(max_lora_length, meta["BLOCK_T"]))](
        x, x.stride(0), seg_indptr, seg_adapter, lora_a, *lora_a.stride(), ranks, scaling,
        shrunk, shrunk.stride(0), x.shape[1], max_rank,
        DOT_FP32=x.dtype == torch.float32 or lora_a.dtype != x.dtype or interpreter,
        BLOCK_R=block_r, **shrink_tiles,
    )
    expand[lambda meta: (num_segments, triton.cdiv(max_lora_length, meta["BLOCK_T"]),
                         triton.cdiv(y.shape[1], meta["BLOCK_N"]))](
        shrunk, shrunk.stride(0), seg_indptr, seg_adapter, lora_b, *lora_b.stride(), ranks,
        y, y.stride(0), y.shape[1], max_rank,
        # An fp32 y keeps the low-rank product in fp32; a bf16/fp16 y is rounded to that dtype anyway.
        DOT_FP32=lora_b.dtype == torch.float32 or y.dtype == torch.float32 or interpreter,
        BLOCK_R=block_r, **expand_tiles,
    )
    return y


def lora_reference(y: torch.Tensor, x: torch.Tensor, seg_indptr: torch.Tensor, seg_adapter: torch.Tensor,
                   lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
                   scaling: torch.Tensor) -> torch.Tensor:
    """Torch implementation, out of place: ``y`` plus every segment's LoRA term, fp64 when any input
    is fp64, else fp32 (the tests' reference, and a CPU path). Slices each adapter to its rank
    instead of masking, and checks the segments the launcher trusts."""
    _check_lora_inputs(y, x, seg_indptr, seg_adapter, lora_a, lora_b, ranks, scaling)
    inputs = (y, x, lora_a, lora_b, scaling)
    compute = torch.float64 if any(tensor.dtype == torch.float64 for tensor in inputs) else torch.float32
    bounds, adapters, rank_of = seg_indptr.tolist(), seg_adapter.tolist(), ranks.tolist()
    if bounds[0] < 0 or bounds[-1] > x.shape[0] or any(end < start for start, end in zip(bounds, bounds[1:])):
        raise ValueError(f"seg_indptr must be non-decreasing within [0, {x.shape[0]}], got {bounds}")
    if any(not BASE_MODEL <= adapter < lora_a.shape[0] for adapter in adapters):
        raise ValueError(f"seg_adapter must hold slots below {lora_a.shape[0]} or {BASE_MODEL}, got {adapters}")
    if any(not 0 <= rank <= lora_a.shape[1] for rank in rank_of):
        raise ValueError(f"ranks must be within [0, {lora_a.shape[1]}], got {rank_of}")
    out = y.to(compute).clone()
    for segment, adapter in enumerate(adapters):
        if adapter == BASE_MODEL:
            continue
        start, end, rank = bounds[segment], bounds[segment + 1], rank_of[adapter]
        a = lora_a[adapter, :rank].to(compute)
        b = lora_b[adapter, :, :rank].to(compute)
        out[start:end] += scaling[adapter].to(compute) * (x[start:end].to(compute) @ a.T) @ b.T
    return out
