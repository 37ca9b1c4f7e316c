"""`maas admin`: operator commands (backup and restore of the mesh's durable state).

The work is done by the registry (`Registry.Backup` / `Registry.Restore`, see
maas/services/registry/backup.py); these commands stream the file to and from it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from maas.cli.main import mesh_client
from maas.mesh.artifacts import CHUNK
from maas.v1 import registry_pb2, registry_pb2_grpc

TIMEOUT = 3600.0


def add_parser(sub: argparse._SubParsersAction, client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    admin = sub.add_parser("admin", help="operator commands: backup, restore, credentials for a deployment")
    asub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    backup = asub.add_parser("backup", help="write the registry, deployments and artifact manifest to FILE",
                             description="Write a point-in-time backup of the mesh's durable etcd keys (models, "
                                         "versions, aliases, deployments) and the manifest of the artifacts they "
                                         "use to FILE. Artifact bytes are not copied: back up the registry's blob "
                                         "store as well.")
    client_args(backup)
    backup.add_argument("file")
    restore = asub.add_parser("restore", help="restore a backup written by `maas admin backup`",
                              description="Write a backup's keys under --prefix. Refused if the prefix already "
                                          "holds registry or deployment keys (unless --force), or if an artifact "
                                          "of the manifest is missing from the registry's blob store or does not "
                                          "verify (unless --allow-missing-artifacts); then nothing is written.")
    client_args(restore)
    restore.add_argument("file")
    restore.add_argument("--force", action="store_true",
                         help="restore into a prefix that already holds registry or deployment keys, overwriting "
                              "the keys the backup holds (other keys are kept)")
    restore.add_argument("--allow-missing-artifacts", action="store_true",
                         help="restore even if artifacts are missing or corrupt (their versions will not load)")
    secrets = asub.add_parser(
        "init-secrets", help="make the admin token and the services' keys in DIR (keeps those already there)",
        description="Write DIR/admin-token and DIR/<kind>.key for router, worker, scheduler and registry "
                    "(owner-only; files already there are kept). Give the registry --admin-token-file "
                    "DIR/admin-token and --service-keys-dir DIR (it installs their hashes in etcd), and each "
                    "service --credential-file DIR/<kind>.key; in Kubernetes, `kubectl create secret generic "
                    "maas-credentials --from-file=DIR` (the deploy/k8s package mounts it). `maas up` does "
                    "this by itself.")
    secrets.add_argument("dir")
    targets = asub.add_parser(
        "scrape-targets", help="the live services' metrics endpoints, as a Prometheus file_sd target file",
        description="Write the /metrics endpoint of every live service (from etcd) as Prometheus file-based "
                    "service discovery JSON: one group per service, labelled job=maas-<kind>, service and "
                    "service_instance. Point a scrape job's file_sd_configs at FILE (deploy/monitoring/"
                    "prometheus.yml does) and run this again, or with --every, as services come and go. In "
                    "Kubernetes use the ServiceMonitor instead.")
    client_args(targets)
    targets.add_argument("-o", "--output", default="-", help="file to write (default: standard output)")
    targets.add_argument("--every", type=float, default=0.0,
                         help="rewrite FILE every this many seconds until interrupted (0: once)")


async def run(ns: argparse.Namespace, etcd: str) -> int:
    if ns.admin_command == "init-secrets":
        from maas.services.registry.apikeys import write_secrets

        made = write_secrets(Path(ns.dir))
        print(f"{ns.dir}: made {', '.join(made)}" if made else f"{ns.dir}: every credential was there already; kept")
        return 0
    if ns.admin_command == "backup":
        return await backup(ns, etcd)
    if ns.admin_command == "scrape-targets":
        return await scrape_targets(ns, etcd)
    return await restore(ns, etcd)


async def scrape_targets(ns: argparse.Namespace, etcd: str) -> int:
    from maas.mesh.clients import live_services

    async with mesh_client(ns, etcd) as mesh:
        while True:
            groups = []
            for kind in ("router", "worker", "registry", "scheduler"):
                for info in await live_services(mesh.etcd, mesh.keys, kind):
                    if info.metrics_endpoint:
                        groups.append({"targets": [info.metrics_endpoint], "labels": {
                            "job": f"maas-{kind}", "service": kind, "service_instance": info.instance}})
            text = json.dumps(groups, indent=2) + "\n"
            if ns.output == "-":
                sys.stdout.write(text)
            else:  # whole or not at all: Prometheus may read it at any moment
                partial = Path(ns.output).with_name(f".{Path(ns.output).name}.part")
                partial.write_text(text)
                os.replace(partial, ns.output)
            if ns.every <= 0:
                return 0
            await asyncio.sleep(ns.every)


def _n(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 'es' if what.endswith('s') else 's'}"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _what(c: registry_pb2.BackupCounts) -> str:
    adapters = f" ({_n(c.adapters, 'adapter')})" if c.adapters else ""
    return (f"{_n(c.models, 'model')}, {_n(c.versions, 'version')}{adapters}, {_n(c.aliases, 'alias')}, "
            f"{_n(c.deployments, 'deployment')} ({_n(c.keys, 'key')})")


async def backup(ns: argparse.Namespace, etcd: str) -> int:
    path = Path(ns.file)
    if path.is_dir():
        raise SystemExit(f"error: {path} is a directory; give the backup file's name")
    if not path.parent.is_dir():
        raise SystemExit(f"error: cannot write {path}: directory {path.parent} does not exist")
    partial = path.with_name(f".{path.name}.part")
    async with mesh_client(ns, etcd) as mesh:
        stub = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        first: registry_pb2.BackupChunk | None = None
        digest, size = hashlib.sha256(), 0
        try:
            with open(partial, "wb") as f, tqdm(unit="B", unit_scale=True, desc=f"backup {path.name}",
                                                file=sys.stderr) as bar:
                async for chunk in stub.Backup(registry_pb2.BackupRequest(), timeout=TIMEOUT):
                    if first is None:
                        first, bar.total = chunk, chunk.total_bytes
                    digest.update(chunk.data)
                    f.write(chunk.data)
                    size += len(chunk.data)
                    bar.update(len(chunk.data))
            if first is None or digest.hexdigest() != first.sha256 or size != first.total_bytes:
                raise SystemExit(f"error: the backup arrived damaged ({size} bytes hashing to {digest.hexdigest()}, "
                                 f"expected {first.total_bytes if first else '?'} bytes); {path} was not written")
            os.replace(partial, path)
        except OSError as e:
            raise SystemExit(f"error: cannot write {path}: {e.strerror or e}") from None
        finally:
            with contextlib.suppress(OSError):
                partial.unlink()
    assert first is not None  # checked above
    c = first.counts
    if ns.json:
        print(json.dumps({"file": str(path), "bytes": size, "sha256": first.sha256, "format": first.format,
                          "etcdRevision": first.etcd_revision, "prefix": first.prefix,
                          "counts": MessageToDict(c, always_print_fields_with_no_presence=True),
                          "missingArtifacts": list(first.missing_artifacts)}, indent=2))
    else:
        print(f"backed up {_what(c)} at etcd revision {first.etcd_revision} of {first.prefix}, and a manifest of "
              f"{_n(c.artifacts, 'artifact')} ({_bytes(c.artifact_bytes)}, kept in the blob store), "
              f"to {path}: {_bytes(size)}")
    for sha in first.missing_artifacts:
        print(f"warning: artifact {sha} is referenced but missing from the registry's blob store", file=sys.stderr)
    return 0


async def restore(ns: argparse.Namespace, etcd: str) -> int:
    path = Path(ns.file)
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror or e}") from None
    async with mesh_client(ns, etcd) as mesh:
        stub = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        with tqdm(total=len(data), unit="B", unit_scale=True, desc=f"restore {path.name}", file=sys.stderr) as bar:
            async def chunks() -> AsyncIterator[registry_pb2.RestoreChunk]:
                for i in range(0, max(len(data), 1), CHUNK):
                    piece = data[i:i + CHUNK]
                    bar.update(len(piece))
                    if i == 0:
                        yield registry_pb2.RestoreChunk(data=piece, force=ns.force, total_bytes=len(data),
                                                        allow_missing_artifacts=ns.allow_missing_artifacts)
                    else:
                        yield registry_pb2.RestoreChunk(data=piece)

            r = await stub.Restore(chunks(), timeout=TIMEOUT)
    if ns.json:
        print(json.dumps(MessageToDict(r, always_print_fields_with_no_presence=True), indent=2))
    else:
        taken = datetime.fromtimestamp(r.backup_created_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
        overwritten = f", {_n(r.overwritten, 'existing key')} overwritten" if ns.force else ""
        print(f"restored {_what(r.counts)} into {r.prefix} from a backup of {r.backup_prefix} at etcd revision "
              f"{r.backup_revision} ({taken}); {_n(r.artifacts_verified, 'artifact')} verified{overwritten}")
    for m in r.missing_artifacts:
        print(f"warning: artifact {m.sha256} is {m.problem} (used by {', '.join(m.used_by)}): those versions "
              "will not load until it is uploaded again", file=sys.stderr)
    for name in r.latest_kept:
        print(f"note: model {name} keeps a latest version above the backup's: this prefix still holds higher "
              "version numbers", file=sys.stderr)
    return 0
