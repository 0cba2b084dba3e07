"""The embedding routes against the real stack serving the built-in embedder (``poolserve serve --model
builtin:all-MiniLM-L6-v2``: Triton and the adapter, as ``make serve`` runs them), read by unchanged clients.

The OpenAI SDK's ``embeddings.create`` (its default asks for base64 and decodes it) and LangChain's
``OpenAIEmbeddings`` (over that SDK) must give exactly the float path's vectors, and all must match
sentence-transformers' own encode of the same checkpoint on the CPU. The Cohere SDK requires ``input_type``, and MiniLM defines no prompts: the SDK must surface vLLM's
400 as ``cohere.BadRequestError``; Cohere's body without ``input_type`` is served (plain HTTP). The SDK's
success path over a model with prompts is in tests/unit/test_embeddings_api.py.
"""

from __future__ import annotations

import json
import socket

import cohere
import httpx
import numpy as np
import openai
import pytest

from poolserve_stack.builtin import MINILM, minilm_package_dir
from tests.support.stack import start_serve, stop_serve

pytestmark = pytest.mark.integration

TEXTS = ["The capital of France is Paris.", "Knead the dough and bake it for 30 minutes.", "Cats sleep a lot."]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def stack_url(tmp_path_factory):
    process, url = start_serve(tmp_path_factory.mktemp("embed-serve"), ["--model", f"builtin:{MINILM}"])
    try:
        yield url
    finally:
        stop_serve(process)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' own vectors of TEXTS (fp32, CPU; its modules end with Normalize)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_package_dir()), device="cpu")
    return model.encode(TEXTS, convert_to_numpy=True)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT_S)


def float_path(url: str, **fields) -> np.ndarray:
    response = post(url, "/v1/embeddings", {"model": MINILM, "input": TEXTS, **fields})
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openai_sdk_equals_the_float_path_and_sentence_transformers(stack_url, reference):
    client = openai.OpenAI(base_url=f"{stack_url}/v1", api_key="unused", timeout=TIMEOUT_S)
    result = client.embeddings.create(model=MINILM, input=TEXTS)
    decoded = np.array([item.embedding for item in result.data], dtype=np.float32)
    floats = float_path(stack_url)
    np.testing.assert_array_equal(decoded, floats)
    assert cosines(floats, reference).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(floats, axis=1), 1, rtol=1e-5)
    assert result.model == MINILM and result.usage.prompt_tokens > len(TEXTS)
    with pytest.raises(openai.BadRequestError, match="does not support Matryoshka embeddings"):
        client.embeddings.create(model=MINILM, input=TEXTS, dimensions=128)


def test_langchain_openai_embeddings_equal_the_float_path_and_sentence_transformers(stack_url, reference,
                                                                                   monkeypatch):
    """LangChain's ``OpenAIEmbeddings`` set up as vLLM's docs set it up: ``check_embedding_ctx_length=False``
    sends the texts themselves (no tiktoken, which would download its encodings first) and leaves
    ``encoding_format`` to the OpenAI SDK, which asks for base64. Nothing but our server may be reached."""
    from langchain_openai import OpenAIEmbeddings

    for tracing in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(tracing, raising=False)
    connect = socket.socket.connect

    def connect_to_our_server_only(sock, address):
        assert address[0] == "127.0.0.1", f"LangChain connected to {address}, not to our server"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect_to_our_server_only)
    sent: list[dict] = []
    http_client = httpx.Client(event_hooks={"request": [lambda request: sent.append(json.loads(request.content))]})
    embeddings = OpenAIEmbeddings(model=MINILM, base_url=f"{stack_url}/v1", api_key="unused",
                                  check_embedding_ctx_length=False, timeout=TIMEOUT_S, http_client=http_client)
    documents = np.array(embeddings.embed_documents(TEXTS), dtype=np.float32)
    query = np.array(embeddings.embed_query(TEXTS[0]), dtype=np.float32)
    assert sent == [{"input": TEXTS, "model": MINILM, "encoding_format": "base64"},
                    {"input": [TEXTS[0]], "model": MINILM, "encoding_format": "base64"}]
    np.testing.assert_array_equal(documents, float_path(stack_url))
    assert cosines(documents, reference).min() >= 0.9999
    assert cosines(query[None], reference[:1]).min() >= 0.9999


def test_bytes_and_the_unnormalised_output(stack_url):
    floats = float_path(stack_url)
    response = post(stack_url, "/v1/embeddings", {"model": MINILM, "input": TEXTS, "encoding_format": "bytes"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    items = json.loads(response.headers["metadata"])["data"]
    np.testing.assert_array_equal([np.frombuffer(response.content[i["start"]:i["end"]], "<f4") for i in items], floats)
    raw = float_path(stack_url, use_activation=False)  # Triton's `pooled`: mean pooling, not normalised
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).min() > 1e-3
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), floats, rtol=1e-5, atol=1e-6)


def test_cohere_sdk_surfaces_the_input_type_400_and_the_body_without_it_is_served(stack_url):
    client = cohere.ClientV2(base_url=stack_url, api_key="unused", timeout=TIMEOUT_S)
    with pytest.raises(cohere.BadRequestError) as refused:
        client.embed(model=MINILM, texts=TEXTS, input_type="search_document", embedding_types=["float", "binary"])
    assert refused.value.body["error"]["message"] == (
        "Unsupported input_type 'search_document'. This model does not define any input_type task instructions.")
    response = post(stack_url, "/v2/embed", {"model": MINILM, "texts": TEXTS, "embedding_types": ["float", "binary"]})
    assert response.status_code == 200, response.text
    body = response.json()
    floats = np.array(body["embeddings"]["float"], dtype=np.float32)
    np.testing.assert_allclose(floats, float_path(stack_url), rtol=1e-6, atol=1e-7)
    assert body["embeddings"]["binary"] == (np.packbits(floats >= 0, axis=1).astype(int) - 128).tolist()


def test_sglang_encode_and_pooling_give_the_same_vectors(stack_url):
    floats = float_path(stack_url)
    encoded = post(stack_url, "/encode", {"text": TEXTS}).json()
    np.testing.assert_allclose([item["embedding"] for item in encoded], floats, rtol=1e-6, atol=1e-7)
    pooled = post(stack_url, "/pooling", {"model": MINILM, "input": TEXTS}).json()
    np.testing.assert_allclose([item["data"] for item in pooled["data"]], floats, rtol=1e-6, atol=1e-7)
