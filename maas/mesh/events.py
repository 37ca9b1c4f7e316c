"""NATS: JetStream lifecycle events and core-NATS load telemetry.

Lifecycle events go to the stream MAAS_EVENTS on `maas.events.<mesh>.<entity>.<what>`.
Each is an `Event` protobuf whose id is also the Nats-Msg-Id header, so retrying a publish
after a reconnect is deduplicated by the server. Publishing never blocks a service: events
go into a bounded outbox that a background task drains, retrying with the same id while
NATS is away. Load reports are core NATS on `maas.load.<mesh>.<worker>`, prefix-cache
reports on `maas.kv.<mesh>.<worker>`, and routers' reports on deployed pipelines on
`maas.pipeline.<mesh>.<router>`: lossy by design.

`<mesh>` is the mesh's etcd prefix as one subject token (`mesh_token`: "maas" for
"/maas/"), in every subject the mesh publishes or reads (usage records, captures and batch
answers too), so meshes sharing a NATS server never see each other's events or reports.
The streams' subject filters ("maas.events.>", ...) cover every mesh: one stream holds all
of them, and each reader filters by its own mesh's subjects. A stream made by a version
without `<mesh>` matches the new subjects as it is, so nothing is migrated; what was stored
on the old subjects is no longer read and ages out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import nats.errors
import nats.js.api as js_api
import nats.js.errors
from nats.aio.msg import Msg

from maas.mesh.authz import ANONYMOUS, caller
from maas.mesh.config import MeshConfig, redact
from maas.mesh.errors import StartupError, Unavailable
from maas.mesh.logs import request_id_var
from maas.v1 import events_pb2, mesh_pb2

log = logging.getLogger(__name__)

STREAM = "MAAS_EVENTS"
EVENT_SUBJECTS = "maas.events.>"
LOAD_SUBJECT = "maas.load"
KV_SUBJECT = "maas.kv"  # workers' prefix-cache reports (mesh_pb2.KvEvents, maas/mesh/kvblocks.py)
PIPELINE_SUBJECT = "maas.pipeline"  # routers' reports on deployed pipelines (mesh_pb2.PipelineReport)


def subject_token(text: str) -> str:
    """`text` as one subject token: letters, digits, '_' and '-' stay; anything else (a '.',
    which would split the token, or a wildcard) becomes ~xx per UTF-8 byte; "" is "~" (never
    an escape)."""
    if not text:
        return "~"
    out = []
    for ch in text:
        if ch.isascii() and (ch.isalnum() or ch in "_-"):
            out.append(ch)
        else:
            out.extend(f"~{b:02x}" for b in ch.encode())
    return "".join(out)


def mesh_token(prefix: str) -> str:
    """The token that names the mesh under etcd `prefix` in its subjects."""
    return subject_token(prefix.strip("/"))


def event_subject(prefix: str, entity: str = "*", what: str = "*") -> str:
    """Where the mesh under etcd `prefix` stores `entity`.`what` events ("*": any entity, any
    what; both are the code's own names, single tokens)."""
    return f"maas.events.{mesh_token(prefix)}.{entity}.{what}"


def report_subject(kind: str, prefix: str, sender: str | None = None) -> str:
    """Where `sender` (a worker's or router's instance id; None: every one) of the mesh under
    etcd `prefix` publishes its reports of `kind` (LOAD_SUBJECT, KV_SUBJECT or
    PIPELINE_SUBJECT)."""
    return f"{kind}.{mesh_token(prefix)}.{'*' if sender is None else subject_token(sender)}"


def legacy_report_subject(kind: str) -> str:
    """Reports of workers and routers of a version before subjects named the mesh
    (`maas.load.<worker>`): read too, for one release, so that during a rolling upgrade the
    new scheduler still sees the old workers' load (an autoscaled deployment served only by
    them would look idle and be scaled down) and canaries the old routers' reports. The
    wildcard matches exactly one token after the kind, so none of the new subjects, and no
    report is counted twice; other meshes' old processes are seen as before the change
    until they are upgraded too. To be removed once no mesh runs a version before it."""
    return f"{kind}.*"


async def connect_nats(url: str, *, name: str, timeout: float) -> nats.NATS:
    """Connect, or raise StartupError naming the URL within `timeout` seconds (or naming a
    bad MAAS_STREAM_REPLICAS, which the streams made later would use)."""
    stream_replicas()
    try:
        return await asyncio.wait_for(
            nats.connect(url, name=name, connect_timeout=min(2.0, timeout), max_reconnect_attempts=-1,
                         reconnect_time_wait=0.5, allow_reconnect=True,
                         error_cb=_quiet_error, disconnected_cb=None),
            timeout)
    except (TimeoutError, OSError, nats.errors.Error) as e:
        raise StartupError(f"cannot reach NATS at {redact(url)} ({type(e).__name__}); start nats-server -js "
                           "or pass --nats / MAAS_NATS") from None


async def _quiet_error(e: Exception) -> None:
    log.debug("nats: %s", e)


async def open_stream(nc: nats.NATS, ensure: Callable[[nats.js.JetStreamContext], Awaitable[None]], url: str,
                      problem: str) -> nats.js.JetStreamContext:
    """JetStream on `nc` with a stream made sure of by `ensure`, or StartupError saying NATS at
    `url` `problem`."""
    js = nc.jetstream(timeout=5)
    try:
        await ensure(js)
    except Exception as e:
        raise StartupError(f"NATS at {redact(url)} {problem} ({e}); run nats-server with -js") from None
    return js


def stream_replicas() -> int | None:
    """How many servers of a NATS cluster hold each of the mesh's streams: MAAS_STREAM_REPLICAS
    (1 to 5, JetStream's limit), or None for the server's default (one). On a cluster, 3
    keeps every stream through the loss of one server."""
    raw = os.environ.get("MAAS_STREAM_REPLICAS", "").strip()
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 5:
        raise StartupError(f"MAAS_STREAM_REPLICAS must be a whole number from 1 to 5, not {raw!r}")
    return int(raw)


async def put_stream(js: nats.js.JetStreamContext, config: js_api.StreamConfig) -> None:
    """Create the stream `config` describes, or bring the existing one to it (with
    `stream_replicas()` copies when MAAS_STREAM_REPLICAS sets it)."""
    replicas = stream_replicas()
    if replicas is not None:
        config = dataclasses.replace(config, num_replicas=replicas)
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)


