"""`maas deploy ACTION`: create, update, scale, canary, promote, rollback, list, show, delete.

`maas deploy NAME [--model REF] [--replicas N] [--canary REF --weight W | --promote |
--rollback]` (create or change in one command) still works: it is the hidden `apply`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import grpc
from google.protobuf.json_format import MessageToDict

from maas.cli.main import mesh_client
from maas.v1 import mesh_pb2, scheduler_pb2, scheduler_pb2_grpc

ACTIONS = ("create", "update", "scale", "canary", "promote", "rollback", "reserve", "list", "show", "delete")
ClientArgs = Callable[[argparse.ArgumentParser], None]


class UsageError(Exception):
    """A command line that cannot work (exit 2, no traceback)."""


def add_parser(sub: argparse._SubParsersAction, client_args: ClientArgs) -> None:
    dep = sub.add_parser("deploy", help="deployments: create, scale, roll out, roll back",
                         description="Deployments: which model version runs, on how many replicas.")
    dsub = dep.add_subparsers(dest="deploy_command", required=True, metavar="{" + ",".join(ACTIONS) + "}")

    def action(name: str, help: str | None, *, named: bool = True) -> argparse.ArgumentParser:
        p = dsub.add_parser(name, help=help)
        client_args(p)
        if named:
            p.add_argument("name", help="deployment name (clients ask for this model name)")
        return p

    create = action("create", "deploy a model")
    create.add_argument("--model", default="", help="model ref (name, name@version, name@alias); default NAME")
    _scaling(create)
    _resources(create)
    _adapters(create)
    update = action("update", "change the model version, resources or adapters (a rolling update)")
    update.add_argument("--model", default="", help="the new model ref")
    _resources(update)
    _adapters(update)
    scale = action("scale", "set the replica count, or autoscaling bounds")
    _scaling(scale)
    canary = action("canary", "send a share of requests to another version")
    canary.add_argument("ref", metavar="REF", help="the canary version (name@version or name@alias)")
    canary.add_argument("--weight", type=int, default=10, help="its share of requests in percent (default 10)")
    action("promote", "make the canary the deployed version")
    action("rollback", "drop the canary (all traffic to the deployed version); without one, "
                       "go back to the version deployed before")
    reserve = action("reserve", "provisioned throughput: reserve completion tokens per second for a tenant "
                                "(admin only; the deployment gets the replicas it needs)")
    reserve.add_argument("--tenant", required=True)
    reserve.add_argument("--tokens-per-s", type=int, required=True, help="completion tokens per second (0 removes it)")
    reserve.add_argument("--replica-tokens-per-s", type=int, default=0,
                         help="what one replica makes (once per deployment; measure it with bench/engine.py)")
    action("list", "deployments and their readiness", named=False)
    action("show", "one deployment, its replicas and why it is not ready")
    action("delete", "delete a deployment (its replicas unload)")

    # `maas deploy NAME [flags]`: create or change in one go (the original form); no help
    # text keeps it out of the listing
    apply = dsub.add_parser("apply")
    client_args(apply)
    apply.add_argument("name")
    apply.add_argument("--model", default="")
    apply.add_argument("--replicas", type=int, default=None)
    rollout = apply.add_mutually_exclusive_group()
    rollout.add_argument("--canary", metavar="REF")
    rollout.add_argument("--promote", action="store_true")
    rollout.add_argument("--rollback", action="store_true")
    apply.add_argument("--weight", type=int, default=10)


def _scaling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None, help="a fixed replica count (turns autoscaling off)")
    p.add_argument("--min", type=int, default=None, dest="min_replicas",
                   help="autoscale: fewest replicas (0 scales to zero when idle; the next request cold-starts it)")
    p.add_argument("--max", type=int, default=None, dest="max_replicas", help="autoscale: most replicas")
    p.add_argument("--target", type=float, default=None, help="autoscale: requests in flight per replica (default 8)")
    p.add_argument("--scale-up-seconds", type=float, default=None, help="autoscale: sustained demand before scaling up")
    p.add_argument("--cooldown", type=float, default=None,
                   help="autoscale: seconds of lower demand (or idleness) before scaling down (default 60)")


def _adapters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", nargs="*", default=None, metavar="ADAPTER",
                   help="LoRA adapters of the model served beside it, each a model name of its own "
                        "(replaces the list; --adapters alone clears it)")


def _resources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-gib", type=float, default=None, help="device memory per replica (default: the version's)")
    p.add_argument("--devices", type=int, default=None, help="devices per replica (default: the version's)")
    p.add_argument("--selector", action="append", default=None, metavar="KEY=VALUE",
                   help="only on workers with this label (repeatable)")


# options of the original form that take a value (so their value is not the NAME)
_VALUED = {"--etcd", "--nats", "--prefix", "--model", "--replicas", "--canary", "--weight"}


def legacy_argv(argv: list[str]) -> list[str]:
    """`deploy [options] NAME ...` -> `deploy apply [options] NAME ...`."""
    if not argv or argv[0] != "deploy":
        return argv
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] not in _VALUED else 2
    if i < len(argv) and argv[i] not in ACTIONS + ("apply",) and not any(a in ("-h", "--help") for a in argv[1:i]):
        return ["deploy", "apply", *argv[1:]]
    return argv


_UINT32 = 2**32 - 1


def _check_numbers(ns: argparse.Namespace) -> None:
    """Counts must fit the API's unsigned fields: say so instead of failing on the way."""
    for attr, flag in (("replicas", "--replicas"), ("min_replicas", "--min"), ("max_replicas", "--max"),
                       ("weight", "--weight"), ("devices", "--devices")):
        value = getattr(ns, attr, None)
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0")
        if value is not None and value > _UINT32:
            raise UsageError(f"{flag} must be <= {_UINT32}")
    for attr, flag in (("target", "--target"), ("scale_up_seconds", "--scale-up-seconds"),
                       ("cooldown", "--cooldown"), ("memory_gib", "--memory-gib")):
        value = getattr(ns, attr, None)
        if value is not None and not 0 <= value < 2**34:  # also refuses NaN
            raise UsageError(f"{flag} must be >= 0 and finite, got {value}")


