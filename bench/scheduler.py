"""Benchmark: the scheduler's placement at fleet scale, against a simulated fleet in etcd.

Real etcd and nats-server (from the pip wheels) run in a temporary directory; a real
registry and a real scheduler run in this process under a fresh key prefix. No worker
processes and no model compute: the fleet is a set of WorkerInfo keys under workers/
(N workers with D devices of 80 GiB each, format "sim"), written straight to etcd.
Setup (not timed) registers a few dozen "sim" model versions of mixed sizes through the
registry API and writes the deployments (valid as DeploymentStore would store them,
resolved_version set) and the workers to etcd in batched transactions.

Then, timed:

  place  the scheduler starts with the fleet and the deployments in place; the clock
         runs from its start until every wanted replica has an assignment in etcd
         (seen through a watch on assignments/).
  heal   10% of the workers vanish (their keys are deleted, in batched transactions);
         the clock runs until every replica is assigned to a live worker again and no
         assignment is left on a vanished one.

For both it prints the wall-clock time, the reconciler's own figures (the scheduler's
Prometheus metrics, read in-process), and what the assignments read back from etcd look
like: replicas placed, devices and workers used, over-committed devices, replicas sharing
a worker with another replica of their deployment, and the packing: the lower bound on
devices from total memory (ceil(total assigned memory / device size)) divided by the
devices that hold at least one replica; 1.0 is perfect. The last line is machine-readable:

  place_s=<a> heal_s=<b> etcd_trips_per_moved_replica=<c> packing=<d>

where c = fenced etcd transactions the scheduler wrote during the heal / replicas it
placed during the heal, and d is the packing after the full placement. Targets: a full
placement in under 2 s, healing in under 1 s, packing at least 0.9. A value that could
not be measured (a phase that timed out) prints as nan and the exit status is 1.

    python bench/scheduler.py [--workers 2000] [--devices 8] [--deployments 5000] [--seed 0]
    python bench/scheduler.py --workers 200 --deployments 500     # a quick check
    python bench/scheduler.py --profile /tmp/sched.prof            # cProfile of the timed phases
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import logging
import math
import pstats
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import REGISTRY

from maas.mesh.config import MeshConfig
from maas.mesh.etcd import EtcdSession
from maas.mesh.keys import Keys
from maas.mesh.server import ServiceRuntime
from maas.services.registry import main as registry_main
from maas.services.scheduler import main as scheduler_main
from maas.stack.servers import start_etcd, start_nats
from maas.v1 import common_pb2, mesh_pb2, registry_pb2, registry_pb2_grpc, scheduler_pb2

GiB = 2**30
TXN_OPS = 100  # etcd allows 128 operations per transaction by default

# (class, share of deployments, per-replica memory range in GiB)
MODEL_MIX = [
    ("tiny", 0.15, (1.0, 2.0)),     # embedders, rerankers
    ("small", 0.47, (2.0, 8.0)),    # 1-4B models
    ("medium", 0.33, (16.0, 40.0)),  # 7-20B models
    ("large", 0.05, (70.0, 76.0)),  # 30B+ models: one per 80 GiB device
]
# (replicas, share of deployments)
REPLICA_MIX = [(1, 0.55), (2, 0.30), (4, 0.12), (8, 0.03)]

METRICS = {
    "passes": "maas_scheduler_reconcile_seconds_count",
    "reconcile_s": "maas_scheduler_reconcile_seconds_sum",
    "txns": "maas_scheduler_etcd_transactions_total",
    "placed": "maas_scheduler_replicas_placed_total",
    "removed": "maas_scheduler_replicas_removed_total",
    "unplaced": "maas_scheduler_unplaced_deployments",
}


class Stop:
    """Set by SIGINT/SIGTERM. Besides cancelling the main task, the wait loops check it, so
    an interrupt is never lost to a cancellation that a library swallowed."""

    requested = False

    @classmethod
    def check(cls) -> None:
        if cls.requested:
            raise asyncio.CancelledError


def metrics() -> dict[str, float]:
    return {k: REGISTRY.get_sample_value(name) or 0.0 for k, name in METRICS.items()}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] if k != "unplaced" else after[k] for k in after}


def sig(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3g}"


def gib(n: float) -> str:
    return f"{n / GiB / 1024:.1f} TiB" if n >= 1024 * GiB else f"{n / GiB:.1f} GiB"


# -- the simulated fleet and workload ------------------------------------------------------


@dataclass
class Workload:
    models: list[tuple[str, str, int]] = field(default_factory=list)  # (class, name, memory bytes)
    deployments: list[scheduler_pb2.Deployment] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)  # deployment -> bytes per replica

    @property
    def replicas(self) -> int:
        return sum(d.replicas for d in self.deployments)

    @property
    def demand(self) -> int:
        return sum(d.replicas * self.memory[d.name] for d in self.deployments)


def make_models(rng: random.Random, count: int) -> list[tuple[str, str, int]]:
    models = []
    for cls, share, (lo, hi) in MODEL_MIX:
        for i in range(max(1, round(count * share))):
            size = round(rng.uniform(lo, hi) * 4) / 4  # quarter-GiB steps
            models.append((cls, f"sim-{cls}-{i:02d}", int(size * GiB)))
    return models


async def register_models(endpoint: str, models: list[tuple[str, str, int]]) -> dict[str, str]:
    """Register every model through the registry API; returns name -> resolved "name@N"."""
    refs = {}
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        for _, name, memory in models:
            v = await stub.RegisterModel(registry_pb2.RegisterModelRequest(
                name=name, format="sim", task="generate", description="bench/scheduler.py",
                resources=common_pb2.Resources(memory_bytes=memory, devices=1)), timeout=10)
            refs[name] = f"{v.name}@{v.version}"
    return refs


def make_deployments(rng: random.Random, models: list[tuple[str, str, int]], refs: dict[str, str],
                     count: int) -> Workload:
    by_class: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for cls, name, memory in models:
        by_class[cls].append((name, memory))
    classes = [c for c, _, _ in MODEL_MIX]
    shares = [s for _, s, _ in MODEL_MIX]
    now = int(time.time() * 1000)
    w = Workload(models=models)
    for i in range(count):
        name, memory = rng.choice(by_class[rng.choices(classes, shares)[0]])
        replicas = rng.choices([r for r, _ in REPLICA_MIX], [s for _, s in REPLICA_MIX])[0]
        dep = scheduler_pb2.Deployment(name=f"dep-{i:05d}", model=name, replicas=replicas,
                                       resolved_version=refs[name], created_ms=now, updated_ms=now)
        w.deployments.append(dep)
        w.memory[dep.name] = memory
    return w


def make_workers(count: int, devices: int, device_bytes: int) -> dict[str, mesh_pb2.WorkerInfo]:
    now = int(time.time() * 1000)
    return {f"sim-w{i:05d}": mesh_pb2.WorkerInfo(
        worker_id=f"sim-w{i:05d}", endpoint=f"127.0.0.1:{20000 + i}", formats=["hf", "sim"], started_ms=now,
        devices=[mesh_pb2.Device(id=f"cuda:{d}", name="SIM-80GB", memory_total_bytes=device_bytes,
                                 memory_free_bytes=device_bytes) for d in range(devices)])
        for i in range(count)}


async def txn_batched(session: EtcdSession, ops: list[object]) -> int:
    """Run ops in transactions of TXN_OPS, concurrently; returns the number of transactions."""
    batches = [ops[i:i + TXN_OPS] for i in range(0, len(ops), TXN_OPS)]
    await asyncio.gather(*(session.client.transaction(compare=[], success=b, failure=[]) for b in batches))
    return len(batches)


# -- watching the assignments --------------------------------------------------------------


class Tracker:
    """Follows assignments/ through a watch and notes the moment every deployment has its
    wanted replicas (of its resolved version) on live workers and none is left on a dead one."""

    def __init__(self, keys: Keys, workload: Workload) -> None:
        self.prefix = keys.assignments()
        self.wanted = {d.name: (d.replicas, d.resolved_version) for d in workload.deployments}
        self.where: dict[bytes, tuple[str, str, bool]] = {}  # key -> (worker, deployment, right version)
        self.live: Counter[str] = Counter()
        self.dead: set[str] = set()
        self.short = 0
        self.on_dead = 0
        self.events = 0
        self.puts = 0
        self.last_event = 0.0
        self.done_at: float | None = None
        self.done = asyncio.Event()
        self._recount()

    def _recount(self) -> None:
        self.live.clear()
        self.on_dead = 0
        for worker, dep, ok in self.where.values():
            if worker in self.dead:
                self.on_dead += 1
            elif ok and dep in self.wanted:
                self.live[dep] += 1
        self.short = sum(self.live[d] < n for d, (n, _) in self.wanted.items())

    def mark_dead(self, workers: set[str]) -> int:
        """Returns how many assignments the newly dead workers hold."""
        self.dead |= workers
        self._recount()
        self.done.clear()
        self.done_at = None
        self._check(time.perf_counter())
        return self.on_dead

    def _check(self, now: float) -> None:
        if self.short == 0 and self.on_dead == 0 and not self.done.is_set():
            self.done_at = now
            self.done.set()

    def _add(self, key: bytes, worker: str, a: mesh_pb2.Assignment) -> None:
        want = self.wanted.get(a.deployment)
        ok = want is not None and f"{a.model_name}@{a.model_version}" == want[1]
        self.where[key] = (worker, a.deployment, ok)
        if worker in self.dead:
            self.on_dead += 1
        elif ok and want is not None:
            self.live[a.deployment] += 1
            if self.live[a.deployment] == want[0]:
                self.short -= 1

    def _remove(self, key: bytes) -> None:
        entry = self.where.pop(key, None)
        if entry is None:
            return
        worker, dep, ok = entry
        if worker in self.dead:
            self.on_dead -= 1
        elif ok and dep in self.wanted:
            self.live[dep] -= 1
            if self.live[dep] == self.wanted[dep][0] - 1:
                self.short += 1

    async def run(self, session: EtcdSession, start_revision: int) -> None:
        watch = await session.client.watch_prefix(self.prefix, start_revision=start_revision)
        try:
            async for event in watch:
                key = event.kv.key
                self._remove(key)
                if event.kind != "DELETE":
                    self.puts += 1
                    worker = key[len(self.prefix):].decode().partition("/")[0]
                    self._add(key, worker, mesh_pb2.Assignment.FromString(event.kv.value))
                self.events += 1
                self.last_event = time.perf_counter()
                self._check(self.last_event)
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()


class LoopLag:
    """The longest the event loop went without running a 20 ms ticker (everything here,
    registry and scheduler included, shares the one loop)."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.02)
            self.worst = max(self.worst, time.perf_counter() - t - 0.02)


