"""`maas finetune create|list|show|cancel|logs`: fine-tuning jobs.

`create` checks the dataset here first (every malformed line is listed with its number,
and nothing is uploaded or queued), uploads it to the registry's artifact store, queues the
job with the scheduler and prints the job id alone on its last line. With `--wait` it then
follows the job with a progress bar and exits 0 only if the job succeeded (and, with
`--deploy`, its result was deployed).

The caller's API key (`--api-key`, MAAS_API_KEY, or the development key of `maas up`)
names the tenant the job counts against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from maas.cli.main import credential, mesh_client
from maas.mesh.clients import credential_metadata, upload_file
from maas.mesh.events import read_events
from maas.mesh.jobs import TERMINAL, state_name
from maas.v1 import events_pb2, jobs_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

ClientArgs = Callable[[argparse.ArgumentParser], None]
POLL_SECONDS = 1.0
READY_SECONDS = 300.0  # --wait --deploy: how long the result's deployment may take to serve


def add_parser(sub: argparse._SubParsersAction, client_args: ClientArgs) -> None:
    ft = sub.add_parser("finetune", help="fine-tuning jobs: create, list, show, cancel, logs")
    fsub = ft.add_subparsers(dest="finetune_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = fsub.add_parser(name, help=help)
        client_args(p)
        return p

    create = action("create", "queue a job; prints its id alone on the last line")
    create.add_argument("--base", required=True, metavar="NAME[@REF]", help="the model to fine-tune")
    create.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl",
                        help='chat ({"messages": [...]}) or prompt/completion JSONL')
    create.add_argument("--method", default="lora", choices=["lora", "full"])
    create.add_argument("--epochs", type=int, default=3)
    create.add_argument("--lr", type=float, default=None, help="learning rate (1e-3 for lora, 1e-4 for full)")
    create.add_argument("--lora-rank", type=int, default=16)
    create.add_argument("--batch-size", type=int, default=8)
    create.add_argument("--devices", type=int, default=1,
                        help="devices to train on, all of one worker (FSDP under torchrun); the batch is split")
    create.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the epochs decide)")
    create.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--priority", type=int, default=0, help="higher runs first")
    create.add_argument("--name", default="", help="register the result under this name (default: BASE-ft-ID)")
    create.add_argument("--deploy", action="store_true", help="serve the result once it is registered")
    create.add_argument("--wait", action="store_true", help="follow the job; exit 0 only if it succeeded")
    lst = action("list", "jobs, newest last")
    lst.add_argument("--active", action="store_true", help="only queued and running jobs")
    lst.add_argument("--tenant", default="", help="only this tenant's jobs")
    show = action("show", "one job in full")
    show.add_argument("id")
    cancel = action("cancel", "cancel a job (a running one stops and frees its device)")
    cancel.add_argument("id")
    logs = action("logs", "a job's events: progress, checkpoints, the outcome")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep following, with a progress bar, until it ends")


def _metadata(ns: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return credential_metadata(credential(ns, as_tenant=True))


async def run(ns: argparse.Namespace, etcd: str, nats: str) -> int:
    if ns.finetune_command == "create":
        problem = _check_args(ns)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        from maas.finetune.datasets import InvalidDataset, load_dataset

        try:
            dataset = await asyncio.to_thread(load_dataset, ns.data)
        except InvalidDataset as e:
            print(f"error: {e.message}\nnothing was uploaded or queued", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"error: cannot read {ns.data}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"{ns.data}: {len(dataset)} {dataset.format.replace('_', '/')} records, valid", file=sys.stderr)
    metadata = _metadata(ns)
    async with mesh_client(ns, etcd, as_tenant=True) as mesh:
        stub = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
        command = ns.finetune_command
        if command == "create":
            registry = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
            with tqdm(total=ns.data.stat().st_size, unit="B", unit_scale=True, desc=f"uploading {ns.data.name}",
                      file=sys.stderr) as bar:
                artifact = await upload_file(registry, ns.data, progress=bar.update)
            spec = jobs_pb2.JobSpec(
                base=ns.base, dataset_sha256=artifact.sha256, method=ns.method, epochs=ns.epochs,
                lora_rank=ns.lora_rank, priority=ns.priority, name=ns.name, deploy=ns.deploy,
                batch_size=ns.batch_size, max_steps=ns.max_steps, checkpoint_every=ns.checkpoint_every, seed=ns.seed,
                devices=ns.devices)
            if ns.lr is not None:
                spec.learning_rate = ns.lr
            job = await stub.CreateJob(jobs_pb2.CreateJobRequest(spec=spec), metadata=metadata, timeout=120)
            print(f"queued job {job.id}: {job.spec.method} fine-tuning of {job.spec.base} on {job.examples} examples "
                  f"-> {job.spec.name} (tenant {job.spec.tenant}, priority {job.spec.priority})", file=sys.stderr)
            code = 0
            if ns.wait:
                job = await _follow(stub, nats, ns.prefix, job.id, metadata, history=False)
                code = 0 if _succeeded(job) else 1
            if ns.json:
                print(json.dumps(MessageToDict(job)))
            print(job.id)
            return code
        if command == "list":
            jobs = (await stub.ListJobs(jobs_pb2.ListJobsRequest(tenant=ns.tenant, active=ns.active),
                                        metadata=metadata, timeout=10)).jobs
            if ns.json:
                print(json.dumps([MessageToDict(j) for j in jobs], indent=2))
            else:
                from maas.cli.commands import _table

                print(_table([job_row(j) for j in jobs], ["id", "state", "base", "result", "method", "step", "loss",
                                                       "priority", "tenant", "worker", "created"]))
            return 0
        if command == "show":
            job = await stub.GetJob(jobs_pb2.GetJobRequest(id=ns.id), metadata=metadata, timeout=10)
            print(json.dumps(MessageToDict(job), indent=2) if ns.json else _describe(job))
            return 0
        if command == "cancel":
            job = await stub.CancelJob(jobs_pb2.CancelJobRequest(id=ns.id), metadata=metadata, timeout=10)
            print(json.dumps(MessageToDict(job)) if ns.json else f"{job.id}: {state_name(job.state)} ({job.message})")
            return 0
        job = await stub.GetJob(jobs_pb2.GetJobRequest(id=ns.id), metadata=metadata, timeout=10)
        if ns.follow:
            job = await _follow(stub, nats, ns.prefix, job.id, metadata, history=True)
            return 0 if _succeeded(job) else 1
        async for event in read_events(nats, ns.prefix, follow=False, entity="job"):
            if event.entity_id == job.id:
                _print_event(event, ns.json)
        return 0


def _check_args(ns: argparse.Namespace) -> str:
    for flag, low in (("epochs", 1), ("lora_rank", 1), ("batch_size", 1), ("devices", 1), ("max_steps", 0),
                      ("checkpoint_every", 1), ("seed", 0)):
        if getattr(ns, flag) < low:
            return f"--{flag.replace('_', '-')} must be at least {low}"
    if ns.lr is not None and not 0 < ns.lr <= 1:
        return "--lr must be in (0, 1]"
    if not ns.data.is_file():
        return f"{ns.data} is not a file"
    return ""


def _succeeded(job: jobs_pb2.Job) -> bool:
    return job.state == jobs_pb2.JOB_STATE_SUCCEEDED and (not job.spec.deploy or job.deployment not in ("", "-"))


def _finished(job: jobs_pb2.Job) -> bool:
    """Nothing more will happen to it (a succeeded job asked to deploy waits for that too)."""
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        return job.state in TERMINAL
    return not job.spec.deploy or bool(job.deployment)


async def _follow(stub: scheduler_pb2_grpc.SchedulerStub, nats: str, prefix: str, job_id: str,
                  metadata: tuple[tuple[str, str], ...], *, history: bool) -> jobs_pb2.Job:
    """Show the job's events (with history, those already stored too) and a progress bar
    kept current from the job's record, until it finishes. Returns the finished job."""
    bar = tqdm(total=0, unit="step", desc=job_id, file=sys.stderr, dynamic_ncols=True)

    async def show_events() -> None:
        with contextlib.suppress(Exception):
            async for event in read_events(nats, prefix, follow=True, entity="job"):
                if event.entity_id == job_id and (history or event.time_ms >= started_ms) \
                        and event.what != "progress":
                    bar.write(_event_line(event), file=sys.stderr)

    started_ms = int(datetime.now().timestamp() * 1000) - 2000
    reader = asyncio.create_task(show_events())
    try:
        while True:
            job = await stub.GetJob(jobs_pb2.GetJobRequest(id=job_id), metadata=metadata, timeout=10)
            p = job.progress
            if p.total_steps:
                bar.total = p.total_steps
                bar.n = p.step
                bar.set_postfix_str(f"{state_name(job.state)} loss {p.loss:.4f} {p.tokens_per_s:.0f} tok/s",
                                    refresh=False)
                bar.refresh()
            else:
                bar.set_postfix_str(state_name(job.state))
            if _finished(job):
                if _succeeded(job) and job.spec.deploy:
                    bar.set_postfix_str(f"deploying on {job.deployment}")
                    if not await _until_ready(stub, job.deployment):
                        job.message += f"; deployment {job.deployment} has no ready replica after {READY_SECONDS:.0f}s"
                        job.deployment = "-"  # not served: not a success
                await asyncio.sleep(0.5)  # let the last events print
                break
            await asyncio.sleep(POLL_SECONDS)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        bar.close()
    print(f"{job.id}: {state_name(job.state)}: {job.message}", file=sys.stderr)
    return job


