"""Processes, ports and shared memory on this host: free ports, children tied to this process (they
die with it, however it dies), and the Python backend's shared-memory regions of dead launchers.

Every Python-backend shared-memory region gets a prefix naming its launcher's pid, so stale
``/dev/shm/triton_python_backend_shm_region_*`` files of dead launchers can be told apart from those
of live servers and removed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from poolserve_stack.errors import LauncherError

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
# Our regions are named SHM_PREFIX + OWNER_TAG + "<launcher pid>-" + Triton's own suffix.
OWNER_TAG = "mrt-"


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


NVIDIA_GPUS_DIR = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the driver sees


def visible_gpu_count() -> int:
    """NVIDIA GPUs this process may use, without importing torch: the driver's list, narrowed by
    CUDA_VISIBLE_DEVICES (as Triton narrows it) when that is set."""
    count = len(list(NVIDIA_GPUS_DIR.iterdir())) if NVIDIA_GPUS_DIR.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([device for device in visible.split(",") if device.strip() not in ("", "-1")]))
    return count