async def wait_placed(tracker: Tracker, start: float, timeout: float) -> tuple[float, str]:
    """Seconds from `start` until the tracker is satisfied -> (seconds, status). If the
    scheduler settles with unplaced deployments (two passes without writing anything after
    the last assignment change), the time of the last change counts, status "unplaced"."""
    deadline = start + timeout
    seen, passes_at_seen, txns_at_seen = -1, 0.0, 0.0
    while True:
        Stop.check()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                await tracker.done.wait()
        if tracker.done_at is not None:
            return tracker.done_at - start, "ok"
        m = metrics()
        if tracker.events != seen:
            seen, passes_at_seen, txns_at_seen = tracker.events, m["passes"], m["txns"]
        elif m["unplaced"] > 0 and m["passes"] >= passes_at_seen + 2 and m["txns"] == txns_at_seen:
            return max(tracker.last_event, start) - start, "unplaced"
        if time.perf_counter() > deadline:
            return math.nan, "timeout"


async def passes_after(snapshot: dict[str, float], wait_s: float = 60.0) -> dict[str, float]:
    """Metrics once a reconcile pass more than in `snapshot` has finished (or after wait_s)."""
    deadline = time.perf_counter() + wait_s
    while True:  # polls a metric: there is nothing to wait on
        Stop.check()
        m = metrics()
        if m["passes"] > snapshot["passes"] or time.perf_counter() > deadline:
            return m
        await asyncio.sleep(0.005)


