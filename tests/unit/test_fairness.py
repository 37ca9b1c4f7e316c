"""Fair sharing of the engine's batch across tenants (issue 14), on the forged demo model:
a flooding tenant cannot lock a quiet one out of the queue or the batch, a pre-empted
sequence continues with exactly the tokens it would have made, and weights 3:1 hold the
batch 3:1. The queue's rules alone are checked in the last tests, without a model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from maas.mesh.errors import ResourceExhausted
from maas.services.worker.engines import metrics
from maas.services.worker.engines.base import Delta, GenerationRequest, ModelSpec, SamplingParams
from maas.services.worker.engines.fair import FairQueue, Reservation, over_share, victim
from maas.services.worker.engines.hf import HFEngine

PROMPT = "def add(a, b):"
LONG = 400  # tokens a flooding request asks for: it holds its slot throughout a test


@pytest.fixture
async def engine(demo_model_dir: Path) -> AsyncIterator[HFEngine]:
    e = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"max_batch": "4", "max_queue": "4"}))
    await e.load()
    yield e
    await e.close()


def request(tenant: str, i: int, max_tokens: int = LONG, weight: float = 1.0, seed: int = 0) -> GenerationRequest:
    return GenerationRequest(f"{tenant}{i}", PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                   seed=seed or 1000 + i),
                             tenant=tenant, weight=weight)


class Stream:
    """One request's deltas, read in the background."""

    def __init__(self, engine: HFEngine, req: GenerationRequest) -> None:
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.first = asyncio.Event()
        self.task = asyncio.create_task(self._read(engine.generate(req)))

    async def _read(self, deltas: AsyncIterator[Delta]) -> None:
        try:
            async for d in deltas:
                self.tokens.extend(d.token_ids)
                if self.tokens:
                    self.first.set()
        except BaseException as e:
            self.error = e
            self.first.set()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until(check: object, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_quiet_tenant_gets_in_while_another_floods(engine: HFEngine):
    label = "demo@1"
    preempted_before = metrics.PREEMPTIONS.labels(label)._value.get()
    # the flood: 4 running (the whole batch) and 4 queued; more are refused
    flood = [Stream(engine, request("flood", i)) for i in range(8)]
    await until(lambda: sum(1 for s in flood if s.tokens) == 4 and len(engine._waiting) == 4)
    refused = Stream(engine, request("flood", 8))
    await refused.first.wait()
    assert isinstance(refused.error, ResourceExhausted)
    # the quiet tenant is neither refused (it takes a flooding request's queue place) nor
    # left waiting for a flooding sequence to finish (one is pre-empted for its share)
    quiet = Stream(engine, request("quiet", 0, max_tokens=8))
    await asyncio.wait_for(quiet.first.wait(), 30)
    assert quiet.error is None
    running = [s for s in flood if s.tokens and s.error is None]
    assert all(len(s.tokens) < LONG for s in running), "a flooding sequence had finished first"
    pushed = [s for s in flood if isinstance(s.error, ResourceExhausted)]
    assert len(pushed) == 1, [s.error for s in flood]
    await asyncio.wait_for(quiet.task, 30)
    assert len(quiet.tokens) == 8
    assert metrics.PREEMPTIONS.labels(label)._value.get() > preempted_before
    for s in flood:
        await s.stop()


async def test_a_quiet_tenant_gets_in_when_the_kv_cache_not_the_slots_runs_out(demo_model_dir: Path):
    """Eight slots but a 2 MiB KV cache (682 tokens of the demo model): two flooding
    requests of 300 tokens hold it all, with six slots free. A quiet tenant's short request
    does not fit beside them; it is owed one of the two rows the cache holds, so one
    flooding sequence is pre-empted and the quiet request runs to its end while both
    flooding requests are still going, and they end with all their tokens."""
    e = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir),
                           options={"max_batch": "8", "max_queue": "8", "kv_cache_mb": "2"}))
    await e.load()
    try:
        label = "demo@1"
        preempted_before = metrics.PREEMPTIONS.labels(label)._value.get()
        flood = [Stream(e, request("flood", i, max_tokens=300)) for i in range(3)]
        await until(lambda: sum(1 for s in flood if s.tokens) == 2 and len(e._waiting) == 1)
        assert len(e._running) == 2, "the KV budget should hold two flooding rows, not three"
        quiet = Stream(e, request("quiet", 0, max_tokens=20))
        await asyncio.wait_for(quiet.task, 60)
        assert quiet.error is None and len(quiet.tokens) == 20
        assert all(len(s.tokens) < 300 for s in flood), "a flooding sequence finished before the quiet request"
        assert metrics.PREEMPTIONS.labels(label)._value.get() > preempted_before
        await asyncio.wait_for(asyncio.gather(*(s.task for s in flood)), 120)
        assert [len(s.tokens) for s in flood] == [300, 300, 300]
        assert all(s.error is None for s in flood)
    finally:
        await e.close()


