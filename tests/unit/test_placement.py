from maas.services.scheduler import placement
from maas.v1 import common_pb2, mesh_pb2, registry_pb2, scheduler_pb2

MiB = 2**20


def worker(wid: str, mem_mib: int, **labels: str) -> mesh_pb2.WorkerInfo:
    return mesh_pb2.WorkerInfo(worker_id=wid, devices=[mesh_pb2.Device(id="cpu", memory_total_bytes=mem_mib * MiB)],
                               labels=labels, formats=["hf", "sim"])


def want(name: str, replicas: int, mem_mib: int = 100, **selector: str) -> placement.Want:
    version = registry_pb2.ModelVersion(name=name, version=1, format="sim",
                                        resources=common_pb2.Resources(memory_bytes=mem_mib * MiB))
    dep = scheduler_pb2.Deployment(name=name, model=name, replicas=replicas, resolved_version=f"{name}@1",
                                   selector=selector)
    return placement.Want(dep, version)


def ids(prefix: str = "r"):
    n = iter(range(10_000))
    return lambda name: f"{name}-{prefix}{next(n)}"


def apply(plan: placement.Plan, assignments: dict) -> dict:
    out = dict(assignments)
    for w, r in plan.remove:
        del out[(w, r)]
    for w, a in plan.add:
        out[(w, a.replica_id)] = a
    return out


def test_places_desired_replicas_spread_across_workers():
    workers = {"w1": worker("w1", 1000), "w2": worker("w2", 1000)}
    plan = placement.plan({"m": want("m", 2)}, workers, {}, new_id=ids())
    assert sorted(w for w, _ in plan.add) == ["w1", "w2"]
    assert not plan.remove and not plan.unplaced


def test_respects_memory_and_reports_why_it_cannot_place():
    plan = placement.plan({"big": want("big", 1, mem_mib=2000)}, {"w1": worker("w1", 1000)}, {}, new_id=ids())
    assert not plan.add
    assert "2.0 GiB free" in plan.unplaced["big"] and "largest free: 1000 MiB" in plan.unplaced["big"]


def test_small_models_share_a_device_until_it_is_full():
    wants = {f"m{i}": want(f"m{i}", 1, mem_mib=300) for i in range(4)}
    plan = placement.plan(wants, {"w1": worker("w1", 1000)}, {}, new_id=ids())
    assert len(plan.add) == 3 and len(plan.unplaced) == 1


def test_replaces_replicas_of_a_vanished_worker():
    workers = {"w1": worker("w1", 1000), "w2": worker("w2", 1000)}
    first = apply(placement.plan({"m": want("m", 1)}, workers, {}, new_id=ids()), {})
    (dead, _), = first
    survivors = {w: i for w, i in workers.items() if w != dead}
    plan = placement.plan({"m": want("m", 1)}, survivors, first, new_id=ids())
    assert [w for w, _ in plan.remove] == [dead]
    assert [w for w, _ in plan.add] == [w for w in survivors]


def test_is_stable_when_nothing_changed_and_scales_down():
    workers = {"w1": worker("w1", 1000), "w2": worker("w2", 1000)}
    state = apply(placement.plan({"m": want("m", 2)}, workers, {}, new_id=ids()), {})
    assert not placement.plan({"m": want("m", 2)}, workers, state, new_id=ids())
    down = placement.plan({"m": want("m", 1)}, workers, state, new_id=ids())
    assert len(down.remove) == 1 and not down.add
    gone = placement.plan({}, workers, state, new_id=ids())
    assert len(gone.remove) == 2


def test_selector_limits_workers():
    workers = {"w1": worker("w1", 1000, gpu="a100"), "w2": worker("w2", 1000, gpu="h100")}
    plan = placement.plan({"m": want("m", 1, gpu="h100")}, workers, {}, new_id=ids())
    assert [w for w, _ in plan.add] == ["w2"]


def test_version_change_keeps_old_replicas_until_new_ones_serve():
    workers = {"w1": worker("w1", 1000), "w2": worker("w2", 1000)}
    state = apply(placement.plan({"m": want("m", 2)}, workers, {}, new_id=ids()), {})
    old_ids = frozenset(a.replica_id for a in state.values())
    w2 = want("m", 2)
    w2.deployment.resolved_version = "m@2"
    w2.version.version = 2
    surge = placement.plan({"m": w2}, workers, state, ready=old_ids, new_id=ids("n"))
    assert not surge.remove and [a.model_version for _, a in surge.add] == [2, 2]
    state = apply(surge, state)
    new_ids = frozenset(a.replica_id for a in state.values() if a.model_version == 2)
    one_ready = placement.plan({"m": w2}, workers, state, ready=old_ids | {sorted(new_ids)[0]}, new_id=ids())
    assert len(one_ready.remove) == 1 and not one_ready.add
    all_ready = placement.plan({"m": w2}, workers, state, ready=old_ids | new_ids, new_id=ids())
    assert {r for _, r in all_ready.remove} == old_ids


def test_avoided_workers_are_a_last_resort_and_held_deployments_wait():
    workers = {"w1": worker("w1", 2000), "w2": worker("w2", 1000)}
    plan = placement.plan({"m": want("m", 1)}, workers, {}, new_id=ids(), avoid={"m": {"w1"}})
    assert [w for w, _ in plan.add] == ["w2"]  # w1 has more room but failed recently
    only = placement.plan({"m": want("m", 1)}, {"w1": workers["w1"]}, {}, new_id=ids(), avoid={"m": {"w1"}})
    assert [w for w, _ in only.add] == ["w1"]  # still better than nothing
    assert not placement.plan({"m": want("m", 1)}, workers, {}, new_id=ids(), hold=frozenset({"m"}))
