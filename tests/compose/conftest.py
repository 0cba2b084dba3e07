"""The compose stack, built and run for real (`docker compose`), whenever a Docker daemon answers.

The images are built as a host without any image registry builds them, the path the README
documents for it: `make images` (deploy/offline-images.sh: a wheelhouse of the locks' wheels, a
base image made with debootstrap unless present, `docker compose build`), which needs root and
debootstrap here. ``$COMPOSE_TEST_BASE_IMAGE`` names another base instead (python:3.11-slim where
Docker Hub is reachable). Published ports are free ones, reached at ``$COMPOSE_TEST_ADDRESS``
(127.0.0.1, or the address of the network namespace CI's daemon runs in). Every project is brought
down with its volumes; the tests check that nothing of it is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from poolserve_stack.processes import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ADDRESS = os.environ.get("COMPOSE_TEST_ADDRESS", "127.0.0.1")
BASE_IMAGE = os.environ.get("COMPOSE_TEST_BASE_IMAGE")


def docker_missing() -> str | None:
    """Why the compose tests cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker CLI (CI's .ci/run starts a daemon; elsewhere install Docker to run tests/compose)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker daemon answers (DOCKER_HOST or the default socket); .ci/run starts one in CI"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "docker compose v2 is not installed"
    return None


def pytest_collection_modifyitems(config, items):
    reason = docker_missing()
    if reason:
        for item in items:
            if "tests/compose/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=f"compose tests skipped: {reason}"))


@pytest.fixture(scope="session")
def images() -> None:
    """The images both compose files run (TRITON_SERVER=pytriton), built by `make images`."""
    command = ["make", "images", f"PYTHON={sys.executable}", *([f"BASE_IMAGE={BASE_IMAGE}"] if BASE_IMAGE else [])]
    began = time.monotonic()
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    print(f"make images: {time.monotonic() - began:.1f} s")


def http(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for(url: str, timeout_s: float, status: int = 200) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = http("GET", url, timeout=5)[0]
            if last == status:
                return
        except OSError as error:
            last = error
        time.sleep(1)
    raise AssertionError(f"{url} did not answer {status} within {timeout_s:g} s (last: {last})")


@dataclass
class ComposeProject:
    """One `docker compose -p NAME -f FILE` project with its own free ports."""

    name: str
    files: list[Path]
    env: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        command = ["docker", "compose", "-p", self.name, *(arg for f in self.files for arg in ("-f", str(f))), *args]
        result = subprocess.run(command, cwd=PROJECT_ROOT, env={**os.environ, **self.env}, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            logs = subprocess.run([*command[:-len(args)], "logs", "--tail", "60"], cwd=PROJECT_ROOT,
                                  env={**os.environ, **self.env}, capture_output=True, text=True).stdout
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                                 f"{result.stderr[-3000:]}\n--- logs ---\n{logs[-6000:]}")
        return result

    def timed(self, what: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        began = time.monotonic()
        result = self.compose(*args, **kwargs)
        self.timings[what] = time.monotonic() - began
        return result

    def url(self, port_variable: str) -> str:
        return f"http://{ADDRESS}:{self.env[port_variable]}"

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, volumes and networks Docker still holds for this project."""
        label = f"label=com.docker.compose.project={self.name}"
        found = {}
        for kind, command in (("containers", ["ps", "-a", "-q"]), ("volumes", ["volume", "ls", "-q"]),
                              ("networks", ["network", "ls", "-q"])):
            out = subprocess.run(["docker", *command, "--filter", label], capture_output=True, text=True).stdout
            found[kind] = out.split()
        return found


def new_project(prefix: str, files: list[Path], **env: str) -> ComposeProject:
    ports = {name: str(free_port()) for name in ("HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT")}
    return ComposeProject(
        name=f"{prefix}-{os.getpid()}",
        files=files,
        env={
            **ports,
            "PUBLISH_ADDRESS": "127.0.0.1" if ADDRESS == "127.0.0.1" else "0.0.0.0",
            # The images `make images` built: compose finds them and neither pulls nor builds.
            "TRITON_SERVER": "pytriton",
            "MODELS": "",
            **env,
        },
    )
