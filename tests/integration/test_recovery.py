"""Chaos against the whole stack (``python -m poolserve_stack serve``, as ``make serve`` runs it).

kill -9 one model's stub under load: that model answers 503 at once and then correctly again,
the other model never fails. kill -9 tritonserver: the stack restarts it on the same ports and
both models come back. SIGTERM then leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from poolserve_stack import processes
from poolserve_stack.processes import free_port, spawn_tied_to_this_process, wait_for_http
from tests.support.stack import PROJECT_ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tiny_checkpoints, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("recovery") / "stack.log"
    command = [sys.executable, "-m", "poolserve_stack", "serve", "--port", str(port),
               "--model", f"bert_classifier={tiny_checkpoints['bert_classifier']}",
               "--model", f"xlm_roberta_classifier={tiny_checkpoints['xlm_roberta_classifier']}"]
    with log_path.open("wb") as log:
        # A stand-in for the adapter's secrets (ADAPTER_API_KEY): it must not reach tritonserver.
        process = spawn_tied_to_this_process(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "ADAPTER_TEST_CANARY": "canary-secret"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, timeout_s=300, log_path=log_path)
        yield url, process, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def classify(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", json={"model": str(model), "input": ["the movie was great", "rain"]},
                      timeout=30)


def processes_of(pid: int, needle: str) -> list[int]:
    return [p for p in processes.descendant_pids(pid) if needle in processes.process_cmdline(p)]


def until_ok(url: str, model: str, seconds: float) -> tuple[float, list[tuple[int, float]]]:
    """Poll until 200; returns the time it took and every non-200 (status, seconds to answer)."""
    started, failures = time.monotonic(), []
    while time.monotonic() - started < seconds:
        begin = time.monotonic()
        try:
            response = classify(url, model)
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        if status == 200:
            return time.monotonic() - started, failures
        failures.append((status, time.monotonic() - begin))
        time.sleep(0.2)
    raise AssertionError(f"{model} did not come back within {seconds} s: {failures[-5:]}")


def test_no_adapter_setting_reaches_tritonserver_or_its_stubs(stack):
    _, process, _ = stack
    pids = processes_of(process.pid, "tritonserver") + processes_of(process.pid, "triton_python_backend_stub")
    assert len(pids) >= 3  # the server and a stub per model
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [entry for entry in environ if entry.startswith(b"ADAPTER_")], processes.process_cmdline(pid)
    assert b"ADAPTER_TEST_CANARY=canary-secret" in Path(f"/proc/{process.pid}/environ").read_bytes()


def health_until_degraded(url: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/health", timeout=5)
        if response.status_code == 503:
            return response.json()
        time.sleep(0.1)
    raise AssertionError(f"/health never reported the dead stub's model within {seconds} s")


def test_a_dead_stub_costs_only_its_model_a_few_seconds(stack, tiny_checkpoints):
    url, process, log_path = stack
    bert, xlm = tiny_checkpoints["bert_classifier"], tiny_checkpoints["xlm_roberta_classifier"]
    assert classify(url, bert).status_code == 200
    other_failures: list[int] = []
    stop = threading.Event()

    def load_other_model():
        while not stop.is_set():
            status = classify(url, xlm).status_code
            if status != 200:
                other_failures.append(status)

    loader = threading.Thread(target=load_other_model)
    loader.start()
    try:
        (stub,) = processes_of(process.pid, "bert_classifier/1/model.py")
        os.kill(stub, signal.SIGKILL)
        degraded = health_until_degraded(url, 30)
        recovered_s, failures = until_ok(url, bert, 60)
    finally:
        stop.set()
        loader.join()
    assert all(status == 503 and seconds < 2 for status, seconds in failures), failures
    # /health named the model being reloaded (and only it) while it was away
    assert degraded["status"] == "degraded" and list(degraded["unavailable_models"]) == ["bert_classifier"]
    assert httpx.get(f"{url}/health").status_code == 200
    assert not other_failures, f"the other model failed: {other_failures[:5]}"
    assert processes_of(process.pid, "bert_classifier/1/model.py") != [stub]
    print(f"stub kill: back after {recovered_s:.1f} s, {len(failures)} fast 503s")


def test_a_dead_tritonserver_is_restarted(stack, tiny_checkpoints):
    url, process, _ = stack
    (server,) = processes_of(process.pid, "bin/tritonserver")
    os.kill(server, signal.SIGKILL)
    for model in ("bert_classifier", "xlm_roberta_classifier"):
        recovered_s, failures = until_ok(url, tiny_checkpoints[model], 120)
        assert all(status in (0, 503) for status, _ in failures), failures
        print(f"tritonserver kill: {model} back after {recovered_s:.1f} s")
    assert process.poll() is None


def test_sigterm_leaves_nothing_behind(stack):
    url, process, _ = stack
    children = processes.descendant_pids(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=90) == 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(processes.process_running(p) for p in children):
        time.sleep(0.2)
    assert not [p for p in children if processes.process_running(p)]
