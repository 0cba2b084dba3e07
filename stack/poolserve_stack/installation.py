"""Where the ``nvidia-pytriton==0.7.0`` wheel (or an NGC image) keeps tritonserver, and how its Python
backend stub is made ready for this interpreter.

The wheel carries the server binary, the Python backend and one backend stub per Python version:
the stub for the *running* Python is copied next to a copy of the Python backend in a run folder,
``LD_LIBRARY_PATH`` points at the wheel's vendored libraries and at ``libpython``, and the stub's
libraries are preflighted with ``ldd`` (a stub that cannot load them makes 2.51 wait forever during
model load instead of failing).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from poolserve_stack.errors import LauncherError

STOCK_ROOT = Path("/opt/tritonserver")  # where NGC's tritonserver images install the server


@dataclass(frozen=True)
class TritonInstallation:
    """Where the nvidia-pytriton wheel put the server, backend, stubs and vendored libraries."""

    server_root: Path  # site-packages/pytriton/tritonserver
    libs_dir: Path  # site-packages/nvidia_pytriton.libs

    @classmethod
    def find(cls) -> TritonInstallation:
        explicit = os.environ.get("TRITONSERVER_BIN")  # an unpacked copy of the wheel's server tree
        if explicit:
            server_root = Path(explicit).resolve().parents[1]
            return cls(server_root=server_root, libs_dir=server_root.parents[1] / "nvidia_pytriton.libs")
        spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
        if (spec is None or not spec.submodule_search_locations) and (STOCK_ROOT / "bin" / "tritonserver").exists():
            # NGC's tritonserver image: its own server, Python backend and stub (built for its Python).
            return cls(server_root=STOCK_ROOT, libs_dir=STOCK_ROOT / "lib")
        if spec is None or not spec.submodule_search_locations:
            raise LauncherError(
                "nvidia-pytriton is not installed in this environment: "
                "pip install --no-deps nvidia-pytriton==0.7.0 (or run `make install`)"
            )
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        server_root = package_dir / "tritonserver"
        if not (server_root / "bin" / "tritonserver").exists():
            raise LauncherError(f"no tritonserver binary under {server_root}")
        return cls(server_root=server_root, libs_dir=package_dir.parent / "nvidia_pytriton.libs")

    @property
    def binary(self) -> Path:
        return self.server_root / "bin" / "tritonserver"

    def stub_for_running_python(self) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.server_root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():  # a trimmed tree that keeps only the stub for its Python, in place
            stub = self.server_root / "backends" / "python" / "triton_python_backend_stub"
        if not stub.exists():
            raise LauncherError(f"the wheel has no Python backend stub for Python {version}")
        return stub


def library_path(installation: TritonInstallation) -> str:
    """LD_LIBRARY_PATH for the server and the stub: vendored libs, then libpython's folder."""
    parts = [str(installation.libs_dir), sysconfig.get_config_var("LIBDIR") or ""]
    if os.environ.get("LD_LIBRARY_PATH"):
        parts.append(os.environ["LD_LIBRARY_PATH"])
    return ":".join(p for p in parts if p)


def prepare_backends(installation: TritonInstallation, run_dir: Path) -> Path:
    """Copy the Python backend and the stub for this interpreter into ``run_dir/backends``."""
    backends = run_dir / "backends"
    python_backend = backends / "python"
    if python_backend.exists():
        shutil.rmtree(python_backend)
    shutil.copytree(
        installation.server_root / "backends" / "python",
        python_backend,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy2(installation.stub_for_running_python(), python_backend / "triton_python_backend_stub")
    return backends


def preflight_stub(stub: Path, ld_library_path: str) -> None:
    """Fail now if the stub cannot load its shared libraries (2.51 would hang on model load)."""
    result = subprocess.run(
        ["ldd", str(stub)],
        env={**os.environ, "LD_LIBRARY_PATH": ld_library_path},
        capture_output=True,
        text=True,
        check=False,
    )
    missing = [line.strip() for line in result.stdout.splitlines() if "not found" in line]
    if result.returncode != 0 or missing:
        detail = "\n  ".join(missing) or result.stderr.strip()
        raise LauncherError(
            f"the Python backend stub {stub} cannot load its libraries:\n  {detail}\n"
            "The running Python must be built with --enable-shared (libpython3.X.so) and the "
            "nvidia-pytriton wheel must be complete."
        )
