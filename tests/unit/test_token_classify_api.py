"""Token classifiers through the real app: ``/pooling`` ``task: token_classify`` with vLLM's per-token activation
and STEP pooling, with a real tokenizer and a fake Triton gateway whose ``token_logits`` are a function of the
token ids (zeros past each sequence, as the model pads them).

What these pin: ``[n_tokens][num_labels]`` per prompt (CLS and SEP included), softmax / sigmoid / identity by the
card's activation and the kept width, raw logits with ``use_activation: false``, base64 flattened and ``bytes``
carrying the shape, STEP's order (columns, rows, activation) and ``[]`` without a step tag, vLLM's task errors,
and the routes a token classifier does not have (404 as vLLM, which never registers them for it).
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tokenization import Encoded, TextEncoder
from tests.support.fake_triton import HealthyGateway, app_over

MAX_MODEL_LEN = 32
LABELS = 4
TEXTS = ["paris is the capital of france", "snow"]


def logits_of(ids: np.ndarray, labels: int = LABELS) -> np.ndarray:
    """The fake model's logits of each token id: ``[..., labels]``, both signs."""
    return (np.cos(ids[..., None] * 0.37 + np.arange(labels)) * (1 + ids[..., None] % 4)).astype(np.float32)


class TokenLogitsGateway(HealthyGateway):
    """Stands in for TritonGateway; each ``infer`` is one Triton request."""

    max_rows = 16

    def __init__(self):
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def refuse_if_busy(self, triton_model: str) -> None:
        pass

    def leave_admission_board(self) -> None:
        pass

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append((triton_model, outputs))
        assert outputs == ("token_logits",)
        labels = 1 if triton_model.startswith("reward") else LABELS
        keep = (np.arange(encoded.input_ids.shape[1])[None, :] < encoded.lengths[:, None])[..., None]
        return {"token_logits": np.where(keep, logits_of(encoded.input_ids, labels), 0).astype(np.float32)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_models import wordpiece_tokenizer

    return wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


def served(name: str, tokenizer, task: str = "token_classify", **fields) -> ServedModel:
    encoder = TextEncoder(tokenizer, max_model_len=MAX_MODEL_LEN, sends_token_types=False)
    defaults = dict(num_labels=LABELS) if task == "token_classify" else dict(num_labels=1)
    return ServedModel(name=name, triton_model=f"{name}_triton", task=task, checkpoint=f"/checkpoints/{name}",
                       encoder=encoder, id2label={}, created=1, **{**defaults, **fields})


def step_tag(tokenizer) -> int:
    """The id of "the", the step tag of the STEP model (once in TEXTS[0], never in TEXTS[1])."""
    return tokenizer.convert_tokens_to_ids("the")


@pytest.fixture
def api(monkeypatch, tokenizer):
    models = [served("tagger", tokenizer), served("reward", tokenizer, num_labels=1),
              served("regressor", tokenizer, token_activation="identity"),
              served("multilabel", tokenizer, token_activation="sigmoid"),
              served("prm", tokenizer, step_tag_id=step_tag(tokenizer), returned_token_ids=(3, 1)),
              served("prm_one_column", tokenizer, step_tag_id=step_tag(tokenizer), returned_token_ids=(2,)),
              served("cross", tokenizer, task="classify")]
    with app_over(monkeypatch, models, TokenLogitsGateway(), max_items_per_request=16,
                  max_tokens_per_request=600) as running:
        yield running


def ids_of(tokenizer, text: str) -> np.ndarray:
    return np.array(tokenizer(text)["input_ids"])


def softmax(rows: np.ndarray) -> np.ndarray:
    exp = np.exp(rows.astype(np.float64) - rows.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def sigmoid(rows: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-rows.astype(np.float64)))


def pooled(client, model: str, **body) -> dict:
    response = client.post("/pooling", json={"model": model, "input": TEXTS, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_token_classify_returns_every_tokens_label_probabilities(api, tokenizer):
    client, gateway = api
    body = pooled(client, "tagger", task="token_classify")
    for item, text in zip(body["data"], TEXTS):
        expected = softmax(logits_of(ids_of(tokenizer, text)))
        assert np.array(item["data"]).shape == (len(ids_of(tokenizer, text)), LABELS)  # CLS and SEP included
        np.testing.assert_allclose(np.array(item["data"]), expected, rtol=1e-5, atol=1e-6)
    assert body["object"] == "list" and body["id"].startswith("pooling-")
    assert body["usage"]["prompt_tokens"] == sum(len(ids_of(tokenizer, text)) for text in TEXTS)
    assert gateway.calls[-1] == ("tagger_triton", ("token_logits",))
    assert pooled(client, "tagger")["data"] == body["data"]  # the model's own task when none is named


def test_use_activation_false_returns_the_logits(api, tokenizer):
    client, _ = api
    body = pooled(client, "tagger", use_activation=False)
    for item, text in zip(body["data"], TEXTS):
        np.testing.assert_allclose(np.array(item["data"]), logits_of(ids_of(tokenizer, text)), rtol=1e-6)


@pytest.mark.parametrize("model, activation", [
    ("reward", sigmoid),  # one label: sigmoid
    ("regressor", lambda rows: rows),  # problem_type regression: none
    ("multilabel", sigmoid),  # problem_type multi_label_classification
])
def test_the_activation_follows_the_card(api, tokenizer, model, activation):
    client, _ = api
    labels = 1 if model == "reward" else LABELS
    body = pooled(client, model)
    for item, text in zip(body["data"], TEXTS):
        expected = activation(logits_of(ids_of(tokenizer, text), labels))
        np.testing.assert_allclose(np.array(item["data"]), expected, rtol=1e-5, atol=1e-6)


def test_base64_is_flattened_and_bytes_carry_the_shape(api, tokenizer):
    client, _ = api
    expected = [softmax(logits_of(ids_of(tokenizer, text))).astype(np.float32) for text in TEXTS]
    body = pooled(client, "tagger", encoding_format="base64")
    for item, matrix in zip(body["data"], expected):
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(item["data"]), dtype=np.float32),
                                   matrix.reshape(-1), rtol=1e-5)
    response = client.post("/pooling", json={"model": "tagger", "input": TEXTS, "encoding_format": "bytes"})
    metadata = json.loads(response.headers["metadata"])
    assert [item["shape"] for item in metadata["data"]] == [list(matrix.shape) for matrix in expected]
    for item, matrix in zip(metadata["data"], expected):
        values = np.frombuffer(response.content[item["start"]:item["end"]], dtype=np.float32).reshape(item["shape"])
        np.testing.assert_allclose(values, matrix, rtol=1e-5)


def test_step_pooling_keeps_the_step_tag_rows_and_the_returned_columns(api, tokenizer):
    client, _ = api
    ids = ids_of(tokenizer, TEXTS[0])
    tags = ids == step_tag(tokenizer)
    assert tags.sum() == 1 and not (ids_of(tokenizer, TEXTS[1]) == step_tag(tokenizer)).any()
    body = pooled(client, "prm")
    # columns 3 then 1, the tag's row, softmax over the two kept columns; no step tag: no rows
    np.testing.assert_allclose(np.array(body["data"][0]["data"]), softmax(logits_of(ids)[tags][:, [3, 1]]),
                               rtol=1e-5, atol=1e-6)
    assert body["data"][1]["data"] == []
    raw = pooled(client, "prm", use_activation=False)
    np.testing.assert_allclose(np.array(raw["data"][0]["data"]), logits_of(ids)[tags][:, [3, 1]], rtol=1e-6)
    # one kept column: vLLM's classify activation takes the width it is given, so sigmoid
    one = pooled(client, "prm_one_column")
    np.testing.assert_allclose(np.array(one["data"][0]["data"]), sigmoid(logits_of(ids)[tags][:, [2]]), rtol=1e-5)
    response = client.post("/pooling", json={"model": "prm", "input": TEXTS, "encoding_format": "bytes"})
    assert [item["shape"] for item in json.loads(response.headers["metadata"])["data"]] == [[1, 2], [0, 2]]


def vllm_error(response, status: int, message: str) -> dict:
    body = response.json()
    assert response.status_code == status, body
    assert body["error"]["type"] == "BadRequestError" and message in body["error"]["message"], body
    return body["error"]


@pytest.mark.parametrize("model, task, message", [
    ("tagger", "embed", "Unsupported task: 'embed' Supported tasks: ('token_classify',)"),
    ("tagger", "classify", "Unsupported task: 'classify' Supported tasks: ('token_classify',)"),
    ("cross", "token_classify", "Unsupported task: 'token_classify' Supported tasks: ('classify',)"),
])
def test_pooling_refuses_a_task_the_model_does_not_serve(api, model, task, message):
    client, gateway = api
    vllm_error(client.post("/pooling", json={"model": model, "input": "snow", "task": task}), 400, message)
    vllm_error(client.post("/pooling", json={"model": "tagger", "input": "snow", "dimensions": 2}), 400,
               "dimensions is currently not supported")
    assert gateway.calls == []


@pytest.mark.parametrize("path, body, refusal", [
    ("/classify", {"input": "snow"}, "Classification API is not supported by this model."),
    ("/score", {"queries": "snow", "documents": ["paris"]}, "This model does not support the Scoring API."),
    ("/v1/score", {"queries": "snow", "documents": ["paris"]}, "This model does not support the Scoring API."),
    ("/rerank", {"query": "snow", "documents": ["paris"]}, "This model does not support the Scoring API."),
    ("/v1/embeddings", {"input": "snow"}, "Embedding API is not supported by this model."),
    ("/v2/embed", {"texts": ["snow"], "input_type": "query", "embedding_types": ["float"]},
     "Embedding API is not supported by this model."),
])
def test_a_token_classifier_has_no_sequence_routes(api, path, body, refusal):
    client, gateway = api
    error = vllm_error(client.post(path, json={"model": "tagger", **body}), 400, refusal)
    assert error["message"] == f"{refusal} Model `tagger` is a token classifier; it serves /pooling."
    assert gateway.calls == []


def test_invocations_serve_a_plain_input_as_pooling(api, tokenizer):
    client, _ = api
    response = client.post("/invocations", json={"model": "tagger", "input": "snow"})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.array(response.json()["data"][0]["data"]),
                               softmax(logits_of(ids_of(tokenizer, "snow"))), rtol=1e-5, atol=1e-6)


def test_the_served_model_reads_the_card(tmp_path):
    from poolserve_adapter.registry import build_served_model
    from poolserve_contract.card import ModelCard
    from poolserve_contract.wire import MODEL_CARD
    from tests.support.token_models import token_classifier_checkpoint

    checkpoint = token_classifier_checkpoint(tmp_path / "tagger", "distilbert")
    card = ModelCard(served_name="tagger", family="distilbert_token_classifier", task="token_classify",
                     architecture="DistilBertForTokenClassification", max_model_len=128, num_labels=5,
                     token_activation="sigmoid", step_tag_id=9, returned_token_ids=[4, 0])
    config = {"name": "tagger", "parameters": {"checkpoint": {"string_value": str(checkpoint)},
                                               MODEL_CARD: {"string_value": card.to_json()}}}
    model = build_served_model("tagger", config, tmp_path)
    assert (model.task, model.num_labels, model.token_activation) == ("token_classify", 5, "sigmoid")
    assert (model.step_tag_id, model.returned_token_ids) == (9, (4, 0))
    assert not (model.can_classify or model.can_score or model.can_embed_texts) and model.can_classify_or_embed
