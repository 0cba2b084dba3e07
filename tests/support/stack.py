"""The real stack on loopback, started and stopped the same way by tests and benchmarks: tritonserver over
tiny checkpoints, an adapter process in front of a running Triton, the whole ``poolserve serve`` stack,
and the resident memory of the processes it is made of.

Every process is tied to the caller (``spawn_tied_to_this_process``): a run killed by a timeout leaves
nothing behind. :func:`server_started_by` is how the test session tells a server start from a helper
subprocess (tests/conftest.py refuses the former outside ``integration`` and ``compose`` tests).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from poolserve_stack import processes
from poolserve_stack.processes import free_port, spawn_tied_to_this_process, wait_for_http
from poolserve_stack.triton_server import TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
FAULT_MODELS = PROJECT_ROOT / "tests" / "fault_models"


def tiny_triton_server(checkpoints: dict[str, Path], log_path: Path) -> TritonServer:
    """Triton serving each model folder of model_repository/ with its checkpoint, under the folder's
    name (not started: use it as a context manager)."""
    models = {folder: {"checkpoint": str(path), "served_model_name": folder} for folder, path in checkpoints.items()}
    return TritonServer(MODEL_REPOSITORY, models, log_path=log_path, ready_timeout_s=480)


def start_adapter(server: TritonServer, log_path: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """A real adapter process (uvicorn) in front of ``server``, ready; ``settings`` are ADAPTER_*
    values. The caller stops it (tests that signal it need the process)."""
    port = free_port()
    env = {
        **os.environ,
        "ADAPTER_TRITON_GRPC_URL": server.grpc_url,
        "ADAPTER_HOST": "127.0.0.1",
        "ADAPTER_PORT": str(port),
        **{f"ADAPTER_{key.upper()}": value for key, value in settings.items()},
    }
    with log_path.open("wb") as log:
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
def running_adapter(server: TritonServer, log_dir: Path, **settings: str):
    """:func:`start_adapter` for the length of a ``with`` block; yields its base URL."""
    settings.setdefault("max_sequences_per_triton_request", "4")  # small, so multi-request splitting is exercised
    process, url = start_adapter(server, log_dir / "adapter.log", **settings)
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def start_serve(work: Path, models: list[str] | None = None, env: dict[str, str] | None = None,
                ready_timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    """``python -m poolserve_stack serve`` (what ``make serve`` runs: Triton and the adapter in one
    process tree) on a free port, ready; ``models`` are its ``--model``/``--set`` arguments (none: the
    built-in models). Its console goes to ``work/stack.log``."""
    port = free_port()
    log_path = work / "stack.log"
    command = [sys.executable, "-m", "poolserve_stack", "serve", "--port", str(port), *(models or [])]
    with log_path.open("wb") as log:
        process = spawn_tied_to_this_process(command, cwd=PROJECT_ROOT, env={**os.environ, **(env or {})},
                                             stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", process, timeout_s=ready_timeout_s, log_path=log_path)
    return process, url


def stop_serve(process: subprocess.Popen) -> None:
    """SIGTERM (the stack drains and stops Triton), SIGKILL if it is still there after 90 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stack_processes(stack_pid: int) -> dict[str, int]:
    """The processes of a ``poolserve serve`` stack: ``adapter`` (the stack process itself),
    ``tritonserver``, and ``stub:<model folder>`` for each Python backend stub."""
    found = {"adapter": stack_pid}
    for pid in processes.descendant_pids(stack_pid):
        command = processes.process_cmdline(pid)
        if "bin/tritonserver" in command:
            found["tritonserver"] = pid
        elif "triton_python_backend_stub" in command:
            model = next((part.split("/")[-3] for part in command.split() if part.endswith("/model.py")), str(pid))
            found[f"stub:{model}"] = pid
    return found


def rss_mib(pid: int) -> float:
    """Resident memory of one process in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


SERVER_PROGRAMS = frozenset({"tritonserver", "docker", "uvicorn"})
# ``python -m <module> [<subcommand>]`` that serves: the adapter, the stack's serve/triton commands, the
# benchmarks' plain FastAPI server. (``poolserve_stack prepare`` only downloads.)
SERVER_MODULES = frozenset({("poolserve_adapter", None), ("uvicorn", None), ("poolserve_bench.baseline_server", None),
                            ("poolserve_stack", "serve"), ("poolserve_stack", "triton")})


def server_started_by(command) -> str | None:
    """The server a ``Popen`` command starts (tritonserver, docker, the adapter, ``poolserve_stack
    serve``/``triton`` as a module or the ``poolserve`` script, ``make serve``, the benchmarks' baseline
    server), by name; None for none."""
    if isinstance(command, (str, bytes, os.PathLike)):
        command = shlex.split(os.fsdecode(command))
    argv = [os.fsdecode(part) for part in command]
    if programs := SERVER_PROGRAMS & {Path(part).name for part in argv}:
        return min(programs)
    if argv and Path(argv[0]).name == "make" and "serve" in argv[1:]:
        return "make serve"
    if argv and Path(argv[0]).name == "poolserve" and argv[1:2] in (["serve"], ["triton"]):
        return f"poolserve {argv[1]}"  # the console script
    if "-m" in argv[:-1]:
        module, *rest = argv[argv.index("-m") + 1:]
        for served in ((module, None), (module, rest[0] if rest else None)):
            if served in SERVER_MODULES:
                return " ".join(part for part in served if part)
    return None
