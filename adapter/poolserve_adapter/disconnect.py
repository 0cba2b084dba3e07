"""A client that disconnects cancels its request: tokenizing, admission waits and its Triton calls.

uvicorn tells an app that its client left only through ``receive()`` (``http.disconnect``), which
FastAPI handlers never read once the body is parsed, so by default an abandoned request is still
computed in full (as vLLM avoids by aborting it). This middleware keeps listening after the body and
cancels the handler task when the client goes before the response is finished. The cancellation
reaches ``grpc.aio``: the Triton call is cancelled on the wire, and the Python backend model skips
requests already cancelled when it packs a batch (``model_runtime/poolserve_runtime/triton_model.py``).

A request cancelled so is marked in its scope (:data:`~poolserve_adapter.metrics.CLIENT_GONE`) and
ends without a response (uvicorn sends nothing more to a closed connection and logs nothing):
:class:`~poolserve_adapter.metrics.MetricsMiddleware`, outside this one, counts it as 499 (client
closed request), not as the 500 of an app that returned without answering.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from poolserve_adapter.metrics import CLIENT_GONE


class CancelOnDisconnectMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        messages: asyncio.Queue[Message] = asyncio.Queue()
        started = responded = False

        async def send_tracking(message: Message) -> None:
            nonlocal started, responded
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, messages.get, send_tracking))

        async def listen() -> None:
            while True:
                message = await receive()
                await messages.put(message)
                if message["type"] == "http.disconnect":
                    if not responded and not handler.done():
                        if not started:  # nothing reached the client: whatever the handler sends now is lost
                            scope[CLIENT_GONE] = True
                        handler.cancel()
                    return

        listener = asyncio.ensure_future(listen())
        try:
            await handler
        except asyncio.CancelledError:
            if not listener.done():  # this task itself was cancelled (server shutdown): pass it on
                handler.cancel()
                raise
        finally:
            listener.cancel()
