"""Artifacts: uploaded in chunks, stored by sha256, fetched by workers without a shared
filesystem, verified on write and on load; versions in use cannot be deleted."""

from __future__ import annotations

import asyncio
import filecmp
import sys
from pathlib import Path

import grpc
import pytest

from maas.mesh.artifacts import pack_directory
from maas.v1 import registry_pb2

from .conftest import MeshHarness, eventually


async def upload(mesh: MeshHarness, directory: Path, tmp: Path, *, claim: str = "") -> registry_pb2.Artifact:
    sha, size = pack_directory(directory, tmp / "a.tar")
    data = (tmp / "a.tar").read_bytes()
    chunks = [registry_pb2.ArtifactChunk(data=data[i:i + 65536]) for i in range(0, size, 65536)]
    chunks[0].sha256, chunks[0].total_bytes = claim or sha, size
    stub = await mesh.stub("registry")

    async def stream():  # type: ignore[no-untyped-def]
        for c in chunks:
            yield c

    return await stub.UploadArtifact(stream(), timeout=30)


async def test_an_uploaded_model_is_fetched_by_the_worker_and_served(mesh: MeshHarness, demo_model_dir: Path,
                                                                     tmp_path: Path):
    await mesh.core()
    worker = await mesh.worker()
    artifact = await upload(mesh, demo_model_dir, tmp_path)
    reg = await mesh.stub("registry")
    version = await reg.RegisterModel(registry_pb2.RegisterModelRequest(
        name="shipped", format="hf", source=f"artifact:{artifact.sha256}"), timeout=10)
    assert version.resources.memory_bytes > artifact.size_bytes
    await mesh.deploy("shipped")
    await mesh.wait_ready("shipped", timeout=60)
    chunks = await mesh.generate("shipped", "def add(a, b):", max_tokens=5, temperature=0)
    assert chunks[-1].usage.completion_tokens == 5
    fetched = worker.artifacts.root / artifact.sha256
    assert (fetched / "config.json").is_file()
    assert filecmp.cmp(fetched / "model.safetensors", demo_model_dir / "model.safetensors", shallow=False)

    # a version in use cannot be deleted; the error names the deployment
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reg.DeleteVersion(registry_pb2.DeleteVersionRequest(name="shipped", version=1), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'shipped'" in err.value.details()


async def test_an_upload_that_does_not_match_its_digest_is_refused(mesh: MeshHarness, demo_model_dir: Path,
                                                                   tmp_path: Path):
    await mesh.registry()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(mesh, demo_model_dir, tmp_path, claim="0" * 64)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nothing was stored" in err.value.details()
    assert not [p for p in (mesh.tmp / "blobs").rglob("*") if p.is_file()]


async def test_a_corrupted_artifact_is_refused_and_nothing_is_loaded(mesh: MeshHarness, demo_model_dir: Path,
                                                                     tmp_path: Path):
    await mesh.core()
    worker = await mesh.worker()
    artifact = await upload(mesh, demo_model_dir, tmp_path)
    blob = mesh.tmp / "blobs" / artifact.sha256[:2] / artifact.sha256
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit on the registry's disk
    blob.write_bytes(bytes(data))
    reg = await mesh.stub("registry")
    await reg.RegisterModel(registry_pb2.RegisterModelRequest(
        name="rotten", format="hf", source=f"artifact:{artifact.sha256}"), timeout=10)
    await mesh.deploy("rotten")
    sched = await mesh.stub("scheduler")
    from maas.v1 import scheduler_pb2

    async def failed() -> str:
        st = await sched.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="rotten"), timeout=5)
        return st.message if "corrupted" in st.message else ""

    message = await eventually(failed, timeout=30)
    assert artifact.sha256 in str(message)
    assert not (worker.artifacts.root / artifact.sha256).exists()


async def test_cli_upload_download_and_delete(mesh: MeshHarness, demo_model_dir: Path, tmp_path: Path):
    await mesh.core()

    async def maas(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "maas", *args, "--etcd", mesh.etcd, "--prefix", mesh.prefix,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    rc, out, err = await maas("models", "upload", "tiny", str(demo_model_dir))
    assert rc == 0, err
    assert "registered tiny@1" in out and "artifact:" in out and "uploading" in err  # progress bar on stderr
    rc, out, err = await maas("models", "download", "tiny@1", str(tmp_path / "copy"))
    assert rc == 0, err
    assert not filecmp.dircmp(demo_model_dir, tmp_path / "copy").diff_files
    rc, out, _ = await maas("models", "show", "tiny")
    assert rc == 0 and "artifact:" in out
    rc, _, err = await maas("models", "delete", "tiny@1")
    assert rc == 0, err
    rc, _, err = await maas("models", "delete", "tiny@1")
    assert rc == 1 and "NOT_FOUND" in err and "Traceback" not in err
