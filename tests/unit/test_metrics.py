"""poolserve_adapter.metrics on a small app of its own: labels, exclusions, errors, Triton's metrics, multiprocess.

All tests share prometheus_client's default registry, so they assert deltas, never absolute values.
The multiprocess case runs in subprocesses: its environment variable changes how every metric of a
process stores its values.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from starlette.exceptions import HTTPException as StarletteHTTPException

from poolserve_adapter import metrics
from poolserve_adapter.metrics import count_error, install_metrics, prepare_multiprocess_dir, route_label
from tests.support.loopback import http_server_on_loopback

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRITON_TEXT = (
    "# HELP nv_inference_count Number of inferences performed\n"
    "# TYPE nv_inference_count counter\n"
    'nv_inference_count{model="tiny",version="1"} 7\n'
)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def requests_total(route: str, status: str, method: str = "GET") -> float:
    return value("adapter_requests_total", route=route, method=method, status=status)


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text → {(sample name, labels): value}; fails on text Prometheus could not read."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class RejectUnlessAllowed:
    """Answers 401 before routing, like an API-key middleware: the route is not yet in the scope."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (b"x-reject", b"1") in scope["headers"]:
            count_error(scope, "Unauthorized")
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


def make_app(triton_metrics_url: str | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    @app.post("/bad")
    async def bad():
        raise HTTPException(400, "bad input")

    @app.get("/v1/models/{model}")
    async def model(model: str):
        return {"id": model}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("unexpected")

    @app.get("/in-flight")
    async def in_flight():
        return {"in_flight": REGISTRY.get_sample_value("adapter_requests_in_flight")}

    @app.exception_handler(StarletteHTTPException)  # the router's 404 and 405 too, as in poolserve_adapter.errors
    async def on_http_exception(request: Request, exc: StarletteHTTPException):
        count_error(request, HTTPStatus(exc.status_code).phrase)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    # Like the adapter's timing headers: a BaseHTTPMiddleware between ours and the router.
    @app.middleware("http")
    async def passthrough(request: Request, call_next):
        return await call_next(request)

    app.add_middleware(RejectUnlessAllowed)
    install_metrics(app, triton_metrics_url)  # last, so its middleware is the outermost
    return app


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def test_counts_status_method_and_route_template(client):
    before = {
        "ok": requests_total("/ok", "200"),
        "bad": requests_total("/bad", "400", "POST"),
        "model": requests_total("/v1/models/{model}", "200"),
        "boom": requests_total("/boom", "500"),
        "ok_time": value("adapter_request_duration_seconds_count", route="/ok"),
    }
    assert client.get("/ok").status_code == 200
    assert client.get("/ok").status_code == 200
    assert client.post("/bad").status_code == 400
    assert client.get("/v1/models/alpha").status_code == 200
    assert client.get("/v1/models/beta").status_code == 200
    assert client.get("/boom").status_code == 500

    assert requests_total("/ok", "200") - before["ok"] == 2
    assert requests_total("/bad", "400", "POST") - before["bad"] == 1
    assert requests_total("/v1/models/{model}", "200") - before["model"] == 2
    assert requests_total("/boom", "500") - before["boom"] == 1
    assert value("adapter_request_duration_seconds_count", route="/ok") - before["ok_time"] == 2
    # Never the raw URL.
    assert REGISTRY.get_sample_value(
        "adapter_requests_total", {"route": "/v1/models/alpha", "method": "GET", "status": "200"}
    ) is None


def test_unmatched_path_and_unknown_method_keep_labels_bounded(client):
    unmatched = requests_total("unmatched", "404")
    other = requests_total("/ok", "405", "other")
    assert client.get("/no/such/route/123").status_code == 404
    assert client.get("/another/unknown").status_code == 404
    assert client.request("FROBNICATE", "/ok").status_code == 405
    assert requests_total("unmatched", "404") - unmatched == 2
    assert requests_total("/ok", "405", "other") - other == 1
    assert REGISTRY.get_sample_value(
        "adapter_requests_total", {"route": "/no/such/route/123", "method": "GET", "status": "404"}
    ) is None


def test_metrics_endpoint_is_not_counted_and_reads_back(client):
    client.get("/ok")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    samples = parse(response.text)
    # The scrape is neither in flight nor a request.
    assert samples[("adapter_requests_in_flight", frozenset())] == 0
    assert not any(dict(labels).get("route") == "/metrics" for _, labels in samples)
    key = frozenset({"route": "/ok", "method": "GET", "status": "200"}.items())
    assert samples[("adapter_requests_total", key)] == requests_total("/ok", "200")
    client.get("/metrics")
    assert REGISTRY.get_sample_value("adapter_request_duration_seconds_count", {"route": "/metrics"}) is None
    assert "Triton" not in response.text  # no URL given, no Triton section


def test_in_flight_counts_the_running_request_and_returns_to_zero(client):
    baseline = value("adapter_requests_in_flight")
    assert client.get("/in-flight").json() == {"in_flight": baseline + 1}
    assert value("adapter_requests_in_flight") == baseline
    client.get("/boom")  # an exception must not leave it raised
    client.get("/no/such/route")
    assert value("adapter_requests_in_flight") == baseline


def test_count_error_uses_the_route_template(client):
    bad = value("adapter_errors_total", route="/bad", error_type="Bad Request")
    unmatched = value("adapter_errors_total", route="unmatched", error_type="Not Found")
    client.post("/bad")
    client.post("/bad")
    client.get("/nowhere")
    assert value("adapter_errors_total", route="/bad", error_type="Bad Request") - bad == 2
    assert value("adapter_errors_total", route="unmatched", error_type="Not Found") - unmatched == 1


def test_count_error_before_routing_finds_the_route(client):
    """A middleware that answers before the router still labels its request with the route's template."""
    errors = value("adapter_errors_total", route="/v1/models/{model}", error_type="Unauthorized")
    requests = requests_total("/v1/models/{model}", "401")
    unmatched = value("adapter_errors_total", route="unmatched", error_type="Unauthorized")
    assert client.get("/v1/models/x", headers={"x-reject": "1"}).status_code == 401
    assert client.get("/not/a/route", headers={"x-reject": "1"}).status_code == 401
    assert value("adapter_errors_total", route="/v1/models/{model}", error_type="Unauthorized") - errors == 1
    assert requests_total("/v1/models/{model}", "401") - requests == 1
    assert value("adapter_errors_total", route="unmatched", error_type="Unauthorized") - unmatched == 1


def test_count_error_with_a_bare_scope():
    before = value("adapter_errors_total", route="unmatched", error_type="PayloadTooLarge")
    count_error({"type": "http", "path": "/x", "method": "POST"}, "PayloadTooLarge")
    assert value("adapter_errors_total", route="unmatched", error_type="PayloadTooLarge") - before == 1
    assert route_label({"type": "http", "path": "/x"}) == "unmatched"


def test_openapi_documents_the_route(client):
    operation = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert operation["tags"] == ["metrics"]
    assert "Prometheus" in operation["summary"] and "Triton" in operation["summary"]
    assert "text/plain" in operation["responses"]["200"]["content"]


class FakeTritonMetrics(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/metrics":
            body, status = TRITON_TEXT.encode(), 200
        else:
            body, status = b"overloaded", 503
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def triton_metrics_base():
    with http_server_on_loopback(FakeTritonMetrics) as url:
        yield url


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"  # closed again: nothing listens there


def scrape(triton_metrics_url: str) -> str:
    with TestClient(make_app(triton_metrics_url)) as test_client:
        response = test_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return response.text


def test_triton_metrics_are_appended(triton_metrics_base):
    url = f"{triton_metrics_base}/metrics"
    text = scrape(url)
    adapter_part, marker, triton_part = text.partition(f"# Triton Inference Server metrics from {url}\n")
    assert marker and triton_part == TRITON_TEXT
    assert "adapter_requests_total" in adapter_part and "nv_inference" not in adapter_part
    samples = parse(text)  # the whole page stays valid Prometheus text
    assert samples[("nv_inference_count_total", frozenset({"model": "tiny", "version": "1"}.items()))] == 7


def test_dead_triton_url_gives_a_comment_not_an_error():
    text = scrape(dead_url())
    assert text.count("# Triton metrics unavailable: ConnectError") == 1
    assert text.endswith("\n") and text.splitlines()[-1].startswith("# Triton metrics unavailable: ConnectError")
    assert "Triton Inference Server metrics from" not in text
    assert "adapter_requests_total" in text
    parse(text)


def test_triton_error_status_gives_a_comment(triton_metrics_base):
    text = scrape(f"{triton_metrics_base}/not-metrics")
    assert text.splitlines()[-1] == "# Triton metrics unavailable: HTTP 503"
    assert "overloaded" not in text


def test_prepare_multiprocess_dir(monkeypatch):
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "placeholder")  # so that monkeypatch restores the original
    monkeypatch.delenv(metrics.MULTIPROC_ENV)
    prepare_multiprocess_dir(1)
    assert metrics.MULTIPROC_ENV not in os.environ  # one worker: nothing to share
    prepare_multiprocess_dir(4)
    path = os.environ[metrics.MULTIPROC_ENV]
    assert os.path.isdir(path) and os.listdir(path) == []
    prepare_multiprocess_dir(4)
    assert os.environ[metrics.MULTIPROC_ENV] == path  # set: left as it is
    os.rmdir(path)


WORKER = textwrap.dedent(
    """
    import os, sys
    role = sys.argv[1]
    if role == "late":
        # prometheus_client imported before the variable is set in this very process.
        import prometheus_client
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[2]
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from poolserve_adapter.metrics import count_error, install_metrics

    app = FastAPI()

    @app.get("/ok")
    async def ok():
        return {}

    install_metrics(app, None)
    with TestClient(app) as client:
        for _ in range(int(sys.argv[3])):
            assert client.get("/ok").status_code == 200
        count_error({"type": "http", "path": "/x"}, "BadRequestError")
        if role == "late":
            print(client.get("/metrics").text)
    """
)


def test_multiprocess_sums_all_workers(tmp_path):
    """Two worker processes write to one directory; the second one's /metrics reports both."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {key: val for key, val in os.environ.items() if key.lower() != "prometheus_multiproc_dir"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)

    def run(role: str, count: int, extra_env: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, str(script), role, str(directory), str(count)],
            env={**env, **extra_env}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("early", 3, {metrics.MULTIPROC_ENV: str(directory)})
    files = os.listdir(directory)
    assert any(name.startswith("counter_") for name in files)
    # The exited worker no longer counts in the live in-flight gauge.
    assert not any(name.startswith("gauge_livesum_") for name in files)

    samples = parse(run("late", 2, {}))
    ok = frozenset({"route": "/ok", "method": "GET", "status": "200"}.items())
    assert samples[("adapter_requests_total", ok)] == 5
    assert samples[("adapter_request_duration_seconds_count", frozenset({"route": "/ok"}.items()))] == 5
    bad = frozenset({"route": "unmatched", "error_type": "BadRequestError"}.items())
    assert samples[("adapter_errors_total", bad)] == 2
    assert samples[("adapter_requests_in_flight", frozenset())] == 0
    # Only the aggregated registry: no per-process collectors of the default one.
    assert not any(name.startswith("process_") or name.startswith("python_") for name, _ in samples)


# --- clients that leave: 499, not 500 (the adapter's own middleware stack) --------------------------


def adapter_with_test_routes(monkeypatch):
    """create_app's middleware stack (metrics outermost, cancel-on-disconnect inside) and routes that hang."""
    import asyncio

    from fastapi.responses import StreamingResponse

    from poolserve_adapter.app import create_app
    from poolserve_adapter.errors import ServiceUnavailableError
    from poolserve_adapter.registry import ModelRegistry
    from poolserve_adapter.settings import Settings

    async def no_models(_client, _settings):
        return ModelRegistry([])

    monkeypatch.setattr("poolserve_adapter.app.discover_models", no_models)
    app = create_app(Settings(triton_grpc_url="127.0.0.1:1"))

    async def hang():
        app.state.entered.set()
        await asyncio.sleep(3600)

    async def hang_then_503():  # a handler that turns its cancellation into an error answer
        app.state.entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ServiceUnavailableError("Triton call cancelled") from None

    async def stream():
        async def chunks():
            yield b"first"
            app.state.entered.set()
            await asyncio.sleep(3600)
        return StreamingResponse(chunks())

    async def crash():
        raise RuntimeError("a bug")

    for path, endpoint in (("/t/hang", hang), ("/t/hang-then-503", hang_then_503), ("/t/stream", stream),
                           ("/t/crash", crash)):
        app.add_api_route(path, endpoint, methods=["POST"])
    return app


def call(app, path: str, *, leave: bool) -> list[dict]:
    """One POST straight through ASGI; ``leave``: the client disconnects once the handler is running."""
    import asyncio

    async def run():
        app.state.entered = asyncio.Event()
        gone = asyncio.Event()
        messages = [{"type": "http.request", "body": b"", "more_body": False}]
        sent = []

        async def receive():
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                gone.set()  # as uvicorn: after the whole answer, receive() reports the end of the request

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"test")], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
        task = asyncio.create_task(app(scope, receive, send))
        if leave:
            await asyncio.wait_for(app.state.entered.wait(), 5)
            gone.set()
        try:
            await asyncio.wait_for(task, 5)
        except RuntimeError as error:  # Starlette re-raises an app's crash to the server after its 500
            assert str(error) == "a bug"
        return sent

    return asyncio.run(run())


