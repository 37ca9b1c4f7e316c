"""Credentials an operator hands a deployment (compose, Kubernetes): `maas admin init-secrets`
makes them, the registry installs their hashes at start, and a changed key replaces its
kind's old one (rotation) while a restarted registry keeps the admin token working."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

from maas.mesh.auth import new_key
from maas.mesh.clients import dial
from maas.mesh.server import ServiceRuntime
from maas.services.registry import main as registry_main
from maas.services.registry.apikeys import write_secrets
from maas.v1 import registry_pb2, registry_pb2_grpc

from .conftest import MeshHarness, eventually


async def _registry(mesh: MeshHarness, secrets: Path, prefix: str) -> ServiceRuntime:
    own = secrets / "registry.key"
    rt = ServiceRuntime(dataclasses.replace(mesh.config("registry"), prefix=prefix,
                                            credential=own.read_text().strip() if own.exists() else ""))
    mesh.runtimes.append(rt)
    await registry_main.build(rt, mesh.tmp / "blobs", admin_token=(secrets / "admin-token").read_text().strip(),
                              service_keys_dir=secrets)
    return rt


async def _list_models(endpoint: str, key: str) -> grpc.StatusCode:
    async with dial(endpoint, key) as channel:
        try:
            await registry_pb2_grpc.RegistryStub(channel).GetVersion(
                registry_pb2.GetVersionRequest(ref="nothing"), timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def test_init_secrets_then_the_registry_installs_and_rotates_them(mesh: MeshHarness, tmp_path: Path) -> None:
    secrets = tmp_path / "creds"
    made = write_secrets(secrets)
    assert sorted(made) == ["admin-token", "registry.key", "router.key", "scheduler.key", "worker.key"]
    assert all((secrets / name).stat().st_mode & 0o077 == 0 for name in made), "owner-only files"
    assert write_secrets(secrets) == [], "a second run keeps what is there"

    prefix = mesh.prefix.rstrip("/") + "-deployed/"  # a mesh of its own: the harness keeps its keys
    rt = await _registry(mesh, secrets, prefix)
    router_key = (secrets / "router.key").read_text().strip()
    # the router's key is known (GetVersion is a router's call): NOT_FOUND, not UNAUTHENTICATED
    assert await _list_models(rt.endpoint, router_key) == grpc.StatusCode.NOT_FOUND
    assert await _list_models(rt.endpoint, new_key()[0]) == grpc.StatusCode.UNAUTHENTICATED

    # rotation: a new router key in the directory, the registry restarted
    (secrets / "router.key").write_text(new_key()[0] + "\n")
    await rt.stop()
    rt = await _registry(mesh, secrets, prefix)
    rotated = (secrets / "router.key").read_text().strip()
    assert await _list_models(rt.endpoint, rotated) == grpc.StatusCode.NOT_FOUND
    await eventually(lambda: _unauthenticated(rt.endpoint, router_key), timeout=10)


async def _unauthenticated(endpoint: str, key: str) -> bool:
    return await _list_models(endpoint, key) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_registry_pointed_at_an_empty_directory_refuses_to_start(mesh: MeshHarness, tmp_path: Path) -> None:
    from maas.mesh.errors import StartupError

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "admin-token").write_text("x" * 40)
    with pytest.raises(StartupError, match="holds no <kind>.key"):
        await _registry(mesh, empty, mesh.prefix.rstrip("/") + "-empty/")
