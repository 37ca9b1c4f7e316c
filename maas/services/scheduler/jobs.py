"""Fine-tuning jobs: the API side (create, read, cancel) of `jobs/{id}` in etcd.

A job is checked in full before it is queued: its base model resolves to a version that
a worker can train, its hyperparameters are in range, and its dataset (already uploaded
to the registry's artifact store) is fetched and validated line by line, so a malformed
line is reported with its number and nothing is queued. Any scheduler instance serves
these calls; the leader places the queued jobs (see reconciler.py and placement.py).
"""

from __future__ import annotations

import asyncio
import math
import uuid

from maas.finetune.datasets import MAX_FILE_BYTES, Dataset, load_dataset
from maas.mesh import authz
from maas.mesh.artifacts import check_digest
from maas.mesh.clients import RegistryClient
from maas.mesh.errors import InvalidArgument, NotFound, ResourceExhausted
from maas.mesh.etcd import EtcdSession
from maas.mesh.jobs import TERMINAL, get_job, now_ms, state_name, update_job
from maas.mesh.names import validate_name
from maas.v1 import jobs_pb2, registry_pb2

MAX_JOBS_PER_TENANT = 20      # queued + running, per tenant
MAX_RUNNING_PER_TENANT = 2    # running at once, per tenant (the leader enforces it)
DEFAULTS = {"method": "lora", "epochs": 3, "lora_rank": 16, "batch_size": 8, "checkpoint_every": 20, "devices": 1}
LIMITS = {"epochs": 1000, "lora_rank": 256, "batch_size": 1024, "max_steps": 1_000_000,
          "checkpoint_every": 100_000, "devices": 64}
MAX_PRIORITY = 1000
MAX_SEED = 2**32 - 1
MAX_CHECKS = 2  # datasets validated at once (each is held in memory, up to 256 MiB)


