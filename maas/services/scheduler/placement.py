"""Placement: a pure function from (deployments, workers, assignments) to a plan.

No etcd, no I/O: the reconciler feeds it the mirrored state and writes the plan back in
one fenced transaction. That keeps the policy testable and fast.

Policy (first cut): drop assignments whose worker is gone or whose deployment no longer
wants them; then, per deployment, add replicas until the desired count is reached,
choosing for each the worker with the fewest replicas of that deployment (spread), then
the device with the most free memory that still fits the replica. Replicas of a previous
version stay until enough replicas of the new one are ready.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from maas.v1 import mesh_pb2, registry_pb2, scheduler_pb2


@dataclass(frozen=True)
class Want:
    """A deployment joined with the model version it resolved to (and its canary's, if any)."""

    deployment: scheduler_pb2.Deployment
    version: registry_pb2.ModelVersion
    canary: registry_pb2.ModelVersion | None = None

    def memory(self, version: registry_pb2.ModelVersion) -> int:
        return self.deployment.resources.memory_bytes or version.resources.memory_bytes

    def tracks(self) -> list[tuple[registry_pb2.ModelVersion, int]]:
        """(version, replicas) to run: the stable version, plus a canary's share of the
        replicas (at least one) while the deployment has one."""
        replicas = self.deployment.replicas
        if self.canary is None or not self.deployment.traffic:
            return [(self.version, replicas)]
        weight = self.deployment.traffic[0].weight
        return [(self.version, replicas), (self.canary, max(1, math.ceil(replicas * weight / 100)) if replicas else 0)]


@dataclass
class Plan:
    add: list[tuple[str, mesh_pb2.Assignment]] = field(default_factory=list)      # (worker, assignment)
    remove: list[tuple[str, str]] = field(default_factory=list)                  # (worker, replica)
    unplaced: dict[str, str] = field(default_factory=dict)                       # deployment -> why

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def plan(wants: dict[str, Want], workers: dict[str, mesh_pb2.WorkerInfo],
         assignments: dict[tuple[str, str], mesh_pb2.Assignment], ready: frozenset[str] = frozenset(),
         new_id: Callable[[str], str] = lambda name: f"{name}-{uuid.uuid4().hex[:6]}",
         avoid: dict[str, set[str]] | None = None, hold: frozenset[str] = frozenset()) -> Plan:
    """`ready` holds the ids of replicas that serve now; a deployment moving to a new version
    keeps that many old replicas until as many new ones are ready (no downtime). `avoid`
    names, per deployment, workers where its replicas recently failed to load (used only
    when no other worker fits); deployments in `hold` get no new replicas this time."""
    avoid = avoid or {}
    result = Plan()
    free: dict[tuple[str, str], int] = {}
    for wid, info in workers.items():
        for device in info.devices:
            free[(wid, device.id)] = device.memory_total_bytes

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
            if (wid, dev_id) in free:
                free[(wid, dev_id)] -= a.memory_bytes

    for name in sorted(wants):
        want = wants[name]
        per_worker: dict[str, int] = {}
        wanted, serving = 0, 0
        tracks = []
        for version, desired in want.tracks():
            have = current.get((name, f"{version.name}@{version.version}"), [])
            for wid, a in have[desired:]:
                result.remove.append((wid, a.replica_id))
            for wid, _ in have[:desired]:
                per_worker[wid] = per_worker.get(wid, 0) + 1
            wanted += desired
            serving += sum(a.replica_id in ready for _, a in have[:desired])
            tracks.append((version, desired - len(have)))
        # replicas of versions no longer wanted stay until the wanted ones serve (no downtime)
        for wid, a in outdated.get(name, [])[max(0, wanted - serving):]:
            result.remove.append((wid, a.replica_id))
        selector = dict(want.deployment.selector)
        shunned = avoid.get(name, set())
        for v, missing in tracks:
            need = want.memory(v)
            for _ in range(0 if name in hold else missing):
                candidates = [
                    (wid in shunned, per_worker.get(wid, 0), -mem, wid, dev)
                    for (wid, dev), mem in free.items()
                    if mem >= need and v.format in (workers[wid].formats or [v.format])
                    and _labels_match(selector, dict(workers[wid].labels))
                ]
                if not candidates:
                    largest = max(free.values(), default=0)
                    result.unplaced[name] = (
                        f"no worker has a device with {_fmt_bytes(need)} free"
                        + (f" (largest free: {_fmt_bytes(largest)})" if free else " (no workers)"))
                    break
                *_, wid, dev = min(candidates)
                free[(wid, dev)] -= need
                per_worker[wid] = per_worker.get(wid, 0) + 1
                result.add.append((wid, mesh_pb2.Assignment(
                    replica_id=new_id(name), deployment=name, model_name=v.name, model_version=v.version,
                    format=v.format, source=v.source, task=v.task, options=dict(v.options),
                    device_ids=[dev], memory_bytes=need)))
    return result
