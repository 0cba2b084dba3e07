"""Prometheus metrics of the adapter, served at ``GET /metrics``.

What is exported (all names prefixed ``adapter_``):

* ``adapter_requests_total{route, method, status}``: finished HTTP requests. ``status`` is the code
  sent in ``http.response.start``; a request whose app raised before answering counts as ``500``
  (what the server then sends); one whose client left before any answer started (the
  ``CancelOnDisconnectMiddleware`` of ``poolserve_adapter.disconnect`` marks it in the scope), or
  that was cancelled before answering, as ``499`` (nginx's "client closed request").
* ``adapter_request_duration_seconds{route}``: time from the request's arrival to the end of its
  response body (buckets from 1 ms to 60 s).
* ``adapter_requests_in_flight``: requests being handled now (summed over live workers).
* ``adapter_errors_total{route, error_type}``: errors answered, by the ``type`` the error body names
  ("BadRequestError", "Bad Request", "Unauthorized", ...). Counted by the error handlers through
  :func:`count_error`, since only they know the type; not for a request whose client had already
  left (its answer reaches no one, and the request counts as 499).

``route`` is always the path *template* of the route that handled the request ("/v1/models/{model}"),
never the raw URL, so a client cannot create a series per URL; a request that matches no route is
``"unmatched"``. ``method`` is one of the standard HTTP methods or ``"other"``, for the same reason.
``/metrics`` itself is not counted: a scrape is not traffic, and counting it would show every scrape
as one request in flight.

Wiring: ``install_metrics(app, settings.triton_metrics_url)`` once per app (it adds the middleware
and the route); error handlers call ``count_error(request, error_type)``.

Several uvicorn workers: each worker is its own process with its own counters, and a scrape reaches
one worker only. With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client writes every worker's values
to files in that directory and ``/metrics`` sums them all, whichever worker answers. The launcher
(``python -m poolserve_adapter``) calls :func:`prepare_multiprocess_dir` before uvicorn spawns the workers, so
they inherit the variable. A directory given by the operator must be emptied between runs (the
Prometheus client's rule); the one made by :func:`prepare_multiprocess_dir` is new on every start.
The metric objects are created lazily, in the worker (by :func:`install_metrics` or the first
request), never at import, so importing this module in the launcher does not fix the mode too early.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PATH = "/metrics"
# Scope key set (True) when the client disconnected before any response started and its handler was
# cancelled (poolserve_adapter.disconnect): the request counts as 499 whatever its handler does next.
CLIENT_GONE = "adapter.client_gone"
CLIENT_CLOSED_REQUEST = 499
UNMATCHED = "unmatched"
TRITON_METRICS_TIMEOUT_S = 2.0
# Adapter latencies run from a cached /health (~1 ms) to a large batch behind a busy Triton (tens of s).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


@dataclass(frozen=True)
class AdapterMetrics:
    requests: Counter
    duration: Histogram
    in_flight: Gauge
    errors: Counter
    admitted: Counter
    rejected: Counter
    queue_wait: Histogram


_metrics: AdapterMetrics | None = None
_metrics_lock = threading.Lock()


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def get_metrics() -> AdapterMetrics:
    """The adapter's metric objects, created on first use in this process (see the module docstring)."""
    global _metrics
    if _metrics is not None:
        return _metrics
    with _metrics_lock:
        if _metrics is None:
            if multiprocess_enabled():
                _enter_multiprocess_mode()
            _metrics = AdapterMetrics(
                requests=Counter(
                    "adapter_requests_total", "HTTP requests answered by the adapter.", ["route", "method", "status"]
                ),
                duration=Histogram(
                    "adapter_request_duration_seconds",
                    "Time from a request's arrival to the end of its response.",
                    ["route"],
                    buckets=DURATION_BUCKETS,
                ),
                # livesum: the requests in flight now are those of the workers alive now.
                in_flight=Gauge(
                    "adapter_requests_in_flight", "HTTP requests being handled.", multiprocess_mode="livesum"
                ),
                errors=Counter(
                    "adapter_errors_total", "Error responses, by the error type of their body.", ["route", "error_type"]
                ),
                admitted=Counter("adapter_admitted_total", "Requests admitted to a served model (admission control).",
                                 ["model"]),
                rejected=Counter("adapter_rejected_total", "Requests refused by admission control (429).",
                                 ["model", "reason"]),
                queue_wait=Histogram("adapter_admission_wait_seconds", "Time admitted requests waited for admission.",
                                     ["model"], buckets=DURATION_BUCKETS),
            )
    return _metrics


def _enter_multiprocess_mode() -> None:
    path = os.environ[MULTIPROC_ENV]
    os.makedirs(path, exist_ok=True)
    # prometheus_client picks per-process or file-backed values once, when it is first imported. If it
    # was imported before the variable was set in this process (uvicorn's spawned workers import it
    # afresh, but an in-process start may not), pick again, or this worker's values would never reach
    # the files that /metrics reads.
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()
    # A worker that exits must stop counting in the live gauges (in-flight). A crash skips atexit and
    # leaves the dead worker's last in-flight value in the sum until the directory is renewed.
    atexit.register(multiprocess.mark_process_dead, os.getpid())


def prepare_multiprocess_dir(workers: int) -> None:
    """Make the workers share their metrics: call in the launcher, before uvicorn spawns them.

    With more than one worker and no ``PROMETHEUS_MULTIPROC_DIR`` given, creates a new empty
    directory, exports it for the workers to inherit, and removes it when the launcher exits.
    A directory the operator set is left as it is.
    """
    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        return
    path = tempfile.mkdtemp(prefix="adapter-prometheus-")
    os.environ[MULTIPROC_ENV] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def _route_path(scope: Scope) -> str | None:
    """The path inside the app, as the router matches it (without a proxy's root_path)."""
    path, root_path = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root_path):] if root_path and path.startswith(root_path) else path


