"""The engine loop for a server: one background thread steps the LLMEngine while asyncio code
submits requests and reads their tokens.

New requests join the running batch at the next step (continuous batching). All engine state is
touched only by the loop thread; the event loop talks to it through a command queue, and tokens
come back through each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .exit_policy import ConfidenceRule
from .llm_engine import LLMEngine, StepOutput
from .sequence import SamplingParams, Sequence
from .speculative import SpeculativeRule

log = logging.getLogger("bitskip.engine")


class QueueFull(Exception):
    """The waiting queue is at its limit; the client should retry later."""


class EngineStopped(Exception):
    """The engine is shutting down and admits nothing new."""


class RequestFailed(Exception):
    """The engine failed while computing this request."""


@dataclass
class RequestStream:
    """Outputs of one request, in order; the last one has `finished` set (or an error arrives)."""

    seq: Sequence
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def __aiter__(self):
        return self

    async def __anext__(self) -> StepOutput:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._queue.put_nowait(None)
        return item


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 256,
                 on_step: Callable[[list[StepOutput], float], None] | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_step = on_step  # metrics hook: (outputs, step seconds), called on the loop thread
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[Sequence, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._admitting = True
        self._pending = 0            # submitted but not yet handed to the engine
        self._stop_error = EngineStopped("the server shut down before the request finished")
        self.last_heartbeat = 0.0    # when the loop last went round (for /ready)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="bitskip-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish (up to `drain_timeout`), then stop; the
        requests still running then end with EngineStopped. A second call returns at once."""
        self._admitting = False
        deadline = time.monotonic() + drain_timeout
        while (self._streams or self._pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._stopping.is_set():
            return
        self._stop_error = EngineStopped(
            f"the server shut down before the request finished (drain timeout {drain_timeout:g}s)")
        self._stopping.set()
        self._commands.put(lambda: None)
        if self._thread:
            await asyncio.to_thread(self._thread.join, 5.0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the asyncio side ------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._pending

    def submit(self, prompt_ids: list[int], params: SamplingParams, exit_layer: int | None = None,
               confidence: ConfidenceRule | None = None,
               speculative: SpeculativeRule | None = None) -> RequestStream:
        """Queue a request. Raises ValueError (bad request), QueueFull or EngineStopped."""
        return self._enqueue(lambda: self.engine.validate_request(prompt_ids, params, exit_layer, confidence,
                                                                  speculative))

    def submit_scoring(self, ids: list[int], exit_layers: list[int]) -> RequestStream:
        """Queue a perplexity request; its one output (finished) comes when every window has run."""
        return self._enqueue(lambda: self.engine.validate_scoring(ids, exit_layers))

    def _enqueue(self, validate: Callable[[], Sequence]) -> RequestStream:
        if not self._admitting or not self.alive:
            raise EngineStopped("the server is shutting down")
        if self.num_waiting >= self.max_queue:
            raise QueueFull(f"{self.num_waiting} requests are waiting (limit {self.max_queue})")
        seq = validate()
        stream = RequestStream(seq)
        self._pending += 1

        def add():
            self._pending -= 1
            self._streams[seq] = stream
            self.engine.add_sequence(seq)
        self._commands.put(add)
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Abort a request (for example, its client went away); its KV is freed at once."""
        self._commands.put(lambda: self._abort(stream.seq))

    # ---- the loop thread -------------------------------------------------------------------
    def _run(self) -> None:
        log.info("engine loop started")
        while not self._stopping.is_set():
            self.last_heartbeat = time.monotonic()
            block = not self.engine.has_unfinished()
            try:
                while True:
                    cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
                    block = False
                    cmd()
            except queue.Empty:
                pass
            if self._stopping.is_set() or not self.engine.has_unfinished():
                continue
            t0 = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:
                log.exception("engine step failed; failing the requests in that step")
                self._fail(self.engine.last_batch, e)
                continue
            if self.on_step:
                self.on_step(outputs, time.perf_counter() - t0)
            for out in outputs:
                self._deliver(out.seq, out)
        # Commands queued before the stop (aborts, late admissions) run; whatever is still
        # unfinished then ends with an error its client sees (a 503 or a stream's error event).
        with contextlib.suppress(queue.Empty):
            while True:
                self._commands.get_nowait()()
        self._fail(list(self._streams), self._stop_error)
        log.info("engine loop stopped")

    def _deliver(self, seq: Sequence, item) -> None:
        stream = self._streams.get(seq)
        if stream is None:
            return
        if isinstance(item, StepOutput) and item.error:
            item = RequestFailed(item.error)
        finished = isinstance(item, BaseException) or item.finished
        if finished:
            del self._streams[seq]
        self._loop.call_soon_threadsafe(stream._queue.put_nowait, item)

    def _abort(self, seq: Sequence) -> None:
        if seq in self._streams:
            self.engine.abort(seq)
            self._deliver(seq, StepOutput(seq, None, "", True))

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        """End `seqs` with `error` (EngineStopped as it is, anything else as RequestFailed)."""
        if not isinstance(error, EngineStopped):
            error = RequestFailed(f"{type(error).__name__}: {error}")
        for seq in seqs:
            if not seq.finished:
                seq.finish_reason = "error"
                self.engine.abort(seq, reason="error")
            self._deliver(seq, error)

