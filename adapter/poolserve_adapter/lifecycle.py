"""Graceful shutdown: on SIGTERM readiness goes 503 first, in-flight requests finish, then the server stops.

uvicorn's own shutdown closes the listening socket at once and cuts open requests after
``timeout_graceful_shutdown``; a load balancer still sending here sees refused connections. Here the
first SIGTERM/SIGINT only starts *draining*:

1. ``/health`` and ``/ping`` answer 503 (``{"status": "draining"}``), so load balancers and
   Kubernetes readiness probes take this replica out;
2. requests already in flight run to the end; a new API request gets a fast 503 in its route's
   error shape with ``Connection: close`` (clients retry it on another replica);
3. once nothing is in flight, or ``drain_timeout_s`` has passed, uvicorn stops as usual.

A second signal stops at once (uvicorn's behaviour). The app does this itself (:class:`SignalDrain`
in its lifespan), so it holds wherever uvicorn runs it: ``python -m poolserve_adapter`` with any number of
workers, and ``make serve``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from http import HTTPStatus

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from poolserve_adapter.errors import error_body, flavour_of
from poolserve_adapter.metrics import count_error
from poolserve_adapter.security import OPEN_PATHS

logger = logging.getLogger("poolserve_adapter")


class Lifecycle:
    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0

    def start_draining(self) -> None:
        if not self.draining:
            self.draining = True
            logger.info("draining: readiness is 503 now; %d request(s) in flight finish first", self.inflight)


class DrainMiddleware:
    """Counts API requests in flight; while draining, refuses new ones with 503 (health routes pass)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle):
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if self.lifecycle.draining:
            return await self._refuse(scope, send)
        self.lifecycle.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.inflight -= 1

    @staticmethod
    async def _refuse(scope: Scope, send: Send) -> None:
        count_error(scope, "ServiceUnavailableError")
        status = HTTPStatus.SERVICE_UNAVAILABLE
        body = error_body(status, "ServiceUnavailableError",
                          "The server is shutting down; retry the request on another replica.", None,
                          flavour_of(Request(scope))).body
        await send({"type": "http.response.start", "status": int(status),
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class SignalDrain:
    """Chains in front of the server's SIGTERM/SIGINT handlers for the app's lifetime (entered in its
    lifespan, where uvicorn, in every worker process and in ``make serve``, has installed its own):
    the first signal starts draining, and the server's handler runs once nothing is in flight or the
    drain timeout has passed; a second signal goes to the server's handler at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, lifecycle: Lifecycle, drain_timeout_s: float, poll_s: float = 0.05):
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self.poll_s = poll_s
        self._previous: dict[int, object] = {}
        self._pending: tuple[int, float] | None = None  # (signal, deadline) while draining
        self._watcher: asyncio.Task | None = None

    async def __aenter__(self) -> SignalDrain:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
            self._watcher = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *_exc) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame) -> None:
        if self._pending is None and not self.lifecycle.draining:
            self._pending = (sig, time.monotonic() + self.drain_timeout_s)
            self.lifecycle.start_draining()
        else:
            self._forward(sig, frame)

    def _forward(self, sig: int, frame=None) -> None:
        handler = self._previous.get(sig)
        if callable(handler):
            handler(sig, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self._pending is None:
                continue
            sig, deadline = self._pending
            if self.lifecycle.inflight and time.monotonic() < deadline:
                continue
            if self.lifecycle.inflight:
                logger.warning("drain timeout (%g s): stopping with %d request(s) in flight",
                               self.drain_timeout_s, self.lifecycle.inflight)
            # Forwarded once: the watch ends. Forwarding SIGINT again would be uvicorn's "second Ctrl-C", a
            # forced exit that skips the app's shutdown (and prints its cancelled lifespan as a traceback).
            self._pending = None
            self._forward(sig)
            return


# Set by the launcher of several workers (``python -m poolserve_adapter``) to its pid, for them to read.
LAUNCHER_PID_ENV = "POOLSERVE_ADAPTER_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def stop_with_launcher() -> None:
    """In a worker of several: be sent SIGTERM (a drain) when the launcher that spawned it dies, however it dies.

    uvicorn's workers have no such tie: a launcher killed with SIGKILL (or by the kernel's parent-death signal of
    ``make serve``) leaves them serving on the port, in front of a Triton that has been stopped. The launcher
    forks its workers from its main thread, so the signal fires when the launcher exits. Linux only; elsewhere,
    and in a single worker (the launcher itself), nothing is done.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or int(launcher) == os.getpid() or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(launcher):  # it died before the tie was made
        os.kill(os.getpid(), signal.SIGTERM)