async def test_a_preempted_sequence_continues_with_the_tokens_it_would_have_made(engine: HFEngine):
    n = 60
    # alone: the tokens each flooding request makes, uninterrupted
    alone = []
    for i in range(4):
        s = Stream(engine, request("flood", i, max_tokens=n))
        await s.task
        alone.append(s.tokens)
    # the same four hold the batch; quiet requests arrive, pre-empting some of them mid-way
    flood = [Stream(engine, request("flood", i, max_tokens=n)) for i in range(4)]
    await until(lambda: all(len(s.tokens) >= 5 for s in flood))
    before = metrics.PREEMPTIONS.labels("demo@1")._value.get()
    quiet = [Stream(engine, request("quiet", i, max_tokens=20)) for i in range(2)]
    await asyncio.gather(*(s.task for s in (*flood, *quiet)))
    assert metrics.PREEMPTIONS.labels("demo@1")._value.get() >= before + 2  # the quiet tenant's share: 2 of 4
    assert [s.tokens for s in flood] == alone


async def test_weights_three_to_one_hold_the_batch_three_to_one(engine: HFEngine):
    heavy = [Stream(engine, request("heavy", i, weight=3.0)) for i in range(4)]
    await until(lambda: sum(1 for s in heavy if s.tokens) == 4)
    light = [Stream(engine, request("light", i, weight=1.0)) for i in range(4)]
    await until(lambda: any(s.tokens for s in light))
    # from here on both always wait: count the tokens each makes over the same stretch
    start_h, start_l = sum(len(s.tokens) for s in heavy), sum(len(s.tokens) for s in light)
    await until(lambda: sum(len(s.tokens) for s in heavy) - start_h >= 120)
    made_h = sum(len(s.tokens) for s in heavy) - start_h
    made_l = sum(len(s.tokens) for s in light) - start_l
    assert 2.5 <= made_h / made_l <= 3.5, (made_h, made_l)
    for s in (*heavy, *light):
        await s.stop()


# ---- the queue's rules alone ---------------------------------------------------------------


@dataclass(eq=False)
class Seq:
    tenant: str
    weight: float = 1.0
    arrived: float = 0.0
    priority: int = 1
    preempted: int = 0
    context: int = 0


def test_the_next_slot_goes_to_the_tenant_holding_fewest_for_its_weight():
    q: FairQueue[Seq] = FairQueue()
    a1, a2, b1 = Seq("a", arrived=1), Seq("a", arrived=2), Seq("b", arrived=3)
    for s in (a1, a2, b1):
        q.append(s)
    assert q.next({}) is a1                     # nobody holds any: the longest waiting
    assert q.next({(1, "a"): 1}) is b1          # a holds one: b's turn
    assert q.next({(1, "a"): 1, (1, "b"): 1}) is a1
    heavy = Seq("h", weight=3.0, arrived=4)
    q.append(heavy)
    assert q.next({(1, "a"): 1, (1, "b"): 1, (1, "h"): 2}) is heavy  # 2/3 < 1
    assert len(q) == 4 and q.waiting("a") == 2
    urgent = Seq("b", arrived=9, priority=0)
    q.append(urgent)
    assert q.next({(0, "b"): 3}) is urgent      # a higher class goes first, whatever it holds