class OwnStream:
    """A JetStream stream over the runtime's NATS connection (`EventBus.nc`), made or brought
    to `config` on first use: `js()` is its context, or Unavailable naming `what` while the
    runtime is not connected."""

    def __init__(self, events: EventBus, config: js_api.StreamConfig, what: str) -> None:
        self.events, self.config, self.what = events, config, what
        self._ready = False

    async def js(self) -> nats.js.JetStreamContext:
        if self.events.nc is None:
            raise Unavailable(f"not connected to NATS: {self.what}")
        js = self.events.nc.jetstream(timeout=5)
        if not self._ready:
            await put_stream(js, self.config)
            self._ready = True
        return js


async def stored(js: nats.js.JetStreamContext, stream: str, subject: str, *,
                 follow: bool = False) -> AsyncIterator[Msg]:
    """Every message `stream` holds on `subject`, in order; with `follow`, then new ones as
    they come."""
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        return
    remaining = sum((info.state.subjects or {}).values())
    if not remaining and not follow:
        return
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.ALL)
    try:
        while follow or remaining > 0:
            try:
                msg = await sub.next_msg(timeout=None if follow else 2.0)
            except nats.errors.TimeoutError:
                break
            remaining = msg.metadata.num_pending if msg.metadata else remaining - 1
            yield msg
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def ensure_stream(js: nats.js.JetStreamContext) -> None:
    await put_stream(js, js_api.StreamConfig(
        name=STREAM, subjects=[EVENT_SUBJECTS], duplicate_window=120.0,
        max_age=7 * 24 * 3600.0, max_bytes=256 * 1024 * 1024, storage=js_api.StorageType.FILE))


def _principal() -> str:
    """The audit name of the caller whose request this event records ("" outside one)."""
    who = caller()
    return "" if who is ANONYMOUS else who.audit()