def _apply_scaling(ns: argparse.Namespace, dep: scheduler_pb2.Deployment, *, new: bool) -> None:
    auto = [ns.min_replicas, ns.max_replicas, ns.target, ns.scale_up_seconds, ns.cooldown]
    if ns.replicas is not None:
        if any(v is not None for v in auto):
            raise UsageError("give either --replicas (fixed) or --min/--max (autoscaled), not both")
        if ns.replicas < 0:
            raise UsageError("--replicas must be >= 0")
        dep.replicas = ns.replicas
        dep.ClearField("autoscale")
        return
    if all(v is None for v in auto):
        if new:
            dep.replicas = 1
            return
        raise UsageError("nothing to change: give --replicas N, or --min/--max for autoscaling")
    a = scheduler_pb2.Autoscale()
    if dep.HasField("autoscale"):
        a.CopyFrom(dep.autoscale)
    if ns.min_replicas is not None:
        a.min_replicas = ns.min_replicas
    if ns.max_replicas is not None:
        a.max_replicas = ns.max_replicas
    if not a.max_replicas:
        raise UsageError("autoscaling needs --max")
    if ns.target is not None:
        a.target_in_flight = ns.target
    if ns.scale_up_seconds is not None:
        a.scale_up_seconds = ns.scale_up_seconds
    if ns.cooldown is not None:
        a.cooldown_seconds = ns.cooldown
    if any(v is not None and v < 0 for v in auto):
        raise UsageError("autoscaling figures must be >= 0")
    dep.autoscale.CopyFrom(a)
    if new:
        dep.replicas = a.min_replicas  # min 0: loads on the first request


def _apply_resources(ns: argparse.Namespace, dep: scheduler_pb2.Deployment) -> None:
    if ns.memory_gib is not None:
        if ns.memory_gib <= 0:
            raise UsageError("--memory-gib must be > 0")
        dep.resources.memory_bytes = int(ns.memory_gib * 2**30)
    if ns.devices is not None:
        if ns.devices < 1:
            raise UsageError("--devices must be >= 1")
        dep.resources.devices = ns.devices
    if ns.selector is not None:
        dep.selector.clear()
        for item in ns.selector:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--selector wants KEY=VALUE, got {item!r}")
            dep.selector[key] = value


def _state(r: mesh_pb2.ReplicaInfo) -> str:
    return mesh_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_").lower()


def _scaling_text(d: scheduler_pb2.Deployment) -> str:
    if not d.autoscale.max_replicas:
        return "fixed"
    a = d.autoscale
    return f"auto {a.min_replicas}..{a.max_replicas}, target {a.target_in_flight or 8:g}"


