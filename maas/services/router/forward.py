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
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from prometheus_client import Counter, Histogram

from maas.mesh.clients import REPLICA_HEADER
from maas.mesh.errors import MaasError, Unavailable, from_rpc_error
from maas.mesh.logs import new_request_id, request_id_var
from maas.services.router.pool import ReplicaPool
from maas.services.router.tenants import Gate, Ticket
from maas.v1 import common_pb2, inference_pb2, mesh_pb2

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # replicas one request may try (first attempt included)

RETRIES = Counter("maas_router_retries_total", "Requests re-sent to another replica before their first token.",
                  ["model"])
MIGRATIONS = Counter("maas_router_migrations_total",
                     "Streams moved to another replica after their worker failed mid-stream.", ["model"])


PREFIX_CHARS = 256      # prompt characters that make the prefix-affinity key (about 64 tokens)
MIN_PREFIX_CHARS = 128  # shorter prompts gain little from a cached prefix: least load instead
SESSION_HEADER = "x-session-id"


def affinity_key(request: inference_pb2.GenerateRequest, session: str = "") -> str:
    """Where a request would rather go: its session's replica; else the replica likely to
    hold its prompt's prefix (and adapter) in cache; else anywhere ("")."""
    if session:
        return f"session|{session}"
    text = request.prompt or "".join(f"{m.role}:{m.content}\n" for m in getattr(request, "messages", ()))
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


