"""The leader's loop: desired state (deployments) -> assignments, level-triggered.

Only the elected leader writes assignments, and every write is fenced on the election
key, so a leader that lost its lease while paused cannot place anything. After a
restart or fail-over the new leader rebuilds everything from etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from maas.mesh.aio import stop_task, wait_event
from maas.mesh.clients import RegistryClient
from maas.mesh.errors import AlreadyExists, FailedPrecondition, MaasError, NotFound
from maas.mesh.etcd import LeaderElection
from maas.mesh.jobs import TERMINAL, now_ms, update_job
from maas.mesh.server import ServiceRuntime
from maas.mesh.service_classes import reserved_replicas
from maas.services.scheduler import metrics, placement
from maas.services.scheduler.autoscaler import Autoscaler
from maas.services.scheduler.canary import CanaryJudge
from maas.services.scheduler.deployments import DeploymentStore
from maas.services.scheduler.state import ClusterState
from maas.v1 import jobs_pb2, mesh_pb2, registry_pb2, scheduler_pb2

log = logging.getLogger(__name__)

MAX_TXN_OPS = 100  # etcd's default limit is 128 operations per transaction
MAX_BACKOFF = 60.0  # seconds between attempts to load a deployment that keeps failing
AVOID_SECONDS = 300.0  # how long a worker where a load failed is avoided for that deployment
CATCH_UP_SECONDS = 5.0  # how long to wait for the mirrors to show the leader's own writes
EVICT_IDLE_SECONDS = 30.0  # a replica unused this long may be evicted to make room for another
# Device memory a fine-tuning job reserves, as a multiple of its base model's serving memory:
# LoRA keeps the frozen weights plus activations and a small adapter with its optimizer state;
# full fine-tuning adds gradients and two AdamW moments for every weight.
JOB_MEMORY_FACTOR = {"lora": 2, "full": 4}
JOB_RETENTION_SECONDS = 7 * 24 * 3600.0  # finished jobs stay listed this long, then their records go


@dataclass
class Retry:
    """Back-off state of a deployment whose replicas failed to load."""

    delay: float = 0.0
    next_try: float = 0.0
    avoid: dict[str, float] = field(default_factory=dict)  # worker -> until (monotonic)
    seen: set[str] = field(default_factory=set)  # failed replicas already counted


class LostLeadership(Exception):
    pass


class Reconciler:
    def __init__(self, rt: ServiceRuntime, state: ClusterState, resolver: RegistryClient, *,
                 evict_idle_seconds: float = EVICT_IDLE_SECONDS, deployments: DeploymentStore | None = None,
                 max_running_jobs_per_tenant: int = 0, job_retention_seconds: float = JOB_RETENTION_SECONDS) -> None:
        self.rt = rt
        self.job_retention_ms = job_retention_seconds * 1000
        self.deployments = deployments or DeploymentStore(rt.etcd, resolver)
        self.max_running_jobs_per_tenant = max_running_jobs_per_tenant
        self.state = state
        self.resolver = resolver
        self.autoscaler = Autoscaler()
        self.canaries = CanaryJudge(state, self.deployments, resolver, rt.events)
        self.evict_idle_seconds = evict_idle_seconds
        self.is_leader = False
        self.unplaced: dict[str, str] = {}
        self.retries: dict[str, Retry] = {}
        self._task: asyncio.Task[None] | None = None
        state.workers.add_listener(self._on_worker)
        state.replicas.add_listener(self._on_replica)

    def _on_worker(self, worker_id: str, old: mesh_pb2.WorkerInfo | None, new: mesh_pb2.WorkerInfo | None) -> None:
        if self.is_leader and new is None and old is not None:
            self.rt.events.publish("worker", "left", worker_id, f"worker {worker_id} lease gone; re-placing its replicas")

    def _on_replica(self, replica_id: str, old: mesh_pb2.ReplicaInfo | None, new: mesh_pb2.ReplicaInfo | None) -> None:
        if new is None:
            self.autoscaler.forget(replica_id)

    async def start(self) -> None:
        await self.rt.events.subscribe_load(self.autoscaler.observe)
        await self.rt.events.subscribe_pipeline(self.canaries.observe)
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def close(self) -> None:
        await stop_task(self._task)

    async def _run(self) -> None:
        """Campaign, lead until leadership is lost or etcd fails, resign, repeat. Never exits
        except on cancellation: a scheduler whose reconciler died would hold the election
        key and place nothing."""
        info = self.rt.info
        while True:
            election = LeaderElection(self.rt.etcd, "scheduler", mesh_pb2.LeaderInfo(
                instance=info.instance, endpoint=info.endpoint).SerializeToString())
            try:
                await election.campaign()
                self.is_leader = True
                self.autoscaler.tracks.clear()  # decide from what is seen while leading, not from before
                self.rt.events.publish("scheduler", "leader", self.rt.config.instance, "became scheduler leader")
                await self._lead(election)
            except asyncio.CancelledError:
                await election.resign()
                raise
            except LostLeadership:
                log.warning("lost scheduler leadership")
            except Exception as e:
                log.warning("leading failed (%s: %s); resigning and campaigning again", type(e).__name__, e)
                await election.resign()
            finally:
                self.is_leader = False
            await asyncio.sleep(random.uniform(0.2, 1.0))

    async def _lead(self, election: LeaderElection) -> None:
        while True:
            self.state.changed.clear()
            try:
                with metrics.RECONCILE.time():
                    await self.reconcile_once(election)
                await self.canaries.judge(election.is_leader)
            except LostLeadership:
                raise
            except Exception as e:  # etcd or registry hiccup: try again shortly
                log.warning("reconcile failed: %s", e)
            autoscaled = any(d.autoscale.max_replicas for d in self.state.deployments.items.values())
            # autoscaling looks at load every second
            await wait_event(self.state.changed, 1.0 if autoscaled else 2.0)
            await asyncio.sleep(0.05)  # debounce bursts of changes
            if not await election.is_leader():
                raise LostLeadership

    async def reconcile_once(self, election: LeaderElection) -> None:
        # pipeline deployments have no replicas (the routers run them); `canary` judges them
        deployments = {n: d for n, d in self.state.deployments.items.items() if d.format != "pipeline"}
        ready = frozenset(r.replica_id for r in self.state.replicas.items.values()
                          if r.state == mesh_pb2.REPLICA_STATE_READY)
        starting = {a.deployment for a in self.state.assignments.items.values() if a.replica_id not in ready}
        for name, (replicas, why) in self.autoscaler.decide(deployments, starting).items():
            if updated := await self._set_replicas(election, deployments[name], replicas):
                deployments[name] = updated
                log.info("scaled %s to %d replica(s): %s", name, replicas, why)
                self.rt.events.publish("deployment", "scaled", name, f"{name} scaled to {replicas}: {why}",
                                       replicas=str(replicas))
        wants: dict[str, placement.Want] = {}
        for name, dep in deployments.items():
            try:
                canary = await self.resolver.resolve(dep.traffic[0].model) if dep.traffic else None
                wants[name] = placement.Want(dep, await self.resolver.resolve(dep.resolved_version), canary)
            except MaasError as e:
                self.unplaced[name] = str(e)
        assignments = self.state.assignments_by_worker()
        failed = self._take_failed(assignments)
        now = time.monotonic()
        hold = frozenset(d for d, r in self.retries.items() if r.next_try > now)
        avoid = {d: {w for w, until in r.avoid.items() if until > now} for d, r in self.retries.items()}
        idle = {rid: t for rid, t in self.autoscaler.idle_replicas(self.evict_idle_seconds).items() if rid in ready}
        jobs = await self._jobs(election)
        result = placement.plan(wants, dict(self.state.workers.items), assignments, ready, avoid=avoid, hold=hold,
                                idle=idle, jobs=jobs, max_running_jobs_per_tenant=self.max_running_jobs_per_tenant)
        await self._apply_jobs(election, result)
        for name, replicas in result.scale.items():  # evictions shrink their deployments first
            if not await self._set_replicas(election, deployments[name], replicas):
                self.state.changed.set()  # it changed under us: plan again
                return
        for worker, rid, beneficiary in result.evicted:
            owner = assignments[(worker, rid)].deployment
            log.info("evicting idle replica %s of %s from %s to make room for %s", rid, owner, worker, beneficiary)
            self.rt.events.publish("replica", "evicted", rid, f"idle replica of {owner} evicted for {beneficiary}",
                                   deployment=owner, worker=worker, for_deployment=beneficiary)
        result.remove.extend(failed)
        self.unplaced.update(result.unplaced)
        for name in list(self.unplaced):
            if name not in result.unplaced and name in wants and name not in self.retries:
                del self.unplaced[name]
        for name in list(self.retries):
            serving = sum(r.deployment == name and r.replica_id in ready for r in self.state.replicas.items.values())
            if name not in wants or serving >= wants[name].deployment.replicas:
                del self.retries[name]  # fully serving again (or gone): forget its failures
                self.unplaced.pop(name, None)
        metrics.UNPLACED.set(len(self.unplaced))
        if hold:
            self.state.changed.set()  # come back when the back-off ends (the loop wakes every 2 s)
        if not result:
            return
        keys, tx = self.rt.etcd.keys, self.rt.etcd.client.transactions
        ops = [tx.delete(keys.assignment(w, r)) for w, r in result.remove]
        ops += [tx.put(keys.assignment(w, a.replica_id), a.SerializeToString()) for w, a in result.add]
        for i in range(0, len(ops), MAX_TXN_OPS):
            metrics.TXNS.inc()
            if not await election.fenced_txn(ops[i:i + MAX_TXN_OPS]):
                raise LostLeadership
        metrics.PLACED.inc(len(result.add))
        metrics.REMOVED.inc(len(result.remove))
        # plan next from a mirror that includes these writes, or it would place them again
        expected: dict[str, mesh_pb2.Assignment | None] = {f"{w}/{r}": None for w, r in result.remove}
        expected.update({f"{w}/{a.replica_id}": a for w, a in result.add})
        if not await self.state.assignments.caught_up(expected, CATCH_UP_SECONDS):
            log.warning("the assignments watch has not shown our writes after %.0fs", CATCH_UP_SECONDS)
        for w, a in result.add:
            log.info("placed %s (%s@%s) on %s %s", a.replica_id, a.model_name, a.model_version, w, a.device_ids[0])
        for w, r in result.remove:
            log.info("removed %s from %s", r, w)

    def _take_failed(self, assignments: dict[tuple[str, str], mesh_pb2.Assignment]) -> list[tuple[str, str]]:
        """Replicas that failed to load stay visible (failed, with their reason) for a back-off
        that doubles per deployment; then their assignments are dropped so they are placed
        again, preferably on another worker. Removes those from `assignments`."""
        removed = []
        now = time.monotonic()
        for r in list(self.state.replicas.items.values()):
            key = (r.worker_id, r.replica_id)
            if r.state != mesh_pb2.REPLICA_STATE_FAILED or key not in assignments:
                continue
            retry = self.retries.setdefault(r.deployment, Retry())
            if r.replica_id not in retry.seen:
                retry.seen.add(r.replica_id)
                retry.delay = min(retry.delay * 2, MAX_BACKOFF) if retry.delay else 1.0
                retry.next_try = now + retry.delay
                retry.avoid[r.worker_id] = now + AVOID_SECONDS
                self.unplaced[r.deployment] = (
                    f"replica {r.replica_id} failed on worker {r.worker_id}: {r.message}; "
                    f"retrying in {retry.delay:.0f}s, on another worker if one fits")
                self.rt.events.publish("replica", "retrying", r.replica_id, self.unplaced[r.deployment],
                                       deployment=r.deployment, worker=r.worker_id)
            if now >= retry.next_try:
                del assignments[key]
                removed.append(key)
        return removed

    async def _set_replicas(self, election: LeaderElection, seen: scheduler_pb2.Deployment,
                            replicas: int) -> scheduler_pb2.Deployment | None:
        """Write an autoscaled deployment's replica target, unless it changed since the
        decision was made from `seen` (a user's change wins: we decide again next pass).
        The compare on its revision closes the gap between this read and the write.
        The updated deployment, or None."""
        name = seen.name
        key, tx = self.rt.etcd.keys.deployment(name), self.rt.etcd.client.transactions
        got = await self.rt.etcd.client.get(key)
        if got is None:
            return None
        dep = scheduler_pb2.Deployment.FromString(got.value)
        if dep != seen or not dep.autoscale.max_replicas:
            return None
        dep.replicas = min(dep.autoscale.max_replicas, max(dep.autoscale.min_replicas, reserved_replicas(dep), replicas))
        metrics.TXNS.inc()
        if await election.fenced_txn([tx.put(key, dep.SerializeToString())], compare=[tx.mod(key) == got.mod_revision]):
            await self.state.deployments.caught_up({name: dep}, CATCH_UP_SECONDS)
            return dep
        if not await election.is_leader():
            raise LostLeadership
        return None

    # -- fine-tuning jobs --

    def _fenced(self, election: LeaderElection) -> Callable[[list[Any], list[Any]], Awaitable[bool]]:
        """Job writes by the leader, fenced on its election like its assignment writes."""
        async def fenced(ops: list[Any], compare: list[Any]) -> bool:
            metrics.TXNS.inc()
            return await election.fenced_txn(ops, compare=compare)
        return fenced

    async def _jobs(self, election: LeaderElection) -> list[placement.JobWant]:
        """The jobs placement sees. On the way: a running job whose worker is gone goes back
        to the queue (it resumes from its last checkpoint) or, if it was being cancelled, is
        cancelled; a queued job whose base model is gone fails; a finished job that asked
        to be deployed is deployed."""
        wants = []
        workers = self.state.workers.items
        for job in list(self.state.jobs.items.values()):
            spec = job.spec
            if job.state == jobs_pb2.JOB_STATE_RUNNING:
                if job.worker_id in workers:
                    wants.append(placement.JobWant(job.id, job.memory_bytes, spec.priority, job.created_ms,
                                                   spec.tenant, (job.worker_id, job.device_id), job.yield_requested,
                                                   max(1, spec.devices), tuple(job.device_ids)))
                else:
                    await self._lost(election, job)
            elif job.state == jobs_pb2.JOB_STATE_QUEUED:
                try:
                    base = await self.resolver.resolve(spec.base)
                except NotFound as e:
                    await self._finish_job(election, job, jobs_pb2.JOB_STATE_FAILED, f"base model gone: {e.message}")
                    continue
                except MaasError:
                    continue  # registry hiccup: next pass
                # on several devices FSDP shards weights, gradients and optimizer state: split evenly, as a replica's
                devices = max(1, spec.devices)
                memory = -(-base.resources.memory_bytes * JOB_MEMORY_FACTOR.get(spec.method, 4) // devices)
                wants.append(placement.JobWant(job.id, memory, spec.priority, job.created_ms, spec.tenant,
                                               devices=devices))
            elif job.state == jobs_pb2.JOB_STATE_SUCCEEDED and spec.deploy and job.result and not job.deployment:
                await self._deploy_result(election, job)
            elif job.state in TERMINAL and job.finished_ms and now_ms() - job.finished_ms > self.job_retention_ms:
                await self._forget_job(election, job)
        return wants

    async def _forget_job(self, election: LeaderElection, job: jobs_pb2.Job) -> None:
        """Delete a job finished longer ago than the retention (its result, registered with the
        job's id and metrics in its metadata, stays; so does its dataset, named there)."""
        key, tx = self.rt.etcd.keys.job(job.id), self.rt.etcd.client.transactions
        metrics.TXNS.inc()
        if await election.fenced_txn([tx.delete(key)], compare=[tx.mod(key) > 0]):
            log.info("job %s (%s) forgotten: finished over %.0f h ago", job.id, job.state, self.job_retention_ms / 3.6e6)

    async def _lost(self, election: LeaderElection, job: jobs_pb2.Job) -> None:
        worker = job.worker_id

        def requeue(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if j.state != jobs_pb2.JOB_STATE_RUNNING or j.worker_id != worker:
                return None
            if j.cancel_requested:
                j.state, j.message, j.finished_ms = jobs_pb2.JOB_STATE_CANCELLED, "cancelled (its worker was lost)", \
                    now_ms()
            else:
                j.state = jobs_pb2.JOB_STATE_QUEUED
                j.message = (f"worker {worker} was lost; queued to resume from the checkpoint at step "
                             f"{j.checkpoint_step}" if j.checkpoint_sha256 else
                             f"worker {worker} was lost before the first checkpoint; queued to start again")
            j.worker_id, j.device_id, j.memory_bytes, j.yield_requested = "", "", 0, False
            del j.device_ids[:]
            return j

        if done := await update_job(self.rt.etcd, job.id, requeue, fenced=self._fenced(election)):
            what = "cancelled" if done.state == jobs_pb2.JOB_STATE_CANCELLED else "requeued"
            log.warning("job %s: %s", job.id, done.message)
            self.rt.events.publish("job", what, job.id, done.message, worker=worker,
                                   checkpoint_step=str(done.checkpoint_step))
            if what == "cancelled" and done.checkpoint_sha256:
                await self.resolver.delete_artifact(done.checkpoint_sha256)

    async def _finish_job(self, election: LeaderElection, job: jobs_pb2.Job, state: int, message: str) -> None:
        def finish(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if j.state != job.state:
                return None
            j.state, j.message, j.finished_ms = state, message, now_ms()  # type: ignore[assignment]
            return j

        if done := await update_job(self.rt.etcd, job.id, finish, fenced=self._fenced(election)):
            self.rt.events.publish("job", "failed", job.id, message)
            if done.checkpoint_sha256:
                await self.resolver.delete_artifact(done.checkpoint_sha256)

    async def _apply_jobs(self, election: LeaderElection, result: placement.Plan) -> None:
        written: dict[str, jobs_pb2.Job] = {}
        for job_id, (worker, device), memory in result.start_jobs:
            devices = result.start_devices.get(job_id, [device])

            def start(j: jobs_pb2.Job, worker: str = worker, devices: list[str] = devices,
                      memory: int = memory) -> jobs_pb2.Job | None:
                if j.state != jobs_pb2.JOB_STATE_QUEUED:
                    return None
                j.state, j.worker_id, j.device_id, j.memory_bytes = jobs_pb2.JOB_STATE_RUNNING, worker, devices[0], memory
                j.device_ids[:] = devices
                j.attempts += 1
                j.started_ms = j.started_ms or now_ms()
                j.message = (f"resuming from step {j.checkpoint_step} on {worker}" if j.checkpoint_sha256
                             else f"starting on {worker}")
                return j

            with contextlib.suppress(NotFound):
                if placed := await update_job(self.rt.etcd, job_id, start, fenced=self._fenced(election)):
                    written[job_id] = placed
                    log.info("job %s placed on %s %s (%d MiB each)", job_id, worker, ",".join(devices), memory >> 20)
                    self.rt.events.publish("job", "placed", job_id, placed.message, worker=worker, device=devices[0],
                                           devices=",".join(devices), attempt=str(placed.attempts))
        for job_id, deployment in result.preempt:
            def yield_(j: jobs_pb2.Job, deployment: str = deployment) -> jobs_pb2.Job | None:
                if j.state != jobs_pb2.JOB_STATE_RUNNING or j.yield_requested:
                    return None
                j.yield_requested = True
                j.message = f"yielding {','.join(j.device_ids) or j.device_id} on {j.worker_id} to deployment {deployment}"
                return j

            with contextlib.suppress(NotFound):
                if asked := await update_job(self.rt.etcd, job_id, yield_, fenced=self._fenced(election)):
                    written[job_id] = asked
                    log.info("job %s: %s", job_id, asked.message)
                    self.rt.events.publish("job", "preempted", job_id, asked.message, deployment=deployment)
        # plan next from a mirror that shows these writes (or later ones: the job's worker may
        # already have reported), or a started job's device looks free
        def shown(items: dict[str, jobs_pb2.Job]) -> bool:
            for job_id, job in written.items():
                seen = items.get(job_id)
                if seen is not None and (seen.attempts < job.attempts or (
                        seen.attempts == job.attempts and job.yield_requested
                        and seen.state == jobs_pb2.JOB_STATE_RUNNING and not seen.yield_requested)):
                    return False
            return True

        if written and not await self.state.jobs.wait_for(shown, CATCH_UP_SECONDS):
            log.warning("the jobs watch has not shown our writes after %.0fs", CATCH_UP_SECONDS)

    async def _deploy_result(self, election: LeaderElection, job: jobs_pb2.Job) -> None:
        """Serve a finished job's result: an adapter joins a deployment of its base (one is
        created, named after the base model, if none serves it); a fully fine-tuned model
        gets a deployment of its own name (or rolls that deployment to the new version)."""
        try:
            version = await self.resolver.resolve(job.result)
            name = await self._deploy(version, job.spec.name)
            message = f"{job.result} deployed on {name}"
        except MaasError as e:
            name, message = "-", f"{job.result} registered, but deploying it failed: {e.message}"

        def deployed(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if j.deployment:
                return None
            j.deployment, j.message = name, message
            return j

        if await update_job(self.rt.etcd, job.id, deployed, fenced=self._fenced(election)):
            self.rt.events.publish("job", "deployed" if name != "-" else "deploy_failed", job.id, message,
                                   deployment=name, result=job.result)

    async def _deploy(self, version: registry_pb2.ModelVersion, name: str) -> str:
        ref = f"{version.name}@{version.version}"
        current = self.state.deployments.items
        if not version.base:  # a full fine-tune: the deployment of its own name, new or rolled to it
            existing = current.get(name)
            if existing is not None and existing.resolved_version.partition("@")[0] != version.name:
                raise FailedPrecondition(f"deployment {name!r} serves {existing.resolved_version}, not a version "
                                         f"of {version.name}; it is left alone")

            def roll(dep: scheduler_pb2.Deployment) -> bool:
                if dep.resolved_version.partition("@")[0] != version.name:
                    raise FailedPrecondition(f"deployment {name!r} serves {dep.resolved_version}, not a version "
                                             f"of {version.name}; it is left alone")
                dep.model = ref
                del dep.adapters[:]  # adapters of the old version cannot follow it
                return dep.resolved_version != ref

            await self._create_or_modify(scheduler_pb2.Deployment(name=name, model=ref, replicas=1,
                                                                  owner=version.owner), roll)
            return name

        def add(dep: scheduler_pb2.Deployment) -> bool:
            if dep.resolved_version != version.base:
                raise FailedPrecondition(f"deployment {dep.name!r} serves {dep.resolved_version}, not the base "
                                         f"{version.base}; deploy the base and add the adapter with maas deploy")
            if version.name in dep.adapters:
                return False
            dep.adapters.append(version.name)
            return True

        serving = sorted(d.name for d in current.values() if d.resolved_version == version.base)
        target = serving[0] if serving else version.base.partition("@")[0]
        await self._create_or_modify(scheduler_pb2.Deployment(name=target, model=version.base, replicas=1,
                                                              adapters=[version.name], owner=version.owner), add)
        return target

    async def _create_or_modify(self, fresh: scheduler_pb2.Deployment,
                                change: Callable[[scheduler_pb2.Deployment], bool]) -> None:
        for _ in range(3):
            try:
                await self.deployments.modify(fresh.name, change)
                return
            except NotFound:
                pass
            try:
                await self.deployments.create(fresh)
                return
            except AlreadyExists:
                continue  # created meanwhile: modify it
        raise FailedPrecondition(f"deployment {fresh.name!r} keeps appearing and disappearing; try again")
