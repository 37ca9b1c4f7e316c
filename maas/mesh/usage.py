"""Usage metering: one record per client request, durable in JetStream, aggregated on demand.

The router writes a `UsageRecord` when a client's request ends (success or error) — the
only place that sees the client's request once, whatever retries and stream migrations
happen behind it. Records go to the JetStream stream MAAS_USAGE (file storage, kept
`MAX_AGE`) on `maas.usage.<mesh>.<tenant>`, each published with its own id as the
Nats-Msg-Id, so a republish after a reconnect is dropped by the stream's duplicate window;
readers also skip an id they have already counted (a republish that came later than the
window). `<mesh>` is the mesh's etcd prefix: meshes sharing a NATS server never count each
other's requests.

Why JetStream and not etcd: etcd is a consistent store for small, slowly changing state, and
each put is a Raft round (a disk sync on a quorum). One write per request would put the
fleet's request rate on the control plane's critical store. Usage is an append-only log read
by time: a stream appends cheaply, replays from a point in time, expires by age and
deduplicates by message id.

Publishing never blocks or fails a request: `UsageMeter.record` queues a record in a bounded
outbox that a background task drains (batched, retried with the same ids while NATS is
away); a full outbox drops the record, logs it and counts it in
`maas_usage_records_dropped_total`. The meter has its own NATS connection, because the
runtime drains the event bus's connection before the router's last requests (those of its
HTTP API) have ended; the meter is closed after them and flushes what they recorded.

Reading (`query`): an ephemeral pull consumer starting at `since` (less `LATE_SECONDS`:
records reach the stream after their request ends, later still after a NATS outage), filtered
to one tenant's subject or the mesh's, read up to what was stored when the query began, and
aggregated by `Aggregator`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable

import nats
import nats.errors
import nats.js.api as js_api
import nats.js.errors
from prometheus_client import Counter

from maas.mesh.authz import Principal
from maas.mesh.config import MeshConfig
from maas.mesh.errors import InvalidArgument, PermissionDenied, Unavailable
from maas.mesh.events import connect_nats, mesh_token, open_stream, put_stream, subject_token
from maas.mesh.names import validate_name
from maas.v1 import usage_pb2

log = logging.getLogger(__name__)

STREAM = "MAAS_USAGE"
SUBJECTS = "maas.usage.>"
MAX_AGE = 400 * 24 * 3600.0       # a little over a year: last year's usage, month by month
DUPLICATE_WINDOW = 300.0          # seconds the stream remembers a record's id (a republish is dropped)
LATE_SECONDS = 15 * 60            # how late a record may reach the stream and still be read by time
DEDUP_HORIZON_MS = 3600 * 1000    # readers remember ids this long (stream time) to skip late republishes
OUTBOX = 100_000                  # records a router holds while NATS is away (about 40 MB)
BATCH = 256                       # records published concurrently by the outbox's drain
FETCH = 5000                      # records a reader pulls at a time

NO_TENANT = "-"                   # how the admin's and an --insecure mesh's requests show as a tenant
BY = ("tenant", "model", "key", "deployment", "day")

DROPPED = Counter("maas_usage_records_dropped_total",
                  "Usage records lost before reaching JetStream (outbox full, or unsent at shutdown).", ["reason"])
PUBLISHED = Counter("maas_usage_records_published_total", "Usage records stored in JetStream.")
RETRIED = Counter("maas_usage_publish_retries_total",
                  "Usage records whose publish failed (NATS away) and was sent again with the same id.")


# ---- subjects ------------------------------------------------------------------------------


def subject(prefix: str, tenant: str) -> str:
    """Where a record of `tenant` ("" for none) in the mesh under etcd `prefix` goes."""
    return f"maas.usage.{mesh_token(prefix)}.{subject_token(tenant)}"


def mesh_subjects(prefix: str) -> str:
    """Every tenant's records of one mesh."""
    return f"maas.usage.{mesh_token(prefix)}.*"


async def ensure_stream(js: nats.js.JetStreamContext) -> None:
    await put_stream(js, js_api.StreamConfig(
        name=STREAM, subjects=[SUBJECTS], duplicate_window=DUPLICATE_WINDOW, max_age=MAX_AGE,
        storage=js_api.StorageType.FILE, discard=js_api.DiscardPolicy.OLD))


