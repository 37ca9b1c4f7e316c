"""`maas registry`: run one registry instance."""

from __future__ import annotations

import argparse

from maas.mesh.config import MeshConfig
from maas.mesh.logs import setup_logging
from maas.mesh.server import ServiceRuntime, run_service
from maas.services.registry.service import RegistryServicer
from maas.services.registry.store import ModelStore
from maas.v1 import registry_pb2, registry_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    MeshConfig.add_arguments(parser)


async def build(rt: ServiceRuntime) -> None:
    """Wire a registry into a runtime (also used by in-process tests)."""
    rt.add_service(registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
                   registry_pb2_grpc.add_RegistryServicer_to_server,
                   RegistryServicer(ModelStore(rt.etcd), rt.events))
    await rt.start()


def main(ns: argparse.Namespace) -> int:
    config = MeshConfig.from_args("registry", ns)
    setup_logging(config.log_level, json_output=config.log_json, name="registry")

    async def serve() -> None:
        async with ServiceRuntime(config) as rt:
            await build(rt)
            await rt.wait()

    return run_service(serve)
