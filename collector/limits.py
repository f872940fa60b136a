"""Request body limit, enforced before anything reads the whole body into memory."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runwatch.collector.error_handlers import error_body


class BodyLimit:
    """Answer 413 to bodies over ``max_bytes``, by Content-Length or while streaming.

    A declared length over the limit is answered here (and reported to
    ``on_reject``); a streamed body that grows past it raises ``HTTPException``
    from ``receive``, which FastAPI's body reader passes through untouched to
    the usual error handler.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                if self.on_reject is not None:
                    self.on_reject(scope.get("path", ""))
                reply = JSONResponse(error_body("payload_too_large", message), status_code=413)
                await reply(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, message)
            return received

        await self.app(scope, limited, send)
