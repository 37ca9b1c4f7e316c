"""The router's core, shared by its gRPC servicer and its HTTP (OpenAI) API: pick a
replica, forward the request with the caller's remaining time, retry a request that
failed before its first token on another replica, and move a stream whose worker died.

Moving a stream: the router keeps the token ids it has passed on, and re-submits the
request to another replica with those tokens as `resume_token_ids`; the engine continues
after them, and its sampling depends only on (seed, position), so the client sees the
stream an uninterrupted run would have produced. Sampled requests without a seed get one
pinned here, before the first attempt, so that holds for them too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from maas.mesh import tracing
from maas.mesh.authz import Principal
from maas.mesh.clients import REPLICA_HEADER, credential_metadata
from maas.mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MaasError,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)
from maas.mesh.logs import model_var, new_request_id, request_id_var, tenant_var
from maas.mesh.service_classes import DEFAULT_CLASS, priority
from maas.mesh.usage import UsageMeter
from maas.services.router.pool import ReplicaPool
from maas.services.router.tenants import Bucket, Caller, Gate, Ticket
from maas.services.router.waiting import MAX_WAITING, RoomFull, Waiter, WaitingRooms
from maas.services.router.waiting import POLL_SECONDS as QUEUE_POLL
from maas.v1 import common_pb2, inference_pb2, mesh_pb2, usage_pb2

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # replicas one request may try (first attempt included)
QUEUE_SECONDS = 0.0  # how long a request waits when every replica is full, before it is shed (0: shed at once)
FAILOVER_SECONDS = 30.0  # how long a request whose worker failed waits for another replica to be ready

RETRIES = Counter("maas_router_retries_total", "Requests re-sent to another replica before their first token.",
                  ["model"])
SHED = Counter("maas_router_shed_requests_total",
               "Requests refused because every replica was full for the whole queueing time.", ["model"])
MIGRATIONS = Counter("maas_router_migrations_total",
                     "Streams moved to another replica after their worker failed mid-stream.", ["model"])
QUEUE_WAIT = Histogram("maas_router_queue_wait_seconds",
                       "Time a request waited in the router for room on a full model (--queue-timeout), until a "
                       "replica took it or it was shed; requests that did not wait are not counted.",
                       ["model", "tenant"],
                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
WAITING = Gauge("maas_router_waiting_requests", "Requests waiting in the router for room on a full model.",
                ["model"])


PREFIX_CHARS = 256      # prompt characters that make the prefix-affinity key (about 64 tokens)
MIN_PREFIX_CHARS = 128  # shorter prompts gain little from a cached prefix: least load instead
SESSION_HEADER = "x-session-id"


def affinity_key(request: inference_pb2.GenerateRequest, session: str = "", *, prefix: bool = True) -> str:
    """Where a request would rather go: its session's replica; else the replica likely to
    hold its prompt's prefix (and adapter) in cache; else anywhere ("")."""
    if session:
        return f"session|{session}"
    if not prefix:
        return ""
    text = request.prompt or "".join(f"{m.role}:{m.content}\n" for m in getattr(request, "messages", ())) \
        or ",".join(map(str, getattr(request, "prompt_token_ids", ())))
    if len(text) >= MIN_PREFIX_CHARS:
        return f"prefix|{request.model}|{request.adapter}|{text[:PREFIX_CHARS]}"
    return f"adapter|{request.model}|{request.adapter}" if request.adapter else ""


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
REQUESTS = Counter("maas_router_requests_total", "Generation requests by model, tenant and final status.",
                   ["model", "tenant", "status"])
TTFT = Histogram("maas_router_time_to_first_token_seconds", "Arrival at the router to the first chunk out.",
                 ["model"], buckets=_LATENCY)
ITL = Histogram("maas_router_inter_token_latency_seconds", "Time between two chunks of one stream.",
                ["model"], buckets=_LATENCY)
E2E = Histogram("maas_router_request_duration_seconds", "Arrival at the router to the end of the request.",
                ["model"], buckets=_LATENCY)
TOKENS = Counter("maas_router_tokens_total", "Tokens in (prompt) and out (completion).", ["model", "tenant", "kind"])
OVERHEAD = Histogram("maas_router_overhead_seconds",
                     "Time in the router itself before a request is sent on (admission, choosing a replica).",
                     buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1))


def _status(e: BaseException) -> str:
    if isinstance(e, MaasError):
        return e.code.name
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "INTERNAL"