def _summary(verb: str, st: scheduler_pb2.DeploymentStatus) -> str:
    d = st.deployment
    canary = f", canary {d.traffic[0].model} at {d.traffic[0].weight}%" if d.traffic else ""
    auto = f" ({_scaling_text(d)})" if d.autoscale.max_replicas else ""
    if d.format == "pipeline":
        return f"{verb} deployment {d.name}: pipeline {d.resolved_version}{canary}"
    return f"{verb} deployment {d.name}: {d.resolved_version} x{d.replicas}{auto}{canary}"


def _print_show(st: scheduler_pb2.DeploymentStatus) -> None:
    from maas.cli.commands import _table

    d = st.deployment
    lines = [("deployment", d.name), ("model", f"{d.model} -> {d.resolved_version}")]
    if d.format == "pipeline":
        lines.append(("kind", "pipeline (run by the routers)"))
    else:
        lines += [("replicas", f"{st.ready_replicas}/{d.replicas} ready"), ("scaling", _scaling_text(d))]
    if d.traffic:
        lines.append(("canary", f"{d.traffic[0].model} at {d.traffic[0].weight}%"))
    if d.rollout_note:
        lines.append(("last rollout", d.rollout_note))
    if d.resources.memory_bytes or d.resources.devices:
        lines.append(("resources", f"{d.resources.memory_bytes / 2**30:.2f} GiB x{d.resources.devices or 1} device(s)"))
    if d.selector:
        lines.append(("selector", ",".join(f"{k}={v}" for k, v in sorted(d.selector.items()))))
    if d.adapters:
        lines.append(("adapters", ", ".join(d.adapters)))
    if d.reservations:
        lines.append(("reserved", ", ".join(f"{t} {n} tokens/s" for t, n in sorted(d.reservations.items()))
                      + (f" (a replica makes {d.replica_tokens_per_s})" if d.replica_tokens_per_s else "")))
    if st.message:
        lines.append(("status", st.message))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))
    if st.replicas:
        print()
        print(_table([[r.replica_id, f"{r.model_name}@{r.model_version}", r.worker_id, ",".join(r.device_ids),
                       _state(r), r.message or "-"] for r in st.replicas],
                     ["replica", "version", "worker", "devices", "state", "message"]))


async def run(ns: argparse.Namespace, etcd: str) -> int:
    try:
        async with mesh_client(ns, etcd) as mesh:
            stub = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
            return await _run(ns, stub)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


async def _get(stub: scheduler_pb2_grpc.SchedulerStub, name: str) -> scheduler_pb2.Deployment:
    return (await stub.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=name), timeout=10)).deployment


async def _update(stub: scheduler_pb2_grpc.SchedulerStub, dep: scheduler_pb2.Deployment) -> scheduler_pb2.DeploymentStatus:
    return await stub.UpdateDeployment(scheduler_pb2.UpdateDeploymentRequest(deployment=dep), timeout=10)


