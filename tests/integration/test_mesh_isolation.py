"""Two meshes on one NATS server, each under its own etcd prefix, see none of each other's
traffic there: load, prefix-cache and pipeline reports, lifecycle events (as `read_events`
and `maas events` read them), pipeline captures and batch answers. Both use the same names
(worker, deployment, tenant, pipeline, batch id), as two copies of one mesh would."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from maas.cli.main import main
from maas.mesh.batches import Answer, Answers
from maas.mesh.captures import CaptureStore
from maas.mesh.config import MeshConfig
from maas.mesh.events import EventBus, read_events
from maas.v1 import mesh_pb2

from .conftest import eventually


@pytest.fixture
async def buses(nats_url: str) -> AsyncIterator[tuple[EventBus, EventBus]]:
    """The event buses of worker "w1" of mesh /m…/ and of mesh /m…/two/ (a prefix inside the
    other's: still another mesh)."""
    first = f"/m{uuid.uuid4().hex[:8]}/"
    made: list[EventBus] = []
    try:
        for prefix in (first, f"{first}two/"):
            bus = EventBus(MeshConfig(kind="worker", instance="w1", nats=nats_url, prefix=prefix, metrics_port=-1))
            made.append(bus)
            await bus.start()
        yield made[0], made[1]
    finally:
        for bus in made:
            await bus.close()


async def test_load_kv_and_pipeline_reports_reach_only_their_own_mesh(buses: tuple[EventBus, EventBus]):
    seen: dict[int, list[tuple[str, int]]] = {}
    for mesh, bus in enumerate(buses, 1):
        got = seen[mesh] = []
        await bus.subscribe_load(lambda r, got=got: got.append(("load", r.in_flight)))
        await bus.subscribe_kv(lambda r, got=got: got.append(("kv", r.seq)))
        await bus.subscribe_pipeline(lambda r, got=got: got.append(("pipeline", r.versions[0].objectives[0].requests)))

    async def report(mesh: int) -> None:  # each figure says whose report it is
        bus = buses[mesh - 1]
        await bus.publish_load(mesh_pb2.LoadReport(worker_id="w1", in_flight=mesh))
        await bus.publish_kv(mesh_pb2.KvEvents(worker_id="w1", replica_id="chat-0", seq=mesh))
        pipeline = mesh_pb2.PipelineReport(router="w1")
        pipeline.versions.add(deployment="chat", version="chat@1").objectives.add(step="", requests=mesh)
        await bus.publish_pipeline(pipeline)
        assert bus.nc is not None
        await bus.nc.flush()  # the server has routed them before the next mesh publishes

    # Each subscription gets messages in the order the server routed them: once a mesh has
    # its own reports, it would have had the other mesh's sent before them.
    await report(2)
    await report(1)
    await report(2)
    own = [("load", 1), ("kv", 1), ("pipeline", 1)]
    await eventually(lambda: len(seen[1]) >= 3 and len(seen[2]) >= 6)
    assert sorted(seen[1]) == sorted(own)
    assert sorted(seen[2]) == sorted([(kind, 2) for kind, _ in own] * 2)


async def test_events_are_read_back_only_by_their_own_mesh(buses: tuple[EventBus, EventBus],
                                                           capsys: pytest.CaptureFixture[str]):
    for mesh, bus in enumerate(buses, 1):
        bus.publish("deployment", "created", "chat", f"mesh {mesh}")

    async def read(bus: EventBus, **kw: str) -> list[str]:
        return [e.message async for e in read_events(bus.config.nats, bus.config.prefix, follow=False, **kw)]

    async def both_stored() -> bool:
        return all([await read(bus) for bus in buses])

    await eventually(both_stored)
    for mesh, bus in enumerate(buses, 1):
        assert await read(bus) == [f"mesh {mesh}"]
        assert await read(bus, entity="deployment") == [f"mesh {mesh}"]
        assert await read(bus, entity="deployment", what="created") == [f"mesh {mesh}"]

        capsys.readouterr()
        rc = await asyncio.to_thread(main, ["events", "--json", "--nats", bus.config.nats, "--prefix", bus.config.prefix])
        out = capsys.readouterr().out
        assert rc == 0 and [json.loads(line)["message"] for line in out.splitlines()] == [f"mesh {mesh}"], out


async def test_captures_and_batch_answers_are_each_meshs_own(buses: tuple[EventBus, EventBus]):
    captures = [CaptureStore(bus) for bus in buses]
    for mesh, store in enumerate(captures, 1):
        store.save("acme", "bot", {"version": "bot@1", "mesh": mesh, "steps": []})
        await store.close()  # stored
    for mesh, store in enumerate(captures, 1):
        assert [c["mesh"] for c in await store.read("acme", "bot", "bot@1", 10)] == [mesh]

    # the same batch id in both (a backup restored under the second prefix holds the first's batches)
    answers = [Answers(bus) for bus in buses]
    for mesh, store in enumerate(answers, 1):
        await store.put("batch_0123", Answer(0, True, json.dumps({"mesh": mesh}).encode()))

    async def lines(store: Answers) -> list[object]:
        return [json.loads(a.line)["mesh"] async for a in store.scan("batch_0123")]

    assert [await lines(store) for store in answers] == [[1], [2]]
    await answers[1].purge("batch_0123")
    assert [await lines(store) for store in answers] == [[1], []]
