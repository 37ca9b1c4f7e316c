"""Autoscaling: replica targets for autoscaled deployments from the workers' load reports.

Workers publish each replica's in-flight and queued requests a few times a second on core
NATS. Every scheduler instance listens (so a new leader starts with warm figures); the
leader asks `decide()` on each pass and writes the targets it returns.

- Up: when demand (running + queued requests) exceeds `target_in_flight` per replica for
  `scale_up_seconds`, scale to ceil(demand / target), at most `max_replicas`.
- Down: only after `cooldown_seconds` without a change, to the highest demand seen over
  that window, at least `min_replicas`.
- To zero (min 0): after `cooldown_seconds` without a single request. A request for a
  deployment at zero makes the router call Activate: one replica, a cold start.

Also the source of "idle replicas" for eviction (least recently used first).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from maas.mesh.service_classes import reserved_replicas
from maas.v1 import mesh_pb2, scheduler_pb2

DEFAULT_TARGET = 8.0
DEFAULT_SCALE_UP_SECONDS = 3.0
DEFAULT_COOLDOWN_SECONDS = 60.0
STALE_SECONDS = 5.0  # a replica not reported for this long counts as unknown


@dataclass
class _Seen:
    load: mesh_pb2.ReplicaLoad
    at: float  # monotonic


@dataclass
class _Track:
    """What the autoscaler remembers about one deployment."""

    target: int                      # replicas when last seen or set
    since: float                     # last change of the target (monotonic)
    active: float                    # last request seen (monotonic)
    pressure_since: float | None = None
    history: deque[tuple[float, int]] = field(default_factory=deque)  # (time, desired)


class Autoscaler:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.replicas: dict[str, _Seen] = {}
        self.tracks: dict[str, _Track] = {}

    def observe(self, report: mesh_pb2.LoadReport) -> None:
        now = self.clock()
        for load in report.replicas:
            before = self.replicas.get(load.replica_id)
            self.replicas[load.replica_id] = _Seen(load, now)
            busy = load.in_flight or load.queue_depth or (before and before.load.requests_total != load.requests_total)
            track = self.tracks.get(load.deployment)
            if busy and track is not None:
                track.active = now

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    def demand(self, deployment: str) -> int:
        now = self.clock()
        # in_flight counts every request a replica holds, queued ones included
        return sum(s.load.in_flight for s in self.replicas.values()
                   if s.load.deployment == deployment and now - s.at < STALE_SECONDS)

    def decide(self, deployments: dict[str, scheduler_pb2.Deployment],
               starting: set[str] | frozenset[str] = frozenset()) -> dict[str, tuple[int, str]]:
        """New replica targets: deployment -> (replicas, why). Only changes are returned.
        Deployments in `starting` have replicas still loading: they are not scaled down, and
        their cool-down starts once those are ready (a cold start must not be undone)."""
        now = self.clock()
        out: dict[str, tuple[int, str]] = {}
        for name in list(self.tracks):
            if name not in deployments or not deployments[name].autoscale.max_replicas:
                del self.tracks[name]
        for name, dep in deployments.items():
            auto = dep.autoscale
            if not auto.max_replicas:
                continue
            track = self.tracks.get(name)
            if track is None or track.target != dep.replicas:  # new, or changed by someone else
                track = self.tracks[name] = _Track(target=dep.replicas, since=now, active=now)
            if name in starting:
                track.active = track.since = now
            target = auto.target_in_flight or DEFAULT_TARGET
            cooldown = auto.cooldown_seconds or DEFAULT_COOLDOWN_SECONDS
            demand = self.demand(name)
            least = max(auto.min_replicas, reserved_replicas(dep))  # reservations hold replicas up
            desired = min(auto.max_replicas, max(least, math.ceil(demand / target)))
            track.history.append((now, desired))
            while track.history and track.history[0][0] < now - cooldown:
                track.history.popleft()

            if desired > dep.replicas:
                if track.pressure_since is None:
                    track.pressure_since = now
                up_after = auto.scale_up_seconds if auto.HasField("scale_up_seconds") else DEFAULT_SCALE_UP_SECONDS
                if now - track.pressure_since >= up_after or dep.replicas == 0:
                    out[name] = (desired, f"{demand} requests in flight; target {target:g} per replica")
                continue
            track.pressure_since = None
            if desired >= dep.replicas or now - track.since < cooldown:
                continue
            floor = max(least, max(d for _, d in track.history))
            if floor == 0 and now - track.active < cooldown:
                floor = 1  # still in use, just lightly: keep one
            if floor < dep.replicas:
                why = (f"idle for {cooldown:g}s" if floor == 0
                       else f"at most {floor} replica(s) needed over the last {cooldown:g}s")
                out[name] = (floor, why)
        for name, (replicas, _) in out.items():
            track = self.tracks[name]
            track.target, track.since, track.pressure_since = replicas, now, None
            track.history.clear()
        return out

    def idle_replicas(self, min_idle_seconds: float) -> dict[str, float]:
        """Replicas with nothing in flight whose last use is at least `min_idle_seconds` ago:
        replica id -> last use (on this process's monotonic clock; workers report ages)."""
        now = self.clock()
        return {rid: s.at - s.load.idle_ms / 1000 for rid, s in self.replicas.items()
                if now - s.at < STALE_SECONDS and not s.load.in_flight
                and (now - s.at) + s.load.idle_ms / 1000 >= min_idle_seconds}
