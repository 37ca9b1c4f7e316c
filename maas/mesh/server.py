"""The gRPC server bootstrap every service uses.

`ServiceRuntime` owns a process's mesh membership: its etcd session, event bus, gRPC
server (health, reflection, the interceptor that authorizes every call and maps errors)
and Prometheus endpoint. Services add their servicers and hooks and call `run()`.

Shutdown order (STYLE.md): signal -> health NOT_SERVING -> revoke the lease (the process
disappears from etcd, so routers stop sending) -> server.stop(grace) (in-flight requests
finish) -> NATS drain (queued events flushed) -> engine stop (the service's closers).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from prometheus_client.exposition import ThreadingWSGIServer

from maas import __version__
from maas.mesh import tracing
from maas.mesh.authz import Authorizer, acting_as, restore
from maas.mesh.config import MeshConfig
from maas.mesh.errors import FIELD_METADATA, InvalidArgument, MaasError, StartupError
from maas.mesh.etcd import EtcdError, EtcdSession
from maas.mesh.events import EventBus
from maas.mesh.logs import new_request_id, request_id_var
from maas.mesh.tls import TlsFiles
from maas.v1 import mesh_pb2

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # raised deliberately: embeddings and artifact chunks
GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not be shared
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

HANDLED = prometheus_client.Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_code"])
LATENCY = prometheus_client.Histogram(
    "grpc_server_handling_seconds", "Time to complete an RPC on the server.",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)[:64]
    return new_request_id()


class Malformed:
    """What a request that does not parse deserializes to; the handler wrapper turns it into
    INVALID_ARGUMENT (gRPC itself would answer INTERNAL or UNKNOWN)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:
            return Malformed(str(e) or type(e).__name__)
    return parse


def _check_parsed(request: Any, method: str) -> None:
    if type(request) is Malformed:
        raise InvalidArgument(f"the request is not a valid message for {method}: {request.error}")


async def _parsed_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        _check_parsed(request, method)
        yield request


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place every call passes: authenticates and authorizes it (`Authorizer`, the
    caller then in `authz.caller()`), answers a request that does not parse with
    INVALID_ARGUMENT, maps MaasError to its status code, hides unexpected errors behind
    INTERNAL, sets the request id for logging and records per-method metrics."""

    def __init__(self, authorizer: Authorizer | None = None) -> None:
        self.authorizer = authorizer

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        path = details.method
        service, _, method = path.lstrip("/").rpartition("/")
        deserialize = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, method, path, streamed=False),
                deserialize, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, method, path, streamed=False),
                deserialize, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, service, method, path, streamed=True),
                deserialize, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, service, method, path, streamed=True),
            deserialize, handler.response_serializer)

    async def _admit(self, request: Any, context: grpc.aio.ServicerContext, path: str,
                     streamed: bool) -> tuple[Any, contextvars.Token[Any] | None]:
        """(the request to hand on, the caller's context token). Raises MaasError."""
        token = None
        if self.authorizer is not None:
            token = acting_as(await self.authorizer.check(path, context.invocation_metadata()))
        if streamed:
            return _parsed_stream(request, path), token
        _check_parsed(request, path)
        return request, token

    @staticmethod
    async def _fail(context: grpc.aio.ServicerContext, e: BaseException) -> str:
        if isinstance(e, MaasError):
            trailers = []
            if (retry_after := getattr(e, "retry_after", None)) is not None:
                trailers.append(("retry-after", str(max(1, math.ceil(retry_after)))))
            if e.field:
                trailers.append((FIELD_METADATA, e.field))  # from_rpc_error restores it one hop on
            if trailers:
                context.set_trailing_metadata(tuple(trailers))
            await context.abort(e.code, e.message)
        if isinstance(e, NotImplementedError):  # a servicer method left to its generated base
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented by this server")
        if isinstance(e, EtcdError):
            log.warning("etcd call failed: %s", e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the mesh's etcd is unavailable; retry shortly")
        log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()})")
        return "INTERNAL"  # not reached: abort raises

    def _wrap_unary(self, behavior: Callable[..., Any], service: str, method: str, path: str,
                    streamed: bool) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = request_id_var.set(_request_id(context))
            start, code = time.perf_counter(), "OK"
            caller = None
            span = _span(context, service, method, path)
            active = tracing.activate(span)
            try:
                request, caller = await self._admit(request, context, path, streamed)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except Exception as e:
                code = _status_name(e)
                await self._fail(context, e)
            finally:
                HANDLED.labels(service, method, code).inc()
                LATENCY.labels(service, method).observe(time.perf_counter() - start)
                tracing.end(span, code)
                tracing.deactivate(active)
                if caller is not None:
                    restore(caller)
                request_id_var.reset(token)
        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any], service: str, method: str, path: str,
                     streamed: bool) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = request_id_var.set(_request_id(context))
            start, code = time.perf_counter(), "OK"
            caller = None
            result = None
            span = _span(context, service, method, path)
            active = tracing.activate(span)
            try:
                request, caller = await self._admit(request, context, path, streamed)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except Exception as e:
                code = _status_name(e)
                await self._fail(context, e)
            finally:
                if inspect.isasyncgen(result):
                    # closed now, not whenever the collector gets to it: its own cleanup
                    # (the router cancelling its call to a worker, say) must not wait
                    with contextlib.suppress(Exception):
                        await result.aclose()
                HANDLED.labels(service, method, code).inc()
                LATENCY.labels(service, method).observe(time.perf_counter() - start)
                tracing.end(span, code)
                tracing.deactivate(active)
                # a stream closed from elsewhere (grpc finalizing it in another task) runs
                # this in another context, where the tokens cannot be reset, nor need to be
                with contextlib.suppress(ValueError):
                    if caller is not None:
                        restore(caller)
                with contextlib.suppress(ValueError):
                    request_id_var.reset(token)
        return wrapped