async def _until_ready(stub: scheduler_pb2_grpc.SchedulerStub, name: str, timeout: float = READY_SECONDS) -> bool:
    """Wait for the deployment serving a job's result to have a ready replica."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        status = await stub.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=name), timeout=10)
        if status.ready_replicas:
            return True
        await asyncio.sleep(POLL_SECONDS)
    return False


def _event_line(e: events_pb2.Event) -> str:
    t = datetime.fromtimestamp(e.time_ms / 1000).strftime("%H:%M:%S")
    return f"{t}  {e.what:<10} {e.message}"


def _print_event(e: events_pb2.Event, as_json: bool) -> None:
    print(json.dumps(MessageToDict(e)) if as_json else _event_line(e), flush=True)


def job_row(j: jobs_pb2.Job) -> list[str]:
    p = j.progress
    return [j.id, state_name(j.state), j.spec.base, j.result or j.spec.name, j.spec.method,
            f"{p.step}/{p.total_steps}" if p.total_steps else "-", f"{p.loss:.4f}" if p.step else "-",
            str(j.spec.priority), j.spec.tenant, j.worker_id or "-",
            datetime.fromtimestamp(j.created_ms / 1000).strftime("%Y-%m-%d %H:%M")]


def _describe(j: jobs_pb2.Job) -> str:
    s, p = j.spec, j.progress
    lines = [
        f"job {j.id}: {state_name(j.state)}" + (f" - {j.message}" if j.message else ""),
        f"  base {s.base}, {s.method}" + (f" rank {s.lora_rank}" if s.method == "lora" else "")
        + f", {s.epochs} epochs, batch {s.batch_size}" + (f" over {s.devices} devices" if s.devices > 1 else "")
        + f", priority {s.priority}, tenant {s.tenant}",
        f"  dataset {j.dataset_digest[:12]} ({j.examples} examples), result {j.result or s.name}"
        + (f", deployed on {j.deployment}" if j.deployment and j.deployment != "-" else ""),
    ]
    if p.total_steps:
        lines.append(f"  step {p.step}/{p.total_steps} (epoch {p.epoch:.2f}), loss {p.loss_first:.4f} -> {p.loss:.4f}, "
                     f"{p.tokens_per_s:.0f} tokens/s, eta {p.eta_s:.0f}s")
    if j.checkpoint_step:
        lines.append(f"  checkpoint at step {j.checkpoint_step} ({j.checkpoint_sha256[:12]})")
    if j.worker_id:
        lines.append(f"  running on {j.worker_id} {','.join(j.device_ids) or j.device_id} "
                     f"({j.memory_bytes >> 20} MiB reserved on each)")
    lines.append(f"  placed {j.attempts} time(s); created {datetime.fromtimestamp(j.created_ms / 1000):%Y-%m-%d %H:%M:%S}")
    return "\n".join(lines)
