"""Start, watch and stop a real ``tritonserver`` 2.51 from the ``nvidia-pytriton==0.7.0`` wheel.

No Docker needed. The wheel carries the server binary, the Python backend and one backend stub per
Python version; this module wires them together the way ../shared/NOTES.md verified:

* the stub for the *running* Python is copied next to a copy of the Python backend in a run folder,
  and ``LD_LIBRARY_PATH`` points at the wheel's vendored libraries and at ``libpython``;
* the venv's ``bin/`` goes first on ``PATH``: the stub ignores ``PYTHONPATH`` and imports from the
  environment whose interpreter it finds there (the project root reaches it through a ``.pth``);
* the stub's libraries are preflighted with ``ldd``: a stub that cannot load them makes 2.51 wait
  forever during model load instead of failing;
* every Python-backend shared-memory region gets a prefix naming this launcher's pid, so stale
  ``/dev/shm/triton_python_backend_shm_region_*`` files of dead launchers can be told apart from
  those of live servers and removed;
* models load through the repository API (explicit model-control mode), optionally with
  ``parameters`` overridden, so the repository on disk stays the one the NGC image serves;
* that API runs any ``model.py`` a caller uploads, so it is closed: the model-repository,
  shared-memory, trace and logging protocols need a key only this launcher knows (generated per
  launcher, or ``$TRITON_CONTROL_KEY``), HTTP is off unless asked for, and inference is open or
  behind its own key (``$TRITON_INFERENCE_KEY``). The launcher itself speaks gRPC.

Use :class:`TritonServer` as a context manager (tests), or ``poolserve triton`` (:mod:`poolserve_stack.cli`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.utils import InferenceServerException

from poolserve_contract.card import card_for_config
from poolserve_contract.families import by_folder
from poolserve_contract.parameters import parse_instance_count
from poolserve_contract.triton_config import complete_config
from poolserve_contract.wire import (
    CONTROL_GRPC_HEADER,
    CONTROL_HEADER,
    CONTROL_KEY_ENV,
    CONTROL_PROTOCOLS,
    INFERENCE_GRPC_HEADER,
    INFERENCE_HEADER,
    INFERENCE_KEY_ENV,
    INSTANCE_COUNT,
    SOURCE_FOLDER,
)

SHM_DIR = Path("/dev/shm")
STOCK_ROOT = Path("/opt/tritonserver")  # where NGC's tritonserver images install the server
SHM_PREFIX = "triton_python_backend_shm_region_"
# Our regions are named SHM_PREFIX + OWNER_TAG + "<launcher pid>-" + Triton's own suffix.
OWNER_TAG = "mrt-"


class LauncherError(RuntimeError):
    """The server could not be started, died, or a model failed to load."""


class ServerDied(LauncherError):
    """tritonserver itself exited."""


class StubDied(LauncherError):
    """One model's Python backend stub died; the server and the other models still run."""

    def __init__(self, message: str, model: str):
        super().__init__(message)
        self.model = model


class ModelUnloaded(StubDied):
    """A model's stubs went because a holder of the control key unloaded it: not a crash."""


# ----------------------------------------------------------------------------------------------
# The wheel's files


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



# The adapter's settings (its API key among them) and the keys above are no business of the model
# code the stubs run: they are left out of the server's environment.
WITHHELD_FROM_TRITON = ("ADAPTER_", CONTROL_KEY_ENV, INFERENCE_KEY_ENV)


def restriction_args(control_key: str, inference_key: str | None, http: bool) -> list[str]:
    """tritonserver's flags that put the control protocols (and inference, given a key) behind headers."""
    groups = [(CONTROL_PROTOCOLS, CONTROL_HEADER, control_key)]
    if inference_key:
        groups.append((("inference",), INFERENCE_HEADER, inference_key))
    flags = []
    for protocols, header, key in groups:
        restriction = f"{','.join(protocols)}:{header}={key}"
        flags.append(f"--grpc-restricted-protocol={restriction}")
        if http:
            flags.append(f"--http-restricted-api={restriction}")
    return flags