class _Series:
    """The metric children of one model label (and of its tenants), looked up once: a
    `labels()` call takes a lock and validates its arguments, on every chunk otherwise.
    Bounded: models are deployments' names or "other", tenants are keys' tenants."""

    __slots__ = ("model", "ttft", "itl", "e2e", "_tenants")

    def __init__(self, model: str) -> None:
        self.model = model
        self.ttft, self.itl, self.e2e = TTFT.labels(model), ITL.labels(model), E2E.labels(model)
        self._tenants: dict[str, tuple[Counter, Counter]] = {}

    def tokens(self, tenant: str, usage: common_pb2.Usage) -> int:
        children = self._tenants.get(tenant)
        if children is None:
            children = self._tenants[tenant] = (TOKENS.labels(self.model, tenant, "prompt"),
                                                TOKENS.labels(self.model, tenant, "completion"))
        children[0].inc(usage.prompt_tokens)
        children[1].inc(usage.completion_tokens)
        return usage.prompt_tokens + usage.completion_tokens

    def done(self, tenant: str, status: str, started: float) -> None:
        REQUESTS.labels(self.model, tenant, status).inc()  # once a request: not worth a cache
        self.e2e.observe(time.perf_counter() - started)


_SERIES: dict[str, _Series] = {}


def _series(model: str) -> _Series:
    series = _SERIES.get(model)
    if series is None:
        series = _SERIES[model] = _Series(model)
    return series


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


LEFT = "its replica left etcd: the worker's lease ended (dead, or frozen and not answering)"

Chunk = tuple[inference_pb2.GenerateChunk, bytes]
Reply = tuple[inference_pb2.GenerateResponse, bytes]
"""What a worker sent: parsed (the router reads it) and as received (passed on unchanged)."""


