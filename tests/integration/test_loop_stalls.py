"""No request stalls the adapter's event loop, and clients that leave count as 499: the real stack.

A 10 MB prompt takes seconds to tokenize and its ~1.7 M ids a while to write as JSON; done on the
event loop (or in a thread through the tokenizer's GIL-holding ``encode``), every other route waited
for it, ``/health`` included (15 s measured). Here ``/health`` is probed every 50 ms while such
prompts are tokenized (vLLM's ``/tokenize``, SGLang's ``/v1/tokenize``) and long id lists decoded.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import running_adapter
from tests.support.tiny_models import WORDS, corpus

pytestmark = pytest.mark.integration

MODEL = "bert_classifier"
BLOCK = " ".join(WORDS) + " "  # whole words: the ids of BLOCK * k are BLOCK's ids k times over
PROBE_EVERY_S = 0.05
MAX_HEALTH_LATENCY_S = 1.0


@pytest.fixture(scope="module")
def adapter(triton_server, tmp_path_factory):
    """One worker; a token limit above the 10 MB prompt's ids, so its whole answer is written; an admission
    that runs ~one request at a time, so abandoned requests are still waiting when their clients go."""
    log_dir = tmp_path_factory.mktemp("loop_stalls")
    with running_adapter(triton_server, log_dir, workers="1", max_tokens_per_request="4000000",
                         max_inflight_tokens_per_model="120", max_queued_tokens_per_model="1000000",
                         admission_wait_s="60") as url:
        yield url, log_dir / "adapter.log"


def block_ids(adapter_url: str) -> list[int]:
    response = httpx.post(f"{adapter_url}/tokenize", json={"model": MODEL, "prompt": BLOCK,
                                                           "add_special_tokens": False}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def probe_health_while(adapter_url: str, requests: list[tuple[str, dict]]) -> tuple[list[httpx.Response], list[float],
                                                                                     float]:
    """Sends ``requests`` (path, body) concurrently, each from its own thread, and GETs /health every 50 ms
    until all are answered: their responses, every probe's latency, and the seconds they took."""
    responses: list[httpx.Response | None] = [None] * len(requests)

    def send(index: int, path: str, body: dict) -> None:
        responses[index] = httpx.post(f"{adapter_url}{path}", json=body, timeout=120)

    threads = [threading.Thread(target=send, args=(i, path, body)) for i, (path, body) in enumerate(requests)]
    latencies = []
    with httpx.Client(timeout=30) as client:
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            sent = time.perf_counter()
            assert client.get(f"{adapter_url}/health").status_code == 200
            latencies.append(time.perf_counter() - sent)
            time.sleep(PROBE_EVERY_S)
        seconds = time.perf_counter() - started
    for thread in threads:
        thread.join()
    return responses, latencies, seconds


def test_ten_megabyte_tokenize_leaves_health_answering(adapter):
    url, _ = adapter
    ids = block_ids(url)
    copies = 10 * 2**20 // len(BLOCK)  # 10 MB, within the 16 MiB body limit
    small = 2**20 // len(BLOCK)  # 1 MB
    # vLLM's route, and SGLang's (a list of two 1 MB prompts) at the same time.
    responses, latencies, seconds = probe_health_while(url, [
        ("/tokenize", {"model": MODEL, "prompt": BLOCK * copies}),
        ("/v1/tokenize", {"model": MODEL, "prompt": [BLOCK * small] * 2, "add_special_tokens": False}),
    ])
    vllm, sglang = responses
    worst = max(latencies)
    print(f"10 MB + 2 x 1 MB tokenized: {seconds:.1f} s; {len(latencies)} /health probes, worst "
          f"{1000 * worst:.0f} ms, median {1000 * sorted(latencies)[len(latencies) // 2]:.0f} ms")
    assert vllm.status_code == 200, vllm.text[:500]
    assert sglang.status_code == 200, sglang.text[:500]
    assert vllm.headers["content-type"] == "application/json"
    body = vllm.json()
    cls_id, sep_id = body["tokens"][0], body["tokens"][-1]
    assert body["tokens"] == [cls_id] + ids * copies + [sep_id] and body["count"] == len(ids) * copies + 2
    assert body["max_model_len"] == 128 and body["token_strs"] is None
    assert sglang.json() == {"tokens": [ids * small] * 2, "count": [len(ids) * small] * 2, "max_model_len": 128}
    assert worst < MAX_HEALTH_LATENCY_S, f"/health waited {worst:.2f} s behind the tokenizing"
    assert seconds > 1.0 and len(latencies) >= 10  # the probes did overlap the work