def test_a_full_queue_pushes_out_the_tenant_most_over_its_share():
    q: FairQueue[Seq] = FairQueue()
    flood = [Seq("f", arrived=i) for i in range(4)]
    for s in flood:
        q.append(s)
    assert q.push_out(Seq("f"), 4) is None                   # the flood's own newcomer: refused
    assert q.push_out(Seq("q"), 4) is flood[-1]              # a quiet one takes the newest flood place
    assert len(q) == 3
    q.append(Seq("q"))
    q.append(flood[-1])
    assert q.push_out(Seq("q"), 4) is flood[-1]              # q has 1 of its 2; f has 3
    q.append(Seq("q"))
    assert q.push_out(Seq("q"), 4) is None                   # q has its share (2 of 4)
    assert q.push_out(Seq("f", priority=0), 4) is not None   # a higher class makes room in any case
    batch = Seq("b", priority=2, arrived=10)
    q.append(batch)
    assert q.push_out(Seq("q"), 4) is batch                  # the lowest class's newest goes first


def test_preemption_only_from_a_tenant_over_its_share_for_a_tenant_under_its_own():
    running = [Seq("f", arrived=i) for i in range(4)]
    waiting: FairQueue[Seq] = FairQueue()
    assert over_share(running, waiting, 4) is None           # nobody waits
    waiting.append(Seq("f"))
    assert over_share(running, waiting, 4) is None           # only the tenant that holds it all
    waiting.append(Seq("q"))
    assert over_share(running, waiting, 4) is running[-1]    # the newest of the flood
    even = [Seq("f"), Seq("f"), Seq("q"), Seq("q")]
    assert over_share(even, waiting, 4) is None              # 2 and 2: each has its share
    weighted = [Seq("h", 3.0), Seq("h", 3.0), Seq("h", 3.0), Seq("l")]
    waiting = FairQueue()
    waiting.append(Seq("l"))
    assert over_share(weighted, waiting, 4) is None          # 3:1 is the share of weights 3:1


def test_a_waiting_higher_class_preempts_the_lowest_class_first():
    running = [Seq("a", priority=1), Seq("b", priority=2), Seq("c", priority=2), Seq("a", priority=1)]
    waiting: FairQueue[Seq] = FairQueue()
    waiting.append(Seq("a", priority=2))
    assert victim(running, waiting, 4) is None               # batch waits behind standard and batch
    waiting.append(Seq("z", priority=0))
    assert victim(running, waiting, 4) is running[2]         # interactive: the newest batch sequence
    standard_only = [s for s in running if s.priority == 1]
    assert victim(standard_only, waiting, 2) is standard_only[-1]  # no batch left: standard yields
    interactive = [Seq("y", priority=0), Seq("y", priority=0)]
    assert victim(interactive, waiting, 2) is interactive[-1]      # z holds 0 of 1, y 2: over its share
    # a tenant waiting a class up (its reservation promoted it) takes another tenant's slot,
    # not its own sequence's, while there is another's
    mine, theirs = Seq("r", priority=1, context=50), Seq("o", priority=1, context=90)
    promoted: FairQueue[Seq] = FairQueue()
    promoted.append(Seq("r", priority=0))
    assert victim([mine, theirs], promoted, 2) is theirs
    assert victim([mine], promoted, 1) is mine                     # its own when nothing else runs


