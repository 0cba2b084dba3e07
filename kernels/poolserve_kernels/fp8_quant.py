"""Dynamic per-token FP8 (e4m3) quantisation of activations, the input side of an FP8 matmul.

Each row of ``x [tokens, features]`` gets one fp32 scale, ``amax(|row|) / 448`` (at least ``MIN_SCALE``,
so that a row of zeros divides safely), and is stored as ``clamp(row / scale, ±448)`` in
``float8_e4m3fn``: ``x ≈ q.float() * scale``. torch spells this as six elementwise passes over the
activations (cast, abs, amax, divide, clamp, cast); the kernel reads each row twice (once for its
amax, once to scale it) and writes one byte per element, which is what keeps the quantisation small
beside the FP8 GEMM it feeds. One program per row; the row is walked in ``BLOCK`` chunks, so any
width works (29,568 features for a 72B model's down projection).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12
# Elements one program reads per step: 4 KiB of bf16, wide enough to keep a row's loads coalesced and
# few enough registers that many rows run at once.
BLOCK = 2048


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, scale_ptr, features, x_row_stride, q_row_stride,
                            FP8_MAX_VALUE: tl.constexpr, MIN_SCALE_VALUE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * x_row_stride
    q_row = q_ptr + row.to(tl.int64) * q_row_stride
    offsets = tl.arange(0, BLOCK_SIZE)

    amax = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(0, features, BLOCK_SIZE):
        mask = start + offsets < features
        values = tl.load(x_row + start + offsets, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(values))
    # "/" by the constant, as torch divides a tensor by a Python number (measured equal bit for bit on an H100;
    # div_rn here was not, one ulp apart).
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX_VALUE, MIN_SCALE_VALUE)
    tl.store(scale_ptr + row, scale)

    for start in range(0, features, BLOCK_SIZE):
        mask = start + offsets < features
        values = tl.load(x_row + start + offsets, mask=mask, other=0.0).to(tl.float32)
        # div_rn: IEEE division, as torch divides by a tensor (Triton's "/" on fp32 tensors is approximate).
        scaled = tl.minimum(tl.maximum(tl.math.div_rn(values, scale), -FP8_MAX_VALUE), FP8_MAX_VALUE)
        # Rounded to the e4m3 grid here, to nearest with ties to even, so that the cast below is exact and the
        # result is torch's bit for bit wherever the kernel runs (Triton's CPU interpreter casts a value just
        # below a power of two, 126.7, down to 64). Normal e4m3 keeps 3 of fp32's 23 mantissa bits; below
        # 2**-6 (subnormal e4m3) the grid is multiples of 2**-9, which adding and removing 2**14 rounds to.
        bits = scaled.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        magnitude = (tl.abs(scaled) + 16384.0) - 16384.0
        # The sign put back as a bit, so that a negative value rounded to zero is -0.0 as torch's (a negation
        # compiles to 0 - x on the GPU, which is +0.0).
        subnormal = (magnitude.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)
        rounded = tl.where(tl.abs(scaled) < 0.015625, subnormal, normal)
        tl.store(q_row + start + offsets, rounded.to(q_ptr.dtype.element_ty), mask=mask)


def per_token_quant_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [tokens, features] float8_e4m3fn, scale [tokens, 1] fp32)`` of a 2-d CUDA tensor."""
    if x.dim() != 2:
        raise ValueError(f"per-token quantisation takes [tokens, features], got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    tokens, features = x.shape
    quantized = torch.empty((tokens, features), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((tokens, 1), dtype=torch.float32, device=x.device)
    if tokens:
        _per_token_quant_kernel[(tokens,)](
            x, quantized, scale, features, x.stride(0), quantized.stride(0),
            FP8_MAX_VALUE=FP8_MAX, MIN_SCALE_VALUE=MIN_SCALE, BLOCK_SIZE=min(BLOCK, triton.next_power_of_2(features)),
        )
    return quantized, scale


def per_token_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch spelling of :func:`per_token_quant_triton` (any device)."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
