"""The `maas` commands that talk to a running mesh."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import aetcd.exceptions
import grpc
from google.protobuf.json_format import MessageToDict

from maas.mesh.clients import MeshClient, dial, live_services
from maas.mesh.events import read_events
from maas.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
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
    return f"{n / 2**30:.1f}G"


@dataclass
class Snapshot:
    services: dict[str, list[mesh_pb2.ServiceInfo]]
    deployments: list[scheduler_pb2.DeploymentStatus]
    workers: list[scheduler_pb2.WorkerStatus]


async def _snapshot(mesh: MeshClient) -> Snapshot:
    services = {k: await live_services(mesh.etcd, mesh.keys, k) for k in SERVICE_KINDS}
    snap = Snapshot(services, [], [])
    if services["scheduler"]:
        stub = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
        snap.deployments = list((await stub.ListDeployments(scheduler_pb2.ListDeploymentsRequest(), timeout=5)).deployments)
        snap.workers = list((await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)).workers)
    return snap


def _ready(snap: Snapshot, expected: list[str]) -> tuple[bool, str]:
    for kind in SERVICE_KINDS:
        if not snap.services[kind]:
            return False, f"no {kind} running"
    deployments = {d.deployment.name: d for d in snap.deployments}
    for name in expected:
        if name not in deployments:
            return False, f"deployment {name} not created yet"
    for d in deployments.values():
        if d.ready_replicas < d.deployment.replicas:
            return False, f"deployment {d.deployment.name}: {d.message or 'not ready'}"
    return True, "ready"


def _print_status(snap: Snapshot, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "services": {k: [MessageToDict(s) for s in v] for k, v in snap.services.items()},
            "deployments": [MessageToDict(d) for d in snap.deployments],
            "workers": [MessageToDict(w) for w in snap.workers],
        }, indent=2))
        return
    rows = [[s.kind, s.instance, s.endpoint, s.metrics_endpoint] for k in SERVICE_KINDS for s in snap.services[k]]
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


async def status(ns: argparse.Namespace, etcd: str) -> int:
    from maas.cli.main import _stack_file, resolve_urls

    deadline = time.monotonic() + ns.wait
    while True:
        # `maas up` may still be writing its stack file: look again on every try
        expected = list(_stack_file().get("deployments", [])) if not ns.etcd else []
        snap = None
        try:
            async with MeshClient(etcd, ns.prefix) as mesh:
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


def _options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: option {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


async def models(ns: argparse.Namespace, etcd: str) -> int:
    async with MeshClient(etcd, ns.prefix) as mesh:
        stub = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        if ns.models_command == "register":
            v = await stub.RegisterModel(registry_pb2.RegisterModelRequest(
                name=ns.name, source=ns.source, format=ns.format, task=ns.task, base=ns.base,
                options=_options(ns.option)), timeout=30)
            print(json.dumps(MessageToDict(v), indent=2) if ns.json else
                  f"registered {v.name}@{v.version} ({v.format}: {v.source}, needs {_gib(v.resources.memory_bytes)})")
            return 0
        listing = await stub.ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=10)
        if ns.json:
            print(json.dumps([MessageToDict(m) for m in listing.models], indent=2))
        else:
            rows = [[m.name, str(m.latest_version), ",".join(f"{a}={v}" for a, v in sorted(m.aliases.items())) or "-",
                     datetime.fromtimestamp(m.created_ms / 1000).strftime("%Y-%m-%d %H:%M")] for m in listing.models]
            print(_table(rows, ["model", "latest", "aliases", "created"]))
    return 0


async def deploy(ns: argparse.Namespace, etcd: str) -> int:
    if ns.replicas < 0:
        print("error: --replicas must be >= 0", file=sys.stderr)
        return 2
    async with MeshClient(etcd, ns.prefix) as mesh:
        stub = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
        dep = scheduler_pb2.Deployment(name=ns.name, model=ns.model or ns.name, replicas=ns.replicas)
        try:
            st = await stub.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(deployment=dep), timeout=10)
            verb = "created"
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # change only what was asked: scaling keeps the model version, selector and resources
            current = await stub.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=ns.name), timeout=10)
            dep = current.deployment
            dep.replicas = ns.replicas
            dep.model = ns.model or dep.resolved_version
            st = await stub.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(deployment=dep), timeout=10)
            verb = "updated"
        print(json.dumps(MessageToDict(st), indent=2) if ns.json else
              f"{verb} deployment {st.deployment.name}: {st.deployment.resolved_version} x{st.deployment.replicas}")
    return 0


async def generate(ns: argparse.Namespace, etcd: str) -> int:
    params = common_pb2.SamplingParams(max_tokens=ns.max_tokens, stop=ns.stop)
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(ns, name) is not None:
            setattr(params, name, getattr(ns, name))
    request = inference_pb2.GenerateRequest(model=ns.model, prompt=ns.prompt, params=params, adapter=ns.adapter)
    async with MeshClient(etcd, ns.prefix) as mesh:
        channel = dial(ns.router) if ns.router else await mesh.channel("router")
        stub = inference_pb2_grpc.InferenceStub(channel)
        last = None
        async for chunk in stub.GenerateStream(request, timeout=ns.timeout):
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
    async for e in read_events(nats, follow=ns.follow):
        if ns.json:
            print(json.dumps(MessageToDict(e)), flush=True)
        else:
            t = datetime.fromtimestamp(e.time_ms / 1000).strftime("%H:%M:%S.%f")[:-3]
            print(f"{t}  {e.entity}.{e.what:<10} {e.entity_id:<28} {e.message}", flush=True)
    return 0
