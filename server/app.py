"""The FastAPI app: /generate, /perplexity, /health, /ready, /metrics, and the OpenAI-compatible
routes of `server.openai_api`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.async_engine import AsyncEngine, EngineStopped, QueueFull, RequestFailed, RequestStream
from engine.exit_policy import ConfidenceRule
from engine.llm_engine import LLMEngine, StepOutput
from engine.sequence import SamplingParams, Sequence
from engine.speculative import SpeculativeRule

from . import openapi
from .body_limit import BodyLimit
from .chat_template import ChatTemplate
from .errors import APIError, error_body, error_response, install_error_handlers
from .fields import QueryInt
from .metrics import Metrics
from .responses import REQUEST_ERRORS, GenerateResponse, PerplexityResponse, Status, auth_errors, documented
from .schemas import GenerateRequest, PerplexityRequest, SamplingFields

log = logging.getLogger("bitskip.server")


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "bitskip"
    api_key: str | None = None
    max_queue: int = 256
    drain_timeout: float = 30.0   # seconds running requests get to finish on shutdown
    ready_heartbeat: float = 10.0  # /ready fails when the loop has not gone round for this long
    max_body_bytes: int = 2 * 1024 * 1024  # larger request bodies get 413 before they are read
    metrics_auth: bool = False     # /metrics needs the API key too
    max_perplexity_tokens: int = 32768  # longer /perplexity inputs get 413


class Server:
    """Holds the engine loop, metrics and settings; its methods are the endpoint bodies."""

    def __init__(self, engine: LLMEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.config = engine.model_config
        self.metrics = Metrics(self.config.num_hidden_layers)
        self.loop = AsyncEngine(engine, settings.max_queue, self._on_step)
        m = self.metrics
        m.requests_running.set_function(lambda: self.loop.num_running)
        m.requests_waiting.set_function(lambda: self.loop.num_waiting)
        m.kv_cache_usage.set_function(engine.kv_cache.usage if engine.kv_cache else lambda: 0.0)
        self._preemptions_seen = 0
        self._fills_seen = 0

    def _on_step(self, outputs, seconds: float) -> None:
        self.metrics.step_seconds.observe(seconds)
        n = self.engine.scheduler.num_preemptions
        if n > self._preemptions_seen:
            self.metrics.preemptions.inc(n - self._preemptions_seen)
            self._preemptions_seen = n
        fills = self.engine.runner.deferred_fills
        if fills > self._fills_seen:
            self.metrics.deferred_kv_fills.inc(fills - self._fills_seen)
            self._fills_seen = fills

    # ---- validation shared by the endpoints ------------------------------------------------
    def reject(self, reason: str, error: APIError) -> APIError:
        self.metrics.rejected.labels(reason).inc()
        return error

    def check_exit_layer(self, value: int | None, param: str = "exit_layer") -> int:
        L = self.config.num_hidden_layers
        if value is None:
            return L
        if not 1 <= value <= L:
            raise self.reject("validation", APIError(
                422, f"{param}={value!r} is out of range: allowed 1..{L}", param=param))
        return value

    def check_token_ids(self, ids: list[int], param: str = "token_ids") -> None:
        v = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise self.reject("validation", APIError(
                422, f"{param} contains {bad[:5]}: ids must be in 0..{v - 1}", param=param))
        if not ids:
            raise self.reject("validation", APIError(422, f"{param} is empty: at least 1 token is needed",
                                                     param=param))

    async def prompt_ids(self, prompt: str | None, token_ids: list[int] | None,
                         param: str | None = None) -> list[int]:
        """`param` is the field named in errors (default: token_ids or prompt, whichever was sent)."""
        param = param or ("prompt" if token_ids is None else "token_ids")
        if token_ids is not None:
            self.check_token_ids(token_ids, param)
            ids = list(token_ids)
        else:
            ids = await self.encode(prompt, param)
        ctx = self.config.max_position_embeddings
        if len(ids) >= ctx:
            raise self.reject("prompt_too_long", APIError(
                413, f"{param} has {len(ids)} tokens: allowed at most {ctx - 1} (context {ctx})",
                param=param))
        return ids

    async def encode(self, text: str, param: str, add_bos: bool = True) -> list[int]:
        """Tokenized on a worker thread: a long text never holds up the event loop."""
        try:
            return await asyncio.to_thread(self.engine.encode, text, add_bos)
        except ValueError as e:  # a model served without a tokenizer
            raise self.reject("validation", APIError(422, f"{param}: {e}", param=param)) from None

    def with_warnings(self, body: dict) -> dict:
        """`body` plus the model's warnings (no causal mask, no tokenizer), when it has any."""
        return {**body, "warnings": self.engine.warnings} if self.engine.warnings else body

    def sampling_params(self, body: SamplingFields, **extra) -> tuple[
            SamplingParams, int | None, ConfidenceRule | SpeculativeRule | None]:
        """(sampling, fixed exit layer, confidence or speculative rule) of a request body, `extra`
        SamplingParams fields added; 422 names a bad field."""
        exit_layer, confidence = None, None
        if body.policy != "speculative":
            for name in ("draft_exit_layer", "num_draft_tokens", "draft_confidence"):
                if getattr(body, name) is not None:
                    raise self.reject("validation", APIError(
                        422, f"{name} applies to policy 'speculative' only", param=name))
        if body.policy == "speculative":
            if body.exit_layer is not None:
                raise self.reject("validation", APIError(
                    422, f"exit_layer={body.exit_layer!r} applies to policy 'fixed' only: the speculative "
                         "policy takes draft_exit_layer, num_draft_tokens and draft_confidence",
                    param="exit_layer"))
            try:
                confidence = self.engine.speculative_rule(body.draft_exit_layer, body.num_draft_tokens,
                                                          body.draft_confidence)
            except ValueError as e:
                param = next((f for f in ("num_draft_tokens", "draft_exit_layer") if str(e).startswith(f)),
                             "policy")
                raise self.reject("validation", APIError(422, str(e), param=param)) from None
        elif body.policy == "confidence":
            if body.exit_layer is not None:
                raise self.reject("validation", APIError(
                    422, f"exit_layer={body.exit_layer!r} applies to policy 'fixed' only: the confidence "
                         "policy takes threshold, min_exit_layer and confidence_measure", param="exit_layer"))
            self.check_exit_layer(body.min_exit_layer, "min_exit_layer")
            explicit_min = body.min_exit_layer if "min_exit_layer" in body.model_fields_set else None
            try:
                confidence = self.engine.confidence_rule(body.threshold, explicit_min,
                                                         body.confidence_measure, body.exit_points)
            except ValueError as e:
                raise self.reject("validation", APIError(422, str(e), param="exit_points")) from None
        else:
            exit_layer = self.check_exit_layer(body.exit_layer)
        v = self.config.vocab_size
        for param, ids in (("stop_token_ids", body.stop_token_ids or ()), ("logit_bias", body.logit_bias or {})):
            if bad := [t for t in ids if not 0 <= t < v]:
                raise self.reject("validation", APIError(
                    422, f"{param} has token ids {bad[:5]}: ids must be in 0..{v - 1}", param=param))
        try:
            params = SamplingParams(
                max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                seed=body.seed, stop=tuple(body.stop_list), ignore_eos=body.ignore_eos,
                stop_token_ids=tuple(body.stop_token_ids or ()), min_tokens=body.min_tokens,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias or {}, **extra)
        except ValueError as e:
            raise self.reject("validation", APIError(422, str(e))) from None
        return params, exit_layer, confidence

    def submit(self, ids: list[int], params: SamplingParams, exit_layer: int | None,
               rule: ConfidenceRule | SpeculativeRule | None) -> RequestStream:
        policy = {"speculative": rule} if isinstance(rule, SpeculativeRule) else {"confidence": rule}
        return self._admit(lambda: self.loop.submit(ids, params, exit_layer, **policy))

    def submit_scoring(self, ids: list[int], exit_layers: list[int], param: str) -> RequestStream:
        limit = self.settings.max_perplexity_tokens
        if len(ids) > limit:
            raise self.reject("prompt_too_long", APIError(
                413, f"{param} has {len(ids)} tokens: allowed at most {limit} (server option "
                     "--max-perplexity-tokens)", param=param))
        return self._admit(lambda: self.loop.submit_scoring(ids, exit_layers))

    def _admit(self, submit: Callable[[], RequestStream]) -> RequestStream:
        try:
            return submit()
        except QueueFull as e:
            raise self.reject("queue_full", APIError(429, str(e), "rate_limit_error",
                                                     headers={"Retry-After": "1"})) from None
        except EngineStopped as e:
            raise self.reject("shutting_down", APIError(503, str(e), "unavailable",
                                                        headers={"Retry-After": "5"})) from None
        except ValueError as e:
            raise self.reject("validation", APIError(422, str(e))) from None

    async def drain(self) -> None:
        """Stop admitting; running requests get the drain timeout, then end with a 503."""
        log.info("shutting down: draining running requests (up to %.0fs)", self.settings.drain_timeout)
        await self.loop.shutdown(self.settings.drain_timeout)

    # ---- running a request -----------------------------------------------------------------
    async def merged_outputs(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, StepOutput]]:
        """(index, output) of several requests as they come; aborts them all if one fails or the
        caller leaves."""
        if len(streams) == 1:
            async for out in self.outputs(streams[0]):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream):
            try:
                async for out in self.outputs(stream):
                    queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))
            queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            running = len(streams)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()  # each one's `outputs` aborts its request if unfinished

    async def outputs(self, stream: RequestStream) -> AsyncIterator:
        """The request's outputs; records its latency metrics; aborts it if the caller leaves."""
        seq = stream.seq
        label = seq.exit_label
        m = self.metrics
        last = None
        try:
            async for out in stream:
                now = time.perf_counter()
                if out.token_id is not None:
                    if last is None:
                        m.time_to_first_token.labels(label).observe(now - seq.arrival_time)
                    else:
                        m.inter_token_latency.labels(label).observe(now - last)
                    last = now
                    m.observe_tokens(label, [out.exit_layer])
                if out.speculated is not None:
                    m.observe_round(seq.speculation.rule.draft_exit_layer, *out.speculated)
                yield out
            if seq.scoring is None:  # generation latency only: scoring has a scale of its own
                m.request_latency.labels(label).observe(time.perf_counter() - seq.arrival_time)
        finally:
            if not seq.finished:  # the client went away, or an error: free the KV now
                self.loop.abort(stream)

    def event_stream(self, streams: list[RequestStream], event: Callable, final: Callable) -> StreamingResponse:
        """Server-sent events: `event(index, output)` per output of the requests (None: nothing
        to send), each event of `final(seqs)` at the end, an error event if the engine fails a
        request, then `[DONE]`."""
        async def events():
            outputs = self.merged_outputs(streams)
            try:
                async for i, out in outputs:
                    if (data := event(i, out)) is not None:
                        yield sse(data)
                for data in final([s.seq for s in streams]):
                    yield sse(data)
            except RequestFailed as e:
                yield sse(error_body(str(e), "internal_error"))
            except EngineStopped as e:  # shut down past the drain timeout
                yield sse(error_body(str(e), "unavailable"))
            except Exception as e:  # the 200 is sent: the error goes in the stream, which still ends
                log.exception("stream failed")
                yield sse(error_body(f"internal error: {type(e).__name__}", "internal_error"))
            finally:
                await outputs.aclose()
                for stream in streams:
                    if not stream.seq.finished:  # the client went away mid-stream
                        self.loop.abort(stream)
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def run_to_completion(self, request: Request, stream: RequestStream) -> Sequence:
        """Collect a request's outputs; abort it if the client disconnects first."""
        return (await self.run_all(request, [stream]))[0]

    async def run_all(self, request: Request, streams: list[RequestStream]) -> list[Sequence]:
        """Collect the outputs of requests; abort them if the client disconnects first."""
        async def collect():
            async for _ in self.merged_outputs(streams):
                pass

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.create_task(collect()), asyncio.create_task(disconnected())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if work not in done:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            raise APIError(499, "client disconnected", "client_closed")
        try:
            work.result()  # re-raises RequestFailed
        except EngineStopped as e:  # shut down past the drain timeout
            raise APIError(503, str(e), headers={"Retry-After": "5"}) from None
        return [s.seq for s in streams]


