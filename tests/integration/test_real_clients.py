"""Real, unmodified clients against the real stack (uvicorn adapter → gRPC → tritonserver).

The Cohere (v1 and v2 clients) and OpenAI SDKs and langchain-cohere's ``CohereRerank`` are pointed at
the adapter exactly as their users would point them at vLLM or Cohere; the plain-HTTP cases send the
bodies of the vLLM and SGLang documentation examples, with the served model names swapped in. Served
models are the tiny checkpoints of ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import re
import socket

import cohere
import httpx
import numpy as np
import openai
import pytest
import requests

pytestmark = pytest.mark.integration

TIMEOUT_S = 60
CLASSIFIER_LABELS = {"negative", "neutral", "positive"}  # bert_classifier's id2label

# vLLM docs (examples/pooling/score, Cohere rerank client): the query and documents.
COHERE_QUERY = "What is the capital of France?"
COHERE_DOCUMENTS = [
    "The capital of France is Paris",
    "Reranking is fun!",
    "vLLM is an open-source framework for fast AI serving",
]
# vLLM docs (examples/pooling/classify): the prompts.
VLLM_CLASSIFY_PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# vLLM docs (rerank / score API): the query and documents.
VLLM_QUERY = "What is the capital of France?"
VLLM_DOCUMENTS = [
    "The capital of Brazil is Brasilia.",
    "The capital of France is Paris.",
    "Horses and cows are both animals",
]
# SGLang docs (rerank models): the query and documents, plus a third document so that top_n cuts.
SGLANG_QUERY = "what is panda?"
SGLANG_DOCUMENTS = [
    "hi",
    "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, is a bear species "
    "endemic to China.",
    "paris is the capital city of france",
]


def post(url: str, path: str, body: object) -> requests.Response:
    """A plain `requests` call, as in the projects' documentation examples."""
    return requests.post(f"{url}{path}", json=body, headers={"accept": "application/json"}, timeout=TIMEOUT_S)


def ok_json(response: requests.Response):
    request = response.request
    assert response.status_code == 200, f"{request.method} {request.url}: {response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    return response.json()


def assert_sorted_descending(scores: list[float]) -> None:
    assert scores == sorted(scores, reverse=True), scores


# --- Cohere SDK (v2 client → POST {base_url}/v2/rerank) ------------------------------------------


def test_cohere_v2_client_rerank(adapter_url):
    sent: list[httpx.Request] = []
    with httpx.Client(timeout=TIMEOUT_S, event_hooks={"request": [sent.append]}) as http:
        client = cohere.ClientV2(api_key="unused", base_url=adapter_url, httpx_client=http)
        result = client.rerank(model="xlm_roberta_classifier", query=COHERE_QUERY, documents=COHERE_DOCUMENTS,
                               top_n=2)

    assert [(r.method, str(r.url)) for r in sent] == [("POST", f"{adapter_url}/v2/rerank")]
    assert len(result.results) == 2
    scores = [r.relevance_score for r in result.results]
    assert_sorted_descending(scores)
    indexes = [r.index for r in result.results]
    assert len(set(indexes)) == 2 and all(0 <= i < len(COHERE_DOCUMENTS) for i in indexes)

    direct = ok_json(post(adapter_url, "/rerank", {"model": "xlm_roberta_classifier", "query": COHERE_QUERY,
                                                   "documents": COHERE_DOCUMENTS, "top_n": 2}))
    assert indexes == [r["index"] for r in direct["results"]]
    assert scores == pytest.approx([r["relevance_score"] for r in direct["results"]], rel=1e-5, abs=1e-6)


def test_cohere_v2_client_rerank_bi_encoder_without_top_n(adapter_url):
    client = cohere.ClientV2(api_key="unused", base_url=adapter_url, timeout=TIMEOUT_S)
    result = client.rerank(model="bert_embedder", query=COHERE_QUERY, documents=COHERE_DOCUMENTS)
    assert sorted(r.index for r in result.results) == list(range(len(COHERE_DOCUMENTS)))
    assert_sorted_descending([r.relevance_score for r in result.results])


