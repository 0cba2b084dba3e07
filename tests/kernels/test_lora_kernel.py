"""The segmented multi-LoRA kernel against a float64 torch reference and against PEFT's merged-weight
math (Triton's CPU interpreter without a GPU, TRITON_INTERPRET=1 set by the root conftest; the
compiled kernels on one). Shapes stay small: every program is interpreted on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from poolserve_kernels.lora import (
    BASE_MODEL,
    EXPAND_CONFIGS,
    SHRINK_CONFIGS,
    apply_lora,
    lora_reference,
    lora_segments,
    stack_lora_weights,
)

# fp32 out: only accumulation order differs from fp64. bf16 out: one final rounding of y.
# The largest token block any tile config uses: segments longer than it cross blocks whichever config runs.
BLOCK_T = max(config.kwargs["BLOCK_T"] for config in SHRINK_CONFIGS + EXPAND_CONFIGS)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
RANKS = (4, 8, 16)
ALPHAS = (8.0, 16.0, 8.0)  # scaling alpha / r: 2, 2 and 0.5

CASES = {
    # per-sequence lengths, per-sequence adapter slot (-1: base model)
    "three adapters and the base, interleaved": ([5, 33, 1, 17, 40, 2, 9], [0, BASE_MODEL, 2, 1, 0, BASE_MODEL, 1]),
    "one segment longer than a token block": ([BLOCK_T * 2 + 3], [2]),
    "neighbours of one adapter merge": ([3, 4, 30, 7], [1, 1, 1, 0]),
    "empty sequences": ([0, 6, 0, 0, 11, 0], [0, 1, 2, BASE_MODEL, 2, 1]),
}


def adapters(in_features, out_features, dtype, device, ranks=RANKS):
    pairs = [(torch.randn(rank, in_features, device=device) / in_features ** 0.5,
              torch.randn(out_features, rank, device=device) / rank ** 0.5) for rank in ranks]
    lora_a, lora_b, rank_tensor = stack_lora_weights(pairs, dtype=dtype)
    scaling = torch.tensor([alpha / rank for alpha, rank in zip(ALPHAS, ranks)], device=device)
    return lora_a, lora_b, rank_tensor, scaling


def batch(lengths, sequence_adapters, in_features, out_features, dtype, device):
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    segments = lora_segments(cu, sequence_adapters, device=device)
    x = torch.randn(cu[-1], in_features, device=device).to(dtype)
    y = torch.randn(cu[-1], out_features, device=device).to(dtype)
    return segments, x, y


def poison_padding(lora_a, lora_b, ranks):
    """NaN where a rank's padding is: the kernel must mask it, never multiply it by zero."""
    for slot, rank in enumerate(ranks.tolist()):
        lora_a[slot, rank:] = float("nan")
        lora_b[slot, :, rank:] = float("nan")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("features", [(67, 45), (16, 130)], ids=lambda f: f"{f[0]}to{f[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_matches_the_float64_reference(device, case, features, dtype):
    lengths, sequence_adapters = CASES[case]
    in_features, out_features = features
    segments, x, y = batch(lengths, sequence_adapters, in_features, out_features, dtype, device)
    lora_a, lora_b, ranks, scaling = adapters(in_features, out_features, dtype, device)
    expected = lora_reference(y.double(), x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling)
    poison_padding(lora_a, lora_b, ranks)
    base_rows = torch.repeat_interleave(torch.tensor([a == BASE_MODEL for a in sequence_adapters], device=device),
                                        torch.tensor(lengths, device=device))
    before = y.clone()

    result = apply_lora(y, x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling,
                        max_lora_length=segments.max_lora_length)

    assert result is y and y.dtype == dtype and not torch.isnan(y).any()
    torch.testing.assert_close(y.double().cpu(), expected.cpu(), **TOLERANCE[dtype])
    assert torch.equal(y[base_rows], before[base_rows]), "base-model rows must be left untouched"


def test_bf16_inputs_accumulate_in_fp32(device):
    """bf16 x and adapters into an fp32 y: the rank-r intermediate is never rounded to bf16, so the
    result is within fp32 accumulation error of the fp64 product of the same bf16 values."""
    segments, x, y = batch([9, 40, 3], [0, 2, 1], 67, 45, torch.bfloat16, device)
    y = y.float()
    lora_a, lora_b, ranks, scaling = adapters(67, 45, torch.bfloat16, device)
    expected = lora_reference(y.double(), x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling)
    apply_lora(y, x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling)
    torch.testing.assert_close(y.double().cpu(), expected.cpu(), **TOLERANCE[torch.float32])


def test_all_base_batch_and_empty_stream_leave_y_alone(device):
    segments, x, y = batch([7, 20, 1], [BASE_MODEL] * 3, 16, 24, torch.float32, device)
    assert segments.max_lora_length == 0 and segments.adapter.tolist() == [BASE_MODEL]
    lora_a, lora_b, ranks, scaling = adapters(16, 24, torch.float32, device)
    before = y.clone()
    apply_lora(y, x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling)
    assert torch.equal(y, before)
    empty = lora_segments([0], [], device=device)
    nothing = torch.zeros(0, 24, device=device)
    apply_lora(nothing, torch.zeros(0, 16, device=device), empty.indptr, empty.adapter, lora_a, lora_b, ranks, scaling)


def test_base_segments_never_read_an_adapter(device):
    """Slot -1 is "no adapter", not an index: the adapter buffers here are views one slot into larger
    stacks whose slot before slot 0 holds a real adapter, so a base segment that indexed slot -1 would
    change its rows."""
    segments, x, y = batch([5, 12, 3], [BASE_MODEL, 0, BASE_MODEL], 16, 24, torch.float32, device)
    lora_a, lora_b, ranks, scaling = adapters(16, 24, torch.float32, device, ranks=(8, 4, 8))
    views = lora_a[1:], lora_b[1:], ranks[1:], scaling[1:]
    expected = lora_reference(y.double(), x, segments.indptr, segments.adapter, *views)
    apply_lora(y, x, segments.indptr, segments.adapter, *views, max_lora_length=segments.max_lora_length)
    torch.testing.assert_close(y.double().cpu(), expected.cpu(), **TOLERANCE[torch.float32])


def test_grid_size_read_from_the_device_when_not_given(device):
    """Without max_lora_length the launcher measures the longest LoRA segment itself; a long base
    segment must not be what it measures (nor shorten the grid below the longest LoRA segment)."""
    segments, x, y = batch([3, BLOCK_T * 3 + 1, 2], [0, 1, BASE_MODEL], 32, 20, torch.float32, device)
    lora_a, lora_b, ranks, scaling = adapters(32, 20, torch.float32, device)
    expected = lora_reference(y.double(), x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling)
    apply_lora(y, x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling)
    torch.testing.assert_close(y.double().cpu(), expected.cpu(), **TOLERANCE[torch.float32])


def test_segments_merge_neighbours_and_keep_the_packed_order():
    segments = lora_segments([0, 2, 5, 5, 9, 10, 14], [1, 1, BASE_MODEL, 0, 0, 1])
    assert segments.indptr.tolist() == [0, 5, 5, 10, 14]
    assert segments.adapter.tolist() == [1, BASE_MODEL, 0, 1]
    assert segments.indptr.dtype == segments.adapter.dtype == torch.int32
    assert segments.max_lora_length == 5
    with pytest.raises(ValueError, match="expected one more"):
        lora_segments([0, 3], [0, 1])
    with pytest.raises(ValueError, match="adapter slots"):
        lora_segments([0, 3], [-2])


class PeftStyleLoraLinear(nn.Module):
    """PEFT's ``lora.Linear`` forward for one active adapter, as PEFT writes it: the base layer, plus
    ``lora_B(lora_A(x)) * scaling`` with ``lora_A = Linear(in, r)``, ``lora_B = Linear(r, out)`` (no
    bias) and ``scaling = lora_alpha / r``; merging adds ``scaling * B.weight @ A.weight`` to W."""

    def __init__(self, base: nn.Linear, rank: int, lora_alpha: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)  # PEFT starts B at zero; a trained adapter is not
        self.scaling = lora_alpha / rank

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def merged_weight(self):
        return self.base_layer.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight


def test_equals_peft_merged_linear_per_adapter(device):
    """One nn.Linear with three adapters of ranks 4, 8, 16 and the base model in one packed batch:
    each sequence's rows equal that adapter's PEFT-merged layer (the base layer's for the base)."""
    torch.manual_seed(0)
    base = nn.Linear(23, 19).to(device)
    layers = [PeftStyleLoraLinear(base, rank, alpha).to(device) for rank, alpha in zip(RANKS, ALPHAS)]
    lora_a, lora_b, ranks = stack_lora_weights([(layer.lora_A.weight, layer.lora_B.weight) for layer in layers])
    scaling = torch.tensor([layer.scaling for layer in layers], device=device)
    lengths, sequence_adapters = [6, 3, 18, 1, 9], [2, BASE_MODEL, 0, 1, 2]
    segments, x, _ = batch(lengths, sequence_adapters, 23, 19, torch.float32, device)

    with torch.no_grad():
        y = base(x)
        apply_lora(y, x, segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling,
                   max_lora_length=segments.max_lora_length)
        start = 0
        for length, slot in zip(lengths, sequence_adapters):
            rows = x[start:start + length]
            if slot == BASE_MODEL:
                expected = base(rows)
            else:
                expected = F.linear(rows, layers[slot].merged_weight(), base.bias)
                torch.testing.assert_close(layers[slot](rows), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y[start:start + length], expected, rtol=1e-5, atol=1e-5)
            start += length


def test_launcher_refuses_bad_inputs(device):
    segments, x, y = batch([4, 5], [0, 1], 16, 24, torch.float32, device)
    lora_a, lora_b, ranks, scaling = adapters(16, 24, torch.float32, device)
    args = (segments.indptr, segments.adapter, lora_a, lora_b, ranks, scaling)
    with pytest.raises(ValueError, match="must be \\[total_tokens, in\\]"):
        apply_lora(y[:3], x, *args)
    with pytest.raises(ValueError, match="lora_b \\[adapters, 24"):
        apply_lora(y, x, segments.indptr, segments.adapter, lora_a, lora_b[:, :20], ranks, scaling)
    with pytest.raises(ValueError, match="ranks and scaling"):
        apply_lora(y, x, segments.indptr, segments.adapter, lora_a, lora_b, ranks[:2], scaling)
    with pytest.raises(ValueError, match="seg_adapter \\[segments\\]"):
        apply_lora(y, x, segments.indptr, segments.adapter[:1], lora_a, lora_b, ranks, scaling)
    with pytest.raises(ValueError, match="int32 or int64"):
        apply_lora(y, x, segments.indptr.float(), *args[1:])
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        apply_lora(y.double(), x, *args)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        apply_lora(y.T.contiguous().T, x, *args)
    with pytest.raises(ValueError, match="ranks must be within"):
        lora_reference(y, x, segments.indptr, segments.adapter, lora_a, lora_b, ranks + 16, scaling)
    with pytest.raises(ValueError, match="non-decreasing"):
        lora_reference(y, x, segments.indptr.flip(0), segments.adapter, lora_a, lora_b, ranks, scaling)
    with pytest.raises(ValueError, match="must be \\[r, 16\\]"):
        stack_lora_weights([(torch.zeros(4, 16), torch.zeros(24, 4)), (torch.zeros(8, 15), torch.zeros(24, 8))])
