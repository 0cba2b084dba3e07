"""SPLADE models through the real app: TEI's ``/embed_sparse`` and the vLLM embedding routes, with a real tokenizer
and a fake Triton gateway whose ``sparse`` vectors are a function of the token ids.

What these pin: ``[[{"index", "value"}]]`` with only the non-zero entries in index order (one list per input, a single
text too); the prompt prepended; TEI's truncation (its tokenizer's, special tokens kept, either side); every TEI
error with its status and ``{"error", "error_type"}`` body (Empty, Validation, Backend on a dense model, Overloaded,
Unhealthy, an invalid body); and ``/v1/embeddings``, ``/pooling`` and ``/score`` reading the vocabulary-wide vector
unnormalised, as vLLM's SPLADE pooler returns it whatever ``use_activation`` says.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from poolserve_adapter.errors import ServiceUnavailableError, TooManyRequestsError
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tokenization import Encoded, TextEncoder
from tests.support.fake_triton import HealthyGateway, app_over

MAX_MODEL_LEN = 32
TEXTS = ["paris is the capital of france", "snow"]
PROMPTS = {"query": "query: ", "document": ""}


class SparseGateway(HealthyGateway):
    """Stands in for TritonGateway: each sequence's vector holds ``log1p(id % 5)`` at its token ids (so ids that are
    multiples of 5 stay zero); a dense model's ``embeddings`` are two numbers per sequence."""

    max_rows = 16

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.calls: list[tuple[str, tuple[str, ...], Encoded]] = []
        self.refusal: Exception | None = None

    def refuse_if_busy(self, triton_model: str) -> None:
        if self.refusal is not None:
            raise self.refusal

    def leave_admission_board(self) -> None:
        pass

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append((triton_model, outputs, encoded))
        if outputs == ("embeddings",):
            return {"embeddings": np.stack([encoded.lengths, encoded.lengths + 1], axis=1).astype(np.float32)}
        assert outputs == ("sparse",)
        return {"sparse": np.stack([sparse_vector(ids[:length], self.vocab_size)
                                    for ids, length in zip(encoded.input_ids, encoded.lengths)])}