class EventBus:
    """Publishes lifecycle events and load reports for one process."""

    def __init__(self, config: MeshConfig, *, outbox_size: int = 10_000) -> None:
        self.config = config
        self.source = f"{config.kind}/{config.instance}"
        self.nc: nats.NATS | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, str]] = asyncio.Queue(outbox_size)
        self._sender: asyncio.Task[None] | None = None
        self._subs: list[object] = []
        self._closed = False

    async def start(self) -> None:
        self.nc = await connect_nats(self.config.nats, name=self.source, timeout=self.config.startup_timeout)
        js = await open_stream(self.nc, ensure_stream, self.config.nats, "has no usable JetStream")
        self._sender = asyncio.create_task(self._send_loop(js), name="event-outbox")

    def publish(self, entity: str, what: str, entity_id: str, message: str = "", **attributes: str) -> None:
        """Queue a lifecycle event; returns at once. Drops (and logs) only if the outbox is full."""
        event = events_pb2.Event(
            id=uuid.uuid4().hex, entity=entity, what=what, entity_id=entity_id, source=self.source,
            time_ms=int(time.time() * 1000), message=message,
            attributes={k: str(v) for k, v in attributes.items()}, request_id=request_id_var.get("-"),
            principal=_principal())
        log.info("event %s.%s %s %s%s", entity, what, entity_id, message,
                 f" (by {event.principal})" if event.principal else "")
        try:
            self._outbox.put_nowait((event_subject(self.config.prefix, entity, what), event.SerializeToString(),
                                     event.id))
        except asyncio.QueueFull:
            log.error("event outbox full; dropping %s.%s %s", entity, what, entity_id)

    async def _send_loop(self, js: nats.js.JetStreamContext) -> None:
        while True:
            subject, data, msg_id = await self._outbox.get()
            delay = 0.1
            while True:
                try:
                    await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    log.debug("event publish failed (%s); retrying", type(e).__name__)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    if isinstance(e, nats.errors.NoRespondersError | nats.js.errors.NotFoundError):
                        with contextlib.suppress(Exception):  # the stream was deleted: create it again
                            await ensure_stream(js)
            self._outbox.task_done()

    async def publish_load(self, report: mesh_pb2.LoadReport) -> None:
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.publish(report_subject(LOAD_SUBJECT, self.config.prefix, report.worker_id),
                                      report.SerializeToString())

    async def publish_kv(self, report: mesh_pb2.KvEvents) -> None:
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.publish(report_subject(KV_SUBJECT, self.config.prefix, report.worker_id),
                                      report.SerializeToString())

    async def subscribe_kv(self, callback: Callable[[mesh_pb2.KvEvents], None]) -> None:
        assert self.nc is not None

        async def handler(msg: Msg) -> None:
            report = mesh_pb2.KvEvents()
            try:
                report.ParseFromString(msg.data)
            except Exception:
                log.warning("a KV event report could not be read")
                return
            callback(report)

        subject = report_subject(KV_SUBJECT, self.config.prefix)
        self._subs.append(await self.nc.subscribe(subject, cb=handler))
        self._subs.append(await self.nc.subscribe(legacy_report_subject(KV_SUBJECT), cb=handler))

    async def publish_pipeline(self, report: mesh_pb2.PipelineReport) -> None:
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.publish(report_subject(PIPELINE_SUBJECT, self.config.prefix, report.router),
                                      report.SerializeToString())

    async def subscribe_pipeline(self, callback: Callable[[mesh_pb2.PipelineReport], None]) -> None:
        assert self.nc is not None

        async def handler(msg: Msg) -> None:
            report = mesh_pb2.PipelineReport()
            try:
                report.ParseFromString(msg.data)
                callback(report)
            except Exception:
                log.exception("a pipeline report could not be read")

        subject = report_subject(PIPELINE_SUBJECT, self.config.prefix)
        self._subs.append(await self.nc.subscribe(subject, cb=handler))
        self._subs.append(await self.nc.subscribe(legacy_report_subject(PIPELINE_SUBJECT), cb=handler))

    async def subscribe_load(self, callback: Callable[[mesh_pb2.LoadReport], Awaitable[None] | None]) -> None:
        assert self.nc is not None

        async def handler(msg: Msg) -> None:
            report = mesh_pb2.LoadReport()
            with contextlib.suppress(Exception):
                report.ParseFromString(msg.data)
                result = callback(report)
                if asyncio.iscoroutine(result):
                    await result

        subject = report_subject(LOAD_SUBJECT, self.config.prefix)
        self._subs.append(await self.nc.subscribe(subject, cb=handler))
        self._subs.append(await self.nc.subscribe(legacy_report_subject(LOAD_SUBJECT), cb=handler))

    async def close(self, *, flush_timeout: float = 3.0) -> None:
        """Flush queued events (bounded), then drain the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._outbox.join(), flush_timeout)
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), flush_timeout)


async def read_events(url: str, prefix: str, *, follow: bool, entity: str = "*", what: str = "*",
                      timeout: float = 5.0) -> AsyncIterator[events_pb2.Event]:
    """Every stored `entity`.`what` event ("*": any) of the mesh under etcd `prefix`, in
    order; with follow, keep yielding new ones."""
    nc = await connect_nats(url, name="maas-events", timeout=timeout)
    try:
        js = nc.jetstream(timeout=5)
        await ensure_stream(js)
        async for msg in stored(js, STREAM, event_subject(prefix, entity, what), follow=follow):
            event = events_pb2.Event()
            event.ParseFromString(msg.data)
            yield event
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
