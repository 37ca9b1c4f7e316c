"""Fine-tuning jobs in etcd: the contract the scheduler and the workers share.

A job lives at `jobs/{id}` as one `maas.v1.Job`. Three writers touch it: the scheduler API
(create, cancel), the scheduler leader (placement, requeue, yield requests) and the
worker that runs it (progress, checkpoints, the outcome). Each write is a read-modify-write
that compares the key's revision (`update_job`), so concurrent writers never lose each
other's changes: the loser reads again and re-applies its change to the new value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from maas.mesh.errors import NotFound
from maas.mesh.etcd import EtcdSession, update_record
from maas.v1 import jobs_pb2

TERMINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})

# A mutation gets the current job and returns the new one, or None to leave it alone.
Mutation = Callable[[jobs_pb2.Job], jobs_pb2.Job | None]


def state_name(state: int) -> str:
    """"queued", "running", ... for a JobState."""
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def now_ms() -> int:
    return int(time.time() * 1000)


async def get_job(session: EtcdSession, job_id: str) -> jobs_pb2.Job:
    raw = await session.get(session.keys.job(job_id))
    if raw is None:
        raise NotFound(f"job {job_id!r} does not exist")
    return jobs_pb2.Job.FromString(raw)


async def update_job(session: EtcdSession, job_id: str, mutate: Mutation, *,
                     fenced: Callable[[list[Any], list[Any]], Any] | None = None) -> jobs_pb2.Job | None:
    """Apply `mutate` to the stored job until the write wins the compare on its revision.

    Returns the job as written, or None when `mutate` declined (or `fenced`, a leader's
    fenced transaction, refused: the caller is no longer the leader). NotFound if the job
    is gone."""
    return await update_record(session, session.keys.job(job_id), jobs_pb2.Job.FromString, mutate,
                               what=f"job {job_id!r}", now_ms=now_ms, fenced=fenced)
