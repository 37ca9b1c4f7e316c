"""Placement: a pure function from (deployments, workers, assignments) to a plan.

No etcd, no I/O: the reconciler feeds it the mirrored state and writes the plan back in
fenced transactions. That keeps the policy testable and fast (see bench/scheduler.py).

Policy:
1. Drop assignments whose worker is gone or whose deployment no longer wants them, and
   replicas beyond a deployment's count. Replicas of a previous version stay until as
   many replicas of the new one are ready (rollouts without downtime).
2. Place the missing replicas, largest first (best-fit decreasing: big models take the
   devices first, small ones fill the gaps). Each goes to a worker that has no replica
   of its deployment yet if there is one (spread, so one dead worker takes down one
   replica), on the device whose free memory fits it most tightly (bin-packing, so
   whole devices stay free for big models). Selectors and model formats filter workers.
3. When nothing fits, evict: the least recently used idle replicas of autoscaled
   deployments that are above their minimum free a device, and those deployments are
   scaled down by the replicas they lost (the next request for them is a cold start).

Device memory of a replica that spans several devices is split evenly across them. So is
a fine-tuning job's that asks for several devices: it runs on that many devices of one
worker (FSDP under torchrun), placed as a multi-device replica is, and holds them all.
"""

from __future__ import annotations

import bisect
import math
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from maas.v1 import mesh_pb2, registry_pb2, scheduler_pb2

Slot = tuple[str, str]  # (worker, device)


@dataclass(frozen=True)
class Want:
    """A deployment joined with the model version it resolved to (and its canary's, if any)."""

    deployment: scheduler_pb2.Deployment
    version: registry_pb2.ModelVersion
    canary: registry_pb2.ModelVersion | None = None

    def memory(self, version: registry_pb2.ModelVersion) -> int:
        """Device memory per replica, over all its devices."""
        return self.deployment.resources.memory_bytes or version.resources.memory_bytes

    def devices(self, version: registry_pb2.ModelVersion) -> int:
        return max(1, self.deployment.resources.devices or version.resources.devices)

    @property
    def autoscaled(self) -> bool:
        return self.deployment.autoscale.max_replicas > 0

    def tracks(self) -> list[tuple[registry_pb2.ModelVersion, int]]:
        """(version, replicas) to run: the stable version, plus a canary's share of the
        replicas (at least one) while the deployment has one."""
        replicas = self.deployment.replicas
        if self.canary is None or not self.deployment.traffic:
            return [(self.version, replicas)]
        weight = self.deployment.traffic[0].weight
        return [(self.version, replicas), (self.canary, max(1, math.ceil(replicas * weight / 100)) if replicas else 0)]


@dataclass(frozen=True)
class JobWant:
    """A fine-tuning job as placement sees it: queued (slot None) or running on `slot`."""

    job_id: str
    memory: int  # on each of its devices
    priority: int = 0
    created_ms: int = 0
    tenant: str = ""
    slot: Slot | None = None  # its first device while running
    yielding: bool = False  # asked to give its device back; still holds it until it stops
    devices: int = 1  # devices it needs, all on one worker
    device_ids: tuple[str, ...] = ()  # every device it holds on slot's worker while running, if more than one

    @property
    def slots(self) -> list[Slot]:
        """Every device it holds (none while queued)."""
        if self.slot is None:
            return []
        return [(self.slot[0], dev) for dev in self.device_ids] or [self.slot]


@dataclass
class Plan:
    add: list[tuple[str, mesh_pb2.Assignment]] = field(default_factory=list)      # (worker, assignment)
    remove: list[tuple[str, str]] = field(default_factory=list)                  # (worker, replica)
    unplaced: dict[str, str] = field(default_factory=dict)                       # deployment -> why
    evicted: list[tuple[str, str, str]] = field(default_factory=list)           # (worker, replica, for whom)
    scale: dict[str, int] = field(default_factory=dict)                          # deployment -> new replicas
    start_jobs: list[tuple[str, Slot, int]] = field(default_factory=list)       # (job, first slot, memory each)
    start_devices: dict[str, list[str]] = field(default_factory=dict)           # job on several devices -> them
    preempt: list[tuple[str, str]] = field(default_factory=list)                # (job, for which deployment)

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


