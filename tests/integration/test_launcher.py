"""The launcher against the real tritonserver: failures are reported, shutdown leaves nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from poolserve_stack import installation, processes
from poolserve_stack.errors import LauncherError
from poolserve_stack.triton_server import TritonServer
from tests.support.stack import FAULT_MODELS, PROJECT_ROOT

pytestmark = pytest.mark.integration


def descendants(pid: int) -> list[int]:
    return processes.descendant_pids(pid)


def test_stub_dying_during_load_is_reported_quickly(tmp_path):
    started = time.monotonic()
    with pytest.raises(LauncherError, match="crash_on_init.*(not healthy|failed)"):
        TritonServer(FAULT_MODELS, {"crash_on_init": {}}, log_path=tmp_path / "log", ready_timeout_s=120).start()
    assert time.monotonic() - started < 60


def test_stub_dying_after_ready_is_reported(tmp_path):
    with TritonServer(FAULT_MODELS, {"crash_on_request": {}, "echo": {}}, log_path=tmp_path / "log") as server:
        server.check()
        assert sorted(server.stub_pids.values()) == ["crash_on_request", "echo"]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = grpcclient.InferInput("x", [1, 2], "INT64")
        x.set_data_from_numpy(np.array([[4, 2]], np.int64))
        assert client.infer("echo", [x]).as_numpy("y").tolist() == [[4, 2]]
        with pytest.raises(Exception, match="not healthy"):
            client.infer("crash_on_request", [x], client_timeout=30)
        with pytest.raises(LauncherError, match="stub of model 'crash_on_request'.*died"):
            server.check()


def test_unknown_model_folder_is_refused_before_starting(tmp_path):
    with pytest.raises(LauncherError, match="no model folder 'nope'"):
        TritonServer(FAULT_MODELS, {"nope": {}}, log_path=tmp_path / "log").start()


def test_sigterm_stops_server_and_stubs_and_removes_shm(tmp_path):
    command = [sys.executable, "-m", "poolserve_stack", "triton", "--model-repository", str(FAULT_MODELS),
               "--model", "echo", "--triton-log", str(tmp_path / "log"), "--grpc-port", "0", "--metrics-port", "0",
               "--ready-json"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line, f"launcher exited early with {process.wait()}"
        ready = json.loads(line)
        assert ready["ready"] and ready["models"] == ["echo"]
        children = descendants(process.pid)
        assert any("tritonserver" in processes.process_cmdline(p) for p in children)
        assert any("triton_python_backend_stub" in processes.process_cmdline(p) for p in children)
        regions = list(Path("/dev/shm").glob(f"{processes.SHM_PREFIX}{processes.OWNER_TAG}{process.pid}-*"))
        assert regions, "the server's shm regions carry the launcher's pid"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        for pid in children:
            assert not processes.process_running(pid), f"pid {pid} outlived the launcher"
        assert not [r for r in regions if r.exists()]
    finally:
        if process.poll() is None:
            process.kill()


def test_killing_the_launcher_leaves_no_process_behind(tmp_path):
    """kill -9 of the launcher (a test run stopped by a timeout): its tritonserver and stubs go too."""
    command = [sys.executable, "-m", "poolserve_stack", "triton", "--model-repository", str(FAULT_MODELS),
               "--model", "echo", "--triton-log", str(tmp_path / "log"), "--grpc-port", "0", "--metrics-port", "0",
               "--ready-json"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline(), f"launcher exited early with {process.wait()}"
        children = descendants(process.pid)
        assert any("triton_python_backend_stub" in processes.process_cmdline(p) for p in children)
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(processes.process_running(p) for p in children):
            time.sleep(0.2)
        left = [processes.process_cmdline(p) for p in children if processes.process_running(p)]
        assert not left, f"outlived a killed launcher: {left}"
    finally:
        if process.poll() is None:
            process.kill()


def test_missing_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(installation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LauncherError, match="nvidia-pytriton is not installed"):
        installation.TritonInstallation.find()


def test_stub_that_cannot_load_libraries_fails_preflight(tmp_path):
    found = installation.TritonInstallation.find()
    backends = installation.prepare_backends(found, tmp_path)  # a copied stub loses its rpath
    stub = backends / "python" / "triton_python_backend_stub"
    with pytest.raises(LauncherError, match="cannot load its libraries"):
        installation.preflight_stub(stub, ld_library_path=str(tmp_path))  # without the vendored libs
    installation.preflight_stub(stub, installation.library_path(found))  # the launcher's path passes
