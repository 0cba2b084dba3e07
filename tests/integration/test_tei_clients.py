"""TEI's API against the real stack (``poolserve serve``: Triton and the adapter) serving the built-in embedder and a
tiny cross-encoder re-ranker (one label), read with TEI's own request examples (``router/src/http/types.rs``) and
with unchanged TEI clients: LlamaIndex's ``TextEmbeddingInference`` reranker (``POST /rerank`` with ``{"query",
"texts"}``), ``huggingface_hub.InferenceClient(<url>).feature_extraction`` (``POST /``, what LangChain's
Hugging Face endpoint embeddings delegate to) and langchain-community's ``HuggingFaceInferenceAPIEmbeddings``
(``POST /embed``).

Scores must equal sentence-transformers' ``CrossEncoder`` over the same checkpoint (its sigmoid of the one logit,
TEI's rerank score) and vectors its ``SentenceTransformer`` encode of the built-in embedder; nothing but our
server may be reached.
"""

from __future__ import annotations

import socket

import httpx
import numpy as np
import pytest

from poolserve_stack.builtin import MINILM, minilm_package_dir
from tests.support.stack import start_serve, stop_serve

pytestmark = pytest.mark.integration

RERANKER = "tiny-reranker"
QUERY = "What is Deep Learning?"  # TEI's schema examples
TEXTS = ["Deep Learning is ...", "The capital of France is Paris.", "Cats sleep a lot.", "Deep learning trains "
         "neural networks with many layers."]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def stack(tiny_checkpoints, tmp_path_factory):
    reranker = tiny_checkpoints["xlm_roberta_classifier"]
    process, url = start_serve(tmp_path_factory.mktemp("tei-serve"), [
        "--model", f"builtin:{MINILM}", "--model", f"xlm_roberta_classifier={reranker}",
        "--set", f"xlm_roberta_classifier.served_model_name={RERANKER}"])
    try:
        yield url, reranker
    finally:
        stop_serve(process)


@pytest.fixture
def loopback_only(monkeypatch):
    """Clients may connect to our server and nowhere else."""
    connect = socket.socket.connect

    def connect_to_our_server_only(sock, address):
        assert address[0] == "127.0.0.1", f"a client connected to {address}, not to our server"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect_to_our_server_only)


