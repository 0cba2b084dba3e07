"""The project's import names cannot be claimed by a dependency, and nothing shadows a dependency.

transformers >= 5.25 imports HuggingFace's package ``kernels``; a project folder importable as
``kernels`` (the project root is on sys.path under pytest and ``python -m``) made every checkpoint
load fail. The project's code lives in ``poolserve_*`` packages inside the card folders.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_packages

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
DISTRIBUTION = PYPROJECT["project"]["name"]
SOURCE_ROOTS = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]


def project_top_level_names() -> set[str]:
    """Every top-level import name the project defines: its packages, and what the repository root
    offers to sys.path (the tests' own package)."""
    names = {package.split(".")[0] for root in SOURCE_ROOTS for package in find_packages(PROJECT_ROOT / root)}
    names |= {path.parent.name for path in PROJECT_ROOT.glob("*/__init__.py")}
    names |= {path.stem for path in PROJECT_ROOT.glob("*.py")}
    return names


def test_the_packages_are_found_in_the_card_folders():
    names = {package.split(".")[0] for root in SOURCE_ROOTS for package in find_packages(PROJECT_ROOT / root)}
    assert names == {"poolserve_adapter", "poolserve_contract", "poolserve_kernels", "poolserve_runtime",
                     "poolserve_stack", "poolserve_bench"}


def test_no_top_level_import_name_is_also_a_dependency_s():
    claimed = importlib.metadata.packages_distributions()
    clashes = {name: claimed[name] for name in project_top_level_names()
               if any(dist != DISTRIBUTION for dist in claimed.get(name, ()))}
    assert not clashes, f"import names of ours that installed distributions also provide: {clashes}"


def test_the_clash_check_sees_the_name_that_broke_us():
    """HuggingFace's `kernels` is installed (transformers needs it): the check above would have failed
    on the old top-level `kernels` package."""
    assert "kernels" in importlib.metadata.packages_distributions()


@pytest.mark.parametrize("folder", SOURCE_ROOTS)
def test_card_folders_are_not_packages(folder):
    assert not (PROJECT_ROOT / folder / "__init__.py").exists()


def test_a_dependency_s_kernels_wins_from_the_project_root():
    """With the project root first on sys.path (as `python -m` run there puts it), `kernels` is
    HuggingFace's and transformers' hub-kernel integration imports."""
    code = ("import kernels, transformers.integrations.hub_kernels as hub; "
            "print(kernels.__file__); print(hasattr(kernels, 'CUDAProperties'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    origin, has_api = result.stdout.split()
    assert Path(origin).is_relative_to(sysconfig.get_paths()["purelib"]) and has_api == "True", origin


def test_the_project_imports_like_an_installed_package_from_anywhere(tmp_path):
    """What the Triton stub does: a python whose cwd is elsewhere imports every package, through the
    editable install's finder, with no project-root .pth."""
    code = "import poolserve_adapter.app, poolserve_runtime.families, poolserve_kernels, poolserve_bench; print('ok')"
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    for pth in Path(sysconfig.get_paths()["purelib"]).glob("*.pth"):
        lines = [line.strip() for line in pth.read_text().splitlines()]
        assert str(PROJECT_ROOT) not in lines, f"{pth} puts the project root on sys.path"


def test_adapter_settings_are_read_only_by_the_settings_class():
    """ADAPTER_* variables reach the code through poolserve_adapter.settings.Settings alone."""
    offenders = []
    for path in (PROJECT_ROOT / "adapter").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ADAPTER_"):
                if path.name != "settings.py":
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno} {node.value}")
    assert not offenders, offenders


def locked_versions(name: str) -> dict[str, str]:
    """``{canonical name: version}`` of one of requirements/*.txt (uv's hashed format)."""
    pins = {}
    for line in (PROJECT_ROOT / "requirements" / name).read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            package, version = line.split(" ")[0].split("==")
            pins[canonicalize_name(package)] = version
    return pins


def test_the_lock_satisfies_pyproject_and_the_installed_environment_is_the_lock():
    """A range changed in pyproject.toml without `make lock` fails here, and so does a venv that
    drifted from the lock."""
    lock = locked_versions("lock.txt")
    project = PYPROJECT["project"]
    for spec in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{spec} is not in requirements/lock.txt: run `make lock`"
        assert requirement.specifier.contains(lock[name], prereleases=True), f"lock has {name}=={lock[name]}, not {spec}"
    def installed(name: str) -> str | None:
        # The first on sys.path: setuptools appends its vendored copies (packaging, ...) behind it.
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    if Path(sys.prefix) == PROJECT_ROOT / ".venv":  # `make install`'s venv (not check-latest's, not a GPU image)
        drifted = {name: (version, installed(name)) for name, version in lock.items() if installed(name) != version}
        assert not drifted, f"(locked, installed): {drifted}"


@pytest.mark.parametrize("image_lock,full_lock", [("image.txt", "lock.txt"), ("image-gpu.txt", "lock-gpu-image.txt"),
                                                   ("image-adapter.txt", "lock.txt")])
def test_image_locks_take_the_full_lock_s_versions(image_lock, full_lock):
    image, full = locked_versions(image_lock), locked_versions(full_lock)
    assert image and all(full.get(name) == version for name, version in image.items())
    assert ("torch" in image) == (image_lock == "image.txt")