def _leaf_routes(routes):
    """Routes with a path, looking inside included routers (FastAPI wraps those in objects that match
    a request without naming the route that matched)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None and not isinstance(getattr(route, "path", None), str):
            yield from _leaf_routes(getattr(inner, "routes", ()))
        else:
            yield route


def route_label(scope: Mapping[str, Any]) -> str:
    """The template of the route that handled this request, or "unmatched"."""
    route = scope.get("route")
    if route is None:
        # Not routed: either nothing matches, or a middleware answered first (an oversized body, a
        # missing API key). In the second case the request still belongs to a route; find it the way
        # the router would, so those errors are not lumped in with unknown URLs.
        router = getattr(scope.get("app"), "router", None)
        for candidate in _leaf_routes(getattr(router, "routes", ())):
            try:
                match, _ = candidate.matches(scope)
            except Exception:  # a scope some route cannot read (no path): not its request
                continue
            if match is not Match.NONE:
                route = candidate
                break
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


def count_error(request_or_scope: HTTPConnection | Mapping[str, Any], error_type: str) -> None:
    """Count one error response of type ``error_type`` for the request's route (a Request or a scope)."""
    scope = request_or_scope.scope if isinstance(request_or_scope, HTTPConnection) else request_or_scope
    if scope.get("adapter.body_refused") and error_type != "PayloadTooLargeError":
        return  # the body middleware answered 413; the app's reaction to the cut read is not sent
    if scope.get(CLIENT_GONE):
        return  # an answer to a client that left reaches no one: not an error of the server
    get_metrics().errors.labels(route_label(scope), error_type).inc()


class MetricsMiddleware:
    """Counts, times and tracks every HTTP request except the scrapes of ``metrics_path``.

    Pure ASGI (not BaseHTTPMiddleware) so that it adds no task or body buffering to each request.
    """

    def __init__(self, app: ASGIApp, metrics_path: str = METRICS_PATH) -> None:
        self.app = app
        self.metrics_path = metrics_path
        self.metrics = get_metrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Decided on the raw path, before routing: a scrape must not see itself in flight.
        if scope["type"] != "http" or _route_path(scope) == self.metrics_path:
            await self.app(scope, receive, send)
            return

        status: int | None = None

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics = self.metrics
        metrics.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_status)
        except asyncio.CancelledError:
            if status is None:
                status = CLIENT_CLOSED_REQUEST  # the client went away before an answer: not a server error
            raise
        finally:
            if scope.get(CLIENT_GONE):
                # Cancelled because the client left; the handler returned without a response (or one
                # that went nowhere), which would otherwise read as the 500 of a broken app.
                status = CLIENT_CLOSED_REQUEST
            elapsed = time.perf_counter() - start
            metrics.in_flight.dec()
            # The router records the matched route in the scope during the call, so read it only now.
            route = route_label(scope)
            method = scope.get("method", "")
            method = method if method in _KNOWN_METHODS else "other"
            metrics.duration.labels(route).observe(elapsed)
            # No response start means the app raised: the server answers 500 in its stead.
            metrics.requests.labels(route, method, str(status or 500)).inc()


def render_adapter_metrics() -> bytes:
    """This process's metrics, or all workers' when they share a multiprocess directory."""
    if multiprocess_enabled():
        # A fresh registry per scrape, as prometheus_client requires: the collector reads the files now.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def fetch_triton_metrics(url: str) -> bytes:
    """Triton's exposition after a comment naming its source, or a comment saying why it is missing.

    Never raises: a scrape of the adapter must still succeed while Triton is down, since that is
    exactly when its metrics matter.
    """
    try:
        import httpx  # imported here so the adapter runs without httpx when Triton's metrics are off

        # No proxy from the environment: Triton's metrics port is a direct neighbour of the adapter.
        async with httpx.AsyncClient(timeout=TRITON_METRICS_TIMEOUT_S, trust_env=False) as client:
            response = await client.get(url)
        if response.status_code != 200:
            reason = f"HTTP {response.status_code}"
        else:
            body = response.content
            if body and not body.endswith(b"\n"):
                body += b"\n"
            return f"# Triton Inference Server metrics from {_one_line(url)}\n".encode() + body
    except Exception as exc:
        detail = _one_line(str(exc))
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    logger.debug("Triton metrics from %s unavailable: %s", url, reason)
    return f"# Triton metrics unavailable: {_one_line(reason)}\n".encode()


def install_metrics(app: FastAPI, triton_metrics_url: str | None) -> None:
    """Add the metrics middleware and ``GET /metrics`` to ``app`` (before the app starts)."""
    get_metrics()  # now, in this worker, so the families are listed before the first request
    app.add_middleware(MetricsMiddleware, metrics_path=METRICS_PATH)

    async def metrics() -> Response:
        body = render_adapter_metrics()
        if body and not body.endswith(b"\n"):
            body += b"\n"
        if triton_metrics_url:
            body += await fetch_triton_metrics(triton_metrics_url)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(
        METRICS_PATH,
        metrics,
        methods=["GET"],
        tags=["metrics"],
        summary="Prometheus text: adapter request counts, latencies, in-flight and errors by type, then Triton's "
        "own metrics",
        description="The adapter's metrics in Prometheus text format (summed over all workers), followed by "
        "Triton Inference Server's own metrics when a Triton metrics URL is set, or by a comment saying why they "
        "are unavailable.",
        response_class=PlainTextResponse,
    )