@pytest.fixture(scope="module")
def cross_encoder_scores(stack) -> np.ndarray:
    """sentence-transformers' CrossEncoder scores of (QUERY, text): the sigmoid of the one logit (CPU, fp32)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(stack[1]), device="cpu")
    return model.predict([(QUERY, text) for text in TEXTS], convert_to_numpy=True)


@pytest.fixture(scope="module")
def reference_vectors() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_package_dir()), device="cpu").encode(TEXTS, convert_to_numpy=True)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT_S)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_teis_rerank_example_equals_the_cross_encoder(stack, cross_encoder_scores):
    url, _ = stack
    response = post(url, "/rerank", {"query": QUERY, "texts": TEXTS, "truncate": False,
                                     "truncation_direction": "right", "raw_scores": False, "return_text": True})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert [list(rank) for rank in ranks] == [["index", "text", "score"]] * len(TEXTS)
    assert [rank["index"] for rank in ranks] == np.argsort(-cross_encoder_scores, kind="stable").tolist()
    np.testing.assert_allclose([rank["score"] for rank in ranks], cross_encoder_scores[[r["index"] for r in ranks]],
                               rtol=1e-4, atol=1e-6)
    raw = post(url, "/rerank", {"query": QUERY, "texts": TEXTS, "raw_scores": True}).json()
    logits = {rank["index"]: rank["score"] for rank in raw}
    np.testing.assert_allclose(1 / (1 + np.exp(-np.array([logits[i] for i in range(len(TEXTS))]))),
                               cross_encoder_scores, rtol=1e-4, atol=1e-6)
    # vLLM's body on the same path answers as before.
    vllm = post(url, "/rerank", {"model": RERANKER, "query": QUERY, "documents": TEXTS})
    assert vllm.status_code == 200 and len(vllm.json()["results"]) == len(TEXTS)


def test_teis_predict_embed_and_info_examples(stack, cross_encoder_scores, reference_vectors):
    url, reranker = stack
    predicted = post(url, "/predict", {"inputs": [QUERY, TEXTS[0]], "truncate": False, "raw_scores": False,
                                       "model": RERANKER})
    assert predicted.status_code == 200, predicted.text
    (prediction,) = predicted.json()
    assert set(prediction) == {"score", "label"}
    np.testing.assert_allclose(prediction["score"], cross_encoder_scores[0], rtol=1e-4, atol=1e-6)
    embedded = post(url, "/embed", {"inputs": TEXTS, "normalize": True, "truncate": False,
                                    "truncation_direction": "right", "prompt_name": None, "dimensions": None})
    assert embedded.status_code == 200, embedded.text
    vectors = np.array(embedded.json(), dtype=np.float32)
    assert cosines(vectors, reference_vectors).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    single = post(url, "/embed", {"inputs": TEXTS[0], "normalize": False})
    assert np.array(single.json()).shape == (1, reference_vectors.shape[1])
    refused = post(url, "/rerank", {"query": QUERY, "texts": TEXTS, "model": MINILM})
    assert refused.status_code == 424 and refused.json() == {"error": "Backend error: model is not a re-ranker model",
                                                             "error_type": "Backend"}
    info = httpx.get(f"{url}/info", timeout=TIMEOUT_S).json()
    assert info["served_model_name"] == MINILM and info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] > 0 and info["model_sha"] is None


def test_llamaindex_tei_reranker_orders_nodes_by_the_cross_encoder(stack, cross_encoder_scores, loopback_only):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    url, _ = stack
    reranker = TextEmbeddingInference(base_url=url, top_n=2, timeout=TIMEOUT_S)
    nodes = [NodeWithScore(node=TextNode(text=text, id_=str(index)), score=0.0) for index, text in enumerate(TEXTS)]
    ranked = reranker.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    best = np.argsort(-cross_encoder_scores, kind="stable")[:2].tolist()
    assert [int(node.node.id_) for node in ranked] == best
    np.testing.assert_allclose([node.score for node in ranked], cross_encoder_scores[best], rtol=1e-4, atol=1e-6)


def test_huggingface_hub_feature_extraction_posts_to_the_root(stack, reference_vectors, loopback_only):
    from huggingface_hub import InferenceClient

    url, _ = stack
    client = InferenceClient(model=url, timeout=TIMEOUT_S)
    vectors = client.feature_extraction(TEXTS)
    assert vectors.shape == reference_vectors.shape and vectors.dtype == np.float32
    assert cosines(vectors, reference_vectors).min() >= 0.9999
    floats = post(url, "/v1/embeddings", {"model": MINILM, "input": TEXTS}).json()["data"]
    np.testing.assert_allclose(vectors, [item["embedding"] for item in floats], rtol=1e-5, atol=1e-6)
    one = client.feature_extraction(TEXTS[0], normalize=False, truncate=True, truncation_direction="right")
    assert one.shape == (1, reference_vectors.shape[1]) and abs(float(np.linalg.norm(one)) - 1) > 1e-3


def test_langchain_hugging_face_embeddings_post_to_embed(stack, reference_vectors, loopback_only):
    """LangChain's TEI embeddings as langchain-community ships them (``HuggingFaceInferenceAPIEmbeddings`` with
    ``api_url``: ``{"inputs", "options"}`` to that URL; langchain-huggingface 1.2 refuses a URL as its model)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # langchain-community announces its own sunset
        from langchain_community.embeddings import HuggingFaceInferenceAPIEmbeddings

    url, _ = stack
    embeddings = HuggingFaceInferenceAPIEmbeddings(api_key="unused", api_url=f"{url}/embed")
    documents = np.array(embeddings.embed_documents(TEXTS), dtype=np.float32)
    query = np.array(embeddings.embed_query(TEXTS[0]), dtype=np.float32)
    assert cosines(documents, reference_vectors).min() >= 0.9999
    np.testing.assert_allclose(query, documents[0], rtol=1e-5, atol=1e-6)
