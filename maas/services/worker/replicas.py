"""The worker's replicas: follow this worker's assignments in etcd, load and unload engines,
and publish each replica's state (loading/ready/draining/failed) under the worker's lease."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maas.mesh.aio import wait_event
from maas.mesh.clients import RegistryClient
from maas.mesh.discovery import PrefixMirror
from maas.mesh.errors import EngineDead, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from maas.mesh.server import ServiceRuntime
from maas.services.worker.artifacts import ArtifactCache
from maas.services.worker.engines import create_engine, engine_kind
from maas.services.worker.engines.base import AdapterRef, Engine, ModelSpec
from maas.v1 import mesh_pb2

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelSpec], Engine]


def check_devices(spec: ModelSpec) -> None:
    """Refuse a replica placed on several devices (a version or deployment asking for
    `resources.devices` > 1) unless its engine shards a model across them: vLLM, with tensor
    parallelism over the replica's devices. The built-in engine and the embedding engine load
    a model onto one device; the simulator pretends to use any."""
    if len(spec.devices) <= 1 or spec.format == "sim":
        return
    if spec.format == "hf" and spec.task == "generate" and engine_kind(spec) == "vllm":
        return
    engine = "the embedding engine" if spec.task == "embed" else "the built-in engine"
    raise FailedPrecondition(
        f"{spec.name}@{spec.version} was placed on {len(spec.devices)} devices ({', '.join(spec.devices)}), but "
        f"{engine} loads a model onto one device: serve it with engine=vllm (`maas models register ... --option "
        "engine=vllm`, or `maas worker --engine vllm`), which runs it tensor-parallel across the devices, or give "
        "it devices=1 and enough memory", field="devices")
DEFAULT_CACHE = Path.home() / ".cache" / "maas-mesh" / "artifacts"


@dataclass
class Replica:
    assignment: mesh_pb2.Assignment
    info: mesh_pb2.ReplicaInfo
    engine: Engine | None = None
    in_flight: int = 0
    online_in_flight: int = 0  # of in_flight, those not of the batch class
    requests_total: int = 0
    last_used: float = 0.0  # monotonic: last request started or finished; the load before the first
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def load(self) -> mesh_pb2.ReplicaLoad:
        """This replica's share of the worker's load report."""
        waiting = self.engine.stats().waiting if self.engine is not None else 0
        return mesh_pb2.ReplicaLoad(replica_id=self.info.replica_id, deployment=self.info.deployment,
                                    in_flight=self.in_flight, queue_depth=waiting,
                                    requests_total=self.requests_total, online_in_flight=self.online_in_flight,
                                    idle_ms=0 if self.in_flight else int((time.monotonic() - self.last_used) * 1000))

    @property
    def ref(self) -> str:
        return f"{self.assignment.model_name}@{self.assignment.model_version}"


class ReplicaManager:
    def __init__(self, rt: ServiceRuntime, worker_id: str, *, engine_factory: EngineFactory = create_engine,
                 unload_grace: float = 10.0, cache_dir: Path = DEFAULT_CACHE) -> None:
        self.rt = rt
        self.worker_id = worker_id
        self.engine_factory = engine_factory
        self.unload_grace = unload_grace
        self.replicas: dict[str, Replica] = {}
        self.registry = RegistryClient(rt.etcd)
        self.artifacts = ArtifactCache(cache_dir, self.registry)
        self.assignments = PrefixMirror(rt.etcd, rt.etcd.keys.assignments(worker_id), mesh_pb2.Assignment)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.assignments.add_listener(lambda *_: self._wake.set())
        rt.etcd.before_reregister.append(self._recheck)

    async def start(self) -> None:
        await self.assignments.start()
        self._loop_task = asyncio.create_task(self._follow(), name="replicas")

    async def _follow(self) -> None:
        while True:
            self._wake.clear()
            wanted = dict(self.assignments.items)
            for rid, a in wanted.items():
                if rid not in self.replicas:
                    self._spawn(self._load(a))
            for rid in list(self.replicas):
                if rid not in wanted:
                    self._spawn(self._unload(rid))
            await self._wake.wait()

    async def _recheck(self) -> None:
        """This worker's lease ended (it was frozen, or cut off from etcd) and its replicas
        left etcd with it; the scheduler may have placed them elsewhere meanwhile. Before they
        are published again, the ones whose assignment is gone are dropped: a stale replica is
        never advertised, and serves no request while it unloads."""
        pairs, _ = await self.rt.etcd.get_prefix(self.rt.etcd.keys.assignments(self.worker_id))
        assigned = {key.rsplit(b"/", 1)[-1].decode() for key, _ in pairs}
        for rid, replica in list(self.replicas.items()):
            if rid in assigned:
                continue
            log.warning("replica %s was reassigned while this worker's lease was gone; dropping it", rid)
            self.rt.etcd.forget_owned(self.rt.etcd.keys.replica(rid))
            replica.info.state = mesh_pb2.REPLICA_STATE_DRAINING  # find() skips it
            self._spawn(self._unload(rid))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, replica: Replica, state: int, message: str = "") -> None:
        replica.info.state = state  # type: ignore[assignment]
        replica.info.message = message
        replica.info.updated_ms = int(time.time() * 1000)
        await self.rt.etcd.put_owned(self.rt.etcd.keys.replica(replica.info.replica_id),
                                     replica.info.SerializeToString())

    async def _load(self, a: mesh_pb2.Assignment) -> None:
        info = mesh_pb2.ReplicaInfo(
            replica_id=a.replica_id, worker_id=self.worker_id, endpoint=self.rt.endpoint, deployment=a.deployment,
            model_name=a.model_name, model_version=a.model_version, device_ids=list(a.device_ids), task=a.task)
        replica = Replica(assignment=a, info=info)
        self.replicas[a.replica_id] = replica
        await self._publish(replica, mesh_pb2.REPLICA_STATE_LOADING)
        self.rt.events.publish("replica", "loading", a.replica_id, f"loading {replica.ref} on {self.worker_id}",
                               model=replica.ref, worker=self.worker_id)
        started = time.perf_counter()
        try:
            source = await self.artifacts.resolve(a.source)
            spec = ModelSpec(name=a.model_name, version=a.model_version, format=a.format, source=source,
                             task=a.task or "generate", options=dict(a.options),
                             devices=tuple(a.device_ids) or ("cpu",))
            # building an engine imports its libraries (transformers: seconds): not on the loop
            engine = await asyncio.to_thread(self.engine_factory, spec)
            # the engine's spec: the factory fills in the worker's default engine (`--engine vllm`)
            check_devices(getattr(engine, "spec", spec))
            replica.engine = engine
            await replica.engine.load()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            message = f"{type(e).__name__}: {e}"[:500]
            log.error("replica %s (%s) failed to load: %s", a.replica_id, replica.ref, message)
            await self._publish(replica, mesh_pb2.REPLICA_STATE_FAILED, message)
            self.rt.events.publish("replica", "failed", a.replica_id, message, model=replica.ref,
                                   worker=self.worker_id)
            return
        if a.replica_id not in self.replicas:  # unassigned while loading
            await replica.engine.close()
            return
        replica.info.context_length = replica.engine.context_length
        replica.last_used = time.monotonic()
        await self._publish(replica, mesh_pb2.REPLICA_STATE_READY)
        seconds = time.perf_counter() - started
        self.rt.events.publish("replica", "ready", a.replica_id, f"{replica.ref} ready in {seconds:.1f}s",
                               model=replica.ref, worker=self.worker_id, load_seconds=f"{seconds:.2f}")

    async def _unload(self, replica_id: str) -> None:
        replica = self.replicas.pop(replica_id, None)
        if replica is None:
            return
        with contextlib.suppress(Exception):
            await self.rt.etcd.delete_owned(self.rt.etcd.keys.replica(replica_id))
        if replica.in_flight:
            await wait_event(replica.idle, self.unload_grace)
        if replica.engine is not None:
            await replica.engine.close()
        self.rt.events.publish("replica", "unloaded", replica_id, f"unloaded {replica.ref}", model=replica.ref,
                               worker=self.worker_id)

    def find(self, model: str, replica_id: str = "") -> Replica:
        """The ready replica serving `model` with the fewest requests. `model` is what the
        client asked for: a deployment or model name, or "name@version". A router names the
        replica it picked (`replica_id`), so canary weights hold even when this worker has
        replicas of both versions."""
        chosen = self.replicas.get(replica_id)
        if chosen is not None and chosen.info.state == mesh_pb2.REPLICA_STATE_READY \
                and model.partition("@")[0] in (chosen.assignment.deployment, chosen.assignment.model_name):
            return chosen
        name, _, version = model.partition("@")
        if version:
            matches = [r for r in self.replicas.values()
                       if r.assignment.model_name == name and str(r.assignment.model_version) == version]
        else:
            matches = [r for r in self.replicas.values()
                       if name in (r.assignment.deployment, r.assignment.model_name)]
        ready = [r for r in matches if r.info.state == mesh_pb2.REPLICA_STATE_READY]
        if ready:
            return min(ready, key=lambda r: r.in_flight)
        if matches:
            raise Unavailable(f"model {model!r} is not ready on worker {self.worker_id} "
                              f"(state: {mesh_pb2.ReplicaState.Name(matches[0].info.state)})")
        raise NotFound(f"model {model!r} is not loaded on worker {self.worker_id}")

    @contextlib.asynccontextmanager
    async def serve(self, model: str, replica_id: str = "", *,
                    online: bool = True) -> AsyncIterator[tuple[Replica, Engine]]:
        """Pick a replica for `model` and count one in-flight request on it for the block
        (`online`: one not of the batch class, which batches yield to). If its engine dies,
        the replica is marked failed so routers stop sending to it."""
        replica = self.find(model, replica_id)
        assert replica.engine is not None
        replica.in_flight += 1
        replica.online_in_flight += online
        replica.requests_total += 1
        replica.last_used = time.monotonic()
        replica.idle.clear()
        try:
            yield replica, replica.engine
        except EngineDead as e:
            if replica.info.state != mesh_pb2.REPLICA_STATE_FAILED:
                await self._publish(replica, mesh_pb2.REPLICA_STATE_FAILED, e.message[:500])
                self.rt.events.publish("replica", "failed", replica.info.replica_id, e.message[:500],
                                       model=replica.ref, worker=self.worker_id)
            raise
        finally:
            replica.in_flight -= 1
            replica.online_in_flight -= online
            replica.last_used = time.monotonic()
            if replica.in_flight == 0:
                replica.idle.set()

    async def adapter(self, replica: Replica, name: str) -> AdapterRef | None:
        """The adapter a request asked for, checked against the replica's base model."""
        if not name:
            return None
        version = await self.registry.resolve(name)
        key = f"{version.name}@{version.version}"
        if not version.base:
            raise InvalidArgument(f"{key} is not an adapter (it has no base model)", field="adapter")
        if version.base != replica.ref:
            raise InvalidArgument(f"adapter {key} is for {version.base}, but {replica.info.deployment} serves "
                                  f"{replica.ref}", field="adapter")
        return AdapterRef(key=key, source=await self.artifacts.resolve(version.source))

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas.values())

    async def drain(self) -> None:
        """Mark every replica draining so routers stop picking them; in-flight requests go on."""
        for replica in self.replicas.values():
            if replica.info.state == mesh_pb2.REPLICA_STATE_READY:
                with contextlib.suppress(Exception):
                    await self._publish(replica, mesh_pb2.REPLICA_STATE_DRAINING)

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._tasks):
            task.cancel()
        await self.assignments.close()
        await self.registry.close()
        for replica in list(self.replicas.values()):
            if replica.engine is not None:
                with contextlib.suppress(Exception):
                    await replica.engine.close()
        self.replicas.clear()