async def _run(ns: argparse.Namespace, stub: scheduler_pb2_grpc.SchedulerStub) -> int:
    action = ns.deploy_command
    _check_numbers(ns)
    out = (lambda st: json.dumps(MessageToDict(st), indent=2)) if ns.json else None
    if action == "list":
        listing = await stub.ListDeployments(scheduler_pb2.ListDeploymentsRequest(), timeout=10)
        if ns.json:
            print(json.dumps([MessageToDict(d) for d in listing.deployments], indent=2))
            return 0
        from maas.cli.commands import _table
        print(_table([[d.deployment.name, d.deployment.resolved_version
                       + (f" + {d.deployment.traffic[0].model} {d.deployment.traffic[0].weight}%"
                          if d.deployment.traffic else ""),
                       f"{d.ready_replicas}/{d.deployment.replicas}", _scaling_text(d.deployment), d.message or "-"]
                      for d in listing.deployments], ["deployment", "model", "ready", "scaling", "message"]))
        return 0
    if action == "show":
        st = await stub.GetDeployment(scheduler_pb2.GetDeploymentRequest(name=ns.name), timeout=10)
        print(out(st)) if out else _print_show(st)
        return 0
    if action == "delete":
        await stub.DeleteDeployment(scheduler_pb2.DeleteDeploymentRequest(name=ns.name), timeout=10)
        print(json.dumps({"deleted": ns.name}) if ns.json else f"deleted deployment {ns.name}")
        return 0
    if action == "apply":
        return await _apply(ns, stub)
    if action == "reserve":
        for flag, value in (("--tokens-per-s", ns.tokens_per_s), ("--replica-tokens-per-s", ns.replica_tokens_per_s)):
            if not 0 <= value <= _UINT32:
                raise UsageError(f"{flag} must be between 0 and {_UINT32}")
        st = await stub.Reserve(scheduler_pb2.ReserveRequest(
            deployment=ns.name, tenant=ns.tenant, tokens_per_s=ns.tokens_per_s,
            replica_tokens_per_s=ns.replica_tokens_per_s), timeout=10)
        d = st.deployment
        print(out(st) if out else f"{d.name}: {ns.tokens_per_s} tokens/s reserved for tenant {ns.tenant}; "
              f"{sum(d.reservations.values())} tokens/s reserved in all, {d.replicas} replicas of "
              f"{d.replica_tokens_per_s} tokens/s")
        return 0

    if action == "create":
        dep = scheduler_pb2.Deployment(name=ns.name, model=ns.model or ns.name)
        _apply_scaling(ns, dep, new=True)
        _apply_resources(ns, dep)
        dep.adapters.extend(ns.adapters or [])
        st = await stub.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(deployment=dep), timeout=10)
        verb = "created"
    else:
        dep = await _get(stub, ns.name)
        dep.model = dep.resolved_version  # keep the version unless asked: an alias moving must not roll out
        if action == "update":
            if not ns.model and ns.memory_gib is None and ns.devices is None and ns.selector is None \
                    and ns.adapters is None:
                raise UsageError("nothing to change: give --model, --memory-gib, --devices, --selector or --adapters")
            dep.model = ns.model or dep.model
            _apply_resources(ns, dep)
            if ns.adapters is not None:
                del dep.adapters[:]
                dep.adapters.extend(ns.adapters)
        elif action == "scale":
            _apply_scaling(ns, dep, new=False)
        elif action == "canary":
            del dep.traffic[:]
            dep.traffic.add(model=ns.ref, weight=ns.weight)
        elif action == "promote":
            if not dep.traffic:
                raise UsageError(f"deployment {ns.name!r} has no canary")
            dep.model = dep.traffic[0].model
            del dep.traffic[:]
        elif action == "rollback":  # drop the canary; without one, back to the previous version
            if dep.traffic:
                del dep.traffic[:]
            elif dep.previous_version:
                dep.model = dep.previous_version
            else:
                raise UsageError(f"deployment {ns.name!r} has no canary and no previous version")
        st = await _update(stub, dep)
        verb = {"update": "updated", "scale": "scaled", "canary": "canary on", "promote": "promoted",
                "rollback": "rolled back"}[action]
    print(out(st) if out else _summary(verb, st))
    return 0


async def _apply(ns: argparse.Namespace, stub: scheduler_pb2_grpc.SchedulerStub) -> int:
    """The original one-command form: create if missing, else change what the flags say."""
    if ns.replicas is not None and ns.replicas < 0:
        raise UsageError("--replicas must be >= 0")
    try:
        current: scheduler_pb2.Deployment | None = await _get(stub, ns.name)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
        current = None
    if current is None:
        if ns.promote or ns.rollback or ns.canary:
            raise UsageError(f"deployment {ns.name!r} does not exist; create it first")
        dep = scheduler_pb2.Deployment(name=ns.name, model=ns.model or ns.name,
                                       replicas=1 if ns.replicas is None else ns.replicas)
        st = await stub.CreateDeployment(scheduler_pb2.CreateDeploymentRequest(deployment=dep), timeout=10)
        verb = "created"
    else:
        dep = current
        dep.model = ns.model or dep.resolved_version
        if ns.replicas is not None:
            dep.replicas = ns.replicas
            dep.ClearField("autoscale")
        if ns.canary:
            del dep.traffic[:]
            dep.traffic.add(model=ns.canary, weight=ns.weight)
        elif ns.promote or ns.rollback:
            if not dep.traffic:
                raise UsageError(f"deployment {ns.name!r} has no canary")
            if ns.promote:
                dep.model = dep.traffic[0].model
            del dep.traffic[:]
        st = await _update(stub, dep)
        verb = "updated"
    print(json.dumps(MessageToDict(st), indent=2) if ns.json else _summary(verb, st))
    return 0
