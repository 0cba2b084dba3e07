"""The flat token form (``input_ids`` ``[1, total_tokens]`` + ``sequence_lengths``) over raw gRPC.

It must answer exactly what the padded form answers for the same sequences, and a bad flat request
must fail alone while good ones batched with it are answered.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tests.integration.test_triton_models import TOLERANCE, mixed_texts, tokenize

pytestmark = pytest.mark.integration


def _inputs(**arrays: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def padded_and_flat(encoded) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The same sequences as a padded request's arrays and as a flat request's."""
    padded = {name: tensor.numpy().astype(np.int64) for name, tensor in encoded.items()}
    keep = padded["attention_mask"].astype(bool)
    flat = {"input_ids": padded["input_ids"][keep][None, :],
            "sequence_lengths": padded["attention_mask"].sum(axis=1)[None, :]}
    if "token_type_ids" in padded:
        flat["token_type_ids"] = padded["token_type_ids"][keep][None, :]
    return padded, flat


@pytest.mark.parametrize("folder, pairs", [("bert_classifier", True), ("qwen2_classifier", False)])
def test_flat_request_answers_exactly_as_the_padded_one(triton_server, tiny_checkpoints, folder, pairs):
    texts = mixed_texts(seed=11)
    encoded = tokenize(tiny_checkpoints[folder], texts, list(reversed(texts)) if pairs else None)
    padded, flat = padded_and_flat(encoded)
    assert ("token_type_ids" in flat) == pairs
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    # One request at a time, so each is an execute() of its own and both pack the same stream.
    from_padded = client.infer(folder, _inputs(**padded))
    from_flat = client.infer(folder, _inputs(**flat))
    for name in ("logits", "scores"):
        assert from_flat.as_numpy(name).shape == (len(texts), from_padded.as_numpy(name).shape[1])
        np.testing.assert_array_equal(from_flat.as_numpy(name), from_padded.as_numpy(name))


def test_bad_flat_requests_fail_alone_beside_good_ones(triton_server, tiny_checkpoints):
    folder = "bert_classifier"
    texts = mixed_texts(seed=12)
    padded, flat = padded_and_flat(tokenize(tiny_checkpoints[folder], texts, texts))
    expected = grpcclient.InferenceServerClient(triton_server.grpc_url).infer(
        folder, _inputs(**padded)).as_numpy("scores")
    ids, lengths, types = flat["input_ids"], flat["sequence_lengths"], flat["token_type_ids"]
    total = ids.shape[1]
    cls = int(ids[0, 0])
    bad = {  # each with the good requests' set of inputs unless the case is another set
        "sum": dict(input_ids=ids, sequence_lengths=lengths + 1, token_type_ids=types),
        "zero length": dict(input_ids=ids, sequence_lengths=np.array([[total, 0]]), token_type_ids=types),
        "negative length": dict(input_ids=ids, sequence_lengths=np.array([[total + 2, -2]]), token_type_ids=types),
        "two rows": dict(input_ids=np.array([[cls, 5], [cls, 6]]), sequence_lengths=np.array([[2], [2]]),
                         token_type_ids=np.zeros((2, 2), np.int64)),
        "with a mask": dict(input_ids=ids, sequence_lengths=lengths, attention_mask=np.ones_like(ids)),
        "short token types": dict(input_ids=ids, sequence_lengths=lengths, token_type_ids=types[:, 1:]),
        "out of vocabulary": dict(input_ids=np.array([[cls, 10_000]]), sequence_lengths=np.array([[2]]),
                                  token_type_ids=np.zeros((1, 2), np.int64)),
        "too long": dict(input_ids=np.full((1, 130), cls), sequence_lengths=np.array([[1, 129]]),
                         token_type_ids=np.zeros((1, 130), np.int64)),  # the tiny BERT takes 128
    }

    async def run():
        async with grpcaio.InferenceServerClient(triton_server.grpc_url) as client:
            calls = []
            for case in bad.values():  # each bad request between two good ones
                calls.append(client.infer(folder, _inputs(**flat)))
                calls.append(client.infer(folder, _inputs(**{k: np.asarray(v, np.int64) for k, v in case.items()})))
            calls.append(client.infer(folder, _inputs(**flat)))
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    goods, bads = results[0::2], results[1::2]
    assert len(goods) == len(bad) + 1 and len(bads) == len(bad)
    for result in goods:
        assert not isinstance(result, Exception), result
        np.testing.assert_allclose(result.as_numpy("scores"), expected, **TOLERANCE)
    messages = {}
    for name, error in zip(bad, bads, strict=True):
        assert isinstance(error, InferenceServerException), f"{name} was accepted"
        assert error.status() == "StatusCode.INVALID_ARGUMENT", (name, error.status(), error.message())
        messages[name] = error.message()
    assert f"sum to {total + len(texts)} tokens but input_ids holds {total}" in messages["sum"]
    assert "sequence 1 of the request is empty" in messages["zero length"]
    assert "must be positive: sequence 1 has -2" in messages["negative length"]
    assert "input_ids must be [1, total_tokens], got shape [2, 2]" in messages["two rows"]
    assert "attention_mask (padded rows) or sequence_lengths (flat), not both" in messages["with a mask"]
    assert f"token_type_ids shape [1, {total - 1}] does not match" in messages["short token types"]
    assert "token id 10000 is out of vocabulary" in messages["out of vocabulary"]
    assert "more than the model's maximum of 128" in messages["too long"]
