"""The real tritonserver serving every architecture, checked against Hugging Face over raw gRPC.

Reference: the stock HF model on the same checkpoint, float32, CPU, one padded batch with an
attention mask (the way users run these models). The activation is stated per model here, not
taken from the runtime, so a wrong activation rule fails too.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tests.support.tiny_models import random_text

pytestmark = pytest.mark.integration

CLASSIFIERS = {
    # folder: (activation the model must apply, whether it takes text pairs with token types)
    "bert_classifier": ("softmax", True),
    "xlm_roberta_classifier": ("sigmoid", True),
    "qwen2_classifier": ("softmax", False),
    "qwen3_classifier": ("sigmoid", False),
    "llama_classifier": ("identity", False),  # problem_type=regression: a reward model
}
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def tokenize(checkpoint, texts, pairs=None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    encoded = tokenizer(
        texts, pairs, padding=True, truncation=True, max_length=100, return_tensors="pt",
        return_token_type_ids=pairs is not None,
    )
    return encoded


def hf_reference(folder, checkpoint, encoded):
    from transformers import AutoModel, AutoModelForSequenceClassification

    with torch.inference_mode():
        if folder == "bert_embedder":
            model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1)
            return torch.nn.functional.normalize(mean, dim=-1).numpy()
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32).eval()
        logits = model(**encoded).logits
        activation = CLASSIFIERS[folder][0]
        if activation == "softmax":
            return torch.softmax(logits, -1).numpy()
        if activation == "sigmoid":
            return torch.sigmoid(logits).numpy()
        return logits.numpy()


def mixed_texts(seed, count=7):
    rng = random.Random(seed)
    lengths = [1, 2, 40, 5, 17, 3, 60][:count]  # in words; the tokenizers split further
    return [random_text(rng, n) for n in lengths]


def as_inputs(encoded, names=("input_ids", "attention_mask", "token_type_ids")):
    inputs = []
    for name in names:
        if name in encoded:
            array = encoded[name].numpy().astype(np.int64)
            tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
    return inputs


def output_name(folder):
    return "embeddings" if folder == "bert_embedder" else "scores"


def unpadded_rows(encoded):
    """One request per sequence, without padding: what ragged batching receives."""
    rows = []
    for i in range(encoded["input_ids"].shape[0]):
        length = int(encoded["attention_mask"][i].sum())
        rows.append({k: v[i : i + 1, :length] for k, v in encoded.items()})
    return rows


@pytest.mark.parametrize("folder", [*CLASSIFIERS, "bert_embedder"])
def test_padded_request_matches_hf(triton_server, tiny_checkpoints, folder):
    checkpoint = tiny_checkpoints[folder]
    encoded = tokenize(checkpoint, mixed_texts(seed=1))
    expected = hf_reference(folder, checkpoint, encoded)
    assert expected.std(axis=0).max() > 1e-3, "scores must depend on the input for the check to mean anything"

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    result = client.infer(folder, as_inputs(encoded))
    np.testing.assert_allclose(result.as_numpy(output_name(folder)), expected, **TOLERANCE)


@pytest.mark.parametrize("folder", [name for name, (_, pairs) in CLASSIFIERS.items() if pairs])
def test_text_pairs_with_token_types_match_hf(triton_server, tiny_checkpoints, folder):
    checkpoint = tiny_checkpoints[folder]
    queries = mixed_texts(seed=2, count=5)
    documents = mixed_texts(seed=3, count=5)[::-1]
    encoded = tokenize(checkpoint, queries, documents)
    if folder == "bert_classifier":
        assert int(encoded["token_type_ids"].max()) == 1, "BERT pairs must carry segment ids"
    expected = hf_reference(folder, checkpoint, encoded)

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    result = client.infer(folder, as_inputs(encoded))
    np.testing.assert_allclose(result.as_numpy("scores"), expected, **TOLERANCE)


async def _infer_all(url, folder, requests, outputs=None):
    async with grpcaio.InferenceServerClient(url) as client:
        calls = [client.infer(folder, as_inputs(r), outputs=outputs) for r in requests]
        return await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.parametrize("folder", [*CLASSIFIERS, "bert_embedder"])
def test_concurrent_ragged_requests_batch_together_and_match(triton_server, tiny_checkpoints, folder):
    checkpoint = tiny_checkpoints[folder]
    encoded = tokenize(checkpoint, mixed_texts(seed=4) * 3)
    expected = hf_reference(folder, checkpoint, encoded)

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    before = client.get_inference_statistics(folder, as_json=True)["model_stats"][0]
    results = asyncio.run(_infer_all(triton_server.grpc_url, folder, unpadded_rows(encoded)))
    deadline = time.monotonic() + 10  # statistics are recorded just after the responses go out
    while True:
        after = client.get_inference_statistics(folder, as_json=True)["model_stats"][0]
        done = int(after["inference_count"]) - int(before.get("inference_count", 0))
        if done >= len(results) or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    got = np.concatenate([r.as_numpy(output_name(folder)) for r in results])
    np.testing.assert_allclose(got, expected, **TOLERANCE)
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == len(results)
    assert executions < inferences, "ragged requests of different lengths must share executions"


def test_requested_outputs_only(triton_server, tiny_checkpoints):
    encoded = tokenize(tiny_checkpoints["bert_classifier"], ["good movie"])
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    result = client.infer("bert_classifier", as_inputs(encoded), outputs=[grpcclient.InferRequestedOutput("logits")])
    assert [o.name for o in result.get_response().outputs] == ["logits"]
    assert result.as_numpy("logits").shape == (1, 3)


def _array_request(ids, dtype="INT64", mask=None, types=None):
    inputs = []
    for name, array in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types)):
        if array is None:
            continue
        tensor = grpcclient.InferInput(name, list(array.shape), dtype if name == "input_ids" else "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_bad_requests_fail_alone_and_neighbours_stay_correct(triton_server, tiny_checkpoints):
    folder = "bert_classifier"
    checkpoint = tiny_checkpoints[folder]
    good = unpadded_rows(tokenize(checkpoint, mixed_texts(seed=5)))
    expected = hf_reference(folder, checkpoint, tokenize(checkpoint, mixed_texts(seed=5)))
    cls = int(good[0]["input_ids"][0, 0])
    bad = {
        "empty": _array_request(np.zeros((1, 0), np.int64)),
        "masked out": _array_request(np.array([[cls, 5]], np.int64), mask=np.zeros((1, 2), np.int64)),
        "too long": _array_request(np.full((1, 129), cls, np.int64)),  # the tiny BERT takes 128
        "out of vocabulary": _array_request(np.array([[cls, 10_000]], np.int64)),
        "negative id": _array_request(np.array([[cls, -3]], np.int64)),
        "bad token type": _array_request(np.array([[cls, 5]], np.int64), types=np.array([[0, 7]], np.int64)),
        "wrong dtype": _array_request(np.array([[cls, 5]], np.int32), dtype="INT32"),
    }

    async def run():
        async with grpcaio.InferenceServerClient(triton_server.grpc_url) as client:
            calls = []
            for index, row in enumerate(good):  # interleave good and bad requests
                calls.append(client.infer(folder, as_inputs(row)))
                if index < len(bad):
                    calls.append(client.infer(folder, list(bad.values())[index]))
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    goods = [r for i, r in enumerate(results) if i % 2 == 0 or i >= 2 * len(bad)]
    bads = [r for i, r in enumerate(results) if i % 2 == 1 and i < 2 * len(bad)]
    assert len(goods) == len(good) and len(bads) == len(bad)
    np.testing.assert_allclose(np.concatenate([r.as_numpy("scores") for r in goods]), expected, **TOLERANCE)

    messages = {}
    for name, error in zip(bad, bads):
        assert isinstance(error, InferenceServerException), f"{name} was accepted"
        assert error.status() == "StatusCode.INVALID_ARGUMENT", (name, error.status(), error.message())
        messages[name] = error.message()
    assert "empty" in messages["empty"] and "empty" in messages["masked out"]
    assert "more than the model's maximum of 128" in messages["too long"]
    assert "out of vocabulary" in messages["out of vocabulary"] and "out of vocabulary" in messages["negative id"]
    assert "token_type_ids" in messages["bad token type"]
    assert "data-type" in messages["wrong dtype"] or "datatype" in messages["wrong dtype"].lower()


def test_decoder_pools_the_last_real_token_of_right_padded_rows(triton_server, tiny_checkpoints):
    """Padding after a sequence must not change its score (last-token pooling uses cu_seqlens)."""
    folder = "qwen3_classifier"
    encoded = tokenize(tiny_checkpoints[folder], ["rain", "rain " * 30])
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    batched = client.infer(folder, as_inputs(encoded)).as_numpy("scores")
    alone = client.infer(folder, as_inputs(unpadded_rows(encoded)[0])).as_numpy("scores")
    np.testing.assert_allclose(batched[0], alone[0], **TOLERANCE)