# ---- writing -------------------------------------------------------------------------------


class UsageMeter:
    """A router's usage records on their way to JetStream."""

    def __init__(self, config: MeshConfig, *, outbox_size: int = OUTBOX) -> None:
        self.config = config
        self.prefix = config.prefix
        self.instance = config.instance
        self.nc: nats.NATS | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, str]] = asyncio.Queue(outbox_size)
        self._sender: asyncio.Task[None] | None = None
        self._closed = False
        self._last_drop_log = 0.0
        self._unlogged_drops = 0
        self.unstored = 0  # records queued and not yet stored in the stream
        self._subjects: dict[str, str] = {}  # tenant -> subject (tenants are keys' tenants: bounded)

    async def start(self) -> None:
        name = f"{self.config.kind}/{self.instance}/usage"
        self.nc = await connect_nats(self.config.nats, name=name, timeout=self.config.startup_timeout)
        js = await open_stream(self.nc, ensure_stream, self.config.nats, f"cannot hold the usage stream {STREAM}")
        self._sender = asyncio.create_task(self._send_loop(js), name="usage-outbox")

    def record(self, rec: usage_pb2.UsageRecord) -> None:
        """Queue one request's record (its id, time and router are filled in here); returns at
        once and never raises."""
        try:
            rec.id = msg_id = os.urandom(16).hex()
            rec.router = self.instance
            if not rec.time_ms:
                rec.time_ms = int(time.time() * 1000)
            subj = self._subjects.get(rec.tenant)
            if subj is None:
                subj = self._subjects[rec.tenant] = subject(self.prefix, rec.tenant)
            self._outbox.put_nowait((subj, rec.SerializeToString(), msg_id))
            self.unstored += 1
        except asyncio.QueueFull:
            self._dropped("outbox_full", 1)
        except Exception:  # a request must never fail for its meter
            log.exception("usage record not queued")
            self._dropped("error", 1)

    def _dropped(self, reason: str, n: int) -> None:
        DROPPED.labels(reason).inc(n)
        self._unlogged_drops += n
        now = time.monotonic()
        if now - self._last_drop_log >= 10.0:  # one line per 10 s, not one per request
            log.error("usage: %d record(s) dropped (%s); the outbox holds %d", self._unlogged_drops, reason,
                      self._outbox.qsize())
            self._last_drop_log, self._unlogged_drops = now, 0

    async def _send_loop(self, js: nats.js.JetStreamContext) -> None:
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            delay = 0.1
            while batch:
                results = await asyncio.gather(
                    *(js.publish(subj, data, headers={"Nats-Msg-Id": msg_id}) for subj, data, msg_id in batch),
                    return_exceptions=True)
                failed = [item for item, r in zip(batch, results, strict=True) if isinstance(r, BaseException)]
                stored = len(batch) - len(failed)
                PUBLISHED.inc(stored)
                self.unstored -= stored
                for _ in range(stored):
                    self._outbox.task_done()
                batch = failed
                if failed:
                    RETRIED.inc(len(failed))
                    errors = [r for r in results if isinstance(r, BaseException)]
                    log.debug("usage: %d publishes failed (%s); retrying", len(failed), type(errors[0]).__name__)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    if any(isinstance(e, nats.errors.NoRespondersError | nats.js.errors.NotFoundError)
                           for e in errors):
                        with contextlib.suppress(Exception):  # the stream was deleted: create it again
                            await ensure_stream(js)

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued record is stored (True), or `timeout` seconds."""
        try:
            await asyncio.wait_for(self._outbox.join(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, *, flush_timeout: float = 5.0) -> None:
        """Store what is queued (bounded by `flush_timeout`), then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            if not await self.flush(flush_timeout):
                self._dropped("shutdown", self.unstored)
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        elif self.unstored:
            self._dropped("shutdown", self.unstored)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), flush_timeout)


# ---- reading -------------------------------------------------------------------------------