def test_ten_megabyte_detokenize_leaves_health_answering(adapter):
    url, _ = adapter
    ids = block_ids(url)
    tokens = ids * (1_500_000 // len(ids))  # ~11 MB of JSON
    text = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": ids}, timeout=30).json()["prompt"]
    responses, latencies, seconds = probe_health_while(url, [
        ("/detokenize", {"model": MODEL, "tokens": tokens}),
        ("/v1/detokenize", {"model": MODEL, "tokens": [tokens[:500_000], tokens[:500_000]]}),
    ])
    worst = max(latencies)
    print(f"1.5 M + 2 x 0.5 M ids detokenized: {seconds:.1f} s; {len(latencies)} probes, worst {1000 * worst:.0f} ms")
    assert [r.status_code for r in responses] == [200, 200], [r.text[:300] for r in responses]
    assert responses[0].json()["prompt"] == " ".join([text] * (1_500_000 // len(ids)))
    assert len(responses[1].json()["text"]) == 2
    assert worst < MAX_HEALTH_LATENCY_S, f"/health waited {worst:.2f} s behind the decoding"
    # Over the token limit: refused before any decoding, in the route's error shape.
    refused = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": [5] * 4_000_001}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["message"] == (
        "The request holds 4000001 tokens, more than the maximum of 4000000 per request "
        "(ADAPTER_MAX_TOKENS_PER_REQUEST).")


def requests_by_status(url: str, route: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "adapter_requests_total" and sample.labels.get("route") == route:
                counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + sample.value
            if sample.name == "adapter_errors_total" and sample.labels.get("route") == route:
                key = f"error:{sample.labels['error_type']}"
                counts[key] = counts.get(key, 0) + sample.value
    return counts


def test_clients_that_leave_count_499_not_500(adapter):
    url, log_path = adapter
    host, port = url.removeprefix("http://").split(":")
    before = requests_by_status(url, "/classify")
    body = json.dumps({"model": MODEL, "input": corpus(16, seed=16)}).encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sockets = []
    for index in range(60):
        connection = socket.create_connection((host, int(port)))
        # Half send their whole request and wait in admission; half leave while still sending the body.
        connection.sendall(head + (body if index % 2 else body[:20]))
        sockets.append(connection)
    time.sleep(0.2)
    for connection in sockets:  # every client gives up at once
        connection.close()
    deadline = time.monotonic() + 20
    while True:
        after = requests_by_status(url, "/classify")
        delta = {key: after.get(key, 0) - before.get(key, 0) for key in after.keys() | before.keys()}
        if delta.get("499", 0) + delta.get("200", 0) >= len(sockets) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    delta = {key: value for key, value in delta.items() if value}
    print(f"60 clients that left: {delta}")
    # Those that left mid-body are never answered; some that sent everything may finish before they go.
    assert delta.get("499", 0) >= 30 and delta.get("499", 0) + delta.get("200", 0) == len(sockets), delta
    assert set(delta) <= {"200", "499"}, delta  # no 500, and no error counted
    log = log_path.read_text(errors="replace")
    assert "Exception in ASGI application" not in log and "returned without" not in log
    assert httpx.post(f"{url}/classify", json={"model": MODEL, "input": ["still fine"]}, timeout=30).status_code == 200
