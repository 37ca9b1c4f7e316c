"""Placement of fine-tuning jobs (pure policy): serving first, then jobs by priority,
per-tenant limits, and a running job asked to yield when a replica needs its device."""

from maas.services.scheduler import placement
from maas.services.scheduler.placement import JobWant
from maas.v1 import mesh_pb2
from tests.unit.test_placement import MiB, ids, want, worker


def queued(job_id: str, mem_mib: int = 200, priority: int = 0, created: int = 0, tenant: str = "t") -> JobWant:
    return JobWant(job_id, mem_mib * MiB, priority, created, tenant)


def running(job_id: str, worker_id: str, mem_mib: int = 200, priority: int = 0, tenant: str = "t",
            yielding: bool = False) -> JobWant:
    return JobWant(job_id, mem_mib * MiB, priority, 0, tenant, (worker_id, "cpu"), yielding)


def test_queued_jobs_start_by_priority_then_age_on_what_serving_leaves():
    workers = {"w1": worker("w1", 500)}
    jobs = [queued("old-low", created=1), queued("new-high", priority=5, created=3), queued("mid-low", created=2)]
    plan = placement.plan({"m": want("m", 1, mem_mib=100)}, workers, {}, new_id=ids(), jobs=jobs)
    assert [w for w, _ in plan.add] == ["w1"]  # the replica first
    assert [(j, slot) for j, slot, _ in plan.start_jobs] == [("new-high", ("w1", "cpu")), ("old-low", ("w1", "cpu"))]


def test_a_job_that_does_not_fit_holds_back_the_lower_priority_ones_but_an_impossible_one_does_not():
    workers = {"w1": worker("w1", 500)}
    jobs = [running("r", "w1", mem_mib=300), queued("big", mem_mib=400, priority=9), queued("small", mem_mib=100)]
    assert placement.plan({}, workers, {}, jobs=jobs).start_jobs == []  # "small" waits behind "big"
    jobs[1] = queued("huge", mem_mib=4000, priority=9)  # larger than any device: it waits alone
    assert [j for j, _, _ in placement.plan({}, workers, {}, jobs=jobs).start_jobs] == ["small"]


def test_a_tenant_runs_at_most_its_share_of_jobs_at_once():
    workers = {"w1": worker("w1", 2000)}
    jobs = [running("a1", "w1", tenant="a"), queued("a2", tenant="a", created=1), queued("b1", tenant="b", created=2)]
    plan = placement.plan({}, workers, {}, jobs=jobs, max_running_jobs_per_tenant=1)
    assert [j for j, _, _ in plan.start_jobs] == ["b1"]


def test_a_replica_with_no_room_makes_the_lowest_priority_job_yield_and_waits_for_it():
    workers = {"w1": worker("w1", 500)}
    jobs = [running("keep", "w1", priority=5), running("go", "w1", priority=1), queued("next", mem_mib=50)]
    plan = placement.plan({"m": want("m", 1, mem_mib=150)}, workers, {}, new_id=ids(), jobs=jobs)
    assert plan.preempt == [("go", "m")]
    assert not plan.add and "go" in plan.unplaced["m"]  # placed once the job is gone
    assert plan.start_jobs == []  # nothing starts while a job yields its device
    # next pass: the job is still yielding; it is not asked twice and the replica still waits
    jobs[1] = running("go", "w1", priority=1, yielding=True)
    again = placement.plan({"m": want("m", 1, mem_mib=150)}, workers, {}, new_id=ids(), jobs=jobs)
    assert again.preempt == [] and not again.add and again.start_jobs == []
    # it stopped: the replica is placed; "go", queued again, no longer fits beside it, and
    # "next" (priority 0) does not overtake it
    after = placement.plan({"m": want("m", 1, mem_mib=150)}, workers, {}, new_id=ids(),
                           jobs=[jobs[0], queued("go", priority=1), jobs[2]])
    assert [w for w, _ in after.add] == ["w1"] and after.start_jobs == []


def test_training_never_displaces_a_replica_that_fits():
    workers = {"w1": worker("w1", 500), "w2": worker("w2", 500)}
    jobs = [running("j", "w1", mem_mib=450)]
    plan = placement.plan({"m": want("m", 1, mem_mib=100)}, workers, {}, new_id=ids(), jobs=jobs)
    assert [w for w, _ in plan.add] == ["w2"] and plan.preempt == []


def devices(wid: str, *mem_mib: int) -> mesh_pb2.WorkerInfo:
    """A worker with one device a size (cpu:0, cpu:1, ...)."""
    return mesh_pb2.WorkerInfo(worker_id=wid, formats=["hf", "sim"], devices=[
        mesh_pb2.Device(id=f"cpu:{i}", memory_total_bytes=m * MiB) for i, m in enumerate(mem_mib)])


def test_a_job_on_several_devices_takes_that_many_of_one_worker_and_holds_them_all():
    workers = {"w1": devices("w1", 500, 150), "w2": devices("w2", 300, 300)}
    multi = JobWant("multi", 200 * MiB, 0, 1, "t", devices=2)
    plan = placement.plan({}, workers, {}, jobs=[multi])
    assert plan.start_jobs == [("multi", ("w2", "cpu:0"), 200 * MiB)]  # w1 has one device with room, not two
    assert plan.start_devices == {"multi": ["cpu:0", "cpu:1"]}
    # running, it holds both: a replica needing 200 MiB goes to w1, and the job beside it can not start
    held = JobWant("multi", 200 * MiB, 0, 1, "t", ("w2", "cpu:0"), devices=2, device_ids=("cpu:0", "cpu:1"))
    again = placement.plan({"m": want("m", 1, mem_mib=200)}, workers, {}, new_id=ids(),
                           jobs=[held, JobWant("next", 200 * MiB, 0, 2, "t", devices=2)])
    assert [(w, list(a.device_ids)) for w, a in again.add] == [("w1", ["cpu:0"])]
    assert again.start_jobs == [] and again.preempt == []


def test_a_job_no_worker_has_enough_devices_for_waits_alone():
    workers = {"w1": devices("w1", 500, 500)}
    jobs = [JobWant("wide", 100 * MiB, 9, 1, "t", devices=3), JobWant("narrow", 100 * MiB, 0, 2, "t", devices=2)]
    plan = placement.plan({}, workers, {}, jobs=jobs)
    assert [j for j, _, _ in plan.start_jobs] == ["narrow"] and plan.start_devices["narrow"] == ["cpu:0", "cpu:1"]


def test_a_replica_makes_a_job_on_several_devices_yield_once():
    workers = {"w1": devices("w1", 300, 300)}
    held = JobWant("multi", 250 * MiB, 0, 1, "t", ("w1", "cpu:0"), devices=2, device_ids=("cpu:0", "cpu:1"))
    plan = placement.plan({"m": want("m", 1, mem_mib=200), "n": want("n", 1, mem_mib=200)}, workers, {},
                          new_id=ids(), jobs=[held])
    assert plan.preempt == [("multi", "m")] and not plan.add  # asked once; both replicas wait for it
    assert "multi" in plan.unplaced["m"] and "multi" in plan.unplaced["n"]