def _day(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d")


def _add(totals: usage_pb2.UsageTotals, rec: usage_pb2.UsageRecord) -> None:
    totals.requests += 1
    totals.errors += rec.status != "OK"
    totals.prompt_tokens += rec.prompt_tokens
    totals.completion_tokens += rec.completion_tokens
    totals.partial_completion_tokens += rec.partial_completion_tokens


class Aggregator:
    """Sums records into rows grouped within each tenant by `by` ("" or "tenant", "model",
    "key", "deployment", "day"), counting each record id once and only records in
    [since_ms, until_ms) (until 0: no end) of `tenant` (None: every tenant)."""

    def __init__(self, by: str = "", *, tenant: str | None = None, since_ms: int = 0, until_ms: int = 0,
                 dedup_horizon_ms: int = DEDUP_HORIZON_MS) -> None:
        self.by = by or "tenant"
        if self.by not in BY:
            raise InvalidArgument(f"by {by!r} is not one of {', '.join(BY)}", field="by")
        self.tenant, self.since_ms, self.until_ms = tenant, since_ms, until_ms
        self.rows: dict[tuple[str, str, str], usage_pb2.UsageTotals] = {}
        self.duplicates = 0
        self.horizon = dedup_horizon_ms
        self._seen: set[str] = set()
        self._order: collections.deque[tuple[int, str]] = collections.deque()

    def _group(self, rec: usage_pb2.UsageRecord) -> tuple[str, str, str]:
        tenant = rec.tenant or NO_TENANT
        by = self.by
        if by == "model":
            return tenant, rec.model, rec.adapter
        if by == "key":
            return tenant, rec.key_id, ""
        if by == "deployment":
            return tenant, rec.deployment, ""
        if by == "day":
            return tenant, _day(rec.time_ms), ""
        return tenant, "", ""

    def add(self, rec: usage_pb2.UsageRecord, stored_ms: int | None = None) -> bool:
        """Count `rec` (stored in the stream at `stored_ms`, default its own time); False if it
        is outside the query or a record already counted."""
        if rec.id:
            now = rec.time_ms if stored_ms is None else stored_ms
            while self._order and self._order[0][0] < now - self.horizon:
                self._seen.discard(self._order.popleft()[1])
            if rec.id in self._seen:
                self.duplicates += 1
                return False
            self._seen.add(rec.id)
            self._order.append((now, rec.id))
        if self.tenant is not None and (rec.tenant or NO_TENANT) != (self.tenant or NO_TENANT):
            return False
        if rec.time_ms < self.since_ms or (self.until_ms and rec.time_ms >= self.until_ms):
            return False
        key = self._group(rec)
        totals = self.rows.get(key)
        if totals is None:
            totals = self.rows[key] = usage_pb2.UsageTotals()
        _add(totals, rec)
        return True

    def extend(self, records: Iterable[usage_pb2.UsageRecord]) -> Aggregator:
        for rec in records:
            self.add(rec)
        return self

    def result(self) -> usage_pb2.GetUsageResponse:
        response = usage_pb2.GetUsageResponse(
            tenant=self.tenant or "", since_ms=self.since_ms, until_ms=self.until_ms, by=self.by,
            duplicates_skipped=self.duplicates)
        total = response.totals
        for (tenant, group, adapter), t in sorted(self.rows.items()):
            response.rows.add(tenant=tenant, group=group, adapter=adapter, totals=t)
            total.requests += t.requests
            total.errors += t.errors
            total.prompt_tokens += t.prompt_tokens
            total.completion_tokens += t.completion_tokens
            total.partial_completion_tokens += t.partial_completion_tokens
        return response


def check_query(request: usage_pb2.GetUsageRequest, now_ms: int) -> tuple[str, int, int]:
    """(by, since_ms, until_ms) of a valid request; InvalidArgument naming the field otherwise.
    The tenant is the caller's business (the registry decides whose usage a caller sees)."""
    by = request.by or "tenant"
    if by not in BY:
        raise InvalidArgument(f"by {request.by!r} is not one of {', '.join(BY)}", field="by")
    if request.since_ms < 0:
        raise InvalidArgument(f"since_ms {request.since_ms} is negative", field="since_ms")
    if request.since_ms > now_ms:
        raise InvalidArgument(f"since_ms {request.since_ms} is in the future (now is {now_ms})", field="since_ms")
    if request.until_ms < 0:
        raise InvalidArgument(f"until_ms {request.until_ms} is negative", field="until_ms")
    if request.until_ms and request.until_ms <= request.since_ms:
        raise InvalidArgument(f"until_ms {request.until_ms} is not after since_ms {request.since_ms}",
                              field="until_ms")
    if request.tenant and request.tenant != NO_TENANT:
        validate_name(request.tenant, "tenant")
    return by, request.since_ms, request.until_ms


async def read_records(nc: nats.NATS, prefix: str, tenant: str | None, *, since_ms: int = 0, until_ms: int = 0,
                       timeout: float = 10.0) -> AsyncIterator[tuple[usage_pb2.UsageRecord, int]]:
    """(record, the time it was stored in ms) of the mesh under `prefix`, of `tenant` (None:
    every tenant; NO_TENANT: the admin's), stored from `since_ms` (less LATE_SECONDS) up to
    what the stream held when the read began (and past `until_ms` + LATE_SECONDS no further)."""
    js = nc.jetstream(timeout=timeout)
    filter_subject = mesh_subjects(prefix) if tenant is None else subject(
        prefix, "" if tenant == NO_TENANT else tenant)
    name = f"usage-{uuid.uuid4().hex[:16]}"
    config = js_api.ConsumerConfig(
        name=name, filter_subject=filter_subject, ack_policy=js_api.AckPolicy.NONE, mem_storage=True,
        num_replicas=1, inactive_threshold=60.0, max_waiting=1,
        deliver_policy=js_api.DeliverPolicy.ALL)
    if since_ms:
        config.deliver_policy = js_api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = datetime.datetime.fromtimestamp(max(0, since_ms // 1000 - LATE_SECONDS),
                                                                datetime.UTC)
    try:
        info = await js.add_consumer(STREAM, config)
    except nats.js.errors.NotFoundError:  # no stream yet: nothing was ever metered
        return
    psub = None
    try:
        remaining = info.num_pending or 0
        if remaining <= 0:
            return
        psub = await js.pull_subscribe_bind(consumer=name, stream=STREAM)
        stop_after = (until_ms + LATE_SECONDS * 1000) if until_ms else 0
        while remaining > 0:
            msgs = await psub.fetch(min(remaining, FETCH), timeout=timeout)
            remaining -= len(msgs)
            for msg in msgs:
                stored_ms = int(msg.metadata.timestamp.timestamp() * 1000) if msg.metadata else 0
                if stop_after and stored_ms > stop_after:
                    return
                rec = usage_pb2.UsageRecord()
                try:
                    rec.ParseFromString(msg.data)
                except Exception:  # not ours (someone published by hand): skip it
                    log.warning("usage: an unreadable message on %s skipped", msg.subject)
                    continue
                yield rec, stored_ms
    finally:
        if psub is not None:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(STREAM, name)


async def query(nc: nats.NATS, prefix: str, tenant: str | None, by: str = "", *, since_ms: int = 0,
                until_ms: int = 0) -> usage_pb2.GetUsageResponse:
    """Aggregated usage of the mesh under `prefix` (see `read_records` and `Aggregator`)."""
    agg = Aggregator(by, tenant=tenant, since_ms=since_ms, until_ms=until_ms)
    async for rec, stored_ms in read_records(nc, prefix, tenant, since_ms=since_ms, until_ms=until_ms):
        agg.add(rec, stored_ms)
    return agg.result()


async def answer(request: usage_pb2.GetUsageRequest, who: Principal, nc: nats.NATS | None,
                 prefix: str) -> usage_pb2.GetUsageResponse:
    """`GetUsage` for `who`: a tenant's key sees its own tenant's usage whatever it asks; the
    admin every tenant's, or the one asked. Read through `nc` (the service's NATS connection)."""
    by, since_ms, until_ms = check_query(request, int(time.time() * 1000))
    if who.kind == "tenant":
        tenant: str | None = who.tenant
    elif who.is_admin:
        tenant = request.tenant or None
    else:  # the rule admits developers and the admin only; nothing else reaches here
        raise PermissionDenied(f"{who.describe()} may not read usage")
    if nc is None or not nc.is_connected:
        raise Unavailable("not connected to NATS, where usage is kept; retry shortly")
    return await query(nc, prefix, tenant, by, since_ms=since_ms, until_ms=until_ms)