@pytest.fixture
def sent_bodies(monkeypatch) -> list[tuple[str, dict]]:
    """The path and JSON body of every request an httpx client sends; and no connection but to our server on
    loopback (the SDKs and LangChain may not phone home)."""
    for tracing in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(tracing, raising=False)
    connect = socket.socket.connect

    def connect_to_our_server_only(sock, address):
        assert not isinstance(address, tuple) or address[0] == "127.0.0.1", f"connected to {address}, not our server"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect_to_our_server_only)
    sent: list[tuple[str, dict]] = []
    send = httpx.Client.send

    def recording_send(client, request, **kwargs):
        sent.append((request.url.path, json.loads(request.content)))
        return send(client, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", recording_send)
    return sent


def direct_rerank(url: str, documents: list[str], **fields) -> list[tuple[int, float]]:
    body = ok_json(post(url, "/rerank", {"model": "xlm_roberta_classifier", "query": COHERE_QUERY,
                                         "documents": documents, **fields}))
    return [(r["index"], r["relevance_score"]) for r in body["results"]]


def test_cohere_v2_client_rerank_top_n_none_returns_every_document(adapter_url, sent_bodies):
    client = cohere.ClientV2(api_key="unused", base_url=adapter_url, timeout=TIMEOUT_S)
    result = client.rerank(model="xlm_roberta_classifier", query=COHERE_QUERY, documents=COHERE_DOCUMENTS,
                           top_n=None, max_tokens_per_doc=None, priority=None)
    [(path, body)] = sent_bodies
    assert path == "/v2/rerank" and body["top_n"] is None and body["max_tokens_per_doc"] is None
    assert body["priority"] is None  # the SDK sends the None it is given as null
    expected = direct_rerank(adapter_url, COHERE_DOCUMENTS)
    assert [r.index for r in result.results] == [index for index, _ in expected]
    assert [r.relevance_score for r in result.results] == pytest.approx([score for _, score in expected], rel=1e-5)
    assert sorted(r.index for r in result.results) == list(range(len(COHERE_DOCUMENTS)))


def test_cohere_v1_client_rerank_object_documents_rank_fields_without_documents(adapter_url, sent_bodies):
    """Cohere v1: object documents, scored by ``rank_fields`` in order (as ``field: value`` lines) and, with
    ``return_documents`` left out, echoed with every field; ``return_documents=False`` leaves them out."""
    client = cohere.Client(api_key="unused", base_url=adapter_url, timeout=TIMEOUT_S)
    documents = [{"title": f"Document {index}", "text": text} for index, text in enumerate(COHERE_DOCUMENTS)]
    bare = client.rerank(model="xlm_roberta_classifier", query=COHERE_QUERY, documents=documents,
                         rank_fields=["title", "text"], return_documents=False)
    assert [path for path, _ in sent_bodies] == ["/v1/rerank"]
    assert sent_bodies[0][1]["documents"] == documents and sent_bodies[0][1]["return_documents"] is False
    as_lines = [f"title: {document['title']}\ntext: {document['text']}" for document in documents]
    expected = direct_rerank(adapter_url, as_lines)
    assert [r.index for r in bare.results] == [index for index, _ in expected]
    assert [r.relevance_score for r in bare.results] == pytest.approx([score for _, score in expected], rel=1e-5)
    assert all(r.document is None for r in bare.results)

    echoed = client.rerank(model="xlm_roberta_classifier", query=COHERE_QUERY, documents=documents, top_n=2)
    by_text = direct_rerank(adapter_url, COHERE_DOCUMENTS, top_n=2)
    assert [r.index for r in echoed.results] == [index for index, _ in by_text]
    for result in echoed.results:
        assert result.document.text == COHERE_DOCUMENTS[result.index]
        assert result.document.dict()["title"] == f"Document {result.index}"  # every field, as sent


def test_langchain_cohere_rerank(adapter_url, sent_bodies):
    """langchain-cohere's ``CohereRerank`` set up as its users point it at a self-hosted server: it always sends
    ``"max_tokens_per_doc": null`` (and ``"top_n": null`` when asked for every document)."""
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(base_url=adapter_url, cohere_api_key="unused", model="xlm_roberta_classifier", top_n=2)
    documents = [Document(page_content=text, metadata={"source": index}) for index, text in enumerate(COHERE_DOCUMENTS)]
    compressed = reranker.compress_documents(documents, COHERE_QUERY)
    assert sent_bodies[0] == ("/v2/rerank", {"model": "xlm_roberta_classifier", "query": COHERE_QUERY,
                                             "documents": COHERE_DOCUMENTS, "top_n": 2, "max_tokens_per_doc": None})
    expected = direct_rerank(adapter_url, COHERE_DOCUMENTS, top_n=2)
    assert [document.metadata["source"] for document in compressed] == [index for index, _ in expected]
    assert [document.metadata["relevance_score"] for document in compressed] == pytest.approx(
        [score for _, score in expected], rel=1e-5)

    everything = reranker.rerank(COHERE_DOCUMENTS, COHERE_QUERY, top_n=None)
    assert sent_bodies[-1][1]["top_n"] is None
    assert [item["index"] for item in everything] == [index for index, _ in direct_rerank(adapter_url, COHERE_DOCUMENTS)]


# --- OpenAI SDK -------------------------------------------------------------------------------


def test_openai_client_lists_served_models(adapter_url, tiny_checkpoints):
    client = openai.OpenAI(base_url=f"{adapter_url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    models = client.models.list()
    ids = [model.id for model in models]
    assert sorted(ids) == sorted(tiny_checkpoints)
    for model in models:
        assert model.object == "model" and isinstance(model.created, int) and model.owned_by


# --- vLLM documentation bodies, plain HTTP ----------------------------------------------------


def test_vllm_doc_classify(adapter_url):
    body = ok_json(post(adapter_url, "/classify", {"model": "bert_classifier", "input": VLLM_CLASSIFY_PROMPTS}))
    assert body["object"] == "list" and body["model"] == "bert_classifier"
    assert re.fullmatch(r"classify-[0-9a-f]{16}", body["id"]), body["id"]
    assert [d["index"] for d in body["data"]] == list(range(len(VLLM_CLASSIFY_PROMPTS)))
    for item in body["data"]:
        assert item["num_classes"] == len(item["probs"]) == 3 and item["label"] in CLASSIFIER_LABELS
        assert sum(item["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_vllm_doc_rerank(adapter_url):
    request = {"model": "xlm_roberta_classifier", "query": VLLM_QUERY, "documents": VLLM_DOCUMENTS, "top_n": 2}
    body = ok_json(post(adapter_url, "/rerank", request))
    assert body["id"].startswith("score-") and body["model"] == "xlm_roberta_classifier"
    assert len(body["results"]) == 2
    assert_sorted_descending([r["relevance_score"] for r in body["results"]])
    for result in body["results"]:
        assert result["document"]["text"] == VLLM_DOCUMENTS[result["index"]]
        assert 0.0 <= result["relevance_score"] <= 1.0  # sigmoid of a 1-label head
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}


def test_vllm_doc_score_text_1_text_2(adapter_url):
    one = ok_json(post(adapter_url, "/score", {"model": "xlm_roberta_classifier", "encoding_format": "float",
                                                "text_1": VLLM_QUERY, "text_2": VLLM_DOCUMENTS[1]}))
    assert one["object"] == "list" and [d["index"] for d in one["data"]] == [0]
    many = ok_json(post(adapter_url, "/score", {"model": "xlm_roberta_classifier", "text_1": VLLM_QUERY,
                                                 "text_2": VLLM_DOCUMENTS[:2]}))
    assert [d["index"] for d in many["data"]] == [0, 1]
    assert all(d["object"] == "score" for d in many["data"])
    assert many["data"][1]["score"] == pytest.approx(one["data"][0]["score"], rel=1e-5, abs=1e-6)


def test_vllm_doc_score_queries_documents_matches_rerank(adapter_url):
    model = "xlm_roberta_classifier"
    score = ok_json(post(adapter_url, "/score", {"model": model, "queries": VLLM_QUERY, "documents": VLLM_DOCUMENTS}))
    rerank = ok_json(post(adapter_url, "/rerank", {"model": model, "query": VLLM_QUERY, "documents": VLLM_DOCUMENTS}))
    by_index = {r["index"]: r["relevance_score"] for r in rerank["results"]}
    assert [d["index"] for d in score["data"]] == list(range(len(VLLM_DOCUMENTS)))
    np.testing.assert_allclose([d["score"] for d in score["data"]], [by_index[i] for i in range(len(VLLM_DOCUMENTS))],
                               rtol=1e-5, atol=1e-6)


# --- SGLang documentation bodies, plain HTTP --------------------------------------------------


def test_sglang_doc_v1_classify(adapter_url):
    text = "Loved the new café—coffee was great."  # SGLang docs (classify models) use `input: "text to classify"`
    body = ok_json(post(adapter_url, "/v1/classify", {"model": "bert_classifier", "input": text}))
    assert re.fullmatch(r"classify-[0-9a-f]{32}", body["id"]), body["id"]
    assert body["object"] == "list" and isinstance(body["created"], int) and body["model"] == "bert_classifier"
    [item] = body["data"]
    assert item["index"] == 0 and item["num_classes"] == len(item["probs"]) == 3 and item["label"] in CLASSIFIER_LABELS
    assert sum(item["probs"]) == pytest.approx(1.0, abs=1e-5)  # SGLang: always softmax
    usage = body["usage"]
    assert usage["reasoning_tokens"] == 0 and usage["completion_tokens"] == 0
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0
    # the same softmax as vLLM's /classify for a 3-label head
    vllm = ok_json(post(adapter_url, "/classify", {"model": "bert_classifier", "input": text}))
    np.testing.assert_allclose(item["probs"], vllm["data"][0]["probs"], rtol=1e-5, atol=1e-6)


def test_sglang_doc_rerank_bare_list(adapter_url):
    response = post(adapter_url, "/sglang/v1/rerank", {"query": SGLANG_QUERY, "documents": SGLANG_DOCUMENTS, "top_n": 2,
                                                       "return_documents": True})
    body = ok_json(response)
    assert isinstance(body, list) and len(body) == 2, body
    assert_sorted_descending([item["score"] for item in body])
    assert len({item["index"] for item in body}) == 2
    for item in body:
        assert set(item) == {"score", "document", "index", "meta_info"}, item
        assert isinstance(item["score"], float)
        assert 0 <= item["index"] < len(SGLANG_DOCUMENTS) and item["document"] == SGLANG_DOCUMENTS[item["index"]]
        assert item["meta_info"] is None or isinstance(item["meta_info"], dict)


def test_sglang_doc_rerank_cross_encoder_scores_are_raw_logits(adapter_url):
    """The SGLang docs' rerank body (with `model`, which picks a served model here): the scores are the
    cross-encoder's raw logits, so their sigmoid is vLLM's relevance_score for the same pairs."""
    request = {"model": "xlm_roberta_classifier", "query": SGLANG_QUERY, "documents": SGLANG_DOCUMENTS[:2]}
    body = ok_json(post(adapter_url, "/sglang/v1/rerank", request))
    assert sorted(item["index"] for item in body) == [0, 1]
    assert_sorted_descending([item["score"] for item in body])
    assert all(item["document"] == SGLANG_DOCUMENTS[item["index"]] for item in body)  # return_documents: true
    vllm = ok_json(post(adapter_url, "/rerank", request))
    assert [r["index"] for r in vllm["results"]] == [item["index"] for item in body]
    sigmoid = [1.0 / (1.0 + np.exp(-item["score"])) for item in body]
    np.testing.assert_allclose(sigmoid, [r["relevance_score"] for r in vllm["results"]], rtol=1e-5, atol=1e-6)


def test_sglang_doc_native_classify_single_and_batch(adapter_url):
    single = ok_json(post(adapter_url, "/classify", {"text": "Loved the new café—coffee was great."}))
    assert isinstance(single, dict) and {"embedding", "meta_info"} <= set(single), single
    assert single["embedding"] and all(isinstance(x, float) for x in single["embedding"])
    assert isinstance(single["meta_info"], dict) and single["meta_info"]["prompt_tokens"] > 0

    batch = ok_json(post(adapter_url, "/classify", {"text": ["a", "Loved the new café—coffee was great."]}))
    assert isinstance(batch, list) and len(batch) == 2, batch
    for item in batch:
        assert {"embedding", "meta_info"} <= set(item) and len(item["embedding"]) == len(single["embedding"])
        assert all(isinstance(x, float) for x in item["embedding"]) and isinstance(item["meta_info"], dict)
    np.testing.assert_allclose(batch[1]["embedding"], single["embedding"], rtol=1e-5, atol=1e-5)