async def work_done(tracker: Tracker, before: dict[str, float], puts_before: int, status: str) -> dict[str, float]:
    """The reconciler's metrics once the pass that wrote the last assignment has finished.
    A pass counts its placed replicas and its time in the same step, after its last write,
    so if the metrics do not yet show every assignment seen, that pass is still finishing."""
    m = metrics()
    if status == "timeout" or m["placed"] - before["placed"] >= tracker.puts - puts_before:
        return m
    return await passes_after(m)


async def settle(work: dict[str, float]) -> bool:
    """Wait for one more complete reconcile pass; True if it wrote nothing."""
    return (await passes_after(work))["txns"] == work["txns"]


# -- reading the result back ---------------------------------------------------------------


@dataclass
class Layout:
    replicas: int = 0
    memory: int = 0
    devices_used: int = 0
    workers_used: int = 0
    overcommitted: int = 0
    stray: int = 0  # on a worker or device that does not exist (or vanished)
    missing: int = 0  # wanted replicas without an assignment
    extra: int = 0
    colocated: int = 0  # replicas sharing a worker with another replica of their deployment
    packing: float = math.nan
    lower_bound: int = 0


async def read_layout(session: EtcdSession, workload: Workload, workers: dict[str, mesh_pb2.WorkerInfo],
                      device_bytes: int) -> Layout:
    pairs, _ = await session.get_prefix(session.keys.assignments())
    prefix = len(session.keys.assignments())
    capacity = {(w, d.id): d.memory_total_bytes for w, info in workers.items() for d in info.devices}
    load: dict[tuple[str, str], float] = defaultdict(float)
    per_dep: Counter[str] = Counter()
    per_dep_worker: Counter[tuple[str, str]] = Counter()
    wanted = {d.name: d for d in workload.deployments}
    out = Layout()
    for key, value in pairs:
        worker = key[prefix:].decode().partition("/")[0]
        a = mesh_pb2.Assignment.FromString(value)
        slots = [(worker, d) for d in a.device_ids]
        if worker not in workers or not slots or any(s not in capacity for s in slots):
            out.stray += 1
            continue
        out.replicas += 1
        out.memory += a.memory_bytes
        for s in slots:
            load[s] += a.memory_bytes / len(slots)
        dep = wanted.get(a.deployment)
        if dep is not None and f"{a.model_name}@{a.model_version}" == dep.resolved_version:
            per_dep[a.deployment] += 1
            per_dep_worker[(a.deployment, worker)] += 1
    out.devices_used = len(load)
    out.workers_used = len({w for w, _ in load})
    out.overcommitted = sum(used > capacity[s] for s, used in load.items())
    for name, dep in wanted.items():
        out.missing += max(0, dep.replicas - per_dep[name])
        out.extra += max(0, per_dep[name] - dep.replicas)
    out.colocated = sum(n - 1 for n in per_dep_worker.values() if n > 1)
    out.lower_bound = math.ceil(out.memory / device_bytes)
    out.packing = out.lower_bound / out.devices_used if out.devices_used else math.nan
    return out


