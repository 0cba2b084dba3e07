"""Every kernel against a float64 torch reference, on fresh random inputs each run.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by the root conftest);
on a GPU the same tests run the compiled kernels. Outputs are poisoned with NaN first, so an
element the kernel forgot to write fails the test.
"""

from __future__ import annotations

import pytest
import torch

from poolserve_kernels.pooling import (
    EMBEDDING_POOLING,
    POOLING_METHODS,
    pool_normalized_reference,
    pool_normalized_triton,
    pool_reference,
    pool_triton,
)
from poolserve_kernels.score_head import score_head_reference, score_head_triton

# Per-dtype tolerances: the kernels accumulate in fp32; the result is rounded to the output dtype.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
HEAD_TOLERANCE = {  # fp32 outputs from an fp32 dot of upcast inputs: only accumulation order differs
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=1e-4, atol=1e-4),
}

LENGTH_CASES = {
    "single token": [1],
    "single sequence": [37],
    "length-one sequences": [1, 1, 1, 1, 1],
    "one long among short": [3, 1, 700, 2, 5],
    "just over a tile": [17, 16, 15, 33],
}


def dtypes(device):
    return [torch.float32, torch.float16, torch.bfloat16]


def packed(lengths, hidden_size, dtype, device):
    hidden = torch.randn(sum(lengths), hidden_size, device=device).to(dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
    return hidden, cu


def assert_close(actual, expected, tolerance, what):
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert not torch.isnan(actual).any(), f"{what}: {int(torch.isnan(actual).sum())} elements never written"
    bad = ~torch.isclose(actual, expected, **tolerance)
    if bad.any():
        first = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} mismatches, first at {first}: "
                             f"{actual[bad][:5].tolist()} vs {expected[bad][:5].tolist()}")