class JobStore:
    def __init__(self, session: EtcdSession, registry: RegistryClient, *,
                 max_jobs_per_tenant: int = MAX_JOBS_PER_TENANT) -> None:
        self.session = session
        self.registry = registry
        self.max_jobs_per_tenant = max_jobs_per_tenant
        self._checking = asyncio.Semaphore(MAX_CHECKS)
        self._creating = asyncio.Lock()

    @staticmethod
    def caller() -> tuple[str, bool]:
        """(tenant, sees every tenant's jobs) of the caller: a tenant's key sees its own jobs;
        the admin sees all, and its own jobs are the platform's (tenant "")."""
        me = authz.caller()
        return me.tenant, me.trusted

    async def create(self, spec: jobs_pb2.JobSpec) -> jobs_pb2.Job:
        job = jobs_pb2.Job(id=f"ft-{uuid.uuid4().hex[:10]}", state=jobs_pb2.JOB_STATE_QUEUED)
        job.spec.CopyFrom(spec)
        spec = job.spec
        spec.tenant, _ = self.caller()
        await self._check(spec)
        base = await self._visible(spec.base)
        if base.base:
            raise InvalidArgument(f"{base.name}@{base.version} is an adapter; fine-tune its base {base.base} "
                                  "instead", field="base")
        if base.format != "hf" or base.task not in ("", "generate"):
            raise InvalidArgument(f"{base.name}@{base.version} is a {base.format} {base.task or 'generate'} model; "
                                  "only hf text-generation models can be fine-tuned", field="base")
        spec.base = f"{base.name}@{base.version}"
        if not spec.name:
            spec.name = f"{base.name}-ft-{job.id.removeprefix('ft-')[:6]}"
        validate_name(spec.name, "name")
        if spec.name == base.name:
            raise InvalidArgument(f"the result cannot be registered under its base's name {base.name!r}; "
                                  "choose another --name", field="name")
        try:
            existing = await self.registry.resolve(spec.name)
        except NotFound:
            existing = None
        if existing is not None and existing.owner != spec.tenant:
            raise InvalidArgument(f"the name {spec.name!r} is taken; choose another --name", field="name")
        if existing is not None and "job" not in existing.metadata:
            raise InvalidArgument(f"model {spec.name!r} exists and was not made by fine-tuning; a job adds "
                                  "versions only to its own results: choose another --name", field="name")
        if existing is not None and (existing.base != (spec.base if spec.method == "lora" else "")
                                     or existing.metadata.get("method", "lora") != spec.method):
            what = f"a LoRA adapter of {existing.base}" if existing.base else "a fully fine-tuned model"
            raise InvalidArgument(f"model {spec.name!r} is {what}; a new version must be the same kind on the same "
                                  f"base (adapters served under that name would break): choose another --name",
                                  field="name")
        tenant = authz.caller().tenant
        if tenant and spec.dataset_sha256 and await self.session.get(
                self.session.keys.upload(tenant, check_digest(spec.dataset_sha256))) is None:
            raise NotFound(f"dataset artifact {spec.dataset_sha256[:12]} is not in the registry; upload it first")
        dataset = await self._dataset(spec.dataset_sha256)
        job.dataset_digest, job.examples = dataset.sha256, len(dataset)
        # count and write under one lock, so concurrent creates through this scheduler cannot
        # both pass the quota (through two scheduler instances they still can, by one)
        async with self._creating:
            active = [j for j in await self.list(active=True) if j.spec.tenant == spec.tenant]
            if len(active) >= self.max_jobs_per_tenant:
                raise ResourceExhausted(f"tenant {spec.tenant!r} has {len(active)} queued or running jobs, the most "
                                        f"allowed ({self.max_jobs_per_tenant}); wait for one to finish or cancel one")
            job.created_ms = job.updated_ms = now_ms()
            key, tx = self.session.keys.job(job.id), self.session.client.transactions
            await self.session.client.transaction(compare=[tx.create(key) == 0],
                                                  success=[tx.put(key, job.SerializeToString())], failure=[])
        return job

    async def _check(self, spec: jobs_pb2.JobSpec) -> None:
        for name, default in DEFAULTS.items():
            if not getattr(spec, name):
                setattr(spec, name, default)
        if spec.method not in ("lora", "full"):
            raise InvalidArgument(f"method must be lora or full, not {spec.method!r}", field="method")
        for name, limit in LIMITS.items():
            if getattr(spec, name) > limit:
                raise InvalidArgument(f"{name} must be at most {limit}, not {getattr(spec, name)}", field=name)
        if spec.HasField("learning_rate") and not (math.isfinite(spec.learning_rate)
                                                   and 0 < spec.learning_rate <= 1):
            raise InvalidArgument(f"learning_rate must be in (0, 1], not {spec.learning_rate}",
                                  field="learning_rate")
        if spec.seed > MAX_SEED:
            raise InvalidArgument(f"seed must be at most {MAX_SEED}, not {spec.seed}", field="seed")
        if abs(spec.priority) > MAX_PRIORITY:
            raise InvalidArgument(f"priority must be within -{MAX_PRIORITY}..{MAX_PRIORITY}, not {spec.priority}",
                                  field="priority")
        if not spec.base:
            raise InvalidArgument("base (the model to fine-tune, NAME or NAME@VERSION) is required", field="base")
        if spec.method != "lora" and spec.lora_rank != DEFAULTS["lora_rank"]:
            raise InvalidArgument("lora_rank applies to method lora only", field="lora_rank")
        if spec.devices > spec.batch_size:
            raise InvalidArgument(f"devices ({spec.devices}) must be at most batch_size ({spec.batch_size}): each "
                                  "device takes its part of every batch", field="devices")

    async def _dataset(self, sha: str) -> Dataset:
        if not sha:
            raise InvalidArgument("dataset_sha256 is required: upload the JSONL file to the registry first "
                                  "(`maas finetune create --data FILE` does)", field="dataset_sha256")
        check_digest(sha)
        async with self._checking:  # each check holds a whole file in memory: a few at a time
            chunks, size = [], 0
            try:
                async for chunk in self.registry.download(sha, timeout=120):
                    size += len(chunk.data)
                    if size > MAX_FILE_BYTES:
                        raise InvalidArgument(f"the dataset is over the limit of {MAX_FILE_BYTES >> 20} MiB",
                                              field="data")
                    chunks.append(chunk.data)
            except NotFound:
                raise NotFound(f"dataset artifact {sha[:12]} is not in the registry; upload it first") from None
            return await asyncio.to_thread(load_dataset, b"".join(chunks))  # up to 256 MiB: not on the loop

    async def _visible(self, ref: str) -> registry_pb2.ModelVersion:
        """The version `ref` names, if the caller may see it (the registry answers the
        scheduler for every tenant)."""
        version = await self.registry.resolve(ref)
        if not authz.caller().may_see(version.owner):
            raise NotFound(f"model {ref.partition('@')[0]!r} is not registered")
        return version

    async def get(self, job_id: str) -> jobs_pb2.Job:
        _check_id(job_id)
        job = await get_job(self.session, job_id)
        tenant, sees_all = self.caller()
        if not sees_all and job.spec.tenant != tenant:
            raise NotFound(f"job {job_id!r} does not exist")  # not "forbidden": ids of others stay private
        return job

    async def visible(self, tenant: str = "", active: bool = False) -> list[jobs_pb2.Job]:
        """The jobs a caller may see: its own tenant's (with a tenant key), else `tenant`'s or all."""
        own, sees_all = self.caller()
        if not sees_all:
            if tenant and tenant != own:
                return []
            tenant = own
        return await self.list(tenant, active)

    async def list(self, tenant: str = "", active: bool = False) -> list[jobs_pb2.Job]:
        pairs, _ = await self.session.get_prefix(self.session.keys.jobs())
        jobs = [jobs_pb2.Job.FromString(v) for _, v in pairs]
        return sorted((j for j in jobs if (not tenant or j.spec.tenant == tenant)
                       and (not active or j.state not in TERMINAL)), key=lambda j: (j.created_ms, j.id))

    async def cancel(self, job_id: str) -> tuple[jobs_pb2.Job, bool]:
        """A queued job is cancelled at once; a running one is asked to stop (its worker stops
        the training process, frees the device and marks it cancelled). Returns the job and
        whether this call changed it."""
        job = await self.get(job_id)
        if job.state in TERMINAL:
            return job, False

        def cancel(job: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if job.state in TERMINAL:
                return None
            if job.state == jobs_pb2.JOB_STATE_RUNNING:
                job.cancel_requested = True
                job.message = f"cancelling (was {state_name(job.state)} on {job.worker_id})"
            else:
                job.state = jobs_pb2.JOB_STATE_CANCELLED
                job.message = "cancelled while queued"
                job.finished_ms = now_ms()
            return job

        done = await update_job(self.session, job_id, cancel)
        if done is None or done == job and job.cancel_requested:
            return done or await get_job(self.session, job_id), False
        if done.state == jobs_pb2.JOB_STATE_CANCELLED and done.checkpoint_sha256:
            await self.registry.delete_artifact(done.checkpoint_sha256)  # nothing will resume it
        return done, True


def _check_id(job_id: str) -> None:
    if not job_id or len(job_id) > 64 or not all(c.isalnum() or c in "-_" for c in job_id):
        raise InvalidArgument(f"{job_id!r} is not a job id (like ft-0123456789)", field="id")
