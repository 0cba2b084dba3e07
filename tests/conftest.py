"""Shared fixtures: tiny checkpoints for every architecture and one real Triton server over them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU (CI): the Triton kernels run in Triton's CPU interpreter. Must be set before
    # `kernels` is imported, because triton.jit picks the interpreter at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from poolserve_stack.triton_server import TritonServer, free_port, spawn_tied_to_this_process, wait_for_http
from tests.tiny_models import MODEL_FOLDERS, build_checkpoint

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
FAULT_MODELS = PROJECT_ROOT / "tests" / "fault_models"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Model folder → a tiny random-weight checkpoint of its architecture."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {folder: build_checkpoint(kind, root / folder) for folder, kind in MODEL_FOLDERS.items()}


@pytest.fixture(scope="session")
def triton_server(tiny_checkpoints, tmp_path_factory):
    """The real tritonserver, started by the project's launcher on free ports, serving every
    model folder of model_repository/ with its tiny checkpoint."""
    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    models = {
        folder: {"checkpoint": str(path), "served_model_name": folder} for folder, path in tiny_checkpoints.items()
    }
    server = TritonServer(MODEL_REPOSITORY, models, log_path=log_path, ready_timeout_s=480)
    with server:
        yield server
        server.check()  # a stub that died during the session fails the last test loudly


def start_adapter(triton_server, log_path: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """A real adapter process (uvicorn) in front of ``triton_server``, ready; ``settings`` are ADAPTER_*
    values. The caller stops it (tests that signal it need the process)."""
    port = free_port()
    env = {
        **os.environ,
        "ADAPTER_TRITON_GRPC_URL": triton_server.grpc_url,
        "ADAPTER_HOST": "127.0.0.1",
        "ADAPTER_PORT": str(port),
        **{f"ADAPTER_{key.upper()}": value for key, value in settings.items()},
    }
    with log_path.open("wb") as log:
        # Tied to the test run: a run killed by a timeout leaves no adapter behind.
        process = spawn_tied_to_this_process([sys.executable, "-m", "poolserve_adapter"], cwd=PROJECT_ROOT, env=env,
                                             stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, timeout_s=120, log_path=log_path)
    except BaseException:
        process.kill()
        raise
    return process, url


@contextlib.contextmanager
def running_adapter(triton_server, log_dir: Path, **settings: str):
    """:func:`start_adapter` for the length of a ``with`` block."""
    settings.setdefault("max_sequences_per_triton_request", "4")  # small, so multi-request splitting is exercised
    process, url = start_adapter(triton_server, log_dir / "adapter.log", **settings)
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def http_server_on_loopback(handler):
    """A threaded ``http.server`` with ``handler`` on a free loopback port; yields its base URL."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def adapter_url(triton_server, tmp_path_factory):
    """The real adapter (uvicorn, separate process) in front of the session's Triton server."""
    with running_adapter(triton_server, tmp_path_factory.mktemp("adapter")) as url:
        yield url