@pytest.mark.parametrize("method", POOLING_METHODS)
@pytest.mark.parametrize("case", LENGTH_CASES)
@pytest.mark.parametrize("hidden_size", [384, 1000, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_pooling(device, method, case, hidden_size, dtype):
    hidden, cu = packed(LENGTH_CASES[case], hidden_size, dtype, device)
    out = torch.full((cu.numel() - 1, hidden_size), float("nan"), dtype=dtype, device=device)
    pool_triton(hidden, cu, method, out=out)
    expected = pool_reference(hidden.double(), cu, method)
    assert_close(out, expected, TOLERANCE[dtype], f"{method} {case} h={hidden_size} {dtype}")


@pytest.mark.parametrize("method", POOLING_METHODS)
def test_pooling_thousands_of_sequences(device, method):
    lengths = torch.randint(1, 9, (1100,)).tolist()
    hidden, cu = packed(lengths, 64, torch.float32, device)
    out = torch.full((len(lengths), 64), float("nan"), device=device)
    pool_triton(hidden, cu, method, out=out)
    assert_close(out, pool_reference(hidden.double(), cu, method), TOLERANCE[torch.float32], method)


@pytest.mark.parametrize("method", EMBEDDING_POOLING)
@pytest.mark.parametrize("case", ["single token", "length-one sequences", "one long among short", "just over a tile"])
@pytest.mark.parametrize("hidden_size", [384, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pool_normalized(device, method, case, hidden_size, dtype):
    """An embedding model's pooled rows (fp32, never normalised) and their L2-normalised copy."""
    hidden, cu = packed(LENGTH_CASES[case], hidden_size, dtype, device)
    pooled, normalized = pool_normalized_triton(hidden, cu, method)
    assert pooled.dtype == torch.float32 and normalized.dtype == dtype
    expected_pooled, expected_normalized = pool_normalized_reference(hidden.double(), cu, method)
    # The pooled rows are fp32 sums of the inputs: only accumulation order differs from fp64.
    assert_close(pooled, expected_pooled, TOLERANCE[torch.float32], f"pooled {method} {case}")
    assert_close(normalized, expected_normalized, TOLERANCE[dtype], f"normalized {method} {case}")
    norms = normalized.double().norm(dim=1).cpu()
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=TOLERANCE[dtype]["atol"] * 4)


def test_pool_normalized_mean_equals_mean_normalized(device):
    """The normalised mean of an embedding model is bit for bit the existing mean_normalized pooling."""
    hidden, cu = packed([3, 1, 40, 17], 384, torch.bfloat16, device)
    _, normalized = pool_normalized_triton(hidden, cu, "mean")
    assert torch.equal(normalized, pool_triton(hidden, cu, "mean_normalized"))
    _, reference = pool_normalized_reference(hidden, cu, "mean")
    assert torch.equal(reference, pool_reference(hidden, cu, "mean_normalized"))


def test_pool_normalized_keeps_a_zero_row_finite(device):
    hidden, cu = packed([2, 3], 64, torch.float32, device)
    hidden[:2] = 0.0
    pooled, normalized = pool_normalized_triton(hidden, cu, "cls")
    assert torch.equal(normalized[0].cpu(), torch.zeros(64)) and torch.isfinite(normalized).all()
    with pytest.raises(ValueError, match="unknown pooling method"):
        pool_normalized_triton(hidden, cu, "mean_normalized")


@pytest.mark.parametrize("activation", ["identity", "sigmoid", "softmax"])
@pytest.mark.parametrize("num_labels", [1, 2, 7, 32])
@pytest.mark.parametrize("gather", ["rows", "cls", "last"])
@pytest.mark.parametrize("hidden_size", [384, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_score_head(device, activation, num_labels, gather, hidden_size, dtype):
    lengths = [1, 5, 300, 2, 9, 1, 17, 4, 3, 11, 2, 6, 8, 1, 30, 2, 5]  # 17 sequences: two BLOCK_N tiles
    hidden, cu = packed(lengths, hidden_size, dtype, device)
    x = hidden[: len(lengths)].contiguous() if gather == "rows" else hidden
    weight = (torch.randn(num_labels, hidden_size, device=device) / hidden_size**0.5).to(dtype)
    bias = torch.randn(num_labels, device=device).to(dtype)
    n = len(lengths)
    out = (torch.full((n, num_labels), float("nan"), device=device), torch.full((n, num_labels), float("nan"), device=device))
    score_head_triton(x, weight, bias, activation, gather=gather, cu_seqlens=cu, logit_mean=0.3, logit_sigma=1.7, out=out)
    logits, scores = score_head_reference(x.double(), weight.double(), bias.double(), activation, gather=gather,
                                          cu_seqlens=cu, logit_mean=0.3, logit_sigma=1.7)
    assert_close(out[0], logits, HEAD_TOLERANCE[dtype], "logits")
    assert_close(out[1], scores, HEAD_TOLERANCE[dtype], "scores")


def test_score_head_without_bias_single_sequence(device):
    hidden, cu = packed([7], 1536, torch.float32, device)
    weight = torch.randn(1, 1536, device=device) / 40
    logits, scores = score_head_triton(hidden, weight, None, "sigmoid", gather="last", cu_seqlens=cu)
    ref_logits, ref_scores = score_head_reference(hidden.double(), weight.double(), None, "sigmoid", gather="last", cu_seqlens=cu)
    assert_close(logits, ref_logits, HEAD_TOLERANCE[torch.float32], "logits")
    assert_close(scores, ref_scores, HEAD_TOLERANCE[torch.float32], "scores")


def test_score_head_many_sequences(device):
    hidden, cu = packed(torch.randint(1, 4, (1500,)).tolist(), 64, torch.float32, device)
    weight, bias = torch.randn(3, 64, device=device) / 8, torch.randn(3, device=device)
    out = (torch.full((1500, 3), float("nan"), device=device), torch.full((1500, 3), float("nan"), device=device))
    score_head_triton(hidden, weight, bias, "softmax", gather="cls", cu_seqlens=cu, out=out)
    logits, scores = score_head_reference(hidden.double(), weight.double(), bias.double(), "softmax", gather="cls", cu_seqlens=cu)
    assert_close(out[1], scores, HEAD_TOLERANCE[torch.float32], "scores")


def test_launchers_refuse_bad_inputs(device):
    hidden, cu = packed([3, 4], 64, torch.float32, device)
    with pytest.raises(ValueError, match="hidden must be bf16, fp16 or fp32"):
        pool_triton(hidden.double(), cu, "mean")
    with pytest.raises(ValueError, match="rows must be contiguous"):
        pool_triton(hidden.t().contiguous().t(), cu, "mean")
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64"):
        pool_triton(hidden, cu.float(), "mean")
    with pytest.raises(ValueError, match="unknown pooling method"):
        pool_triton(hidden, cu, "max")
    with pytest.raises(ValueError, match="out must be"):
        pool_triton(hidden, cu, "mean", out=torch.empty(3, 64, device=device))
    with pytest.raises(ValueError, match="1..32 labels"):
        score_head_triton(hidden, torch.randn(33, 64, device=device), None, "softmax")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        score_head_triton(hidden, torch.randn(2, 64, device=device), None, "softmax", gather="cls")
    with pytest.raises(ValueError, match="activation must be"):
        score_head_triton(hidden, torch.randn(2, 64, device=device), None, "tanh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors are fine for the interpreter only")
def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, cu = packed([3], 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        pool_triton(hidden, cu, "cls")
