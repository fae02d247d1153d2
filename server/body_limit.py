"""ASGI middleware: a request body larger than the limit gets 413 before any of it is parsed.

A Content-Length over the limit is refused before a byte is read; a body without one (chunked)
is read up to the limit and refused as soon as it passes it. A body within the limit is read
here and replayed to the app, so the app never holds more than `max_bytes` of one request.
"""

from __future__ import annotations

from typing import Callable

from .errors import error_response


class BodyLimit:
    def __init__(self, app, max_bytes: int, on_reject: Callable[[], None] = lambda: None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self.refuse(scope, receive, send, f"{declared} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return await self.app(scope, _replay([], message, receive), send)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], None, receive), send)

    async def refuse(self, scope, receive, send, size: str):
        self.on_reject()
        response = error_response(413, f"the request body has {size}: allowed at most {self.max_bytes} "
                                       "(server option --max-body-bytes)",
                                  headers={"Connection": "close"})
        await response(scope, receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _replay(messages: list, last, receive):
    """A receive() that hands out `messages` (then `last`, if any) and then defers to `receive`."""
    pending = list(messages) + ([last] if last else [])

    async def replay():
        return pending.pop(0) if pending else await receive()
    return replay
