"""What the Docker images install: the adapter's image carries no torch.

The adapter reads the models through the torch-free model contract (poolserve_contract), so its
image installs pyproject.toml's core dependencies alone (requirements/image-adapter.txt, `make lock`);
torch, triton and CUDA's nvidia-* wheels are the `runtime` extra, installed by the triton image.
tests/compose/test_compose.py checks the built image itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = PROJECT_ROOT / "docker" / "Dockerfile"


def is_torch_stack(name: str) -> bool:
    """torch, its triton (not tritonclient) and the CUDA libraries a torch wheel pulls in."""
    return name in {"torch", "triton"} or name.startswith("nvidia-")


def stage(name: str) -> str:
    """The instructions of one Dockerfile stage, from its FROM to the next one."""
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE.read_text(), re.M | re.S)
    assert match, f"docker/Dockerfile has no stage {name}"
    return match.group(1)


def adapter_lock() -> Path:
    """The lock the adapter stage installs (`install-project.sh deps LOCK`)."""
    (lock,) = re.findall(r"install-project\.sh deps (\S+)", stage("adapter"))
    return PROJECT_ROOT / "requirements" / lock


def locked_names(lock: Path) -> set[str]:
    return {canonicalize_name(line.split("==")[0]) for line in lock.read_text().splitlines()
            if "==" in line and not line.startswith((" ", "#"))}


def test_the_adapter_image_installs_no_torch():
    names = locked_names(adapter_lock())
    assert {"fastapi", "transformers", "tokenizers", "tritonclient"} <= names  # the adapter's own lock
    assert sorted(filter(is_torch_stack, names)) == []
    # uv lists a package left out with --no-emit-package as "# torch"; install-project.sh then
    # fetches torch from the index, as the GPU image's lock wants.
    assert "# torch" not in adapter_lock().read_text().splitlines()


def test_the_core_dependencies_leave_torch_to_the_runtime_extra():
    """`make lock` resolves the adapter's lock from the core dependencies; the triton image and
    `make install` add the runtime extra."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    core = {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}
    runtime = {canonicalize_name(Requirement(spec).name) for spec in project["optional-dependencies"]["runtime"]}
    assert sorted(filter(is_torch_stack, core)) == []
    assert {"torch", "triton"} <= runtime


def copied_sources(text: str) -> set[str]:
    """The first path part of every COPY source from the build context."""
    return {source.split("/")[0] for line in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+)$", text, re.M)
            for source in line.split()[:-1]}


def test_the_adapter_image_copies_no_model_code():
    copied = copied_sources(stage("adapter"))
    assert {"model_contract", "adapter"} <= copied
    assert not copied & {"model_runtime", "kernels", "stack"}


def test_the_build_context_holds_what_the_dockerfile_copies():
    """.dockerignore excludes everything but what it names: a folder the Dockerfile copies and it
    does not name fails the build, or (a package folder) leaves an image that cannot import it."""
    allowed = {line[1:].rstrip("/") for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert copied_sources(DOCKERFILE.read_text()) - allowed == set()