@dataclass
class _Record:
    """One request's figures, recorded when it ends."""

    model: str
    started: float
    tenant: str = "-"
    status: str = "OK"
    last: float | None = None

    def chunk(self, now: float) -> None:
        if self.last is None:
            TTFT.labels(self.model).observe(now - self.started)
        else:
            ITL.labels(self.model).observe(now - self.last)
        self.last = now

    def usage(self, usage: common_pb2.Usage) -> int:
        TOKENS.labels(self.model, self.tenant, "prompt").inc(usage.prompt_tokens)
        TOKENS.labels(self.model, self.tenant, "completion").inc(usage.completion_tokens)
        return usage.prompt_tokens + usage.completion_tokens

    def done(self) -> None:
        REQUESTS.labels(self.model, self.tenant, self.status).inc()
        E2E.labels(self.model).observe(time.perf_counter() - self.started)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Forwarder:
    """`api_key` is the caller's credential as sent (gRPC metadata or an HTTP bearer
    token); tenants, keys and limits check it here, for both front ends."""

    def __init__(self, pool: ReplicaPool, gate: Gate | None = None, *, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.pool = pool
        self.gate = gate
        self.max_attempts = max_attempts

    @contextlib.asynccontextmanager
    async def _admit(self, api_key: str, model: str) -> AsyncIterator[Ticket]:
        if self.gate is None:
            yield Ticket(None)
            return
        async with self.gate.admit(api_key, model) as ticket:
            yield ticket

    @staticmethod
    def prepare(request: inference_pb2.GenerateRequest) -> tuple[tuple[str, str], ...]:
        """Give the request an id (the caller's, the log context's, or a new one)."""
        rid = request.request_id or (request_id_var.get() if request_id_var.get() != "-" else new_request_id())
        request.request_id = rid
        return (("x-request-id", rid),)

    async def stream(self, request: inference_pb2.GenerateRequest, timeout: float | None,
                     api_key: str = "", session: str = "") -> AsyncIterator[inference_pb2.GenerateChunk]:
        """Chunks of one generation, moved to another replica if its worker fails."""
        record = _Record(self._label(request.model), time.perf_counter())
        try:
            async with self._admit(api_key, request.model) as ticket:
                record.tenant = ticket.tenant
                async for chunk in self._stream(request, timeout, affinity_key(request, session)):
                    record.chunk(time.perf_counter())
                    if chunk.finish_reason:
                        ticket.tokens = record.usage(chunk.usage)
                    yield chunk
        except BaseException as e:
            record.status = _status(e)
            raise
        finally:
            record.done()

    async def _stream(self, request: inference_pb2.GenerateRequest, timeout: float | None,
                      affinity: str) -> AsyncIterator[inference_pb2.GenerateChunk]:
        entered = time.perf_counter()
        metadata = self.prepare(request)
        params = request.params
        if not params.HasField("seed") and not (params.HasField("temperature") and params.temperature == 0):
            params.seed = random.getrandbits(63)  # a resumed stream must sample as the first attempt would
        deadline = None if timeout is None else time.monotonic() + timeout
        produced: list[int] = []
        tried: set[str] = set()
        for attempt in range(self.max_attempts):
            replica = await self.pool.pick(request.model, tried, _remaining(deadline), affinity)
            if not tried:
                OVERHEAD.observe(time.perf_counter() - entered)
            tried.add(replica.replica_id)
            sent = request
            if produced:
                sent = inference_pb2.GenerateRequest()
                sent.CopyFrom(request)
                sent.resume_token_ids.extend(produced)
            call = self.pool.stub(replica).GenerateStream(
                sent, timeout=_remaining(deadline), metadata=(*metadata, (REPLICA_HEADER, replica.replica_id)))
            try:
                with self.pool.track(replica):
                    async for chunk in call:
                        produced.extend(chunk.token_ids)
                        yield chunk
                return
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(e) from None
                self._failed(replica, request, e, produced, tried, last=attempt + 1 >= self.max_attempts)
            finally:
                call.cancel()

    def _failed(self, replica: mesh_pb2.ReplicaInfo, request: inference_pb2.GenerateRequest,
                e: grpc.aio.AioRpcError, produced: list[int], tried: set[str], *, last: bool) -> None:
        """A replica failed a request (its worker died, or is going away): avoid it for a
        while, and try another unless this was the last attempt."""
        self.pool.mark_failed(replica)
        where = f"after {len(produced)} tokens" if produced else "before the first token"
        if last:
            raise Unavailable(f"worker {replica.worker_id} failed {where} ({e.details()}), "
                              f"and {self.max_attempts} attempts were used up")
        if not any(r.replica_id not in tried for r in self.pool.ready(request.model)):
            raise Unavailable(f"worker {replica.worker_id} failed {where} ({e.details()}), "
                              "and no other replica is ready")
        if produced:
            MIGRATIONS.labels(request.model).inc()
            log.warning("worker %s failed %s (%s); moving the stream to another replica",
                        replica.worker_id, where, e.details())
        else:
            RETRIES.labels(request.model).inc()

    async def generate(self, request: inference_pb2.GenerateRequest, timeout: float | None,
                       api_key: str = "", session: str = "") -> inference_pb2.GenerateResponse:
        """One whole completion, retried on another replica if its worker fails."""
        record = _Record(self._label(request.model), time.perf_counter())
        try:
            async with self._admit(api_key, request.model) as ticket:
                record.tenant = ticket.tenant
                response = await self._generate(request, timeout, affinity_key(request, session))
                ticket.tokens = record.usage(response.usage)
                return response
        except BaseException as e:
            record.status = _status(e)
            raise
        finally:
            record.done()

    def _label(self, model: str) -> str:
        """The model as a metric label: a deployment's name, or "other" (callers choose the
        string, and every distinct label value is a time series)."""
        name = model.partition("@")[0]
        return name if name in self.pool.deployments.items else "other"

    async def _generate(self, request: inference_pb2.GenerateRequest, timeout: float | None,
                        affinity: str) -> inference_pb2.GenerateResponse:
        entered = time.perf_counter()
        metadata = self.prepare(request)
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: set[str] = set()
        for attempt in range(self.max_attempts):
            replica = await self.pool.pick(request.model, tried, _remaining(deadline), affinity)
            if not tried:
                OVERHEAD.observe(time.perf_counter() - entered)
            tried.add(replica.replica_id)
            try:
                with self.pool.track(replica):
                    return await self.pool.stub(replica).Generate(
                        request, timeout=_remaining(deadline),
                        metadata=(*metadata, (REPLICA_HEADER, replica.replica_id)))
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(e) from None
                self._failed(replica, request, e, [], tried, last=attempt + 1 >= self.max_attempts)
        raise AssertionError("unreachable")

    async def embed(self, request: inference_pb2.EmbedRequest, timeout: float | None,
                    api_key: str = "") -> inference_pb2.EmbedResponse:
        async with self._admit(api_key, request.model) as ticket:
            replica = await self.pool.pick(request.model, deadline=timeout)
            try:
                with self.pool.track(replica):
                    response = await self.pool.stub(replica).Embed(
                        request, timeout=timeout, metadata=((REPLICA_HEADER, replica.replica_id),))
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e) from None
            ticket.tokens = response.usage.prompt_tokens
            return response

    def models(self, api_key: str = "") -> inference_pb2.ListModelsResponse:
        """Deployments with at least one ready replica (those the caller's key may use)."""
        key = self.gate.identify(api_key) if self.gate is not None else None
        by_name: dict[str, inference_pb2.ServedModel] = {}
        for r in self.pool.replicas.items.values():
            if r.state != mesh_pb2.REPLICA_STATE_READY or not Gate.may_use(key, r.deployment):
                continue
            if r.deployment not in by_name:
                by_name[r.deployment] = inference_pb2.ServedModel(
                    name=r.deployment, version=str(r.model_version), task=r.task or "generate",
                    context_length=r.context_length)
            by_name[r.deployment].ready_replicas += 1
        return inference_pb2.ListModelsResponse(models=[by_name[name] for name in sorted(by_name)])