class Forwarder:
    """`api_key` is the caller: the key an HTTP request sent, or the principal the gRPC
    interceptor already authenticated from its metadata (not checked twice); tenants, keys and
    limits check it here, for both front ends.

    Requests travel as bytes: `payload` is the request as the caller serialized it (the gRPC
    front end passes it on as received; None serializes `request`). What the router adds
    (a request id, a pinned seed, the tokens to resume after) is appended as a second
    serialized GenerateRequest: parsing concatenated messages merges them (a later value
    wins for a singular field, repeated fields append), so the worker reads exactly the
    amended request and nothing is parsed and serialized again on the way through."""

    def __init__(self, pool: ReplicaPool, gate: Gate | None = None, *, max_attempts: int = MAX_ATTEMPTS,
                 queue_timeout: float = QUEUE_SECONDS, max_waiting: int = MAX_WAITING,
                 failover_timeout: float = FAILOVER_SECONDS, prefix_affinity: bool = True,
                 credential: str = "", usage: UsageMeter | None = None) -> None:
        self.pool = pool
        self.usage = usage  # one record per admitted request, written when it ends
        self.credential = credential_metadata(credential)  # the router's own key: workers serve routers only
        self.prefix_affinity = prefix_affinity
        self.gate = gate
        self.max_attempts = max_attempts
        self.queue_timeout = queue_timeout
        self.failover_timeout = failover_timeout
        # requests waiting for a full model to have room, shared fairly between tenants
        self.rooms = WaitingRooms(self._serves, max_waiting=max_waiting)
        self.reservations = Reservations(pool, gate)

    def _serves(self, model: str, replica_id: str) -> bool:
        return any(r.replica_id == replica_id for r in self.pool.ready(model))

    def _replica_left(self, call: grpc.aio.Call) -> bool:
        """A call cancelled under this task because its replica left etcd (not this request
        cancelled by its client): the request moves on."""
        task = asyncio.current_task()
        return self.pool.abandoned(call) and (task is None or not task.cancelling())

    def _admit(self, who: Caller, model: str, adapter: str = "") -> Ticket:
        return Ticket(None) if self.gate is None else self.gate.admit(who, model, adapter)

    def _meter(self, kind: str, ticket: Ticket, request_id: str, model: str, adapter: str,
               replica: mesh_pb2.ReplicaInfo | None, usage: common_pb2.Usage | None, answered: str, status: str,
               entered: float, partial: int = 0) -> None:
        """The usage record of one admitted request that ended: what its client was told in
        its final `usage` (none: an error, a cancelled stream; `partial` then counts the
        tokens a stream had passed on). One per client request, whatever retries and
        migrations happened behind it."""
        if self.usage is None:
            return
        key = ticket.key
        self.usage.record(usage_pb2.UsageRecord(
            request_id=request_id or request_id_var.get(), tenant=key.tenant if key is not None else "",
            key_id=key.id if key is not None else "", model=model, adapter=adapter,
            deployment=replica.deployment if replica is not None else "", model_version=answered,
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            completion_tokens=usage.completion_tokens if usage is not None else 0,
            partial_completion_tokens=0 if usage is not None else partial, status=status, kind=kind,
            duration_ms=int((time.perf_counter() - entered) * 1000)))

    @staticmethod
    def prepare(request: inference_pb2.GenerateRequest, added: inference_pb2.GenerateRequest
                ) -> tuple[tuple[str, str], ...]:
        """Give the request an id (the caller's, the log context's, or a new one); an id the
        router chose goes into `added` too. Returns the metadata that carries it and the
        trace context to the worker."""
        rid = request.request_id
        if not rid:
            rid = request_id_var.get()
            if rid == "-":
                rid = new_request_id()
            request.request_id = added.request_id = rid
        return (("x-request-id", rid), *tracing.headers())

    def route_adapter(self, request: inference_pb2.GenerateRequest, added: inference_pb2.GenerateRequest) -> None:
        """A model name that is not a deployment but one of a deployment's adapters (a
        fine-tuned LoRA deployed with its base) becomes that deployment with the adapter
        applied, so clients ask for a fine-tuned model by its own name."""
        if request.adapter or request.model in self.pool.deployments.items:
            return
        if deployment := self.pool.serving_adapter(request.model):
            request.adapter, request.model = request.model, deployment
            added.adapter, added.model = request.adapter, request.model

    async def stream(self, request: inference_pb2.GenerateRequest, timeout: float | None, api_key: Caller = "",
                     session: str = "", payload: bytes | None = None) -> AsyncIterator[Chunk]:
        """Chunks of one generation, moved to another replica if its worker fails."""
        entered = time.perf_counter()
        asked = request.model  # what the key must allow: a fine-tuned adapter's own name, say
        added = inference_pb2.GenerateRequest()  # what the router changes, sent after the payload
        self.route_adapter(request, added)
        series = _series(self._label(request.model))
        tenant, status = "-", "OK"
        ticket: Ticket | None = None
        replica: mesh_pb2.ReplicaInfo | None = None
        final: inference_pb2.GenerateChunk | None = None  # the last chunk (with the usage), once passed on
        produced: list[int] = []
        try:
            ticket = self._admit(api_key, asked, request.adapter)
            tenant = ticket.tenant
            online, reserved = "", None
            try:
                metadata = (*self.prepare(request, added), *self.credential)
                _stamp(request, added, ticket)
                online = self._online_begins(request)
                reserved = self.reservations.admit(request, added, ticket.tenant)
                params = request.params
                if not params.HasField("seed") and not (params.HasField("temperature") and params.temperature == 0):
                    # a resumed stream must sample as the first attempt would
                    params.seed = added.params.seed = random.getrandbits(63)
                payload = request.SerializeToString() if payload is None else payload + added.SerializeToString()
                affinity = affinity_key(request, session, prefix=self.prefix_affinity)
                deadline = None if timeout is None else time.monotonic() + timeout
                attempts = _Attempts(self, request.model, deadline, ticket.tenant, request.tenant_weight,
                                     _queue_priority(request, reserved is not None))
                last: float | None = None
                while True:
                    replica = await attempts.next(affinity, self._kv_request(request, affinity))
                    if attempts.first:
                        OVERHEAD.observe(time.perf_counter() - entered)
                    sent = payload
                    if produced:
                        sent += inference_pb2.GenerateRequest(resume_token_ids=produced).SerializeToString()
                    rid = replica.replica_id
                    call = self.pool.calls(replica).stream(
                        sent, timeout=_remaining(deadline), metadata=(*metadata, (REPLICA_HEADER, rid)))
                    attempts.sent(rid)
                    self.pool.watch(rid, call)
                    admitted = False  # it got a chunk: the replica had room for it
                    try:
                        while (relayed := await call.read()) is not grpc.aio.EOF:
                            if not admitted:
                                admitted = True
                                attempts.accepted()
                            chunk = relayed[0]
                            produced.extend(chunk.token_ids)
                            now = time.perf_counter()
                            if last is None:
                                series.ttft.observe(now - entered)
                            else:
                                series.itl.observe(now - last)
                            last = now
                            if chunk.finish_reason:
                                ticket.tokens = series.tokens(tenant, chunk.usage)
                                final = chunk
                            yield relayed
                        return
                    except grpc.aio.AioRpcError as e:
                        attempts.failed(replica, e, len(produced))
                    except asyncio.CancelledError:
                        if not self._replica_left(call):
                            raise
                        attempts.failed(replica, None, len(produced))
                    finally:
                        call.cancel()
                        self.pool.unwatch(rid, call)
                        attempts.ended(rid)
            finally:
                self._online_ends(online)
                Reservations.settle(reserved, final.usage.completion_tokens if final is not None else len(produced))
                if ticket.state is not None:
                    Gate.release(ticket)
        except BaseException as e:
            # closed or cancelled after its last chunk (the HTTP API stops reading there): the client has it all
            status = "OK" if final is not None and isinstance(e, GeneratorExit | asyncio.CancelledError) else _status(e)
            raise
        finally:
            series.done(tenant, status, entered)
            if ticket is not None:
                self._meter("stream", ticket, request.request_id, asked, request.adapter, replica,
                            final.usage if final is not None else None, final.model if final is not None else "",
                            status, entered, len(produced))

    async def generate(self, request: inference_pb2.GenerateRequest, timeout: float | None, api_key: Caller = "",
                       session: str = "", payload: bytes | None = None) -> Reply:
        """One whole completion, retried on another replica if its worker fails."""
        entered = time.perf_counter()
        asked = request.model  # what the key must allow: a fine-tuned adapter's own name, say
        added = inference_pb2.GenerateRequest()  # what the router changes, sent after the payload
        self.route_adapter(request, added)
        series = _series(self._label(request.model))
        tenant, status = "-", "OK"
        ticket: Ticket | None = None
        replica: mesh_pb2.ReplicaInfo | None = None
        reply: inference_pb2.GenerateResponse | None = None
        try:
            ticket = self._admit(api_key, asked, request.adapter)
            tenant = ticket.tenant
            online, reserved = "", None
            try:
                metadata = (*self.prepare(request, added), *self.credential)
                _stamp(request, added, ticket)
                online = self._online_begins(request)
                reserved = self.reservations.admit(request, added, ticket.tenant)
                payload = request.SerializeToString() if payload is None else payload + added.SerializeToString()
                deadline = None if timeout is None else time.monotonic() + timeout
                attempts = _Attempts(self, request.model, deadline, ticket.tenant, request.tenant_weight,
                                     _queue_priority(request, reserved is not None))
                affinity = affinity_key(request, session, prefix=self.prefix_affinity)
                while True:
                    replica = await attempts.next(affinity, self._kv_request(request, affinity))
                    if attempts.first:
                        OVERHEAD.observe(time.perf_counter() - entered)
                    rid = replica.replica_id
                    unary = self.pool.calls(replica).generate(
                        payload, timeout=_remaining(deadline), metadata=(*metadata, (REPLICA_HEADER, rid)))
                    attempts.sent(rid)
                    self.pool.watch(rid, unary)
                    try:
                        relayed = await unary
                        attempts.accepted()
                        break
                    except grpc.aio.AioRpcError as e:
                        attempts.failed(replica, e, 0)
                    except asyncio.CancelledError:
                        if not self._replica_left(unary):
                            raise
                        attempts.failed(replica, None, 0)
                    finally:
                        self.pool.unwatch(rid, unary)
                        attempts.ended(rid)
                reply = relayed[0]
                ticket.tokens = series.tokens(tenant, reply.usage)
                return relayed
            finally:
                self._online_ends(online)
                Reservations.settle(reserved, reply.usage.completion_tokens if reply is not None else 0)
                if ticket.state is not None:
                    Gate.release(ticket)
        except BaseException as e:
            status = _status(e)
            raise
        finally:
            series.done(tenant, status, entered)
            if ticket is not None:
                self._meter("generate", ticket, request.request_id, asked, request.adapter, replica,
                            reply.usage if reply is not None else None, reply.model if reply is not None else "",
                            status, entered)

    def _kv_request(self, request: inference_pb2.GenerateRequest, affinity: str
                    ) -> inference_pb2.GenerateRequest | None:
        """The request, for routing by the blocks replicas hold (router/kvroute.py), unless
        a session pins it or prefix affinity is off."""
        if not self.prefix_affinity or affinity.startswith("session|"):
            return None
        return request

    def _online_begins(self, request: inference_pb2.GenerateRequest) -> str:
        """Count a request that is not of the batch class on its deployment, which batches
        yield to (`ReplicaPool.online`); returns the deployment counted ("" for none)."""
        if request.service_class == "batch":
            return ""
        name = request.model.partition("@")[0]
        here = self.pool.online_here
        here[name] = here.get(name, 0) + 1
        self.pool.online_seen(name)
        return name

    def _online_ends(self, deployment: str) -> None:
        if deployment:
            _untrack(self.pool.online_here, deployment)
            self.pool.online_seen(deployment)

    def _label(self, model: str) -> str:
        """The model as a metric label: a deployment's name, or "other" (callers choose the
        string, and every distinct label value is a time series)."""
        name = model.partition("@")[0]
        return name if name in self.pool.deployments.items else "other"

    async def embed(self, request: inference_pb2.EmbedRequest, timeout: float | None,
                    api_key: Caller = "") -> inference_pb2.EmbedResponse:
        entered = time.perf_counter()
        ticket = self._admit(api_key, request.model)
        replica: mesh_pb2.ReplicaInfo | None = None
        response: inference_pb2.EmbedResponse | None = None
        status = "OK"
        try:
            replica = await self.pool.pick(request.model, deadline=timeout)
            with self.pool.track(replica):
                response = await self.pool.stub(replica).Embed(
                    request, timeout=timeout, metadata=((REPLICA_HEADER, replica.replica_id), *self.credential))
            ticket.tokens = response.usage.prompt_tokens
            return response
        except grpc.aio.AioRpcError as e:
            error = from_rpc_error(e)
            status = _status(error)
            raise error from None
        except BaseException as e:
            status = _status(e)
            raise
        finally:
            if ticket.state is not None:
                Gate.release(ticket)
            self._meter("embed", ticket, request.request_id, request.model, "", replica,
                        response.usage if response is not None else None,
                        response.model if response is not None else "", status, entered)

    def _may_use(self, who: Principal | None, model: str) -> bool:
        return self.gate is None or self.gate.may_use(who, model)

    def models(self, api_key: Caller = "") -> inference_pb2.ListModelsResponse:
        """Every deployment the caller's key may use, ready or not (`ready`: a replica is;
        scaled to zero or still loading: false, with `ready_replicas` 0), the adapters that
        deployments serve under their own names (`parent`: the deployment; as ready as it),
        and pipelines (registered or deployed: the routers run them, so they are ready)."""
        key = self.gate.identify(api_key) if self.gate is not None else None
        deployments: dict[str, inference_pb2.ServedModel] = {}
        for name, dep in self.pool.deployments.items.items():
            if dep.format != "pipeline":
                deployments[name] = inference_pb2.ServedModel(
                    name=name, version=dep.resolved_version.partition("@")[2], task="generate")
        for r in self.pool.replicas.items.values():  # what replicas tell: readiness, and what is served
            served = deployments.get(r.deployment)
            if served is None:
                continue
            if r.state == mesh_pb2.REPLICA_STATE_READY:
                if not served.ready:  # the first ready replica's version, task and context
                    served.version, served.context_length = str(r.model_version), r.context_length
                    served.task = r.task or served.task
                served.ready = True
                served.ready_replicas += 1
            elif not served.ready and r.task:
                served.task = r.task
        by_name = {name: m for name, m in deployments.items() if self._may_use(key, name)}
        for name, dep in self.pool.deployments.items.items():
            base = deployments.get(name)
            if base is None:
                continue
            for adapter in dep.adapters:
                if adapter not in by_name and self._may_use(key, adapter):
                    by_name[adapter] = inference_pb2.ServedModel(
                        name=adapter, version=adapter.partition("@")[2] or "latest", task="generate",
                        context_length=base.context_length, ready_replicas=base.ready_replicas, ready=base.ready,
                        parent=name)
        for name, dep in self.pool.deployments.items.items():
            if dep.format == "pipeline" and self._may_use(key, name):
                by_name[name] = inference_pb2.ServedModel(
                    name=name, version=dep.resolved_version.partition("@")[2], task="pipeline", ready=True)
        for name, model in self.pool.models.items.items():
            if model.latest_format == "pipeline" and name not in by_name and self._may_use(key, name):
                by_name[name] = inference_pb2.ServedModel(name=name, version=str(model.latest_version),
                                                          task="pipeline", ready=True)
        return inference_pb2.ListModelsResponse(models=[by_name[name] for name in sorted(by_name)])

