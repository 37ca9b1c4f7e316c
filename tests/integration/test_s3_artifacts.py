"""Artifacts on an S3-compatible object store (services/registry/s3.py), against a real S3
HTTP server (moto's server mode, a separate process on a free port): multipart uploads,
verified reads (a running registry refuses a corrupted object with DATA_LOSS), nothing kept
from a refused upload, and registries that keep no state of their own: two serve one bucket
at the same time, and a restarted one still serves what was stored."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from maas.mesh.artifacts import pack_directory
from maas.mesh.clients import dial, live_services, upload_file
from maas.mesh.errors import InvalidArgument, NotFound, StartupError
from maas.services.registry import main as registry_main
from maas.services.registry.blobs import DataLoss
from maas.services.registry.s3 import S3BlobStore
from maas.stack.servers import Child, free_port
from maas.v1 import registry_pb2, registry_pb2_grpc

from .conftest import MeshHarness

pytest.importorskip("moto", reason="moto[server] is a dev dependency (pip install -e '.[dev]')")
BUCKET = "maas-artifacts"


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on a free port, with one bucket; its URL. boto3 finds it through
    the standard AWS variables, as a registry in production would find its store."""
    port = free_port()
    server = Child("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                   tmp_path / "moto.log").start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or not server.alive:
                raise AssertionError(f"moto did not start:\n{server.tail()}") from None
            time.sleep(0.2)
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(name, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


def _put(store: S3BlobStore, data: bytes, claim: str = "") -> tuple[str, int]:
    writer = store.writer()
    for i in range(0, len(data), 100_000):
        writer.write(data[i:i + 100_000])
    return writer.commit(claim)


def _keys(store: S3BlobStore) -> list[str]:
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_blobs_round_trip_small_and_multipart_and_are_verified(s3: str) -> None:
    store = S3BlobStore.from_url(f"s3://{BUCKET}/team-a/")
    store.part_bytes = 5 * 1024 * 1024  # S3's smallest part: a 12 MiB blob is 3 parts
    store.check()
    small, large = b"hello artifacts", os.urandom(12 * 1024 * 1024 + 7)
    for data in (small, large):
        sha, size = _put(store, data, hashlib.sha256(data).hexdigest())
        assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
        assert store.size(sha) == size
        assert b"".join(store.read(sha)) == data
    assert all(k.startswith("team-a/blobs/") for k in _keys(store))  # no upload left behind
    assert not store.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")

    # a blob whose bytes changed in the bucket is refused at the end of the read
    sha = hashlib.sha256(small).hexdigest()
    store.client.put_object(Bucket=BUCKET, Key=store.key(sha), Body=b"tampered")
    with pytest.raises(DataLoss, match="corrupted"):
        b"".join(store.read(sha))
    assert store.delete(sha) == len(b"tampered")
    with pytest.raises(NotFound):
        store.size(sha)
    with pytest.raises(NotFound):
        list(store.read(sha))


def test_a_refused_upload_keeps_nothing(s3: str) -> None:
    store = S3BlobStore.from_url(f"s3://{BUCKET}/x")
    store.part_bytes = 5 * 1024 * 1024
    for data in (b"small", os.urandom(6 * 1024 * 1024)):
        with pytest.raises(InvalidArgument, match="nothing was stored"):
            _put(store, data, "0" * 64)
    assert _keys(store) == []
    assert not store.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def test_an_unreachable_or_missing_bucket_stops_the_registry_with_its_name(s3: str) -> None:
    with pytest.raises(StartupError, match="s3://no-such-bucket/"):
        registry_main.blob_store("", "s3://no-such-bucket")
    with pytest.raises(StartupError, match="no bucket"):
        registry_main.blob_store("", "s3://")


def _spawn_registry(mesh: MeshHarness, store: str, s3: str, blob_dir: Path) -> Child:
    """A registry as a real process whose artifacts are in `store`; `blob_dir` is its local
    directory, which it must leave empty."""
    return mesh.spawn("registry", "--blob-store", store, "--blob-dir", str(blob_dir), env={"AWS_ENDPOINT_URL": s3})


async def _registries(mesh: MeshHarness, children: list[Child]) -> list[registry_pb2_grpc.RegistryStub]:
    """A stub for each of `children`, once all of them are registered and answer (each on
    its own channel, so a call goes to that registry and no other)."""
    client = await mesh.client()
    deadline = time.monotonic() + 60
    while True:
        for child in children:
            assert child.alive, f"{child.name} stopped:\n{child.tail()}"
        endpoints = sorted({info.endpoint for info in await live_services(client.etcd, client.keys, "registry")})
        if len(endpoints) == len(children):
            stubs = [registry_pb2_grpc.RegistryStub(dial(e, mesh.admin_token)) for e in endpoints]
            try:
                for stub in stubs:
                    await stub.ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=5)
                return stubs
            except grpc.aio.AioRpcError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(children)} registries did not start:\n" + "\n".join(c.tail() for c in children))
        await asyncio.sleep(0.3)