async def test_interactive_preempts_batch_which_resumes_with_the_same_tokens(engine: HFEngine):
    n = 60
    alone = []
    for i in range(4):
        s = Stream(engine, request("jobs", i, max_tokens=n))
        await s.task
        alone.append(s.tokens)
    batch = [Stream(engine, GenerationRequest(f"jobs{i}", PROMPT, SamplingParams(
        max_tokens=n, ignore_eos=True, seed=1000 + i), tenant="jobs", priority=2)) for i in range(4)]
    await until(lambda: all(len(s.tokens) >= 5 for s in batch))
    online = Stream(engine, GenerationRequest("chat", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True),
                                              tenant="jobs", priority=0))  # even the same tenant's
    await asyncio.wait_for(online.first.wait(), 30)
    assert online.error is None and all(len(s.tokens) < n for s in batch)  # it did not wait for one to end
    await asyncio.gather(*(s.task for s in (*batch, online)))
    assert [s.tokens for s in batch] == alone


async def _batch_then_interactive(demo_model_dir: Path, objective_ms: int | dict[str, str], batch_tokens: int
                                  ) -> tuple[list[Stream], Stream, float]:
    """4 batch sequences of `batch_tokens` fill a 4-slot engine with a TTFT objective (or
    the objective options given); then an interactive request arrives. Returns the batch,
    the interactive stream (finished) and the preemption count it caused."""
    objectives = objective_ms if isinstance(objective_ms, dict) else {"ttft_objective_ms": str(objective_ms)}
    e = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir),
                           options={"max_batch": "4", "max_queue": "4", **objectives}))
    await e.load()
    try:
        before = metrics.PREEMPTIONS.labels("demo@1")._value.get()
        batch = [Stream(e, GenerationRequest(f"b{i}", PROMPT, SamplingParams(
            max_tokens=batch_tokens, ignore_eos=True, seed=1000 + i), tenant="jobs", priority=2)) for i in range(4)]
        await until(lambda: all(len(s.tokens) >= 3 for s in batch))
        online = Stream(e, GenerationRequest("chat", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True),
                                             tenant="app", priority=0))
        await asyncio.wait_for(online.task, 60)
        await asyncio.gather(*(s.task for s in batch))
        return batch, online, metrics.PREEMPTIONS.labels("demo@1")._value.get() - before
    finally:
        await e.close()


async def test_with_a_ttft_objective_batch_work_is_preempted_only_when_no_slot_frees_in_time(demo_model_dir: Path):
    # the batch holds its slots for hundreds of steps: waiting cannot meet a 1 ms objective
    batch, online, preempted = await _batch_then_interactive(demo_model_dir, 1, 400)
    assert online.error is None and preempted >= 1
    assert all(len(s.tokens) == 400 for s in batch)
    # the batch ends within a few steps, well inside a 60 s objective: it is left to finish
    batch, online, preempted = await _batch_then_interactive(demo_model_dir, 60_000, 12)
    assert online.error is None and len(online.tokens) == 4
    assert preempted == 0
    assert all(len(s.tokens) == 12 for s in batch)


async def test_a_class_of_its_own_ttft_objective_overrides_the_models(demo_model_dir: Path):
    # the model's objective would let the batch run on; the interactive class's own (1 ms) cannot wait
    _, online, preempted = await _batch_then_interactive(
        demo_model_dir, {"ttft_objective_ms": "600000", "interactive_ttft_objective_ms": "1"}, 400)
    assert online.error is None and preempted >= 1
    # and the other way round: the interactive class may wait 60 s, so the batch ends first
    _, online, preempted = await _batch_then_interactive(
        demo_model_dir, {"ttft_objective_ms": "1", "interactive_ttft_objective_ms": "60000"}, 12)
    assert online.error is None and preempted == 0


def test_a_preempted_sequence_is_never_refused_nor_preempted_again_first():
    q: FairQueue[Seq] = FairQueue()
    moved = [Seq("jobs", priority=2, arrived=i, preempted=1) for i in range(4)]  # streaming already
    for s in moved:
        q.appendleft(s)
    assert q.push_out(Seq("chat", priority=0), 4) is None   # the newcomer waits its turn instead
    fresh = Seq("jobs", priority=2, arrived=9)
    q.append(fresh)
    assert q.push_out(Seq("chat", priority=0), 4) is fresh  # a request not started yet may be refused
    running = [Seq("f", preempted=1, context=10), Seq("f", context=500), Seq("f", context=20), Seq("f", context=20)]
    waiting: FairQueue[Seq] = FairQueue()
    waiting.append(Seq("q"))
    # not the one pre-empted before; of the others, the least to prefill again (the newest of a tie)
    assert over_share(running, waiting, 4) is running[3]


