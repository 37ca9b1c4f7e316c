"""`maas pipeline validate FILE|DIR` checks a pipeline's YAML offline, every problem with
its line; `maas pipeline push NAME FILE|DIR` uploads it (a directory: with its plugins'
modules) and registers it as a version of NAME (`format: pipeline`), which clients then
call as `model=NAME`; `list` and `show` say what is registered (docs/pipelines.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from maas.pipelines.package import SPEC_FILE

ClientArgs = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: argparse._SubParsersAction, client_args: ClientArgs) -> None:
    p = sub.add_parser("pipeline", help="pipelines: check a pipeline (validate), register it (push), list, show")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    validate = psub.add_parser("validate", help="check a pipeline file; errors name their line")
    validate.add_argument("file", type=Path)
    push = psub.add_parser("push", help="upload a pipeline (its YAML, or a directory holding pipeline.yaml and "
                                        "its plugins' modules) and register it as the next version of NAME")
    client_args(push)
    push.add_argument("name")
    push.add_argument("file", type=Path, metavar="FILE|DIR")
    listing = psub.add_parser("list", help="the pipelines you may use, with the deployments that run them")
    client_args(listing)
    show = psub.add_parser("show", help="one pipeline version: its steps, what they call, its SLO")
    client_args(show)
    show.add_argument("ref", metavar="NAME[@VERSION]")
    test = psub.add_parser("test", help="ask a pipeline one question through a router's HTTP API: the answer as "
                                        "it streams, then each step's status and time")
    client_args(test)
    test.add_argument("ref", metavar="NAME[@VERSION]")
    test.add_argument("question")
    rerun = psub.add_parser("replay", help="rerun your captured requests of one version through another and show, "
                                          "step by step, what changed")
    client_args(rerun)
    rerun.add_argument("ref", metavar="NAME@NEW", help="the version to try")
    rerun.add_argument("--against", required=True, metavar="NAME@OLD", help="the version whose captures are rerun")
    rerun.add_argument("--limit", type=int, default=20, help="the newest this many captures (default 20)")


async def run(ns: argparse.Namespace, etcd: str) -> int:
    if ns.pipeline_command == "push":
        return await push(ns, etcd)
    if ns.pipeline_command == "list":
        return await list_pipelines(ns, etcd)
    if ns.pipeline_command == "replay":
        return await replay(ns, etcd)
    if ns.pipeline_command == "test":
        return await test(ns, etcd)
    return await show(ns, etcd)


async def test(ns: argparse.Namespace, etcd: str) -> int:
    """One question, streamed through a router's OpenAI HTTP API with `x-maas-trace: 1`."""
    import json
    import ssl

    import aiohttp

    from maas.cli.main import client_tls, credential, mesh_client
    from maas.mesh.clients import live_services

    async with mesh_client(ns, etcd) as mesh:
        routers = [r for r in await live_services(mesh.etcd, mesh.keys, "router") if r.http_endpoint]
    if not routers:
        print("no router serves the HTTP API here (maas status lists the routers)", file=sys.stderr)
        return 2
    tls = client_tls()
    context = ssl.create_default_context(cadata=tls.ca.decode()) if tls is not None and tls.dials else None
    url = f"{'https' if context else 'http'}://{routers[0].http_endpoint}/v1/chat/completions"
    body = {"model": ns.ref, "stream": True, "messages": [{"role": "user", "content": ns.question}]}
    headers = {"x-maas-trace": "1"}
    if key := credential(ns):
        headers["Authorization"] = f"Bearer {key}"
    timeline: dict[str, object] = {}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers, ssl=context or True) as resp:
        if resp.status != 200:
            error = (await resp.json(content_type=None) or {}).get("error", {})
            print(f"{resp.status}: {error.get('message', resp.reason)}", file=sys.stderr)
            return 1
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                print(f"\nerror: {event['error'].get('message')}", file=sys.stderr)
                return 1
            for choice in event.get("choices", []):
                print(choice.get("delta", {}).get("content") or "", end="", flush=True)
                if choice.get("finish_reason"):
                    print(f"\n[finish: {choice['finish_reason']}]")
            timeline = event.get("pipeline") or timeline
    if timeline:
        print(f"{timeline.get('version')}: first chunk at {timeline.get('first_chunk_ms')} ms")
        for step in timeline.get("steps", []):  # type: ignore[attr-defined]
            error = f"  {step['error']}" if step.get("error") else ""
            print(f"  {step['step']:<16} {step['kind']:<9} {step['status']:<9} start {step['start_ms']:8.1f} ms  "
                  f"took {step['ms']:8.1f} ms  attempts {step['attempts']}{error}")
    return 0


