"""The services as the images run them: registry, scheduler, router and a worker as real
processes that cannot import torch or anything else outside the control plane's
dependencies (tests/unit/test_control_plane_without_torch.py makes that interpreter). They
serve a sim model end to end; the worker offers the scheduler sim models only and says which
extra would serve the rest."""

from __future__ import annotations

from pathlib import Path

from maas.services.worker.extra import INSTALL_WORKER_EXTRA
from maas.v1 import scheduler_pb2
from tests.unit.test_control_plane_without_torch import without_worker_extra

from .conftest import MeshHarness, eventually


async def test_services_without_the_worker_extra_serve_a_sim_model(mesh: MeshHarness, tmp_path: Path):
    env = without_worker_extra(tmp_path / "site")
    children = [
        mesh.spawn("registry", "--blob-dir", str(tmp_path / "blobs"), env=env),
        mesh.spawn("scheduler", env=env),
        mesh.spawn("router", "--port", "0", "--http-port", "0", env=env),
        mesh.spawn("worker", "--instance", "slim", "--cpu-memory-gib", "2", env=env),
    ]

    async def started(call: object) -> object:
        dead = [c.name for c in children if not c.alive]
        assert not dead, "\n".join(f"{c.name} exited:\n{c.tail()}" for c in children if not c.alive)
        return await call  # type: ignore[misc]

    await eventually(lambda: started(mesh.register("echo")), timeout=60)
    await eventually(lambda: started(mesh.deploy("echo")), timeout=60)
    await mesh.wait_ready("echo", timeout=60)
    chunks = await eventually(lambda: started(mesh.generate("echo", "hello without torch")), timeout=30)
    assert "".join(c.text for c in chunks).strip()  # type: ignore[attr-defined]

    scheduler = await mesh.stub("scheduler")
    listing = await scheduler.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=10)  # type: ignore[attr-defined]
    assert [list(w.worker.formats) for w in listing.workers] == [["sim"]]
    assert INSTALL_WORKER_EXTRA in children[3].tail(200)  # its warning: the blocker was in force
    assert all(c.alive for c in children), "\n".join(c.tail() for c in children)
