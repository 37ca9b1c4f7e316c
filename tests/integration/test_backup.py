"""`maas admin backup` / `maas admin restore`: a logical snapshot of the durable etcd keys plus
the artifact manifest, restored into a wiped (or another) prefix of a running etcd."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import json
import sys
from pathlib import Path

import pytest

from maas.cli.main import main
from maas.mesh.server import ServiceRuntime
from maas.services.registry import main as registry_main
from maas.v1 import registry_pb2, scheduler_pb2

from .conftest import MeshHarness, eventually
from .test_artifacts import upload


async def cli(mesh: MeshHarness, capsys: pytest.CaptureFixture[str], *args: str,
              prefix: str = "") -> tuple[int, str, str]:
    """Run `maas ARGS` in-process (in a thread: the CLI runs its own event loop)."""
    capsys.readouterr()
    try:
        rc = await asyncio.to_thread(main, [*args, "--etcd", mesh.etcd, "--prefix", prefix or mesh.prefix])
    except SystemExit as e:  # what the interpreter does with it in a real `maas` process
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def model_dir(tmp: Path) -> Path:
    d = tmp / "model"
    d.mkdir(exist_ok=True)
    (d / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (d / "config.json").write_text("{}")
    return d


async def registered(mesh: MeshHarness, prefix: str = "") -> list[str]:
    pairs = await (await mesh.client()).etcd.get_prefix(f"{prefix or mesh.prefix}registry/".encode())
    return [kv.key.decode() for kv in pairs]


async def test_backup_wipe_restore_and_serve_again(mesh: MeshHarness, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    await mesh.core()
    worker = await mesh.worker()
    reg = await mesh.stub("registry")
    artifact = await upload(mesh, model_dir(tmp_path), tmp_path)
    await reg.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="shipped", format="sim", source=f"artifact:{artifact.sha256}"), timeout=10)
    await mesh.register("plain")
    await mesh.register("plain")
    await reg.SetAlias(registry_pb2.SetAliasRequest(name="plain", alias="prod", version=1),  # type: ignore[attr-defined]
                       timeout=10)
    await reg.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="tuned", format="sim", base="shipped@1"), timeout=10)
    await mesh.deploy("shipped")
    first = (await mesh.wait_ready("shipped")).replicas[0].replica_id

    backup = tmp_path / "mesh.backup"
    rc, out, err = await cli(mesh, capsys, "admin", "backup", str(backup))
    assert rc == 0, err
    assert "3 models, 4 versions (1 adapter), 1 alias, 1 deployment" in out and "1 artifact" in out, out
    doc = json.loads(gzip.decompress(backup.read_bytes()))
    assert doc["format"] == "maas-backup/1" and doc["prefix"] == mesh.prefix and doc["etcd_revision"] > 0
    keys = {k["key"] for k in doc["keys"]}
    assert "registry/models/plain" in keys and "deployments/shipped" in keys
    # neither leased membership nor the scheduler's placement is in a backup
    assert not [k for k in keys if k.split("/")[0] in ("services", "workers", "replicas", "election", "assignments")]
    assert doc["artifacts"] == [{"digest": artifact.sha256, "size": artifact.size_bytes, "used_by": ["shipped@1"]}]

    # etcd loses everything under the prefix (and the leases: every process re-registers)
    etcd = (await mesh.client()).etcd
    await etcd.delete_prefix(mesh.prefix.encode())
    for rt in mesh.runtimes:
        await rt.etcd.client.revoke_lease(rt.etcd.lease_id)

    async def registry_back() -> bool:  # re-registered under a new lease
        return bool(list(await etcd.get_prefix(f"{mesh.prefix}services/registry/".encode())))

    await eventually(registry_back)
    assert await registered(mesh) == []
    await eventually(lambda: not worker.replicas)  # its assignment is gone: the replica is unloaded

    rc, out, err = await cli(mesh, capsys, "admin", "restore", str(backup))
    assert rc == 0, err
    assert "restored 3 models, 4 versions (1 adapter), 1 alias, 1 deployment" in out and "1 artifact verified" in out

    plain = await reg.GetModel(registry_pb2.GetModelRequest(name="plain"), timeout=5)  # type: ignore[attr-defined]
    assert plain.latest_version == 2 and dict(plain.aliases) == {"prod": 1}
    tuned = await reg.GetVersion(registry_pb2.GetVersionRequest(ref="tuned"), timeout=5)  # type: ignore[attr-defined]
    assert tuned.base == "shipped@1"
    again = await mesh.register("plain")  # numbering goes on where it was
    assert again.version == 3
    sched = await mesh.stub("scheduler")
    dep = await sched.GetDeployment(scheduler_pb2.GetDeploymentRequest(name="shipped"), timeout=5)  # type: ignore[attr-defined]
    assert dep.deployment.resolved_version == "shipped@1"
    st = await mesh.wait_ready("shipped")  # placed again by the scheduler, as a new replica
    assert [r.replica_id for r in st.replicas] != [first]
    chunks = await mesh.generate("shipped", max_tokens=3)
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].replica_id != first


async def test_restore_refuses_a_non_empty_prefix_without_force_and_damaged_files(
        mesh: MeshHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    await mesh.registry()
    await mesh.register("m")
    backup = tmp_path / "b.backup"
    rc, out, err = await cli(mesh, capsys, "admin", "backup", str(backup), "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["counts"]["models"] == 1 and summary["counts"]["versions"] == 1 and summary["bytes"] > 0

    rc, out, err = await cli(mesh, capsys, "admin", "restore", str(backup))
    assert rc == 1 and "FAILED_PRECONDITION" in err and "--force" in err and "Traceback" not in err

    # --force overwrites the backup's keys, but never lowers a model's latest version below
    # one that still exists (so version 2 is never handed out twice)
    await mesh.register("m")
    rc, out, err = await cli(mesh, capsys, "admin", "restore", str(backup), "--force", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["overwritten"] == 2 and result["latestKept"] == ["m"]
    reg = await mesh.stub("registry")
    model = await reg.GetModel(registry_pb2.GetModelRequest(name="m"), timeout=5)  # type: ignore[attr-defined]
    assert model.latest_version == 2

    data = backup.read_bytes()
    cut = tmp_path / "cut.backup"
    cut.write_bytes(data[: len(data) // 2])
    rc, _, err = await cli(mesh, capsys, "admin", "restore", str(cut), "--force")
    assert rc == 1 and "DATA_LOSS" in err and "truncated" in err and "Traceback" not in err

    doc = json.loads(gzip.decompress(data))
    doc["keys"][0]["value"] = base64.b64encode(b"tampered").decode()
    edited = tmp_path / "edited.backup"
    edited.write_bytes(gzip.compress(json.dumps(doc).encode()))
    rc, _, err = await cli(mesh, capsys, "admin", "restore", str(edited), "--force")
    assert rc == 1 and "DATA_LOSS" in err and "modified or corrupted" in err

    other = tmp_path / "notes.txt"
    other.write_text("not a backup")
    rc, _, err = await cli(mesh, capsys, "admin", "restore", str(other), "--force")
    assert rc == 1 and "INVALID_ARGUMENT" in err and "not a maas backup" in err
    rc, _, err = await cli(mesh, capsys, "admin", "restore", str(tmp_path / "absent.backup"))
    assert rc == 1 and "cannot read" in err and "Traceback" not in err
    assert (await reg.GetModel(registry_pb2.GetModelRequest(name="m"), timeout=5)).latest_version == 2  # type: ignore[attr-defined]


async def test_restore_under_another_prefix_verifies_artifacts_first(mesh: MeshHarness, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]):
    await mesh.registry()
    reg = await mesh.stub("registry")
    artifact = await upload(mesh, model_dir(tmp_path), tmp_path)
    await reg.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="shipped", format="sim", source=f"artifact:{artifact.sha256}"), timeout=10)
    chunks = [c async for c in reg.Backup(registry_pb2.BackupRequest(), timeout=10)]  # type: ignore[attr-defined]
    data = b"".join(c.data for c in chunks)
    assert chunks[0].counts.artifacts == 1 and chunks[0].total_bytes == len(data)
    backup = tmp_path / "b.backup"
    backup.write_bytes(data)

    # a second mesh (another prefix, the same etcd) whose registry has an empty blob store
    copy = mesh.prefix.rstrip("/") + "-copy/"
    rt = ServiceRuntime(dataclasses.replace(mesh.config("registry"), prefix=copy))
    mesh.runtimes.append(rt)
    blobs = tmp_path / "blobs-copy"
    await registry_main.build(rt, blobs, admin_token=mesh.admin_token)  # the same operator

    rc, _, err = await cli(mesh, capsys, "admin", "restore", str(backup), prefix=copy)
    assert rc == 1 and "FAILED_PRECONDITION" in err and artifact.sha256 in err and "shipped@1" in err, err
    assert "missing" in err and "nothing was restored" in err
    assert await registered(mesh, copy) == []

    stored = mesh.tmp / "blobs" / artifact.sha256[:2] / artifact.sha256
    rotten = bytearray(stored.read_bytes())
    rotten[10] ^= 0xFF
    (blobs / artifact.sha256[:2]).mkdir()
    (blobs / artifact.sha256[:2] / artifact.sha256).write_bytes(bytes(rotten))
    rc, _, err = await cli(mesh, capsys, "admin", "restore", str(backup), prefix=copy)
    assert rc == 1 and "corrupt" in err and artifact.sha256 in err, err
    assert await registered(mesh, copy) == []

    (blobs / artifact.sha256[:2] / artifact.sha256).write_bytes(stored.read_bytes())
    rc, out, err = await cli(mesh, capsys, "admin", "restore", str(backup), prefix=copy)
    assert rc == 0, err
    assert f"into {copy} from a backup of {mesh.prefix}" in out and "1 artifact verified" in out
    assert f"{copy}registry/models/shipped" in await registered(mesh, copy)


async def test_missing_artifacts_can_be_allowed(mesh: MeshHarness, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]):
    await mesh.registry()
    reg = await mesh.stub("registry")
    artifact = await upload(mesh, model_dir(tmp_path), tmp_path)
    await reg.RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore[attr-defined]
        name="shipped", format="sim", source=f"artifact:{artifact.sha256}"), timeout=10)
    backup = tmp_path / "b.backup"
    rc, _, err = await cli(mesh, capsys, "admin", "backup", str(backup))
    assert rc == 0, err
    (mesh.tmp / "blobs" / artifact.sha256[:2] / artifact.sha256).unlink()
    await (await mesh.client()).etcd.delete_prefix(f"{mesh.prefix}registry/".encode())

    rc, out, err = await cli(mesh, capsys, "admin", "restore", str(backup), "--allow-missing-artifacts")
    assert rc == 0, err
    assert "0 artifacts verified" in out and f"warning: artifact {artifact.sha256} is missing" in err
    version = await reg.GetVersion(registry_pb2.GetVersionRequest(ref="shipped"), timeout=5)  # type: ignore[attr-defined]
    assert version.source == f"artifact:{artifact.sha256}"
