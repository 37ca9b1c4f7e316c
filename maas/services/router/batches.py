"""Batches (docs/batches.md): OpenAI's Batches API, run by the routers on capacity online
traffic leaves.

`BatchService` is what the gRPC `Batches` service and the HTTP API (`/v1/batches`,
`/v1/files`) call. Creating a batch reads and checks its input file (every line a request
to the batch's endpoint, `custom_id`s unique), then writes the record (`maas.mesh.batches`).

Every router runs a `BatchService.run` loop: it claims unfinished batches nobody runs
(`batch-runs/{id}` under its lease, so a dead router's claims go with its lease and another
router takes its batches over) and sends their lines through the same path as an HTTP
request (`HttpApi.answer`), as the key that created the batch, at the `batch` service
class: engines admit every other class first and pre-empt batch sequences for them, so
a batch fills what online traffic leaves and yields when it returns. A line that fails for
want of capacity (no ready replica, every replica full, the worker died) is retried with
backoff until the batch's window ends; any other error is that line's answer. Answers go to
JetStream as they come, so a router that takes a batch over answers only the lines left.
When every line is answered the runner writes the output and error files (fixed ids: the
same files if it happens twice) and marks the batch completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import IO, Any

import grpc
from prometheus_client import Counter, Gauge

from maas.mesh.authz import Authorizer, Principal, caller
from maas.mesh.batches import (
    ENDPOINTS,
    MAX_ANSWER_BYTES,
    MAX_INPUT_BYTES,
    SERVICE_PURPOSES,
    TERMINAL,
    Answer,
    Answers,
    Line,
    Status,
    get_batch,
    now_ms,
    parse_input,
    status_name,
    update_batch,
    upload_chunks,
    window_seconds,
)
from maas.mesh.clients import RegistryClient
from maas.mesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)
from maas.mesh.etcd import EtcdSession
from maas.mesh.events import EventBus
from maas.mesh.logs import request_id_var
from maas.v1 import batches_pb2, batches_pb2_grpc

log = logging.getLogger(__name__)

MAX_METADATA = 16
LINE_TIMEOUT = 600.0       # seconds one line may take, per try
TICK = 1.0                 # seconds between progress writes and looks for batches to run
DEFAULT_CONCURRENCY = 16   # lines one router has in flight, over all the batches it runs
DEFAULT_YIELD = 1          # lines one router keeps in flight for a model while online requests run on it
YIELD_POLL = 0.05          # seconds between looks at whether online requests still run
MAX_WAITING_LINES = 4      # lines started and not answered (waiting to retry), per slot
MAX_RUNNING = 4            # batches one router runs at once (each holds its input in memory)
MAX_UPLOADS = 4            # uploads one router receives at once (each spooled to disk)
RETRYABLE = (Unavailable, ResourceExhausted, DeadlineExceeded)  # for want of capacity: tried again
MAX_TIMEOUTS = 3           # a line that timed out this often is answered with the timeout
MAX_BACKOFF = 30.0         # seconds between tries, at most
CHUNK = 1024 * 1024

LINES = Counter("maas_batch_lines_total", "Batch lines answered by this router, by outcome.", ["tenant", "outcome"])
RETRIES = Counter("maas_batch_line_retries_total", "Batch line tries that failed for want of capacity and were "
                  "retried.", ["tenant"])
RUNNING = Gauge("maas_batch_running", "Batches this router is running.")
IN_FLIGHT = Gauge("maas_batch_lines_in_flight", "Batch lines this router has in flight.")

Answerer = Callable[..., Awaitable[dict[str, Any]]]
"""`HttpApi.answer`: (endpoint, body, caller, timeout, service_class=) -> the JSON answer."""


def _visible(who: Principal | None, batch: batches_pb2.Batch) -> bool:
    return who is None or who.kind != "tenant" or batch.tenant == who.tenant


def _tenant(who: Principal | None) -> str:
    """The tenant a caller acts for ("": the platform, for the admin and --insecure)."""
    return who.tenant if who is not None else ""


def acting(who: Principal | None) -> Principal | None:
    """Whose files and batches a caller sees: a tenant its own; the admin every tenant's (None)."""
    return who if who is not None and who.kind == "tenant" else None