def describe(what: str, wall: float, status: str, up: float | None, m: dict[str, float], settled: bool,
             layout: Layout, wanted: int, lag: float) -> None:
    note = {"ok": "", "timeout": "  TIMED OUT", "unplaced": "  (settled with unplaced replicas)"}[status]
    start = f" (scheduler start-up {up:.3f} s)" if up is not None else ""
    print(f"{what:<6} wall {sig(wall)} s{start}{note}")
    print(f"       reconciler until then: {m['passes']:.0f} passes, {m['reconcile_s']:.3f} s in passes, "
          f"{m['txns']:.0f} txns, {m['placed']:.0f} placed, {m['removed']:.0f} removed, {m['unplaced']:.0f} "
          f"deployments unplaced; {'settled' if settled else 'STILL WRITING in the pass after'}")
    print(f"       etcd: {layout.replicas}/{wanted} replicas on {layout.devices_used} devices of "
          f"{layout.workers_used} workers, {layout.missing} missing, {layout.extra} extra, {layout.stray} stray, "
          f"{layout.overcommitted} over-committed devices, {layout.colocated} replicas share a worker with "
          f"their deployment")
    print(f"       packing {sig(layout.packing)} ({gib(layout.memory)} assigned: at least {layout.lower_bound} "
          f"devices, {layout.devices_used} used); longest event-loop stall {lag:.3f} s")


