import re

import pytest
import torch

from poolserve_runtime.packing import (
    InvalidRequest,
    PackedBatch,
    SequenceLimits,
    read_sequences,
    token_budget_chunks,
)

LIMITS = SequenceLimits(vocab_size=100, max_model_len=8, type_vocab_size=2)


def test_unpads_right_padded_rows_in_order():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    types = torch.tensor([[0, 1, 1], [0, 0, 0]])
    seqs = read_sequences(ids, mask, types, LIMITS)
    assert seqs.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert seqs.lengths.tolist() == [3, 2]
    assert seqs.token_type_ids.tolist() == [0, 1, 1, 0, 0]


def test_without_mask_every_token_counts():
    seqs = read_sequences(torch.tensor([[1, 2, 0]]), None, None, LIMITS)
    assert seqs.lengths.tolist() == [3] and seqs.token_type_ids is None


@pytest.mark.parametrize(
    "ids, mask, types, message",
    [
        (torch.zeros((1, 0), dtype=torch.int64), None, None, "empty"),
        (torch.tensor([[1, 2]]), torch.tensor([[0, 0]]), None, "empty"),
        (torch.ones((1, 9), dtype=torch.int64), None, None, "more than the model's maximum of 8"),
        (torch.tensor([[1, 100]]), None, None, "token id 100 is out of vocabulary"),
        (torch.tensor([[1, -1]]), None, None, "token id -1 is out of vocabulary"),
        (torch.tensor([[1, 2]], dtype=torch.int32), None, None, "INT64"),
        (torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), None, "right padding"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 2]]), None, "only 0 and 1"),
        (torch.tensor([[1, 2]]), torch.tensor([[1, 1, 0]]), None, "does not match"),
        (torch.tensor([[1, 2]]), None, torch.tensor([[0, 2]]), "token_type_ids must be in [0, 2)"),
        (torch.tensor([[1, 2]]), None, torch.tensor([[0]]), "does not match"),
    ],
)
def test_rejects_bad_requests(ids, mask, types, message):
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        read_sequences(ids, mask, types, LIMITS)



def test_flat_form_reads_as_the_padded_form():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    types = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 0, 0]])
    padded = read_sequences(ids, mask, types, LIMITS)
    flat = read_sequences(torch.tensor([[5, 6, 7, 8, 9, 4]]), None, torch.tensor([[0, 1, 1, 0, 1, 1]]), LIMITS,
                          sequence_lengths=torch.tensor([[3, 2, 1]]))
    for name in ("input_ids", "lengths", "token_type_ids"):
        assert getattr(flat, name).tolist() == getattr(padded, name).tolist(), name
    assert flat.input_ids.tolist() == [5, 6, 7, 8, 9, 4] and flat.lengths.tolist() == [3, 2, 1]
    without_types = read_sequences(torch.tensor([[1, 2, 3]]), None, None, LIMITS,
                                   sequence_lengths=torch.tensor([[2, 1]]))
    assert without_types.lengths.tolist() == [2, 1] and without_types.token_type_ids is None


def _flat(ids, lengths, types=None, mask=None):
    return torch.tensor(ids), None if mask is None else torch.tensor(mask), types, torch.tensor(lengths)


@pytest.mark.parametrize(
    "ids, mask, types, lengths, message",
    [
        (*_flat([[1, 2, 3]], [[2, 0, 1]]), "sequence 1 of the request is empty"),
        (*_flat([[1, 2, 3]], [[4, -1]]), "sequence_lengths must be positive: sequence 1 has -1"),
        (*_flat([[1, 2, 3]], [[1, 1]]), "sequence_lengths sum to 2 tokens but input_ids holds 3"),
        (*_flat([[1, 2, 3]], [[2, 2]]), "sequence_lengths sum to 4 tokens but input_ids holds 3"),
        (*_flat([[1, 2], [3, 4]], [[2, 2]]), "input_ids must be [1, total_tokens], got shape [2, 2]"),
        (*_flat([[1, 2, 3]], [[2], [1]]), "sequence_lengths must be [1, sequences], got shape [2, 1]"),
        (*_flat([[1, 2, 3]], [[3]], mask=[[1, 1, 1]]), "attention_mask (padded rows) or sequence_lengths (flat)"),
        (*_flat([[1, 2, 3]], [[2, 1]], types=torch.tensor([[0, 1]])), "token_type_ids shape [1, 2] does not match"),
        (*_flat([[1, 2, 3]], [[2, 1]], types=torch.tensor([[0, 1, 2]])), "token_type_ids must be in [0, 2)"),
        (*_flat([[1, 100, 3]], [[2, 1]]), "token id 100 is out of vocabulary (size 100)"),
        (*_flat([[1] * 10], [[1, 9]]), "sequence 1 has 9 tokens, more than the model's maximum of 8"),
        (torch.ones((1, 0), dtype=torch.int64), None, None, torch.ones((1, 0), dtype=torch.int64),
         "sequence_lengths holds no sequence"),
        (torch.tensor([[1, 2]]), None, None, torch.tensor([[2]], dtype=torch.int32), "sequence_lengths must be INT64"),
    ],
)
def test_rejects_bad_flat_requests(ids, mask, types, lengths, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        read_sequences(ids, mask, types, LIMITS, sequence_lengths=lengths)


def test_pack_and_split_round_trip():
    first = read_sequences(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), None, LIMITS)
    second = read_sequences(torch.tensor([[6]]), None, torch.tensor([[1]]), LIMITS)
    batch = PackedBatch.pack([first, second])
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 6] and batch.cu_seqlens.dtype == torch.int32
    assert batch.token_type_ids.tolist() == [0, 0, 0, 0, 0, 1]  # missing types become zeros
    outputs = {"scores": torch.arange(3.0).unsqueeze(1)}
    split = batch.split(outputs)
    assert [part["scores"].flatten().tolist() for part in split] == [[0.0, 1.0], [2.0]]


@pytest.mark.parametrize(
    "lengths, budget, expected",
    [
        ([3, 3, 3], 6, [(0, 2), (2, 3)]),
        ([3, 3, 3], 100, [(0, 3)]),
        ([10, 1, 1], 4, [(0, 1), (1, 3)]),  # an over-budget sequence runs alone
        ([1, 10, 1], 4, [(0, 1), (1, 2), (2, 3)]),
        ([5], 1, [(0, 1)]),
        ([], 4, []),
    ],
)
def test_token_budget_chunks(lengths, budget, expected):
    assert token_budget_chunks(torch.tensor(lengths, dtype=torch.int64), budget) == expected
