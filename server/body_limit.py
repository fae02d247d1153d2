"""ASGI middleware: a request body larger than the limit gets 413 before any of it is parsed.

A Content-Length over the limit is refused before a byte is read; a body without one (chunked)
is read up to the limit and refused as soon as it passes it. A body within the limit is read
here and replayed to the app, so the app never holds more than `max_bytes` of one request.

The 413 is sent at once, then the connection closes. Most clients send their whole body before
they read a response, and closing a socket that still has unread bytes makes the kernel send a
reset, which loses the 413 on the client's side. So, as nginx's lingering close does, what the
client still sends is read and dropped first: at most DRAIN_BYTES, for at most DRAIN_SECONDS,
on the event loop without holding it (no body is kept). A body declared larger than that is not
drained at all (waiting could not save its 413 for a client that writes before reading).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from .errors import error_response

DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 5.0


class BodyLimit:
    def __init__(self, app, max_bytes: int, on_reject: Callable[[], None] = lambda: None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self.refuse(scope, receive, send, f"{declared} bytes", declared)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return await self.app(scope, _replay([], message, receive), send)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send, f"more than {self.max_bytes} bytes", None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], None, receive), send)

    async def refuse(self, scope, receive, send, size: str, unread: int | None):
        """The 413, then the rest of the body drained (bounded) before the connection closes;
        `unread`: how much of the body is still to come, when known."""
        self.on_reject()
        response = error_response(413, f"the request body has {size}: allowed at most {self.max_bytes} "
                                       "(server option --max-body-bytes)",
                                  headers={"Connection": "close"})
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        # The whole body goes out now (its Content-Length says it is complete); the ASGI response
        # ends after the drain, since the server stops handing out the request once it has.
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        # A client that waits for "100 Continue" sends nothing more (and reading would send the 100).
        if not _header(scope, b"expect") and (unread is None or unread <= DRAIN_BYTES):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_drop(receive, DRAIN_BYTES), DRAIN_SECONDS)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drop(receive, limit: int) -> None:
    """Read and drop the request's body until it ends, the client leaves or `limit` bytes went."""
    while limit > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        limit -= len(message.get("body", b""))


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _replay(messages: list, last, receive):
    """A receive() that hands out `messages` (then `last`, if any) and then defers to `receive`."""
    pending = list(messages) + ([last] if last else [])

    async def replay():
        return pending.pop(0) if pending else await receive()
    return replay
