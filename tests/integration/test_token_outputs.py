"""Token-level models on the real stack: tritonserver serving model_repository/colbert_embedder over a tiny random
HF_ColBERT checkpoint and model_repository/bert_token_classifier over a tiny BertForTokenClassification (twice: as
it is, and with STEP pooling parameters), and the adapter in front of them (four sequences per Triton request, so
a rerank of six documents takes several Triton requests, each with the query first).

The token vectors of ``/pooling`` and ``/v1/embeddings`` must match the direct torch computation vLLM's own test
checks (``F.normalize(F.linear(BertModel(x).last_hidden_state, W))``, fp32 CPU), and ``/score`` and ``/rerank``
must give vLLM's MaxSim of those vectors (sum over the query's tokens of the best dot product). The token
classifier's ``/pooling`` must be the softmax of transformers' ``BertForTokenClassification(...).logits`` per
token, and its STEP twin only the step-tag rows of the returned columns. model_repository/splade_embedder over a tiny
random BertForMaskedLM must give vLLM's SPLADE vector of its MLM logits on ``/v1/embeddings`` and its non-zero
entries on TEI's ``/embed_sparse``. model_repository/bge_m3_embedder over a tiny random XLM-R with FlagEmbedding's
``sparse_linear.pt`` and ``colbert_linear.pt`` must give, from the one model, the dense CLS vector, the ColBERT vectors
(BOS dropped) and the lexical weights (BOS and EOS dropped) of the direct torch computation, FlagEmbedding's lexical
weights on ``/embed_sparse`` and the dense cosine on ``/score``."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from poolserve_contract.wire import SOURCE_FOLDER
from poolserve_stack.triton_server import TritonServer
from tests.support.stack import MODEL_REPOSITORY, running_adapter
from tests.support.token_models import (
    COLBERT_DIM,
    bge_m3_checkpoint,
    bge_m3_reference,
    colbert_checkpoint,
    colbert_reference,
    splade_checkpoint,
    splade_reference,
    token_classifier_checkpoint,
    token_classifier_reference,
)

pytestmark = pytest.mark.integration

QUERY = "where is the capital of france"
DOCUMENTS = ["paris is the capital of france", "a good movie", "cold winter snow in the mountains",
             "france and paris", "snow", "the capital city of a country is where its government sits"]
TIMEOUT_S = 60


STEP_COLUMNS = (4, 1)


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    return splade_checkpoint(tmp_path_factory.mktemp("splade") / "splade")


@pytest.fixture(scope="module")
def bge_m3(tmp_path_factory):
    return bge_m3_checkpoint(tmp_path_factory.mktemp("bge_m3") / "bge_m3")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, splade, bge_m3):
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    checkpoint = colbert_checkpoint(checkpoints / "colbert")
    tagger = token_classifier_checkpoint(checkpoints / "tagger", "bert")
    step_tag = tagger_tokenizer(tagger).convert_tokens_to_ids("the")
    models = {"colbert_embedder": {"checkpoint": str(checkpoint), "served_model_name": "colbert_embedder"},
              "bert_token_classifier": {"checkpoint": str(tagger), "served_model_name": "bert_token_classifier"},
              "token_prm": {SOURCE_FOLDER: "bert_token_classifier", "checkpoint": str(tagger),
                            "served_model_name": "token_prm", "step_tag_id": str(step_tag),
                            "returned_token_ids": ",".join(map(str, STEP_COLUMNS))},
              "splade_embedder": {"checkpoint": str(splade), "served_model_name": "splade_embedder"},
              "bge_m3_embedder": {"checkpoint": str(bge_m3), "served_model_name": "bge_m3_embedder"}}
    log_dir = tmp_path_factory.mktemp("token_outputs")
    with TritonServer(MODEL_REPOSITORY, models, log_path=log_dir / "triton.log", ready_timeout_s=480) as server:
        with running_adapter(server, log_dir) as url:
            yield url, checkpoint, tagger, step_tag


def tagger_tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint))


def post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json={"model": "colbert_embedder", **body}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def maxsim(query: np.ndarray, document: np.ndarray) -> float:
    return float((query.astype(np.float64) @ document.T.astype(np.float64)).max(axis=1).sum())


def test_token_vectors_match_the_direct_computation(stack):
    url, checkpoint, _, _ = stack
    texts = [QUERY, *DOCUMENTS]
    reference = [vectors.numpy() for vectors in colbert_reference(checkpoint, texts)]
    pooled = post(url, "/pooling", {"input": texts, "task": "token_embed"})["data"]
    embedded = post(url, "/v1/embeddings", {"input": texts})["data"]
    for expected, pooling_item, embedding_item in zip(reference, pooled, embedded):
        assert np.array(pooling_item["data"]).shape == expected.shape and expected.shape[1] == COLBERT_DIM
        np.testing.assert_allclose(np.array(pooling_item["data"]), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(embedding_item["embedding"]), expected, rtol=1e-5, atol=1e-5)


def test_score_and_rerank_are_maxsim(stack):
    url, checkpoint, _, _ = stack
    reference = [vectors.numpy() for vectors in colbert_reference(checkpoint, [QUERY, *DOCUMENTS])]
    expected = [maxsim(reference[0], document) for document in reference[1:]]
    scores = post(url, "/score", {"queries": QUERY, "documents": DOCUMENTS})["data"]
    np.testing.assert_allclose([item["score"] for item in scores], expected, rtol=1e-5, atol=1e-5)
    results = post(url, "/rerank", {"query": QUERY, "documents": DOCUMENTS})["results"]
    assert [result["index"] for result in results] == sorted(range(len(expected)), key=lambda i: -expected[i])
    np.testing.assert_allclose([r["relevance_score"] for r in results], sorted(expected, reverse=True),
                               rtol=1e-5, atol=1e-5)


def softmax(rows: np.ndarray) -> np.ndarray:
    exp = np.exp(rows - rows.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def test_token_classify_is_the_softmax_of_every_tokens_logits(stack):
    url, _, tagger, _ = stack
    texts = [QUERY, *DOCUMENTS]
    reference = [logits.double().numpy() for logits in token_classifier_reference(tagger, texts)]
    probabilities = post(url, "/pooling", {"model": "bert_token_classifier", "input": texts})["data"]
    logits = post(url, "/pooling", {"model": "bert_token_classifier", "input": texts, "task": "token_classify",
                                    "use_activation": False})["data"]
    for expected, item, raw in zip(reference, probabilities, logits):
        np.testing.assert_allclose(np.array(raw["data"]), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(item["data"]), softmax(expected), rtol=1e-5, atol=1e-6)
    response = httpx.post(f"{url}/classify", json={"model": "bert_token_classifier", "input": QUERY}, timeout=TIMEOUT_S)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("Classification API is not supported by this model.")


def test_step_pooling_keeps_the_step_tag_rows(stack):
    url, _, tagger, step_tag = stack
    texts = [QUERY, DOCUMENTS[0], DOCUMENTS[1]]  # "the" is a step tag in the first two only
    reference = token_classifier_reference(tagger, texts)
    tokenizer = tagger_tokenizer(tagger)
    data = post(url, "/pooling", {"model": "token_prm", "input": texts})["data"]
    for text, logits, item in zip(texts, reference, data):
        tags = np.array(tokenizer(text)["input_ids"]) == step_tag
        expected = softmax(logits.double().numpy()[:, list(STEP_COLUMNS)][tags])
        assert np.array(item["data"]).reshape(-1, len(STEP_COLUMNS)).shape == expected.shape
        np.testing.assert_allclose(np.array(item["data"]).reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    assert data[2]["data"] == []


def test_splade_vectors_and_teis_sparse_entries(stack, splade):
    url = stack[0]
    texts = [QUERY, *DOCUMENTS]
    reference = [vector.numpy() for vector in splade_reference(splade, texts)]
    embedded = post(url, "/v1/embeddings", {"model": "splade_embedder", "input": texts})["data"]
    response = httpx.post(f"{url}/embed_sparse", json={"model": "splade_embedder", "inputs": texts},
                          timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    for expected, item, entries in zip(reference, embedded, response.json()):
        np.testing.assert_allclose(np.array(item["embedding"]), expected, rtol=1e-5, atol=1e-5)
        indices = [entry["index"] for entry in entries]
        assert indices == sorted(indices) and set(indices) == set(np.flatnonzero(np.array(item["embedding"])).tolist())
        np.testing.assert_allclose([entry["value"] for entry in entries], expected[indices], rtol=1e-5, atol=1e-5)
    refused = httpx.post(f"{url}/embed_sparse", json={"model": "colbert_embedder", "inputs": QUERY}, timeout=TIMEOUT_S)
    assert refused.status_code == 424 and refused.json() == {
        "error": "Backend error: Model is not an embedding model with SPLADE pooling", "error_type": "Backend"}


def test_bge_m3_answers_dense_colbert_and_lexical_outputs_from_one_model(stack, bge_m3):
    url = stack[0]
    texts = [QUERY, *DOCUMENTS]
    reference = bge_m3_reference(bge_m3, texts)
    model = {"model": "bge_m3_embedder"}
    dense = post(url, "/v1/embeddings", {**model, "input": texts})["data"]
    colbert = post(url, "/pooling", {**model, "task": "token_embed", "input": texts})["data"]
    weights = post(url, "/pooling", {**model, "task": "token_classify", "input": texts})["data"]
    response = httpx.post(f"{url}/embed_sparse", json={**model, "inputs": texts}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    for expected, vector, vectors, weight, entries in zip(reference, dense, colbert, weights, response.json()):
        np.testing.assert_allclose(vector["embedding"], expected["dense"].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(vectors["data"], expected["colbert"].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(weight["data"], expected["weights"].numpy(), rtol=1e-5, atol=1e-5)
        lexical = expected["lexical"]
        assert [entry["index"] for entry in entries] == sorted(lexical)
        np.testing.assert_allclose([entry["value"] for entry in entries], [lexical[i] for i in sorted(lexical)],
                                   rtol=1e-5, atol=1e-5)
    assert any(reference[index]["lexical"] for index in range(len(texts)))
    scores = post(url, "/score", {**model, "text_1": QUERY, "text_2": DOCUMENTS})["data"]
    cosine = [float(reference[0]["dense"] @ expected["dense"]) for expected in reference[1:]]
    np.testing.assert_allclose([item["score"] for item in scores], cosine, rtol=1e-5, atol=1e-5)