def _stamp(request: inference_pb2.GenerateRequest, added: inference_pb2.GenerateRequest, ticket: Ticket) -> None:
    """Whose request it is and its class, for the worker's fair sharing: the key's tenant
    ("-": none, the admin), its weight, and the class asked for (at most the key's own;
    none asked: the key's). Set in `added` too, so what the client sent is replaced."""
    for name in ("reserved", "reserved_tokens_per_s"):
        if getattr(request, name):
            raise InvalidArgument(f"{name} is the router's to set (provisioned throughput, docs/fairness.md)",
                                  field=name)
    key = ticket.key
    tenant_var.set(ticket.tenant)  # on this request's log lines from here on
    model_var.set(request.model)
    request.tenant = added.tenant = ticket.tenant
    request.tenant_weight = added.tenant_weight = key.weight if key is not None and key.weight > 0 else 1.0
    own = key.service_class if key is not None and key.service_class else DEFAULT_CLASS
    asked = request.service_class
    if asked and key is not None and not key.admin and priority(asked) < priority(own):
        raise PermissionDenied(f"this key's requests may ask for class {own!r} at most, not {asked!r} "
                               "(the admin sets a key's class)", field="service_class")
    priority(asked)  # an unknown class is INVALID_ARGUMENT
    request.service_class = added.service_class = asked or own


