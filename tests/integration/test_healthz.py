"""`/healthz` on the metrics port: the answer of a service's own gRPC health check, made
through its port as a client would, TLS included. Kubernetes probes it (deploy/k8s): its
native `grpc` probes speak plaintext only and cannot check a port that serves TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.error
import urllib.request
from pathlib import Path

from maas.mesh.config import MeshConfig
from maas.mesh.server import ServiceRuntime
from maas.mesh.tls import TlsFiles, issue, make_ca
from maas.services.registry import main as registry_main

from .conftest import MeshHarness


async def get(rt: ServiceRuntime, path: str) -> tuple[int, str]:
    """GET from the service's metrics port, off the event loop (the service answers on it)."""
    port = rt.metrics_endpoint.rsplit(":", 1)[1]

    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
    return await asyncio.to_thread(fetch)


async def test_healthz_reports_grpc_health_over_tls_with_a_cluster_certificate(mesh: MeshHarness,
                                                                             tmp_path: Path) -> None:
    # as in Kubernetes: bound on every interface, a certificate for the pods' DNS names only
    ca_dir = tmp_path / "tls"
    make_ca(ca_dir)
    cert, key = issue(ca_dir, "mesh", ["*.maas-mesh.maas.svc", "router.maas.svc"])
    tls = TlsFiles(ca=(ca_dir / "ca.pem").read_bytes(), cert=cert.read_bytes(), key=key.read_bytes())
    config: MeshConfig = dataclasses.replace(mesh.config("registry", host="0.0.0.0", metrics_port=0), tls=tls)
    rt = ServiceRuntime(config)
    mesh.runtimes.append(rt)
    await registry_main.build(rt, tmp_path / "blobs", admin_token=mesh.admin_token)

    assert await get(rt, "/healthz") == (200, "SERVING\n")
    status, metrics = await get(rt, "/metrics")
    assert status == 200 and "maas_etcd_up" in metrics

    await rt.health.enter_graceful_shutdown()  # what stop() does first
    assert await get(rt, "/healthz") == (503, "NOT_SERVING\n")
    await rt.stop()
    status, _ = await get(rt, "/healthz")
    assert status == 503


async def test_healthz_without_tls_and_when_the_server_does_not_answer(mesh: MeshHarness, tmp_path: Path) -> None:
    rt = ServiceRuntime(mesh.config("registry", metrics_port=0))
    mesh.runtimes.append(rt)
    await registry_main.build(rt, tmp_path / "blobs", admin_token=mesh.admin_token)
    assert await get(rt, "/healthz") == (200, "SERVING\n")

    assert rt.probe is not None
    rt.probe.timeout = 0.5
    await rt.server.stop(None)  # the gRPC port no longer answers: the probe fails, not hangs
    status, body = await get(rt, "/healthz")
    assert status == 503 and body.strip() in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