# -- the run -------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, etcd_url: str, nats_url: str, tmp: Path) -> int:
    main = asyncio.current_task()
    assert main is not None

    def interrupt() -> None:
        Stop.requested = True
        main.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, interrupt)
    rng = random.Random(args.seed)
    prefix = f"/bench{random.Random().getrandbits(32):08x}/"
    device_bytes = int(args.device_gib * GiB)

    def config(kind: str) -> MeshConfig:
        return MeshConfig(kind=kind, etcd=etcd_url, nats=nats_url, prefix=prefix, lease_ttl=args.lease_ttl,
                          metrics_port=-1, grace=1.0)

    runtimes: list[ServiceRuntime] = []
    tasks: list[asyncio.Task[None]] = []
    session = EtcdSession(config("bench"))
    profile = cProfile.Profile() if args.profile else None
    try:
        await session.start()
        t = time.perf_counter()
        registry = ServiceRuntime(config("registry"))
        runtimes.append(registry)
        await registry_main.build(registry, tmp / "blobs")
        models = make_models(rng, args.models)
        refs = await register_models(registry.endpoint, models)
        t_models = time.perf_counter() - t
        workload = make_deployments(rng, models, refs, args.deployments)
        workers = make_workers(args.workers, args.devices, device_bytes)
        tx, keys = session.client.transactions, session.keys

        t = time.perf_counter()
        dep_txns = await txn_batched(session, [tx.put(keys.deployment(d.name), d.SerializeToString())
                                               for d in workload.deployments])
        t_deps = time.perf_counter() - t
        t = time.perf_counter()
        worker_txns = await txn_batched(session, [tx.put(keys.worker(w), info.SerializeToString())
                                                  for w, info in workers.items()])
        t_workers = time.perf_counter() - t

        total_devices = args.workers * args.devices
        print(f"fleet: {args.workers} workers x {args.devices} devices x {args.device_gib:g} GiB "
              f"({total_devices} devices); {len(models)} model versions; {len(workload.deployments)} deployments, "
              f"{workload.replicas} replicas; seed {args.seed}")
        per_class = Counter(cls for cls, _, _ in models)
        dep_class = Counter(next(c for c, n, _ in models if n == d.model) for d in workload.deployments)
        print("model mix: " + ", ".join(
            f"{cls} {lo:g}-{hi:g} GiB ({per_class[cls]} models, {dep_class[cls]} deployments)"
            for cls, _, (lo, hi) in MODEL_MIX))
        rep_count = Counter(d.replicas for d in workload.deployments)
        print("replica mix: " + ", ".join(f"{r} x{rep_count[r]}" for r, _ in REPLICA_MIX))
        lower = math.ceil(workload.demand / device_bytes)
        print(f"demand: {gib(workload.demand)}: at least {lower} devices ({lower / max(1, total_devices):.1%} of the "
              f"fleet)")
        print(f"setup: registry + {len(models)} versions {t_models:.2f} s; {len(workload.deployments)} deployments "
              f"in {dep_txns} txns {t_deps:.2f} s; {len(workers)} workers in {worker_txns} txns {t_workers:.2f} s")

        _, revision = await session.get_prefix(keys.assignments())
        tracker = Tracker(keys, workload)
        lag = LoopLag()
        tasks += [asyncio.create_task(tracker.run(session, revision + 1), name="tracker"),
                  asyncio.create_task(lag.run(), name="loop-lag")]
        await asyncio.sleep(0.1)  # the watch is established
        if profile is not None:
            profile.enable()

        # place: the scheduler starts with fleet and deployments in place
        before = metrics()
        lag.worst = 0.0
        start = time.perf_counter()
        scheduler = ServiceRuntime(config("scheduler"))
        runtimes.append(scheduler)
        await scheduler_main.build(scheduler)
        up = time.perf_counter() - start
        place_s, place_status = await wait_placed(tracker, start, args.timeout)
        place_lag = lag.worst
        work = await work_done(tracker, before, 0, place_status)
        settled = await settle(work)
        place_m = delta(work, before)
        layout = await read_layout(session, workload, workers, device_bytes)
        print()
        describe("place", place_s, place_status, up, place_m, settled, layout, workload.replicas, place_lag)
        packing = layout.packing

        heal_s, trips = math.nan, math.nan
        if place_status != "timeout":
            pool = sorted({w for w, _, _ in tracker.where.values()} if args.vanish_busy else workers)
            dead = set(rng.sample(pool, min(len(pool), round(len(workers) * args.vanish))))
            held = tracker.mark_dead(dead)
            live = {w: info for w, info in workers.items() if w not in dead}
            print(f"\nheal   {len(dead)} workers ({len(dead) / len(workers):.0%} of the fleet"
                  f"{', drawn from those holding replicas' if args.vanish_busy else ''}) vanish, "
                  f"holding {held} replicas")
            before, puts_before = metrics(), tracker.puts
            lag.worst = 0.0
            start = time.perf_counter()
            await txn_batched(session, [tx.delete(keys.worker(w)) for w in sorted(dead)])
            heal_s, heal_status = await wait_placed(tracker, start, args.timeout)
            if heal_s < 0:
                heal_s = 0.0  # nothing to move: done before the clock started
            heal_lag = lag.worst
            work = await work_done(tracker, before, puts_before, heal_status)
            settled = await settle(work)
            heal_m = delta(work, before)
            layout = await read_layout(session, workload, live, device_bytes)
            describe("", heal_s, heal_status, None, heal_m, settled, layout, workload.replicas, heal_lag)
            if heal_m["placed"]:
                trips = heal_m["txns"] / heal_m["placed"]
            print(f"       etcd transactions per moved replica: {sig(trips)} "
                  f"({heal_m['txns']:.0f} txns for {heal_m['placed']:.0f} replicas placed)")

        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)
            print(f"\nprofile of the timed phases written to {args.profile}; top 25 by own time:")
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)

        print(f"place_s={sig(place_s)} heal_s={sig(heal_s)} etcd_trips_per_moved_replica={sig(trips)} "
              f"packing={sig(packing)}", flush=True)
        return 0 if not any(math.isnan(x) for x in (place_s, heal_s, trips, packing)) else 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rt in reversed(runtimes):
            with contextlib.suppress(Exception):
                await rt.stop()
        await session.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=8, help="devices per worker")
    parser.add_argument("--device-gib", type=float, default=80.0, help="memory per device")
    parser.add_argument("--deployments", type=int, default=5000)
    parser.add_argument("--models", type=int, default=60, help="model versions to register (about)")
    parser.add_argument("--vanish", type=float, default=0.10, help="share of the workers that vanish")
    parser.add_argument("--vanish-busy", action="store_true",
                        help="the vanishing workers are drawn from those holding replicas (the worst case), "
                             "not from the whole fleet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each timed phase may take")
    parser.add_argument("--lease-ttl", type=int, default=3600,
                        help="lease TTL of the in-process registry and scheduler; long, so a placement pass "
                             "that blocks the event loop does not cost the scheduler its leadership mid-run")
    parser.add_argument("--profile", default="", metavar="FILE", help="cProfile the timed phases into FILE")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # etcd and nats-server stop on the way out of the ExitStack (and, started under
    # `setpriv --pdeathsig`, die with this process should it be killed outright)
    try:
        with tempfile.TemporaryDirectory(prefix="maas-bench-scheduler-") as tmp_dir, \
                contextlib.ExitStack() as stack:
            tmp = Path(tmp_dir)
            etcd, etcd_url = start_etcd(tmp / "etcd" / "data", log_dir=tmp)
            stack.callback(etcd.stop)
            nats, nats_url = start_nats(tmp / "nats" / "js", log_dir=tmp)
            stack.callback(nats.stop)
            return asyncio.run(bench(args, etcd_url, nats_url, tmp))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; etcd and nats-server stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
