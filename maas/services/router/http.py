"""The router's OpenAI-compatible HTTP API: aiohttp in the router's event loop, beside the
gRPC `Inference` service and over the same `Forwarder` (one routing path for both).

Endpoints: POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models,
/v1/models/{model}, /openapi.json (also /v1/openapi.json) and /health; POST /tokenize and
/detokenize (vLLM's). See docs/http-api.md.

A client that goes away cancels its request: the server runs with handler cancellation,
so a dropped connection cancels the handler and with it the downstream gRPC call; a
failed write to an event stream ends it the same way. Errors have OpenAI's body
(`{"error": {"message", "type", "param", "code"}}`) and the status `HTTP_STATUS` maps
from the domain error's gRPC code (`_error_response`, the one place); nothing
unexpected reaches a client beyond "internal error" and the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, cast

import grpc
from aiohttp import BodyPartReader, web
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from maas import __version__
from maas.mesh import tracing
from maas.mesh.auth import bearer
from maas.mesh.authz import Principal
from maas.mesh.batches import MAX_FILE_BYTES
from maas.mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MaasError,
    NotFound,
    PermissionDenied,
    StartupError,
    from_rpc_error,
)
from maas.mesh.etcd import EtcdError
from maas.mesh.logs import model_var, new_request_id, request_id_var, tenant_var
from maas.mesh.tls import TlsFiles
from maas.pipelines.executor import Run
from maas.services.router import openai_api, openapi, pipelines, responses
from maas.services.router.batches import BatchService, acting, batch_object, file_object
from maas.services.router.forward import SESSION_HEADER, Chunk, Forwarder
from maas.services.router.pipelines import Found, MeshServices, PipelineCatalog
from maas.services.router.tenants import Caller
from maas.services.router.tokenize import (
    Tokenization,
    detokenize_reply,
    detokenize_request,
    tokenize_reply,
    tokenize_request,
)
from maas.v1 import batches_pb2, inference_pb2

log = logging.getLogger(__name__)
ACCESS = logging.getLogger("maas.access")  # a line per HTTP request (docs/operations.md#logs)

MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 600.0  # seconds a request may take when it does not say (the openai client's own default)
MAX_TIMEOUT = 3600.0     # the most a request may ask for with TIMEOUT_HEADER
TIMEOUT_HEADER = "x-request-timeout"

HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
"""gRPC code of a domain error -> (HTTP status, OpenAI error type); anything else is a 500
that says only "internal error" and the request id (unless the error is `public`: a
pipeline plugin's failure, which is its author's to read)."""

REQUESTS = Counter("maas_http_requests_total", "HTTP API requests, by route and status.", ["route", "status"])
LATENCY = Histogram("maas_http_request_seconds", "Time to complete an HTTP API request (whole stream).",
                    ["route"], buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))


class HttpError(Exception):
    """An HTTP-level refusal that has no gRPC code (body too large, unknown path)."""

    def __init__(self, status: int, message: str, *, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def error_body(message: str, kind: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(e: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, OpenAI error body, extra headers) for an exception: the one mapping."""
    if isinstance(e, grpc.aio.AioRpcError):
        e = from_rpc_error(e)
    if isinstance(e, HttpError):
        return e.status, error_body(e.message, "invalid_request_error", code=e.code), e.headers
    if isinstance(e, MaasError) and e.code in HTTP_STATUS:
        status, kind = HTTP_STATUS[e.code]
        headers = {}
        if status == 429 and (retry_after := getattr(e, "retry_after", None)) is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return status, error_body(e.message, kind, param=e.field, code=e.code.name.lower()), headers
    if isinstance(e, MaasError) and getattr(e, "public", False):
        return 500, error_body(e.message, "server_error", param=e.field, code="internal"), {}
    if isinstance(e, UnicodeEncodeError):  # a lone surrogate escape ("\\ud800") where text is needed
        return 400, error_body("a string in the request holds an unpaired surrogate (a \\ud800-\\udfff escape "
                               "without its pair); send valid Unicode", "invalid_request_error",
                               code="invalid_unicode"), {}
    if isinstance(e, EtcdError):
        log.warning("etcd call failed: %s", e)
        return 503, error_body("the mesh's etcd is unavailable; retry shortly", "service_unavailable_error",
                               code="unavailable"), {}
    log.error("unexpected error", exc_info=e)
    return 500, error_body(f"internal error (request id {request_id_var.get()})", "server_error",
                           code="internal"), {}


