"""Which replica serves a request: ready replicas from etcd, least in-flight first.

The pool mirrors `replicas/` (written by workers under their leases) so a worker that
dies disappears from routing as soon as its lease expires; a worker that fails a call
is avoided for a few seconds before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from maas.mesh.clients import RegistryClient, dial, pick_endpoint
from maas.mesh.discovery import PrefixMirror
from maas.mesh.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MaasError,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from maas.mesh.etcd import EtcdSession
from maas.services.router.kvroute import KvRouter
from maas.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    mesh_pb2,
    registry_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

log = logging.getLogger(__name__)

KV_ROUTED = Counter("maas_router_kv_routed_requests_total",
                    "Requests sent to the replica holding most of their prompt's prefix (KV-aware routing).",
                    ["model"])
KV_MATCHED = Counter("maas_router_kv_matched_blocks_total",
                     "Prompt prefix blocks the chosen replica held, over KV-routed requests.", ["model"])

SUSPECT_SECONDS = 5.0
FULL_SECONDS = 0.2  # how long a replica that said its queue is full is refused here without asking it
COLD_START_SECONDS = 60.0  # how long a request waits for a scaled-to-zero model to load
REAPPEAR_SECONDS = 3.0  # how long a request waits for a model whose ready replicas left a moment ago
RECENT_READY_SECONDS = 30.0  # ... "a moment ago": a request found one ready this recently
REPORT_FRESH_SECONDS = 2.0  # workers report load twice a second
ONLINE_LINGER = 1.0  # seconds after the last online request on a deployment that batches still yield to it
AFFINITY_FACTOR = 1.5       # an affine replica is used while its load is at most this times the average
AFFINITY_SLACK = 4          # ... or this many requests, whichever is more


def _rank(key: str, replica_id: str) -> bytes:
    """Rendezvous (highest random weight) hashing: the replica ranked first for a key stays
    first as replicas come and go, except when it is the one that went."""
    return hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest()


_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


def relay_response(raw: bytes) -> tuple[inference_pb2.GenerateResponse, bytes]:
    return inference_pb2.GenerateResponse.FromString(raw), raw


def relay_chunk(raw: bytes) -> tuple[inference_pb2.GenerateChunk, bytes]:
    return inference_pb2.GenerateChunk.FromString(raw), raw


@dataclass(frozen=True, slots=True)
class Calls:
    """One worker endpoint's generation calls, made once per endpoint. They relay bytes: the
    request goes out as given (already serialized), and each reply comes back both parsed
    (the router reads tokens and usage) and as received, to be passed on unchanged."""

    generate: grpc.aio.UnaryUnaryMultiCallable[bytes, tuple[inference_pb2.GenerateResponse, bytes]]
    stream: grpc.aio.UnaryStreamMultiCallable[bytes, tuple[inference_pb2.GenerateChunk, bytes]]
    stub: inference_pb2_grpc.InferenceStub

    @classmethod
    def of(cls, channel: grpc.aio.Channel) -> Calls:
        return cls(channel.unary_unary(f"/{_SERVICE}/Generate", request_serializer=None,
                                       response_deserializer=relay_response, _registered_method=True),
                   channel.unary_stream(f"/{_SERVICE}/GenerateStream", request_serializer=None,
                                        response_deserializer=relay_chunk, _registered_method=True),
                   inference_pb2_grpc.InferenceStub(channel))


class ReplicaPool:
    def __init__(self, session: EtcdSession, *, cold_start_timeout: float = COLD_START_SECONDS) -> None:
        self.session = session
        self.cold_start_timeout = cold_start_timeout
        self._scheduler: grpc.aio.Channel | None = None
        self._activating: dict[str, asyncio.Future[None]] = {}
        self.replicas = PrefixMirror(session, session.keys.replicas(), mesh_pb2.ReplicaInfo)
        self.deployments = PrefixMirror(session, session.keys.deployments(), scheduler_pb2.Deployment)
        self.models = PrefixMirror(session, session.keys.models(), registry_pb2.Model)  # owners of adapters
        self.in_flight: dict[str, int] = {}
        self._suspect: dict[str, float] = {}
        # replica -> (tenant, class priority) -> (until, its retry hint), see mark_full
        self._full: dict[str, dict[tuple[str, int], tuple[float, float]]] = {}
        self._reported: dict[str, tuple[int, float]] = {}  # replica -> (in flight, when reported)
        self._online_seen: dict[str, float] = {}  # deployment -> when requests not of the batch class last ran
        self.online_here: dict[str, int] = {}  # deployment -> this router's requests in flight not of the batch class
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[str, Calls] = {}
        self._ready: dict[str, list[mesh_pb2.ReplicaInfo]] = {}  # model -> ready replicas, until a change
        self._last_ready: dict[str, float] = {}  # model -> when a request last found a ready replica
        self.registry = RegistryClient(session)
        forget: Callable[..., None] = lambda *_: self._ready.clear()  # noqa: E731
        self.replicas.add_listener(forget)
        self.deployments.add_listener(forget)
        self._calls_on: dict[str, set[grpc.aio.Call]] = {}  # replica -> calls in flight on it
        self._abandoned: set[grpc.aio.Call] = set()
        self.replicas.add_listener(self._replica_changed)
        self.kv: KvRouter | None = None  # routing by cached blocks, once the router wires it (main.py)

    async def start(self) -> None:
        await self.replicas.start()
        await self.deployments.start()
        await self.models.start()

    async def close(self) -> None:
        await self.replicas.close()
        await self.deployments.close()
        await self.models.close()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        self._calls.clear()
        if self._scheduler is not None:
            await self._scheduler.close()
        await self.registry.close()

    def owner(self, model: str) -> str:
        """The tenant `model` belongs to: a deployment's owner for a deployment's name, the
        model's for `name@version` and for a model or adapter by name (what `ready` routes
        it to); "" for the platform's, and for a name nobody knows (which fails as not found)."""
        name, _, version = model.partition("@")
        dep = self.deployments.items.get(name)
        if dep is not None and not version:
            return dep.owner
        registered = self.models.items.get(name)
        return registered.owner if registered is not None else ""

    @staticmethod
    def not_found(model: str) -> str:
        """What a request for a model that does not exist is told (and one the caller may not see)."""
        name, _, version = model.partition("@")
        if version:
            return f"model {name!r} has no version {version!r} (see `maas models list`)"
        return f"model {name!r} is not registered (see `maas models list`)"

    def serving_adapter(self, model: str) -> str:
        """The deployment that lists `model` among its adapters, or ""."""
        for name, dep in self.deployments.items.items():
            if model in dep.adapters:
                return name
        return ""

    @staticmethod
    def _serves(r: mesh_pb2.ReplicaInfo, name: str, version: str, deployment: bool) -> bool:
        """Whether a replica answers for `name[@version]`: a deployment's name means its own
        replicas only (names of deployments and of models are chosen apart, by different
        tenants, so a name never reaches another deployment's replicas through the model it
        happens to serve); `name@version` and an undeployed model's name mean its versions."""
        if version:
            return r.model_name == name and str(r.model_version) == version
        return r.deployment == name if deployment else r.model_name == name

    def ready(self, model: str) -> list[mesh_pb2.ReplicaInfo]:
        """Ready replicas serving `model` (kept until the next change under replicas/ or
        deployments/; do not modify the list)."""
        found = self._ready.get(model)
        if found is None:
            name, _, version = model.partition("@")
            deployment = name in self.deployments.items
            found = [r for r in self.replicas.items.values()
                     if r.state == mesh_pb2.REPLICA_STATE_READY and self._serves(r, name, version, deployment)]
            if len(self._ready) >= 4096:  # callers choose model strings: bounded
                self._ready.clear()
            self._ready[model] = found
        return found

    def observe(self, report: mesh_pb2.LoadReport) -> None:
        """A worker's load report: its replicas' requests in flight, from every router."""
        now = time.monotonic()
        for load in report.replicas:
            self._reported[load.replica_id] = (load.in_flight, now)
            if load.online_in_flight:
                self._online_seen[load.deployment] = now

    def online(self, model: str) -> bool:
        """Whether requests not of the batch class run on the deployment `model` names (a
        deployment, or one of its adapters; anything else, a pipeline say: any deployment),
        or ran there within the last ONLINE_LINGER seconds: batches yield to them. Known from
        this router's own requests at once, and from the workers' reports (every router's)."""
        name = model.partition("@")[0]
        deployment = name if name in self.deployments.items else self.serving_adapter(name)
        now = time.monotonic()
        if deployment:
            return self.online_here.get(deployment, 0) > 0 or now - self._online_seen.get(deployment, 0.0) < ONLINE_LINGER
        return any(self.online_here.values()) or any(now - at < ONLINE_LINGER for at in self._online_seen.values())

    def online_seen(self, deployment: str) -> None:
        """A request not of the batch class began or ended on `deployment` just now."""
        self._online_seen[deployment] = time.monotonic()

    def load(self, replica_id: str) -> int:
        """Requests in flight on a replica: this router's count, or the worker's report
        (which includes other routers' requests) while it is fresh, whichever is higher."""
        local = self.in_flight.get(replica_id, 0)
        reported, at = self._reported.get(replica_id, (0, 0.0))
        return max(local, reported) if time.monotonic() - at < REPORT_FRESH_SECONDS else local

    def choose(self, candidates: list[mesh_pb2.ReplicaInfo], affinity: str = "") -> mesh_pb2.ReplicaInfo:
        """With an affinity key (a session, or an adapter and prompt prefix): the replica that
        rendezvous hashing ranks first for it, unless that one is loaded well above the
        average (bounded load), then the next; otherwise, and without a key, the less loaded
        of two picked at random (power of two choices)."""
        if len(candidates) == 1:
            return candidates[0]
        loads = {r.replica_id: self.load(r.replica_id) for r in candidates}
        if affinity:
            bound = self._bound(candidates)
            for r in sorted(candidates, key=lambda r: _rank(affinity, r.replica_id)):
                if loads[r.replica_id] + 1 <= bound:
                    return r
        a, b = random.sample(candidates, 2)
        return a if loads[a.replica_id] <= loads[b.replica_id] else b

    async def pick(self, model: str, exclude: set[str] = frozenset(),  # type: ignore[assignment]
                   deadline: float | None = None, affinity: str = "",
                   request: inference_pb2.GenerateRequest | None = None) -> mesh_pb2.ReplicaInfo:
        """A ready replica, avoiding recently failed workers: with a `request` and replicas
        that report their cached blocks, the one holding most of its prompt's prefix
        (`kvroute.KvRouter`, within the same load bound), else as `choose` says. A model
        scaled to zero is started and waited for (at most `deadline` seconds)."""
        if not model:
            raise InvalidArgument("model must not be empty", field="model")
        ready = self.ready(model)
        if ready:
            self._last_ready[model] = time.monotonic()
        if exclude:
            ready = [r for r in ready if r.replica_id not in exclude]
        if not ready and not exclude and (await self._cold_start(model, deadline)
                                          or await self._reappear(model, deadline)):
            ready = self.ready(model)
        if not ready:
            await self._explain_none(model, tried=bool(exclude))
        ready = self._split(model, ready)
        if self._suspect:
            now = time.monotonic()
            ready = [r for r in ready if self._suspect.get(r.endpoint, 0) < now] or ready
        if request is not None and self.kv is not None and len(ready) > 1:
            try:
                found = await self.kv.choose(ready, request, self.load, self._bound(ready))
            except Exception:  # a routing hint must never fail a request: the next rule decides
                log.warning("KV-aware routing failed for a request to %s; routing it by the other rules", model,
                            exc_info=True)
                found = None
            if found is not None:
                KV_ROUTED.labels(model.partition("@")[0]).inc()
                KV_MATCHED.labels(model.partition("@")[0]).inc(found[1])
                return found[0]
        return self.choose(ready, affinity)

    def _bound(self, candidates: list[mesh_pb2.ReplicaInfo]) -> float:
        """The most requests in flight a replica may have and still be preferred for its
        cache (bounded load): AFFINITY_FACTOR times the average, at least AFFINITY_SLACK."""
        total = sum(self.load(r.replica_id) for r in candidates)
        return max(AFFINITY_SLACK, (total + 1) / len(candidates) * AFFINITY_FACTOR)

    def _split(self, model: str, ready: list[mesh_pb2.ReplicaInfo]) -> list[mesh_pb2.ReplicaInfo]:
        """The replicas of the version this request goes to: a canary gets its weight's share
        of requests; otherwise the deployment's version (older versions serve only until it is
        ready during a rollout)."""
        dep = self.deployments.items.get(model)
        if dep is None or (len(ready) == 1 and not dep.traffic):
            return ready

        def of(ref: str) -> list[mesh_pb2.ReplicaInfo]:
            return [r for r in ready if f"{r.model_name}@{r.model_version}" == ref]

        stable = of(dep.resolved_version)
        if dep.traffic:
            canary = of(dep.traffic[0].model)
            if stable and canary:
                return canary if random.uniform(0, 100) < dep.traffic[0].weight else stable
            return stable or canary or ready
        return stable or ready

    async def _cold_start(self, model: str, deadline: float | None) -> bool:
        """If `model` names an autoscaled deployment, ask the scheduler for a replica and wait
        until one is ready. False when it is not autoscaled; Unavailable on time-out."""
        name, _, version = model.partition("@")
        dep = self.deployments.items.get(name)
        if dep is None or not dep.autoscale.max_replicas or version:
            return False
        timeout = self.cold_start_timeout if deadline is None else min(deadline, self.cold_start_timeout)
        started = time.monotonic()
        if name not in self._activating:  # one Activate per model at a time, however many requests wait
            future = self._activating[name] = asyncio.ensure_future(self._activate(name))
            future.add_done_callback(lambda _: self._activating.pop(name, None))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._activating[name])
        except TimeoutError:
            pass  # answered below, like a replica that did not get ready in time
        except MaasError as e:
            raise Unavailable(f"model {name!r} has no replica and could not be started: {e}") from None
        left = max(0.0, timeout - (time.monotonic() - started))
        if left and await self.replicas.wait_for(lambda _: bool(self.ready(model)), left):
            return True
        if deadline is not None and deadline < self.cold_start_timeout:
            raise DeadlineExceeded(f"model {name!r} was starting (a cold start) and no replica was ready "
                                   f"before the request's deadline ({deadline:.1f}s)")
        raise Unavailable(f"model {name!r} is starting (a cold start) but no replica was ready within "
                          f"{timeout:.0f}s; `maas deploy show {name}` says why; try again shortly")

    async def _reappear(self, model: str, deadline: float | None) -> bool:
        """Wait up to REAPPEAR_SECONDS for a ready replica of `model` if a request found one
        in the last RECENT_READY_SECONDS: a worker whose lease lapsed for a moment (a stalled
        event loop) comes back within a few seconds, and its requests should wait, not fail.
        A model that had no ready replica lately is answered at once."""
        seen = self._last_ready.get(model)
        if seen is None or time.monotonic() - seen > RECENT_READY_SECONDS:
            return False
        name, _, version = model.partition("@")
        dep = self.deployments.items.get(name)
        if version or dep is None or not dep.replicas:
            return False  # a version, or a deployment deleted or scaled to 0: nothing to wait for
        timeout = REAPPEAR_SECONDS if deadline is None else min(deadline, REAPPEAR_SECONDS)
        return await self.replicas.wait_for(lambda _: bool(self.ready(model)), timeout)

    async def _activate(self, name: str) -> None:
        for attempt in range(2):
            try:
                if self._scheduler is None:
                    self._scheduler = dial(await pick_endpoint(self.session.client, self.session.keys, "scheduler"),
                                           self.session.config.credential, self.session.config.tls)
                await scheduler_pb2_grpc.SchedulerStub(self._scheduler).Activate(
                    scheduler_pb2.ActivateRequest(name=name), timeout=min(5.0, self.cold_start_timeout))
                return
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt:
                    raise from_rpc_error(e) from None
                await self._scheduler.close()  # type: ignore[union-attr]
                self._scheduler = None  # it may have moved: look it up again

    async def _explain_none(self, model: str, *, tried: bool) -> None:
        name, _, version = model.partition("@")
        if tried:
            raise Unavailable(f"model {model!r}: every ready replica failed this request; try again")
        if version:
            if not await self._registered(model):
                raise NotFound(self.not_found(model))
            raise Unavailable(f"{model} is registered but no replica of that version is ready")
        dep = self.deployments.items.get(name)
        if dep is not None and dep.replicas == 0:
            raise Unavailable(f"deployment {name!r} is scaled to 0 replicas; run `maas deploy scale {name} "
                              f"--replicas N` (or `--min 0 --max N` to start it on demand)")
        if dep is not None:
            states = [mesh_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_").lower()
                      for r in self.replicas.items.values() if r.deployment == name]
            raise Unavailable(f"model {model!r} has no ready replica (0 of {dep.replicas} ready"
                              + (f"; replicas: {', '.join(states)}" if states else "; none placed yet") + ")")
        try:
            version = await self.registry.resolve(name, timeout=2.0)  # only on the failure path
        except NotFound:
            raise NotFound(self.not_found(name)) from None
        except Unavailable:
            raise Unavailable(f"model {name!r} has no ready replica and the registry is unreachable") from None
        if version.base:  # an adapter: served beside its base, not on its own
            serving = sorted(d for d, dep in self.deployments.items.items() if dep.resolved_version == version.base)
            where = serving[0] if serving else "<a deployment of " + version.base + ">"
            raise Unavailable(f"model {name!r} is a LoRA adapter of {version.base} that no deployment serves under "
                              f"its name; add it with `maas deploy update {where} --adapters {name}`, or ask "
                              f"for model {where!r} with adapter {name!r}")
        raise Unavailable(f"model {name!r} is registered but not deployed (run `maas deploy create {name}`)")

    async def _registered(self, ref: str) -> bool:
        """Does the registry know `ref` ("name" or "name@version")? Only asked on the failure path."""
        try:
            return await self.registry.exists(ref)
        except Unavailable:
            raise Unavailable(f"model {ref!r} has no ready replica and the registry is unreachable") from None

    def calls(self, replica: mesh_pb2.ReplicaInfo) -> Calls:
        calls = self._calls.get(replica.endpoint)
        if calls is None:
            channel = self._channels.get(replica.endpoint)
            if channel is None:
                channel = self._channels[replica.endpoint] = dial(replica.endpoint, tls=self.session.config.tls)
            calls = self._calls[replica.endpoint] = Calls.of(channel)
        return calls

    def stub(self, replica: mesh_pb2.ReplicaInfo) -> inference_pb2_grpc.InferenceStub:
        return self.calls(replica).stub

    # -- calls on a worker that stops answering --

    def watch(self, replica_id: str, call: grpc.aio.Call) -> None:
        """Follow a call in flight on a replica: if the replica leaves etcd without draining
        first (its worker's lease expired: the worker is dead, or frozen and silent), the call
        is cancelled at once so the request moves to another replica, instead of waiting on a
        worker that may never answer (`abandoned` then says so). A worker shutting down marks
        its replicas draining before it gives up its lease, and finishes their calls."""
        self._calls_on.setdefault(replica_id, set()).add(call)

    def unwatch(self, replica_id: str, call: grpc.aio.Call) -> None:
        calls = self._calls_on.get(replica_id)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._calls_on[replica_id]
        self._abandoned.discard(call)

    def abandoned(self, call: grpc.aio.Call) -> bool:
        """Whether `call` was cancelled because its replica left (not by its client)."""
        return call in self._abandoned

    def _replica_changed(self, replica_id: str, old: mesh_pb2.ReplicaInfo | None,
                         new: mesh_pb2.ReplicaInfo | None) -> None:
        if new is None and self.kv is not None:
            self.kv.forget(replica_id)
        if new is not None or (old is not None and old.state == mesh_pb2.REPLICA_STATE_DRAINING):
            return  # a draining worker gave up its lease on purpose: it finishes what it has
        calls = self._calls_on.pop(replica_id, set())
        if calls:
            log.warning("replica %s left etcd (its worker's lease ended) with %d calls in flight; moving them",
                        replica_id, len(calls))
        for call in calls:
            self._abandoned.add(call)
            call.cancel()

    def mark_full(self, replica_id: str, retry_after: float, tenant: str = "-", priority: int = 1) -> None:
        """The replica refused a request of `tenant` of class `priority` because its queue
        is full: for FULL_SECONDS, or until one of this router's requests on it ends (a slot
        may have freed), that tenant's requests of that class for it are refused here, with
        its hint, instead of each costing a round trip to a worker that is busiest exactly
        then. Other tenants' and other classes' still go: the engine shares its queue fairly
        and by class, and may take a quiet tenant's request in the place of a flooding one's,
        or an interactive one in the place of batch work."""
        self._full.setdefault(replica_id, {})[tenant, priority] = (time.monotonic() + FULL_SECONDS, retry_after)

    def full(self, replica_id: str, tenant: str = "-", priority: int = 1) -> float | None:
        """The retry hint of a replica marked full for `tenant`'s requests of class `priority`, or None."""
        marks = self._full.get(replica_id)
        mark = marks.get((tenant, priority)) if marks is not None else None
        if mark is None:
            return None
        if mark[0] <= time.monotonic():
            del marks[tenant, priority]  # type: ignore[union-attr]
            return None
        return mark[1]

    def freed(self, replica_id: str) -> None:
        """One of this router's requests on the replica ended."""
        self._full.pop(replica_id, None)

    def mark_failed(self, replica: mesh_pb2.ReplicaInfo) -> None:
        now = time.monotonic()
        self._suspect = {e: t for e, t in self._suspect.items() if t > now}  # forget the ones that expired
        self._suspect[replica.endpoint] = now + SUSPECT_SECONDS

    @contextlib.contextmanager
    def track(self, replica: mesh_pb2.ReplicaInfo) -> Iterator[None]:
        rid = replica.replica_id
        self.in_flight[rid] = self.in_flight.get(rid, 0) + 1
        try:
            yield
        finally:
            self.in_flight[rid] -= 1
            if self.in_flight[rid] <= 0:
                del self.in_flight[rid]
