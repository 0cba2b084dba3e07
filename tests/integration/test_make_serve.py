"""`make serve` as a user runs it: the README's sample curl against the embedded default models."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from poolserve_stack import processes
from poolserve_stack.processes import free_port, wait_for_http
from tests.support.stack import PROJECT_ROOT

pytestmark = pytest.mark.integration


def readme_sample_curl() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = re.search(r"<!-- sample-curl:start -->\s*```bash\n(.*?)```\s*<!-- sample-curl:end -->", readme, re.S)
    assert block, "README must hold the sample curl between sample-curl markers"
    return block.group(1)


def descendants(pid: int) -> list[int]:
    return processes.descendant_pids(pid)


DRAIN_TIMEOUT_S = 3.0


@contextlib.contextmanager
def running_make_serve(work: Path, env: dict[str, str]):
    """``make serve`` on a free port with ``env`` over this environment, up and announced; yields (url,
    process, console log). Stopped after (SIGTERM first: tritonserver runs in its own session and only a
    clean stop of `make serve` takes it down; SIGKILL is the last resort)."""
    port = free_port()
    log_path = work / "make-serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(["make", "serve", f"PORT={port}"], cwd=PROJECT_ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, timeout_s=420, log_path=log_path)
        deadline = time.monotonic() + 10
        while "Try:" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield url, process, log_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory):
    with running_make_serve(tmp_path_factory.mktemp("serve"), {"ADAPTER_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)}) as run:
        yield run


def test_prints_url_and_sample_request(make_serve):
    url, _, log_path = make_serve
    output = log_path.read_text()
    assert f"Serving on {url}" in output
    assert f"curl -s {url}/classify" in output and f"curl -s {url}/rerank" in output


def test_console_shows_what_loaded_and_keeps_triton_s_log_in_a_file(make_serve):
    """A newcomer's console: each model with its placement and load time, the log's path; none of
    Triton's option table or its harmless CUDA/NVML lines on a CPU-only host."""
    _, _, log_path = make_serve
    output = log_path.read_text()
    triton_log = Path(re.search(r"its log: (\S+)\)", output).group(1))
    assert re.search(r"sentiment-minilm: Triton model bert_classifier .*\d+ instances? on (CPU|GPU \d+), loaded in [\d.]+ s",
                     output)
    assert re.search(r"all-MiniLM-L6-v2: Triton model bert_embedder .*loaded in [\d.]+ s", output)
    assert "Triton ready in" in output
    for noise in ("CudaDriverHelper", "NVML", "+------", "LOAD REPORT", "MISSING"):
        assert noise not in output, f"{noise!r} on the console"
    assert "successfully loaded 'bert_classifier'" in triton_log.read_text()  # Triton's own log, in full


def test_readme_sample_curl_answers(make_serve):
    url, _, _ = make_serve
    script = readme_sample_curl().replace("http://127.0.0.1:8080", url)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True)
    decoder, answers, position = json.JSONDecoder(), [], 0
    text = result.stdout.strip()
    while position < len(text):  # curl prints the bodies back to back, without newlines
        answer, position = decoder.raw_decode(text, position)
        answers.append(answer)
        while position < len(text) and text[position].isspace():
            position += 1
    assert len(answers) == 2
    classify, rerank = answers
    assert [d["label"] for d in classify["data"]] == ["positive", "negative"]
    assert rerank["results"][0]["document"]["text"] == "Paris is the capital of France."


def test_default_classifier_labels_obvious_sentences(make_serve):
    url, _, _ = make_serve
    sentences = {
        "I absolutely loved it, what a wonderful day!": "positive",
        "The staff were friendly and the food was delicious.": "positive",
        "Brilliant, works perfectly, highly recommended.": "positive",
        "This is the worst product I have ever bought.": "negative",
        "The service was rude and the room was dirty.": "negative",
        "Awful, boring and a complete waste of time.": "negative",
    }
    body = httpx.post(f"{url}/classify", json={"model": "sentiment-minilm", "input": list(sentences)}, timeout=60).json()
    assert [d["label"] for d in body["data"]] == list(sentences.values())
    assert all(max(d["probs"]) > 0.8 for d in body["data"])