def public(batch: batches_pb2.Batch) -> batches_pb2.Batch:
    """A batch as its owner sees it: without which key's hash its lines run as."""
    shown = batches_pb2.Batch()
    shown.CopyFrom(batch)
    shown.ClearField("key_sha256")
    return shown


def _output(line: Line, rid: str, status: int, body: dict[str, Any], error: dict[str, Any] | None) -> bytes:
    return json.dumps({"id": f"batch_req_{rid}", "custom_id": line.custom_id,
                       "response": {"status_code": status, "request_id": rid, "body": body},
                       "error": error}, ensure_ascii=False, separators=(",", ":")).encode()


class BatchService:
    """The Batches API and this router's batch runner. A caller is a `Principal`, or None
    for one that acts for the platform (an --insecure mesh)."""

    def __init__(self, session: EtcdSession, registry: RegistryClient, authorizer: Authorizer, events: EventBus,
                 answer: Answerer, *, instance: str, concurrency: int = DEFAULT_CONCURRENCY,
                 error_of: Callable[[BaseException], tuple[int, dict[str, Any]]],
                 online: Callable[[str], bool] = lambda model: False, yield_to: int = DEFAULT_YIELD) -> None:
        self.session = session
        self.registry = registry
        self.authorizer = authorizer
        self.events = events
        self.answer = answer
        self.error_of = error_of  # (HTTP status, OpenAI error body) of a line's failure
        self.instance = instance
        self.concurrency = concurrency
        self.online = online      # model -> whether requests not of the batch class run on it (lately)
        self.yield_to = yield_to  # lines per model while there are any
        self._per_model: dict[str, int] = {}  # model -> this router's batch lines in flight on it
        self.answers = Answers(events)
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._uploads = asyncio.Semaphore(MAX_UPLOADS)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._not_before: dict[str, tuple[float, float]] = {}  # batch -> (monotonic time, last delay)
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ---- files (the HTTP API's /v1/files, for the caller's tenant) --------------------------------

    async def _files(self) -> batches_pb2_grpc.FilesStub:
        try:
            return await self.registry.files()
        except MaasError:
            raise
        except Exception as e:
            raise Unavailable(f"no registry to keep files ({type(e).__name__})") from None

    @staticmethod
    async def _call(what: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"{what}: " if e.code() == grpc.StatusCode.UNAVAILABLE else "") from None

    async def read_file(self, file_id: str, tenant: str, *, limit: int = 0) -> tuple[batches_pb2.File, bytes]:
        stub = await self._files()
        record = await self._call("reading the file", stub.GetFile(
            batches_pb2.FileRequest(id=file_id, on_behalf_of=tenant), timeout=10))
        if limit and record.bytes > limit:
            raise InvalidArgument(f"file {file_id} is {record.bytes} bytes; a batch's input may be at most "
                                  f"{limit // (1024 * 1024)} MiB", field="input_file_id")
        parts = [chunk.data async for chunk in self.file_chunks(None, file_id, tenant)]
        return record, b"".join(parts)

    async def _upload(self, header: batches_pb2.FileChunk, blocks: AsyncIterable[bytes]) -> batches_pb2.File:
        stub = await self._files()
        return await self._call("storing the file", stub.UploadFile(
            upload_chunks(header, blocks), timeout=3600))

    async def upload(self, who: Principal | None, data: IO[bytes], purpose: str, filename: str) -> batches_pb2.File:
        """Store an uploaded file for the caller's tenant."""
        if purpose in SERVICE_PURPOSES:
            raise InvalidArgument(f"purpose {purpose!r} is written by the platform; upload with purpose 'batch'",
                                  field="purpose")

        async def blocks() -> AsyncIterator[bytes]:
            while block := await asyncio.to_thread(data.read, CHUNK):
                yield block

        return await self._upload(batches_pb2.FileChunk(purpose=purpose, filename=filename,
                                                        tenant=_tenant(who)), blocks())

    def uploading(self) -> asyncio.Semaphore:
        """Held while an upload is received: at most MAX_UPLOADS at once per router."""
        return self._uploads

    async def list_files(self, who: Principal | None, purpose: str = "") -> list[batches_pb2.File]:
        stub = await self._files()
        reply = await self._call("listing files", stub.ListFiles(
            batches_pb2.ListFilesRequest(purpose=purpose, on_behalf_of=_tenant(who)), timeout=10))
        return list(reply.files)

    async def get_file(self, who: Principal | None, file_id: str) -> batches_pb2.File:
        stub = await self._files()
        return await self._call("reading the file", stub.GetFile(
            batches_pb2.FileRequest(id=file_id, on_behalf_of=_tenant(who)), timeout=10))

    async def delete_file(self, who: Principal | None, file_id: str) -> batches_pb2.File:
        stub = await self._files()
        return await self._call("deleting the file", stub.DeleteFile(
            batches_pb2.FileRequest(id=file_id, on_behalf_of=_tenant(who)), timeout=30))

    async def file_chunks(self, who: Principal | None, file_id: str,
                          tenant: str | None = None) -> AsyncGenerator[batches_pb2.FileChunk, None]:
        stub = await self._files()
        call = stub.DownloadFile(batches_pb2.FileRequest(
            id=file_id, on_behalf_of=_tenant(who) if tenant is None else tenant), timeout=600)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, "reading the file: " if e.code() == grpc.StatusCode.UNAVAILABLE else "") from None
        finally:
            call.cancel()

    # ---- batches ------------------------------------------------------------------------------

    async def create(self, who: Principal | None, request: batches_pb2.CreateBatchRequest) -> batches_pb2.Batch:
        endpoint = request.endpoint
        if endpoint not in ENDPOINTS:
            raise InvalidArgument(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint[:80]!r}",
                                  field="endpoint")
        window = request.completion_window or "24h"
        seconds = window_seconds(window)
        if len(request.metadata) > MAX_METADATA:
            raise InvalidArgument(f"metadata holds at most {MAX_METADATA} pairs", field="metadata")
        for k, v in request.metadata.items():
            if len(k) > 64 or len(v) > 512:
                raise InvalidArgument("metadata keys are at most 64 characters and values 512", field="metadata")
        if not request.input_file_id:
            raise InvalidArgument("input_file_id is required: upload the requests with purpose \"batch\" first",
                                  field="input_file_id")
        tenant = _tenant(who)
        record, data = await self.read_file(request.input_file_id, tenant, limit=MAX_INPUT_BYTES)
        if record.tenant != tenant:  # the admin's view holds every tenant's files: it runs the platform's only
            raise FailedPrecondition(f"file {record.id} belongs to tenant {record.tenant!r}; a batch runs as its "
                                     "creator, on its creator's files", field="input_file_id")
        if record.purpose != "batch":
            raise InvalidArgument(f"file {record.id} has purpose {record.purpose!r}; a batch's input is uploaded "
                                  "with purpose \"batch\"", field="input_file_id")
        lines = await asyncio.to_thread(parse_input, data, endpoint)
        now = now_ms()
        batch = batches_pb2.Batch(
            id="batch_" + secrets.token_hex(12), tenant=tenant, endpoint=endpoint,
            input_file_id=record.id, completion_window=window, status=Status.BATCH_STATUS_IN_PROGRESS,
            counts=batches_pb2.BatchCounts(total=len(lines)), metadata=dict(request.metadata),
            key_id=who.key_id if who is not None else "", key_sha256=who.digest if who is not None else "",
            created_ms=now, in_progress_ms=now, expires_ms=now + seconds * 1000, updated_ms=now)
        key, tx = self.session.keys.batch(batch.id), self.session.client.transactions
        ok, _ = await self.session.client.transaction(
            compare=[tx.version(key) == 0],
            success=[tx.put(key, batch.SerializeToString()), tx.put(self.session.keys.open_batch(batch.id), b"")],
            failure=[])
        if not ok:  # 96 random bits
            raise Unavailable("a batch id collided; try again")
        self.events.publish("batch", "created", batch.id, f"batch {batch.id}: {len(lines)} requests to {endpoint}",
                            tenant=batch.tenant, lines=str(len(lines)))
        self._wake.set()
        return public(batch)

    async def get(self, who: Principal | None, batch_id: str) -> batches_pb2.Batch:
        batch = await get_batch(self.session, batch_id)
        if not _visible(who, batch):
            raise NotFound(f"batch {batch_id!r} does not exist", field="batch_id")
        return public(batch)

    async def list(self, who: Principal | None, limit: int = 20,
                   after: str = "") -> tuple[list[batches_pb2.Batch], bool]:
        if not 0 <= limit <= 100:
            raise InvalidArgument(f"limit must be between 1 and 100, not {limit}", field="limit")
        pairs, _ = await self.session.get_prefix(self.session.keys.batches())
        mine = sorted((b for b in (batches_pb2.Batch.FromString(v) for _, v in pairs) if _visible(who, b)),
                      key=lambda b: (b.created_ms, b.id), reverse=True)
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1:] if after in ids else []
        limit = limit or 20
        return [public(b) for b in mine[:limit]], len(mine) > limit

    async def cancel(self, who: Principal | None, batch_id: str) -> batches_pb2.Batch:
        await self.get(who, batch_id)

        def cancelling(b: batches_pb2.Batch) -> batches_pb2.Batch | None:
            if b.status != Status.BATCH_STATUS_IN_PROGRESS:  # finalizing: every line is answered already
                return None
            b.status, b.cancelling_ms = Status.BATCH_STATUS_CANCELLING, now_ms()
            return b

        if await update_batch(self.session, batch_id, cancelling) is not None:
            self.events.publish("batch", "cancelling", batch_id, f"batch {batch_id} is being cancelled")
            self._wake.set()
        return await self.get(who, batch_id)

    # ---- the runner -----------------------------------------------------------------------------

    def start(self) -> None:
        """Run batches here (unless concurrency is 0)."""
        if self.concurrency > 0:
            self._loop = asyncio.create_task(self._claim_loop(), name="batch runner")

    async def close(self) -> None:
        """Stop running batches; another router (or this one, restarted) resumes them."""
        tasks = [t for t in (self._loop, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _claim_loop(self) -> None:
        while True:
            try:
                await self._claim_some()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd away: look again later
                log.warning("cannot look for batches to run: %s", e)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK * 2)

    async def _claim_some(self) -> None:
        """Claim open batches nobody runs, up to MAX_RUNNING here."""
        start = self.session.keys.open_batch()
        found = await self.session.client.get_prefix(start, keys_only=True)
        client, tx = self.session.client, self.session.client.transactions
        now = time.monotonic()
        for kv in found:
            if len(self._running) >= MAX_RUNNING:
                return
            batch_id = kv.key[len(start):].decode()
            if batch_id in self._running or self._not_before.get(batch_id, (0.0, 0.0))[0] > now:
                continue
            claim = self.session.keys.batch_run(batch_id)
            ok, _ = await client.transaction(
                compare=[tx.version(claim) == 0],
                success=[tx.put(claim, self.instance.encode(), lease=self.session.lease_id)], failure=[])
            if ok:
                self._running[batch_id] = asyncio.create_task(self._run(batch_id), name=f"batch {batch_id}")

    async def _release(self, batch_id: str) -> None:
        claim, tx = self.session.keys.batch_run(batch_id), self.session.client.transactions
        with contextlib.suppress(Exception):
            await self.session.client.transaction(compare=[tx.value(claim) == self.instance.encode()],
                                                  success=[tx.delete(claim)], failure=[])

    async def _run(self, batch_id: str) -> None:
        RUNNING.inc()
        try:
            await _BatchRun(self, batch_id).run()
            self._not_before.pop(batch_id, None)
        except asyncio.CancelledError:
            raise
        except _Lost:
            log.info("batch %s: another router runs it now", batch_id)
        except Exception as e:  # a retry here or elsewhere resumes it, after a pause that grows
            _, delay = self._not_before.get(batch_id, (0.0, TICK))
            delay = min(delay * 2, MAX_BACKOFF)
            self._not_before[batch_id] = (time.monotonic() + delay, delay)
            log.warning("batch %s stopped here, to be resumed in %.0fs: %s", batch_id, delay, e)
        finally:
            RUNNING.dec()
            self._running.pop(batch_id, None)
            await self._release(batch_id)


class _Lost(Exception):
    """This router no longer holds the batch's claim."""


class _BatchRun:
    """One router running one batch, from its claim to its end (or the claim's loss)."""

    def __init__(self, service: BatchService, batch_id: str) -> None:
        self.service = service
        self.id = batch_id
        self.session = service.session
        self.answers = service.answers
        self.stop = ""  # why no more lines are sent: "cancelled", "expired", "lost", "failed: ..."
        self.completed = self.failed = 0
        self.data = b""
        self.lines: list[Line] = []

    async def _update(self, mutate: Callable[[batches_pb2.Batch], batches_pb2.Batch | None]) -> batches_pb2.Batch:
        """Write while this router holds the claim; _Lost once it does not."""
        written = await update_batch(self.session, self.id, mutate, runner=self.service.instance)
        if written is not None:
            return written
        if await self.session.get(self.session.keys.batch_run(self.id)) != self.service.instance.encode():
            self.stop = "lost"
            raise _Lost()
        return await get_batch(self.session, self.id)  # `mutate` declined

    async def run(self) -> None:
        def claimed(b: batches_pb2.Batch) -> batches_pb2.Batch:
            b.runner, b.claims = self.service.instance, b.claims + 1
            return b

        batch = await self._update(claimed)
        if batch.status in TERMINAL:  # ended, but its open mark outlived it
            await self.session.client.delete(self.session.keys.open_batch(self.id))
            return
        log.info("running batch %s (%d requests, claim %d)", self.id, batch.counts.total, batch.claims)
        try:
            outcomes = await self.answers.outcomes(self.id)
            _, self.data = await self.service.read_file(batch.input_file_id, batch.tenant)
            self.lines = await asyncio.to_thread(parse_input, self.data, batch.endpoint)
        except (NotFound, InvalidArgument, PermissionDenied) as e:
            outcomes, self.stop = {}, f"failed: its input cannot be read: {e.message}"
        self.completed = sum(outcomes.values())
        self.failed = len(outcomes) - self.completed
        if batch.status == Status.BATCH_STATUS_CANCELLING:
            self.stop = self.stop or "cancelled"
        elif now_ms() >= batch.expires_ms:
            self.stop = self.stop or "expired"
        who = await self._caller(batch)
        todo = [line for line in self.lines if line.index not in outcomes]
        progress = asyncio.create_task(self._progress(batch), name=f"batch {self.id} progress")
        try:
            if todo and not self.stop and batch.status == Status.BATCH_STATUS_IN_PROGRESS:
                await self._send(batch, who, todo)
        finally:
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError, _Lost):
                await progress
        if self.stop == "lost":
            raise _Lost()
        await self._finish()

    async def _caller(self, batch: batches_pb2.Batch) -> Principal | str:
        """Who the lines run as: the key that made the batch ("" on an --insecure mesh)."""
        if not self.service.authorizer.enforce:
            return ""
        who = await self.service.authorizer.by_digest(batch.key_sha256) if batch.key_sha256 else None
        if who is None or who.tenant != batch.tenant:
            self.stop = self.stop or f"failed: the key {batch.key_id or '-'} that created the batch was revoked"
            return ""
        return who

    async def _progress(self, batch: batches_pb2.Batch) -> None:
        """About once a second: write the counts; notice a cancellation, the window's end,
        the key's revocation and the claim's loss."""
        while True:
            await asyncio.sleep(TICK)
            try:
                batch = await self._update(self._counted)
                if batch.status == Status.BATCH_STATUS_CANCELLING:
                    self.stop = self.stop or "cancelled"
                elif now_ms() >= batch.expires_ms:
                    self.stop = self.stop or "expired"
                await self._caller(batch)
            except (_Lost, asyncio.CancelledError):
                raise
            except Exception as e:  # etcd away for a moment: the next tick writes
                log.info("batch %s: progress not written: %s", self.id, e)

    def _counted(self, b: batches_pb2.Batch) -> batches_pb2.Batch:
        b.counts.completed, b.counts.failed = self.completed, self.failed
        return b

    async def _send(self, batch: batches_pb2.Batch, who: Principal | str, todo: list[Line]) -> None:
        """Every line of `todo`, as many at once as the router's slots (and, while online
        requests run on a line's model, `yield_to`) allow, until they are answered or the
        batch stops. A line waiting to retry gives its slot up meanwhile; at most
        MAX_WAITING_LINES x slots lines are started and not yet answered."""
        slots = self.service._slots
        started = asyncio.Semaphore(max(1, self.service.concurrency) * MAX_WAITING_LINES)
        pending: set[asyncio.Task[None]] = set()
        try:
            for line in todo:
                body = line.body(self.data)
                named = body.get("model")
                model = named if isinstance(named, str) else ""
                if not await self._take(started) or not await self._slot_with_room(slots, model):
                    break
                task = asyncio.create_task(self._line(batch, who, line, body, model, slots))  # owns the slot
                pending.add(task)

                def settled(t: asyncio.Task[None]) -> None:
                    pending.discard(t)
                    started.release()

                task.add_done_callback(settled)
            while pending and not self.stop:
                await asyncio.wait(set(pending), timeout=TICK)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _slot_with_room(self, slots: asyncio.Semaphore, model: str) -> bool:
        """A slot, once `model` has room for another batch line (`_room`); False once the
        batch stops."""
        while not self.stop:
            if not self._room(model):
                await asyncio.sleep(YIELD_POLL)
                continue
            if not await self._take(slots):
                return False
            if self._room(model):  # still, after waiting for the slot
                return True
            slots.release()
        return False

    async def _take(self, slots: asyncio.Semaphore) -> bool:
        """A slot, or False once the batch stops."""
        while not self.stop:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(slots.acquire(), TICK)
        return False

    async def _line(self, batch: batches_pb2.Batch, who: Principal | str, line: Line, body: dict[str, Any],
                    model: str, slots: asyncio.Semaphore) -> None:
        """One line, tried until it is answered: a try that failed for want of capacity is
        tried again after a pause (its slot given up meanwhile) until the window ends."""
        rid = f"{batch.id.removeprefix('batch_')}-{line.index}"
        token = request_id_var.set(rid)
        per_model = self.service._per_model
        held = True  # the sender took a slot (with room on the model) for the first try
        delay, timeouts = 0.5, 0
        try:
            while True:
                left = batch.expires_ms / 1000 - time.time()
                if left <= 0:
                    self.stop = self.stop or "expired"  # the line stays unanswered
                    return
                if not held and not await self._slot_with_room(slots, model):
                    return
                held = True
                IN_FLIGHT.inc()
                per_model[model] = per_model.get(model, 0) + 1
                try:
                    answer = await self.service.answer(batch.endpoint, body, who, min(LINE_TIMEOUT, left),
                                                       service_class="batch")
                    outcome: tuple[int, dict[str, Any]] | Exception = (200, answer)
                except Exception as e:
                    outcome = e
                finally:
                    IN_FLIGHT.dec()
                    per_model[model] -= 1
                    slots.release()
                    held = False
                if isinstance(outcome, Exception):
                    timeouts += isinstance(outcome, DeadlineExceeded)
                    if isinstance(outcome, RETRYABLE) and timeouts < MAX_TIMEOUTS:
                        RETRIES.labels(batch.tenant or "-").inc()
                        wait = getattr(outcome, "retry_after", None) or delay * random.uniform(0.5, 1.5)
                        delay = min(delay * 2, MAX_BACKOFF)
                        await asyncio.sleep(min(wait, MAX_BACKOFF))
                        continue
                    outcome = self.service.error_of(outcome)
                status, reply = outcome
                await self._store(line, status == 200, _output(line, rid, status, reply, None), batch.tenant)
                return
        finally:
            if held:
                slots.release()
            request_id_var.reset(token)

    def _room(self, model: str) -> bool:
        """Whether a line for `model` may be sent now: always while no online request runs
        on it; else while fewer than `yield_to` of this router's batch lines are on it."""
        service = self.service
        return not service.online(model) or service._per_model.get(model, 0) < service.yield_to

    async def _store(self, line: Line, ok: bool, data: bytes, tenant: str) -> None:
        if len(data) > MAX_ANSWER_BYTES:
            ok = False
            rid = json.loads(data)["response"]["request_id"]
            data = _output(line, rid, 500, {"error": {
                "message": f"the answer is {len(data)} bytes, more than a batch line may hold ({MAX_ANSWER_BYTES})",
                "type": "server_error", "param": None, "code": "answer_too_large"}}, None)
        delay = 0.2
        while True:  # an answer is not given up: NATS away pauses the line, not the batch's count
            try:
                await self.answers.put(self.id, Answer(line.index, ok, data))
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("batch %s: cannot store the answer of line %d yet: %s", self.id, line.number, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        LINES.labels(tenant or "-", "completed" if ok else "failed").inc()

    async def _finish(self) -> None:
        """Write the output and error files, then the batch's end."""
        def finalizing(b: batches_pb2.Batch) -> batches_pb2.Batch | None:
            if b.status == Status.BATCH_STATUS_IN_PROGRESS and not self.stop:
                b.status, b.finalizing_ms = Status.BATCH_STATUS_FINALIZING, now_ms()
                return b
            return None

        current = await self._update(finalizing)
        if current.status in TERMINAL:
            return
        if current.status == Status.BATCH_STATUS_CANCELLING:
            self.stop = self.stop or "cancelled"
        outcomes = await self.answers.outcomes(self.id)
        if not self.stop and len(outcomes) < current.counts.total:
            raise Unavailable(f"{current.counts.total - len(outcomes)} lines are not answered yet")
        unanswered = [line for line in self.lines if line.index not in outcomes] if self.stop else []
        output = await self._write(current, "output", True, [])
        errors = await self._write(current, "errors", False, unanswered)
        self.completed = sum(outcomes.values())
        self.failed = len(outcomes) - self.completed + len(unanswered)
        end = {"": Status.BATCH_STATUS_COMPLETED, "cancelled": Status.BATCH_STATUS_CANCELLED,
               "expired": Status.BATCH_STATUS_EXPIRED}.get(self.stop, Status.BATCH_STATUS_FAILED)
        stamp = {Status.BATCH_STATUS_COMPLETED: "completed_ms", Status.BATCH_STATUS_CANCELLED: "cancelled_ms",
                 Status.BATCH_STATUS_EXPIRED: "expired_ms"}.get(end, "failed_ms")

        def ended(b: batches_pb2.Batch) -> batches_pb2.Batch | None:
            if b.status in TERMINAL:
                return None
            b.status = end
            setattr(b, stamp, now_ms())
            if end == Status.BATCH_STATUS_FAILED:
                b.message = self.stop.removeprefix("failed: ")
            elif end == Status.BATCH_STATUS_EXPIRED:
                b.message = f"the completion window ({b.completion_window}) ended with {len(unanswered)} " \
                            "requests unanswered (in the error file)"
            b.output_file_id, b.error_file_id = output, errors
            b.counts.completed, b.counts.failed = self.completed, self.failed
            return b

        final = await self._update(ended)
        await self.session.client.delete(self.session.keys.open_batch(self.id))
        await self.answers.purge(self.id)
        self.service.events.publish(
            "batch", status_name(final.status), self.id,
            f"batch {self.id} {status_name(final.status)}: {self.completed} answered, {self.failed} failed",
            tenant=final.tenant)
        log.info("batch %s %s: %d answered, %d failed", self.id, status_name(final.status), self.completed,
                 self.failed)

    async def _write(self, batch: batches_pb2.Batch, kind: str, ok: bool, unanswered: list[Line]) -> str:
        """One of the batch's result files, streamed from the stored answers in the order they
        were stored (its id fixed by the batch's); "" when it would be empty."""
        reason = {"cancelled": "batch_cancelled", "expired": "batch_expired"}.get(self.stop, "batch_failed")
        first: list[bytes] = []

        async def blocks() -> AsyncIterator[bytes]:
            block = bytearray()
            async for answer in self.answers.scan(self.id):
                if answer.ok == ok:
                    block += answer.line + b"\n"
                    if len(block) >= CHUNK:
                        yield bytes(block)
                        block.clear()
            for line in unanswered:
                block += json.dumps({"id": f"batch_req_{batch.id.removeprefix('batch_')}-{line.index}",
                                     "custom_id": line.custom_id, "response": None,
                                     "error": {"code": reason, "message": f"not answered: the batch was {self.stop}"}},
                                    ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                if len(block) >= CHUNK:
                    yield bytes(block)
                    block.clear()
            if block:
                yield bytes(block)

        async def nonempty() -> AsyncIterator[bytes]:
            async for block in blocks():
                first.append(block)
                yield block

        file_id = f"file-{batch.id}-{kind}"
        header = batches_pb2.FileChunk(purpose="batch_output", filename=f"{batch.id}_{kind}.jsonl",
                                       tenant=batch.tenant, id=file_id)
        record = await self.service._upload(header, nonempty())
        if not first:  # nothing went in: no file (the empty one is dropped again)
            with contextlib.suppress(Exception):
                await self.service.delete_file(None, record.id)
            return ""
        return str(record.id)


def batch_object(b: batches_pb2.Batch) -> dict[str, Any]:
    """A batch as OpenAI's API shows it."""
    def at(ms: int) -> int | None:
        return ms // 1000 if ms else None

    errors = None
    if b.status in (Status.BATCH_STATUS_FAILED, Status.BATCH_STATUS_EXPIRED) and b.message:
        code = "batch_failed" if b.status == Status.BATCH_STATUS_FAILED else "batch_expired"
        errors = {"object": "list", "data": [{"code": code, "message": b.message, "param": None, "line": None}]}
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": errors,
        "input_file_id": b.input_file_id, "completion_window": b.completion_window, "status": status_name(b.status),
        "output_file_id": b.output_file_id or None, "error_file_id": b.error_file_id or None,
        "created_at": at(b.created_ms), "in_progress_at": at(b.in_progress_ms), "expires_at": at(b.expires_ms),
        "finalizing_at": at(b.finalizing_ms), "completed_at": at(b.completed_ms), "failed_at": at(b.failed_ms),
        "expired_at": at(b.expired_ms), "cancelling_at": at(b.cancelling_ms), "cancelled_at": at(b.cancelled_ms),
        "request_counts": {"total": b.counts.total, "completed": b.counts.completed, "failed": b.counts.failed},
        "metadata": dict(b.metadata) or None,
    }


def file_object(f: batches_pb2.File) -> dict[str, Any]:
    """A file as OpenAI's API shows it."""
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_ms // 1000,
            "filename": f.filename, "purpose": f.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


class BatchesServicer(batches_pb2_grpc.BatchesServicer):
    """The gRPC face of `BatchService`; callers are who the runtime's interceptor found."""

    def __init__(self, service: BatchService) -> None:
        self.service = service

    @staticmethod
    def _creator() -> Principal | None:
        """Whose key a new batch's lines run as (None: an --insecure mesh's)."""
        me = caller()
        return None if me.name == "insecure" else me

    async def CreateBatch(self, request: batches_pb2.CreateBatchRequest,
                          context: grpc.aio.ServicerContext) -> batches_pb2.Batch:
        return await self.service.create(self._creator(), request)

    async def GetBatch(self, request: batches_pb2.BatchRequest,
                       context: grpc.aio.ServicerContext) -> batches_pb2.Batch:
        return await self.service.get(acting(caller()), request.id)

    async def ListBatches(self, request: batches_pb2.ListBatchesRequest,
                          context: grpc.aio.ServicerContext) -> batches_pb2.ListBatchesResponse:
        batches, more = await self.service.list(acting(caller()), request.limit, request.after)
        return batches_pb2.ListBatchesResponse(batches=batches, has_more=more)

    async def CancelBatch(self, request: batches_pb2.BatchRequest,
                          context: grpc.aio.ServicerContext) -> batches_pb2.Batch:
        return await self.service.cancel(acting(caller()), request.id)


SERVICE = batches_pb2.DESCRIPTOR.services_by_name["Batches"].full_name

__all__ = ["SERVICE", "BatchService", "BatchesServicer", "acting", "batch_object", "file_object"]