# ---- provisioned throughput in the engine --------------------------------------------------


def test_a_reservation_promotes_standard_requests_first_come_while_it_holds_tokens():
    q: FairQueue[Seq] = FairQueue()
    mine = [Seq("r", arrived=i) for i in range(3)]
    other, batch = Seq("o", arrived=0.5), Seq("r", arrived=9, priority=2)
    for s in (*mine, other, batch):
        q.append(s)
    budget = Reservation(rate=20)  # empty at first, at most 20 tokens (1 s of the rate)
    assert budget.capacity == 20 and budget.level == 0
    assert q.promote("r", lambda s: budget.charge(16)) == 0  # nothing saved up yet
    budget.refill(budget.stamp + 1.0)
    moved = q.promote("r", lambda s: budget.charge(16))  # each may still make 16 tokens
    assert moved == 2 and [s.priority for s in mine] == [0, 0, 1]  # 20 -> 4 -> -12: a request is taken whole
    assert q.next({}) is mine[0] and q.top() == 0
    assert other.priority == 1 and batch.priority == 2  # another tenant's, and batch work: never
    assert q.promote("r", lambda s: budget.charge(16)) == 0  # empty: nothing more until it refills
    budget.refill(budget.stamp + 1.0)  # 1 s later: -12 + 20
    assert budget.level == 8 and q.promote("r", lambda s: budget.charge(16)) == 1 and mine[2].priority == 0
    assert budget.level == -8
    budget.settle(taken=16, made=4)  # it stopped early: what it did not make comes back
    assert budget.level == 4
    assert budget.charge(4096) == 20 and budget.level == -16  # a huge max_tokens takes a second of the rate
    budget.settle(taken=20, made=300)  # ... and is charged what it made when it ends
    assert budget.level == -296 and budget.charge(1) == 0


async def test_a_tenants_reserved_rate_promotes_its_waiting_request_past_another_tenants(demo_model_dir: Path):
    """Two slots, held by two tenants' long streams; each tenant has one more request
    waiting. The reserved tenant's waiting request pre-empts the other tenant's stream and
    runs at once (it is promoted a class up); the plain tenant's waits for a slot. Without
    the reservation, neither would run before a held stream ended (each tenant holds its
    share)."""
    e = HFEngine(ModelSpec("demo", 1, "hf", str(demo_model_dir), options={"max_batch": "2", "max_queue": "4"}))
    await e.load()
    try:
        def req(tenant: str, i: int, max_tokens: int, rate: float = 0.0) -> GenerationRequest:
            return GenerationRequest(f"{tenant}{i}", PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                           seed=1000 + i),
                                     tenant=tenant, reserved_rate=rate)

        # 2,000 tokens at first: both of its requests' max_tokens (a request is charged them
        # when promoted, and refunded what it did not make)
        held = [Stream(e, req("plain", 0, LONG)), Stream(e, req("mine", 0, LONG, rate=1000))]
        await until(lambda: all(s.tokens for s in held))
        plain, mine = Stream(e, req("plain", 1, 8)), Stream(e, req("mine", 1, 8, rate=1000))
        await asyncio.wait_for(mine.task, 60)
        assert mine.error is None and len(mine.tokens) == 8
        assert not plain.tokens, "the plain tenant's second request ran before a slot freed"
        assert all(len(s.tokens) < LONG for s in held)  # both held streams were still running
        seqs = {s.request_id: s for s in (*e._running, *e._waiting)}
        assert seqs["plain0"].preempted and not seqs["mine0"].preempted  # the other tenant's slot, not its own
        for s in (*held, plain):
            await s.stop()
    finally:
        await e.close()
