"""Multi-LoRA on the adapter's side: each adapter served as its own model name (vLLM), listed in /v1/models with
its base as parent, chosen by ``model`` or SGLang's ``lora_path``, and sent to Triton as ``lora_ids`` (one
INT32 per sequence, ``[n, 1]``) beside the base model's Triton name.

The app is the real one over the real :class:`TritonGateway`; only the gRPC client under it is faked, so what
these tests read is exactly the inputs the gateway builds for Triton.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from poolserve_adapter.registry import ModelRegistry, ServedModel
from poolserve_adapter.tokenization import TextEncoder
from poolserve_adapter.triton_gateway import TritonGateway
from poolserve_contract.wire import LORA_IDS_INPUT
from tests.support.fake_triton import app_over

TEXT = "paris is the capital of france"
ADAPTERS = (("alpha", "/adapters/alpha"), ("beta", "/adapters/beta"))
TRITON_TYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


class RecordingTritonClient:
    """The gRPC client under the gateway: records each request's model and inputs (as arrays, with their
    Triton types) and answers every output with one row per sequence."""

    def __init__(self):
        self.calls: list[dict] = []

    async def infer(self, model_name, inputs, outputs=None, client_timeout=None, timeout=None, headers=None):
        arrays = {tensor.name(): np.frombuffer(tensor._raw_content, TRITON_TYPES[tensor.datatype()]).reshape(
            tensor.shape()) for tensor in inputs}
        self.calls.append({"model": model_name, "inputs": arrays,
                           "types": {tensor.name(): tensor.datatype() for tensor in inputs}})
        rows = arrays["input_ids"].shape[0]
        answers = {"scores": np.full((rows, 1), 0.5, np.float32), "logits": np.zeros((rows, 2), np.float32),
                   "embeddings": np.ones((rows, 4), np.float32) / 2}
        return SimpleNamespace(as_numpy=lambda name: answers[name])

    async def is_server_ready(self, client_timeout=None) -> bool:
        return True

    async def is_model_ready(self, name, client_timeout=None) -> bool:
        return True

    async def close(self) -> None:
        pass

    def lora_ids(self) -> list[list[int] | None]:
        """Each call's lora_ids as a flat list, None where the call sent none."""
        return [call["inputs"][LORA_IDS_INPUT][:, 0].tolist() if LORA_IDS_INPUT in call["inputs"] else None
                for call in self.calls]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_models import wordpiece_tokenizer

    return wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


def served(name: str, tokenizer, task: str = "classify", labels: int = 1, **fields) -> ServedModel:
    return ServedModel(name=name, triton_model=f"{name}_triton", task=task, checkpoint=f"/checkpoints/{name}",
                       encoder=TextEncoder(tokenizer, max_model_len=32, sends_token_types=False), id2label={}, num_labels=labels, created=1,
                       **fields)


@pytest.fixture
def api(monkeypatch, tokenizer):
    models = [served("reranker", tokenizer, lora_modules=ADAPTERS), served("plain", tokenizer),
              served("embedder", tokenizer, task="embed", labels=0, embedding_size=4, lora_modules=(("gamma", "/adapters/gamma"),))]
    client = RecordingTritonClient()
    with app_over(monkeypatch, models, TritonGateway(client, timeout_s=5, max_rows=2)) as (http, _):
        yield http, client


def test_models_lists_each_adapter_with_its_base_as_parent(api):
    http, _ = api
    listed = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert list(listed) == ["reranker", "plain", "embedder", "alpha", "beta", "gamma"]
    assert {key: listed["beta"][key] for key in ("root", "parent", "max_model_len")} == {
        "root": "/adapters/beta", "parent": "reranker", "max_model_len": None}
    assert listed["reranker"]["parent"] is None and listed["reranker"]["max_model_len"] == 32
    one = http.get("/v1/models/alpha").json()
    assert (one["id"], one["parent"], one["root"]) == ("alpha", "reranker", "/adapters/alpha")


def test_a_request_naming_an_adapter_runs_the_base_triton_model_with_its_id(api):
    http, client = api
    response = http.post("/classify", json={"model": "beta", "input": [TEXT, "a", "b"]})
    assert response.status_code == 200 and response.json()["model"] == "beta"
    assert {call["model"] for call in client.calls} == {"reranker_triton"}
    assert client.lora_ids() == [[2, 2], [2]]  # max_rows 2: each Triton request carries its rows' ids
    assert all(call["types"][LORA_IDS_INPUT] == "INT32" and call["inputs"][LORA_IDS_INPUT].ndim == 2
               for call in client.calls)


def test_the_base_model_of_adapters_is_sent_zeros(api):
    http, client = api
    assert http.post("/classify", json={"model": "reranker", "input": TEXT}).status_code == 200
    assert [call["model"] for call in client.calls] == ["reranker_triton"] and client.lora_ids() == [[0]]


