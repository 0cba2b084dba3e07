"""Per-request timing headers, as TEI returns them: where a request's time went.

``x-tokenize-time`` (ms spent tokenizing), ``x-inference-time`` (ms waiting on Triton, queue
included) and ``x-total-time`` (ms from the request's arrival to its response). The services
add to the request's counters through :func:`timed`; the middleware installed by
:func:`install_timing_headers` creates them and writes the headers.
"""

from __future__ import annotations

import contextlib
import contextvars
import time

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("timings", default=None)


@contextlib.contextmanager
def timed(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings = _timings.get()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


class TimingHeadersMiddleware:
    """Pure ASGI (``BaseHTTPMiddleware`` runs every request in an extra task with body streams: measured
    0.2-0.3 ms of a one-text request's adapter time): the counters live in a context variable for the
    request's lifetime, and the headers are added to its response's start message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        timings: dict[str, float] = {}
        token = _timings.set(timings)

        async def send_with_timings(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name in ("tokenize", "inference"):
                    if name in timings:
                        headers[f"x-{name}-time"] = f"{1000 * timings[name]:.3f}"
                headers["x-total-time"] = f"{1000 * (time.perf_counter() - start):.3f}"
            await send(message)

        try:
            await self.app(scope, receive, send_with_timings)
        finally:
            _timings.reset(token)


def install_timing_headers(app: FastAPI) -> None:
    app.add_middleware(TimingHeadersMiddleware)
