"""deploy/compose/replicas.yml: replicas behind HAProxy spread the load, and losing one costs no
request beyond those it had in flight."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from tests.compose.conftest import PROJECT_ROOT, http, new_project

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]
REPLICAS = 2
CLIENTS = 6


@pytest.fixture(scope="module")
def replicas(images):
    # One model per replica keeps two replicas within a 2-core CI machine.
    project = new_project("tps-replicas", [PROJECT_ROOT / "deploy" / "compose" / "replicas.yml"],
                          REPLICAS=str(REPLICAS), MODELS="bert_classifier")
    try:
        project.timed("up", "up", "-d", "--wait", "--wait-timeout", "900")
        yield project
    finally:
        project.compose("down", "-v", "--remove-orphans", "--timeout", "60", check=False)
    print(f"replica timings (s): { {k: round(v, 1) for k, v in project.timings.items()} }")
    assert project.leftovers() == {"containers": [], "volumes": [], "networks": []}


def classify(base: str, text: str) -> int:
    try:
        return http("POST", f"{base}/classify", {"model": "sentiment-minilm", "input": text}, timeout=60)[0]
    except OSError:
        return -1


def served_by_each_replica(project) -> list[int]:
    """/classify requests each replica's adapter answered, from its own /metrics."""
    counts = []
    for index in range(1, REPLICAS + 1):
        metrics = project.compose("exec", "-T", "--index", str(index), "replica", "python", "-c",
                                  "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
                                  ).stdout
        counts.append(int(sum(float(value) for value in re.findall(
            r'adapter_requests_total\{[^}]*route="/classify"[^}]*status="200"[^}]*\} ([0-9.e+]+)', metrics))))
    return counts


def test_requests_spread_over_the_replicas(replicas):
    base = replicas.url("HTTP_PORT")
    before = served_by_each_replica(replicas)
    statuses = [classify(base, f"request {i} is great") for i in range(40)]
    assert statuses == [200] * 40
    served = [after - b for after, b in zip(served_by_each_replica(replicas), before)]
    assert sum(served) == 40 and all(count >= 5 for count in served), served


def test_losing_a_replica_costs_at_most_its_requests_in_flight(replicas):
    base = replicas.url("HTTP_PORT")
    results: list[int] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            results.append(classify(base, f"client {n} says hello {i}"))
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    victim = replicas.compose("ps", "-q", "replica").stdout.split()[0]
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
    killed_at = len(results)
    time.sleep(10)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    after_kill = results[killed_at:]
    failures = [status for status in results if status != 200]
    print(f"replica loss: {len(results)} requests, {len(failures)} failed ({failures}), {len(after_kill)} after the kill")
    assert len(after_kill) >= 20  # the surviving replica kept serving
    assert len(failures) <= CLIENTS  # at most one request in flight per client was on the lost replica
