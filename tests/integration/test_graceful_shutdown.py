"""SIGTERM drains: readiness goes 503 first, requests in flight finish, new ones get a fast 503, then exit."""

from __future__ import annotations

import random
import signal
import threading
import time

import httpx
import pytest

from tests.support.stack import start_adapter
from tests.support.tiny_models import corpus, random_text

pytestmark = pytest.mark.integration

MODEL = "bert_classifier"
# A few heavy requests, not many light ones: the drain lasts while Triton computes them one at a time, and the
# adapter's event loop, only waiting meanwhile, answers the probes at once. (240 light requests kept the loop so
# busy on CI's 2 cores that no probe got an answer before the drain ended.)
CLIENTS = 12


def heavy_body(seed: int) -> dict:
    """128 texts of ~60 tokens: ~8,000 tokens, a request of its own at Triton (the in-flight bound is 60)."""
    rng = random.Random(seed)
    return {"model": MODEL, "input": [random_text(rng, 60) for _ in range(128)]}


def in_flight(url: str) -> float:
    """The requests the adapter is handling now (its /metrics, summed over its workers)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("adapter_requests_in_flight"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(triton_server, tmp_path, workers):
    process, url = start_adapter(triton_server, tmp_path / "adapter.log", workers=workers,
                                 max_inflight_tokens_per_model="60", admission_wait_s="600", drain_timeout_s="120")
    try:
        # The model's speed measured first, so admission has no reason to refuse the burst.
        for index in range(2):
            assert httpx.post(f"{url}/classify", json=heavy_body(1000 + index), timeout=60).status_code == 200
        results: list[int] = []

        def one(index: int) -> None:
            try:
                results.append(httpx.post(f"{url}/classify", json=heavy_body(index), timeout=120).status_code)
            except httpx.HTTPError as error:
                results.append(repr(error))

        clients = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
        for client in clients:
            client.start()
        # Signal once the server holds a few requests: each takes a while at Triton, one at a time. (A client thread
        # starved of CPU may not have sent its own yet: it gets the fast 503.)
        deadline = time.monotonic() + 60
        while (held := in_flight(url)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert held >= 3 and len(results) < CLIENTS, (held, results)
        process.send_signal(signal.SIGTERM)
        done_before_signal = len(results)
        health = refused = None
        # 30 s, not 10: on CI's 2 cores the probes queue behind the in-flight requests and each may use
        # its 5 s timeout (no answer within 10 s was seen there once); the drain itself takes longer.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (health is None or refused is None):
            # With several workers, one that has drained exits while the others finish; a new
            # connection it had just accepted is reset (a load balancer reads that as down too).
            # Probe again: a draining worker answers.
            # The probes are independent: a reset of the request after a 503 /health is retried alone.
            try:
                if health is None:
                    response = httpx.get(f"{url}/health", timeout=5)
                    health = response if response.status_code == 503 else None
                if health is not None:
                    refused = httpx.post(f"{url}/classify", json={"model": MODEL, "input": ["new"]}, timeout=5)
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert health is not None and health.json() == {"status": "draining"}
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        assert "shutting down" in refused.json()["error"]["message"]
        for client in clients:
            client.join(timeout=120)
        # Nothing cut mid-response: requests the server had taken finished with 200 after the signal;
        # those that reached it after the signal got the fast 503 (no connection was dropped).
        assert set(results) <= {200, 503}, results
        assert results.count(200) >= done_before_signal + 2, (done_before_signal, held, results)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_drain_timeout_bounds_the_wait(triton_server, tmp_path):
    process, url = start_adapter(triton_server, tmp_path / "adapter.log", max_inflight_tokens_per_model="60",
                                 max_queued_tokens_per_model="1000000", admission_wait_s="120", drain_timeout_s="0.5")
    try:
        def one(index: int) -> None:
            try:
                httpx.post(f"{url}/classify", json={"model": MODEL, "input": corpus(16, seed=index)}, timeout=60)
            except httpx.HTTPError:
                pass

        clients = [threading.Thread(target=one, args=(i,)) for i in range(200)]
        for client in clients:
            client.start()
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert time.monotonic() - started < 10  # not the 200 requests' time
        for client in clients:
            client.join(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
