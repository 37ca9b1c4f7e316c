"""OpenTelemetry traces across the mesh.

Every gRPC call a service serves is a SERVER span (the interceptor in `maas.mesh.server`),
the router's HTTP API makes one per request, and a pipeline makes one per run and one per
step. The W3C `traceparent` (and `tracestate`) travels in gRPC metadata and HTTP headers,
so a client's trace continues through the router, a pipeline's steps and the workers.

Export is configured by the standard variables and is off unless they ask for it:
`OTEL_TRACES_EXPORTER=otlp` or an `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` turns it on,
`OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` picks `http/protobuf` (the default) or `grpc`,
`OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the process (default service name
`maas-<kind>`), `OTEL_TRACES_SAMPLER` samples and `OTEL_BSP_*` tune the batching. Without
an exporter no span is recorded, but a caller's `traceparent` is still passed on, so a
traced client's context survives a hop through an untraced service.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
from collections.abc import Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

TRACER = trace.get_tracer("maas")
CONTEXT_HEADERS = ("traceparent", "tracestate")
_configured = False


def configure(kind: str, instance: str) -> bool:
    """Install an exporting tracer provider if the OTEL_* variables ask for one (once per
    process); True if spans are exported."""
    global _configured
    if _configured:
        return True
    env = os.environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter == "none" or (not exporter and not endpoint):
        return False
    if exporter not in ("", "otlp", "console"):
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console or none); traces are not exported",
                    exporter)
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    attributes: dict[str, Any] = {"service.instance.id": instance, "service.namespace": "maas"}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = f"maas-{kind}"
    provider = TracerProvider(resource=Resource.create(attributes))
    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "http/protobuf").strip().lower()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
            span_exporter = GrpcExporter()
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
            span_exporter = HttpExporter()
        else:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported (http/protobuf or grpc); "
                        "traces are not exported", protocol)
            return False
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # what is batched goes out before the process ends
    _configured = True
    log.info("exporting traces (%s) as %s", exporter or "otlp",
             provider.resource.attributes.get("service.name"))
    return True


def extract(carrier: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The trace context a caller sent (gRPC metadata or HTTP headers)."""
    found = {}
    for key, value in carrier or ():
        name = key.lower()
        if name in CONTEXT_HEADERS:
            found[name] = value.decode("latin-1") if isinstance(value, bytes) else value
    return propagate.extract(found) if found else otel_context.Context()


def headers() -> tuple[tuple[str, str], ...]:
    """The current trace context as metadata for an outgoing call (empty without one)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def server_span(name: str, parent: otel_context.Context, **attributes: Any) -> trace.Span:
    return TRACER.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def activate(span: trace.Span, parent: otel_context.Context | None = None
             ) -> tuple[object, otel_context.Context, asyncio.Task[Any] | None]:
    """Make `span` current; returns what `deactivate` needs."""
    ctx = trace.set_span_in_context(span, parent)
    return otel_context.attach(ctx), ctx, _task()


def deactivate(state: tuple[object, otel_context.Context, asyncio.Task[Any] | None]) -> None:
    """Undo `activate`, where it can be undone: a stream finalized from another task (grpc
    closing a streaming handler) runs this in a copy of the context, where the span may
    look current but the token cannot be reset, and there is nothing to undo (OpenTelemetry
    would log "Failed to detach context" for it)."""
    token, ctx, task = state
    if _task() is task and otel_context.get_current() is ctx:
        otel_context.detach(token)  # type: ignore[arg-type]


def _task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


def end(span: trace.Span, code: str, message: str = "") -> None:
    """End `span` with a gRPC status name's outcome (OK or anything else)."""
    status = getattr(grpc.StatusCode, code, None)
    if status is not None:
        span.set_attribute("rpc.grpc.status_code", status.value[0])
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, message or code))
    span.end()


__all__ = ["TRACER", "activate", "configure", "deactivate", "end", "extract", "headers", "server_span"]
