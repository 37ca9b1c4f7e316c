"""`maas keys create|list|revoke`: tenants' API keys (stored hashed by the registry).

Key management needs the registry's admin credential: `--admin-token`, else
MAAS_ADMIN_TOKEN, else the one `maas up` wrote to `.maas/stack.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime

from google.protobuf.json_format import MessageToDict

from maas.cli.main import mesh_client
from maas.mesh.auth import ADMIN_TOKEN_ENV
from maas.v1 import registry_pb2, registry_pb2_grpc

ClientArgs = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: argparse._SubParsersAction, client_args: ClientArgs) -> None:
    keys = sub.add_parser("keys", help="tenants' API keys: create, list, revoke")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = ksub.add_parser(name, help=help)
        client_args(p)
        p.add_argument("--admin-token", default=None, help=f"admin credential (default: {ADMIN_TOKEN_ENV}, "
                                                            "else .maas/stack.json)")
        return p

    create = action("create", "create a key; prints it alone on the last line (it is shown once)")
    create.add_argument("--tenant", default="", help="the tenant the key acts for (not for --admin or --service)")
    create.add_argument("--role", choices=["inference", "developer"], default="inference",
                        help="inference: call models (default); developer: also manage the tenant's models, "
                             "deployments, jobs and inference keys")
    create.add_argument("--service", choices=["router", "worker", "scheduler", "registry"], default="",
                        help="a service's credential (admin only): hand it to that service's --credential-file")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
    create.add_argument("--tpm", type=int, default=0, help="tokens per minute, prompt + completion (0: unlimited)")
    create.add_argument("--max-concurrent", type=int, default=0, help="requests in flight (0: unlimited)")
    create.add_argument("--class", dest="service_class", choices=["interactive", "standard", "batch"], default="",
                        help="its requests' class, and the highest they may ask for (interactive: admin only; "
                             "default standard)")
    create.add_argument("--weight", type=float, default=0.0,
                        help="its requests' weight in fair sharing against other tenants (admin only; default 1)")
    create.add_argument("--models", nargs="+", default=[], metavar="MODEL", help="deployments it may use (default all)")
    create.add_argument("--admin", action="store_true", help="a platform admin key (every tenant, the catalog, keys)")
    lst = action("list", "keys (ids, tenants, limits; never the keys themselves)")
    lst.add_argument("--tenant", default="")
    revoke = action("revoke", "revoke a key by its id (routers refuse it at once)")
    revoke.add_argument("id")


def _admin_token(ns: argparse.Namespace) -> str:
    from maas.cli.main import credential

    return ns.admin_token or credential(ns)


async def run(ns: argparse.Namespace, etcd: str) -> int:
    for flag in ("rpm", "tpm", "max_concurrent"):
        value = getattr(ns, flag, 0)
        if not 0 <= value < 2**32:
            print(f"error: --{flag.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    token = _admin_token(ns)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with mesh_client(ns, etcd) as mesh:
        stub = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        if ns.keys_command == "create":
            created = await stub.CreateKey(registry_pb2.CreateKeyRequest(
                tenant=ns.tenant, rpm=ns.rpm, tpm=ns.tpm, max_concurrent=ns.max_concurrent, models=ns.models,
                weight=ns.weight, service_class=ns.service_class,
                admin=ns.admin, role="" if ns.admin or ns.service else ns.role, service=ns.service),
                metadata=metadata, timeout=10)
            if ns.json:
                print(json.dumps({"key": created.key, **MessageToDict(created.info)}))
            else:
                i = created.info
                whose = f"service {i.service}" if i.service else "the admin" if i.admin else f"tenant {i.tenant}"
                print(f"created {i.role or 'service'} key {i.id} for {whose} ({_limits(i)}); it is shown only now:")
            print(created.key)
        elif ns.keys_command == "list":
            keys = (await stub.ListKeys(registry_pb2.ListKeysRequest(tenant=ns.tenant), metadata=metadata,
                                        timeout=10)).keys
            if ns.json:
                print(json.dumps([MessageToDict(k) for k in keys], indent=2))
            else:
                from maas.cli.commands import _table
                print(_table([[k.id, k.tenant or "-", k.service or k.role or "inference", _limits(k),
                               ",".join(k.models) or "all",
                               datetime.fromtimestamp(k.created_ms / 1000).strftime("%Y-%m-%d %H:%M")]
                              for k in keys], ["id", "tenant", "role", "limits", "models", "created"]))
        else:
            await stub.RevokeKey(registry_pb2.RevokeKeyRequest(id=ns.id), metadata=metadata, timeout=10)
            print(json.dumps({"revoked": ns.id}) if ns.json else f"revoked key {ns.id}")
    return 0


def _limits(k: registry_pb2.ApiKey) -> str:
    parts = [f"{k.rpm} rpm" if k.rpm else "", f"{k.tpm} tpm" if k.tpm else "",
             f"{k.max_concurrent} concurrent" if k.max_concurrent else "",
             f"weight {k.weight:g}" if k.weight and k.weight != 1 else "",
             f"class {k.service_class}" if k.service_class and k.service_class != "standard" else ""]
    return ", ".join(p for p in parts if p) or "unlimited"
