"""Triton's control plane is closed to everyone but the launcher (real tritonserver, loopback).

The attack this guards against: any client that reaches Triton's gRPC port loads a model whose
``model.py`` it uploads with the request, and that code runs inside the server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from poolserve_contract.wire import CONTROL_GRPC_HEADER, INFERENCE_GRPC_HEADER
from poolserve_stack.errors import ModelUnloaded
from poolserve_stack.supervision import Recovery, recover
from poolserve_stack.triton_server import TritonServer
from tests.support.stack import FAULT_MODELS

pytestmark = pytest.mark.integration

RESTRICTED = "This protocol is restricted"


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    with TritonServer(FAULT_MODELS, {"echo": {}}, log_path=tmp_path_factory.mktemp("control") / "log") as server:
        yield server


def echo_input(values=(4, 2)) -> grpcclient.InferInput:
    x = grpcclient.InferInput("x", [1, len(values)], "INT64")
    x.set_data_from_numpy(np.array([values], np.int64))
    return x


def listening_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` listens on (its socket inodes matched against /proc/<pid>/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink()) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def uploaded_model(marker: Path) -> dict:
    """What the attack sends: a config and a model.py that would write ``marker`` when loaded."""
    code = f"open({str(marker)!r}, 'w').write('pwned')\nclass TritonPythonModel:\n    pass\n"
    config = json.dumps({"backend": "python", "max_batch_size": 0,
                         "input": [{"name": "x", "data_type": "TYPE_INT64", "dims": [1]}],
                         "output": [{"name": "y", "data_type": "TYPE_INT64", "dims": [1]}]})
    return {"config": config, "files": {"file:1/model.py": code.encode()}}


def test_loading_uploaded_code_is_refused_without_the_key(echo_server, tmp_path):
    client = grpcclient.InferenceServerClient(echo_server.grpc_url)
    marker = tmp_path / "marker"
    for headers in (None, {CONTROL_GRPC_HEADER: "guess"}):
        with pytest.raises(InferenceServerException, match=RESTRICTED):
            client.load_model("intruder", headers=headers, **uploaded_model(marker))
    time.sleep(1)
    assert not marker.exists()
    assert not client.is_model_ready("intruder")
    # Only gRPC (open for inference, closed for control) and metrics listen: no HTTP endpoint.
    assert listening_ports(echo_server.process.pid) == {echo_server.grpc_port, echo_server.metrics_port}


def test_unload_shared_memory_logging_and_trace_need_the_key(echo_server):
    client = grpcclient.InferenceServerClient(echo_server.grpc_url)
    attempts = {
        "unload": lambda: client.unload_model("echo"),
        "repository index": lambda: client.get_model_repository_index(),
        "shared memory": lambda: client.register_system_shared_memory("r", "/triton_python_backend_shm_region_x", 64),
        "logging": lambda: client.update_log_settings({"log_verbose_level": 1}),
        "trace": lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
    }
    for what, attempt in attempts.items():
        with pytest.raises(InferenceServerException, match=RESTRICTED):
            attempt()
            pytest.fail(f"{what} was allowed without the key")
    # Inference and the read-only APIs raw-tensor users need stay open.
    assert client.is_model_ready("echo")
    assert client.infer("echo", [echo_input()]).as_numpy("y").tolist() == [[4, 2]]
    assert client.get_model_config("echo", as_json=True)["config"]["name"] == "echo"
    echo_server.check()  # nothing of the attempts reached the model


def test_an_unload_by_a_key_holder_is_not_counted_as_a_crash(echo_server):
    client = grpcclient.InferenceServerClient(echo_server.grpc_url)
    client.unload_model("echo", headers=echo_server.control_headers)
    deadline = time.monotonic() + 60
    while echo_server._state("echo")[0] != "UNAVAILABLE" and time.monotonic() < deadline:
        time.sleep(0.1)
    recovery = Recovery(limit=0)  # any counted failure would be a crash loop
    with pytest.raises(ModelUnloaded) as unloaded:
        echo_server.check()
    recover(echo_server, unloaded.value, recovery)
    assert recovery.failures == {} and not echo_server.stub_pids
    echo_server.check()  # left unloaded, as the key holder wanted
    # Loaded again by the key holder: its new stub is tracked, and its death would count.
    client.load_model("echo", headers=echo_server.control_headers)
    echo_server.check()
    assert list(echo_server.stub_pids.values()) == ["echo"]
    assert client.infer("echo", [echo_input()]).as_numpy("y").tolist() == [[4, 2]]


def test_inference_behind_its_own_key_when_one_is_set(tmp_path):
    with TritonServer(FAULT_MODELS, {"echo": {}}, log_path=tmp_path / "log", inference_key="inference-secret") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match=RESTRICTED):
            client.infer("echo", [echo_input()])
        with pytest.raises(InferenceServerException, match=RESTRICTED):  # the control key is another one
            client.infer("echo", [echo_input()], headers={INFERENCE_GRPC_HEADER: server.control_key})
        result = client.infer("echo", [echo_input()], headers={INFERENCE_GRPC_HEADER: "inference-secret"})
        assert result.as_numpy("y").tolist() == [[4, 2]]
        assert client.is_server_ready()  # health stays open for probes