RESERVATION_BURST = 10.0  # seconds of a reservation's tokens a tenant may use at once


class Reservations:
    """Provisioned throughput at the front door (docs/fairness.md#provisioned-throughput).
    Every request of a tenant with a reservation on the deployment carries its share per
    ready replica (`reserved_tokens_per_s`): each engine keeps that tenant a token bucket at
    that rate and ranks its waiting requests a class up while it holds tokens (engines/fair.py),
    deciding when it schedules, not when the request arrived. For this router's own waiting
    room, and for engines without buckets of their own (vLLM), a token bucket per deployment
    and tenant at this router's share of the rate: a request that finds tokens in it is
    marked `reserved` (a class up there); it takes up to a second of the rate at once and
    is charged what it made at its end."""

    def __init__(self, pool: ReplicaPool, gate: Gate | None) -> None:
        self.pool = pool
        self.gate = gate
        self.buckets: dict[tuple[str, str], Bucket] = {}

    def admit(self, request: inference_pb2.GenerateRequest, added: inference_pb2.GenerateRequest,
              tenant: str) -> tuple[Bucket, int] | None:
        if request.service_class == "batch":
            return None  # batches run on what is left; they spend no reservation
        name = request.model.partition("@")[0]
        dep = self.pool.deployments.items.get(name)
        rate = dep.reservations.get(tenant, 0) if dep is not None and dep.reservations else 0
        if not rate:
            return None
        request.reserved_tokens_per_s = added.reserved_tokens_per_s = rate / max(1, len(self.pool.ready(name)))
        routers = max(1, len(self.gate.routers.items)) if self.gate is not None else 1
        share = rate / routers
        bucket = self.buckets.setdefault((name, tenant), Bucket(0, period=RESERVATION_BURST))
        bucket.resize(share * RESERVATION_BURST)
        bucket.refill(time.monotonic())
        if bucket.amount <= 0:
            return None  # over its reservation: an ordinary request of its class
        # taken now: what it may make, at most a second of the rate (so that one long request
        # does not empty the bucket for the tenant's others); settled with what it made
        taken = int(min(request.params.max_tokens or 16, max(1.0, share)))
        bucket.take(taken)
        # engines that keep no buckets of their own (vLLM: its scheduler has no tenants)
        # rank it a class up by this mark; the built-in engine goes by the rate instead
        request.reserved = added.reserved = True
        return bucket, taken

    @staticmethod
    def settle(reserved: tuple[Bucket, int] | None, made: int) -> None:
        """Charge a reserved request what it made, less what it took when admitted."""
        if reserved is not None:
            bucket, taken = reserved
            bucket.take(made - taken)


