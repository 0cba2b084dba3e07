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

from fastapi import FastAPI, Request

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


def install_timing_headers(app: FastAPI) -> None:
    @app.middleware("http")
    async def add_timing_headers(request: Request, call_next):
        start = time.perf_counter()
        timings: dict[str, float] = {}
        token = _timings.set(timings)
        try:
            response = await call_next(request)
        finally:
            _timings.reset(token)
        for name in ("tokenize", "inference"):
            if name in timings:
                response.headers[f"x-{name}-time"] = f"{1000 * timings[name]:.3f}"
        response.headers["x-total-time"] = f"{1000 * (time.perf_counter() - start):.3f}"
        return response
