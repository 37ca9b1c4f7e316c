"""`maas router`: the front door (gRPC Inference on 127.0.0.1:50051 by default)."""

from __future__ import annotations

import argparse

from maas.mesh.config import MeshConfig
from maas.mesh.logs import setup_logging
from maas.mesh.server import ServiceRuntime, run_service
from maas.services.router.forward import Forwarder
from maas.services.router.pool import COLD_START_SECONDS, ReplicaPool
from maas.services.router.service import RouterInferenceServicer
from maas.services.router.tenants import AUTH_MODES, Gate
from maas.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_PORT = 50051


def add_arguments(parser: argparse.ArgumentParser) -> None:
    MeshConfig.add_arguments(parser, default_port=DEFAULT_PORT)
    parser.add_argument("--cold-start-timeout", type=float, default=COLD_START_SECONDS,
                        help="seconds a request waits for a model scaled to zero to load")
    parser.add_argument("--auth", choices=AUTH_MODES, default="auto",
                        help="API keys: required, off, or auto (required once any key exists; default)")


async def build(rt: ServiceRuntime, *, cold_start_timeout: float = COLD_START_SECONDS,
                auth: str = "auto") -> ReplicaPool:
    """Wire a router into a runtime (also used by in-process tests)."""
    pool = ReplicaPool(rt.etcd, cold_start_timeout=cold_start_timeout)
    gate = Gate(rt.etcd, auth)
    forwarder = Forwarder(pool, gate)
    rt.add_service(inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                   inference_pb2_grpc.add_InferenceServicer_to_server, RouterInferenceServicer(forwarder))
    rt.add_closer(pool.close)
    rt.add_closer(gate.close)
    await rt.start()
    await pool.start()
    await gate.start()
    await rt.events.subscribe_load(pool.observe)
    return pool


def main(ns: argparse.Namespace) -> int:
    config = MeshConfig.from_args("router", ns)
    setup_logging(config.log_level, json_output=config.log_json, name="router")

    async def serve() -> None:
        async with ServiceRuntime(config) as rt:
            await build(rt, cold_start_timeout=ns.cold_start_timeout, auth=ns.auth)
            await rt.wait()

    return run_service(serve)
