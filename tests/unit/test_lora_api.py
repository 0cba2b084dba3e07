"""Multi-LoRA on the adapter's side: each adapter served as its own model name (vLLM), listed in /v1/models with
its base as parent, chosen by ``model`` or SGLang's ``lora_path``, and sent to Triton by name as ``lora_names``
(one UTF-8 name per sequence, zero-padded: UINT8 ``[n, width]``, zeros the base model) beside the base model's Triton name; an adapter
the Triton model no longer holds is vLLM's 404 for that name.

The app is the real one over the real :class:`TritonGateway`; only the gRPC client under it is faked, so what
these tests read is exactly the inputs the gateway builds for Triton.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from poolserve_adapter.registry import ModelRegistry, ServedModel
from poolserve_adapter.tokenization import TextEncoder
from poolserve_adapter.triton_gateway import TritonGateway
from poolserve_contract.wire import LORA_NAMES_INPUT, LORA_NOT_LOADED
from tests.support.fake_triton import app_over

TEXT = "paris is the capital of france"
ADAPTERS = (("alpha", "/adapters/alpha"), ("beta", "/adapters/beta"))
TRITON_TYPES = {"UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


def as_array(tensor) -> np.ndarray:
    """An InferInput's data as the array it was made from."""
    return np.frombuffer(tensor._raw_content, TRITON_TYPES[tensor.datatype()]).reshape(tensor.shape())


def decoded_names(rows: np.ndarray) -> list[str]:
    """A lora_names input's rows as the names they spell ("" the base model)."""
    return [bytes(row).rstrip(b"\0").decode() for row in rows]


class RecordingTritonClient:
    """The gRPC client under the gateway: records each request's model and inputs (as arrays, with their
    Triton types) and answers every output with one row per sequence."""

    def __init__(self):
        self.calls: list[dict] = []
        self.held: dict[str, set[str]] | None = None  # Triton model -> the adapters it holds (None: any name)

    async def infer(self, model_name, inputs, outputs=None, client_timeout=None, timeout=None, headers=None):
        arrays = {tensor.name(): as_array(tensor) for tensor in inputs}
        for name in decoded_names(arrays.get(LORA_NAMES_INPUT, np.zeros((0, 1), np.uint8))):
            if name and self.held is not None and name not in self.held.get(model_name, set()):
                raise InferenceServerException(LORA_NOT_LOADED.format(name=name, model=model_name),
                                               status="StatusCode.NOT_FOUND")
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

    def lora_names(self) -> list[list[str] | None]:
        """Each call's lora_names as a flat list, None where the call sent none."""
        return [decoded_names(call["inputs"][LORA_NAMES_INPUT]) if LORA_NAMES_INPUT in call["inputs"] else None
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


def test_a_request_naming_an_adapter_runs_the_base_triton_model_with_its_name(api):
    http, client = api
    response = http.post("/classify", json={"model": "beta", "input": [TEXT, "a", "b"]})
    assert response.status_code == 200 and response.json()["model"] == "beta"
    assert {call["model"] for call in client.calls} == {"reranker_triton"}
    assert client.lora_names() == [["beta", "beta"], ["beta"]]  # max_rows 2: each Triton request its rows' names
    assert all(call["types"][LORA_NAMES_INPUT] == "UINT8" and call["inputs"][LORA_NAMES_INPUT].shape[1] == len("beta")
               for call in client.calls)


def test_the_base_model_of_adapters_is_sent_empty_names(api):
    http, client = api
    assert http.post("/classify", json={"model": "reranker", "input": TEXT}).status_code == 200
    assert [call["model"] for call in client.calls] == ["reranker_triton"] and client.lora_names() == [[""]]


def test_a_model_without_adapters_is_sent_no_lora_names(api):
    http, client = api
    assert http.post("/classify", json={"model": "plain", "input": [TEXT, "a", "b"]}).status_code == 200
    assert client.lora_names() == [None, None]


def test_pair_scoring_and_embeddings_carry_the_adapter(api):
    http, client = api
    response = http.post("/rerank", json={"model": "alpha", "query": "q", "documents": ["d1", "d2", "d3"]})
    assert response.status_code == 200 and response.json()["model"] == "alpha"
    assert client.lora_names() == [["alpha", "alpha"], ["alpha"]]
    client.calls.clear()
    response = http.post("/v1/embeddings", json={"model": "gamma", "input": ["a", "b"]})
    assert response.status_code == 200, response.json()
    assert [call["model"] for call in client.calls] == ["embedder_triton"] and client.lora_names() == [["gamma", "gamma"]]


def test_unknown_model_name_is_vllms_404(api):
    http, client = api
    response = http.post("/classify", json={"model": "delta", "input": TEXT})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The model `delta` does not exist."
    assert http.get("/v1/models/delta").status_code == 404 and not client.calls


def test_sglang_lora_path_picks_the_adapter_per_request_or_per_input(api):
    http, client = api
    native = http.post("/classify", json={"model": "reranker", "text": TEXT, "lora_path": "beta"})
    assert native.status_code == 200 and client.lora_names() == [["beta"]]
    client.calls.clear()
    batch = http.post("/classify", json={"model": "reranker", "text": ["a", "b", "c"], "lora_path": ["alpha", None, "beta"]})
    assert batch.status_code == 200 and client.lora_names() == [["alpha", ""], ["beta"]]
    client.calls.clear()
    v1 = http.post("/v1/classify", json={"model": "reranker", "input": ["a", "b"], "lora_path": "alpha"})
    assert v1.status_code == 200 and client.lora_names() == [["alpha", "alpha"]]


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
    assert model.lora_modules == ADAPTERS and model.lora_names(2).tolist() == [[0], [0]]
    assert [(adapter.name, adapter.triton_model, adapter.parent, decoded_names(adapter.lora_names(1)))
            for adapter in model.adapters()] == [("alpha", "tagger", "tagger", ["alpha"]),
                                                 ("beta", "tagger", "tagger", ["beta"])]


def test_teis_routes_take_an_adapters_name_in_model(api):
    http, client = api
    response = http.post("/", json={"model": "beta", "query": "q", "texts": ["a", "b"]})
    assert response.status_code == 200, response.json()
    assert [call["model"] for call in client.calls] == ["reranker_triton"] and client.lora_names() == [["beta", "beta"]]


def test_an_adapter_the_triton_model_no_longer_holds_is_vllms_404(api):
    """Unloaded through another adapter worker, which this one has not learned yet: the runtime's NOT_FOUND for the
    name becomes vLLM's 404 for a model that does not exist; the base and the other adapters still serve."""
    http, client = api
    client.held = {"reranker_triton": {"alpha"}}
    response = http.post("/classify", json={"model": "beta", "input": TEXT})
    assert response.status_code == 404
    assert response.json()["error"] == {"message": "The model `beta` does not exist.", "type": "NotFoundError",
                                        "param": None, "code": 404}
    assert http.post("/classify", json={"model": "alpha", "input": TEXT}).status_code == 200
    assert http.post("/classify", json={"model": "reranker", "input": TEXT}).status_code == 200
