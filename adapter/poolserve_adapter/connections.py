"""Connection limits of the adapter's HTTP server, where nginx or Envoy would put them.

uvicorn bounds none of these, so one client could hold the server: connections that send nothing
(each an open file; at the descriptor limit nobody else is accepted), a request head or body sent a
byte a second, a 16 MB header or 10,000 headers. :class:`GuardedHttpToolsProtocol` is uvicorn's
httptools protocol with, per adapter worker:

* at most ``max_connections`` open connections: one more is answered 503 and closed at once
  (logged once per interval with a count, not once per connection);
* the request line and headers within ``header_timeout_s`` of the connection or of the request's
  first byte, else 408 and close (a connection that sends nothing is closed too);
* the body within ``body_timeout_s`` of the headers, else 408 and close;
* at most ``max_headers`` headers and ``max_header_bytes`` of request head, else 431 and close;
* an idle keep-alive connection closed after ``keep_alive_timeout_s`` (uvicorn's own timer).

:func:`raise_open_file_limit` lifts the soft descriptor limit to the hard one at start, so that the
connection bound, not the limit of a shell's 1,024, is what a flood meets.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from poolserve_adapter.settings import Settings, get_settings

logger = logging.getLogger("poolserve_adapter.connections")

# Descriptors a worker needs besides client connections (Triton's channel, files, the loop's own).
RESERVED_DESCRIPTORS = 256

# After the drain timeout, requests still running get this long before they are cancelled.
CUT_AFTER_DRAIN_S = 1

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    max_headers: int
    max_header_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(max_connections=settings.max_connections, header_timeout_s=settings.header_timeout_s,
                   body_timeout_s=settings.body_timeout_s, max_headers=settings.max_headers,
                   max_header_bytes=settings.max_header_bytes)


def raise_open_file_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def connection_bound(settings: Settings) -> int:
    """``max_connections``, lowered when the descriptor limit cannot hold it (with a warning)."""
    soft = raise_open_file_limit(settings.max_connections + RESERVED_DESCRIPTORS)
    if settings.max_connections + RESERVED_DESCRIPTORS <= soft:
        return settings.max_connections
    bound = max(1, soft - RESERVED_DESCRIPTORS)
    logger.warning("open-file limit %d holds only %d connections per worker (max_connections %d)", soft, bound,
                   settings.max_connections)
    return bound


class _RateLimitedLog:
    """One warning per ``interval_s`` saying how many times something happened meanwhile."""

    def __init__(self, message: str, interval_s: float = 10.0):
        self.message, self.interval_s = message, interval_s
        self.count, self.last = 0, float("-inf")

    def __call__(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            logger.warning(self.message, self.count)
            self.count, self.last = 0, now


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is answered ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`ConnectionLimits` (see the module doc)."""

    # Set by the process that builds the server (``make serve``); uvicorn workers read the settings.
    limits: ClassVar[ConnectionLimits | None] = None
    _over_limit_log: ClassVar[_RateLimitedLog] = _RateLimitedLog(
        "connection limit reached: %d connections refused with 503 since the last warning")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if GuardedHttpToolsProtocol.limits is None:
            settings = get_settings()
            GuardedHttpToolsProtocol.limits = ConnectionLimits.from_settings(
                settings.model_copy(update={"max_connections": connection_bound(settings)}))
        self.limits = GuardedHttpToolsProtocol.limits
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_head = True
        self._head_bytes = 0  # bytes received while the request's head is incomplete (all head, then)
        self._parsed_head_bytes = 0  # the head's request target and header fields, as parsed
        self._header_count = 0

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._over_limit_log()
            self._answer_and_close(503, "Too many open connections. Retry later.")
            return
        self._arm(self.limits.header_timeout_s, "Request header timeout.")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._reading_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, _Refused):
                self._answer_and_close(error.__context__.status, str(error.__context__))
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self._reading_head and self._head_bytes > self.limits.max_header_bytes:
            self._answer_and_close(431, "Request header fields too large.")

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head, self._header_count, self._parsed_head_bytes = True, 0, 0
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm(self.limits.header_timeout_s, "Request header timeout.")

    def on_url(self, url: bytes) -> None:
        self._parsed_head_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._parsed_head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self.limits.max_headers:
            raise _Refused(431, f"More than {self.limits.max_headers} request header fields.")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # Not _head_bytes: the read that completes the head may hold the start of the body too.
        if self._parsed_head_bytes > self.limits.max_header_bytes:
            raise _Refused(431, "Request header fields too large.")
        self._reading_head, self._head_bytes = False, 0
        self._disarm()
        super().on_headers_complete()
        # A body is read within body_timeout_s; without one, the request is complete already.
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm(self.limits.body_timeout_s, "Request body timeout.")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # -- internals -------------------------------------------------------------------------------

    def _arm(self, seconds: float, message: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._timed_out, message)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self, message: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # too late for a status: the client sees the connection end
            return
        self._answer_and_close(408, message)

    def _answer_and_close(self, status: int, message: str) -> None:
        """A plain-text answer with ``Connection: close``, written straight to the socket: the
        request never reaches the app (a running one sees its client gone)."""
        self._disarm()
        body = message.encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status])]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(body))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app, if running, sees its client gone and stops
            self.cycle.message_event.set()
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def server_options(settings: Settings) -> dict:
    """uvicorn.Config arguments that put these limits on its server (this process's settings)."""
    GuardedHttpToolsProtocol.limits = ConnectionLimits.from_settings(
        settings.model_copy(update={"max_connections": connection_bound(settings)}))
    return {"http": GuardedHttpToolsProtocol, "timeout_keep_alive": settings.keep_alive_timeout_s,
            # uvicorn's own wait starts when the app's drain (lifecycle.SignalDrain) has ended, so it
            # only gives answers being written a moment more: then what is still running is cut.
            "timeout_graceful_shutdown": CUT_AFTER_DRAIN_S}
