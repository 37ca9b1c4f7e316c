"""Prometheus metrics of the scheduler: the leader's reconcile loop, and what every instance
reads from its own mirror of etcd at scrape time (jobs by state, replicas not yet placed)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from maas.mesh.jobs import state_name
from maas.v1 import jobs_pb2, mesh_pb2, scheduler_pb2

RECONCILE = Histogram("maas_scheduler_reconcile_seconds",
                      "Time of one reconcile pass (plan plus the etcd writes).",
                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
TXNS = Counter("maas_scheduler_etcd_transactions_total", "Fenced etcd transactions the leader wrote.")
PLACED = Counter("maas_scheduler_replicas_placed_total", "Replica assignments written.")
REMOVED = Counter("maas_scheduler_replicas_removed_total", "Replica assignments deleted.")
UNPLACED = Gauge("maas_scheduler_unplaced_deployments", "Deployments with replicas the leader could not place.")

# Computed at scrape time from the scheduler's mirror (ServiceRuntime.gauge, wired in main.py).
JOBS = "maas_scheduler_jobs"
JOBS_DOC = ("Fine-tuning jobs in etcd by state (queued, running, succeeded, failed, cancelled); finished "
            "ones until --job-retention-hours forgets them")
PENDING = "maas_scheduler_pending_replicas"
PENDING_DOC = ("Replicas deployments want (an autoscaled one's current target) that no worker is assigned yet, "
               "summed over deployments")
JOB_STATES = tuple(state_name(s) for s in jobs_pb2.JobState.values() if s != jobs_pb2.JOB_STATE_UNSPECIFIED)


def job_counts(jobs: Iterable[jobs_pb2.Job]) -> dict[tuple[str, ...], float]:
    """{(state,): jobs in it}, every state present (0 when none), so each has a series."""
    counts: dict[tuple[str, ...], float] = {(s,): 0.0 for s in JOB_STATES}
    for job in jobs:
        key = (state_name(job.state),)
        if key in counts:
            counts[key] += 1
    return counts


def pending_replicas(deployments: Iterable[scheduler_pb2.Deployment],
                     assignments: Iterable[mesh_pb2.Assignment]) -> dict[tuple[str, ...], float]:
    """{(): replicas wanted beyond those assigned}, over deployments that have replicas (not
    pipelines, which the routers run)."""
    assigned: dict[str, int] = {}
    for a in assignments:
        assigned[a.deployment] = assigned.get(a.deployment, 0) + 1
    pending = sum(max(0, d.replicas - assigned.get(d.name, 0)) for d in deployments if d.format != "pipeline")
    return {(): float(pending)}