def triton_environment(environ: dict[str, str], ld_library_path: str) -> dict[str, str]:
    """The environment tritonserver and its Python stubs run with."""
    env = {key: value for key, value in environ.items() if not key.startswith(WITHHELD_FROM_TRITON)}
    env["LD_LIBRARY_PATH"] = ld_library_path
    # The stub imports from the environment whose interpreter comes first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{environ.get('PATH', '')}"
    return env


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


# ----------------------------------------------------------------------------------------------
# Processes, ports and shared memory


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail at once (with the log's tail) if ``process`` exits."""
    def log_tail() -> str:
        return f":\n{log_path.read_text(errors='replace')[-4000:]}" if log_path and log_path.exists() else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LauncherError(f"{url}: process exited with {process.returncode}{log_tail()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise LauncherError(f"{url} not ready after {timeout_s}s{log_tail()}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped (what "still there" means after a stop)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def remove_stale_shm_regions() -> list[Path]:
    """Remove shm regions created by launchers that are no longer running. Returns what went."""
    removed = []
    for region in SHM_DIR.glob(f"{SHM_PREFIX}{OWNER_TAG}*"):
        owner = region.name[len(SHM_PREFIX) + len(OWNER_TAG) :].split("-", 1)[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            with contextlib.suppress(FileNotFoundError):
                region.unlink()
            removed.append(region)
    return removed


def child_pids(pid: int) -> list[int]:
    """Children of ``pid``, forked from any of its threads (Linux /proc)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return children


def descendant_pids(pid: int) -> list[int]:
    """Every process below ``pid``."""
    found, pending = [], child_pids(pid)
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(child_pids(child))
    return found


_PR_SET_PDEATHSIG = 1
_libc = None
_spawner: concurrent.futures.ThreadPoolExecutor | None = None


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGKILL when the parent goes, however it goes (kill -9 included).
    Survives the exec; the check after it covers a parent that died before the call (the child was
    reparented). ``parent`` is compared, not pid 1: in a container the parent may be pid 1 itself."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def signal_me_when_parent_dies(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel for ``sig`` when this process's parent goes (``make serve``: a SIGTERM to make
    alone would otherwise leave the stack running, orphaned)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getppid()
    _libc.prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # gone before the call took effect
        os.kill(os.getpid(), sig)


def spawn_tied_to_this_process(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """``Popen`` in its own session (signals to our group do not reach it; ``stop`` kills its whole
    group) that the kernel kills if this process dies without stopping it.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so children are forked
    from one spawner thread that lives as long as this process (``make serve`` starts the server
    from a short-lived worker thread).
    """
    global _libc, _spawner
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    if _spawner is None:
        _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="launcher-spawner")
    return _spawner.submit(subprocess.Popen, command, start_new_session=True,
                           preexec_fn=functools.partial(_die_with_parent, os.getpid()), **popen_kwargs).result()


def process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


# ----------------------------------------------------------------------------------------------
# The per-run model repository



def config_with_parameters(config_pbtxt: Path, parameters: dict[str, str], name: str | None = None) -> str:
    """The model's config.pbtxt (text format) renamed to ``name``, with ``parameters`` set or replaced
    (and ``instance_count`` turned into its instance_group), completed with the model card."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_pbtxt.read_text(), model_config_pb2.ModelConfig())
    if name is not None:
        config.name = name
    parameters = dict(parameters)
    try:
        instance_count = parse_instance_count(parameters.pop(INSTANCE_COUNT, ""))
    except ValueError as error:
        raise LauncherError(str(error)) from None
    if instance_count is not None:
        del config.instance_group[:]
        config.instance_group.add(count=instance_count)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return text_format.MessageToString(completed_config(config, config_pbtxt.parent.name, config_pbtxt.parent))


def completed_config(config, folder: str, model_dir: Path | None = None):
    """``config`` with what every model of the shared runtime adds (poolserve_contract.triton_config) and
    its model card (poolserve_contract.card), when ``folder`` is one of its families; otherwise as it is.

    Triton would ask the model's ``auto_complete_config`` for the same at load, in a stub process of
    its own that imports torch and the runtime only to exit again: on a 2-core machine that doubles
    the time a model takes to load, and to come back after its stub died. Completed here, the server
    runs with auto-complete off (see :func:`all_completed`). The card is read from checkpoints already
    on this machine (:func:`~poolserve_contract.card.card_for_config`).
    """
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    family = by_folder(folder)
    if family is None:
        return config
    as_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
    card = card_for_config(as_dict, family, model_dir)
    complete_config(as_dict, family.task, family.uses_token_types, family.vision, card)
    return json_format.ParseDict(as_dict, model_config_pb2.ModelConfig())


def all_completed(models: dict[str, dict[str, str]]) -> bool:
    """Every planned model comes from a folder of the shared runtime (its config completed here)."""
    return all(by_folder(parameters.get(SOURCE_FOLDER, name)) is not None for name, parameters in models.items())


def write_run_repository(source: Path, models: dict[str, dict[str, str]], target: Path) -> Path:
    """One folder per served model under ``target``, each made from a folder of ``source``.

    This is how two checkpoints of one architecture run side by side (two Triton models, each with
    its own dynamic batcher) while ``source`` stays the repository a stock tritonserver serves: the
    generated ``config.pbtxt`` is the source folder's with its name and parameters set, and the
    version folders are links to the source's. A relative ``checkpoint`` is resolved against the
    source folder, as the model would have resolved it there.
    """
    target.mkdir(parents=True, exist_ok=True)
    for name, parameters in models.items():
        parameters = {**parameters, SOURCE_FOLDER: parameters.get(SOURCE_FOLDER, name)}
        folder = source / parameters[SOURCE_FOLDER]
        if not (folder / "config.pbtxt").exists():
            raise LauncherError(f"no model folder {folder.name!r} in {source}")
        checkpoint = parameters.get("checkpoint", "")
        if checkpoint and not checkpoint.startswith("builtin:") and (folder / checkpoint).exists():
            parameters["checkpoint"] = str((folder / checkpoint).resolve())
        model_dir = target / name
        model_dir.mkdir()
        (model_dir / "config.pbtxt").write_text(config_with_parameters(folder / "config.pbtxt", parameters, name))
        for entry in folder.iterdir():
            if entry.name != "config.pbtxt":
                (model_dir / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return target


# ----------------------------------------------------------------------------------------------
# The server


@dataclass
class TritonServer:
    """A supervised ``tritonserver`` process.

    ``models`` maps each Triton model name to the ``parameters`` to set in its config; the model
    is made from the ``model_repository`` folder of that name, or the one its ``model_folder``
    entry names (see :func:`write_run_repository`).
    """

    model_repository: Path
    models: dict[str, dict[str, str]]
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    ready_timeout_s: float = 600.0
    exit_timeout_s: int = 10
    log_path: Path | None = None  # None: the server's output goes to this process's stdout
    log_verbose: int = 0
    # 127.0.0.1 on a workstation; 0.0.0.0 in a container whose ports other containers reach.
    address: str = "127.0.0.1"
    # Triton's HTTP endpoint (KServe REST): off unless asked for; restricted like gRPC when on.
    http: bool = False
    # The control plane's key (see CONTROL_PROTOCOLS): $TRITON_CONTROL_KEY, else generated here.
    # It is on tritonserver's command line (Triton takes it nowhere else) and in this object.
    control_key: str = field(default_factory=lambda: os.environ.get(CONTROL_KEY_ENV) or secrets.token_urlsafe(32),
                             repr=False)
    inference_key: str | None = field(default_factory=lambda: os.environ.get(INFERENCE_KEY_ENV) or None, repr=False)
    load_seconds: dict[str, float] = field(default_factory=dict, init=False)
    extra_args: list[str] = field(default_factory=list)

    process: subprocess.Popen | None = field(default=None, init=False)
    stub_pids: dict[int, str] = field(default_factory=dict, init=False)
    _run_dir: Path | None = field(default=None, init=False)
    _log_file: object = field(default=None, init=False)
    _client: object = field(default=None, init=False, repr=False)

    # -- public API ---------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def control_headers(self) -> dict[str, str]:
        """The gRPC metadata a control call carries."""
        return {CONTROL_GRPC_HEADER: self.control_key}

    @property
    def inference_headers(self) -> dict[str, str]:
        """What a gRPC inference call sends (nothing while inference is open)."""
        return {INFERENCE_GRPC_HEADER: self.inference_key} if self.inference_key else {}

    @property
    def shm_prefix(self) -> str:
        return f"{SHM_PREFIX}{OWNER_TAG}{os.getpid()}-{id(self):x}-"

    def start(self) -> TritonServer:
        remove_stale_shm_regions()
        installation = TritonInstallation.find()
        self._run_dir = Path(tempfile.mkdtemp(prefix="triton-run-"))
        backends = prepare_backends(installation, self._run_dir)
        ld_path = library_path(installation)
        preflight_stub(backends / "python" / "triton_python_backend_stub", ld_path)

        try:
            repository = write_run_repository(self.model_repository, self.models, self._run_dir / "models")
        except BaseException:
            self.stop()
            raise
        if self.http:
            self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()

        env = triton_environment(dict(os.environ), ld_path)
        command = [
            str(installation.binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={installation.server_root / 'caches'}",
            "--model-control-mode=explicit",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--allow-http={'true' if self.http else 'false'}",
            *([f"--http-address={self.address}", f"--http-port={self.http_port}"] if self.http else []),
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            *restriction_args(self.control_key, self.inference_key, self.http),
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            f"--log-verbose={self.log_verbose}",
            # Configs complete already (completed_config): no extra stub per model load just to ask.
            *(["--disable-auto-complete-config"] if all_completed(self.models) else []),
            *self.extra_args,
        ]
        output = None
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
            output = self._log_file
        self.process = spawn_tied_to_this_process(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            self._wait_live()
            self._load_models()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.stub_pids = self._current_stub_pids()
        return self

    def check(self) -> None:
        """Raise :class:`LauncherError` if the server or any stub it started has died."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise ServerDied(f"tritonserver exited with code {code}.{self._log_tail()}")
        current = self._current_stub_pids()
        for model in self.models:
            tracked = {pid for pid, name in self.stub_pids.items() if name == model}
            running = {pid for pid, name in current.items() if name == model}
            if tracked <= running and (tracked or not running):
                continue  # ours all alive (or the model is unloaded and stays so)
            if not tracked & running:
                if running:  # new stubs only: a holder of the control key loaded the model (again)
                    self._track(model, running)
                    continue
            state = self._state(model)
            if state[0] in ("LOADING", "UNLOADING"):
                continue  # a key holder's load or unload is under way: look again next time
            if state == ("UNAVAILABLE", "unloaded"):
                self._track(model, set())
                raise ModelUnloaded(f"model {model!r} was unloaded through Triton's repository API by a holder "
                                    "of the control key, not by this supervisor; it stays unloaded", model)
            vanished = sorted(tracked - running)
            raise StubDied(
                f"the Python backend stub of model {model!r} (pid {vanished[0]}) died; its requests "
                f"fail with 'Stub process is not healthy'.{self._log_tail()}", model)

    def reload(self, name: str) -> None:
        """Load ``name`` again through the repository API (Triton starts new stubs for it; the other
        models keep serving), then track its new stub."""
        self._track(name, set())
        client = self._grpc()
        # A load of an unchanged, loaded model is a no-op in Triton, so unload it first.
        with contextlib.suppress(InferenceServerException):
            client.unload_model(name, headers=self.control_headers, client_timeout=self.ready_timeout_s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._model_ready(name):
            time.sleep(0.05)
        try:
            client.load_model(name, headers=self.control_headers, client_timeout=self.ready_timeout_s)
        except InferenceServerException as error:
            raise LauncherError(f"model {name!r} failed to reload: {error.message()}") from None
        self._track(name, {pid for pid, m in self._current_stub_pids().items() if m == name})

    def model_config(self, name: str) -> dict:
        """The model's config as Triton completed it (JSON), or {} when Triton cannot say."""
        try:
            return self._grpc().get_model_config(name, as_json=True, client_timeout=5).get("config", {})
        except InferenceServerException:
            return {}

    def restart(self) -> TritonServer:
        """A new server on the same ports (clients reconnect to the address they know)."""
        self.stop()
        return self.start()

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the server (it unloads models and stops its stubs); after ``grace_s`` (default: its
        exit timeout and 2 s) SIGKILL to it and its stubs; then its shared memory and files go."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.exit_timeout_s + 2 if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                pass
        if process is not None:
            # Stubs are in the server's session: nothing of it may outlive the launcher.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(FileNotFoundError):
                region.unlink()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _grpc(self):
        """This launcher's gRPC client (thread-safe; the control calls carry the key)."""
        if self._client is None:
            import tritonclient.grpc as grpcclient

            self._client = grpcclient.InferenceServerClient(self.grpc_url)
        return self._client

    def _model_ready(self, name: str) -> bool:
        with contextlib.suppress(InferenceServerException):
            return self._grpc().is_model_ready(name, headers=self.inference_headers, client_timeout=5)
        return False

    def _state(self, name: str) -> tuple[str, str]:
        """The model's (state, reason) in Triton's repository index; ("", "") when it cannot say."""
        with contextlib.suppress(InferenceServerException):
            index = self._grpc().get_model_repository_index(headers=self.control_headers, as_json=True,
                                                            client_timeout=5)
            for entry in index.get("models", []):
                if entry.get("name") == name:
                    return entry.get("state", ""), entry.get("reason", "")
        return "", ""

    def _track(self, model: str, pids: set[int]) -> None:
        self.stub_pids = {pid: name for pid, name in self.stub_pids.items() if name != model}
        self.stub_pids.update(dict.fromkeys(pids, model))

    def _poll_until(self, what: str, ok, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise LauncherError(
                    f"tritonserver exited with code {code} while waiting for {what}.{self._log_tail()}"
                )
            with contextlib.suppress(OSError):
                if ok():
                    return
            time.sleep(0.2)
        raise LauncherError(f"timed out waiting for {what}.{self._log_tail()}")

    def _wait_live(self) -> None:
        deadline = time.monotonic() + min(self.ready_timeout_s, 120)
        self._poll_until("the server to come up", self._live, deadline)

    def _live(self) -> bool:
        with contextlib.suppress(InferenceServerException):
            return self._grpc().is_server_live(client_timeout=2)
        return False

    def _load_models(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s

        def load(name: str, parameters: dict[str, str]) -> None:
            started = time.monotonic()
            try:
                self._grpc().load_model(name, headers=self.control_headers,
                                        client_timeout=max(1.0, deadline - time.monotonic()))
            except InferenceServerException as error:
                raise LauncherError(f"model {name!r} failed to load: {error.message()}") from None
            self.load_seconds[name] = time.monotonic() - started

        # Loads run concurrently (Triton loads models in parallel); a stub that dies or hangs
        # in initialize() fails its load, and a dead server fails them all: poll for both.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(self.models))) as pool:
            futures = {pool.submit(load, name, params): name for name, params in self.models.items()}
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.5)
                for future in done:
                    future.result()
                if self.process is None or self.process.poll() is not None:
                    raise LauncherError(
                        f"tritonserver exited while loading models.{self._log_tail()}"
                    )
                if time.monotonic() > deadline:
                    names = sorted(futures[f] for f in pending)
                    raise LauncherError(f"timed out loading {names}.{self._log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        def ready() -> bool:
            with contextlib.suppress(InferenceServerException):
                return self._grpc().is_server_ready(client_timeout=2)
            return False

        self._poll_until("server readiness", ready, deadline)

    def _current_stub_pids(self) -> dict[int, str]:
        """Stub processes of this server, by pid, with the model each one serves."""
        if self.process is None:
            return {}
        stubs = {}
        for pid in descendant_pids(self.process.pid):
            cmdline = process_cmdline(pid)
            if "triton_python_backend_stub" in cmdline:
                model_file = cmdline.split("triton_python_backend_stub", 1)[1].split()[0]
                stubs[pid] = Path(model_file).parent.parent.name
        return stubs

    def _log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- tritonserver log (tail) ---\n" + "\n".join(tail)
