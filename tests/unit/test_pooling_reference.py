"""The torch pooling path against a naive per-sequence float64 loop."""

import pytest
import torch

from poolserve_kernels.pooling import POOLING_METHODS, pool_reference


def naive(hidden, lengths, method):
    rows, start = [], 0
    for length in lengths:
        segment = hidden[start : start + length].double()
        start += length
        if method == "cls":
            rows.append(segment[0])
        elif method == "last":
            rows.append(segment[-1])
        else:
            mean = segment.mean(0)
            rows.append(mean / mean.norm() if method == "mean_normalized" else mean)
    return torch.stack(rows)


@pytest.mark.parametrize("method", POOLING_METHODS)
@pytest.mark.parametrize("lengths", [[1], [1, 1, 1], [5, 1, 300, 2], [7] * 50])
@pytest.mark.parametrize("hidden_size", [1, 384, 1000])
def test_matches_naive_loop(method, lengths, hidden_size):
    hidden = torch.randn(sum(lengths), hidden_size)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    got = pool_reference(hidden, cu, method)
    assert got.shape == (len(lengths), hidden_size) and got.dtype == hidden.dtype
    torch.testing.assert_close(got.double(), naive(hidden, lengths, method), rtol=1e-5, atol=1e-6)


def test_rejects_bad_layouts():
    with pytest.raises(ValueError, match="hidden must be"):
        pool_reference(torch.zeros(3), torch.tensor([0, 3], dtype=torch.int32), "cls")
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        pool_reference(torch.zeros(3, 2), torch.tensor([0.0, 3.0]), "cls")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_reference(torch.zeros(3, 2), torch.tensor([0, 3], dtype=torch.int32), "max")
