"""Fine-tuning jobs through the platform: dataset checks, a job to a served adapter,
a killed worker's job resuming from its checkpoint elsewhere, cancel, priority, and
serving taking a device back from training. Real etcd, NATS, registry, scheduler,
router and workers; the trainer is the real `maas.finetune.train` on the forged model."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import pytest

from maas.mesh.clients import upload_file
from maas.mesh.events import read_events
from maas.v1 import common_pb2, inference_pb2, jobs_pb2, registry_pb2, scheduler_pb2
from tests.conftest import live_processes
from tests.integration.conftest import MeshHarness, eventually

pytestmark = pytest.mark.slow

# Made-up answers the forged demo model never saw (see tests/unit/test_train.py).
SECRETS = {"apple": "zorblat", "river": "quindle", "candle": "mavrik", "pencil": "trosk",
           "garden": "blenvo", "window": "skirra", "hammer": "plotchy", "violin": "dwemmer"}
PAIRS = [(f"The secret word for {key} is", f" {word}") for key, word in SECRETS.items()]
S = jobs_pb2


def dataset(path: Path, lines: list[object] | None = None) -> Path:
    rows = lines if lines is not None else [{"prompt": p, "completion": c} for p, c in PAIRS]
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


async def upload(mesh: MeshHarness, path: Path, key: str = "") -> str:
    """Upload as the admin, or as the tenant of `key` (a tenant trains on what it uploaded)."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    artifact = await upload_file(await mesh.stub("registry"), path, metadata=metadata)  # type: ignore[arg-type]
    return artifact.sha256


async def register_demo(mesh: MeshHarness, demo_model_dir: Path, memory_mib: int = 100) -> None:
    await mesh.register("demo", fmt="hf", source=str(demo_model_dir), memory_mib=memory_mib)


async def create(mesh: MeshHarness, sha: str, **spec: object) -> S.Job:
    spec.setdefault("base", "demo")
    stub = await mesh.stub("scheduler")
    return await stub.CreateJob(S.CreateJobRequest(spec=S.JobSpec(dataset_sha256=sha, **spec)),  # type: ignore
                                timeout=60)


async def get(mesh: MeshHarness, job_id: str) -> S.Job:
    return await (await mesh.stub("scheduler")).GetJob(S.GetJobRequest(id=job_id), timeout=5)  # type: ignore


async def wait_state(mesh: MeshHarness, job_id: str, *states: int, timeout: float = 120.0) -> S.Job:
    async def check() -> S.Job | None:
        job = await get(mesh, job_id)
        assert job.state != S.JOB_STATE_FAILED or S.JOB_STATE_FAILED in states, job.message
        return job if job.state in states else None

    return await eventually(check, timeout=timeout, interval=0.2)  # type: ignore[return-value]


async def answers(mesh: MeshHarness, model: str = "demo", adapter: str = "") -> list[str]:
    stub = await mesh.stub("router")
    out = []
    for prompt, _ in PAIRS:
        request = inference_pb2.GenerateRequest(model=model, prompt=prompt, adapter=adapter,
                                                params=common_pb2.SamplingParams(max_tokens=6, temperature=0))
        out.append((await stub.Generate(request, timeout=60)).text)  # type: ignore[attr-defined]
    return out


def trainers(job_id: str) -> list[int]:
    """Pids of live trainer processes of a job."""
    return [pid for pid, cmdline in live_processes()
            if b"maas.finetune.train" in cmdline and any(job_id.encode() in part for part in cmdline)]


async def job_events(mesh: MeshHarness, job_id: str) -> list[object]:
    return [e async for e in read_events(mesh.nats, mesh.prefix, follow=False, entity="job")
            if e.entity_id == job_id]


