"""uvicorn with a drain that answers every request it cuts.

On SIGTERM uvicorn stops accepting connections and waits `timeout_graceful_shutdown` for running
requests; past it, it cancels their tasks, so a client gets a bare 500 or a stream that stops
without a final event, and the app's own drain runs only afterwards. Here the app's drain starts
with the shutdown: running requests get `drain_timeout` to finish, and those still running then
end through the engine with the error object (a 503, or an error event and `[DONE]` in a stream).
uvicorn's own timeout is set past that, so it only cancels what the app could not end.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import uvicorn

ANSWER_MARGIN = 10.0  # seconds for the ended requests' answers to be written before uvicorn cancels


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets=None) -> None:
        drained = asyncio.ensure_future(self.drain())
        try:
            await super().shutdown(sockets)
        finally:
            await drained


def serve(app, drain: Callable[[], Awaitable[None]], drain_timeout: float, **config) -> None:
    """Run `app` until SIGTERM/SIGINT; `drain()` is awaited as the shutdown starts."""
    config = uvicorn.Config(app, timeout_graceful_shutdown=drain_timeout + ANSWER_MARGIN, **config)
    DrainingServer(config, drain).run()
