"""Fine-tuning jobs on a worker: run the jobs the scheduler placed here, each in a child
process (`python -m maas.finetune.train`), and report what they do.

For each job placed on this worker (`jobs/{id}` with state running and this worker's id):

1. fetch the base model (the artifact cache), the dataset (an artifact of the registry)
   and, when the job ran before, its last checkpoint; render the dataset into training
   pairs with the base's chat template, as serving renders chats;
2. start the trainer (on a job placed on N > 1 devices: under torchrun, one process a
   device, the model sharded by FSDP; see `trainer_env`) and read its JSON lines: progress goes out as `job.progress` events
   (at most PROGRESS_EVERY apart) and into the job's etcd record (at most SAVE_EVERY
   apart); every checkpoint is packed and uploaded to the registry before the job records
   it, so another worker can resume from it if this one dies;
3. at the end, upload the result, register it as a new version of `spec.name` (an adapter
   whose base is the job's base, or a full model) with the job's metrics and dataset
   digest in its metadata, and mark the job succeeded; the scheduler leader deploys it
   when the job asked for that.

A job whose record asks it to stop (cancelled, yielding to serving, or placed elsewhere)
gets SIGTERM: the trainer checkpoints at the next step and exits 75; the checkpoint is
uploaded and the job is queued again (yield) or marked cancelled. A worker that shuts down
does the same for every job and queues them again; a worker that is killed takes its
trainers with it (they die with their parent) and the leader requeues the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import grpc

from maas.mesh.discovery import PrefixMirror
from maas.mesh.errors import (
    DeadlineExceeded,
    MaasError,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from maas.mesh.jobs import TERMINAL, now_ms, update_job
from maas.mesh.server import ServiceRuntime
from maas.services.worker.artifacts import ArtifactCache
from maas.v1 import jobs_pb2, registry_pb2

log = logging.getLogger(__name__)

PROGRESS_EVERY = 1.0   # seconds between job.progress events (the first and last always go)
SAVE_EVERY = 2.0       # seconds between progress writes to the job's etcd record
STOP_GRACE = 60.0      # seconds a trainer has to checkpoint after SIGTERM before SIGKILL
EXIT_STOPPED = 75      # the trainer's exit code after a requested stop (maas.finetune.train)
TAIL_LINES = 20        # stderr lines kept for a failure's message
PRUNE_AFTER = 3600.0   # seconds untouched before a gone worker's work directory is removed


@dataclass
class _Run:
    job_id: str
    task: asyncio.Task[None] | None = None
    proc: asyncio.subprocess.Process | None = None
    stop_reason: str = ""           # "cancel", "yield", "moved" or "shutdown" once asked to stop
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self, reason: str) -> None:
        """Ask the trainer to checkpoint and exit; kill it if it has not after STOP_GRACE."""
        if self.stop_reason:
            return
        self.stop_reason = reason
        self.stopped.set()
        self.signal()

    def signal(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            asyncio.get_running_loop().call_later(STOP_GRACE, self.kill)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            log.warning("job %s: the trainer did not stop within %.0fs; killing it", self.job_id, STOP_GRACE)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class JobRunner:
    def __init__(self, rt: ServiceRuntime, worker_id: str, artifacts: ArtifactCache, work_dir: Path) -> None:
        self.rt = rt
        self.worker_id = worker_id
        self.artifacts = artifacts
        self.registry = artifacts.registry
        self.work_dir = work_dir
        self.jobs = PrefixMirror(rt.etcd, rt.etcd.keys.jobs(), jobs_pb2.Job)
        self.runs: dict[str, _Run] = {}
        self._ran: set[tuple[str, int]] = set()  # (job, attempt) run here already: never started twice
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._closing = False
        self.jobs.add_listener(lambda *_: self._wake.set())

    async def start(self) -> None:
        await self.jobs.start()
        await self._prune()
        self._loop = asyncio.create_task(self._follow(), name="jobs")

    async def _prune(self) -> None:
        """Remove the work directories that workers which are gone left in this cache (a
        killed worker's; its jobs resumed elsewhere from the registry's checkpoints). Only
        those untouched for PRUNE_AFTER: another mesh's workers may share the cache."""
        root = self.work_dir.parent
        if not root.is_dir():
            return
        pairs, _ = await self.rt.etcd.get_prefix(self.rt.etcd.keys.workers())
        live = {key.decode().rsplit("/", 1)[-1] for key, _ in pairs} | {self.worker_id}
        for entry in root.iterdir():
            if entry.is_dir() and entry.name not in live \
                    and time.time() - await asyncio.to_thread(_newest_mtime, entry) > PRUNE_AFTER:
                log.info("removing %s, left by worker %s (gone)", entry, entry.name)
                await asyncio.to_thread(shutil.rmtree, entry, True)

    async def _follow(self) -> None:
        while True:
            self._wake.clear()
            if not self._closing:
                try:
                    await self._reconcile()
                except Exception as e:  # etcd away for a moment: look again on the next change
                    log.warning("following jobs failed (%s: %s); retrying", type(e).__name__, e)
                    await asyncio.sleep(1.0)
                    self._wake.set()
            await self._wake.wait()

    async def _reconcile(self) -> None:
        """Start the jobs placed here, stop those that must stop, and settle the ones
        whose run here ended without its outcome being recorded."""
        for job in list(self.jobs.items.values()):
            mine = job.state == jobs_pb2.JOB_STATE_RUNNING and job.worker_id == self.worker_id
            run = self.runs.get(job.id)
            if run is not None:
                if not mine:
                    run.stop("moved")
                elif job.cancel_requested:
                    run.stop("cancel")
                elif job.yield_requested:
                    run.stop("yield")
                continue
            if not mine:
                continue
            if job.cancel_requested:
                await self._settle(job.id, jobs_pb2.JOB_STATE_CANCELLED, "cancelled before it started")
            elif job.yield_requested or (job.id, job.attempts) in self._ran:
                # asked to yield before it started, or its run here ended and recording that
                # failed (or the mirror is behind our own write: then this changes nothing)
                await self._requeue(job.id, f"its run on {self.worker_id} ended without an outcome")
            else:
                run = self.runs[job.id] = _Run(job.id)
                run.task = asyncio.create_task(self._run(run, job), name=f"job-{job.id}")
        for job_id, run in list(self.runs.items()):
            if job_id not in self.jobs.items:
                run.stop("cancel")

    # -- one job --

    async def _run(self, run: _Run, job: jobs_pb2.Job) -> None:
        directory = self.work_dir / job.id
        report = _Reporter(self, job)
        try:
            argv = await self._prepare(job, directory)
            if run.stop_reason:
                await self._stopped(run, job, report, None)
                return
            stderr_path = directory / "train.log"
            with open(stderr_path, "ab") as stderr:  # noqa: ASYNC230 - a local log file, opened once
                run.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "maas.finetune.train", *argv,
                    stdout=asyncio.subprocess.PIPE, stderr=stderr, limit=1 << 20,
                    env=trainer_env(_devices(job), os.environ))
            if run.stop_reason:  # asked to stop while it was starting
                run.signal()
            final = await self._read(run, report)
            code = await run.proc.wait()
            if final.get("event") == "done" and code == 0:
                await self._succeeded(job, report, final)
                shutil.rmtree(directory, ignore_errors=True)
            elif code == EXIT_STOPPED or run.stop_reason or final.get("event") == "stopped":  # torchrun: 1
                await self._stopped(run, job, report, final.get("path"))
            else:
                tail = _tail(stderr_path)
                message = final.get("message") or f"the trainer exited with code {code}" + (
                    f": {tail}" if tail else "")
                await self._settle(job.id, jobs_pb2.JOB_STATE_FAILED, message, report.progress)
                shutil.rmtree(directory, ignore_errors=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._end(run)
            if job_at_fault(e):
                log.warning("job %s failed on %s: %s", job.id, self.worker_id, e.message)
                with contextlib.suppress(Exception):
                    await self._settle(job.id, jobs_pb2.JOB_STATE_FAILED, e.message[:1000], report.progress)
            else:  # the mesh, not the job: etcd or the registry away, a full disk. Let another try
                log.exception("job %s: running it on %s failed", job.id, self.worker_id)
                if isinstance(e, Unavailable):  # the registry may be back elsewhere (a restart): look it up again
                    await self.registry.close()
                with contextlib.suppress(Exception):
                    await self._requeue(job.id, f"worker {self.worker_id} failed to run it "
                                                f"({type(e).__name__}: {e})"[:1000], report.progress)
        finally:
            await self._end(run)
            self._ran.add((job.id, job.attempts))
            self.runs.pop(job.id, None)
            self._wake.set()

    async def _end(self, run: _Run) -> None:
        """Make sure the trainer is gone (it is, unless this run failed half-way)."""
        proc = run.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _prepare(self, job: jobs_pb2.Job, directory: Path) -> list[str]:
        """Fetch what the trainer needs into `directory`; its command-line arguments."""
        spec = job.spec
        base = await self.registry.resolve(spec.base)
        base_dir = await self.artifacts.resolve(base.source)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        dataset = directory / "dataset.jsonl"
        await self.artifacts.download(spec.dataset_sha256, dataset)
        pairs = directory / "pairs.jsonl"
        count = await asyncio.to_thread(_render_pairs, dataset, Path(base_dir), spec.base, pairs)
        if job.checkpoint_sha256:
            await self._restore(job, directory)
        argv = ["--base", base_dir, "--data", str(pairs), "--out", str(directory), "--method", spec.method,
                "--epochs", str(spec.epochs), "--batch-size", str(spec.batch_size),
                "--checkpoint-every", str(spec.checkpoint_every), "--seed", str(spec.seed),
                "--base-ref", spec.base, "--parent-pid", str(os.getpid())]
        if spec.method == "lora":
            argv += ["--lora-rank", str(spec.lora_rank)]
        if len(_devices(job)) > 1:  # the trainer runs itself under torchrun, a process a device
            argv += ["--devices", str(len(_devices(job)))]
        if spec.HasField("learning_rate"):
            argv += ["--lr", repr(spec.learning_rate)]
        if spec.max_steps:
            argv += ["--max-steps", str(spec.max_steps)]
        log.info("job %s: %d training pairs from %s on %s", job.id, count, spec.dataset_sha256[:12], spec.base)
        return argv

    async def _restore(self, job: jobs_pb2.Job, directory: Path) -> None:
        """Put the job's last uploaded checkpoint where the trainer resumes from it (unless a
        newer one is already here: the job ran on this worker before)."""
        from maas.finetune.train import CHECKPOINTS

        root = directory / CHECKPOINTS
        local = [int(p.name.removeprefix("step-")) for p in root.glob("step-*") if (p / "state.json").is_file()]
        if local and max(local) >= job.checkpoint_step:
            return
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        await self.artifacts.fetch_into(job.checkpoint_sha256, root / f"step-{job.checkpoint_step:06d}")
        log.info("job %s: resuming from the checkpoint at step %d", job.id, job.checkpoint_step)

    async def _read(self, run: _Run, report: _Reporter) -> dict[str, Any]:
        """Follow the trainer's JSON lines; return its last one (done, stopped or error)."""
        assert run.proc is not None and run.proc.stdout is not None
        last: dict[str, Any] = {}
        async for raw in run.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                log.warning("job %s: unreadable trainer line %r", run.job_id, raw[:200])
                continue
            kind = event.get("event")
            if kind == "start":
                await report.started(event)
            elif kind == "progress":
                await report.step(event)
            elif kind == "checkpoint" and not run.stop_reason:
                await self._save_checkpoint(run.job_id, report, int(event["step"]), Path(event["path"]))
            elif kind in ("done", "stopped", "error"):
                last = event
        return last

    async def _save_checkpoint(self, job_id: str, report: _Reporter, step: int, path: Path) -> None:
        try:
            source = await self._upload(path)
        except (OSError, MaasError) as e:  # the trainer may have pruned it already: the next one will do
            log.warning("job %s: checkpoint at step %d not saved: %s", job_id, step, e)
            return
        sha = source.removeprefix("artifact:")
        previous = ""

        def record(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            nonlocal previous
            if j.worker_id != self.worker_id or step <= j.checkpoint_step:
                return None
            previous = j.checkpoint_sha256
            j.checkpoint_step, j.checkpoint_sha256 = step, sha
            j.progress.CopyFrom(report.progress)
            return j

        try:
            recorded = await update_job(self.rt.etcd, job_id, record)
        except Exception as e:  # etcd away: the next checkpoint will do
            log.warning("job %s: checkpoint at step %d not recorded: %s", job_id, step, e)
            recorded = None
        if recorded:
            self.rt.events.publish("job", "checkpoint", job_id, f"{job_id}: checkpoint at step {step} saved",
                                   step=str(step), artifact=sha)
            await self._drop_artifact(previous, sha)
        else:
            await self._drop_artifact(sha)  # not recorded: nobody will resume from it

    async def _drop_artifact(self, sha: str, keep: str = "") -> None:
        """Remove a checkpoint nothing resumes from any more (the registry refuses, and it
        stays, if something still uses it)."""
        if not sha or sha == keep:
            return
        await self.registry.delete_artifact(sha)

    async def _upload(self, directory: Path) -> str:
        from maas.mesh.clients import upload_directory

        return await upload_directory(await self.registry.stub(), directory)

    async def _stopped(self, run: _Run, job: jobs_pb2.Job, report: _Reporter, checkpoint: str | None) -> None:
        """The trainer stopped on request. Yielding (or this worker shutting down): save its
        checkpoint and queue the job again. Cancelled: mark it so. Moved (the leader gave
        the job to another worker): leave the record alone."""
        reason = run.stop_reason or "shutdown"
        if reason == "moved":
            shutil.rmtree(self.work_dir / job.id, ignore_errors=True)
            return
        step, sha = 0, ""
        if checkpoint and reason != "cancel":
            path = Path(checkpoint)
            step = int(path.name.removeprefix("step-"))
            with contextlib.suppress(OSError, MaasError):
                sha = (await self._upload(path)).removeprefix("artifact:")
        previous = ""

        def settle(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            nonlocal previous
            if j.state != jobs_pb2.JOB_STATE_RUNNING or j.worker_id != self.worker_id:
                return None
            previous = j.checkpoint_sha256
            if sha and step > j.checkpoint_step:
                j.checkpoint_step, j.checkpoint_sha256 = step, sha
            j.progress.CopyFrom(report.progress)
            if reason == "cancel" or j.cancel_requested:
                j.state, j.finished_ms, j.message = jobs_pb2.JOB_STATE_CANCELLED, now_ms(), \
                    f"cancelled at step {report.progress.step}"
            else:
                j.state = jobs_pb2.JOB_STATE_QUEUED
                why = "yielded its device to serving" if reason == "yield" else f"worker {self.worker_id} stopped"
                j.message = f"{why}; queued to resume from step {j.checkpoint_step}"
            _unplace(j)
            return j

        done = await update_job(self.rt.etcd, job.id, settle)
        if done is None:
            await self._drop_artifact(sha)  # not recorded: nobody resumes from it
            return
        await self._drop_artifact(previous, done.checkpoint_sha256)
        what = "cancelled" if done.state == jobs_pb2.JOB_STATE_CANCELLED else "requeued"
        self.rt.events.publish("job", what, job.id, f"{job.id}: {done.message}", worker=self.worker_id,
                               step=str(done.progress.step))
        if what == "cancelled":
            shutil.rmtree(self.work_dir / job.id, ignore_errors=True)
            await self._drop_artifact(done.checkpoint_sha256)

    async def _requeue(self, job_id: str, message: str, progress: jobs_pb2.JobProgress | None = None) -> None:
        """Give a job running here back to the queue (it resumes from its last checkpoint)."""
        def requeue(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if j.state != jobs_pb2.JOB_STATE_RUNNING or j.worker_id != self.worker_id:
                return None
            if progress is not None:
                j.progress.CopyFrom(progress)
            j.state, j.message = jobs_pb2.JOB_STATE_QUEUED, f"{message}; queued again"
            _unplace(j)
            return j

        with contextlib.suppress(NotFound):
            if done := await update_job(self.rt.etcd, job_id, requeue):
                self.rt.events.publish("job", "requeued", job_id, f"{job_id}: {done.message}", worker=self.worker_id)

    async def _succeeded(self, job: jobs_pb2.Job, report: _Reporter, done: dict[str, Any]) -> None:
        spec = job.spec
        result_dir = Path(done.get("adapter_dir") or done["model_dir"])
        metadata = {
            "job": job.id, "method": spec.method, "dataset_sha256": job.dataset_digest,
            "examples": str(job.examples), "steps": str(done.get("steps")), "epochs": str(spec.epochs),
            "loss_first": f"{done.get('loss_first', 0):.4f}", "loss_last": f"{done.get('loss_last', 0):.4f}",
            "train_seconds": str(done.get("train_seconds")), "tokens_per_s": str(done.get("tokens_per_s")),
            "trained_on": self.worker_id}
        if spec.method == "lora":
            metadata["lora_rank"] = str(spec.lora_rank)
        stub = await self.registry.stub()
        result = await self._registered(stub, spec.name, job.id)
        if result is None:
            source = await self._upload(result_dir)
            try:
                version = await stub.RegisterModel(registry_pb2.RegisterModelRequest(
                    name=spec.name, format="hf", source=source, base=spec.base if spec.method == "lora" else "",
                    metadata=metadata, description=f"fine-tuned from {spec.base} by job {job.id}",
                    owner=spec.tenant), timeout=60)
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e, f"registering {spec.name}: ") from None
            result = f"{version.name}@{version.version}"
        report.progress.loss = float(done.get("loss_last") or 0.0)
        report.progress.train_seconds = float(done.get("train_seconds") or 0.0)
        message = (f"registered {result}: loss {done.get('loss_first', 0):.3f} -> {done.get('loss_last', 0):.3f} "
                   f"in {done.get('steps')} steps, {done.get('tokens_per_s')} tokens/s")

        def succeed(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if j.state != jobs_pb2.JOB_STATE_RUNNING or j.worker_id != self.worker_id:
                return None
            j.state, j.result, j.message, j.finished_ms = jobs_pb2.JOB_STATE_SUCCEEDED, result, message, now_ms()
            j.progress.CopyFrom(report.progress)
            _unplace(j)
            return j

        if finished := await update_job(self.rt.etcd, job.id, succeed):
            self.rt.events.publish("job", "succeeded", job.id, f"{job.id}: {message}", result=result)
            await self._drop_artifact(finished.checkpoint_sha256)

    async def _registered(self, stub: Any, name: str, job_id: str) -> str | None:
        """The version a previous run of this job already registered (a worker that died
        between registering and recording it), if any."""
        try:
            listing = await stub.ListVersions(registry_pb2.ListVersionsRequest(name=name), timeout=10)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(e, "listing versions: ") from None
        found = [v for v in listing.versions if v.metadata.get("job") == job_id]
        return f"{found[-1].name}@{found[-1].version}" if found else None

    async def _settle(self, job_id: str, state: int, message: str,
                      progress: jobs_pb2.JobProgress | None = None) -> None:
        def settle(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if j.state in TERMINAL or j.worker_id != self.worker_id:
                return None
            j.state, j.message, j.finished_ms = state, message, now_ms()  # type: ignore[assignment]
            if progress is not None:
                j.progress.CopyFrom(progress)
            _unplace(j)
            return j

        with contextlib.suppress(NotFound):
            if done := await update_job(self.rt.etcd, job_id, settle):
                what = jobs_pb2.JobState.Name(done.state).removeprefix("JOB_STATE_").lower()
                self.rt.events.publish("job", what, job_id, f"{job_id}: {message}", worker=self.worker_id)
                shutil.rmtree(self.work_dir / job_id, ignore_errors=True)
                await self._drop_artifact(done.checkpoint_sha256)  # nothing will resume it

    # -- lifecycle --

    async def drain(self) -> None:
        """Stop every trainer (each checkpoints) and queue its job again, for another worker."""
        self._closing = True
        runs = list(self.runs.values())
        for run in runs:
            run.stop("shutdown")
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE)

    async def close(self) -> None:
        self._closing = True
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for run in list(self.runs.values()):
            if run.task is not None:
                run.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run.task
        await self.jobs.close()


class _Reporter:
    """A job's progress: events and etcd writes, each rate-limited."""

    def __init__(self, runner: JobRunner, job: jobs_pb2.Job) -> None:
        self.runner = runner
        self.job_id = job.id
        self.progress = jobs_pb2.JobProgress()
        self.progress.CopyFrom(job.progress)
        self._event_at = 0.0
        self._saved_at = 0.0

    async def started(self, event: dict[str, Any]) -> None:
        self.progress.step, self.progress.total_steps = int(event["step"]), int(event["total_steps"])
        resumed = event.get("resumed_from")
        world = int(event.get("world_size") or 1)
        where = (f"{world} processes under torchrun, FSDP, {event.get('threads')} threads each" if world > 1
                 else f"{event.get('device')}, {event.get('threads')} threads")
        message = (f"training on {self.runner.worker_id} ({where}): "
                   f"{event.get('examples')} examples, {event.get('trainable_parameters')} trainable parameters, "
                   + (f"resumed at step {self.progress.step}" if resumed else "from step 0")
                   + f" of {self.progress.total_steps}")
        self.runner.rt.events.publish("job", "started", self.job_id, message, worker=self.runner.worker_id,
                                      step=str(self.progress.step), total_steps=str(self.progress.total_steps),
                                      world_size=str(world))
        await self._save(force=True)

    async def step(self, event: dict[str, Any]) -> None:
        p = self.progress
        p.step, p.total_steps = int(event["step"]), int(event["total_steps"])
        p.epoch, p.loss = float(event.get("epoch", 0)), float(event.get("loss", 0))
        if not p.loss_first:
            p.loss_first = p.loss
        p.tokens_per_s, p.eta_s = float(event.get("tokens_per_s", 0)), float(event.get("eta_s", 0))
        now = time.monotonic()
        last = p.step >= p.total_steps
        if last or now - self._event_at >= PROGRESS_EVERY:
            self._event_at = now
            self.runner.rt.events.publish(
                "job", "progress", self.job_id,
                f"step {p.step}/{p.total_steps} loss {p.loss:.4f} {p.tokens_per_s:.0f} tokens/s eta {p.eta_s:.0f}s",
                step=str(p.step), total_steps=str(p.total_steps), loss=f"{p.loss:.5f}", epoch=f"{p.epoch:.3f}",
                tokens_per_s=f"{p.tokens_per_s:.1f}", eta_s=f"{p.eta_s:.1f}")
        await self._save(force=last)

    async def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_EVERY:
            return
        self._saved_at = now
        progress, worker = self.progress, self.runner.worker_id

        def record(j: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if j.state != jobs_pb2.JOB_STATE_RUNNING or j.worker_id != worker:
                return None
            j.progress.CopyFrom(progress)
            return j

        try:
            await update_job(self.runner.rt.etcd, self.job_id, record)
        except Exception as e:  # progress is best effort: the next report carries it
            log.debug("job %s: progress not saved: %s", self.job_id, e)


def _unplace(j: jobs_pb2.Job) -> None:
    """A job no longer running here: it holds no worker or device."""
    j.worker_id, j.device_id, j.memory_bytes, j.yield_requested = "", "", 0, False
    del j.device_ids[:]


def job_at_fault(e: BaseException) -> TypeGuard[MaasError]:
    """Whether a run's error is the job's own (fail it) rather than the mesh's (queue it again
    for another try): a MaasError, a downstream one included (`from_rpc_error` rebuilds its
    class), unless it says a service was unavailable or too slow; never an OSError, an etcd
    error or anything unexpected."""
    return isinstance(e, MaasError) and not isinstance(e, Unavailable | DeadlineExceeded)


def _devices(job: jobs_pb2.Job) -> list[str]:
    return list(job.device_ids) or [job.device_id]


def trainer_env(devices: list[str], env: Mapping[str, str]) -> dict[str, str]:
    """The trainer's environment for a job placed on `devices`. CUDA: CUDA_VISIBLE_DEVICES
    names its GPUs alone (through this worker's own CUDA_VISIBLE_DEVICES, if it has one), so
    rank r trains on the job's r-th GPU. CPU devices (`--cpu-devices`) share the cores: each
    of the N processes gets 1/N of the threads a torch operation of this worker may use."""
    out = dict(env)
    gpus = [d.partition(":")[2] or "0" for d in devices if d.startswith("cuda")]
    if gpus:
        visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        out["CUDA_VISIBLE_DEVICES"] = ",".join(visible[int(i)] if visible and int(i) < len(visible) else i
                                               for i in gpus)
    elif len(devices) > 1:
        threads = int(env.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        out["OMP_NUM_THREADS"] = str(max(1, threads // len(devices)))
    return out


def _render_pairs(dataset: Path, base_dir: Path, base: str, out: Path) -> int:
    """Write the dataset's (prompt, completion) pairs, chats rendered with the base model's
    chat template (the one serving uses), as the trainer's JSONL. Returns how many."""
    from maas.finetune.datasets import load_dataset, training_examples
    from maas.services.worker.engines.base import WEIGHTS_LOCK

    # transformers only through the engine's module, whose import lock serializes this
    # thread with an engine being loaded at the same time (importing transformers from two
    # threads at once fails: "cannot import name 'AutoTokenizer'", seen when a replica and
    # a job landed on a worker together)
    from maas.services.worker.engines.hf import AutoTokenizer, render_chat

    with WEIGHTS_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pairs = training_examples(load_dataset(dataset), lambda messages: render_chat(tokenizer, messages, base))
    with open(out, "w", encoding="utf-8") as f:
        for prompt, completion in pairs:
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return len(pairs)


def _newest_mtime(root: Path) -> float:
    newest = root.stat().st_mtime
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(os.path.join(directory, name)).st_mtime)
    return newest


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-TAIL_LINES:])[-1000:]
    return ""