class Fleet:
    """Free memory per device, kept sorted so the tightest fit is a binary search away."""

    def __init__(self, workers: dict[str, mesh_pb2.WorkerInfo]) -> None:
        self.free: dict[Slot, int] = {}
        for wid, info in workers.items():
            for device in info.devices:
                self.free[(wid, device.id)] = device.memory_total_bytes
        self._order: list[tuple[int, str, str]] | None = None

    def take(self, slot: Slot, amount: int) -> None:
        """Reserve `amount` bytes on a device (negative to release)."""
        if slot not in self.free:
            return
        old = self.free[slot]
        self.free[slot] = old - amount
        if self._order is not None:
            del self._order[bisect.bisect_left(self._order, (old, *slot))]
            bisect.insort(self._order, (old - amount, *slot))

    def fitting(self, need: int) -> Iterator[Slot]:
        """Devices with at least `need` bytes free, tightest first. Do not `take` while iterating."""
        if self._order is None:
            self._order = sorted((free, *slot) for slot, free in self.free.items())
        for i in range(bisect.bisect_left(self._order, (need, "", "")), len(self._order)):
            yield self._order[i][1], self._order[i][2]

    def largest(self) -> int:
        return max(self.free.values(), default=0)


@dataclass
class _Victim:
    worker: str
    assignment: mesh_pb2.Assignment
    last_used: float


