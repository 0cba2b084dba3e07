"""Runtime LoRA updates on the real stack (``poolserve serve`` with two adapter workers, the API key and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``): a tiny BERT classifier served with one adapter gets a second through
``POST /v1/load_lora_adapter`` (the base reloads in Triton), which then scores as its PEFT-merged model through
either worker; adapters that cannot be served are refused (400, or vLLM's 404 for a folder that is no adapter)
while the base and the other adapter keep serving the same scores; an unload makes the name vLLM's 404; and a
raw Triton gRPC request names its adapter in ``lora_names`` (UTF-8 bytes, zero-padded)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from poolserve_stack.processes import free_port
from tests.integration.test_lora_stack import reference_logits
from tests.support.stack import start_serve, stop_serve
from tests.support.tiny_models import build_checkpoint
from tests.unit.test_lora_runtime import MODELS, save_adapter

pytestmark = pytest.mark.integration
peft = pytest.importorskip("peft")

BASE = "tiny-bert"
TEXTS = ["the cat sat on the mat", "dogs bark at night", "a quiet afternoon", "stocks fell sharply today"]
API_KEY = "lora-admin"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 120
ROUNDS = 6  # requests repeated so that both adapter workers answer some


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-updates")
    checkpoint = build_checkpoint("bert", root / "base")
    _, targets, head = MODELS["bert"]
    adapters = {"rank4": save_adapter(checkpoint, root / "rank4", targets, 4, seed=1),
                "rank8-head": save_adapter(checkpoint, root / "rank8", targets, 8, seed=2, head=head),
                "dora": save_adapter(checkpoint, root / "dora", targets, 4, seed=3, use_dora=True)}
    other = build_checkpoint("qwen3", root / "other")
    adapters["other-base"] = save_adapter(other, root / "other_adapter", MODELS["qwen3"][1], 4, seed=4)
    grpc_port = free_port()
    process, url = start_serve(root, ["--model", f"bert_classifier={checkpoint}",
                                      "--set", f"bert_classifier.served_model_name={BASE}",
                                      "--set", f"bert_classifier.lora_modules=rank4={adapters['rank4']}",
                                      "--triton-grpc-port", str(grpc_port)],
                               env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "ADAPTER_API_KEY": API_KEY,
                                    "ADAPTER_WORKERS": "2"})
    try:
        yield url, checkpoint, adapters, f"127.0.0.1:{grpc_port}"
    finally:
        stop_serve(process)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=TIMEOUT_S)


def classify_logits(url: str, model: str) -> np.ndarray:
    response = post(url, "/classify", {"model": model, "input": TEXTS, "use_activation": False})
    assert response.status_code == 200, response.text
    return np.array([item["probs"] for item in response.json()["data"]])


def served_models(url: str) -> dict[str, dict]:
    response = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=TIMEOUT_S)
    return {entry["id"]: entry for entry in response.json()["data"]}


def assert_scores(url: str, checkpoint, adapters: dict, name: str) -> None:
    expected = reference_logits(checkpoint, adapters.get(name))
    for _ in range(ROUNDS):
        np.testing.assert_allclose(classify_logits(url, name), expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_the_routes_need_the_api_key(stack):
    url, _, adapters, _ = stack
    response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapters["rank4"])},
                          timeout=TIMEOUT_S)
    assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}


def test_a_runtime_loaded_adapter_serves_on_every_worker_as_its_merged_model(stack):
    url, checkpoint, adapters, _ = stack
    response = post(url, "/v1/load_lora_adapter", {"lora_name": "rank8-head", "lora_path": str(adapters["rank8-head"])})
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'rank8-head' added successfully.")
    for _ in range(ROUNDS):
        models = served_models(url)
        assert models["rank8-head"]["parent"] == BASE and models["rank8-head"]["root"] == str(adapters["rank8-head"])
        assert models["rank4"]["parent"] == BASE
    for name in (BASE, "rank4", "rank8-head"):
        assert_scores(url, checkpoint, adapters, name)
    again = post(url, "/v1/load_lora_adapter", {"lora_name": "rank8-head", "lora_path": str(adapters["rank8-head"])})
    assert again.status_code == 400 and again.json()["error"]["message"] == (
        "The lora adapter 'rank8-head' has already been loaded. If you want to load the adapter in place, set "
        "'load_inplace' to True.")


@pytest.mark.parametrize(("adapter", "status", "message"), [
    ("other-base", 400, "LoRA adapter 'bad' does not fit this base model (wrong base?)"),
    ("dora", 400, "LoRA adapter 'bad': DoRA (use_dora) is not supported"),
    (None, 404, "Loading lora bad failed: No adapter found for /nonexistent/adapter"),
])
def test_an_adapter_that_cannot_be_served_is_refused_and_the_rest_keeps_serving(stack, adapter, status, message):
    url, checkpoint, adapters, _ = stack
    path = str(adapters[adapter]) if adapter else "/nonexistent/adapter"
    response = post(url, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"].startswith(message), response.text
    assert "bad" not in served_models(url)
    for name in (BASE, "rank4"):
        assert_scores(url, checkpoint, adapters, name)
    unknown = post(url, "/classify", {"model": "bad", "input": TEXTS[0]})
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "The model `bad` does not exist."


def test_an_unloaded_adapter_is_gone_from_every_worker(stack):
    url, checkpoint, adapters, _ = stack
    response = post(url, "/v1/unload_lora_adapter", {"lora_name": "rank8-head"})
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'rank8-head' removed successfully.")
    for _ in range(ROUNDS):
        assert "rank8-head" not in served_models(url)
        gone = post(url, "/classify", {"model": "rank8-head", "input": TEXTS[0]})
        assert gone.status_code == 404 and gone.json()["error"]["message"] == "The model `rank8-head` does not exist."
    missing = post(url, "/v1/unload_lora_adapter", {"lora_name": "rank8-head"})
    assert missing.status_code == 404 and missing.json()["error"] == {
        "message": "The lora adapter 'rank8-head' cannot be found.", "type": "NotFoundError", "param": None,
        "code": 404}
    assert_scores(url, checkpoint, adapters, "rank4")


def test_a_raw_grpc_request_names_its_adapter(stack):
    import tritonclient.grpc as grpcclient
    from transformers import AutoTokenizer
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    _, checkpoint, adapters, grpc_url = stack
    encoded = AutoTokenizer.from_pretrained(str(checkpoint))(TEXTS[:2], padding=True, return_tensors="np")
    client = grpcclient.InferenceServerClient(grpc_url)

    def logits(names: list[str]) -> np.ndarray:
        """The first two texts, each on its adapter: lora_names holds each name's UTF-8 bytes, zero-padded."""
        rows = np.zeros((len(names), max(len(name) for name in names)), np.uint8)
        for row, name in zip(rows, names):
            row[:len(name)] = list(name.encode())
        inputs = []
        for name, array in (("input_ids", encoded["input_ids"].astype(np.int64)),
                            ("attention_mask", encoded["attention_mask"].astype(np.int64)), ("lora_names", rows)):
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer("bert_classifier", inputs, outputs=[grpcclient.InferRequestedOutput("logits")])
        return result.as_numpy("logits")

    expected = np.stack([reference_logits(checkpoint, None)[0], reference_logits(checkpoint, adapters["rank4"])[1]])
    np.testing.assert_allclose(logits(["", "rank4"]), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(InferenceServerException, match="LoRA adapter 'rank8-head' is not loaded on model "
                                                       "'bert_classifier'") as refused:
        logits(["rank4", "rank8-head"])
    assert refused.value.status() == "StatusCode.NOT_FOUND"
