"""The etcd key layout every service shares (see docs/architecture.md).

Values are the protobuf messages of maas.v1 (mesh.proto, registry.proto, scheduler.proto).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "/maas/"

    def _k(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    # membership (under the owner's lease)
    def service(self, kind: str, instance: str) -> bytes:
        return self._k("services", kind, instance)

    def services(self, kind: str = "") -> bytes:
        return self._k("services", kind + "/" if kind else "")

    def worker(self, worker_id: str) -> bytes:
        return self._k("workers", worker_id)

    def workers(self) -> bytes:
        return self._k("workers/")

    def replica(self, replica_id: str) -> bytes:
        return self._k("replicas", replica_id)

    def replicas(self) -> bytes:
        return self._k("replicas/")

    def election(self, name: str) -> bytes:
        return self._k("election", name)

    # desired state (no lease)
    def assignment(self, worker_id: str, replica_id: str) -> bytes:
        return self._k("assignments", worker_id, replica_id)

    def assignments(self, worker_id: str = "") -> bytes:
        return self._k("assignments", worker_id + "/" if worker_id else "")

    def deployment(self, name: str) -> bytes:
        return self._k("deployments", name)

    def deployments(self) -> bytes:
        return self._k("deployments/")

    # fine-tuning jobs (created by the scheduler API, placed by its leader, run by workers)
    def job(self, job_id: str) -> bytes:
        return self._k("jobs", job_id)

    def jobs(self) -> bytes:
        return self._k("jobs/")

    # files (the registry) and batches (created and run by routers; docs/batches.md)
    def file(self, file_id: str) -> bytes:
        return self._k("files", file_id)

    def files(self) -> bytes:
        return self._k("files/")

    def batch(self, batch_id: str) -> bytes:
        return self._k("batches", batch_id)

    def batches(self) -> bytes:
        return self._k("batches/")

    def open_batch(self, batch_id: str = "") -> bytes:
        """Marks a batch that is not finished (what routers look through for work)."""
        return self._k("batches-open", batch_id)

    def batch_run(self, batch_id: str) -> bytes:
        """The router running a batch, under that router's lease."""
        return self._k("batch-runs", batch_id)

    # tenants (written by the registry, mirrored by routers)
    def api_key(self, sha256: str) -> bytes:
        return self._k("tenants", "keys", sha256)

    def api_keys(self) -> bytes:
        return self._k("tenants", "keys/")

    # registry
    def model(self, name: str) -> bytes:
        return self._k("registry", "models", name)

    def models(self) -> bytes:
        return self._k("registry", "models/")

    def upload(self, tenant: str, sha256: str) -> bytes:
        """Marks an artifact a tenant uploaded: a tenant may read or register only artifacts it
        uploaded or that a model version it can see is made of."""
        return self._k("registry", "uploads", tenant, sha256)

    def version(self, name: str, version: int) -> bytes:
        return self._k("registry", "versions", name, f"{version:08d}")

    def versions(self, name: str = "") -> bytes:
        """One model's versions; every model's with no name."""
        return self._k("registry", "versions", name + "/") if name else self._k("registry", "versions/")
