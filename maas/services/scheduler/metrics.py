"""Prometheus metrics of the scheduler (the leader's reconcile loop)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILE = Histogram("maas_scheduler_reconcile_seconds",
                      "Time of one reconcile pass (plan plus the etcd writes).",
                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
TXNS = Counter("maas_scheduler_etcd_transactions_total", "Fenced etcd transactions the leader wrote.")
PLACED = Counter("maas_scheduler_replicas_placed_total", "Replica assignments written.")
REMOVED = Counter("maas_scheduler_replicas_removed_total", "Replica assignments deleted.")
UNPLACED = Gauge("maas_scheduler_unplaced_deployments", "Deployments with replicas the leader could not place.")
