"""The `maas` commands that talk to a running mesh."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aetcd.exceptions
import grpc
from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from maas.cli.main import client_tls, credential, mesh_client
from maas.mesh.artifacts import ARTIFACT, unpack
from maas.mesh.clients import MeshClient, credential_metadata, dial, live_services, upload_directory
from maas.mesh.events import read_events
from maas.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2,
    mesh_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

SERVICE_KINDS = ("registry", "scheduler", "router", "worker")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


@dataclass
class Snapshot:
    services: dict[str, list[mesh_pb2.ServiceInfo]]
    deployments: list[scheduler_pb2.DeploymentStatus]
    workers: list[scheduler_pb2.WorkerStatus]
    jobs: list[jobs_pb2.Job] = field(default_factory=list)  # queued and running fine-tuning jobs
    https: bool = False  # the mesh speaks TLS (the router's HTTP API too)


async def _snapshot(mesh: MeshClient) -> Snapshot:
    services = {k: await live_services(mesh.etcd, mesh.keys, k) for k in SERVICE_KINDS}
    snap = Snapshot(services, [], [])
    if services["scheduler"]:
        stub = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
        snap.deployments = list((await stub.ListDeployments(scheduler_pb2.ListDeploymentsRequest(), timeout=5)).deployments)
        try:
            snap.workers = list((await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)).workers)
        except grpc.aio.AioRpcError as e:  # the fleet is the admin's to see; a tenant gets the rest
            if e.code() != grpc.StatusCode.PERMISSION_DENIED:
                raise
        snap.https = mesh.tls is not None
        snap.jobs = list((await stub.ListJobs(jobs_pb2.ListJobsRequest(active=True), timeout=5)).jobs)
    return snap


def deployments_ready(deployments: list[scheduler_pb2.DeploymentStatus], expected: list[str],
                      *, only_expected: bool = False) -> tuple[bool, str]:
    """Do the expected deployments exist, and do they (or all, unless only_expected) have
    every replica ready? With the reason when not."""
    by_name = {d.deployment.name: d for d in deployments}
    for name in expected:
        if name not in by_name:
            return False, f"deployment {name} not created yet"
    for d in by_name.values():
        if (not only_expected or d.deployment.name in expected) and d.ready_replicas < d.deployment.replicas:
            return False, f"deployment {d.deployment.name}: {d.message or 'not ready'}"
    return True, "ready"


def _ready(snap: Snapshot, expected: list[str]) -> tuple[bool, str]:
    for kind in SERVICE_KINDS:
        if not snap.services[kind]:
            return False, f"no {kind} running"
    return deployments_ready(snap.deployments, expected)


def _print_status(snap: Snapshot, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "services": {k: [MessageToDict(s) for s in v] for k, v in snap.services.items()},
            "deployments": [MessageToDict(d) for d in snap.deployments],
            "workers": [MessageToDict(w) for w in snap.workers],
            "jobs": [MessageToDict(j) for j in snap.jobs],
        }, indent=2))
        return
    scheme = "https" if snap.https else "http"
    rows = [[s.kind, s.instance, s.endpoint + (f"  {scheme}://{s.http_endpoint}/v1" if s.http_endpoint else ""),
             s.metrics_endpoint] for k in SERVICE_KINDS for s in snap.services[k]]
    print(_table(rows, ["service", "instance", "endpoint", "metrics"]))
    print()
    rows = [[w.worker.worker_id, w.worker.endpoint, ",".join(d.id for d in w.worker.devices),
             f"{_gib(w.memory_assigned_bytes)}/{_gib(sum(d.memory_total_bytes for d in w.worker.devices))}",
             str(len(w.replicas))] for w in snap.workers]
    print(_table(rows, ["worker", "endpoint", "devices", "assigned", "replicas"]))
    print()
    rows = []
    for d in snap.deployments:
        states = ",".join(f"{r.replica_id}:{mesh_pb2.ReplicaState.Name(r.state).removeprefix('REPLICA_STATE_').lower()}"
                          for r in d.replicas)
        rows.append([d.deployment.name, d.deployment.resolved_version, f"{d.ready_replicas}/{d.deployment.replicas}",
                     states or "-", d.message])
    print(_table(rows, ["deployment", "model", "ready", "replicas", "message"]))
    if snap.jobs:
        from maas.cli.finetune import job_row

        print()
        print(_table([job_row(j)[:-1] for j in snap.jobs], ["job", "state", "base", "result", "method", "step", "loss",
                                                         "priority", "tenant", "worker"]))


async def status(ns: argparse.Namespace, etcd: str) -> int:
    from maas.cli.main import _stack_file, resolve_urls

    deadline = time.monotonic() + ns.wait
    while True:
        # `maas up` may still be writing its stack file: look again on every try
        expected = list(_stack_file().get("deployments", [])) if not ns.etcd else []
        snap = None
        try:
            async with mesh_client(ns, etcd) as mesh:
                snap = await _snapshot(mesh)
            ok, why = _ready(snap, expected)
        except aetcd.exceptions.ClientError:
            ok, why = False, f"cannot reach etcd at {etcd}"
        except Exception as e:  # still starting: the scheduler not up yet
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            ok, why = False, f"{type(e).__name__}: {detail}"
        if ok or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.5)
        etcd, _ = resolve_urls(ns)
    if snap is not None:
        _print_status(snap, ns.json)
    if not ok:
        print(f"not ready: {why}", file=sys.stderr)
        return 1
    return 0


def option_pairs(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` items (engine options) as a dict; a malformed one exits with an error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: option {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


async def models(ns: argparse.Namespace, etcd: str) -> int:
    async with mesh_client(ns, etcd) as mesh:
        stub = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        action = ns.models_command
        if action in ("register", "upload"):
            source = ns.source if action == "register" else await _upload(stub, Path(ns.directory))
            v = await stub.RegisterModel(registry_pb2.RegisterModelRequest(
                name=ns.name, source=source, format=ns.format, task=ns.task, base=ns.base,
                options=option_pairs(ns.option)), timeout=30)
            print(json.dumps(MessageToDict(v), indent=2) if ns.json else
                  f"registered {v.name}@{v.version} ({v.format}: {v.source}, needs {_gib(v.resources.memory_bytes)})")
        elif action == "list":
            listing = await stub.ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=10)
            if ns.json:
                print(json.dumps([MessageToDict(m) for m in listing.models], indent=2))
            else:
                rows = [[m.name, str(m.latest_version), _aliases(m), _when(m.created_ms)] for m in listing.models]
                print(_table(rows, ["model", "latest", "aliases", "created"]))
        elif action in ("show", "versions"):
            model = await stub.GetModel(registry_pb2.GetModelRequest(name=ns.name), timeout=10)
            listing = await stub.ListVersions(registry_pb2.ListVersionsRequest(name=ns.name), timeout=10)
            if ns.json:
                print(json.dumps({"model": MessageToDict(model),
                                  "versions": [MessageToDict(v) for v in listing.versions]}, indent=2))
                return 0
            if action == "show":
                print(f"{model.name}: latest {model.latest_version}, aliases {_aliases(model)}"
                      + (f"\n{model.description}" if model.description else "") + "\n")
            rows = [[str(v.version), v.format, v.task, v.base or "-", v.source, _gib(v.resources.memory_bytes),
                     _when(v.created_ms)] for v in listing.versions]
            print(_table(rows, ["version", "format", "task", "base", "source", "memory", "created"]))
        elif action == "alias":
            model = await stub.SetAlias(registry_pb2.SetAliasRequest(name=ns.name, alias=ns.alias,
                                                                     version=ns.version), timeout=10)
            print(f"{ns.name}@{ns.alias} -> {model.aliases[ns.alias]}")
        elif action == "delete":
            name, _, version = ns.ref.partition("@")
            if not version.isdigit():
                print("error: give the version to delete as NAME@VERSION", file=sys.stderr)
                return 2
            await stub.DeleteVersion(registry_pb2.DeleteVersionRequest(name=name, version=int(version)), timeout=10)
            print(f"deleted {ns.ref}")
        elif action == "download":
            await _download(stub, ns.ref, Path(ns.directory))
    return 0


def _aliases(model: registry_pb2.Model) -> str:
    return ",".join(f"{a}={v}" for a, v in sorted(model.aliases.items())) or "-"


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


async def _upload(stub: registry_pb2_grpc.RegistryStub, directory: Path) -> str:
    """Pack `directory` and stream it to the registry with a progress bar; return the source."""
    if not directory.is_dir():
        raise SystemExit(f"error: {directory} is not a directory")
    with tqdm(unit="B", unit_scale=True, desc=f"uploading {directory.name}", file=sys.stderr) as bar:
        def sized(size: int) -> None:
            bar.total = size
            bar.refresh()

        return await upload_directory(stub, directory, progress=bar.update, on_size=sized)


async def _download(stub: registry_pb2_grpc.RegistryStub, ref: str, directory: Path) -> None:
    version = await stub.GetVersion(registry_pb2.GetVersionRequest(ref=ref), timeout=10)
    if not version.source.startswith(ARTIFACT):
        raise SystemExit(f"error: {version.name}@{version.version} was registered from {version.source!r}, "
                         "not uploaded; there is nothing to download")
    sha = version.source.removeprefix(ARTIFACT)
    if directory.exists() and any(directory.iterdir()):
        raise SystemExit(f"error: {directory} exists and is not empty")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "artifact.tar"
        digest = hashlib.sha256()
        call = stub.DownloadArtifact(registry_pb2.DownloadArtifactRequest(sha256=sha), timeout=3600)
        with open(archive, "wb") as f, tqdm(unit="B", unit_scale=True, desc=f"downloading {ref}",
                                            file=sys.stderr) as bar:
            async for chunk in call:
                if chunk.total_bytes:
                    bar.total = chunk.total_bytes
                digest.update(chunk.data)
                f.write(chunk.data)
                bar.update(len(chunk.data))
        if digest.hexdigest() != sha:
            raise SystemExit(f"error: the download hashes to {digest.hexdigest()}, not {sha}; nothing was written")
        directory.mkdir(parents=True, exist_ok=True)
        unpack(archive, directory)
    print(f"downloaded {version.name}@{version.version} into {directory}")


async def workers(ns: argparse.Namespace, etcd: str) -> int:
    async with mesh_client(ns, etcd) as mesh:
        stub = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
        listing = await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=10)
    if ns.json:
        print(json.dumps([MessageToDict(w) for w in listing.workers], indent=2))
        return 0
    rows = []
    for w in listing.workers:
        devices = ", ".join(f"{d.id} {_gib(d.memory_total_bytes)}" for d in w.worker.devices)
        replicas = ", ".join(
            f"{r.replica_id} ({r.model_name}@{r.model_version} "
            f"{mesh_pb2.ReplicaState.Name(r.state).removeprefix('REPLICA_STATE_').lower()})" for r in w.replicas)
        labels = ",".join(f"{k}={v}" for k, v in sorted(w.worker.labels.items())) or "-"
        rows.append([w.worker.worker_id, w.worker.endpoint, devices, _gib(w.memory_assigned_bytes), labels,
                     replicas or "-"])
    print(_table(rows, ["worker", "endpoint", "devices", "assigned", "labels", "replicas"]))
    return 0


async def generate(ns: argparse.Namespace, etcd: str) -> int:
    params = common_pb2.SamplingParams(max_tokens=ns.max_tokens, stop=ns.stop)
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(ns, name) is not None:
            setattr(params, name, getattr(ns, name))
    request = inference_pb2.GenerateRequest(model=ns.model, prompt=ns.prompt, params=params, adapter=ns.adapter)
    key = credential(ns, as_tenant=True)
    metadata = credential_metadata(key)
    async with mesh_client(ns, etcd, as_tenant=True) as mesh:
        channel = dial(ns.router, tls=client_tls()) if ns.router else await mesh.channel("router")
        stub = inference_pb2_grpc.InferenceStub(channel)
        last = None
        async for chunk in stub.GenerateStream(request, timeout=ns.timeout, metadata=metadata):
            if ns.json:
                print(json.dumps(MessageToDict(chunk)), flush=True)
            else:
                print(chunk.text if last is not None else ns.prompt + chunk.text, end="", flush=True)
            last = chunk
        if ns.router:
            await channel.close()
    if last is not None and not ns.json:
        reason = common_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        print(f"\n[{last.model} on {last.replica_id}: {last.usage.completion_tokens} tokens, finish={reason}]",
              file=sys.stderr)
    return 0


async def events(ns: argparse.Namespace, nats: str) -> int:
    async for e in read_events(nats, ns.prefix, follow=ns.follow):
        if ns.json:
            print(json.dumps(MessageToDict(e)), flush=True)
        else:
            t = datetime.fromtimestamp(e.time_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
            by = f"  (by {e.principal})" if e.principal else ""
            print(f"{t}  {e.entity}.{e.what:<10} {e.entity_id:<28} {e.message}{by}", flush=True)
    return 0
