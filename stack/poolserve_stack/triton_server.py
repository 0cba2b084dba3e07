"""Start, watch and stop a real ``tritonserver`` 2.51 from the ``nvidia-pytriton==0.7.0`` wheel.

No Docker needed. The wheel carries the server binary, the Python backend and one backend stub per
Python version; this module wires them together the way ../shared/NOTES.md verified:

* the wheel's stub is made ready for this interpreter and preflighted (:mod:`poolserve_stack.installation`);
* the venv's ``bin/`` goes first on ``PATH``: the stub ignores ``PYTHONPATH`` and imports from the
  environment whose interpreter it finds there (the project root reaches it through a ``.pth``);
* every Python-backend shared-memory region gets a prefix naming this launcher's pid
  (:mod:`poolserve_stack.processes`), and the server is a child the kernel kills with this process;
* each served model gets its folder in a per-run repository (:mod:`poolserve_stack.run_repository`);
* models load through the repository API (explicit model-control mode), optionally with
  ``parameters`` overridden, so the repository on disk stays the one the NGC image serves;
* a start says what it waits for (:meth:`TritonServer.progress`, for the progress lines of
  :mod:`poolserve_stack.progress`) and gives up as soon as ``stop_requested`` says so (Ctrl-C while a
  model downloads);
* that API runs any ``model.py`` a caller uploads, so it is closed: the model-repository,
  shared-memory, trace and logging protocols need a key only this launcher knows (generated per
  launcher, or ``$TRITON_CONTROL_KEY``), HTTP is off unless asked for, and inference is open or
  behind its own key (``$TRITON_INFERENCE_KEY``). The launcher itself speaks gRPC.

Use :class:`TritonServer` as a context manager (tests), or ``poolserve triton`` (:mod:`poolserve_stack.cli`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.utils import InferenceServerException

from poolserve_contract.parameters import served_name
from poolserve_contract.wire import (
    CONTROL_GRPC_HEADER,
    CONTROL_HEADER,
    CONTROL_KEY_ENV,
    CONTROL_PROTOCOLS,
    INFERENCE_GRPC_HEADER,
    INFERENCE_HEADER,
    INFERENCE_KEY_ENV,
)
from poolserve_stack.errors import LauncherError, ModelUnloaded, ServerDied, StartStopped, StubDied
from poolserve_stack.installation import TritonInstallation, library_path, preflight_stub, prepare_backends
from poolserve_stack.processes import (
    OWNER_TAG,
    SHM_DIR,
    SHM_PREFIX,
    descendant_pids,
    free_port,
    process_cmdline,
    remove_stale_shm_regions,
    spawn_tied_to_this_process,
)
from poolserve_stack.run_repository import all_completed, write_run_repository

# The adapter's settings (its API key among them) and the keys above are no business of the model
# code the stubs run: they are left out of the server's environment.
WITHHELD_FROM_TRITON = ("ADAPTER_", CONTROL_KEY_ENV, INFERENCE_KEY_ENV)
# A start stopped half-way (Ctrl-C during a load) gives tritonserver this long before it is killed: nothing
# it holds is worth waiting for.
CANCELLED_START_GRACE_S = 2.0


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


# ----------------------------------------------------------------------------------------------
# The server


def started_first(pids: set[int], count: int) -> set[int]:
    """The ``count`` of ``pids`` that started first (all of them when ``count`` is 0)."""
    def start_ticks(pid: int) -> float:
        try:  # /proc/<pid>/stat: field 22 (starttime) is the 20th after the parenthesised command
            return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
        except (OSError, IndexError, ValueError):
            return float("inf")

    return set(sorted(pids, key=start_ticks)[:count or len(pids)])


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
    # Asked between the polls of a start: True stops the start (StartStopped) with what it had started.
    stop_requested: Callable[[], bool] | None = field(default=None, repr=False)

    process: subprocess.Popen | None = field(default=None, init=False)
    stub_pids: dict[int, str] = field(default_factory=dict, init=False)
    _run_dir: Path | None = field(default=None, init=False)
    _log_file: object = field(default=None, init=False)
    _client: object = field(default=None, init=False, repr=False)
    _waiting_for: str = field(default="", init=False)

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

    def progress(self) -> str:
        """What a start waits for now: the server, or the models still loading (by the names clients send)."""
        if self._waiting_for != "models":
            return self._waiting_for or "starting tritonserver"
        loading = [served_name(parameters, name) for name, parameters in self.models.items()
                   if name not in self.load_seconds]
        ready = len(self.models) - len(loading)
        return f"Triton is loading {', '.join(loading)}" + (f" ({ready} of {len(self.models)} ready)" if ready else "")

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
                    # Another load may be under way beside the version now serving (a runtime LoRA update right after
                    # one), and may yet fail: keep as many stubs as were tracked, those that started first.
                    self._track(model, started_first(running, len(tracked)))
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

    def _stop_if_asked(self, what: str) -> None:
        if self.stop_requested is not None and self.stop_requested():
            self.stop(CANCELLED_START_GRACE_S)  # loads in flight fail with the server
            raise StartStopped(f"stopped while {what}")

    def _poll_until(self, what: str, ok, deadline: float) -> None:
        self._waiting_for = f"waiting for {what}"
        while time.monotonic() < deadline:
            self._stop_if_asked(f"waiting for {what}")
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
        self._waiting_for = "models"

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
                self._stop_if_asked("loading models")
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