def statuses(route: str) -> dict[str, float]:
    return {status: requests_total(route, status, "POST") for status in ("200", "499", "500", "503")}


def test_a_client_that_left_counts_499_and_no_error(monkeypatch):
    app = adapter_with_test_routes(monkeypatch)
    for path in ("/t/hang", "/t/hang-then-503"):
        before = statuses(path)
        errors = {kind: value("adapter_errors_total", route=path, error_type=kind)
                  for kind in ("ServiceUnavailableError", "InternalServerError")}
        for _ in range(3):
            call(app, path, leave=True)
        after = statuses(path)
        assert {s: after[s] - before[s] for s in after} == {"200": 0, "499": 3, "500": 0, "503": 0}, path
        for kind, count in errors.items():  # an answer to nobody is no server error
            assert value("adapter_errors_total", route=path, error_type=kind) == count, (path, kind)
    assert value("adapter_requests_in_flight") == 0


def test_a_real_crash_still_counts_500_and_a_started_answer_keeps_its_status(monkeypatch):
    app = adapter_with_test_routes(monkeypatch)
    before, errors = statuses("/t/crash"), value("adapter_errors_total", route="/t/crash",
                                                 error_type="InternalServerError")
    sent = call(app, "/t/crash", leave=False)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert requests_total("/t/crash", "500", "POST") - before["500"] == 1
    assert requests_total("/t/crash", "499", "POST") == before["499"]
    assert value("adapter_errors_total", route="/t/crash", error_type="InternalServerError") - errors == 1
    # The client left after the answer started: what it was sent (200) is what is counted.
    before = statuses("/t/stream")
    sent = call(app, "/t/stream", leave=True)
    assert sent[0]["status"] == 200
    after = statuses("/t/stream")
    assert {s: after[s] - before[s] for s in after} == {"200": 1, "499": 0, "500": 0, "503": 0}
