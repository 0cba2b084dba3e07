"""`docker compose up` of docker-compose.yml: real images, real containers, real requests."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.compose.conftest import ADDRESS, PROJECT_ROOT, http, new_project, wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def stack(images):
    project = new_project("tps-compose", [PROJECT_ROOT / "docker-compose.yml"])
    try:
        project.timed("up", "up", "-d", "--wait", "--wait-timeout", "900")
        yield project
    finally:
        project.compose("down", "-v", "--remove-orphans", "--timeout", "60", check=False)
    print(f"compose timings (s): {json.dumps({k: round(v, 1) for k, v in project.timings.items()})}")
    assert project.leftovers() == {"containers": [], "volumes": [], "networks": []}


def test_http_routes_answer(stack):
    base = stack.url("HTTP_PORT")
    status, body = http("POST", f"{base}/classify", {"model": "sentiment-minilm", "input": ["I love this!",
                                                                                            "This is terrible."]})
    assert status == 200, body
    labels = [item["label"] for item in json.loads(body)["data"]]
    assert labels == ["positive", "negative"]

    status, body = http("POST", f"{base}/rerank", {"model": "all-MiniLM-L6-v2", "query": "What is the capital of France?",
                                                   "documents": ["Berlin is in Germany.", "Paris is the capital of France."]})
    assert status == 200, body
    assert json.loads(body)["results"][0]["index"] == 1

    status, body = http("POST", f"{base}/score", {"model": "all-MiniLM-L6-v2", "queries": "capital of France",
                                                  "documents": ["Paris is the capital of France.", "Cats sleep."]})
    assert status == 200, body
    scores = [item["score"] for item in json.loads(body)["data"]]
    assert scores[0] > scores[1]

    status, body = http("POST", f"{base}/classify", {"model": "nope", "input": "x"})
    assert status == 404 and "does not exist" in json.loads(body)["error"]["message"]

    status, body = http("GET", f"{base}/metrics")
    text = body.decode()
    assert status == 200 and "adapter_requests_total" in text
    assert "nv_inference_request_success" in text  # Triton's own metrics, fetched from the triton container


def test_the_adapter_container_has_no_torch(stack):
    """The adapter serves (the test above) from an image without torch, triton or the model code:
    it reads the models through the torch-free contract alone."""
    found = stack.compose("exec", "-T", "adapter", "python", "-c",
                          "import importlib.util as u; print([n for n in ('torch', 'triton', 'poolserve_runtime')"
                          " if u.find_spec(n)])")
    assert found.stdout.strip() == "[]"


def test_raw_grpc_infer_on_the_published_triton_port(stack):
    """The README's tritonclient example, against the compose stack's published gRPC port."""
    client = grpcclient.InferenceServerClient(f"{ADDRESS}:{stack.env['TRITON_GRPC_PORT']}")
    assert client.is_model_ready("bert_classifier")
    ids = np.array([[101, 1045, 2293, 2023, 999, 102]], dtype=np.int64)  # "i love this!" in MiniLM's vocabulary
    input_ids = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
    input_ids.set_data_from_numpy(ids)
    result = client.infer("bert_classifier", [input_ids])
    scores = result.as_numpy("scores")
    assert scores.shape == (1, 2) and scores[0, 1] > 0.9 and abs(float(scores.sum()) - 1.0) < 1e-5
    # The published port takes inference, not control: an upload of code and an unload are refused.
    upload = {"file:1/model.py": b"import os\nos.system('touch /tmp/pwned')\n"}
    with pytest.raises(InferenceServerException, match="restricted"):
        client.load_model("intruder", config=json.dumps({"backend": "python"}), files=upload)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("bert_classifier")
    assert client.is_model_ready("bert_classifier") and not client.is_model_ready("intruder")
    client.close()


def test_triton_restart_is_ridden_out(stack):
    """The triton container restarts; the adapter keeps running and serves again once Triton is back."""
    base = stack.url("HTTP_PORT")
    adapter_before = container_state(stack, "adapter")
    stack.timed("triton restart", "restart", "triton", timeout=300)
    wait_for(f"{base}/health", timeout_s=300)
    status, body = http("POST", f"{base}/classify", {"model": "sentiment-minilm", "input": "Wonderful."})
    assert status == 200, body
    assert container_state(stack, "adapter") == adapter_before  # the same adapter process, never restarted


def container_state(stack, service: str) -> str:
    container = stack.compose("ps", "-q", service).stdout.strip()
    return subprocess.run(["docker", "inspect", "-f", "{{.Id}} {{.State.StartedAt}} {{.RestartCount}}", container],
                          capture_output=True, text=True, check=True).stdout.strip()
