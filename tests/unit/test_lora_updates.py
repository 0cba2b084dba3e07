"""Runtime LoRA updates on the adapter's side (vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``):
off by default (unknown routes), behind the API key when on; a load or unload reloads the base Triton model with
the new ``lora_modules`` (parameter and model card) under the control key; vLLM's success texts and error bodies;
name clashes; an adapter the runtime refuses leaves everything as it was; another adapter worker learns the new
set before its next request; and the stack hands Triton's control key to the adapter only when updates are on.

The app is the real one over the real :class:`TritonGateway`; only the gRPC client under it is faked (it holds
each Triton model's config and answers loads and inferences from it).
"""

from __future__ import annotations

import copy
import json
import tempfile
from types import SimpleNamespace

import pytest
from tritonclient.utils import InferenceServerException

from poolserve_adapter.triton_gateway import TritonGateway
from poolserve_contract.card import ModelCard
from poolserve_contract.parameters import parse_lora_modules
from poolserve_contract.wire import CONTROL_GRPC_HEADER, MODEL_CARD
from tests.support.fake_triton import app_over
from tests.unit.test_lora_api import TEXT, RecordingTritonClient, served

CONTROL_KEY = "control-secret"
# How Triton reports a model whose initialize() raised the runtime's LoraError (tritonserver 2.51, Python backend).
# (status INVALID_ARGUMENT; the Python backend appends the traceback after "At:")
REFUSED_LOAD = ("load failed for model 'reranker_triton': version 1 is at UNAVAILABLE state: Internal: LoraError: "
                "LoRA adapter 'wrong' does not fit this base model (wrong base?): it targets "
                "model.layers.0.self_attn.q_proj, which the model does not have\n\nAt:\n"
                "  /work/main/model_runtime/poolserve_runtime/lora.py(195): attach\n")


def config_of(model) -> dict:
    """A Triton config as the host writes it: the lora_modules parameter and the model card listing the adapters."""
    card = ModelCard(served_name=model.name, family="bert", task=model.task, architecture="BertForSequenceClassification",
                     max_model_len=32, num_labels=model.num_labels, lora_modules=tuple(n for n, _ in model.lora_modules),
                     lora_paths=tuple(p for _, p in model.lora_modules))
    return {"name": model.triton_model, "backend": "python", "parameters": {
        MODEL_CARD: {"string_value": card.to_json()},
        "lora_modules": {"string_value": ",".join(f"{n}={p}" for n, p in model.lora_modules)}}}


class ReloadingTritonClient(RecordingTritonClient):
    """Triton's model configs and loads: a load replaces the model's config (the adapters it holds) unless
    ``refusal`` says how the load fails; inference refuses adapter names the model does not hold."""

    def __init__(self, models):
        super().__init__()
        self.configs = {model.triton_model: config_of(model) for model in models}
        self.loads: list[tuple[str, dict, dict]] = []
        self.refusal: str | None = None
        self.held = {}
        self.hold()

    def hold(self) -> None:
        self.held = {name: {adapter for adapter, _ in parse_lora_modules(
            config["parameters"]["lora_modules"]["string_value"])} for name, config in self.configs.items()}

    async def get_model_config(self, model_name, as_json=False, client_timeout=None):
        return {"config": copy.deepcopy(self.configs[model_name])}

    async def load_model(self, model_name, headers=None, config=None, files=None, client_timeout=None):
        self.loads.append((model_name, json.loads(config), headers))
        if self.refusal is not None:
            raise InferenceServerException(self.refusal, status="StatusCode.INVALID_ARGUMENT")
        self.configs[model_name] = json.loads(config)
        self.hold()


