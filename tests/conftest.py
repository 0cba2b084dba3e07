"""Shared fixtures: tiny checkpoints for every architecture and one real Triton server over them."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_runtime.launcher import TritonServer
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
    models = {folder: {"checkpoint": str(path)} for folder, path in tiny_checkpoints.items()}
    server = TritonServer(MODEL_REPOSITORY, models, log_path=log_path, ready_timeout_s=480)
    with server:
        yield server
        server.check()  # a stub that died during the session fails the last test loudly