async def replay(ns: argparse.Namespace, etcd: str) -> int:
    import json

    from google.protobuf.json_format import MessageToDict

    from maas.cli.main import mesh_client
    from maas.v1 import pipelines_pb2, pipelines_pb2_grpc

    changed, total, errors = 0, 0, 0
    steps_changed: dict[str, int] = {}
    async with mesh_client(ns, etcd) as mesh:
        stub = pipelines_pb2_grpc.PipelinesStub(await mesh.channel("router"))
        async for r in stub.Replay(pipelines_pb2.ReplayRequest(pipeline=ns.ref, against=ns.against, limit=ns.limit),
                                   timeout=3600):
            total += 1
            changed += not r.same_answer
            errors += bool(r.error)
            for s in r.steps:
                if not s.same_output or s.old_status != s.new_status:
                    steps_changed[s.step] = steps_changed.get(s.step, 0) + 1
            if ns.json:
                print(json.dumps(MessageToDict(r)))
                continue
            verdict = "same answer" if r.same_answer else ("failed: " + r.error if r.error else "answer changed")
            print(f"{r.request_id}  {r.question!r}: {verdict}")
            for s in r.steps:
                status = s.new_status if s.old_status == s.new_status else f"{s.old_status or '-'} -> {s.new_status or '-'}"
                what = "same output" if s.same_output else f"{s.old_output!r} -> {s.new_output!r}"
                print(f"    {s.step:<16} {status:<20} {s.old_ms:8.1f} -> {s.new_ms:8.1f} ms  {what}")
            if not r.same_answer and not r.error:
                print(f"    answer: {r.old_answer!r} -> {r.new_answer!r}")
    if not ns.json:
        if not total:
            print(f"no captured requests of {ns.against} (a pipeline captures when its file says "
                  "`capture: {rate: R}`, and only its owner's requests)")
        else:
            steps = ", ".join(f"{name} in {n}" for name, n in steps_changed.items()) or "none"
            print(f"{total} requests replayed: {changed} answers changed, {errors} failed; steps changed: {steps}")
    return 0


async def list_pipelines(ns: argparse.Namespace, etcd: str) -> int:
    from maas.cli.commands import _table, _when
    from maas.cli.main import mesh_client
    from maas.v1 import registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

    async with mesh_client(ns, etcd) as mesh:
        registry = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        scheduler = scheduler_pb2_grpc.SchedulerStub(await mesh.channel("scheduler"))
        models = (await registry.ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=10)).models
        deployments = (await scheduler.ListDeployments(scheduler_pb2.ListDeploymentsRequest(), timeout=10)).deployments
    running: dict[str, list[str]] = {}
    for st in deployments:
        d = st.deployment
        if d.format == "pipeline":
            canary = f" (canary {d.traffic[0].model} {d.traffic[0].weight}%)" if d.traffic else ""
            running.setdefault(d.resolved_version.partition("@")[0], []).append(
                f"{d.name}: {d.resolved_version}{canary}")
    rows = [[m.name, str(m.latest_version), m.owner or "platform", "; ".join(running.get(m.name, [])) or "-",
             _when(m.created_ms)] for m in models if m.latest_format == "pipeline"]
    print(_table(rows, ["pipeline", "latest", "owner", "deployments", "created"]) if rows else "no pipelines")
    return 0


