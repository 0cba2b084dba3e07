"""Shared fixtures: tiny checkpoints for every model folder and one real Triton server (and adapter)
over them, built and started by tests/support/; and the guard that keeps the markers honest: a test
not marked ``integration`` or ``compose`` that starts a server fails (``make test-unit`` starts none)."""

from __future__ import annotations

import os
import subprocess
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU (CI): the Triton kernels run in Triton's CPU interpreter. Must be set before
    # `kernels` is imported, because triton.jit picks the interpreter at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.support.stack import running_adapter, server_started_by, tiny_triton_server
from tests.support.tiny_models import build_model_folder_checkpoints

SERVER_MARKERS = ("integration", "compose")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    """Outside the server markers, starting a server fails the test, in its fixtures' set-up too (a
    session fixture such as ``triton_server`` starts there)."""
    if any(item.get_closest_marker(name) for name in SERVER_MARKERS):
        yield
        return
    start = subprocess.Popen.__init__

    def refuse_servers(process, args, *more, **options):
        if server := server_started_by(args):
            raise AssertionError(f"{item.nodeid} starts {server}: a test that starts a server belongs in "
                                 "tests/integration (marked integration)")
        start(process, args, *more, **options)

    with mock.patch.object(subprocess.Popen, "__init__", refuse_servers):
        yield


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Model folder → a tiny random-weight checkpoint of its architecture."""
    return build_model_folder_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def triton_server(tiny_checkpoints, tmp_path_factory):
    """The real tritonserver on free ports, serving every model folder of model_repository/ with its
    tiny checkpoint."""
    with tiny_triton_server(tiny_checkpoints, tmp_path_factory.mktemp("triton") / "tritonserver.log") as server:
        yield server
        server.check()  # a stub that died during the session fails the last test loudly


@pytest.fixture(scope="session")
def adapter_url(triton_server, tmp_path_factory):
    """The real adapter (uvicorn, separate process) in front of the session's Triton server."""
    with running_adapter(triton_server, tmp_path_factory.mktemp("adapter")) as url:
        yield url
