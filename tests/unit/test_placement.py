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


def gpu_worker(wid: str, devices: int, mem_mib: int) -> mesh_pb2.WorkerInfo:
    return mesh_pb2.WorkerInfo(worker_id=wid, formats=["sim"], devices=[
        mesh_pb2.Device(id=f"cuda:{i}", memory_total_bytes=mem_mib * MiB) for i in range(devices)])


def used_devices(assignments: dict) -> int:
    return len({(w, d) for (w, _), a in assignments.items() for d in a.device_ids})


def test_best_fit_decreasing_packs_mixed_sizes_onto_few_devices():
    # 600+400, 700+300, 500+500 fit exactly on three 1000 MiB devices; worst-fit or
    # first-come order would need four or more
    sizes = [300, 400, 500, 500, 600, 700]
    wants = {f"m{i}": want(f"m{i}", 1, mem_mib=s) for i, s in enumerate(sizes)}
    plan = placement.plan(wants, {"w1": gpu_worker("w1", 6, 1000)}, {}, new_id=ids())
    assert not plan.unplaced
    assert used_devices(apply(plan, {})) == 3


def test_a_small_model_fills_a_gap_instead_of_opening_a_device():
    workers = {"w1": gpu_worker("w1", 2, 1000)}
    placed = apply(placement.plan({"big": want("big", 1, mem_mib=800)}, workers, {}, new_id=ids()), {})
    plan = placement.plan({"big": want("big", 1, mem_mib=800), "small": want("small", 1, mem_mib=150)},
                          workers, placed, new_id=ids("s"))
    (_, a), = plan.add
    assert a.device_ids == list(next(iter(placed.values())).device_ids)


def test_a_replica_spanning_devices_gets_them_on_one_worker():
    version = registry_pb2.ModelVersion(name="tp", version=1, format="sim",
                                        resources=common_pb2.Resources(memory_bytes=1600 * MiB, devices=2))
    dep = scheduler_pb2.Deployment(name="tp", replicas=2, resolved_version="tp@1")
    workers = {"w1": gpu_worker("w1", 2, 1000), "w2": gpu_worker("w2", 4, 1000)}
    plan = placement.plan({"tp": placement.Want(dep, version)}, workers, {}, new_id=ids())
    assert sorted(w for w, _ in plan.add) == ["w1", "w2"]  # spread across workers
    for _, a in plan.add:
        assert len(set(a.device_ids)) == 2 and a.memory_bytes == 800 * MiB
    plan = placement.plan({"tp": placement.Want(dep, version)}, {"w1": gpu_worker("w1", 1, 4000)}, {}, new_id=ids())
    assert "2 devices with 800 MiB free each" in plan.unplaced["tp"]


def autoscaled(name: str, replicas: int, mem_mib: int, min_replicas: int = 0) -> placement.Want:
    w = want(name, replicas, mem_mib=mem_mib)
    w.deployment.autoscale.min_replicas = min_replicas
    w.deployment.autoscale.max_replicas = 4
    return w


def test_a_full_device_evicts_the_least_recently_used_idle_replica():
    workers = {"w1": worker("w1", 1000)}
    wants = {"old": autoscaled("old", 1, 400), "recent": autoscaled("recent", 1, 400)}
    placed = apply(placement.plan(wants, workers, {}, new_id=ids()), {})
    rid = {a.deployment: a.replica_id for a in placed.values()}
    wants["new"] = want("new", 1, mem_mib=400)
    idle = {rid["old"]: 100.0, rid["recent"]: 200.0}

    plan = placement.plan(wants, workers, placed, idle=idle, new_id=ids("n"))
    assert plan.remove == [("w1", rid["old"])] and plan.evicted == [("w1", rid["old"], "new")]
    assert plan.scale == {"old": 0}
    assert [a.deployment for _, a in plan.add] == ["new"]

    # a replica that is busy (not idle) or whose deployment is at its minimum stays
    plan = placement.plan(wants, workers, placed, idle={rid["recent"]: 200.0}, new_id=ids("n"))
    assert plan.evicted == [("w1", rid["recent"], "new")]
    wants["old"], wants["recent"] = autoscaled("old", 1, 400, min_replicas=1), autoscaled("recent", 1, 400, 1)
    plan = placement.plan(wants, workers, placed, idle=idle, new_id=ids("n"))
    assert not plan.evicted and not plan.add and "new" in plan.unplaced


def test_fixed_size_deployments_are_never_evicted():
    workers = {"w1": worker("w1", 1000)}
    wants = {"pinned": want("pinned", 1, mem_mib=800)}
    placed = apply(placement.plan(wants, workers, {}, new_id=ids()), {})
    wants["new"] = want("new", 1, mem_mib=400)
    plan = placement.plan(wants, workers, placed, idle={a.replica_id: 0.0 for a in placed.values()}, new_id=ids())
    assert not plan.evicted and "new" in plan.unplaced


def test_a_canary_that_fits_is_placed_when_its_stable_version_does_not():
    stable = registry_pb2.ModelVersion(name="m", version=1, format="sim",
                                       resources=common_pb2.Resources(memory_bytes=2 * 600 * MiB, devices=2))
    canary = registry_pb2.ModelVersion(name="m", version=2, format="sim",
                                       resources=common_pb2.Resources(memory_bytes=900 * MiB))
    dep = scheduler_pb2.Deployment(name="m", replicas=1, resolved_version="m@1",
                                   traffic=[scheduler_pb2.TrafficSplit(model="m@2", weight=10)])
    plan = placement.plan({"m": placement.Want(dep, stable, canary)}, {"w1": gpu_worker("w1", 1, 1000)}, {},
                          new_id=ids())
    assert [a.model_version for _, a in plan.add] == [2] and "m" in plan.unplaced


def test_eviction_never_takes_a_deployment_below_its_minimum_or_one_still_placing():
    workers = {"w1": worker("w1", 1000)}
    # "short" wants 2 replicas (min 1) but has only one placed: that one is not evictable
    wants = {"short": autoscaled("short", 1, 600, min_replicas=1)}
    placed = apply(placement.plan(wants, workers, {}, new_id=ids()), {})
    wants["short"] = autoscaled("short", 2, 600, min_replicas=1)
    wants["new"] = want("new", 1, mem_mib=600)
    plan = placement.plan(wants, workers, placed, idle={a.replica_id: 0.0 for a in placed.values()}, new_id=ids("n"))
    assert not plan.evicted and not plan.add


def test_scaling_down_drops_loading_then_idle_replicas_before_busy_ones():
    workers = {f"w{i}": worker(f"w{i}", 1000) for i in range(3)}
    placed = apply(placement.plan({"m": want("m", 3)}, workers, {}, new_id=ids()), {})
    loading, idle_one, busy = sorted(a.replica_id for a in placed.values())
    ready = frozenset({idle_one, busy})
    plan = placement.plan({"m": want("m", 2)}, workers, placed, ready, idle={idle_one: 0.0}, new_id=ids())
    assert [r for _, r in plan.remove] == [loading]
    plan = placement.plan({"m": want("m", 1)}, workers, placed, ready, idle={idle_one: 0.0}, new_id=ids())
    assert sorted(r for _, r in plan.remove) == sorted([loading, idle_one])