async def _upload(stub: registry_pb2_grpc.RegistryStub, directory: Path, tmp: Path) -> registry_pb2.Artifact:
    digest = pack_directory(directory, tmp / "artifact.tar")
    return await upload_file(stub, tmp / "artifact.tar", digest=digest, timeout=60)


async def _download(stub: registry_pb2_grpc.RegistryStub, sha: str) -> bytes:
    call = stub.DownloadArtifact(registry_pb2.DownloadArtifactRequest(sha256=sha), timeout=30)
    return b"".join([c.data async for c in call])


async def test_two_registries_serve_one_bucket_at_once_and_a_restart_loses_nothing(
        mesh: MeshHarness, s3: str, demo_model_dir: Path, tmp_path: Path) -> None:
    """Registries as real processes, each with nothing on disk but the bucket: while both
    run, what is uploaded through one is downloaded through the other (both ways); a third,
    started after both stopped, still serves it."""
    store = f"s3://{BUCKET}/mesh"
    children = [_spawn_registry(mesh, store, s3, tmp_path / f"unused-{i}") for i in (1, 2)]
    one, other = await _registries(mesh, children)
    artifacts = []
    for source, target, directory in ((one, other, demo_model_dir), (other, one, tmp_path / "second")):
        if directory.name == "second":  # another artifact, uploaded through the other registry
            shutil.copytree(demo_model_dir, directory)
            (directory / "README.md").write_text("a second artifact\n")
        artifact = await _upload(source, directory, tmp_path)
        data = await _download(target, artifact.sha256)
        assert hashlib.sha256(data).hexdigest() == artifact.sha256 and len(data) == artifact.size_bytes
        artifacts.append(artifact)
    assert all(c.alive for c in children), "both registries served at the same time"
    assert artifacts[0].sha256 != artifacts[1].sha256

    for child in children:
        child.stop()
    [fresh] = await _registries(mesh, [_spawn_registry(mesh, store, s3, tmp_path / "unused-3")])
    for artifact in artifacts:
        data = await _download(fresh, artifact.sha256)
        assert hashlib.sha256(data).hexdigest() == artifact.sha256
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir())
                   for d in ("unused-1", "unused-2", "unused-3"))


async def test_a_running_registry_refuses_a_corrupted_object_with_data_loss(
        mesh: MeshHarness, s3: str, demo_model_dir: Path, tmp_path: Path) -> None:
    """One byte of a stored artifact changed in the bucket behind the registry's back (same
    size): a download through the registry's gRPC API ends with DATA_LOSS naming the
    artifact and what to do, not with the wrong bytes passed as good."""
    import boto3

    [stub] = await _registries(mesh, [_spawn_registry(mesh, f"s3://{BUCKET}/mesh", s3, tmp_path / "unused")])
    artifact = await _upload(stub, demo_model_dir, tmp_path)
    key = S3BlobStore(BUCKET, "mesh/", client=boto3.client("s3")).key(artifact.sha256)
    bucket = boto3.client("s3")
    data = bytearray(bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    bucket.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _download(stub, artifact.sha256)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS, refused.value
    message = refused.value.details() or ""
    assert f"artifact {artifact.sha256} is corrupted" in message and "re-upload it" in message, message
