"""`maas`: run services, a local stack, and talk to a running mesh.

Commands that talk to a mesh find etcd from --etcd, then MAAS_ETCD, then the
`.maas/stack.json` that `maas up` writes in the directory it was started in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from maas.mesh.errors import MaasError, StartupError

if TYPE_CHECKING:
    from maas.mesh.clients import MeshClient
    from maas.mesh.tls import TlsFiles

DEFAULT_DATA_DIR = ".maas"


def _stack_file() -> dict[str, str]:
    path = Path(os.environ.get("MAAS_DATA_DIR", DEFAULT_DATA_DIR)) / "stack.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def credential(ns: argparse.Namespace, *, as_tenant: bool = False) -> str:
    """The key a command presents: --api-key, else MAAS_API_KEY; else, where `maas up` runs,
    its development key (tenant dev) for tenant work (`as_tenant`: generate, finetune) and
    the admin token (MAAS_ADMIN_TOKEN, else .maas/stack.json) for the rest."""
    from maas.mesh.auth import ADMIN_TOKEN_ENV, API_KEY_ENV

    explicit = getattr(ns, "api_key", None) or os.environ.get(API_KEY_ENV, "")
    if explicit:
        return str(explicit)
    stack = _stack_file()
    admin = os.environ.get(ADMIN_TOKEN_ENV, "") or stack.get("admin_token", "")
    tenant = stack.get("api_key", "")
    return (tenant or admin) if as_tenant else (admin or tenant)


def client_tls() -> TlsFiles | None:
    """The CA the CLI verifies services with: MAAS_TLS_CA, else the one `maas up` made here."""
    from maas.mesh.tls import TlsFiles

    path = os.environ.get("MAAS_TLS_CA") or _stack_file().get("tls_ca", "")
    return TlsFiles.load(ca=path) if path else None


def mesh_client(ns: argparse.Namespace, etcd: str, *, as_tenant: bool = False) -> MeshClient:
    """A client of the mesh that acts with `credential(ns)` and verifies services over TLS."""
    from maas.mesh.clients import MeshClient

    return MeshClient(etcd, ns.prefix, credential=credential(ns, as_tenant=as_tenant), tls=client_tls())


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None,
                   help="key to act with (default: MAAS_API_KEY; where `maas up` runs, its admin token, "
                        "or its tenant dev key for generate and finetune)")
    p.add_argument("--etcd", default=None, help="etcd URL (default: MAAS_ETCD, else .maas/stack.json)")
    p.add_argument("--nats", default=None, help="NATS URL (default: MAAS_NATS, else .maas/stack.json)")
    p.add_argument("--prefix", default=os.environ.get("MAAS_PREFIX", "/maas/"), help="etcd key prefix")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def resolve_urls(ns: argparse.Namespace) -> tuple[str, str]:
    stack = _stack_file()
    etcd = getattr(ns, "etcd", None) or os.environ.get("MAAS_ETCD") or stack.get("etcd") or "http://127.0.0.1:2379"
    nats = getattr(ns, "nats", None) or os.environ.get("MAAS_NATS") or stack.get("nats") or "nats://127.0.0.1:4222"
    return etcd, nats


def _run(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        return asyncio.run(coro_fn())
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except MaasError as e:
        print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `maas ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def build_parser() -> argparse.ArgumentParser:
    from maas.cli import admin, batches, deployments, finetune, indexes, keys, pipelines, usage
    from maas.services.registry import main as registry_main
    from maas.services.router import main as router_main
    from maas.services.scheduler import main as scheduler_main
    from maas.services.worker import main as worker_main

    parser = argparse.ArgumentParser(prog="maas", description="maas-mesh: serve, deploy and manage LLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start a whole local stack in the foreground")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--model", default="", help="model source to serve (directory or hub id); default: demo")
    up.add_argument("--name", default="demo", help="name to register the model under")
    up.add_argument("--format", default="hf", choices=["hf", "sim"])
    up.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="engine option of the model (repeatable), as `maas models register --option`")
    up.add_argument("--data-dir", default=os.environ.get("MAAS_DATA_DIR", DEFAULT_DATA_DIR))
    up.add_argument("--etcd", default=os.environ.get("MAAS_ETCD", ""), help="use this etcd instead of starting one")
    up.add_argument("--nats", default=os.environ.get("MAAS_NATS", ""), help="use this NATS instead of starting one")
    up.add_argument("--router-port", type=int, default=50051)
    up.add_argument("--http-port", type=int, default=8000, help="router's OpenAI HTTP API (-1: off)")
    up.add_argument("--cpu-memory-gib", type=float, default=0.0, help="CPU device budget per worker")
    up.add_argument("--insecure", action="store_true",
                    help="no credentials anywhere: anyone who reaches a port is the admin (development only)")

    status = sub.add_parser("status", help="services, workers, deployments and replicas")
    _client_args(status)
    status.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait until the stack is fully ready; non-zero exit on time-out")

    models = sub.add_parser("models", help="register and list models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    reg = msub.add_parser("register", help="register a new version of a model")
    _client_args(reg)
    reg.add_argument("name")
    reg.add_argument("--source", default="", help="local directory or hub id (not needed for sim)")
    reg.add_argument("--format", default="hf", choices=["hf", "sim"])
    reg.add_argument("--base", default="", help="register a LoRA adapter of this base model (name@version)")
    reg.add_argument("--task", default="generate", choices=["generate", "embed"])
    reg.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="engine option")
    lst = msub.add_parser("list", help="list registered models")
    _client_args(lst)
    show = msub.add_parser("show", help="a model and its versions")
    _client_args(show)
    show.add_argument("name")
    versions = msub.add_parser("versions", help="a model's versions")
    _client_args(versions)
    versions.add_argument("name")
    alias = msub.add_parser("alias", help="point an alias (e.g. prod) at a version")
    _client_args(alias)
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", type=int)
    delete = msub.add_parser("delete", help="delete a version (refused while a deployment uses it)")
    _client_args(delete)
    delete.add_argument("ref", metavar="NAME@VERSION")
    upload = msub.add_parser("upload", help="upload a model directory to the registry and register it")
    _client_args(upload)
    upload.add_argument("name")
    upload.add_argument("directory")
    upload.add_argument("--format", default="hf", choices=["hf", "sim"])
    upload.add_argument("--task", default="generate", choices=["generate", "embed"])
    upload.add_argument("--base", default="", help="the base model (name@version) of a LoRA adapter")
    upload.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="engine option")
    download = msub.add_parser("download", help="download an uploaded version into a directory")
    _client_args(download)
    download.add_argument("ref", metavar="NAME[@VERSION]")
    download.add_argument("directory")

    deployments.add_parser(sub, _client_args)

    workers = sub.add_parser("workers", help="workers, their devices and replicas")
    _client_args(workers)

    gen = sub.add_parser("generate", help="generate text through the router, streaming")
    _client_args(gen)
    gen.add_argument("--model", required=True)
    gen.add_argument("--adapter", default="", help="LoRA adapter (a model registered with --base)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--router", default=None, help="router address (default: found in etcd)")
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.add_argument("prompt")

    admin.add_parser(sub, _client_args)
    keys.add_parser(sub, _client_args)
    finetune.add_parser(sub, _client_args)
    batches.add_parser(sub, _client_args)
    usage.add_parser(sub, _client_args)
    pipelines.add_parser(sub, _client_args)
    indexes.add_parser(sub, _client_args)

    ev = sub.add_parser("events", help="print lifecycle events")
    _client_args(ev)
    ev.add_argument("--follow", "-f", action="store_true")

    for name, module in (("router", router_main), ("worker", worker_main),
                         ("registry", registry_main), ("scheduler", scheduler_main)):
        p = sub.add_parser(name, help=f"run one {name} process")
        module.add_arguments(p)
        p.set_defaults(service_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    from maas.cli.deployments import legacy_argv

    ns = build_parser().parse_args(legacy_argv(sys.argv[1:] if argv is None else argv))
    if hasattr(ns, "service_main"):
        return int(ns.service_main(ns))
    from maas.cli import admin, batches, commands, deployments, finetune, indexes, keys, pipelines, usage

    if ns.command == "up":
        from maas.stack.supervisor import UpConfig, run_up

        worker_args = ("--cpu-memory-gib", str(ns.cpu_memory_gib)) if ns.cpu_memory_gib else ()
        return run_up(UpConfig(data_dir=Path(ns.data_dir).resolve(), workers=ns.workers, model=ns.model,
                               model_name=ns.name, model_format=ns.format,
                               model_options=tuple(commands.option_pairs(ns.option).items()),
                               etcd=ns.etcd, nats=ns.nats,
                               router_port=ns.router_port, http_port=ns.http_port, worker_args=worker_args,
                               insecure=ns.insecure))
    if ns.command == "pipeline" and ns.pipeline_command == "validate":
        return pipelines.validate(ns)
    etcd, nats = resolve_urls(ns)
    handlers = {
        "status": lambda: commands.status(ns, etcd),
        "models": lambda: commands.models(ns, etcd),
        "deploy": lambda: deployments.run(ns, etcd),
        "workers": lambda: commands.workers(ns, etcd),
        "generate": lambda: commands.generate(ns, etcd),
        "events": lambda: commands.events(ns, nats),
        "admin": lambda: admin.run(ns, etcd),
        "keys": lambda: keys.run(ns, etcd),
        "finetune": lambda: finetune.run(ns, etcd, nats),
        "batch": lambda: batches.run(ns, etcd),
        "usage": lambda: usage.run(ns, etcd),
        "pipeline": lambda: pipelines.run(ns, etcd),
        "index": lambda: indexes.run(ns, etcd),
    }
    return _run(handlers[ns.command])