def _untrack(in_flight: dict[str, int], rid: str) -> None:
    n = in_flight[rid] - 1
    if n > 0:
        in_flight[rid] = n
    else:
        del in_flight[rid]


def _queue_priority(request: inference_pb2.GenerateRequest, reserved: bool) -> int:
    """A request's class as the waiting room orders it: as the worker's engine does
    (convert.py), a request inside its tenant's reservation counts a class up."""
    return max(0, priority(request.service_class) - reserved)


class _Attempts:
    """The replicas one request tries, and why it stops trying.

    - UNAVAILABLE (the worker died or is draining): avoid that worker for a while and try
      another replica, at most `max_attempts` in all; a stream resumes where it was. When no
      other replica is ready, wait for one (the scheduler re-places the lost replica, a worker
      joins) for up to `failover_timeout` seconds and never past the request's deadline.
    - RESOURCE_EXHAUSTED with a retry hint before the first token (the replica's queue is
      full): try the others; when every one is full, shed the request with RESOURCE_EXHAUSTED and the
      soonest retry-after hint the replicas gave (their engines estimate when a slot frees),
      or, with a `queue_timeout`, first wait in the router's waiting room (waiting.py: one
      queue per tenant, woken in weighted-fair order when room may have appeared) for up to
      that long, with at most `max_waiting` requests waiting in this router. Never an
      unbounded queue: the engines bound theirs, so an admitted request's time to first
      token stays bounded and the rest are refused at once rather than queued behind them.
    - Anything else, RESOURCE_EXHAUSTED without a hint included (a request too big for the
      replica's KV budget), is the request's own answer and is passed on.
    """

    def __init__(self, forwarder: Forwarder, model: str, deadline: float | None, tenant: str = "-",
                 weight: float = 1.0, priority: int = 1) -> None:
        self.fw, self.model, self.deadline, self.tenant, self.weight = forwarder, model, deadline, tenant, weight
        self.priority = priority  # its class in the waiting room (_queue_priority)
        self.tried: set[str] = set()      # failed (UNAVAILABLE) or in use by this attempt
        self.full: set[str] = set()       # refused for being full, this round
        self.retry_after: float | None = None  # the soonest a full replica expects room
        self.failures = 0
        self.waiter: Waiter | None = None  # its place in the waiting room, once it waited
        self.left_room: float | None = None  # when it last left the waiting room to try a replica
        self.counted = False  # its wait is in QUEUE_WAIT
        self.refused = False  # the call in flight was refused for a full queue, or its replica failed
        self.first = True
        self.lost = ""  # the last failure, for the error if no replica takes over

    async def next(self, affinity: str, request: inference_pb2.GenerateRequest | None = None
                   ) -> mesh_pb2.ReplicaInfo:
        pool = self.fw.pool
        if self.lost and not self._untried():
            await self._wait_for_replica()
        rooms = self.fw.rooms
        if self.waiter is None and self.fw.queue_timeout and rooms.queued(self.model, self.tenant, self.priority):
            await self._wait_for_room()  # behind its tenant's requests of its class: first come, first served
        while True:
            for r in pool.ready(self.model):  # replicas that just said they are full: not asked again
                hint = pool.full(r.replica_id, self.tenant, self.priority)
                if hint is not None and r.replica_id not in self.tried:
                    self.full.add(r.replica_id)
                    self.retry_after = hint if self.retry_after is None else min(self.retry_after, hint)
            if not self.full or any(r.replica_id not in self.tried | self.full for r in pool.ready(self.model)):
                break
            await self._wait_for_room()
            self.full.clear()
        replica = await pool.pick(self.model, self.tried | self.full, _remaining(self.deadline), affinity, request)
        self.first = not self.tried and not self.full and self.waiter is None
        if self.waiter is not None:
            self.left_room = time.monotonic()
        self.tried.add(replica.replica_id)
        return replica

    def sent(self, replica_id: str) -> None:
        """A call of this request went to the replica."""
        in_flight = self.fw.pool.in_flight
        in_flight[replica_id] = in_flight.get(replica_id, 0) + 1
        self.refused = False
        self.fw.rooms.started(self.model, self.tenant, self.priority)

    def accepted(self) -> None:
        """The replica took the call (its first chunk, or its answer)."""
        if self.waiter is not None:
            self.fw.rooms.accepted(self.model, self.waiter)

    def ended(self, replica_id: str) -> None:
        """That call ended. Unless the replica refused it for a full queue or failed, it
        had taken it (served, cancelled, timed out or answered with an error), so its slot
        or queue place is free again: the replica's full marks go, and a request waiting
        for room is woken. A refused call leaves the replica's full mark."""
        _untrack(self.fw.pool.in_flight, replica_id)
        served = not self.refused
        if served:
            self.fw.pool.freed(replica_id)
            if self.left_room is not None:
                self._waited(self.left_room)
        self.fw.rooms.ended(self.model, self.tenant, self.weight, served=served, replica_id=replica_id,
                            priority=self.priority)

    def _waited(self, until: float) -> None:
        """Count the time this request waited for room (once: a moved stream does not wait again)."""
        if self.waiter is not None and not self.counted:
            self.counted = True
            QUEUE_WAIT.labels(self.fw._label(self.model), self.tenant).observe(until - self.waiter.since)

    async def _wait_for_room(self) -> None:
        now = time.monotonic()
        if not self.fw.queue_timeout:
            self._shed()
        if self.waiter is None:
            self.waiter = Waiter(self.tenant, self.weight, now, self.priority)
        left = self.fw.queue_timeout - (now - self.waiter.since)
        if self.deadline is not None:
            left = min(left, self.deadline - QUEUE_POLL - now)
        if left <= 0:
            self._shed()
        label = self.fw._label(self.model)
        WAITING.labels(label).inc()
        try:
            await self.fw.rooms.wait(self.model, self.waiter, left)
        except RoomFull:
            self._shed()
        finally:
            WAITING.labels(label).dec()

    def _shed(self) -> NoReturn:
        SHED.labels(self.fw._label(self.model)).inc()
        self._waited(time.monotonic())
        hint = max(0.1, round(self.retry_after, 1)) if self.retry_after is not None else 1.0
        raise ResourceExhausted(f"every replica of {self.model!r} is at capacity; retry in {hint:g}s",
                                retry_after=hint)

    def _untried(self) -> bool:
        return any(r.replica_id not in self.tried for r in self.fw.pool.ready(self.model))

    async def _wait_for_replica(self) -> None:
        """Wait for a ready replica this request has not tried, within its deadline."""
        wait = self.fw.failover_timeout
        left = _remaining(self.deadline)
        bound_by_deadline = left is not None and left < wait
        if left is not None:
            wait = min(wait, left)
        log.info("%s; waiting up to %.1fs for another replica of %s", self.lost, wait, self.model)
        if wait > 0 and await self.fw.pool.replicas.wait_for(lambda _: self._untried(), wait):
            return
        if bound_by_deadline:
            raise DeadlineExceeded(f"{self.lost}, and no other replica was ready before the request's deadline")
        raise Unavailable(f"{self.lost}, and no other replica was ready within {self.fw.failover_timeout:g}s")

    def failed(self, replica: mesh_pb2.ReplicaInfo, e: grpc.aio.AioRpcError | None, produced: int) -> None:
        """Decide after a failed call (None: abandoned because its replica left etcd): return
        to try again, or raise the request's error."""
        code = e.code() if e is not None else grpc.StatusCode.UNAVAILABLE
        details = (e.details() or "") if e is not None else LEFT
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not produced and e is not None:
            refusal = from_rpc_error(e)
            hint = getattr(refusal, "retry_after", None)
            if hint is None:  # not a full queue but this request (too big for the KV budget): its answer
                raise refusal from None
            self.tried.discard(replica.replica_id)
            self.full.add(replica.replica_id)
            self.retry_after = hint if self.retry_after is None else min(self.retry_after, hint)
            self.fw.pool.mark_full(replica.replica_id, hint, self.tenant, self.priority)
            self.refused = True
            return
        if e is not None and code != grpc.StatusCode.UNAVAILABLE:
            raise from_rpc_error(e) from None
        self.failures += 1
        self.refused = True  # the replica failed: it freed nothing
        self.fw.pool.mark_failed(replica)
        where = f"after {produced} tokens" if produced else "before the first token"
        if self.failures >= self.fw.max_attempts:
            raise Unavailable(f"worker {replica.worker_id} failed {where} ({details}), "
                              f"and {self.fw.max_attempts} attempts were used up")
        self.lost = f"worker {replica.worker_id} failed {where} ({details})"
        trace.get_current_span().add_event("replica failed", {
            "maas.worker": replica.worker_id, "maas.replica": replica.replica_id, "maas.tokens_produced": produced})
        if produced:
            MIGRATIONS.labels(self.fw._label(self.model)).inc()
            log.warning("%s; moving the stream to another replica", self.lost)
        else:
            RETRIES.labels(self.fw._label(self.model)).inc()
