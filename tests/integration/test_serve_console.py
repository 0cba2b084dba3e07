"""``poolserve serve`` as a user runs it from a terminal: vLLM's one-line form (models, --api-key,
--served-model-name), the console in JSON lines, and Ctrl-C (SIGINT to the terminal's process group) when
serving and half-way through the start: exit 0, no traceback, nothing left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from poolserve_stack import processes
from poolserve_stack.processes import free_port, wait_for_http
from tests.support.stack import PROJECT_ROOT

pytestmark = pytest.mark.integration

POOLSERVE = Path(sys.executable).parent / "poolserve"


@contextlib.contextmanager
def poolserve_serve(work: Path, *arguments: str):
    """``poolserve serve`` (the console script) on a free port, in a session of its own as a terminal's job is;
    yields (url, process, console log). Killed at the end if a test left it running."""
    port = free_port()
    log_path = work / "console.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(POOLSERVE), "serve", "--port", str(port), "--triton-log",
                                    str(work / "tritonserver.log"), *arguments], cwd=PROJECT_ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "ADAPTER_DRAIN_TIMEOUT_S": "3"})
    try:
        yield f"http://127.0.0.1:{port}", process, log_path
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ctrl_c(process: subprocess.Popen) -> tuple[int, float]:
    """SIGINT to the process group, as a terminal's Ctrl-C: (exit code, seconds to exit)."""
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    return process.wait(timeout=60), time.monotonic() - started


def assert_nothing_left(children: list[int]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(processes.process_running(pid) for pid in children):
        time.sleep(0.1)
    assert not [processes.process_cmdline(pid) for pid in children if processes.process_running(pid)]


def test_one_line_run_with_api_key_served_names_json_logs_then_ctrl_c(tmp_path):
    """The first model given is the default; the key guards the API but reaches neither tritonserver nor its
    stubs; every console line is one JSON object; /metrics scrapes log no httpx line; one Ctrl-C stops all."""
    key = "k-" + os.urandom(8).hex()
    with poolserve_serve(tmp_path, "bert_embedder", "bert_classifier", "--served-model-name", "emb", "mood",
                         "--api-key", key, "--log-format", "json") as (url, process, log_path):
        wait_for_http(f"{url}/health", process, timeout_s=420, log_path=log_path)
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        models = httpx.get(f"{url}/v1/models", headers=auth, timeout=30).json()["data"]
        assert [card["id"] for card in models] == ["emb", "mood"]  # in the order given
        scored = httpx.post(f"{url}/score", headers=auth, json={"text_1": "a cat", "text_2": ["a kitten"]}, timeout=60)
        assert scored.status_code == 200 and scored.json()["model"] == "emb"  # the first model given
        for _ in range(2):
            assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200
        children = processes.descendant_pids(process.pid)
        triton_side = [pid for pid in children if "tritonserver" in processes.process_cmdline(pid)
                       or "triton_python_backend_stub" in processes.process_cmdline(pid)]
        assert triton_side
        for pid in triton_side:
            seen = Path(f"/proc/{pid}/environ").read_bytes() + Path(f"/proc/{pid}/cmdline").read_bytes()
            assert key.encode() not in seen, processes.process_cmdline(pid)
        code, seconds = ctrl_c(process)
        output = log_path.read_text()
        assert code == 0, output[-3000:]
        assert_nothing_left(children)
    lines = output.splitlines()
    entries = [json.loads(line) for line in lines]  # every line: one JSON object
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    messages = [entry["message"] for entry in entries]
    assert any(message.startswith("Serving on ") for message in messages)
    assert any(message.startswith("Triton ready in ") for message in messages)
    assert any(entry["logger"] == "uvicorn.access" and "GET /metrics" in entry["message"] for entry in entries)
    assert not [entry for entry in entries if entry["logger"].startswith("httpx")]
    assert "Traceback" not in output and "Application shutdown complete." in messages
    print(f"Ctrl-C to an idle `poolserve serve`: exit 0 after {seconds:.1f} s")


def test_ctrl_c_while_triton_loads_stops_the_start_cleanly(tmp_path):
    with poolserve_serve(tmp_path) as (_url, process, log_path):
        deadline = time.monotonic() + 300
        while "Starting tritonserver" not in log_path.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.05)
        time.sleep(0.5)  # tritonserver is coming up or loading the models
        children = processes.descendant_pids(process.pid)
        code, seconds = ctrl_c(process)
        output = log_path.read_text()
        assert code == 0, output[-3000:]
        assert "Traceback" not in output and "Serving on" not in output
        assert "serve: stopped while" in output
        assert_nothing_left(children)
        assert seconds < 15, f"Ctrl-C during the load took {seconds:.1f} s"
    print(f"Ctrl-C while Triton loads: exit 0 after {seconds:.1f} s")
