"""Adapter pieces without a server: the Triton client is faked here (never in integration tests)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from poolserve_adapter import errors
from poolserve_adapter.app import create_app
from poolserve_adapter.registry import ModelRegistry, ServedModel, served_name
from poolserve_adapter.settings import Settings
from poolserve_adapter.tokenization import Encoded, TextEncoder
from poolserve_adapter.triton_gateway import TritonGateway


class FakeTritonClient:
    """Records calls; answers scores = mean token id per row, or raises a given error."""

    def __init__(self, error: InferenceServerException | None = None):
        self.calls: list[dict] = []
        self.error = error

    async def infer(self, model_name, inputs, outputs=None, client_timeout=None, timeout=None):
        tensors = {tensor.name(): tensor for tensor in inputs}
        self.calls.append({"model": model_name, "shapes": {n: t.shape() for n, t in tensors.items()}, "timeout": timeout})
        if self.error is not None:
            raise self.error
        ids = np.frombuffer(tensors["input_ids"]._raw_content, dtype=np.int64).reshape(tensors["input_ids"].shape())
        mask = np.frombuffer(tensors["attention_mask"]._raw_content, dtype=np.int64).reshape(ids.shape)
        scores = ((ids * mask).sum(1) / mask.sum(1)).astype(np.float32)[:, None]
        return SimpleNamespace(as_numpy=lambda name: scores)


def test_gateway_splits_rows_pads_each_chunk_and_keeps_order():
    client = FakeTritonClient()
    gateway = TritonGateway(client, timeout_s=1, max_rows=2)
    encoded = Encoded.from_lists([[1], [2, 2, 2], [3, 3], [4], [5, 5, 5, 5]])
    scores = asyncio.run(gateway.infer("m", encoded, ("scores",)))["scores"][:, 0]
    assert scores.tolist() == [1, 2, 3, 4, 5]
    assert [call["shapes"]["input_ids"] for call in client.calls] == [[2, 3], [2, 2], [1, 4]]
    assert all("token_type_ids" not in call["shapes"] for call in client.calls)


@pytest.mark.parametrize(
    "status, error_class, http",
    [
        ("StatusCode.INVALID_ARGUMENT", errors.BadRequestError, 400),
        ("StatusCode.UNAVAILABLE", errors.ServiceUnavailableError, 503),
        ("StatusCode.DEADLINE_EXCEEDED", errors.GatewayTimeoutError, 504),
        ("StatusCode.INTERNAL", errors.InternalServerError, 500),
        ("StatusCode.SOMETHING_NEW", errors.InternalServerError, 500),
    ],
)
def test_triton_status_mapping(status, error_class, http):
    client = FakeTritonClient(InferenceServerException("boom at /opt/secret/path.py 0xdeadbeef", status=status))
    gateway = TritonGateway(client, timeout_s=1, max_rows=8)
    with pytest.raises(error_class) as caught:
        asyncio.run(gateway.infer("m", Encoded.from_lists([[1, 2]]), ("scores",)))
    assert caught.value.status == http
    assert "/opt/secret" not in caught.value.message and "0xdeadbeef" not in caught.value.message


def test_validation_message_bounds_echoed_input():
    message = errors.validation_message([{"type": "x", "loc": ("body", "input"), "msg": "bad", "input": "y" * 500}] * 12)
    assert message.startswith("12 validation errors:\n")
    assert "...[truncated]" in message and "...and 2 more errors" in message


def test_served_name_rules():
    assert served_name({"served_model_name": "mine", "checkpoint": "x/y"}, "folder") == "mine"
    assert served_name({"checkpoint": "builtin:sentiment-minilm"}, "folder") == "sentiment-minilm"
    assert served_name({"checkpoint": "BAAI/bge-reranker-base"}, "folder") == "BAAI/bge-reranker-base"
    assert served_name({}, "folder") == "folder"


class WhitespaceTokenizer:
    """Token id = word length, exposed like a fast tokenizer's Rust backend."""

    class Backend:
        max_length = None

        def no_padding(self):
            pass

        def enable_truncation(self, max_length):
            self.max_length = max_length

        def encode_batch(self, inputs, add_special_tokens=True):
            rows = []
            for item in inputs:
                text, pair = item if isinstance(item, tuple) else (item, None)
                ids = ([len(w) for w in text.split()] + ([len(w) for w in pair.split()] if pair else []))[: self.max_length]
                rows.append(SimpleNamespace(ids=ids, type_ids=[0] * len(ids)))
            return rows

    def __init__(self):
        self.backend_tokenizer = self.Backend()

    def __len__(self):
        return 100


def make_model(name, task, num_labels):
    encoder = TextEncoder(WhitespaceTokenizer(), max_model_len=6, sends_token_types=False)
    return ServedModel(name=name, triton_model=name + "_triton", task=task, checkpoint="/ckpt", encoder=encoder,
                       id2label={0: "only"}, num_labels=num_labels)


@pytest.fixture
def app_with_fake_triton(monkeypatch):
    registry = ModelRegistry([make_model("ce", "classify", 1), make_model("multi", "classify", 3)])
    client = FakeTritonClient()

    async def fake_discover(_client, _settings):
        return registry

    monkeypatch.setattr("poolserve_adapter.app.discover_models", fake_discover)
    app = create_app(Settings(triton_grpc_url="127.0.0.1:1"))
    with TestClient(app) as test_client:
        app.state.gateway = TritonGateway(client, timeout_s=1, max_rows=64)
        yield test_client, client


def test_default_model_is_the_first_able_to_serve_the_task(app_with_fake_triton):
    test_client, triton = app_with_fake_triton
    body = test_client.post("/classify", json={"input": ["aa bbb"]}).json()
    assert body["model"] == "ce" and body["data"][0]["probs"] == [2.5] and body["data"][0]["label"] == "only"
    assert triton.calls[-1]["model"] == "ce_triton"
    rerank = test_client.post("/rerank", json={"query": "a", "documents": ["bb", "cccc"]}).json()
    assert [r["index"] for r in rerank["results"]] == [1, 0]


def test_over_long_is_caught_before_triton(app_with_fake_triton):
    test_client, triton = app_with_fake_triton
    response = test_client.post("/classify", json={"model": "ce", "input": "a b c d e f g h"})
    assert response.status_code == 400 and "maximum context length is 6 tokens" in response.json()["error"]["message"]
    assert triton.calls == []


def test_vocabulary_check_covers_ids_past_int64_and_negative_ids():
    from poolserve_adapter.errors import BadRequestError

    encoder = TextEncoder(WhitespaceTokenizer(), max_model_len=6, sends_token_types=False)  # vocabulary of 100
    encoder.check_vocabulary([[0, 99], [5]])
    for prompts, bad in (([[1, 100]], "100"), ([[3], [-1]], "-1"), ([[1, 2**64 + 5]], str(2**64 + 5))):
        with pytest.raises(BadRequestError, match=f"Token id {bad} is out of vocabulary"):
            encoder.check_vocabulary(prompts)
