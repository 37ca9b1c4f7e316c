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

from maas.mesh.errors import NotFound, Unavailable
from maas.mesh.etcd import EtcdSession
from maas.v1 import jobs_pb2

TERMINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})
MAX_TRIES = 20

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
    is gone.
    """
    key, client = session.keys.job(job_id), session.client
    tx = client.transactions
    for _ in range(MAX_TRIES):
        got = await client.get(key)
        if got is None:
            raise NotFound(f"job {job_id!r} does not exist")
        current = jobs_pb2.Job.FromString(got.value)
        new = mutate(_copy(current))
        if new is None or new == current:
            return None if new is None else current
        new.updated_ms = now_ms()
        compare, ops = [tx.mod(key) == got.mod_revision], [tx.put(key, new.SerializeToString())]
        if fenced is not None:
            if await fenced(ops, compare):
                return new
            got_again = await client.get(key)
            if got_again is not None and got_again.mod_revision == got.mod_revision:
                return None  # the job did not change, so the fence refused: not the leader
            continue
        ok, _ = await client.transaction(compare=compare, success=ops, failure=[])
        if ok:
            return new
    raise Unavailable(f"job {job_id!r} keeps changing; try again")


def _copy(job: jobs_pb2.Job) -> jobs_pb2.Job:
    out = jobs_pb2.Job()
    out.CopyFrom(job)
    return out