def usage(seq: Sequence) -> dict:
    counts = {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.output_ids),
              "total_tokens": seq.num_tokens}
    if seq.speculation is not None:
        counts |= {"draft_tokens": seq.speculation.drafted, "accepted_draft_tokens": seq.speculation.accepted}
    return counts


def timing(seq: Sequence) -> dict:
    def since(t):
        return None if t is None else t - seq.arrival_time
    return {"queue": since(seq.first_scheduled_time), "first_token": since(seq.first_token_time),
            "total": since(seq.finish_time)}


def generate_result(seq: Sequence) -> dict:
    return {"id": seq.request_id, "text": seq.text, "token_ids": seq.output_ids,
            "exit_layers": seq.exit_layers, "finish_reason": seq.finish_reason,
            "usage": usage(seq), "timing": timing(seq)}


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(engine: LLMEngine, settings: ServerSettings = ServerSettings(),
               chat_template: ChatTemplate | None = None) -> FastAPI:
    """The app; `chat_template` (server.chat_template.load_chat_template) enables /v1/chat/completions."""
    server = Server(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        log.info("serving %s (%d layers) with %s", settings.model_name,
                 server.config.num_hidden_layers, engine.backend.describe())
        yield
        await server.drain()  # at once if the ASGI server already drained (server/graceful.py)

    app = FastAPI(title="BitSkip Serve", lifespan=lifespan)
    auth = auth_errors(settings.api_key)
    c = server.config
    openapi.install(app, c.num_hidden_layers, c.vocab_size, c.max_position_embeddings,
                    settings.max_perplexity_tokens, engine.speculative_draft_limit, settings.model_name)
    app.state.server = server

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       on_reject=lambda: server.metrics.rejected.labels("body_too_large").inc())
    open_paths = {"/health", "/ready"} | (set() if settings.metrics_auth else {"/metrics"})
    app.add_middleware(AuthAndCount, server=server, open_paths=open_paths)

    install_error_handlers(app, lambda reason: server.metrics.rejected.labels(reason).inc())

    @app.exception_handler(RequestFailed)
    async def request_failed(request: Request, e: RequestFailed):
        return error_response(500, f"the request failed inside the engine: {e}", "internal_error")

    # ---- generation ----------------------------------------------------------------------
    @app.post("/generate", responses=documented(GenerateResponse, *REQUEST_ERRORS, *auth, stream=True))
    async def generate(body: GenerateRequest, request: Request,
                       exit_layer: QueryInt | None = Query(
                           None, description="overrides the body's exit_layer (422 with policy 'confidence')")):
        if exit_layer is not None:
            body = body.model_copy(update={"exit_layer": exit_layer})
        params, k, confidence = server.sampling_params(body)
        ids = await server.prompt_ids(body.prompt, body.token_ids)
        stream = server.submit(ids, params, k, confidence)
        if not body.stream:
            return server.with_warnings(generate_result(await server.run_to_completion(request, stream)))

        def token_event(_, out):
            if out.token_id is not None:
                return {"token_id": out.token_id, "text": out.text_delta, "exit_layer": out.exit_layer}
            return {"text": out.text_delta} if out.text_delta else None

        return server.event_stream([stream], token_event,
                                   lambda seqs: [server.with_warnings(generate_result(seqs[0]))])

    from .openai_api import openai_router  # imported here: it builds on this module's Server
    app.include_router(openai_router(server, chat_template))

    # ---- scoring ---------------------------------------------------------------------------
    @app.post("/perplexity", responses=documented(PerplexityResponse, *REQUEST_ERRORS, *auth))
    async def score(body: PerplexityRequest, request: Request):
        c = server.config
        layers = body.exit_layers or sorted(set(c.exit_points) | {c.num_hidden_layers})
        for k in layers:
            server.check_exit_layer(k, "exit_layers")
        if body.token_ids is not None:
            server.check_token_ids(body.token_ids)
            ids = body.token_ids
        else:
            ids = await server.encode(body.text, "text")
        if len(ids) < 2:
            raise server.reject("validation", APIError(
                422, f"{'token_ids' if body.token_ids is not None else 'text'} has {len(ids)} token(s): "
                     "at least 2 are needed (the first is context only)",
                param="token_ids" if body.token_ids is not None else "text"))
        # Scored through the scheduler in chunks beside other requests; aborted if the client leaves.
        stream = server.submit_scoring(ids, layers, "token_ids" if body.token_ids is not None else "text")
        result = (await server.run_to_completion(request, stream)).scoring.result()
        return server.with_warnings({"tokens": result.tokens,
                                     "perplexity": {str(k): v for k, v in result.perplexity.items()},
                                     "nll": {str(k): v for k, v in result.nll.items()}})

    # ---- operations ------------------------------------------------------------------------
    @app.get("/health", responses=documented(Status))
    async def health():
        return {"status": "ok"}

    @app.get("/ready", responses=documented(Status, 503))
    async def ready():
        lag = time.monotonic() - server.loop.last_heartbeat
        if server.loop.alive and lag < settings.ready_heartbeat:
            return {"status": "ready", "model": settings.model_name}
        return error_response(503, f"engine loop not stepping (last seen {lag:.1f}s ago)", "unavailable",
                              headers={"Retry-After": "1"})

    @app.get("/metrics", response_class=Response,
             responses=documented(None, *(auth if settings.metrics_auth else ()), text=True))
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class AuthAndCount:
    """ASGI middleware: API-key check (when one is set) and bitskip_requests_total{endpoint, status}."""

    def __init__(self, app, server: Server, open_paths: set[str]):
        self.app, self.server, self.open_paths = app, server, open_paths
        self.known: set[str] | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.known is None and "app" in scope:  # the routes, once: the label set stays bounded
            self.known = set(_route_paths(scope["app"].routes))
        endpoint = path if path in (self.known or ()) else "other"
        metrics, key = self.server.metrics, self.server.settings.api_key
        if key and path not in self.open_paths and not _key_matches(scope, key):
            metrics.rejected.labels("unauthorized").inc()
            metrics.requests.labels(endpoint, "401").inc()
            response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      "authentication_error", headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        status = {}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if self.server.engine.warnings:  # said on every response, errors and streams too
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"warning", _warning_header(self.server.engine.warnings))]}
            await send(message)
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if path != "/metrics":
                metrics.requests.labels(endpoint, str(status.get("code", 500))).inc()


def _route_paths(routes):
    for r in routes:
        if hasattr(r, "path"):
            yield r.path
        if (included := getattr(r, "original_router", None)) is not None:  # FastAPI includes routers lazily
            yield from _route_paths(included.routes)


def _warning_header(warnings: list[str]) -> bytes:
    """An RFC 7234 Warning header value (299: a persistent warning)."""
    text = "; ".join(warnings).replace('"', "'")
    return f'299 bitskip "{text}"'.encode("latin-1", "replace")


def _key_matches(scope, key: str) -> bool:
    """Compares raw header bytes: no header is decoded, so a non-UTF-8 byte in any header (even
    in the key itself) is just a mismatch. ASGI servers send header names lower-cased."""
    given = b""
    for name, value in scope.get("headers", []):
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            given = value[7:].strip()
            break
        if name == b"x-api-key":
            given = value
    return secrets.compare_digest(given, key.encode())

