"""Faults a user meets: a worker killed mid-stream, etcd unreachable or restarted, a port
already taken, a scheduler leader dying, SIGTERM while serving."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

from maas.mesh.config import MeshConfig
from maas.mesh.discovery import PrefixMirror
from maas.mesh.etcd import EtcdSession, LeaderElection
from maas.mesh.server import ServiceRuntime
from maas.services.registry import main as registry_main
from maas.stack.servers import free_port, start_etcd
from maas.v1 import common_pb2, inference_pb2, mesh_pb2, scheduler_pb2

from .conftest import MeshHarness, eventually, read_rest


async def _where(mesh: MeshHarness, name: str) -> set[str]:
    st = await (await mesh.stub("scheduler")).GetDeployment(scheduler_pb2.GetDeploymentRequest(name=name), timeout=5)
    return {r.worker_id for r in st.replicas if r.state == mesh_pb2.REPLICA_STATE_READY}


async def test_worker_killed_while_serving_is_replaced_without_restarting_anything(mesh: MeshHarness):
    await mesh.core()
    w1 = mesh.spawn("worker", "--instance", "w1", "--cpu-memory-gib", "2")
    w2 = mesh.spawn("worker", "--instance", "w2", "--cpu-memory-gib", "2")
    await mesh.register("echo", token_delay_ms="20")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo", timeout=60)
    (host,) = await _where(mesh, "echo")
    victim, survivor = (w1, "w2") if host == "w1" else (w2, "w1")

    stub = await mesh.stub("router")
    call = stub.GenerateStream(inference_pb2.GenerateRequest(
        model="echo", prompt="long", params=common_pb2.SamplingParams(max_tokens=500)), timeout=60)
    first = await call.read()
    victim.signal(signal.SIGKILL)
    # no other replica: the router waits for the scheduler to place one on the survivor, and
    # the stream continues there
    rest = await read_rest(call)
    assert rest[-1].usage.completion_tokens == 500  # type: ignore[attr-defined]
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 500  # type: ignore[attr-defined]
    assert rest[-1].replica_id != first.replica_id  # type: ignore[attr-defined]

    started = time.monotonic()
    await eventually(lambda: _ready_on(mesh, survivor), timeout=20)
    healed = time.monotonic() - started
    chunks = await mesh.generate("echo", "after", max_tokens=3)
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].replica_id
    assert healed < 15, f"re-placement took {healed:.1f}s"


async def _ready_on(mesh: MeshHarness, worker: str) -> bool:
    return await _where(mesh, "echo") == {worker}


def _run_cli(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "maas", *args], capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def test_etcd_unreachable_at_start_fails_fast_with_a_clear_error(nats_url: str):
    dead = f"http://127.0.0.1:{free_port()}"
    result, took = _run_cli("registry", "--etcd", dead, "--nats", nats_url, "--metrics-port", "-1")
    assert result.returncode != 0
    assert f"cannot reach etcd at {dead}" in result.stderr
    assert "Traceback" not in result.stderr
    assert took < 15


def test_taken_port_is_named_in_the_error(etcd_url: str, nats_url: str):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result, _ = _run_cli("router", "--port", str(port), "--etcd", etcd_url, "--nats", nats_url,
                             "--metrics-port", "-1")
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr


async def test_worker_drains_in_flight_streams_on_sigterm(mesh: MeshHarness):
    await mesh.core()
    worker = mesh.spawn("worker", "--cpu-memory-gib", "2", "--grace", "20")
    await mesh.register("echo", token_delay_ms="30")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo", timeout=60)
    stub = await mesh.stub("router")
    call = stub.GenerateStream(inference_pb2.GenerateRequest(
        model="echo", prompt="drain", params=common_pb2.SamplingParams(max_tokens=40)), timeout=15)
    first = await call.read()
    worker.signal(signal.SIGTERM)
    rest = await read_rest(call)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 40
    assert await asyncio.to_thread(worker.wait, 20) and worker.proc.returncode == 0


async def test_lost_lease_re_registers_and_watches_survive_an_etcd_restart(tmp_path, nats_url: str):
    port, peer = free_port(), free_port()
    etcd, url = start_etcd(tmp_path / "etcd", port=port, peer_port=peer)
    rt = ServiceRuntime(MeshConfig(kind="registry", etcd=url, nats=nats_url, lease_ttl=2, metrics_port=-1))
    try:
        await registry_main.build(rt, tmp_path / "blobs")
        key = rt.etcd.keys.service("registry", rt.config.instance)
        services = PrefixMirror(rt.etcd, rt.etcd.keys.services(), mesh_pb2.ServiceInfo)
        await services.start()
        assert f"registry/{rt.config.instance}" in services.items

        # the lease expires behind the process's back: it re-registers under a new lease
        old_lease = rt.etcd.lease_id
        await rt.etcd.client.revoke_lease(old_lease)
        await eventually(lambda: rt.etcd.lease_id != old_lease and rt.etcd.get(key), timeout=10)

        # etcd goes away and comes back (it restores leases from its data dir, so the key itself
        # survives): keepalive carries on and the mirror's watch resumes and sees new changes
        etcd.stop()
        await asyncio.sleep(0.5)
        etcd, _ = start_etcd(tmp_path / "etcd", port=port, peer_port=peer)
        await eventually(lambda: rt.etcd.get(key), timeout=15)
        await rt.etcd.client.put(rt.etcd.keys.service("router", "probe"),
                                 mesh_pb2.ServiceInfo(kind="router", instance="probe").SerializeToString())
        await eventually(lambda: "router/probe" in services.items, timeout=15)
        await services.close()
    finally:
        await rt.stop()
        etcd.stop()


async def test_scheduler_standby_takes_over_when_the_leader_dies(mesh: MeshHarness):
    await mesh.registry()
    first = await mesh.scheduler()
    second = await mesh.scheduler()
    await mesh.router()
    await mesh.worker()
    await mesh.register("echo", token_delay_ms="1")
    await mesh.deploy("echo")
    await mesh.wait_ready("echo")
    etcd, key = first.etcd.client, first.etcd.keys.election("scheduler")
    info = mesh_pb2.LeaderInfo.FromString((await etcd.get(key)).value)
    dying, standby = (first, second) if info.instance == first.config.instance else (second, first)
    await dying.stop()
    mesh.runtimes.remove(dying)
    await mesh.reset_client()  # its cached channel points at the stopped scheduler

    async def new_leader() -> bool:
        got = await standby.etcd.client.get(key)
        return got is not None and mesh_pb2.LeaderInfo.FromString(got.value).instance == standby.config.instance

    await eventually(new_leader, timeout=10)
    await mesh.register("second", token_delay_ms="1")
    await mesh.deploy("second")
    await mesh.wait_ready("second")
    assert (await mesh.generate("second", max_tokens=2))[-1].usage.completion_tokens == 2


async def test_a_deposed_leader_cannot_write(mesh: MeshHarness):
    """A leader whose lease expired while it was paused must not write once another leads."""
    a, b = EtcdSession(mesh.config("scheduler")), EtcdSession(mesh.config("scheduler"))
    await a.start()
    await b.start()
    try:
        first = LeaderElection(a, "fence-test", b"a")
        await first.campaign()
        second = LeaderElection(b, "fence-test", b"b")
        standby = asyncio.create_task(second.campaign())
        await asyncio.sleep(0.2)
        assert not standby.done()
        await a.client.revoke_lease(a.lease_id)  # the lease expires behind the leader's back
        await asyncio.wait_for(standby, 10)
        probe, tx = a.keys.deployment("fenced"), a.client.transactions
        assert not await first.fenced_txn([tx.put(probe, b"stale")])
        assert await a.get(probe) is None
        assert await second.fenced_txn([tx.put(probe, b"fresh")])
        assert await a.get(probe) == b"fresh"
    finally:
        await a.close()
        await b.close()
