"""The MaxSim kernel against a float64 torch reference, on fresh random inputs each run (Triton's CPU
interpreter without a GPU, TRITON_INTERPRET=1 set by the root conftest; the compiled kernel on one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from poolserve_kernels.maxsim import maxsim_reference, maxsim_triton

# fp32 inputs: IEEE products, fp32 accumulation over at most a few thousand terms.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=5e-2)}

CASES = {
    # lengths per sequence, query index per sequence
    "query against itself": ([5], [0]),
    "one query, documents of every tile edge": ([7, 1, 16, 17, 31, 32, 33, 70], [0] * 8),
    "two requests packed": ([3, 9, 40, 20, 2, 18], [0, 0, 0, 3, 3, 3]),
    "long query": ([45, 12, 1], [0, 0, 0]),
}


def packed(lengths, dim, dtype, device):
    embeddings = F.normalize(torch.randn(sum(lengths), dim, device=device), dim=-1).to(dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
    return embeddings, cu


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dim", [96, 128, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_maxsim_matches_the_float64_reference(device, case, dim, dtype):
    lengths, queries = CASES[case]
    embeddings, cu = packed(lengths, dim, dtype, device)
    query_index = torch.tensor(queries, dtype=torch.int32, device=device)
    actual = maxsim_triton(embeddings, cu, query_index)
    expected = maxsim_reference(embeddings.double(), cu, query_index)
    assert actual.dtype == torch.float32 and not torch.isnan(actual).any()
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), **TOLERANCE[dtype])


def test_reference_is_vllms_compute_maxsim_score():
    """(q @ d.T).amax(-1).sum(), per (query, document), straight from the definition."""
    embeddings, cu = packed([4, 6, 3], 16, torch.float64, torch.device("cpu"))
    scores = maxsim_reference(embeddings, cu, torch.tensor([0, 0, 0]))
    q = embeddings[:4]
    for seq, (start, end) in enumerate([(0, 4), (4, 10), (10, 13)]):
        assert scores[seq].item() == pytest.approx((q @ embeddings[start:end].T).amax(-1).sum().item())
    assert scores[0].item() == pytest.approx(4.0)  # unit vectors against themselves: one per query token


def test_unnormalised_vectors_can_score_negative(device):
    """No clamp at zero: a document whose every token points away from the query scores below zero."""
    embeddings = torch.tensor([[1.0] * 16, [-1.0] * 16, [-2.0] * 16], device=device)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=device)
    scores = maxsim_triton(embeddings, cu, torch.tensor([0, 0], dtype=torch.int32, device=device))
    torch.testing.assert_close(scores.cpu(), torch.tensor([16.0, -16.0]))


def test_launcher_refuses_bad_inputs(device):
    embeddings, cu = packed([3, 4], 32, torch.float32, device)
    with pytest.raises(ValueError, match="query_index must be"):
        maxsim_triton(embeddings, cu, torch.tensor([0], device=device))
    with pytest.raises(ValueError, match="int32 or int64"):
        maxsim_triton(embeddings, cu, torch.tensor([0.0, 0.0], device=device))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        maxsim_triton(embeddings.double(), cu, torch.tensor([0, 0], device=device))
    with pytest.raises(ValueError, match="hidden must be"):
        maxsim_triton(embeddings[0], cu, torch.tensor([0, 0], device=device))