def _span(context: grpc.aio.ServicerContext, service: str, method: str, path: str) -> Any:
    """The call's SERVER span, a child of the caller's trace context if it sent one (none for
    health checks and reflection)."""
    if service.startswith("grpc."):
        return trace.INVALID_SPAN
    return tracing.server_span(path.lstrip("/"), tracing.extract(context.invocation_metadata()),
                               **{"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                                  "maas.request_id": request_id_var.get()})


def _status_name(e: BaseException) -> str:
    if isinstance(e, MaasError):
        return e.code.name
    if isinstance(e, NotImplementedError):
        return "UNIMPLEMENTED"
    return "UNAVAILABLE" if isinstance(e, EtcdError) else "INTERNAL"


def _code_name(context: grpc.aio.ServicerContext) -> str:
    with contextlib.suppress(Exception):
        code = context.code()
        if code is not None:
            return code.name if hasattr(code, "name") else str(code)
    return "UNKNOWN"


def bind_port(server: grpc.aio.Server, host: str, port: int, tls: TlsFiles | None = None) -> int:
    """Listen on host:port, over TLS when `tls` has a certificate; the port bound."""
    try:
        if tls is not None and tls.serves:
            bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials())
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StartupError(f"cannot listen on {host}:{port}: the port is already in use or the address is invalid")
    return bound


Gauges = Callable[[], dict[tuple[str, ...], float]]


class _MeshCollector(prometheus_client.registry.Collector):
    """Gauges every running service reports at scrape time: whether it reaches etcd and
    NATS (`maas_etcd_up`, `maas_nats_up`, what the "unreachable" alerts watch), and any
    a service adds (`ServiceRuntime.gauge`). One per process, over its runtimes (tests run
    several in one process)."""

    def __init__(self) -> None:
        self.runtimes: list[ServiceRuntime] = []

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        up = {"maas_etcd_up": GaugeMetricFamily("maas_etcd_up", "1 while this service's etcd lease keepalive succeeds",
                                                labels=["service", "service_instance"]),
              "maas_nats_up": GaugeMetricFamily("maas_nats_up", "1 while this service is connected to NATS",
                                                labels=["service", "service_instance"])}
        extra: dict[str, GaugeMetricFamily] = {}
        for rt in list(self.runtimes):
            who = [rt.config.kind, rt.config.instance]
            up["maas_etcd_up"].add_metric(who, 1.0 if rt.etcd.reachable else 0.0)
            nc = getattr(rt.events, "nc", None)
            up["maas_nats_up"].add_metric(who, 1.0 if nc is not None and nc.is_connected else 0.0)
            for name, (doc, labels, values) in list(rt.gauges.items()):
                family = extra.setdefault(name, GaugeMetricFamily(name, doc, labels=["service_instance", *labels]))
                try:  # (read from the metrics server's thread while the event loop changes it)
                    figures = values()
                except RuntimeError:  # a dict changed size mid-read: the next scrape has it
                    continue
                for key, value in figures.items():
                    family.add_metric([rt.config.instance, *key], value)
        yield from up.values()
        yield from extra.values()


MESH_COLLECTOR = _MeshCollector()
prometheus_client.REGISTRY.register(MESH_COLLECTOR)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass


HealthCheck = Callable[[], tuple[bool, str]]


def start_metrics(host: str, port: int, health: HealthCheck | None = None) -> str:
    """Serve this process's metrics on `port` (0: any free one), always in Prometheus' text
    format: prometheus_client's OpenMetrics output (which Prometheus asks for first) turns
    the colons of sample names into underscores, and vLLM's names (`vllm:...`, engines/
    metrics.py) would arrive as `vllm_...`. Prometheus reads the text format as well.

    With `health`, the same port answers `GET /healthz`: 200 and the gRPC health status
    when `health()` says serving, else 503 (Kubernetes' probes; see `GrpcHealthProbe`)."""
    if port < 0:
        return ""
    app = prometheus_client.make_wsgi_app()

    def text_only(environ: dict[str, Any], start_response: Any) -> Any:
        if health is not None and environ.get("PATH_INFO") == "/healthz":
            ok, status = health()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")])
            return [f"{status}\n".encode()]
        return app({**environ, "HTTP_ACCEPT": "text/plain"}, start_response)

    try:
        server = make_server(host, port, text_only, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return f"{host}:{server.server_port}"


def _tls_name(cert_pem: bytes) -> str:
    """A name the certificate is valid for (its first DNS name, a wildcard filled in; else its
    first IP address; else its common name): what a loopback client verifies it against."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_pem)
    with contextlib.suppress(x509.ExtensionNotFound):
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if dns := sans.get_values_for_type(x509.DNSName):
            return dns[0].replace("*", "healthz", 1)
        if ips := sans.get_values_for_type(x509.IPAddress):
            return str(ips[0])
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "localhost"


class GrpcHealthProbe:
    """Asks this process's own gRPC server for its health (`grpc.health.v1.Health/Check`,
    service ""), through its port over loopback as any client would, TLS included: the
    answer behind `/healthz` on the metrics port. Kubernetes' native `grpc` probes speak
    plaintext only, so they cannot check a port that serves TLS; an HTTP probe of
    `/healthz` can, and fails when the server does not answer within `timeout` (a stuck
    event loop) as well as when it reports NOT_SERVING (starting, or shutting down).
    Called from the metrics server's threads; the channel is made once."""

    def __init__(self, host: str, port: int, tls: TlsFiles, timeout: float = 2.0) -> None:
        if host in ("", "0.0.0.0", "localhost"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.tls = tls
        self.timeout = timeout
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._closed = False

    def _stub(self) -> health_pb2_grpc.HealthStub:
        with self._lock:
            if self._closed:
                raise RuntimeError("closed")
            if self._channel is None:
                if self.tls.serves:
                    roots = self.tls.ca + b"\n" + self.tls.cert if self.tls.ca else self.tls.cert
                    self._channel = grpc.secure_channel(
                        self.target, grpc.ssl_channel_credentials(root_certificates=roots),
                        options=[("grpc.ssl_target_name_override", _tls_name(self.tls.cert))])
                else:
                    self._channel = grpc.insecure_channel(self.target)
            return health_pb2_grpc.HealthStub(self._channel)

    def __call__(self) -> tuple[bool, str]:
        try:
            reply = self._stub().Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code()
            return False, code.name if code is not None else "UNKNOWN"
        except RuntimeError:
            return False, "STOPPED"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return reply.status == health_pb2.HealthCheckResponse.SERVING, status

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
                self._channel = None


class ServiceRuntime:
    """A service process's membership in the mesh. Use as `async with` or call start/stop."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.etcd = EtcdSession(config)
        self.events = EventBus(config)
        self.authorizer = Authorizer(self.etcd, config.kind, enforce=not config.insecure)
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor(self.authorizer)], options=GRPC_OPTIONS)
        self.health = health.aio.HealthServicer()
        self.endpoint = ""
        self.metrics_endpoint = ""
        self.probe: GrpcHealthProbe | None = None
        self.info = mesh_pb2.ServiceInfo()
        self._service_names: list[str] = [reflection.SERVICE_NAME, health.SERVICE_NAME]
        self._before_stop: list[Callable[[], Awaitable[None]]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.gauges: dict[str, tuple[str, list[str], Gauges]] = {}  # read at scrape time (`gauge`)
        self._stop_requested = asyncio.Event()
        self._stopped = False
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def add_service(self, descriptor_name: str, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> None:
        add_fn(servicer, self.server)
        self._service_names.append(descriptor_name)

    def before_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Runs right after health goes NOT_SERVING, before the lease is revoked."""
        self._before_stop.append(hook)

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Runs last, after the server stopped and NATS drained (engines, child processes)."""
        self._closers.append(closer)

    def gauge(self, name: str, doc: str, labels: list[str], values: Gauges) -> None:
        """A gauge this service reports, computed at scrape time: `values()` maps label values
        to the figure (a `service_instance` label naming the service comes first; not
        `instance`, which Prometheus gives the scrape target)."""
        self.gauges[name] = (doc, labels, values)

    async def start(self, **info: str) -> None:
        cfg = self.config
        MESH_COLLECTOR.runtimes.append(self)
        tracing.configure(cfg.kind, cfg.instance)  # exports spans if the OTEL_* variables ask
        port = bind_port(self.server, cfg.host, cfg.port, cfg.tls)
        self.endpoint = f"{cfg.dial_host}:{port}"
        self.probe = GrpcHealthProbe(cfg.host, port, cfg.tls)
        self.metrics_endpoint = start_metrics(cfg.host, cfg.metrics_port, self.probe)
        await self.etcd.start()
        await self.authorizer.start()
        if cfg.insecure:
            log.warning("%s %s runs with --insecure: every caller is trusted as the admin", cfg.kind, cfg.instance)
        await self.events.start()
        reflection.enable_server_reflection(self._service_names, self.server)
        await self.server.start()
        for name in self._service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.info = mesh_pb2.ServiceInfo(
            kind=cfg.kind, instance=cfg.instance, endpoint=self.endpoint, version=__version__,
            started_ms=int(time.time() * 1000), metrics_endpoint=self.metrics_endpoint, **info)
        await self.etcd.put_owned(self.etcd.keys.service(cfg.kind, cfg.instance), self.info.SerializeToString())
        self.events.publish("service", "started", f"{cfg.kind}/{cfg.instance}", f"{cfg.kind} serving on {self.endpoint}",
                            endpoint=self.endpoint)
        log.info("%s %s serving gRPC on %s (metrics %s)", cfg.kind, cfg.instance, self.endpoint,
                 self.metrics_endpoint or "off")

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def wait(self) -> None:
        """Block until SIGINT/SIGTERM or request_stop()."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop_requested.set)
        await self._stop_requested.wait()

    async def stop(self) -> None:
        """The graceful shutdown order; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        cfg = self.config
        with contextlib.suppress(ValueError):
            MESH_COLLECTOR.runtimes.remove(self)
        log.info("%s %s shutting down", cfg.kind, cfg.instance)
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        for hook in self._before_stop:
            try:
                await hook()
            except Exception:
                log.exception("before-stop hook failed")
        self.events.publish("service", "stopped", f"{cfg.kind}/{cfg.instance}", f"{cfg.kind} stopped")
        await self.etcd.close()
        await self.server.stop(cfg.grace)
        await self.authorizer.close()
        await self.events.close()
        if self.probe is not None:
            self.probe.close()
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception:
                log.exception("closer failed")

    async def __aenter__(self) -> ServiceRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run a service's async main; a StartupError prints one clear line and exits 1."""
    try:
        asyncio.run(main())
    except StartupError as e:
        logging.getLogger("maas").error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