def plan(wants: dict[str, Want], workers: dict[str, mesh_pb2.WorkerInfo],
         assignments: dict[tuple[str, str], mesh_pb2.Assignment], ready: frozenset[str] = frozenset(),
         new_id: Callable[[str], str] = lambda name: f"{name}-{uuid.uuid4().hex[:6]}",
         avoid: dict[str, set[str]] | None = None, hold: frozenset[str] = frozenset(),
         idle: dict[str, float] | None = None, jobs: list[JobWant] | tuple[JobWant, ...] = (),
         max_running_jobs_per_tenant: int = 0) -> Plan:
    """`ready` holds the ids of replicas that serve now. `avoid` names, per deployment,
    workers where its replicas recently failed to load (used only when no other worker
    fits); deployments in `hold` get no new replicas this time. `idle` maps the ids of
    replicas that have served nothing for a while to when they were last used: those of
    autoscaled deployments above their minimum may be evicted to make room.

    `jobs` are the fine-tuning jobs, running and queued. Serving comes first: a replica
    that fits nowhere else makes the lowest-priority running jobs on a device yield it
    (they checkpoint and queue again; the replica is placed once they are gone), and no
    queued job starts while one is yielding. Queued jobs then take what replicas left, in
    order of priority (then age), at most `max_running_jobs_per_tenant` (0: no limit) of
    a tenant's at once."""
    avoid = avoid or {}
    idle = idle or {}
    result = Plan()
    fleet = Fleet(workers)
    training: dict[Slot, list[JobWant]] = {}  # running jobs by device
    for job in jobs:
        for slot in job.slots:
            if slot in fleet.free:
                fleet.take(slot, job.memory)
                training.setdefault(slot, []).append(job)

    current: dict[tuple[str, str], list[tuple[str, mesh_pb2.Assignment]]] = {}  # (deployment, ref)
    outdated: dict[str, list[tuple[str, mesh_pb2.Assignment]]] = {}
    for (wid, rid), a in sorted(assignments.items()):
        want = wants.get(a.deployment)
        if want is None or wid not in workers:
            result.remove.append((wid, rid))
            continue
        ref = f"{a.model_name}@{a.model_version}"
        if any(ref == f"{v.name}@{v.version}" for v, _ in want.tracks()):
            current.setdefault((a.deployment, ref), []).append((wid, a))
        else:
            outdated.setdefault(a.deployment, []).append((wid, a))
        for dev_id in a.device_ids:
            fleet.take((wid, dev_id), a.memory_bytes)

    # 1. what goes, what is missing
    per_worker: dict[str, dict[str, int]] = {}  # deployment -> worker -> replicas there
    pending: list[tuple[int, str, registry_pb2.ModelVersion]] = []  # (memory, deployment, version)
    victims: dict[Slot, list[_Victim]] = {}
    allowance: dict[str, int] = {}  # deployment -> replicas it may lose to eviction
    targets = {name: want.deployment.replicas for name, want in wants.items()}
    for name in sorted(wants):
        want = wants[name]
        spread = per_worker.setdefault(name, {})
        wanted, serving = 0, 0
        for version, desired in want.tracks():
            # keep ready replicas first, busy before idle: scaling down drops loading, then idle ones
            have = sorted(current.get((name, f"{version.name}@{version.version}"), []),
                          key=lambda wa: (wa[1].replica_id not in ready, wa[1].replica_id in idle, wa[1].replica_id))
            for wid, a in have[desired:]:
                result.remove.append((wid, a.replica_id))
                _release(fleet, wid, a)
            for wid, a in have[:desired]:
                spread[wid] = spread.get(wid, 0) + 1
                if want.autoscaled and a.replica_id in idle and len(a.device_ids) == 1:
                    victims.setdefault((wid, a.device_ids[0]), []).append(_Victim(wid, a, idle[a.replica_id]))
            wanted += desired
            serving += sum(a.replica_id in ready for _, a in have[:desired])
            missing = 0 if name in hold else max(0, desired - len(have))
            pending += [(want.memory(version), name, version)] * missing
            if want.autoscaled and not want.deployment.traffic:
                # what it may lose to eviction: placed replicas above its minimum, and nothing
                # while it waits for replicas of its own (evicting it to place it is churn)
                allowance[name] = 0 if missing else min(desired, len(have)) - want.deployment.autoscale.min_replicas
        # replicas of versions no longer wanted stay until the wanted ones serve (no downtime)
        for wid, a in outdated.get(name, [])[max(0, wanted - serving):]:
            result.remove.append((wid, a.replica_id))
            _release(fleet, wid, a)

    # 2. place, largest first
    pending.sort(key=lambda p: (-p[0], p[1]))
    failed: set[tuple[str, str, int, int]] = set()
    for need, name, version in pending:
        want = wants[name]
        devices = want.devices(version)
        per_device = -(-need // devices)
        shape = (name, f"{version.name}@{version.version}", per_device, devices)
        if shape in failed:
            continue  # another replica just like it did not fit

        ok = _filter(want, version, workers)
        spread, shunned = per_worker[name], avoid.get(name, set())
        slots = (_one_device(fleet, per_device, ok, spread, shunned) if devices == 1
                 else _many_devices(fleet, per_device, devices, ok, spread, shunned))
        if slots is None and devices == 1 and name not in outdated:  # a rollout frees room by itself
            slots = _evict(fleet, per_device, ok, shunned, name, victims, allowance, targets, result)
        if slots is None and devices == 1 and (waiting := _preempt(fleet, per_device, ok, training, name, result)):
            failed.add(shape)
            result.unplaced[name] = f"waiting for fine-tuning job(s) {', '.join(waiting)} to yield their device"
            continue
        if slots is None:
            failed.add(shape)
            largest = fleet.largest()
            what = f"{devices} devices with {_fmt_bytes(per_device)} free each" if devices > 1 \
                else f"a device with {_fmt_bytes(per_device)} free"
            result.unplaced[name] = (f"no worker has {what}"
                                     + (f" (largest free: {_fmt_bytes(largest)})" if workers else " (no workers)"))
            continue
        wid = slots[0][0]
        for slot in slots:
            fleet.take(slot, per_device)
        spread[wid] = spread.get(wid, 0) + 1
        result.add.append((wid, mesh_pb2.Assignment(
            replica_id=new_id(name), deployment=name, model_name=version.name, model_version=version.version,
            format=version.format, source=version.source, task=version.task, options=dict(version.options),
            device_ids=[dev for _, dev in slots], memory_bytes=per_device)))

    # 3. fine-tuning jobs take what serving left
    if not result.preempt and not any(j.yielding for j in jobs):
        _place_jobs(fleet, workers, jobs, max_running_jobs_per_tenant, result)
    return result


def _preempt(fleet: Fleet, need: int, ok: Callable[[str], bool], training: dict[Slot, list[JobWant]],
             name: str, result: Plan) -> list[str]:
    """Find a device where stopping running jobs (those already yielding first, then the
    lowest priority, newest first) frees `need` bytes; ask those jobs to yield. Returns
    the jobs the replica waits for (empty: no device would do)."""
    best: tuple[tuple[int, float], Slot, list[JobWant]] | None = None
    for slot, running in training.items():
        if not ok(slot[0]):
            continue
        free, taken = fleet.free[slot], []
        for job in sorted(running, key=lambda j: (not j.yielding, j.priority, -j.created_ms)):
            if free >= need:
                break
            taken.append(job)
            free += job.memory
        if free >= need and taken:
            # cheapest: fewest jobs not yet yielding, then the lowest top priority among them
            fresh = [j for j in taken if not j.yielding]
            cost = (len(fresh), max((j.priority for j in fresh), default=-math.inf))
            if best is None or cost < best[0]:
                best = (cost, slot, taken)
    if best is None:
        return []
    _, slot, taken = best
    asked = {job_id for job_id, _ in result.preempt}  # a job on several devices may free more than one
    for job in taken:
        if not job.yielding and job.job_id not in asked:
            result.preempt.append((job.job_id, name))
    training[slot] = [j for j in training[slot] if j not in taken]  # not asked twice in one plan
    return [j.job_id for j in taken]


def _place_jobs(fleet: Fleet, workers: dict[str, mesh_pb2.WorkerInfo], jobs: list[JobWant] | tuple[JobWant, ...],
                per_tenant: int, result: Plan) -> None:
    """Queued jobs in order of priority, then age, each on the tightest device that fits
    (a job on several devices: that many devices of one worker, the tightest first). A job
    that fits nowhere now waits, and so do the jobs behind it (no lower-priority job
    overtakes it), unless no worker could ever hold it: that one waits alone."""
    trainers = {wid for wid, info in workers.items() if "hf" in (info.formats or ["hf"])}
    running: dict[str, int] = {}
    for job in jobs:
        if job.slot is not None:
            running[job.tenant] = running.get(job.tenant, 0) + 1
    for job in sorted((j for j in jobs if j.slot is None), key=lambda j: (-j.priority, j.created_ms, j.job_id)):
        if not any(sum(d.memory_total_bytes >= job.memory for d in workers[wid].devices) >= job.devices
                   for wid in trainers):
            continue
        if per_tenant and running.get(job.tenant, 0) >= per_tenant:
            continue
        if job.devices > 1:
            slots = _many_devices(fleet, job.memory, job.devices, trainers.__contains__, {}, set())
        else:
            slot = next((s for s in fleet.fitting(job.memory) if s[0] in trainers), None)
            slots = [slot] if slot is not None else None
        if slots is None:
            return
        for slot in slots:
            fleet.take(slot, job.memory)
        running[job.tenant] = running.get(job.tenant, 0) + 1
        result.start_jobs.append((job.job_id, slots[0], job.memory))
        if len(slots) > 1:
            result.start_devices[job.job_id] = [dev for _, dev in slots]


def _release(fleet: Fleet, wid: str, a: mesh_pb2.Assignment) -> None:
    for dev_id in a.device_ids:
        fleet.take((wid, dev_id), -a.memory_bytes)


def _filter(want: Want, version: registry_pb2.ModelVersion,
            workers: dict[str, mesh_pb2.WorkerInfo]) -> Callable[[str], bool]:
    selector = dict(want.deployment.selector)
    cache: dict[str, bool] = {}

    def ok(wid: str) -> bool:
        if wid not in cache:
            info = workers[wid]
            cache[wid] = version.format in (info.formats or [version.format]) and \
                _labels_match(selector, dict(info.labels))
        return cache[wid]
    return ok


def _one_device(fleet: Fleet, need: int, ok: Callable[[str], bool], spread: dict[str, int],
                shunned: set[str]) -> list[Slot] | None:
    """The tightest-fitting device on a worker without a replica of this deployment (and
    not shunned); failing that, the best device by (shunned, replicas there, fit)."""
    best: tuple[tuple[bool, int], Slot] | None = None
    for wid, dev in fleet.fitting(need):
        if not ok(wid):
            continue
        key = (wid in shunned, spread.get(wid, 0))
        if key == (False, 0):
            return [(wid, dev)]
        if best is None or key < best[0]:
            best = (key, (wid, dev))
    return [best[1]] if best else None


def _many_devices(fleet: Fleet, need: int, count: int, ok: Callable[[str], bool], spread: dict[str, int],
                  shunned: set[str]) -> list[Slot] | None:
    """`count` devices on one worker, each with `need` bytes free, tightest fits first."""
    found: dict[str, list[Slot]] = {}
    best: tuple[tuple[bool, int], list[Slot]] | None = None
    for wid, dev in fleet.fitting(need):
        if not ok(wid):
            continue
        slots = found.setdefault(wid, [])
        slots.append((wid, dev))
        if len(slots) == count:
            key = (wid in shunned, spread.get(wid, 0))
            if key == (False, 0):
                return slots
            if best is None or key < best[0]:
                best = (key, slots)
    return best[1] if best else None


def _evict(fleet: Fleet, need: int, ok: Callable[[str], bool], shunned: set[str], name: str,
           victims: dict[Slot, list[_Victim]],
           allowance: dict[str, int], targets: dict[str, int], result: Plan) -> list[Slot] | None:
    """Free a device by evicting least recently used idle replicas: choose the device whose
    needed victims were used longest ago; record the evictions and scale their deployments."""
    best: tuple[float, Slot, list[_Victim]] | None = None
    for slot, candidates in victims.items():
        if not ok(slot[0]) or slot[0] in shunned:
            continue
        free, taken, used = fleet.free[slot], [], dict[str, int]()
        for v in sorted(candidates, key=lambda v: v.last_used):
            dep = v.assignment.deployment
            if dep == name or allowance.get(dep, 0) - used.get(dep, 0) <= 0:
                continue
            used[dep] = used.get(dep, 0) + 1
            taken.append(v)
            free += v.assignment.memory_bytes
            if free >= need:
                break
        if free >= need and taken:
            cost = max(v.last_used for v in taken)
            if best is None or cost < best[0]:
                best = (cost, slot, taken)
    if best is None:
        return None
    _, slot, taken = best
    for v in taken:
        dep = v.assignment.deployment
        allowance[dep] -= 1
        result.remove.append((v.worker, v.assignment.replica_id))
        result.evicted.append((v.worker, v.assignment.replica_id, name))
        result.scale[dep] = result.scale.get(dep, targets[dep]) - 1
        _release(fleet, v.worker, v.assignment)
        victims[slot].remove(v)
    return [slot]