async def show(ns: argparse.Namespace, etcd: str) -> int:
    from maas.cli.main import mesh_client
    from maas.mesh.artifacts import ARTIFACT
    from maas.pipelines import package
    from maas.pipelines.spec import parse
    from maas.v1 import registry_pb2, registry_pb2_grpc

    async with mesh_client(ns, etcd) as mesh:
        registry = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        v = await registry.GetVersion(registry_pb2.GetVersionRequest(ref=ns.ref), timeout=10)
        if v.format != "pipeline":
            print(f"{v.name}@{v.version} is a {v.format} model, not a pipeline (maas models show {v.name})",
                  file=sys.stderr)
            return 2
        sha = v.source.removeprefix(ARTIFACT)
        data = b"".join([c.data async for c in registry.DownloadArtifact(
            registry_pb2.DownloadArtifactRequest(sha256=sha), timeout=60)])
    pack = package.read(data)
    spec = parse(pack.spec, source=f"{v.name}@{v.version}", files=pack.files if pack.files else None)
    print(f"{v.name}@{v.version} (owner {v.owner or 'platform'}, artifact {sha[:12]}"
          f"{f', {len(pack.files) - 1} packaged files' if pack.files else ''})")
    if spec.description:
        print(spec.description)
    print(f"output: {spec.output}{' (streams)' if spec.streams else ''}")
    for step in spec.steps.values():
        calls = next((f"{k} {step.options[k]}" for k in ("model", "index", "plugin") if k in step.options), "")
        extra = [f"input {step.input}" if step.input else "", calls,
                 f"timeout {step.timeout_ms} ms" if step.timeout_ms else "",
                 f"on_error {step.on_error}" if step.on_error != "fail" else "",
                 f"retries {step.retries}" if step.retries else ""]
        print(f"  {step.name:<16} {step.kind:<9} {', '.join(e for e in extra if e)}")
    if spec.slo is not None:
        slo = spec.slo
        print(f"slo: window {slo.window_s:g}s, at least {slo.min_requests} requests, "
              f"{f'promoted after {slo.promote_after}' if slo.promote_after else 'promoted by hand'}")
        for o in slo.objectives:
            bounds = [f"error_rate {o.error_rate:g}" if o.error_rate is not None else "",
                      f"p{round(o.quantile * 100)}_ms {o.latency_ms:g}" if o.latency_ms is not None else ""]
            print(f"  {o.describe():<22} {', '.join(b for b in bounds if b)}")
    return 0


async def push(ns: argparse.Namespace, etcd: str) -> int:
    from maas.cli.main import mesh_client
    from maas.mesh.artifacts import pack_directory
    from maas.mesh.clients import upload_file
    from maas.v1 import registry_pb2, registry_pb2_grpc

    if validate(ns) != 0:  # the registry checks it too; this says so before uploading anything
        return 2
    upload = ns.file
    with tempfile.TemporaryDirectory() as tmp:
        if ns.file.is_dir():  # a package: the directory's files in one deterministic tar
            upload = Path(tmp) / "pipeline.tar"
            pack_directory(ns.file, upload)
        async with mesh_client(ns, etcd) as mesh:
            stub = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
            artifact = await upload_file(stub, upload, timeout=60)
            v = await stub.RegisterModel(registry_pb2.RegisterModelRequest(
                name=ns.name, format="pipeline", source=f"artifact:{artifact.sha256}"), timeout=30)
    print(f"registered {v.name}@{v.version} (pipeline {artifact.sha256[:12]}); clients call it as model {v.name!r}")
    return 0


def validate(ns: argparse.Namespace) -> int:
    from maas.pipelines.spec import SpecErrors, parse

    path = ns.file / SPEC_FILE if ns.file.is_dir() else ns.file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cannot read {ns.file}: {exc}", file=sys.stderr)
        return 2
    files = ({str(f.relative_to(ns.file)): f.read_bytes() for f in ns.file.rglob("*") if f.is_file()}
             if ns.file.is_dir() else None)
    try:
        spec = parse(text, source=str(path), files=files)
    except SpecErrors as e:
        print(e.message, file=sys.stderr)
        print(f"{len(e.problems)} problem{'s' if len(e.problems) != 1 else ''} in {ns.file}", file=sys.stderr)
        return 2
    kinds = ", ".join(f"{s.name} ({s.kind})" for s in spec.steps.values())
    print(f"{ns.file}: {len(spec.steps)} steps: {kinds}; output {spec.output}"
          f"{' (streams)' if spec.streams else ''}")
    return 0