def test_a_model_without_adapters_is_sent_no_lora_ids(api):
    http, client = api
    assert http.post("/classify", json={"model": "plain", "input": [TEXT, "a", "b"]}).status_code == 200
    assert client.lora_ids() == [None, None]


def test_pair_scoring_and_embeddings_carry_the_adapter(api):
    http, client = api
    response = http.post("/rerank", json={"model": "alpha", "query": "q", "documents": ["d1", "d2", "d3"]})
    assert response.status_code == 200 and response.json()["model"] == "alpha"
    assert client.lora_ids() == [[1, 1], [1]]
    client.calls.clear()
    response = http.post("/v1/embeddings", json={"model": "gamma", "input": ["a", "b"]})
    assert response.status_code == 200, response.json()
    assert [call["model"] for call in client.calls] == ["embedder_triton"] and client.lora_ids() == [[1, 1]]


def test_unknown_model_name_is_vllms_404(api):
    http, client = api
    response = http.post("/classify", json={"model": "delta", "input": TEXT})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The model `delta` does not exist."
    assert http.get("/v1/models/delta").status_code == 404 and not client.calls


def test_sglang_lora_path_picks_the_adapter_per_request_or_per_input(api):
    http, client = api
    native = http.post("/classify", json={"model": "reranker", "text": TEXT, "lora_path": "beta"})
    assert native.status_code == 200 and client.lora_ids() == [[2]]
    client.calls.clear()
    batch = http.post("/classify", json={"model": "reranker", "text": ["a", "b", "c"], "lora_path": ["alpha", None, "beta"]})
    assert batch.status_code == 200 and client.lora_ids() == [[1, 0], [2]]
    client.calls.clear()
    v1 = http.post("/v1/classify", json={"model": "reranker", "input": ["a", "b"], "lora_path": "alpha"})
    assert v1.status_code == 200 and client.lora_ids() == [[1, 1]]


def test_sglang_unknown_lora_path_is_its_400_before_any_triton_call(api):
    http, client = api
    native = http.post("/classify", json={"model": "reranker", "text": TEXT, "lora_path": "delta"})
    assert native.status_code == 400
    assert native.json() == {"error": {"message": "The following requested LoRA adapters are not loaded: delta\n"
                                                  "Loaded adapters: ['alpha', 'beta']."}}
    miscounted = http.post("/classify", json={"model": "reranker", "text": ["a", "b"], "lora_path": ["alpha"]})
    assert miscounted.status_code == 400 and "1 adapters for 2 inputs" in miscounted.json()["error"]["message"]
    flat = http.post("/v1/classify", json={"model": "plain", "input": "a", "lora_path": "alpha"})
    assert flat.status_code == 400 and "not loaded: alpha" in flat.json()["message"]
    assert not client.calls


def test_an_adapter_named_as_a_model_or_another_adapter_is_refused_at_start(tokenizer):
    with pytest.raises(ValueError, match="adapter plain of reranker is named as model plain"):
        ModelRegistry([served("reranker", tokenizer, lora_modules=(("plain", "/adapters/plain"),)),
                       served("plain", tokenizer)])
    with pytest.raises(ValueError, match="adapter alpha of other is named as an adapter of reranker"):
        ModelRegistry([served("reranker", tokenizer, lora_modules=ADAPTERS),
                       served("other", tokenizer, lora_modules=ADAPTERS[:1])])


def test_the_served_model_learns_its_adapters_from_the_card(tmp_path):
    from poolserve_adapter.registry import build_served_model
    from poolserve_contract.card import ModelCard
    from poolserve_contract.wire import MODEL_CARD
    from tests.support.token_models import token_classifier_checkpoint

    checkpoint = token_classifier_checkpoint(tmp_path / "tagger", "distilbert")
    card = ModelCard(served_name="tagger", family="distilbert_token_classifier", task="token_classify",
                     architecture="DistilBertForTokenClassification", max_model_len=128, num_labels=5,
                     lora_modules=("alpha", "beta"), lora_paths=("/adapters/alpha", "/adapters/beta"))
    config = {"name": "tagger", "parameters": {"checkpoint": {"string_value": str(checkpoint)},
                                               MODEL_CARD: {"string_value": ModelCard.from_json(card.to_json()).to_json()}}}
    model = build_served_model("tagger", config, tmp_path)
    assert model.lora_modules == ADAPTERS and model.lora_id == 0 and model.lora_ids(2).tolist() == [0, 0]
    assert [(adapter.name, adapter.triton_model, adapter.lora_id, adapter.parent) for adapter in model.adapters()] == [
        ("alpha", "tagger", 1, "tagger"), ("beta", "tagger", 2, "tagger")]


def test_teis_routes_take_an_adapters_name_in_model(api):
    http, client = api
    response = http.post("/", json={"model": "beta", "query": "q", "texts": ["a", "b"]})
    assert response.status_code == 200, response.json()
    assert [call["model"] for call in client.calls] == ["reranker_triton"] and client.lora_ids() == [[2, 2]]