def error_of(e: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) of a failure (a batch line's answer)."""
    status, body, _ = _error(e)
    return status, body


def _error_response(e: BaseException) -> web.Response:
    status, body, headers = _error(e)
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _timeline(found: Found, run: Run) -> dict[str, Any]:
    return {"version": found.ref, "deployment": found.deployment or None,
            "first_chunk_ms": None if run.first_chunk_ms is None else round(run.first_chunk_ms, 3),
            "steps": [vars(t) for t in run.timings()]}


def _api_key(request: web.Request) -> str:
    return bearer(request.headers.get("Authorization", "")) or request.headers.get("x-api-key", "").strip()


async def _next(stream: AsyncGenerator[Chunk, None]) -> inference_pb2.GenerateChunk | None:
    relayed = await anext(stream, None)
    return None if relayed is None else relayed[0]


TRACE_HEADER = "x-maas-trace"  # "1": a pipeline's non-streamed reply carries each step's timing
IGNORED_HEADER = "x-maas-ignored-fields"  # the body's fields the API does not know, dropped


class _Deadline:
    """When a request must be answered by. The forwarder gets the time left (each call to a
    worker carries it as its gRPC deadline); `bound()` also cancels whatever the router
    itself is waiting on then. Either way the client gets DEADLINE_EXCEEDED: 504."""

    def __init__(self, seconds: float, source: str) -> None:
        self.seconds, self.source = seconds, source
        self.at = asyncio.get_running_loop().time() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - asyncio.get_running_loop().time())

    def expired(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request did not finish within its deadline of {self.seconds:g}s "
                                f"({self.source}); send {TIMEOUT_HEADER}: <seconds> for more time")

    @contextlib.asynccontextmanager
    async def bound(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout_at(self.at):
                yield
        except TimeoutError:
            raise self.expired() from None
        except MaasError as e:
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.message == "Deadline Exceeded":
                raise self.expired() from None  # gRPC's own words for the worker call's deadline
            raise


@dataclass
class _Call:
    """Who asks, and what of the HTTP request the answer depends on beyond its body."""

    who: Caller
    session: str = ""            # x-session-id: the replica it sticks to
    traced: bool = False         # x-maas-trace: 1
    service_class: str = ""      # a class the request runs at whatever it asked (a batch's line)
    ignored: list[str] | None = None  # unknown body fields dropped (None: refused, --strict-fields)

    def stamp(self, req: inference_pb2.GenerateRequest) -> None:
        if self.service_class:
            req.service_class = self.service_class


def _call(request: web.Request, strict: bool) -> _Call:
    return _Call(_api_key(request), request.headers.get(SESSION_HEADER, ""), request.headers.get(TRACE_HEADER) == "1",
                 ignored=None if strict else [])


Answer = dict[str, Any] | tuple[str, AsyncGenerator[list[dict[str, Any]], None]]
"""A JSON body, or (request id, the event stream) for a streamed answer."""


class HttpApi:
    """The HTTP server: `start()` binds (a taken port is a StartupError), `stop_accepting()`
    closes the listening socket, `close()` waits up to `grace` for requests in flight."""

    def __init__(self, forwarder: Forwarder, host: str, port: int, *, grace: float = 10.0,
                 max_body: int = MAX_BODY_BYTES, timeout: float = DEFAULT_TIMEOUT,
                 tls: TlsFiles | None = None, catalog: PipelineCatalog | None = None,
                 strict_fields: bool = False) -> None:
        if not 0 < timeout <= MAX_TIMEOUT:
            raise StartupError(f"the HTTP request timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout:g}")
        self.forwarder = forwarder
        self.pipelines = catalog or PipelineCatalog(forwarder)
        self.host, self.port = host, port
        self.max_body = max_body
        self.timeout = timeout
        self.strict_fields = strict_fields  # refuse bodies with fields the API does not know
        self.tls = tls if tls is not None and tls.serves else None  # HTTPS with the router's certificate
        self.endpoint = ""
        self.app = web.Application(client_max_size=max_body, middlewares=[self._middleware])
        self.app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.post("/v1/embeddings", self.embeddings),
            web.post("/v1/responses", self.responses),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
            web.get("/openapi.json", self.openapi),
            web.get("/v1/openapi.json", self.openapi),
            web.get("/health", self.health),
            web.get("/version", self.version),
            web.get("/metrics", self.metrics),
            web.post("/v1/files", self.create_file),
            web.get("/v1/files", self.list_files),
            web.get("/v1/files/{file_id}", self.get_file),
            web.delete("/v1/files/{file_id}", self.delete_file),
            web.get("/v1/files/{file_id}/content", self.file_content),
            web.post("/v1/batches", self.create_batch),
            web.get("/v1/batches", self.list_batches),
            web.get("/v1/batches/{batch_id}", self.get_batch),
            web.post("/v1/batches/{batch_id}/cancel", self.cancel_batch),
        ])
        self.batches: BatchService | None = None  # the Files and Batches APIs (docs/batches.md), once wired
        # POST /tokenize, /detokenize (vLLM's): a model's tokenizer on one of its replicas, once wired
        self.tokenization: Tokenization | None = None
        self.app.add_routes([web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize)])
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=grace)
        self._site: web.TCPSite | None = None
        self._closed = False

    async def start(self) -> str:
        """Listen; returns "host:port" as other machines dial it."""
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self.port,
                                 ssl_context=self.tls.server_ssl_context() if self.tls is not None else None)
        try:
            await self._site.start()
        except OSError as e:
            self._site = None
            await self.close()
            raise StartupError(f"cannot serve HTTP on {self.host}:{self.port}: {e.strerror or e} "
                               "(the port is in use or the address is invalid; pass --http-port)") from None
        port = self._runner.addresses[0][1]
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        self.endpoint = f"{host}:{port}"
        log.info("router serving the OpenAI HTTP API on %s://%s/v1", "https" if self.tls else "http", self.endpoint)
        return self.endpoint

    async def stop_accepting(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def close(self) -> None:
        """Idempotent: stop listening, give requests in flight the grace period, then cancel them."""
        if self._closed:
            return
        self._closed = True
        await self.stop_accepting()
        await self._runner.cleanup()

    # ---- plumbing --------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        rid = request.headers.get("x-request-id", "")[:64] or new_request_id()
        token = request_id_var.set(rid)
        # a keep-alive connection's requests share a task: each starts with no tenant or model
        tenant_token, model_token = tenant_var.set(""), model_var.set("")
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        start, status = time.perf_counter(), 499
        span = trace.INVALID_SPAN if route == "/health" else tracing.server_span(
            f"{request.method} {route}", tracing.extract(request.headers.items()), **{
                "http.request.method": request.method, "http.route": route, "url.path": request.path,
                "maas.request_id": rid})
        active = tracing.activate(span)
        try:
            try:
                response = await handler(request)
            except web.HTTPException as e:  # aiohttp's own refusals: no such path, wrong method
                if e.status < 400:
                    raise
                response = _error_response(HttpError(e.status, f"{e.reason}: {request.method} {request.path}",
                                                     code=e.reason.lower().replace(" ", "_")))
            except Exception as e:
                response = _error_response(e)
            if not response.prepared:  # a stream set it before its headers went out
                response.headers["x-request-id"] = rid
            status = response.status
            return response
        finally:
            REQUESTS.labels(route, str(status)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - start)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
            tracing.deactivate(active)
            if route != "/health":  # (probes would drown the rest)
                elapsed_ms = round((time.perf_counter() - start) * 1000, 1)
                ACCESS.info("%s %s %d %.1f ms", request.method, request.path, status, elapsed_ms, extra={"fields": {
                    "http_method": request.method, "http_path": request.path, "http_route": route,
                    "http_status": status, "duration_ms": elapsed_ms, "remote": request.remote or "",
                    **{k: v for k, v in (("tenant", tenant_var.get()), ("model", model_var.get())) if v}}})
            tenant_var.reset(tenant_token)
            model_var.reset(model_token)
            request_id_var.reset(token)

    async def _body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > self.max_body:
            raise self._too_large(request.content_length)
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large(None) from None
        if not raw.strip():
            raise HttpError(400, "the request body is empty: send a JSON object", code="invalid_json")
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError:
            raise HttpError(400, "invalid JSON: the body is not UTF-8", code="invalid_json") from None
        except json.JSONDecodeError as e:
            raise HttpError(400, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                            code="invalid_json") from None
        except ValueError as e:
            raise HttpError(400, f"invalid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise HttpError(400, "invalid JSON: nested too deeply", code="invalid_json") from None

    def _deadline(self, request: web.Request) -> _Deadline:
        """The request's deadline: `x-request-timeout` seconds from now, else the router's default."""
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return _Deadline(self.timeout, "the router's default, --http-timeout")
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not 0 < seconds <= MAX_TIMEOUT:  # NaN fails too
            shown = raw if len(raw) <= 32 else raw[:32] + "..."
            raise HttpError(400, f"{TIMEOUT_HEADER} must be a number of seconds greater than 0 and at most "
                                 f"{MAX_TIMEOUT:g}, got {shown!r}", code="invalid_request_timeout")
        return _Deadline(seconds, TIMEOUT_HEADER)

    def _too_large(self, size: int | None) -> HttpError:
        got = f"{size} bytes" if size is not None else "larger"
        return HttpError(413, f"the request body is {got}; the limit is {self.max_body} bytes",
                         code="request_too_large")

    # ---- endpoints -------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)
        call = _call(request, self.strict_fields)
        return await self._reply(request, deadline, await self._chat(call, deadline, await self._body(request)), call)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)
        call = _call(request, self.strict_fields)
        return await self._reply(request, deadline, await self._completion(call, deadline, await self._body(request)),
                                 call)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)
        call = _call(request, self.strict_fields)
        return await self._reply(request, deadline, await self._embedding(call, deadline, await self._body(request)),
                                 call)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API, run as the chat completion it translates to (`responses`)."""
        deadline = self._deadline(request)
        call = _call(request, self.strict_fields)
        body, echo = responses.chat_body(await self._body(request), call.ignored)
        answered = await self._chat(call, deadline, body)
        rid, created = f"resp_{request_id_var.get()}", int(time.time())
        if isinstance(answered, dict):
            return await self._reply(request, deadline, responses.response(answered, echo, rid, created), call)
        return await self._reply(request, deadline, (answered[0], self._response_events(answered[1], echo, rid,
                                                                                         created)), call)

    @staticmethod
    async def _response_events(chunks: AsyncGenerator[list[dict[str, Any]], None], echo: dict[str, Any], rid: str,
                               created: int) -> AsyncGenerator[list[dict[str, Any]], None]:
        out = responses.ResponseEvents(echo, rid, created)
        async with contextlib.aclosing(chunks):
            first = True
            async for step in chunks:
                events = [e for chunk in step for e in out.chunk(chunk)]
                yield [*(out.start() if first else []), *events]
                first = False

    async def answer(self, endpoint: str, body: object, who: Caller, timeout: float, *,
                     service_class: str = "") -> dict[str, Any]:
        """The JSON answer to one request to `endpoint` as `who`, as the HTTP API would give
        it (a batch's line, docs/batches.md): the same parsing, pipelines, defaults and
        errors. A stream cannot be answered this way."""
        if isinstance(body, dict) and body.get("stream"):
            raise InvalidArgument("a batch request cannot stream: leave out \"stream\"", field="stream")
        call, deadline = _Call(who, service_class=service_class, ignored=None if self.strict_fields else []), \
            _Deadline(timeout, "the batch's")
        handler = {"/v1/chat/completions": self._chat, "/v1/completions": self._completion,
                   "/v1/embeddings": self._embedding}[endpoint]
        answered = await handler(call, deadline, body)
        assert isinstance(answered, dict)  # not streamed
        return answered

    async def _reply(self, request: web.Request, deadline: _Deadline, answered: Answer,
                     call: _Call) -> web.StreamResponse:
        headers = {IGNORED_HEADER: ", ".join(call.ignored)} if call.ignored else {}
        if call.ignored:
            log.debug("fields ignored: %s", ", ".join(call.ignored))
        if isinstance(answered, dict):
            return web.json_response(answered, dumps=_dumps, headers=headers)
        rid, events = answered
        return await self._events(request, deadline, rid, events, headers)

    async def _chat(self, call: _Call, deadline: _Deadline, body: object) -> Answer:
        req, opts = openai_api.chat_request(body, call.ignored)
        call.stamp(req)
        if found := await self._find_pipeline(call, req.model):
            return await self._pipeline(call, deadline, req, opts, found)
        if opts.max_tokens_given:
            return await self._generate(call, deadline, req, opts)
        req.params.max_tokens = default = openai_api.chat_max_tokens(self._context_length(req.model))
        try:
            return await self._generate(call, deadline, req, opts)
        except InvalidArgument as e:  # the prompt leaves less room than the default
            if e.field != "max_tokens":
                raise
            raise InvalidArgument(f"{e.message}; the request did not set max_tokens and a chat's default is "
                                  f"{default}: set max_tokens (or max_completion_tokens) to what fits",
                                  field="max_tokens") from None

    async def _completion(self, call: _Call, deadline: _Deadline, body: object) -> Answer:
        req, opts = openai_api.completion_request(body, call.ignored)
        call.stamp(req)
        if found := await self._find_pipeline(call, req.model):
            return await self._pipeline(call, deadline, req, opts, found)
        return await self._generate(call, deadline, req, opts)

    async def _embedding(self, call: _Call, deadline: _Deadline, body: object) -> Answer:
        req, opts = openai_api.embedding_request(body, call.ignored)
        req.request_id = request_id_var.get()
        req.service_class = "batch" if call.service_class == "batch" else ""  # only batches say (they yield)
        async with deadline.bound():
            reply = await self.forwarder.embed(req, deadline.remaining(), call.who)
        return openai_api.embedding_list(reply, opts)

    async def _find_pipeline(self, call: _Call, model: str) -> Found | None:
        """The pipeline `model` names, once the caller is known (no registry lookups for
        anonymous callers); None for anything else."""
        gate = self.forwarder.gate
        if gate is not None:
            gate.identify(call.who)  # Unauthenticated / PermissionDenied before anything else
        return await self.pipelines.find(model)

    async def _pipeline(self, call: _Call, deadline: _Deadline, req: inference_pb2.GenerateRequest,
                        opts: openai_api.Options, found: Found) -> Answer:
        """A pipeline's answer (docs/pipelines.md, `pipelines.start`). With `x-maas-trace: 1`
        the reply (a stream: its last chunk) carries the version that ran and each step's
        timing."""
        if opts.n > 1 or opts.prompts:
            raise InvalidArgument("a pipeline answers one prompt with one choice: leave out n and send one prompt",
                                  field="n" if opts.n > 1 else "prompt")
        rid = req.request_id = request_id_var.get()
        created = int(time.time())
        run, services = pipelines.start(self.forwarder, call.who, req, found, deadline.remaining(), self.pipelines)
        answer = run.answer()
        if opts.stream:
            return rid, self._pipeline_stream(opts, rid, created, run, answer, services,
                                              found if call.traced else None)
        async with contextlib.aclosing(answer), deadline.bound():
            text = "".join([chunk async for chunk in answer])
        reply = inference_pb2.GenerateResponse(request_id=rid, model=req.model, text=text,
                                               finish_reason=pipelines.finish(run), usage=services.usage)
        body = openai_api.completion(reply, opts, rid, created)
        if call.traced:
            body["pipeline"] = _timeline(found, run)
        return body

    @staticmethod
    async def _pipeline_stream(opts: openai_api.Options, rid: str, created: int, run: Run,
                               answer: AsyncGenerator[str, None], services: MeshServices,
                               traced: Found | None) -> AsyncGenerator[list[dict[str, Any]], None]:
        encoder = openai_api.StreamEncoder(opts, rid, created)
        async with contextlib.aclosing(answer):
            first = True
            async for text in answer:
                yield [*(encoder.start() if first else []), *encoder.chunk(inference_pb2.GenerateChunk(text=text))]
                first = False
        # the answer is closed: every step's span and timing is final
        last = [*(encoder.start() if first else []), *encoder.chunk(inference_pb2.GenerateChunk(
            finish_reason=pipelines.finish(run), usage=services.usage))]
        if traced is not None and last:
            last[-1]["pipeline"] = _timeline(traced, run)
        yield [*last, *encoder.end()]

    def _context_length(self, model: str) -> int:
        """The context of `model`'s ready replicas (a fine-tuned adapter's: its deployment's);
        0 while none is ready, when the router does not know it."""
        pool = self.forwarder.pool
        if model not in pool.deployments.items:
            model = pool.serving_adapter(model) or model
        return min((r.context_length for r in pool.ready(model) if r.context_length), default=0)

    async def _generate(self, call: _Call, deadline: _Deadline, req: inference_pb2.GenerateRequest,
                        opts: openai_api.Options) -> Answer:
        req.request_id = rid = request_id_var.get()
        created = int(time.time())
        reqs = openai_api.choices(req, opts)
        if len(reqs) > 1:
            for i, r in enumerate(reqs):
                r.request_id = f"{rid}-{i}"
            if opts.stream:
                return rid, self._streams(call, deadline, reqs, opts, created, rid)
            runs = [asyncio.ensure_future(c) for c in self._choices(call, deadline, reqs, opts.n)]
            try:
                async with deadline.bound():
                    replies = await asyncio.gather(*runs)
            finally:  # one failed: the others stop too (nobody would read them)
                for run in runs:
                    run.cancel()
            return openai_api.completions(replies, opts, rid, created)
        if opts.stream:
            return rid, self._stream(call, deadline, req, opts, created)
        async with deadline.bound():
            reply, _ = await self.forwarder.generate(req, deadline.remaining(), call.who, call.session)
        return openai_api.completion(reply, opts, rid, created)

    def _choices(self, call: _Call, deadline: _Deadline, reqs: list[inference_pb2.GenerateRequest], n: int,
                 chunks: asyncio.Queue[tuple[int, inference_pb2.GenerateChunk]] | None = None,
                 ) -> list[Coroutine[Any, Any, inference_pb2.GenerateResponse]]:
        """Each choice's run, as chunks gathered into one reply (and, given `chunks`, put
        there with the choice's index as they come). A prompt's first choice starts at once;
        the other n - 1 when its first chunk arrives, by when its prompt is in the replica's
        prefix cache (and routing sends the same prompt to the same replica), so the prompt
        is prefilled once."""
        firsts = [asyncio.Event() for _ in range(0, len(reqs), n)]
        return [self._choice(call, deadline, r, firsts[i // n] if i % n == 0 else None,
                             None if i % n == 0 else firsts[i // n], chunks, i) for i, r in enumerate(reqs)]

    async def _choice(self, call: _Call, deadline: _Deadline, req: inference_pb2.GenerateRequest,
                      started: asyncio.Event | None, after: asyncio.Event | None,
                      chunks: asyncio.Queue[tuple[int, inference_pb2.GenerateChunk]] | None = None,
                      index: int = 0) -> inference_pb2.GenerateResponse:
        if after is not None:
            await after.wait()
        out = inference_pb2.GenerateResponse(request_id=req.request_id)
        stream = cast(AsyncGenerator[Chunk, None], self.forwarder.stream(req, deadline.remaining(), call.who,
                                                                          call.session))
        try:
            async with contextlib.aclosing(stream):
                async for chunk, _ in stream:
                    if started is not None:
                        started.set()
                    if chunks is not None:
                        chunks.put_nowait((index, chunk))
                    out.text += chunk.text
                    out.token_ids.extend(chunk.token_ids)
                    out.logprobs.extend(chunk.logprobs)
                    out.prompt_token_ids.extend(chunk.prompt_token_ids)  # (the first chunk's)
                    out.prompt_logprobs.extend(chunk.prompt_logprobs)
                    if chunk.finish_reason:
                        out.finish_reason, out.model, out.replica_id = chunk.finish_reason, chunk.model, chunk.replica_id
                        out.usage.CopyFrom(chunk.usage)
        finally:
            if started is not None:
                started.set()  # the others go on even if this one failed (and say why themselves)
        return out

    async def _streams(self, call: _Call, deadline: _Deadline, reqs: list[inference_pb2.GenerateRequest],
                       opts: openai_api.Options, created: int,
                       rid: str) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Several choices' chunks as they come, each with its index; the usage of all at the end."""
        encoders = [openai_api.StreamEncoder(replace(opts, include_usage=False), rid, created, i)
                    for i in range(len(reqs))]
        chunks: asyncio.Queue[tuple[int, inference_pb2.GenerateChunk]] = asyncio.Queue()
        runs = [asyncio.ensure_future(c) for c in self._choices(call, deadline, reqs, opts.n, chunks)]
        ended = asyncio.ensure_future(asyncio.gather(*runs))
        getter: asyncio.Future[tuple[int, inference_pb2.GenerateChunk]] | None = None
        try:
            start = [e for enc in encoders for e in enc.start()]
            while not ended.done() or not chunks.empty():
                getter = asyncio.ensure_future(chunks.get())
                await asyncio.wait([getter, cast(asyncio.Future[Any], ended)], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue  # all ended (a failure is raised below, after what came before it)
                index, chunk = getter.result()
                # nothing is sent before the first chunk: a refusal before it is a plain HTTP error
                yield [*start, *encoders[index].chunk(chunk)]
                start = []
            replies = ended.result()
            if any(enc.usage is None for enc in encoders):
                raise MaasError("a choice's stream ended before its last chunk")
            if opts.include_usage:
                total = openai_api.total_usage([r.usage for r in replies], opts.n)
                yield [{**encoders[0].head, "choices": [], "usage": openai_api.usage(total)}]
        finally:
            pending: list[asyncio.Future[Any]] = [*runs, ended, *([getter] if getter is not None else [])]
            for run in pending:
                run.cancel()

    async def _stream(self, call: _Call, deadline: _Deadline, req: inference_pb2.GenerateRequest,
                      opts: openai_api.Options, created: int) -> AsyncGenerator[list[dict[str, Any]], None]:
        encoder = openai_api.StreamEncoder(opts, req.request_id, created)
        stream = cast(AsyncGenerator[Chunk, None],  # an async generator function
                      self.forwarder.stream(req, deadline.remaining(), call.who, call.session))
        async with contextlib.aclosing(stream):
            chunk = await _next(stream)
            yield [*encoder.start(), *(encoder.chunk(chunk) if chunk is not None else [])]
            while chunk is not None and not chunk.finish_reason:
                chunk = await _next(stream)
                if chunk is not None:
                    yield encoder.chunk(chunk)
            if encoder.usage is None:
                raise MaasError("the stream ended before its last chunk")
            yield encoder.end()

    async def _events(self, request: web.Request, deadline: _Deadline, rid: str,
                      events: AsyncGenerator[list[dict[str, Any]], None],
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
        """Server-sent events, a list of them per step of `events`. Errors before the first
        step are ordinary HTTP errors (no replica, a bad request, a failing pipeline step);
        after it, an `{"error": ...}` event ends the stream. Leaving this function any way
        (a write to a closed connection, cancellation, the deadline) closes `events`, which
        cancels the downstream call."""
        async with contextlib.aclosing(events):
            async with deadline.bound():
                first = await anext(events)
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                "x-request-id": rid, **(headers or {})})
            await response.prepare(request)
            try:
                async with deadline.bound():
                    await self._send(response, first)
                    async for step in events:
                        await self._send(response, step)
                    await response.write(b"data: [DONE]\n\n")
            except ConnectionError:
                log.info("client went away mid-stream; request cancelled")
                return response
            except Exception as e:
                _, body, _ = _error(e)
                with contextlib.suppress(ConnectionError):
                    await response.write(f"data: {_dumps(body)}\n\n".encode())
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response

    @staticmethod
    async def _send(response: web.StreamResponse, events: list[dict[str, Any]]) -> None:
        if events:
            await response.write("".join(f"data: {_dumps(e)}\n\n" for e in events).encode())

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(openai_api.model_list(self.forwarder.models(_api_key(request))), dumps=_dumps)

    async def get_model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        for m in self.forwarder.models(_api_key(request)).models:
            if m.name == name:
                return web.json_response(openai_api.model_object(m), dumps=_dumps)
        raise NotFound(f"model {name!r} is not one this key may use (GET /v1/models lists those)", field="model")

    # ---- tokenizers: POST /tokenize, /detokenize (router/tokenize.py) ---------------------------

    def _tokenization(self) -> Tokenization:
        if self.tokenization is None:
            raise NotFound("this router does not serve tokenizers", field="path")
        return self.tokenization

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)
        call = _call(request, self.strict_fields)
        req = tokenize_request(await self._body(request), call.ignored)
        req.request_id = request_id_var.get()
        async with deadline.bound():
            reply = await self._tokenization().tokenize(req, deadline.remaining(), call.who)
        return await self._reply(request, deadline, tokenize_reply(reply, req.return_token_strs), call)

    async def detokenize(self, request: web.Request) -> web.StreamResponse:
        deadline = self._deadline(request)
        call = _call(request, self.strict_fields)
        req = detokenize_request(await self._body(request), call.ignored)
        req.request_id = request_id_var.get()
        async with deadline.bound():
            reply = await self._tokenization().detokenize(req, deadline.remaining(), call.who)
        return await self._reply(request, deadline, detokenize_reply(reply), call)

    # ---- files and batches (docs/batches.md) ---------------------------------------------------

    def _batches(self, request: web.Request) -> tuple[BatchService, Principal | None]:
        """The batch service and the caller: a tenant's principal, the admin's, or None on an
        --insecure mesh (which acts for the platform)."""
        if self.batches is None:
            raise NotFound("this router does not serve files and batches", field="path")
        gate = self.forwarder.gate
        return self.batches, gate.identify(_api_key(request)) if gate is not None else None

    async def create_file(self, request: web.Request) -> web.StreamResponse:
        service, who = self._batches(request)
        if not request.content_type.startswith("multipart/"):
            raise HttpError(400, "upload a file as multipart/form-data with fields \"file\" and \"purpose\"",
                            code="invalid_request")
        async with service.uploading():
            purpose, filename = "", ""
            with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
                size = 0
                reader = await request.multipart()
                while (part := await reader.next()) is not None:
                    if not isinstance(part, BodyPartReader):
                        continue
                    if part.name == "purpose":
                        raw = await part.read_chunk(256)
                        if await part.read_chunk(1):
                            raise InvalidArgument("purpose is too long", field="purpose")
                        purpose = raw.decode("utf-8", "replace").strip()
                    elif part.name == "file":
                        filename = part.filename or "upload"
                        while chunk := await part.read_chunk(1024 * 1024):
                            size += len(chunk)
                            if size > MAX_FILE_BYTES:
                                raise HttpError(413, f"the file is larger than {MAX_FILE_BYTES // (1024 * 1024)} "
                                                     "MiB", code="file_too_large")
                            await asyncio.to_thread(spool.write, chunk)
                    else:
                        await part.release()  # a field OpenAI's API does not have: skipped
                if not filename:
                    raise InvalidArgument("the upload has no \"file\" field", field="file")
                if not purpose:
                    raise InvalidArgument("the upload has no \"purpose\" field (use \"batch\" for batch input)",
                                          field="purpose")
                await asyncio.to_thread(spool.seek, 0)
                record = await service.upload(acting(who), spool, purpose, filename)
        return web.json_response(file_object(record), dumps=_dumps)

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        service, who = self._batches(request)
        files = await service.list_files(acting(who), request.query.get("purpose", ""))
        return web.json_response({"object": "list", "data": [file_object(f) for f in files], "has_more": False},
                                 dumps=_dumps)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        service, who = self._batches(request)
        return web.json_response(file_object(await service.get_file(acting(who), request.match_info["file_id"])),
                                 dumps=_dumps)

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        service, who = self._batches(request)
        record = await service.delete_file(acting(who), request.match_info["file_id"])
        return web.json_response({"id": record.id, "object": "file", "deleted": True}, dumps=_dumps)

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        service, who = self._batches(request)
        chunks = service.file_chunks(acting(who), request.match_info["file_id"])
        async with contextlib.aclosing(chunks):
            first = await anext(chunks)  # errors (not found) before the headers
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                                   "Content-Length": str(first.total_bytes)})
            await response.prepare(request)
            await response.write(first.data)
            async for chunk in chunks:
                await response.write(chunk.data)
            await response.write_eof()
        return response

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        service, creator = self._batches(request)  # the lines run as its key
        body = openai_api.checked(await self._body(request), openai_api.BATCH_FIELDS)
        metadata = body.get("metadata") or {}
        if not all(isinstance(v, str) for v in metadata.values()):
            raise InvalidArgument("metadata values must be strings", field="metadata")
        batch = await service.create(creator, batches_pb2.CreateBatchRequest(
            input_file_id=body["input_file_id"], endpoint=body["endpoint"],
            completion_window=body.get("completion_window") or "", metadata=metadata))
        return web.json_response(batch_object(batch), dumps=_dumps)

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        service, who = self._batches(request)
        raw = request.query.get("limit", "20")
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 100):
            raise InvalidArgument(f"limit must be a number from 1 to 100, not {raw[:20]!r}", field="limit")
        batches, more = await service.list(acting(who), int(raw), request.query.get("after", ""))
        data = [batch_object(b) for b in batches]
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None, "has_more": more}, dumps=_dumps)

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        service, who = self._batches(request)
        return web.json_response(batch_object(await service.get(acting(who), request.match_info["batch_id"])),
                                 dumps=_dumps)

    async def cancel_batch(self, request: web.Request) -> web.StreamResponse:
        service, who = self._batches(request)
        return web.json_response(batch_object(await service.cancel(acting(who), request.match_info["batch_id"])),
                                 dumps=_dumps)

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(openapi.document(), dumps=_dumps)

    async def version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": __version__})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """The router's Prometheus metrics on the API port, for the admin's key only: their
        labels name every tenant."""
        gate = self.forwarder.gate
        if gate is not None:
            who = gate.identify(_api_key(request))
            if who is not None and not who.is_admin:
                raise PermissionDenied("the metrics name every tenant: only the admin's key reads them here "
                                       "(or scrape the router's --metrics-port)")
        body = await asyncio.to_thread(generate_latest)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

