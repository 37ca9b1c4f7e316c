"""Artifacts on an S3-compatible object store (services/registry/s3.py), against a real S3
HTTP server (moto's server mode, a separate process on a free port): multipart uploads,
verified reads, nothing kept from a refused upload, and registries that keep no state of
their own: two share one bucket, and a restarted one still serves what was stored."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from maas.mesh.errors import InvalidArgument, NotFound, StartupError
from maas.services.registry import main as registry_main
from maas.services.registry.blobs import DataLoss
from maas.services.registry.s3 import S3BlobStore
from maas.stack.servers import Child, free_port

from .conftest import MeshHarness
from .test_artifacts import upload

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


async def test_two_registries_share_one_bucket_and_a_restart_loses_nothing(
        mesh: MeshHarness, s3: str, demo_model_dir: Path, tmp_path: Path) -> None:
    """Registries as real processes, each with nothing on disk but the bucket: an artifact
    uploaded through one is served by the other, and by a third started after both were
    stopped."""
    store = f"s3://{BUCKET}/mesh"
    env = {"AWS_ENDPOINT_URL": s3}
    first = mesh.spawn("registry", "--blob-store", store, "--blob-dir", str(tmp_path / "unused-1"), env=env)
    artifact = None
    deadline = time.monotonic() + 60
    while artifact is None:  # until the spawned registry answers
        try:
            artifact = await upload(mesh, demo_model_dir, tmp_path)
        except Exception:
            if time.monotonic() > deadline or not first.alive:
                raise AssertionError(f"registry did not start:\n{first.tail()}") from None
            await asyncio.sleep(0.5)
    second = mesh.spawn("registry", "--blob-store", store, "--blob-dir", str(tmp_path / "unused-2"), env=env)
    first.stop()
    from maas.mesh.clients import MeshClient
    from maas.v1 import registry_pb2, registry_pb2_grpc

    async def download() -> bytes:
        # a client of its own each time: it finds whichever registry is up now
        async with MeshClient(mesh.etcd, mesh.prefix, credential=mesh.admin_token) as client:
            stub = registry_pb2_grpc.RegistryStub(await client.channel("registry"))
            chunks = stub.DownloadArtifact(registry_pb2.DownloadArtifactRequest(sha256=artifact.sha256), timeout=30)
            return b"".join([c.data async for c in chunks])

    for registry in (second, None):
        deadline = time.monotonic() + 60
        while True:
            try:
                data = await download()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        assert hashlib.sha256(data).hexdigest() == artifact.sha256 and len(data) == artifact.size_bytes
        if registry is not None:  # then a fresh registry, after every other one stopped
            registry.stop()
            mesh.spawn("registry", "--blob-store", store, "--blob-dir", str(tmp_path / "unused-3"), env=env)
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir())
                   for d in ("unused-1", "unused-2", "unused-3"))
