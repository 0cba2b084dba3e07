"""Request guards that run before routing: the optional API key and the body-size limit.

Both are pure ASGI middleware (no ``BaseHTTPMiddleware``: it adds latency and buffers bodies).

* API key (``ADAPTER_API_KEY``): every route except ``/health``, ``/ping`` and ``/metrics`` needs
  ``Authorization: Bearer <key>``; otherwise 401 ``{"error": "Unauthorized"}``, the body both vLLM's
  and SGLang's API-key middleware send. The comparison is constant-time.
* Body size (``ADAPTER_MAX_BODY_BYTES``): a declared ``Content-Length`` over the limit is refused
  before reading; a chunked body is counted as it streams and cut off at the limit. 413 in the
  called route's error flavour.
"""

from __future__ import annotations

import hmac
from http import HTTPStatus

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from poolserve_adapter.errors import error_body, flavour_of
from poolserve_adapter.metrics import count_error

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})


async def _send_raw(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            count_error(scope, "Unauthorized")
            return await _send_raw(send, 401, orjson.dumps({"error": "Unauthorized"}))
        return await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, send)
        received = 0
        refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Answer now; whatever the app makes of the aborted read is dropped below.
                    refused = True
                    scope["adapter.body_refused"] = True  # what the app makes of the cut read is not counted
                    await self._refuse(scope, send)
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            pass

    async def _refuse(self, scope: Scope, send: Send) -> None:
        count_error(scope, "PayloadTooLargeError")
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        response = error_body(status, "PayloadTooLargeError",
                              f"Request body is larger than the limit of {self.max_bytes} bytes (ADAPTER_MAX_BODY_BYTES).",
                              None, flavour_of(Request(scope)))
        await _send_raw(send, int(status), response.body)