@pytest.mark.parametrize(
    "query, relevant, distractors",
    [
        ("What is the capital of France?", "Paris is the capital and largest city of France.",
         ["Berlin is the capital of Germany.", "The Nile is a river in Africa."]),
        ("How do I bake bread?", "Mix flour, water, yeast and salt, let the dough rise, then bake it.",
         ["The stock market fell sharply today.", "Cats sleep for most of the day."]),
        ("Which planet is known as the red planet?", "Mars is often called the Red Planet.",
         ["Jupiter is the largest planet.", "Bananas are rich in potassium."]),
    ],
)
def test_default_reranker_puts_the_relevant_document_first(make_serve, query, relevant, distractors):
    url, _, _ = make_serve
    documents = [*distractors, relevant]
    body = httpx.post(f"{url}/rerank", json={"query": query, "documents": documents}, timeout=60).json()
    assert body["model"] == "all-MiniLM-L6-v2"
    assert body["results"][0]["index"] == len(documents) - 1


def test_sigterm_with_requests_in_flight_leaves_nothing_after_the_drain_timeout(make_serve):
    """SIGTERM to make alone (as a process manager sends it): the stack drains for its timeout, cuts
    what is left, and every process and shared-memory region is gone a few seconds later."""
    url, process, _ = make_serve
    children = descendants(process.pid)
    assert any("tritonserver" in processes.process_cmdline(pid) for pid in children)
    assert any("triton_python_backend_stub" in processes.process_cmdline(pid) for pid in children)
    stack = next(pid for pid in children if "bin/poolserve serve" in processes.process_cmdline(pid))
    own_regions = f"{processes.SHM_PREFIX}{processes.OWNER_TAG}{stack}-*"  # the launcher names them after its pid
    assert list(processes.SHM_DIR.glob(own_regions))
    heavy = {"model": "sentiment-minilm", "input": ["a long sentence about nothing in particular " * 12] * 64}

    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/classify", json=heavy, timeout=120)

    clients = [threading.Thread(target=post) for _ in range(16)]
    for client in clients:
        client.start()
    time.sleep(1.0)  # all 16 in flight (the first still computing on CI's 2 cores)
    started = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    bound = DRAIN_TIMEOUT_S + 8
    while time.monotonic() - started < bound + 30 and any(processes.process_running(pid) for pid in children):
        time.sleep(0.1)
    gone_after = time.monotonic() - started
    left = [processes.process_cmdline(pid) for pid in children if processes.process_running(pid)]
    assert not left, f"processes outlived make serve: {left}"
    assert not list(processes.SHM_DIR.glob(own_regions))
    print(f"SIGTERM to make with 16 heavy requests in flight: everything gone after {gone_after:.1f} s "
          f"(drain timeout {DRAIN_TIMEOUT_S:g} s)")
    assert gone_after < bound
    process.wait(timeout=10)
    for client in clients:
        client.join(timeout=60)


def test_several_adapter_workers_serve_and_stop_with_the_stack(tmp_path):
    """ADAPTER_WORKERS=2 (what the default picks on a host of 8+ cores): the adapter runs as its own process with
    two uvicorn workers beside Triton; both answer, and SIGTERM to make leaves nothing behind."""
    with running_make_serve(tmp_path, {"ADAPTER_WORKERS": "2", "ADAPTER_DRAIN_TIMEOUT_S": "3"}) as (url, process, log):
        assert f"Serving on {url} with 2 adapter workers" in log.read_text()
        workers = {pid for pid in descendants(process.pid)
                   if "multiprocessing" in processes.process_cmdline(pid) and "spawn" in processes.process_cmdline(pid)}
        assert len(workers) == 2, [processes.process_cmdline(pid) for pid in descendants(process.pid)]
        body = {"model": "sentiment-minilm", "input": ["I love this!", "This is terrible."]}
        for _ in range(8):  # new connections: both workers take some
            response = httpx.post(f"{url}/classify", json=body, timeout=60)
            assert response.status_code == 200 and [d["label"] for d in response.json()["data"]] == ["positive", "negative"]
        children = descendants(process.pid)
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(processes.process_running(pid) for pid in children):
            time.sleep(0.1)
        assert not [processes.process_cmdline(pid) for pid in children if processes.process_running(pid)]
        assert "Traceback" not in log.read_text()
