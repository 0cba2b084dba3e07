"""Late-interaction (ColBERT) models through the real app: ``/pooling`` ``task: token_embed``, vLLM's token
``/v1/embeddings``, and ``/score`` / ``/rerank`` by MaxSim, with a real tokenizer and a fake Triton gateway whose
token vectors are a function of the token ids (and whose ``maxsim_scores`` score every row of a Triton request
against its first, as the model does).

What these pin: the response shapes (``[n_tokens][D]`` per prompt; base64 flattened; ``bytes`` metadata shape
``[n_tokens, D]``), which Triton output a request reads, vLLM's task and schema errors, one Triton request per
distinct query with the query first (never more rows than ``max_rows``), MaxSim scores and vLLM's usage count.
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
DIM = 8
MAX_ROWS = 3
QUERY = "paris france"
DOCUMENTS = ["paris is the capital of france", "good movie", "cold winter snow", "france paris paris", "snow"]


def projected(ids: np.ndarray) -> np.ndarray:
    """The fake model's unnormalised vector of each token id: ``[..., DIM]``, both signs."""
    return (np.cos(ids[..., None] * 0.61 + np.arange(DIM)) * (1 + ids[..., None] % 3)).astype(np.float32)


def normalised(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def maxsim(query: np.ndarray, document: np.ndarray) -> float:
    return float((query.astype(np.float64) @ document.T.astype(np.float64)).max(axis=1).sum())


class TokenGateway(HealthyGateway):
    """Stands in for TritonGateway: each ``infer`` is one Triton request (never more than ``max_rows`` rows)."""

    max_rows = MAX_ROWS

    def __init__(self):
        self.calls: list[tuple[Encoded, tuple[str, ...]]] = []

    def refuse_if_busy(self, triton_model: str) -> None:
        pass

    def leave_admission_board(self) -> None:
        pass

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append((encoded, outputs))
        keep = (np.arange(encoded.input_ids.shape[1])[None, :] < encoded.lengths[:, None])[..., None]
        raw = np.where(keep, projected(encoded.input_ids), 0).astype(np.float32)
        unit = np.where(keep, normalised(projected(encoded.input_ids)), 0).astype(np.float32)
        arrays = {"token_projected": raw, "token_embeddings": unit}
        if "maxsim_scores" in outputs:
            assert encoded.num_sequences <= self.max_rows
            query = unit[0, :encoded.lengths[0]]
            arrays["maxsim_scores"] = np.array(
                [[maxsim(query, unit[i, :length])] for i, length in enumerate(encoded.lengths)], dtype=np.float32)
        return {name: arrays[name] for name in outputs}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_models import wordpiece_tokenizer

    return wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


def served(name: str, tokenizer, task: str) -> ServedModel:
    encoder = TextEncoder(tokenizer, max_model_len=MAX_MODEL_LEN, sends_token_types=False)
    return ServedModel(name=name, triton_model=f"{name}_triton", task=task, checkpoint=f"/checkpoints/{name}",
                       encoder=encoder, id2label={}, num_labels=0, created=1, embedding_size=DIM,
                       normalizes=True)


@pytest.fixture
def api(monkeypatch, tokenizer):
    models = [served("colbert", tokenizer, "token_embed"), served("minilm", tokenizer, "embed")]
    with app_over(monkeypatch, models, TokenGateway(), max_items_per_request=16, max_tokens_per_request=600) as running:
        yield running


def token_vectors(tokenizer, text: str, unit: bool = True) -> np.ndarray:
    vectors = projected(np.array(tokenizer(text)["input_ids"]))
    return normalised(vectors) if unit else vectors


def vllm_error(response, status: int, error_type: str, message: str) -> dict:
    body = response.json()
    assert response.status_code == status, body
    assert body["error"]["type"] == error_type and message in body["error"]["message"], body
    return body["error"]


def test_pooling_token_embed_returns_every_tokens_vector(api, tokenizer):
    client, gateway = api
    texts = [QUERY, DOCUMENTS[0]]
    response = client.post("/pooling", json={"model": "colbert", "input": texts, "task": "token_embed"})
    body = response.json()
    assert response.status_code == 200, body
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    assert [len(item["data"]) for item in body["data"]] == lengths  # CLS and SEP included
    for item, text in zip(body["data"], texts):
        np.testing.assert_allclose(np.array(item["data"]), token_vectors(tokenizer, text), rtol=1e-6, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(lengths) and body["object"] == "list"
    assert gateway.calls[-1][1] == ("token_embeddings",)
    # the model's own task when none is named
    assert client.post("/pooling", json={"model": "colbert", "input": QUERY}).json()["data"][0]["data"] == \
        body["data"][0]["data"]


def test_pooling_token_embed_without_activation_reads_the_unnormalised_vectors(api, tokenizer):
    client, gateway = api
    response = client.post("/pooling", json={"model": "colbert", "input": QUERY, "task": "token_embed",
                                             "use_activation": False})
    assert gateway.calls[-1][1] == ("token_projected",)
    np.testing.assert_allclose(np.array(response.json()["data"][0]["data"]),
                               token_vectors(tokenizer, QUERY, unit=False), rtol=1e-6)


def test_pooling_token_embed_base64_is_flattened_and_bytes_carry_the_shape(api, tokenizer):
    client, _ = api
    texts = [QUERY, DOCUMENTS[1]]
    expected = [token_vectors(tokenizer, text) for text in texts]
    body = client.post("/pooling", json={"model": "colbert", "input": texts, "encoding_format": "base64"}).json()
    for item, matrix in zip(body["data"], expected):
        flat = np.frombuffer(base64.b64decode(item["data"]), dtype=np.float32)
        np.testing.assert_allclose(flat, matrix.reshape(-1), rtol=1e-6)
    response = client.post("/pooling", json={"model": "colbert", "input": texts, "encoding_format": "bytes",
                                             "embed_dtype": "float16"})
    metadata = json.loads(response.headers["metadata"])
    assert [item["shape"] for item in metadata["data"]] == [list(matrix.shape) for matrix in expected]
    for item, matrix in zip(metadata["data"], expected):
        values = np.frombuffer(response.content[item["start"]:item["end"]], dtype=np.float16).reshape(item["shape"])
        np.testing.assert_allclose(values, matrix, rtol=1e-3, atol=1e-3)
    assert metadata["data"][1]["start"] == metadata["data"][0]["end"] == expected[0].size * 2
    assert len(response.content) == sum(matrix.size for matrix in expected) * 2


@pytest.mark.parametrize("model, task, message", [
    ("colbert", "embed", "Unsupported task: 'embed' Supported tasks: ('token_embed',)"),
    ("colbert", "classify", "Unsupported task: 'classify' Supported tasks: ('token_embed',)"),
    ("minilm", "token_embed", "Unsupported task: 'token_embed' Supported tasks: ('embed',)"),
])
def test_pooling_refuses_a_task_the_model_does_not_serve(api, model, task, message):
    client, _ = api
    response = client.post("/pooling", json={"model": model, "input": QUERY, "task": task})
    vllm_error(response, 400, "BadRequestError", message)
    response = client.post("/pooling", json={"model": "colbert", "input": QUERY, "dimensions": 4})
    assert vllm_error(response, 400, "BadRequestError", "dimensions is currently not supported")["param"] == \
        "dimensions"


def test_openai_embeddings_on_a_token_model_are_token_matrices(api, tokenizer):
    client, gateway = api
    response = client.post("/v1/embeddings", json={"model": "colbert", "input": [QUERY, "snow"]})
    body = response.json()
    assert response.status_code == 200, body
    assert body["object"] == "list" and body["id"].startswith("embd-")
    for item, text in zip(body["data"], [QUERY, "snow"]):
        assert item["object"] == "embedding"
        np.testing.assert_allclose(np.array(item["embedding"]), token_vectors(tokenizer, text), rtol=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in [QUERY, "snow"])
    client.post("/v1/embeddings", json={"model": "colbert", "input": QUERY, "use_activation": False})
    assert gateway.calls[-1][1] == ("token_projected",)


@pytest.mark.parametrize("body, field, message", [
    ({"input": QUERY, "encoding_format": "base64"}, "body.encoding_format", "Input should be 'float'"),
    ({"input": QUERY, "dimensions": 4}, "body.dimensions", "Input should be None"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "body.input", "Field required"),
])
def test_openai_embeddings_on_a_token_model_refuse_as_vllms_schema(api, body, field, message):
    client, gateway = api
    response = client.post("/v1/embeddings", json={"model": "colbert", **body})
    assert vllm_error(response, 400, "Bad Request", message)["param"] == field
    assert gateway.calls == []


def test_cohere_embed_is_not_a_route_of_a_token_model(api):
    client, _ = api
    response = client.post("/v2/embed", json={"model": "colbert", "texts": [QUERY], "input_type": "query",
                                              "embedding_types": ["float"]})
    assert vllm_error(response, 400, "BadRequestError", "Embedding API is not supported by this model.")["message"] == (
        "Embedding API is not supported by this model. Model `colbert` is a late-interaction (token embedding) "
        "model; it serves /v1/embeddings, /score and /rerank, /pooling.")


def pair_usage(tokenizer, queries: list[str], documents: list[str]) -> int:
    """vLLM's late-interaction usage: query + pad + document tokens per pair."""
    return sum(len(tokenizer(q)["input_ids"]) + 1 + len(tokenizer(d)["input_ids"]) for q, d in zip(queries, documents))


def test_score_one_to_n_is_maxsim_with_one_query_first_per_triton_request(api, tokenizer):
    client, gateway = api
    response = client.post("/score", json={"model": "colbert", "queries": QUERY, "documents": DOCUMENTS})
    body = response.json()
    assert response.status_code == 200, body
    query = token_vectors(tokenizer, QUERY)
    expected = [maxsim(query, token_vectors(tokenizer, document)) for document in DOCUMENTS]
    np.testing.assert_allclose([item["score"] for item in body["data"]], expected, rtol=1e-5)
    query_ids = tokenizer(QUERY)["input_ids"]
    assert len(gateway.calls) == 3  # five documents, two per Triton request beside the query
    for encoded, outputs in gateway.calls:
        assert outputs == ("maxsim_scores",) and encoded.num_sequences <= MAX_ROWS
        assert encoded.input_ids[0, :encoded.lengths[0]].tolist() == query_ids
    assert body["usage"]["prompt_tokens"] == pair_usage(tokenizer, [QUERY] * 5, DOCUMENTS)


def test_score_n_to_n_sends_each_distinct_query_once(api, tokenizer):
    client, gateway = api
    queries = [QUERY, "snow", QUERY]
    documents = DOCUMENTS[:3]
    body = client.post("/score", json={"model": "colbert", "queries": queries, "documents": documents}).json()
    expected = [maxsim(token_vectors(tokenizer, q), token_vectors(tokenizer, d)) for q, d in zip(queries, documents)]
    np.testing.assert_allclose([item["score"] for item in body["data"]], expected, rtol=1e-5)
    assert sorted(int(encoded.num_sequences) for encoded, _ in gateway.calls) == [2, 3]
    assert body["usage"]["prompt_tokens"] == pair_usage(tokenizer, queries, documents)


def test_score_without_activation_is_maxsim_of_the_unnormalised_vectors(api, tokenizer):
    client, gateway = api
    body = client.post("/score", json={"model": "colbert", "queries": QUERY, "documents": DOCUMENTS[:2],
                                       "use_activation": False}).json()
    query = token_vectors(tokenizer, QUERY, unit=False)
    expected = [maxsim(query, token_vectors(tokenizer, d, unit=False)) for d in DOCUMENTS[:2]]
    np.testing.assert_allclose([item["score"] for item in body["data"]], expected, rtol=1e-5)
    assert {outputs for _, outputs in gateway.calls} == {("token_projected",)}


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_sorts_by_maxsim(api, tokenizer, path):
    client, _ = api
    response = client.post(path, json={"model": "colbert", "query": QUERY, "documents": DOCUMENTS, "top_n": 3})
    body = response.json()
    assert response.status_code == 200, body
    query = token_vectors(tokenizer, QUERY)
    scores = [maxsim(query, token_vectors(tokenizer, document)) for document in DOCUMENTS]
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[:3]
    assert [result["index"] for result in body["results"]] == order
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], [scores[i] for i in order], rtol=1e-5)
    assert body["results"][0]["document"]["text"] == DOCUMENTS[order[0]]
    assert body["usage"]["prompt_tokens"] == pair_usage(tokenizer, [QUERY] * 5, DOCUMENTS)