def sparse_vector(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    vector = np.zeros(vocab_size, dtype=np.float32)
    vector[ids] = np.log1p(ids % 5).astype(np.float32)
    return vector


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_models import wordpiece_tokenizer

    return wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


def served(name: str, tokenizer, **fields) -> ServedModel:
    encoder = TextEncoder(tokenizer, max_model_len=MAX_MODEL_LEN, sends_token_types=True)
    return ServedModel(name=name, triton_model=f"{name}_triton", task="embed", checkpoint=f"/checkpoints/{name}",
                       encoder=encoder, id2label={}, num_labels=0, created=1, **fields)


@pytest.fixture
def api(monkeypatch, tokenizer):
    vocab = len(tokenizer)
    models = [served("splade", tokenizer, sparse=True, embedding_size=vocab, prompts=PROMPTS),
              served("splade_without_prompts", tokenizer, sparse=True, embedding_size=vocab),
              served("dense", tokenizer, embedding_size=2, normalizes=True)]
    with app_over(monkeypatch, models, SparseGateway(vocab), max_items_per_request=16,
                  max_tokens_per_request=600) as running:
        yield running


def entries_of(tokenizer, text: str) -> list[dict]:
    vector = sparse_vector(np.array(tokenizer(text)["input_ids"]), len(tokenizer))
    return [{"index": int(i), "value": float(vector[i])} for i in np.flatnonzero(vector)]


def assert_entries(actual: list[dict], expected: list[dict]) -> None:
    """The same indices in the same order, values equal as float32 (JSON carries their shortest digits)."""
    assert [entry["index"] for entry in actual] == [entry["index"] for entry in expected]
    np.testing.assert_array_equal(np.array([e["value"] for e in actual], dtype=np.float32),
                                  np.array([e["value"] for e in expected], dtype=np.float32))


def sparse(client, **body):
    return client.post("/embed_sparse", json={"model": "splade", **body})


def test_each_text_gets_its_non_zero_entries_in_index_order(api, tokenizer):
    client, gateway = api
    response = sparse(client, inputs=TEXTS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body) == len(TEXTS)
    for entries, text in zip(body, TEXTS):
        assert [entry["index"] for entry in entries] == sorted(entry["index"] for entry in entries)
        assert all(entry["value"] != 0 for entry in entries)
        assert_entries(entries, entries_of(tokenizer, text))
    assert any(int(i) % 5 == 0 for i in tokenizer(TEXTS[0])["input_ids"])  # some token ids were zero entries
    assert gateway.calls[-1][:2] == ("splade_triton", ("sparse",))
    single = sparse(client, inputs=TEXTS[1])
    assert single.status_code == 200 and single.json() == [body[1]]  # a list of one for a single text
    # Unknown fields are ignored as TEI's serde does; no model named: the first sparse embedder.
    unnamed = client.post("/embed_sparse", json={"inputs": TEXTS[1], "normalize": True})
    assert unnamed.status_code == 200 and unnamed.json() == [body[1]] and gateway.calls[-1][0] == "splade_triton"


def test_the_prompt_is_prepended(api, tokenizer):
    client, _ = api
    response = sparse(client, inputs=[TEXTS[1]], prompt_name="query")
    assert response.status_code == 200 and len(response.json()) == 1
    assert_entries(response.json()[0], entries_of(tokenizer, "query: " + TEXTS[1]))
    assert [e["index"] for e in response.json()[0]] != [e["index"] for e in entries_of(tokenizer, TEXTS[1])]


def test_truncation_keeps_the_special_tokens_on_either_side(api, tokenizer):
    client, gateway = api
    long_text = " ".join(f"word{i}" for i in range(40))
    ids = tokenizer(long_text)["input_ids"]
    assert len(ids) > MAX_MODEL_LEN
    for direction, expected in (("Right", ids[:MAX_MODEL_LEN - 1] + [ids[-1]]),
                                ("left", [ids[0]] + ids[len(ids) - MAX_MODEL_LEN + 1:])):
        response = sparse(client, inputs=long_text, truncate=True, truncation_direction=direction)
        assert response.status_code == 200, response.text
        sent = gateway.calls[-1][2]
        assert sent.input_ids[0, :sent.lengths[0]].tolist() == expected
        assert sent.token_type_ids is not None
    default = sparse(client, inputs=long_text, truncate=True)
    assert default.status_code == 200 and gateway.calls[-1][2].input_ids[0, :MAX_MODEL_LEN - 1].tolist() == \
        ids[:MAX_MODEL_LEN - 1]


def tei_error(response, status: int, kind: str, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": message, "error_type": kind}


def test_teis_errors(api, tokenizer):
    client, gateway = api
    long_text = " ".join(f"word{i}" for i in range(40))
    calls = len(gateway.calls)
    tei_error(sparse(client, inputs=[]), 400, "Empty", "`inputs` cannot be empty")
    tei_error(sparse(client, inputs=["snow", ""]), 400, "Empty", "Input validation error: `inputs` cannot be empty")
    tei_error(sparse(client, inputs=["snow"] * 17), 422, "Validation", "batch size 17 > maximum allowed batch size 16")
    tei_error(sparse(client, inputs=long_text), 422, "Validation",
              f"Input validation error: `inputs` must have less than {MAX_MODEL_LEN} tokens. "
              f"Given: {len(tokenizer(long_text)['input_ids'])}")
    tei_error(sparse(client, inputs=long_text, truncate=False), 422, "Validation",
              f"Input validation error: `inputs` must have less than {MAX_MODEL_LEN} tokens. "
              f"Given: {len(tokenizer(long_text)['input_ids'])}")
    tei_error(sparse(client, inputs="snow", prompt_name="passage"), 422, "Validation",
              "Input validation error: `default-prompt-name` is set to `passage` but it was not found in the "
              'Sentence Transformers prompts. Available prompts: ["query", "document"]')
    tei_error(client.post("/embed_sparse", json={"model": "splade_without_prompts", "inputs": "snow",
                                                 "prompt_name": "query"}), 422, "Validation",
              "Input validation error: `default-prompt-name` is set to `query` but no prompts were found in the "
              "Sentence Transformers configuration")
    tei_error(client.post("/embed_sparse", json={"model": "dense", "inputs": "snow"}), 424, "Backend",
              "Backend error: Model is not an embedding model with SPLADE pooling")
    assert len(gateway.calls) == calls  # none of them reached Triton


@pytest.mark.parametrize("body", [{"input": "snow"}, {"inputs": "snow", "truncation_direction": "up"},
                                  {"inputs": [1, 2]}])
def test_an_invalid_body_is_a_validation_error(api, body):
    client, _ = api
    response = client.post("/embed_sparse", json=body)
    assert response.status_code == 422 and response.json()["error_type"] == "Validation"
    assert set(response.json()) == {"error", "error_type"}


@pytest.mark.parametrize("refusal, status, kind", [(TooManyRequestsError("Model is overloaded"), 429, "Overloaded"),
                                                   (ServiceUnavailableError("Triton is down"), 503, "Unhealthy")])
def test_refusals_of_the_shared_pipeline_take_teis_kinds(api, refusal, status, kind):
    client, gateway = api
    gateway.refusal = refusal
    tei_error(sparse(client, inputs="snow"), status, kind, refusal.message)


def test_vllm_routes_return_the_vocabulary_wide_vector_unnormalised(api, tokenizer):
    client, gateway = api
    expected = sparse_vector(np.array(tokenizer(TEXTS[0])["input_ids"]), len(tokenizer))
    for use_activation in (None, True, False):
        extra = {} if use_activation is None else {"use_activation": use_activation}
        embedded = client.post("/v1/embeddings", json={"model": "splade", "input": TEXTS[0], **extra})
        assert embedded.status_code == 200, embedded.text
        np.testing.assert_array_equal(np.array(embedded.json()["data"][0]["embedding"], dtype=np.float32), expected)
        assert gateway.calls[-1][1] == ("sparse",)
        pooled = client.post("/pooling", json={"model": "splade", "input": TEXTS[0], "task": "embed", **extra})
        assert pooled.status_code == 200, pooled.text
        np.testing.assert_array_equal(np.array(pooled.json()["data"][0]["data"], dtype=np.float32), expected)
    encoded = client.post("/v1/embeddings", json={"model": "splade", "input": TEXTS[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(encoded.json()["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_array_equal(decoded, expected)
    refused = client.post("/v1/embeddings", json={"model": "splade", "input": TEXTS[0], "dimensions": 8})
    assert refused.status_code == 400 and "does not support Matryoshka" in refused.json()["error"]["message"]


def test_score_is_the_cosine_of_the_sparse_vectors(api, tokenizer):
    client, gateway = api
    response = client.post("/score", json={"model": "splade", "queries": TEXTS[0], "documents": TEXTS})
    assert response.status_code == 200, response.text
    vectors = [sparse_vector(np.array(tokenizer(text)["input_ids"]), len(tokenizer)) for text in TEXTS]
    cosines = [float(vectors[0] @ v / np.linalg.norm(vectors[0]) / np.linalg.norm(v)) for v in vectors]
    np.testing.assert_allclose([item["score"] for item in response.json()["data"]], cosines, rtol=1e-5)
    assert {call[1] for call in gateway.calls} == {("sparse",)}