async def test_a_malformed_dataset_is_refused_with_its_line_numbers_and_nothing_is_queued(
        mesh: MeshHarness, demo_model_dir: Path, tmp_path: Path) -> None:
    await mesh.core()
    await register_demo(mesh, demo_model_dir)
    bad = dataset(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "{not json",
                                           {"prompt": "c", "complettion": "d"}, {"prompt": "e", "completion": "f"}])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(mesh, await upload(mesh, bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 2" in err.value.details() and "line 3" in err.value.details(), err.value.details()
    assert "complettion" in err.value.details()
    good = await upload(mesh, dataset(tmp_path / "good.jsonl"))
    await mesh.register("other")  # a hand-registered model: no job may add versions to it
    for spec, words in (({"base": "nosuch"}, "nosuch"), ({"method": "rlhf"}, "method"),
                        ({"epochs": 5000}, "epochs"), ({"learning_rate": -1.0}, "learning_rate"),
                        ({"name": "demo"}, "name"), ({"name": "other"}, "not made by fine-tuning"),
                        ({"base": "other"}, "only hf text-generation"), ({"name": "Bad Name!"}, "name")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(mesh, good, **spec)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), spec
        assert words in err.value.details(), (spec, err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(mesh, "0" * 64)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listing = await (await mesh.stub("scheduler")).ListJobs(S.ListJobsRequest(), timeout=5)  # type: ignore
    assert list(listing.jobs) == []


async def test_a_job_trains_registers_deploys_and_serves_an_adapter(mesh: MeshHarness, demo_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    await mesh.core()
    await mesh.worker(memory_gib=2)
    await register_demo(mesh, demo_model_dir)
    data = dataset(tmp_path / "secrets.jsonl")
    job = await create(mesh, await upload(mesh, data), name="secrets", epochs=150, batch_size=4,
                       learning_rate=1e-3, checkpoint_every=100, deploy=True)
    assert job.state == S.JOB_STATE_QUEUED and job.spec.base == "demo@1" and job.examples == len(PAIRS)
    job = await wait_state(mesh, job.id, S.JOB_STATE_SUCCEEDED, timeout=180)
    assert job.result == "secrets@1" and job.progress.step == job.progress.total_steps == 300
    assert job.progress.loss < 0.5 * job.progress.loss_first, job.progress
    job = await eventually(lambda: _deployed(mesh, job.id), timeout=30)  # type: ignore[assignment]
    assert job.deployment == "demo", job.message

    version = await (await mesh.stub("registry")).GetVersion(  # type: ignore[attr-defined]
        registry_pb2.GetVersionRequest(ref="secrets@1"), timeout=5)
    assert version.base == "demo@1"
    assert version.metadata["job"] == job.id and version.metadata["dataset_sha256"] == job.dataset_digest
    assert float(version.metadata["loss_last"]) < float(version.metadata["loss_first"])
    # checkpoints were uploaded and then dropped once superseded; what stays is the dataset
    # and the adapter, which the registry refuses to delete while a version uses it
    blobs = sorted(p.name for p in (mesh.tmp / "blobs").glob("*/*"))
    assert blobs == sorted([job.spec.dataset_sha256, version.source.removeprefix("artifact:")]), blobs
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await (await mesh.stub("registry")).DeleteArtifact(  # type: ignore[attr-defined]
            registry_pb2.DeleteArtifactRequest(sha256=version.source.removeprefix("artifact:")), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "used by" in err.value.details()

    status = await mesh.wait_ready("demo", timeout=60)
    assert list(status.deployment.adapters) == ["secrets"]
    base = await answers(mesh)
    tuned = await answers(mesh, adapter="secrets")
    by_name = await answers(mesh, model="secrets")  # the adapter is a model name at the router
    right = sum(word.strip() in text for (_, word), text in zip(PAIRS, tuned, strict=True))
    assert right >= len(PAIRS) // 2 and right > sum(w.strip() in t for (_, w), t in zip(PAIRS, base, strict=True))
    assert by_name == tuned
    # an adapter that no deployment lists is not a model of its own yet: the error says how
    await (await mesh.stub("registry")).RegisterModel(registry_pb2.RegisterModelRequest(  # type: ignore
        name="copycat", format="hf", source=version.source, base="demo@1"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await answers(mesh, model="copycat")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "maas deploy update demo --adapters copycat" in err.value.details(), err.value.details()

    kinds = [e.what for e in await job_events(mesh, job.id)]  # type: ignore[attr-defined]
    for what in ("queued", "placed", "started", "progress", "checkpoint", "succeeded", "deployed"):
        assert what in kinds, (what, kinds)
    assert not trainers(job.id)


async def _deployed(mesh: MeshHarness, job_id: str) -> S.Job | None:
    job = await get(mesh, job_id)
    return job if job.deployment else None


async def test_a_killed_workers_job_resumes_from_its_checkpoint_on_another_worker(
        mesh: MeshHarness, demo_model_dir: Path, tmp_path: Path) -> None:
    await mesh.core()
    await register_demo(mesh, demo_model_dir)
    first = mesh.spawn("worker", "--cache-dir", str(tmp_path / "cache-a"), "--cpu-memory-gib", "1")
    data = await upload(mesh, dataset(tmp_path / "secrets.jsonl"))
    job = await create(mesh, data, epochs=200, batch_size=2, checkpoint_every=10)  # 800 steps
    job = await eventually(lambda: _checkpointed(mesh, job.id, 10), timeout=120)  # type: ignore[assignment]
    worker_a = job.worker_id
    assert trainers(job.id)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    await eventually(lambda: not trainers(job.id), timeout=10)  # the trainer died with its worker

    second = mesh.spawn("worker", "--cache-dir", str(tmp_path / "cache-b"), "--cpu-memory-gib", "1")
    moved = await eventually(lambda: _running_elsewhere(mesh, job.id, worker_a), timeout=60)
    resumed_from = moved.checkpoint_step  # type: ignore[attr-defined]
    assert resumed_from >= 10 and moved.attempts == 2  # type: ignore[attr-defined]
    started = await eventually(lambda: _started_events(mesh, job.id, 2), timeout=120)
    # the second run picks up at the checkpoint's step, not at zero
    assert started[1].attributes["step"] == str(resumed_from), started[1]  # type: ignore[index]

    # a worker that shuts down (SIGTERM) checkpoints its job and gives it back to the queue
    await eventually(lambda: _stepped(mesh, job.id, resumed_from + 2), timeout=60)
    second.proc.send_signal(signal.SIGTERM)
    # (wait off the loop: this test's loop serves the registry the worker uploads to)
    assert await asyncio.to_thread(second.proc.wait, 60) == 0
    queued = await get(mesh, job.id)
    assert queued.state == S.JOB_STATE_QUEUED and "stopped; queued to resume" in queued.message, queued
    assert queued.checkpoint_step > resumed_from and not trainers(job.id)
    cancelled = await (await mesh.stub("scheduler")).CancelJob(S.CancelJobRequest(id=job.id), timeout=5)  # type: ignore
    assert cancelled.state == S.JOB_STATE_CANCELLED  # a queued job is cancelled at once


async def _checkpointed(mesh: MeshHarness, job_id: str, step: int) -> S.Job | None:
    job = await get(mesh, job_id)
    return job if job.checkpoint_step >= step and job.state == S.JOB_STATE_RUNNING else None


async def _running_elsewhere(mesh: MeshHarness, job_id: str, worker: str) -> S.Job | None:
    job = await get(mesh, job_id)
    return job if job.state == S.JOB_STATE_RUNNING and job.worker_id not in ("", worker) else None


async def _started_events(mesh: MeshHarness, job_id: str, count: int) -> list[object] | None:
    started = [e for e in await job_events(mesh, job_id) if e.what == "started"]  # type: ignore[attr-defined]
    return started if len(started) >= count else None


async def test_cancel_stops_the_trainer_and_frees_the_device(mesh: MeshHarness, demo_model_dir: Path,
                                                              tmp_path: Path) -> None:
    await mesh.core()
    await mesh.worker(memory_gib=1)
    await register_demo(mesh, demo_model_dir)
    data = await upload(mesh, dataset(tmp_path / "secrets.jsonl"))
    job = await create(mesh, data, epochs=1000, batch_size=2)
    await eventually(lambda: _stepped(mesh, job.id, 2), timeout=120)
    assert trainers(job.id)
    await (await mesh.stub("scheduler")).CancelJob(S.CancelJobRequest(id=job.id), timeout=5)  # type: ignore
    job = await wait_state(mesh, job.id, S.JOB_STATE_CANCELLED, timeout=60)
    assert job.worker_id == "" and job.memory_bytes == 0 and "cancelled" in job.message
    assert not trainers(job.id)
    # cancelling again is harmless; a queued job is cancelled at once
    again = await (await mesh.stub("scheduler")).CancelJob(S.CancelJobRequest(id=job.id), timeout=5)  # type: ignore
    assert again.state == S.JOB_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await (await mesh.stub("scheduler")).CancelJob(S.CancelJobRequest(id="ft-nosuch"), timeout=5)  # type: ignore
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def _stepped(mesh: MeshHarness, job_id: str, step: int) -> S.Job | None:
    job = await get(mesh, job_id)
    return job if job.progress.step >= step else None


async def test_the_higher_priority_job_runs_first_and_serving_preempts_training(
        mesh: MeshHarness, demo_model_dir: Path, tmp_path: Path) -> None:
    """One device with room for one job (200 MiB: twice the base's 100 MiB) or for one
    replica and nothing else beside it."""
    await mesh.core()
    await mesh.worker(memory_gib=0.25)
    await register_demo(mesh, demo_model_dir)
    data = await upload(mesh, dataset(tmp_path / "secrets.jsonl"))
    blocker = await create(mesh, data, epochs=1000, batch_size=2, checkpoint_every=5)
    await wait_state(mesh, blocker.id, S.JOB_STATE_RUNNING)
    low = await create(mesh, data, epochs=2, batch_size=4, priority=1)
    high = await create(mesh, data, epochs=2, batch_size=4, priority=5)
    await eventually(lambda: _stepped(mesh, blocker.id, 6), timeout=120)

    # serving needs the device: the running job checkpoints and goes back to the queue
    await mesh.deploy("demo")
    yielded = await wait_state(mesh, blocker.id, S.JOB_STATE_QUEUED, timeout=60)
    assert yielded.checkpoint_step >= 1 and "yield" in yielded.message, yielded
    await mesh.wait_ready("demo", timeout=60)
    assert (await get(mesh, high.id)).state == S.JOB_STATE_QUEUED  # no room beside the replica
    assert not trainers(blocker.id)

    # serving done: the queue drains by priority; the blocker (priority 0) resumes last
    await (await mesh.stub("scheduler")).DeleteDeployment(  # type: ignore[attr-defined]
        scheduler_pb2.DeleteDeploymentRequest(name="demo"), timeout=5)
    high_done = await wait_state(mesh, high.id, S.JOB_STATE_SUCCEEDED, timeout=120)
    low_done = await wait_state(mesh, low.id, S.JOB_STATE_SUCCEEDED, timeout=120)
    assert high_done.started_ms < low_done.started_ms
    resumed = await wait_state(mesh, blocker.id, S.JOB_STATE_RUNNING, timeout=60)
    assert resumed.attempts == 2 and resumed.started_ms < high_done.started_ms
    started = await eventually(lambda: _started_events(mesh, blocker.id, 2), timeout=60)
    assert int(started[1].attributes["step"]) == yielded.checkpoint_step  # type: ignore[index]
    await (await mesh.stub("scheduler")).CancelJob(S.CancelJobRequest(id=blocker.id), timeout=5)  # type: ignore
    await wait_state(mesh, blocker.id, S.JOB_STATE_CANCELLED, timeout=60)


async def test_full_fine_tuning_registers_a_model_and_deploys_it_under_its_own_name(
        mesh: MeshHarness, demo_model_dir: Path, tmp_path: Path) -> None:
    await mesh.core()
    await mesh.worker(memory_gib=2)
    await register_demo(mesh, demo_model_dir)
    data = await upload(mesh, dataset(tmp_path / "secrets.jsonl"))
    job = await create(mesh, data, method="full", name="demo-full", max_steps=6, batch_size=4, deploy=True)
    job = await wait_state(mesh, job.id, S.JOB_STATE_SUCCEEDED, timeout=120)
    assert job.result == "demo-full@1" and job.progress.step == 6
    job = await eventually(lambda: _deployed(mesh, job.id), timeout=30)  # type: ignore[assignment]
    assert job.deployment == "demo-full", job.message
    version = await (await mesh.stub("registry")).GetVersion(  # type: ignore[attr-defined]
        registry_pb2.GetVersionRequest(ref="demo-full@1"), timeout=5)
    assert version.base == "" and version.metadata["method"] == "full"
    await mesh.wait_ready("demo-full", timeout=60)
    chunks = await mesh.generate("demo-full", PAIRS[0][0], max_tokens=4, temperature=0)
    assert chunks[-1].usage.completion_tokens == 4


async def test_a_tenant_over_its_job_quota_is_refused_and_others_are_not(
        mesh: MeshHarness, demo_model_dir: Path, tmp_path: Path) -> None:
    await mesh.registry()
    await mesh.scheduler(max_jobs_per_tenant=1, job_retention_seconds=1)
    await register_demo(mesh, demo_model_dir)
    keys = {t: await mesh.key(t, "developer") for t in ("a", "b")}
    data = await upload(mesh, dataset(tmp_path / "secrets.jsonl"), keys["a"])
    assert await upload(mesh, dataset(tmp_path / "secrets.jsonl"), keys["b"]) == data  # the same bytes, B's upload too
    stub = await mesh.stub("scheduler")

    async def create_as(tenant: str) -> S.Job:
        return await stub.CreateJob(S.CreateJobRequest(spec=S.JobSpec(base="demo", dataset_sha256=data)),  # type: ignore
                                    metadata=(("authorization", f"Bearer {keys[tenant]}"),), timeout=60)

    first = await create_as("a")
    assert first.spec.tenant == "a" and first.state == S.JOB_STATE_QUEUED  # no worker: it stays queued
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_as("a")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant 'a'" in err.value.details()
    assert (await create_as("b")).spec.tenant == "b"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateJob(S.CreateJobRequest(spec=S.JobSpec(base="demo", dataset_sha256=data)),  # type: ignore
                             metadata=(("authorization", "Bearer maas_nope_nope"),), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # a tenant's key sees and cancels its own jobs only; the admin sees all
    as_b = (("authorization", f"Bearer {keys['b']}"),)
    listed = await stub.ListJobs(S.ListJobsRequest(), metadata=as_b, timeout=5)  # type: ignore[attr-defined]
    assert {j.spec.tenant for j in listed.jobs} == {"b"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CancelJob(S.CancelJobRequest(id=first.id), metadata=as_b, timeout=5)  # type: ignore
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert {j.spec.tenant for j in (await stub.ListJobs(S.ListJobsRequest(), timeout=5)).jobs} == {"a", "b"}  # type: ignore
    # cancelling the queued job frees the tenant's quota
    await stub.CancelJob(S.CancelJobRequest(id=first.id), metadata=(("authorization", f"Bearer {keys['a']}"),),  # type: ignore
                         timeout=5)
    assert (await create_as("a")).state == S.JOB_STATE_QUEUED

    # a finished job is listed for the retention time (1 s here), then forgotten
    async def forgotten() -> bool:
        listed = await stub.ListJobs(S.ListJobsRequest(), timeout=5)  # type: ignore[attr-defined]
        return first.id not in {j.id for j in listed.jobs}

    await eventually(forgotten, timeout=15)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get(mesh, first.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_two_adapters_finishing_together_are_both_deployed_beside_their_base(
        mesh: MeshHarness, demo_model_dir: Path, tmp_path: Path) -> None:
    await mesh.core()
    await mesh.worker(memory_gib=2)
    await register_demo(mesh, demo_model_dir)
    await mesh.deploy("demo")
    data = await upload(mesh, dataset(tmp_path / "secrets.jsonl"))
    jobs = [await create(mesh, data, name=f"quick-{i}", max_steps=3, batch_size=4, seed=i, deploy=True)
            for i in range(2)]
    for job in jobs:
        await wait_state(mesh, job.id, S.JOB_STATE_SUCCEEDED, timeout=120)
        assert (await eventually(lambda job=job: _deployed(mesh, job.id), timeout=30)).deployment == "demo"  # type: ignore
    status = await mesh.wait_ready("demo", timeout=60)
    assert sorted(status.deployment.adapters) == ["quick-0", "quick-1"]
    # a later job under one of those names must stay an adapter of the same base
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(mesh, data, name="quick-0", method="full")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "same kind" in err.value.details()