@pytest.fixture
def adapter_folders(tmp_path, monkeypatch):
    """Folders that pass the adapter's check (an adapter_config.json each); the workers' shared lock file goes
    under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folders = {}
    for name in ("delta", "epsilon"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
        folders[name] = str(tmp_path / name)
    return folders


@pytest.fixture
def models(tokenizer):
    return [served("reranker", tokenizer, lora_modules=(("alpha", "/adapters/alpha"), ("beta", "/adapters/beta"))),
            served("embedder", tokenizer, task="embed", labels=0, embedding_size=4)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_models import wordpiece_tokenizer

    return wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture
def updating(monkeypatch, models, adapter_folders):
    """(HTTP client, fake Triton) of an adapter with runtime updates on and an API key."""
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    client = ReloadingTritonClient(models)
    with app_over(monkeypatch, models, TritonGateway(client, timeout_s=5, max_rows=8), api_key="k",
                  allow_runtime_lora_updating=True, triton_control_key=CONTROL_KEY) as (http, _):
        http.headers["Authorization"] = "Bearer k"
        yield http, client


def listed(http) -> dict[str, dict]:
    return {card["id"]: card for card in http.get("/v1/models").json()["data"]}


@pytest.mark.parametrize("vllm_env", [None, "0", "false"])
def test_the_routes_do_not_exist_unless_allowed(monkeypatch, models, vllm_env):
    monkeypatch.delenv("ADAPTER_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    if vllm_env is None:
        monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", vllm_env)
    client = ReloadingTritonClient(models)
    with app_over(monkeypatch, models, TritonGateway(client, timeout_s=5, max_rows=8)) as (http, _):
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            response = http.post(route, json={"lora_name": "delta", "lora_path": "/x"})
            assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    assert not client.loads


def test_vllms_environment_variable_turns_them_on(monkeypatch, models, adapter_folders):
    monkeypatch.delenv("ADAPTER_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", " True ")
    client = ReloadingTritonClient(models)
    with app_over(monkeypatch, models, TritonGateway(client, timeout_s=5, max_rows=8)) as (http, _):
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": adapter_folders["delta"]})
    assert response.status_code == 200 and client.loads[0][2] == {}  # no control key given: none sent


def test_the_routes_sit_behind_the_api_key(updating, adapter_folders):
    http, client = updating
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": adapter_folders["delta"]},
                         headers={"Authorization": "Bearer wrong"})
    assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"}) and not client.loads


def test_a_load_reloads_the_base_with_the_new_adapter_and_serves_it(updating, adapter_folders):
    http, client = updating
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": adapter_folders["delta"]})
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'delta' added successfully.")
    (model, config, headers), = client.loads
    assert model == "reranker_triton" and headers == {CONTROL_GRPC_HEADER: CONTROL_KEY}
    expected = (("alpha", "/adapters/alpha"), ("beta", "/adapters/beta"), ("delta", adapter_folders["delta"]))
    assert parse_lora_modules(config["parameters"]["lora_modules"]["string_value"]) == expected
    card = ModelCard.from_config(config)
    assert (card.lora_modules, card.lora_paths) == (("alpha", "beta", "delta"), tuple(p for _, p in expected))
    entry = listed(http)["delta"]
    assert (entry["parent"], entry["root"]) == ("reranker", adapter_folders["delta"])
    classified = http.post("/classify", json={"model": "delta", "input": [TEXT, "a"]})
    assert classified.status_code == 200 and classified.json()["model"] == "delta"
    assert client.lora_names()[-1] == ["delta", "delta"]


def test_base_model_name_picks_the_base_and_the_first_adapter_of_a_base_starts_its_names(updating, adapter_folders):
    http, client = updating
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": adapter_folders["delta"],
                                                         "base_model_name": "embedder"})
    assert response.status_code == 200 and client.loads[0][0] == "embedder_triton"
    assert listed(http)["delta"]["parent"] == "embedder"
    assert http.post("/v1/embeddings", json={"model": "embedder", "input": ["a"]}).status_code == 200
    assert client.lora_names()[-1] == [""]  # the base now has adapters: it sends names too (one dynamic batch)
    unknown = http.post("/v1/load_lora_adapter", json={"lora_name": "epsilon", "lora_path": adapter_folders["epsilon"],
                                                       "base_model_name": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "The model `nope` does not exist."


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"lora_name": "alpha", "lora_path": "{delta}"}, 400,
     {"message": "The lora adapter 'alpha' has already been loaded. If you want to load the adapter in place, set "
                 "'load_inplace' to True.", "type": "InvalidUserInput", "param": None, "code": 400}),
    ({"lora_name": "embedder", "lora_path": "{delta}"}, 400,
     {"message": "The lora adapter 'embedder' conflicts with a served base model.", "type": "InvalidUserInput",
      "param": None, "code": 400}),
    ({"lora_name": "", "lora_path": "{delta}"}, 400,
     {"message": "Both 'lora_name' and 'lora_path' must be provided.", "type": "InvalidUserInput", "param": None,
      "code": 400}),
    ({"lora_name": "zeta", "lora_path": "/no/such/adapter"}, 404,
     {"message": "Loading lora zeta failed: No adapter found for /no/such/adapter", "type": "NotFoundError",
      "param": None, "code": 404}),
    ({"lora_name": "a,b", "lora_path": "{delta}"}, 400,
     {"message": "lora_name and lora_path may not contain ',', '=' or NUL characters, nor surrounding blanks (they "
                 "are written into the model's lora_modules parameter)", "type": "InvalidUserInput", "param": None,
      "code": 400}),
])
def test_refused_loads_are_vllms_errors_and_reload_nothing(updating, adapter_folders, body, status, error):
    http, client = updating
    body = {key: value.format(**adapter_folders) for key, value in body.items()}
    response = http.post("/v1/load_lora_adapter", json=body)
    assert (response.status_code, response.json()) == (status, {"error": error})
    assert not client.loads and set(listed(http)) == {"reranker", "embedder", "alpha", "beta"}


def test_a_body_missing_a_field_is_a_validation_error(updating):
    http, client = updating
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "delta"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "body.lora_path"
    not_json = http.post("/v1/unload_lora_adapter", content=b"lora_name=alpha")
    assert not_json.status_code == 400 and not client.loads


def test_an_adapter_the_runtime_refuses_is_a_400_with_its_reason_and_everything_keeps_serving(updating, adapter_folders):
    http, client = updating
    client.refusal = REFUSED_LOAD
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "wrong", "lora_path": adapter_folders["delta"]})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "LoRA adapter 'wrong' does not fit this base model (wrong base?): it targets "
                   "model.layers.0.self_attn.q_proj, which the model does not have",
        "type": "BadRequestError", "param": None, "code": 400}
    assert "wrong" not in listed(http)
    for name in ("reranker", "alpha", "beta"):
        assert http.post("/classify", json={"model": name, "input": TEXT}).status_code == 200
    client.refusal = "load failed for model 'reranker_triton': CUDA out of memory at /opt/x/y.py"
    failed = http.post("/v1/load_lora_adapter", json={"lora_name": "wrong", "lora_path": adapter_folders["delta"]})
    assert failed.status_code == 500 and failed.json()["error"]["message"] == (
        "load failed for model 'reranker_triton': CUDA out of memory at <path>")


def test_load_inplace_replaces_the_folder_on_its_base(updating, adapter_folders):
    http, client = updating
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": adapter_folders["epsilon"],
                                                         "load_inplace": True})
    assert response.status_code == 200
    assert parse_lora_modules(client.loads[0][1]["parameters"]["lora_modules"]["string_value"]) == (
        ("alpha", "/adapters/alpha"), ("beta", adapter_folders["epsilon"]))
    assert listed(http)["beta"]["root"] == adapter_folders["epsilon"]
    moved = http.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": adapter_folders["epsilon"],
                                                      "load_inplace": True, "base_model_name": "embedder"})
    assert moved.status_code == 400 and "loaded on 'reranker', not on 'embedder'" in moved.json()["error"]["message"]


def test_an_unload_reloads_the_base_without_it_and_its_name_is_then_vllms_404(updating):
    http, client = updating
    response = http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'alpha' removed successfully.")
    assert parse_lora_modules(client.loads[0][1]["parameters"]["lora_modules"]["string_value"]) == (
        ("beta", "/adapters/beta"),)
    assert "alpha" not in listed(http)
    gone = http.post("/classify", json={"model": "alpha", "input": TEXT})
    assert gone.status_code == 404 and gone.json()["error"]["message"] == "The model `alpha` does not exist."
    again = http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
    assert (again.status_code, again.json()) == (404, {"error": {
        "message": "The lora adapter 'alpha' cannot be found.", "type": "NotFoundError", "param": None, "code": 404}})
    empty = http.post("/v1/unload_lora_adapter", json={"lora_name": ""})
    assert empty.status_code == 400 and empty.json()["error"]["message"] == (
        "'lora_name' needs to be provided to unload a LoRA adapter.")


def test_another_worker_learns_the_new_adapters_before_its_next_request(monkeypatch, models, adapter_folders):
    """Two adapter workers over one Triton: what one loads or unloads, the other serves or refuses at once."""
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    client = ReloadingTritonClient(models)
    settings = {"allow_runtime_lora_updating": True}
    with app_over(monkeypatch, models, TritonGateway(client, timeout_s=5, max_rows=8), **settings) as (first, _), \
            app_over(monkeypatch, models, TritonGateway(client, timeout_s=5, max_rows=8), **settings) as (second, _):
        assert first.post("/v1/load_lora_adapter", json={"lora_name": "delta",
                                                         "lora_path": adapter_folders["delta"]}).status_code == 200
        assert listed(second)["delta"]["parent"] == "reranker"
        response = second.post("/classify", json={"model": "delta", "input": TEXT})
        assert response.status_code == 200 and client.lora_names()[-1] == ["delta"]
        # The second worker's own update starts from what the first did: neither loses the other's adapter.
        assert second.post("/v1/load_lora_adapter", json={"lora_name": "epsilon",
                                                          "lora_path": adapter_folders["epsilon"]}).status_code == 200
        assert {"delta", "epsilon"} <= set(listed(first)) and {"delta", "epsilon"} <= client.held["reranker_triton"]
        assert first.post("/v1/unload_lora_adapter", json={"lora_name": "delta"}).status_code == 200
        assert "delta" not in listed(second)
        gone = second.post("/classify", json={"model": "delta", "input": TEXT})
        assert gone.status_code == 404


def test_the_stack_hands_triton_s_control_key_to_the_adapter_only_when_updates_are_on(monkeypatch):
    from poolserve_stack.serve import adapter_environment, adapter_settings
    from tests.unit.test_cli import stack_args

    monkeypatch.delenv("ADAPTER_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    monkeypatch.setenv("ADAPTER_TRITON_CONTROL_KEY", "stale")
    triton = SimpleNamespace(grpc_url="127.0.0.1:5001", inference_key=None, metrics_port=5002, control_key="admin")
    off = adapter_settings(triton, stack_args(api_key=None))
    assert off.triton_control_key is None and not off.allow_runtime_lora_updating
    environ = {"PATH": "/bin", "ADAPTER_TRITON_CONTROL_KEY": "stale", "TRITON_CONTROL_KEY": "admin",
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    env = adapter_environment(off.model_copy(update={"workers": 2}), environ)
    assert "ADAPTER_TRITON_CONTROL_KEY" not in env and "TRITON_CONTROL_KEY" not in env
    assert env["ADAPTER_ALLOW_RUNTIME_LORA_UPDATING"] == "false"  # the stack's decision, not the inherited variable
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    on = adapter_settings(triton, stack_args(api_key=None))
    assert on.allow_runtime_lora_updating and on.triton_control_key == "admin"
    env = adapter_environment(on.model_copy(update={"workers": 2}), environ)
    assert env["ADAPTER_TRITON_CONTROL_KEY"] == "admin" and env["ADAPTER_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert "TRITON_CONTROL_KEY" not in env


def test_the_supervisor_adopts_the_stubs_that_started_first():
    """A runtime update right after another: the new version's stub and a later load's stub run at once; the
    supervisor keeps as many as it tracked, the earliest started (a gone process counts as the latest)."""
    import os

    from poolserve_stack.triton_server import started_first

    gone = 2**22 + 1  # above the kernel's pid limit: no such process
    assert started_first({os.getpid(), 1, gone}, 1) == {1}
    assert started_first({os.getpid(), 1, gone}, 2) == {1, os.getpid()}
    assert started_first({os.getpid(), 1}, 0) == {1, os.getpid()}
