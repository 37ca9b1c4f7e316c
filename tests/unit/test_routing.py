"""Replica choice at the router: power of two choices, affinity, bounded load."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from maas.mesh.keys import Keys
from maas.services.router.forward import affinity_key
from maas.services.router.pool import ReplicaPool
from maas.v1 import inference_pb2, mesh_pb2


def pool_with(loads: dict[str, int]) -> tuple[ReplicaPool, list[mesh_pb2.ReplicaInfo]]:
    pool = ReplicaPool(SimpleNamespace(keys=Keys()))  # type: ignore[arg-type]  # nothing here touches etcd
    pool.in_flight.update(loads)
    return pool, [mesh_pb2.ReplicaInfo(replica_id=rid) for rid in loads]


def test_two_choices_never_pick_the_busier_of_two():
    pool, replicas = pool_with({"a": 5, "b": 0})
    assert {pool.choose(replicas).replica_id for _ in range(50)} == {"b"}


def test_load_reports_from_workers_count_other_routers_requests():
    pool, replicas = pool_with({"a": 0, "b": 0})
    pool.observe(mesh_pb2.LoadReport(replicas=[mesh_pb2.ReplicaLoad(replica_id="a", in_flight=9)]))
    assert pool.load("a") == 9
    assert {pool.choose(replicas).replica_id for _ in range(50)} == {"b"}


def test_an_affinity_key_sticks_to_one_replica_and_keys_spread():
    pool, replicas = pool_with({f"r{i}": 0 for i in range(4)})
    for key in ("k1", "k2", "k3"):
        assert len({pool.choose(replicas, key).replica_id for _ in range(20)}) == 1
    spread = Counter(pool.choose(replicas, f"key-{i}").replica_id for i in range(400))
    assert len(spread) == 4 and min(spread.values()) > 50


def test_rendezvous_keeps_a_key_in_place_when_another_replica_goes():
    pool, replicas = pool_with({f"r{i}": 0 for i in range(5)})
    chosen = pool.choose(replicas, "system-prompt").replica_id
    others = [r for r in replicas if r.replica_id != chosen]
    assert pool.choose([r for r in replicas if r is not others[0]], "system-prompt").replica_id == chosen


def test_an_overloaded_affine_replica_is_passed_over():
    pool, replicas = pool_with({f"r{i}": 0 for i in range(3)})
    chosen = pool.choose(replicas, "hot").replica_id
    pool.in_flight[chosen] = 10  # far above the average
    assert pool.choose(replicas, "hot").replica_id != chosen


def test_affinity_keys():
    short = inference_pb2.GenerateRequest(model="m", prompt="hi")
    assert affinity_key(short) == ""
    assert affinity_key(short, session="s1") == "session|s1"
    system = "You are a careful assistant. " * 10
    a = inference_pb2.GenerateRequest(model="m", prompt=system + "question one")
    b = inference_pb2.GenerateRequest(model="m", prompt=system + "another question")
    assert affinity_key(a) == affinity_key(b) != ""  # a shared long prefix: the same key
    lora = inference_pb2.GenerateRequest(model="m", prompt="hi", adapter="m-lora@1")
    assert affinity_key(lora) == "adapter|m|m-lora@1"
