"""The per-token FP8 quantisation kernel against a float64 reference (Triton's CPU interpreter without a
GPU, TRITON_INTERPRET=1 set by the root conftest; the compiled kernel on one)."""

from __future__ import annotations

import pytest
import torch

from poolserve_kernels.fp8_quant import FP8_DTYPE, FP8_MAX, MIN_SCALE, per_token_quant_reference, per_token_quant_triton

# tokens x features: one row, rows narrower than a block, a width that is not a multiple of the block, and
# several blocks per row (the second pass walks the row again).
SHAPES = [(1, 16), (5, 64), (7, 1000), (3, 4500)]


def float64_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.double()
    scale = (rows.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return (rows / scale).clamp(-FP8_MAX, FP8_MAX), scale


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_token_quant_matches_the_float64_reference(device, shape, dtype):
    x = (torch.randn(shape, device=device) * torch.logspace(-3, 3, shape[0], device=device)[:, None]).to(dtype)
    quantized, scale = per_token_quant_triton(x)
    assert quantized.dtype == FP8_DTYPE and quantized.shape == shape
    assert scale.dtype == torch.float32 and scale.shape == (shape[0], 1)
    expected_values, expected_scale = float64_reference(x)
    torch.testing.assert_close(scale.double().cpu(), expected_scale.cpu(), rtol=1e-6, atol=0)
    # Each element is the scaled value rounded to e4m3: within half an e4m3 step (3 mantissa bits: 1/16
    # relative) of the exact quotient, and every row's largest element lands on ±448 exactly.
    values = quantized.double().cpu()
    exact = expected_values.cpu()
    assert ((values - exact).abs() <= exact.abs() / 16 + 2 ** -10).all()
    assert torch.equal(values.abs().amax(dim=-1), torch.full((shape[0],), FP8_MAX, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_token_quant_rounds_as_torch_does(device, dtype):
    """Bit for bit the torch spelling: the same scale, and the same e4m3 value for every element."""
    x = torch.randn(9, 300, device=device).to(dtype)
    quantized, scale = per_token_quant_triton(x)
    expected, expected_scale = per_token_quant_reference(x)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(quantized.view(torch.uint8), expected.view(torch.uint8))


def test_rows_of_zeros_and_strided_rows(device):
    x = torch.zeros(4, 80, device=device)
    x[1] = torch.linspace(-3, 5, 80, device=device)
    wide = torch.cat([x, torch.ones(4, 20, device=device)], dim=1)[:, :80]  # row stride 100, not 80
    for tensor in (x, wide):
        quantized, scale = per_token_quant_triton(tensor)
        assert torch.equal(scale[0], torch.tensor([MIN_SCALE], device=device))
        assert torch.equal(quantized[0].float(), torch.zeros(80, device=device))
        assert quantized[1].float().max().item() == FP8_MAX


def test_no_rows(device):
    quantized, scale = per_token_quant_triton(torch.empty(0, 64, device=device))
    assert quantized.shape == (0, 64) and scale.shape == (0, 1)


def test_refuses_other_ranks(device):
    with pytest.raises(ValueError, match="tokens, features"):
        per_token_quant_triton(torch.ones(2, 3, 4, device=device))


def test_rounding_at_the_edges_of_the_e4m3_grid(device):
    """Ties to even, values just below a power of two (the mantissa carries into the exponent), subnormal
    e4m3 (below 2**-6: multiples of 2**-9) and its ties, all as torch casts them; the row's max sets scale 1."""
    edges = [448.0, 126.7, -127.99, 0.01, -0.003, 0.0234375, 2.5 * 2 ** -9, 3.5 * 2 ** -9, -0.5 * 2 ** -9,
             0.49 * 2 ** -9, 9.0, 11.0, 13.0, 0.015625, 0.0156, 247.9, 240.0]
    x = torch.tensor([edges], device=device)
    quantized, scale = per_token_quant_triton(x)
    expected, _ = per_token_quant_reference(x)
    assert scale.item() == 1.0
    assert quantized.view(torch.uint8).tolist() == expected.view(torch.uint8).tolist()
