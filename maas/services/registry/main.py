"""`maas registry`: run one registry instance."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from maas.mesh.auth import ADMIN_TOKEN_ENV
from maas.mesh.authz import ADMIN
from maas.mesh.config import MeshConfig
from maas.mesh.errors import StartupError
from maas.mesh.logs import setup_logging
from maas.mesh.server import ServiceRuntime, run_service
from maas.services.registry.apikeys import KeyStore, install_admin_token, install_service_keys
from maas.services.registry.blobs import BlobStore, LocalBlobStore
from maas.services.registry.files import FilesServicer
from maas.services.registry.s3 import S3BlobStore
from maas.services.registry.service import RegistryServicer
from maas.services.registry.store import ModelStore
from maas.v1 import batches_pb2, batches_pb2_grpc, registry_pb2, registry_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    MeshConfig.add_arguments(parser)
    parser.add_argument("--blob-dir", default=os.environ.get("MAAS_BLOB_DIR", ".maas/blobs"),
                        help="where uploaded artifacts are stored, unless --blob-store says otherwise "
                             "(env MAAS_BLOB_DIR; one registry only: replicas do not share it)")
    parser.add_argument("--blob-store", default=os.environ.get("MAAS_BLOB_STORE", ""),
                        help="s3://BUCKET[/PREFIX]: keep artifacts in an S3-compatible object store, shared by "
                             "every registry replica (credentials and region from the AWS_* variables; env "
                             "MAAS_BLOB_STORE)")
    parser.add_argument("--s3-endpoint", default="",
                        help="the S3 API's URL for a store other than AWS (MinIO, Ceph, GCS interoperability); "
                             "else AWS_ENDPOINT_URL, else AWS")
    parser.add_argument("--admin-token-file", default="",
                        help=f"file holding the platform admin's credential (else env {ADMIN_TOKEN_ENV}); the "
                             "registry installs it at start, replacing the previous one (rotation)")
    parser.add_argument("--service-keys-dir", default=os.environ.get("MAAS_SERVICE_KEYS_DIR", ""),
                        help="directory of the services' keys (router.key, worker.key, scheduler.key, registry.key; "
                             "`maas admin init-secrets` makes them): the registry installs their records at start, "
                             "each replacing its kind's previous key (env MAAS_SERVICE_KEYS_DIR)")


def blob_store(blob_dir: str, url: str = "", endpoint: str = "") -> BlobStore:
    """The artifact store the flags name: an S3 bucket (`s3://...`), else a local directory."""
    if not url:
        return LocalBlobStore(Path(blob_dir))
    try:
        store = S3BlobStore.from_url(url, endpoint_url=endpoint or None)
    except ValueError as e:
        raise StartupError(f"--blob-store: {e}") from None
    store.check()
    return store


async def build(rt: ServiceRuntime, blobs: Path | BlobStore, *, admin_token: str = "",
                service_keys_dir: Path | None = None) -> None:
    """Wire a registry into a runtime (also used by in-process tests); `blobs`: a directory
    or a store."""
    if isinstance(blobs, Path):
        blobs = LocalBlobStore(blobs)
    store = ModelStore(rt.etcd, blobs)
    rt.add_service(registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
                   registry_pb2_grpc.add_RegistryServicer_to_server,
                   RegistryServicer(store, blobs, rt.events, KeyStore(rt.etcd)))
    rt.add_service(batches_pb2.DESCRIPTOR.services_by_name["Files"].full_name,
                   batches_pb2_grpc.add_FilesServicer_to_server, FilesServicer(rt.etcd, blobs, store, rt.events))
    if admin_token:
        rt.authorizer.trust(admin_token, ADMIN)
    await rt.start()
    if admin_token:
        await install_admin_token(rt.etcd.client, rt.etcd.keys, admin_token)
    if service_keys_dir is not None:
        kinds = await install_service_keys(rt.etcd.client, rt.etcd.keys, service_keys_dir)
        if not kinds:
            raise StartupError(f"--service-keys-dir {service_keys_dir} holds no <kind>.key file "
                               "(make them with `maas admin init-secrets DIR`)")


def main(ns: argparse.Namespace) -> int:
    config = MeshConfig.from_args("registry", ns)
    setup_logging(config.log_level, json_output=config.log_json, name="registry", instance=config.instance)

    admin_token = os.environ.get(ADMIN_TOKEN_ENV, "")
    if ns.admin_token_file:
        try:
            admin_token = Path(ns.admin_token_file).read_text().strip()
        except OSError as e:
            print(f"error: cannot read --admin-token-file: {e}", file=sys.stderr)
            return 2

    async def serve() -> None:
        async with ServiceRuntime(config) as rt:
            blobs = await asyncio.to_thread(blob_store, ns.blob_dir, ns.blob_store, ns.s3_endpoint)
            await build(rt, blobs, admin_token=admin_token,
                        service_keys_dir=Path(ns.service_keys_dir) if ns.service_keys_dir else None)
            await rt.wait()

    return run_service(serve)
