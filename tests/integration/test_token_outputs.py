"""A late-interaction (ColBERT) model on the real stack: tritonserver serving model_repository/colbert_embedder
over a tiny random HF_ColBERT checkpoint, and the adapter in front of it (four sequences per Triton request, so
a rerank of six documents takes several Triton requests, each with the query first).

The token vectors of ``/pooling`` and ``/v1/embeddings`` must match the direct torch computation vLLM's own test
checks (``F.normalize(F.linear(BertModel(x).last_hidden_state, W))``, fp32 CPU), and ``/score`` and ``/rerank``
must give vLLM's MaxSim of those vectors (sum over the query's tokens of the best dot product)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.support.stack import running_adapter, tiny_triton_server
from tests.support.token_models import COLBERT_DIM, colbert_checkpoint, colbert_reference

pytestmark = pytest.mark.integration

QUERY = "where is the capital of france"
DOCUMENTS = ["paris is the capital of france", "a good movie", "cold winter snow in the mountains",
             "france and paris", "snow", "the capital city of a country is where its government sits"]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    checkpoint = colbert_checkpoint(tmp_path_factory.mktemp("checkpoints") / "colbert")
    log_dir = tmp_path_factory.mktemp("token_outputs")
    with tiny_triton_server({"colbert_embedder": checkpoint}, log_dir / "triton.log") as server:
        with running_adapter(server, log_dir) as url:
            yield url, checkpoint


def post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json={"model": "colbert_embedder", **body}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def maxsim(query: np.ndarray, document: np.ndarray) -> float:
    return float((query.astype(np.float64) @ document.T.astype(np.float64)).max(axis=1).sum())


def test_token_vectors_match_the_direct_computation(stack):
    url, checkpoint = stack
    texts = [QUERY, *DOCUMENTS]
    reference = [vectors.numpy() for vectors in colbert_reference(checkpoint, texts)]
    pooled = post(url, "/pooling", {"input": texts, "task": "token_embed"})["data"]
    embedded = post(url, "/v1/embeddings", {"input": texts})["data"]
    for expected, pooling_item, embedding_item in zip(reference, pooled, embedded):
        assert np.array(pooling_item["data"]).shape == expected.shape and expected.shape[1] == COLBERT_DIM
        np.testing.assert_allclose(np.array(pooling_item["data"]), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(embedding_item["embedding"]), expected, rtol=1e-5, atol=1e-5)


def test_score_and_rerank_are_maxsim(stack):
    url, checkpoint = stack
    reference = [vectors.numpy() for vectors in colbert_reference(checkpoint, [QUERY, *DOCUMENTS])]
    expected = [maxsim(reference[0], document) for document in reference[1:]]
    scores = post(url, "/score", {"queries": QUERY, "documents": DOCUMENTS})["data"]
    np.testing.assert_allclose([item["score"] for item in scores], expected, rtol=1e-5, atol=1e-5)
    results = post(url, "/rerank", {"query": QUERY, "documents": DOCUMENTS})["results"]
    assert [result["index"] for result in results] == sorted(range(len(expected)), key=lambda i: -expected[i])
    np.testing.assert_allclose([r["relevance_score"] for r in results], sorted(expected, reverse=True),
                               rtol=1e-5, atol=1e-5)
