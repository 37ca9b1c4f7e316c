"""`maas registry`: run one registry instance."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from maas.mesh.config import MeshConfig
from maas.mesh.logs import setup_logging
from maas.mesh.server import ServiceRuntime, run_service
from maas.services.registry.blobs import LocalBlobStore
from maas.services.registry.service import RegistryServicer
from maas.services.registry.store import ModelStore
from maas.v1 import registry_pb2, registry_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    MeshConfig.add_arguments(parser)
    parser.add_argument("--blob-dir", default=os.environ.get("MAAS_BLOB_DIR", ".maas/blobs"),
                        help="where uploaded artifacts are stored (env MAAS_BLOB_DIR)")


async def build(rt: ServiceRuntime, blob_dir: Path) -> None:
    """Wire a registry into a runtime (also used by in-process tests)."""
    blobs = LocalBlobStore(blob_dir)
    rt.add_service(registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
                   registry_pb2_grpc.add_RegistryServicer_to_server,
                   RegistryServicer(ModelStore(rt.etcd, blobs), blobs, rt.events))
    await rt.start()


def main(ns: argparse.Namespace) -> int:
    config = MeshConfig.from_args("registry", ns)
    setup_logging(config.log_level, json_output=config.log_json, name="registry")

    async def serve() -> None:
        async with ServiceRuntime(config) as rt:
            await build(rt, Path(ns.blob_dir))
            await rt.wait()

    return run_service(serve)
