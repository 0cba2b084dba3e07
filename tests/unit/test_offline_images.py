"""deploy/offline-images.sh's wheelhouse step (`make images`): it downloads exactly the locks the
images install, with their hashes, for the Python and platform the locks were resolved for.

The script runs from a copy of the project's requirements/ in a temporary tree, with a stand-in
for Python that records each `pip download` instead of downloading."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = PROJECT_ROOT / "deploy" / "offline-images.sh"
DOCKERFILE = PROJECT_ROOT / "docker" / "Dockerfile"
INSTALL_PROJECT = PROJECT_ROOT / "docker" / "install-project.sh"
RECORDING_PYTHON = '#!/bin/sh\nprintf "%s\\n" "$@" >> "$(dirname "$0")/calls"\necho ---- >> "$(dirname "$0")/calls"\n'


def run_wheelhouse_step(tree: Path, torch_source: str = "") -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """The script's wheelhouse step in `tree` (which holds requirements/); the pip calls it made."""
    (tree / "deploy").mkdir(exist_ok=True)
    shutil.copy(SCRIPT, tree / "deploy" / SCRIPT.name)
    python = tree / "python"
    python.write_text(RECORDING_PYTHON)
    python.chmod(0o755)
    result = subprocess.run(["bash", str(tree / "deploy" / SCRIPT.name), "wheelhouse"], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(python), "TORCH_SOURCE": torch_source})
    calls, call = [], []
    for arg in (tree / "calls").read_text().splitlines() if (tree / "calls").exists() else []:
        if arg == "----":
            calls.append(call)
            call = []
        else:
            call.append(arg)
    return result, calls


def requirement_file(call: list[str]) -> str:
    return call[call.index("-r") + 1]


def option_values(call: list[str], option: str) -> list[str]:
    return [call[i + 1] for i, arg in enumerate(call) if arg == option]


@pytest.fixture
def project_locks(tmp_path) -> Path:
    shutil.copytree(PROJECT_ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def locks_the_images_install() -> set[str]:
    """requirements/ files the Dockerfile's stages install (LOCK at its default: the CPU triton image)."""
    dockerfile = DOCKERFILE.read_text()
    default_lock = re.search(r"^ARG LOCK=(\S+)", dockerfile, re.M).group(1)
    deps = {default_lock if lock == '"$LOCK"' else lock
            for lock in re.findall(r"install-project\.sh deps (\S+)", dockerfile)}
    server = set()
    if "install-project.sh tritonserver" in dockerfile:
        server = set(re.findall(r"tritonserver\)\n\s*pip .*-r requirements/(\S+)", INSTALL_PROJECT.read_text()))
    return {f"requirements/{lock}" for lock in deps | server}


def test_the_wheelhouse_holds_every_lock_the_images_install_with_hashes(project_locks):
    result, calls = run_wheelhouse_step(project_locks)
    assert result.returncode == 0, result.stderr
    assert {requirement_file(call) for call in calls} == locks_the_images_install()
    for call in calls:
        assert call[:3] == ["-m", "pip", "download"]
        assert "--require-hashes" in call and "--only-binary=:all:" in call
        # Where the Dockerfile's stages mount the wheels from.
        assert option_values(call, "-d") == ["docker/wheelhouse"]
    assert "source=docker/wheelhouse" in DOCKERFILE.read_text()
    no_deps = {requirement_file(call) for call in calls if "--no-deps" in call}
    assert no_deps == {"requirements/tritonserver.txt"}  # as install-project.sh installs it
    assert (project_locks / "docker" / "wheelhouse").is_dir()


def test_wheels_are_for_the_python_and_platform_each_lock_was_resolved_for(project_locks):
    result, calls = run_wheelhouse_step(project_locks)
    assert result.returncode == 0, result.stderr
    for call in calls:
        header = (project_locks / requirement_file(call)).read_text().splitlines()[1]
        version = re.search(r"--python-version (\d+)\.(\d+)", header).groups()
        glibc = int(re.search(r"--python-platform x86_64-manylinux_2_(\d+)", header).group(1))
        assert option_values(call, "--python-version") == [".".join(version)]
        assert option_values(call, "--implementation") == ["cp"]
        assert option_values(call, "--abi") == [f"cp{''.join(version)}"]
        platforms = set(option_values(call, "--platform"))
        assert f"manylinux_2_{glibc}_x86_64" in platforms and f"manylinux_2_{glibc + 1}_x86_64" not in platforms
        assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= platforms


def test_torch_source_goes_to_the_lock_that_pins_torch(project_locks):
    result, calls = run_wheelhouse_step(project_locks, torch_source="--extra-index-url https://torch.example/cpu")
    assert result.returncode == 0, result.stderr
    with_torch_source = {requirement_file(call) for call in calls
                         if option_values(call, "--extra-index-url") == ["https://torch.example/cpu"]}
    pins_torch = {requirement_file(call) for call in calls
                  if re.search(r"^torch==", (project_locks / requirement_file(call)).read_text(), re.M)}
    assert with_torch_source == pins_torch == {"requirements/image.txt"}


def test_an_older_glibc_target_stops_at_its_own_tag(tmp_path):
    (tmp_path / "requirements").mkdir()
    header = "#    uv pip compile x --python-version 3.12 --python-platform x86_64-manylinux_2_17 --generate-hashes\n"
    for lock in ("image.txt", "image-adapter.txt", "tritonserver.txt"):
        (tmp_path / "requirements" / lock).write_text("# This file was autogenerated by uv\n" + header)
    result, calls = run_wheelhouse_step(tmp_path)
    assert result.returncode == 0, result.stderr
    platforms = set(option_values(calls[0], "--platform"))
    assert "manylinux_2_17_x86_64" in platforms and "manylinux_2_18_x86_64" not in platforms
    assert "manylinux2014_x86_64" in platforms
    assert option_values(calls[0], "--abi") == ["cp312"]


def test_a_lock_without_its_target_is_refused_before_any_download(tmp_path):
    (tmp_path / "requirements").mkdir()
    for lock in ("image.txt", "image-adapter.txt", "tritonserver.txt"):
        (tmp_path / "requirements" / lock).write_text("# hand-written\nfastapi==0.1\n")
    result, calls = run_wheelhouse_step(tmp_path)
    assert result.returncode != 0 and calls == []
    assert "requirements/image.txt: no --python-version / --python-platform" in result.stderr
