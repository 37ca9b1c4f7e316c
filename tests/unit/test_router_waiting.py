"""The router's waiting room (maas/services/router/waiting.py): who is woken, in what order,
and that nothing is left behind. Pure asyncio: a "replica" with one slot is driven by the
test, which ends the request holding it and sees whom the room woke for the slot."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from maas.services.router.waiting import RoomFull, Waiter, WaitingRooms

MODEL = "demo"
_arrivals = itertools.count()


def rooms(**kw: object) -> WaitingRooms:
    kw.setdefault("poll", 60.0)  # no fallback wakes unless a test is about them
    return WaitingRooms(lambda model, replica_id: True, **kw)  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


class OneSlot:
    """A replica with one slot, held first by `holder`. `request` queues a request that
    takes the slot when woken; `free` ends the request holding it."""

    def __init__(self, room: WaitingRooms, holder: str) -> None:
        self.rooms = room
        self.order: list[str] = []  # who took the slot, in turn ("tenant#i")
        self.holder = (holder, 1.0)
        self.tasks: list[asyncio.Task[None]] = []
        room.started(MODEL, holder)

    async def request(self, tenant: str, n: int = 1, weight: float = 1.0) -> None:
        for _ in range(n):
            waiter = Waiter(tenant, weight, next(_arrivals))
            name = f"{tenant}#{sum(t.get_name().startswith(tenant + '#') for t in self.tasks)}"

            async def run(waiter: Waiter = waiter, name: str = name) -> None:
                assert await self.rooms.wait(MODEL, waiter, 60)
                self.rooms.started(MODEL, waiter.tenant)
                self.order.append(name)
                self.holder = (waiter.tenant, waiter.weight)

            self.tasks.append(asyncio.create_task(run(), name=name))
            await settle()  # queued in this order

    async def free(self, times: int = 1) -> None:
        for _ in range(times):
            tenant, weight = self.holder
            self.rooms.ended(MODEL, tenant, weight, served=True, replica_id="r1")
            await settle()

    async def close(self) -> None:
        await asyncio.gather(*self.tasks)
        tenant, weight = self.holder
        self.rooms.ended(MODEL, tenant, weight, served=True, replica_id="r1")
        assert self.rooms.waiting == 0 and len(self.rooms) == 0  # nothing left behind


async def test_a_quiet_tenants_one_request_goes_before_a_floods_earlier_ones():
    slot = OneSlot(rooms(), "flood")
    await slot.request("flood", 6)
    await slot.request("quiet")
    await slot.free()
    assert slot.order == ["quiet#0"]
    await slot.free(6)
    assert slot.order == ["quiet#0", *(f"flood#{i}" for i in range(6))]  # first come first served within a tenant
    await slot.close()


async def test_equal_tenants_alternate_and_ties_go_to_who_waited_longest():
    slot = OneSlot(rooms(), "other")
    await slot.request("a", 4)
    await slot.request("b", 4)
    await slot.free(8)
    assert [name[0] for name in slot.order] == list("abababab")
    await slot.close()


async def test_weights_give_proportional_turns():
    slot = OneSlot(rooms(), "other")
    await slot.request("heavy", 12, weight=3)
    await slot.request("light", 12)
    await slot.free(16)
    turns = [name.split("#")[0] for name in slot.order]
    assert turns.count("heavy") == 12 and turns.count("light") == 4, turns
    assert turns[:8].count("heavy") == 6, turns
    await slot.free(8)
    await slot.close()


async def test_the_tenant_with_fewest_in_flight_goes_first_even_if_served_more():
    room = rooms()
    for tenant in ("a", "a", "b"):  # three slots: a holds two, b one
        room.started(MODEL, tenant)
    woken: list[str] = []

    async def wait(tenant: str) -> None:
        assert await room.wait(MODEL, Waiter(tenant, 1.0, next(_arrivals)), 60)
        woken.append(tenant)

    tasks = [asyncio.create_task(wait("a"))]
    await settle()
    tasks.append(asyncio.create_task(wait("b")))
    await settle()
    room.ended(MODEL, "b", 1.0, served=True, replica_id="r1")  # b was served once more than a, but has 0 in flight
    await settle()
    assert woken == ["b"]
    room.ended(MODEL, "a", 1.0, served=True, replica_id="r1")
    await asyncio.gather(*tasks)
    assert woken == ["b", "a"]
    room.ended(MODEL, "a", 1.0, served=True, replica_id="r1")
    assert room.waiting == 0 and len(room) == 0


async def test_a_woken_request_refused_again_goes_back_to_the_head_of_its_queue():
    room = rooms()
    room.started(MODEL, "a")
    first, second = Waiter("a", 1.0, next(_arrivals)), Waiter("a", 1.0, next(_arrivals))
    waits = [asyncio.create_task(room.wait(MODEL, w, 60)) for w in (first, second)]
    await settle()
    room.ended(MODEL, "a", 1.0, served=True, replica_id="r1")
    await settle()
    assert waits[0].done() and not waits[1].done()
    again = asyncio.create_task(room.wait(MODEL, first, 60))  # refused: it waits again, at the head
    await settle()
    room.started(MODEL, "a")
    room.ended(MODEL, "a", 1.0, served=True, replica_id="r1")
    await settle()
    assert again.done() and not waits[1].done()
    room.started(MODEL, "a")
    room.ended(MODEL, "a", 1.0, served=True, replica_id="r1")
    assert await waits[1]
    assert room.waiting == 0 and len(room) == 0


async def test_one_waiter_is_woken_per_slot_freed_and_none_for_a_refused_call():
    room = rooms()
    room.started(MODEL, "x")
    room.started(MODEL, "x")
    waits = [asyncio.create_task(room.wait(MODEL, Waiter(t, 1.0, next(_arrivals)), 60)) for t in "abc"]
    await settle()
    room.ended(MODEL, "x", 1.0, served=False, replica_id="r1")  # refused: no slot freed
    await settle()
    assert not any(w.done() for w in waits)
    room.ended(MODEL, "x", 1.0, served=True, replica_id="r1")
    await settle()
    assert [w.done() for w in waits] == [True, False, False] and room.waiting == 2
    for w in waits[1:]:
        w.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
    assert room.waiting == 0 and len(room) == 0


async def test_a_freed_replica_wakes_only_the_rooms_it_serves():
    room = WaitingRooms(lambda model, replica_id: (model, replica_id) in {("m1", "r1"), ("m2", "r2")}, poll=60)
    one = asyncio.create_task(room.wait("m1", Waiter("a", 1.0, next(_arrivals)), 60))
    two = asyncio.create_task(room.wait("m2", Waiter("a", 1.0, next(_arrivals)), 60))
    await settle()
    room.started("m2@3", "b")  # a version of m2, on r2
    room.ended("m2@3", "b", 1.0, served=True, replica_id="r2")
    await settle()
    assert two.done() and not one.done()
    one.cancel()
    await asyncio.gather(one, two, return_exceptions=True)
    assert room.waiting == 0 and len(room) == 0


async def test_the_poll_wakes_the_head_of_each_tenants_queue_so_nothing_waits_forever():
    room = rooms(poll=0.2)  # no request ends: only the fallback wakes anyone
    waits = {(t, i): asyncio.create_task(room.wait(MODEL, Waiter(t, 1.0, next(_arrivals)), 60))
             for t in "ab" for i in range(2)}
    done, _ = await asyncio.wait([waits["a", 0], waits["b", 0]], timeout=10)
    assert len(done) == 2 and not waits["a", 1].done() and not waits["b", 1].done()
    assert room.waiting == 2
    assert all(await asyncio.wait_for(asyncio.gather(waits["a", 1], waits["b", 1]), 10))
    assert room.waiting == 0 and len(room) == 0


async def test_a_waiter_whose_time_is_up_or_whose_client_left_leaves_its_queue():
    room = rooms()
    room.started(MODEL, "x")
    assert not await room.wait(MODEL, Waiter("a", 1.0, next(_arrivals)), 0.01)
    assert room.waiting == 0 and room.queued(MODEL, "a") == 0
    gone = asyncio.create_task(room.wait(MODEL, Waiter("a", 1.0, next(_arrivals)), 60))
    await settle()
    assert room.queued(MODEL, "a") == 1
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert room.waiting == 0 and room.queued(MODEL, "a") == 0
    room.ended(MODEL, "x", 1.0, served=True, replica_id="r1")
    assert len(room) == 0


async def test_a_turn_given_to_a_waiter_that_left_goes_to_the_next():
    room = rooms()
    room.started(MODEL, "x")
    a = asyncio.create_task(room.wait(MODEL, Waiter("a", 1.0, next(_arrivals)), 60))
    await settle()
    b = asyncio.create_task(room.wait(MODEL, Waiter("b", 1.0, next(_arrivals)), 60))
    await settle()
    room.ended(MODEL, "x", 1.0, served=True, replica_id="r1")  # wakes a (it waited longest) ...
    a.cancel()                                                 # ... whose client leaves before it runs
    assert await asyncio.wait_for(b, 5)
    with pytest.raises(asyncio.CancelledError):
        await a
    assert room.waiting == 0 and len(room) == 0


async def test_a_full_room_refuses_the_tenant_holding_most_of_it_not_a_newcomer():
    room = rooms(max_waiting=4)
    room.started(MODEL, "flood")
    flood = [asyncio.create_task(room.wait(MODEL, Waiter("flood", 1.0, next(_arrivals)), 60)) for _ in range(4)]
    await settle()
    quiet = asyncio.create_task(room.wait(MODEL, Waiter("quiet", 1.0, next(_arrivals)), 60))
    await settle()
    with pytest.raises(RoomFull):
        await flood[3]  # the flood's newest gave its place to the quiet tenant
    assert room.waiting == 4 and room.queued(MODEL, "quiet") == 1
    with pytest.raises(RoomFull):  # the flood holds the most of the room: its newcomer is refused
        await room.wait(MODEL, Waiter("flood", 1.0, next(_arrivals)), 60)
    room.ended(MODEL, "flood", 1.0, served=True, replica_id="r1")
    assert await asyncio.wait_for(quiet, 5)
    for task in flood[:3]:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    assert room.waiting == 0 and len(room) == 0


async def test_a_higher_class_is_woken_first_and_fairness_holds_within_a_class():
    room = rooms()
    holder = ("x", 1)  # one slot: who holds it, and its class
    room.started(MODEL, *holder)
    woken: list[str] = []

    async def wait(tenant: str, priority: int) -> None:
        nonlocal holder
        assert await room.wait(MODEL, Waiter(tenant, 1.0, next(_arrivals), priority), 60)
        room.started(MODEL, tenant, priority)
        holder = (tenant, priority)
        woken.append(f"{tenant}/{priority}")

    tasks = []
    for tenant, priority in (("batch", 2), ("batch", 2), ("a", 1), ("a", 1), ("b", 1), ("live", 0)):
        tasks.append(asyncio.create_task(wait(tenant, priority)))
        await settle()
    assert room.queued(MODEL, "batch", 2) == 2 and room.queued(MODEL, "batch") == 0
    for _ in range(7):
        room.ended(MODEL, holder[0], 1.0, served=True, replica_id="r1", priority=holder[1])
        await settle()
    await asyncio.gather(*tasks)
    # interactive, then standard (a and b alternate, a waited longest), batch last
    assert woken == ["live/0", "a/1", "b/1", "a/1", "batch/2", "batch/2"], woken
    assert room.waiting == 0 and len(room) == 0


async def test_in_flight_counts_per_class_a_tenants_batch_work_does_not_count_against_its_online_requests():
    room = rooms()
    for _ in range(3):
        room.started(MODEL, "a", priority=2)  # a's batch lines hold three slots
    room.started(MODEL, "b")                  # b's one online request holds one
    woken: list[str] = []

    async def wait(tenant: str) -> None:
        assert await room.wait(MODEL, Waiter(tenant, 1.0, next(_arrivals)), 60)
        woken.append(tenant)

    tasks = [asyncio.create_task(wait("b"))]
    await settle()
    tasks.append(asyncio.create_task(wait("a")))
    await settle()
    room.ended(MODEL, "a", 1.0, served=True, replica_id="r1", priority=2)
    await settle()
    assert woken == ["a"]  # in its class, a holds nothing and b one
    room.ended(MODEL, "b", 1.0, served=True, replica_id="r1")
    await asyncio.gather(*tasks)
    for _ in range(2):
        room.ended(MODEL, "a", 1.0, served=True, replica_id="r1", priority=2)
    assert room.waiting == 0 and len(room) == 0


async def test_a_full_room_pushes_out_the_lowest_class_first():
    room = rooms(max_waiting=3)
    room.started(MODEL, "x")
    batch = [asyncio.create_task(room.wait(MODEL, Waiter("q", 1.0, next(_arrivals), 2), 60)) for _ in range(2)]
    await settle()
    standard = asyncio.create_task(room.wait(MODEL, Waiter("q", 1.0, next(_arrivals), 1), 60))
    await settle()
    live = asyncio.create_task(room.wait(MODEL, Waiter("q", 1.0, next(_arrivals), 0), 60))
    await settle()
    with pytest.raises(RoomFull):
        await batch[1]  # the newest batch waiter made room, though its tenant is the newcomer's
    with pytest.raises(RoomFull):  # a batch newcomer finds no lower class to push out
        await room.wait(MODEL, Waiter("other", 1.0, next(_arrivals), 2), 60)
    room.ended(MODEL, "x", 1.0, served=True, replica_id="r1")
    assert await asyncio.wait_for(live, 5) and not standard.done()
    for task in (batch[0], standard):
        task.cancel()
    await asyncio.gather(batch[0], standard, return_exceptions=True)
    assert room.waiting == 0 and len(room) == 0


async def test_a_probe_a_replica_took_wakes_two_more_and_a_freed_slots_wake_none():
    room = rooms(poll=0.3)
    waiters = [Waiter("a", 1.0, next(_arrivals)) for _ in range(7)]
    waits = [asyncio.create_task(room.wait(MODEL, w, 60)) for w in waiters]
    await settle()
    done, _ = await asyncio.wait(waits, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert [w.done() for w in waits] == [True] + [False] * 6  # the fallback woke the head: a probe
    room.started(MODEL, "a")
    room.accepted(MODEL, waiters[0])  # a replica took it: room may have appeared in bulk
    await settle()
    assert [w.done() for w in waits] == [True] * 3 + [False] * 4
    for w in waiters[1:3]:
        room.started(MODEL, "a")
        room.accepted(MODEL, w)
    await settle()
    assert all(w.done() for w in waits)  # 1, then 2, then 4: in three round trips, not seven polls
    for _ in range(3):
        room.started(MODEL, "a")
    for _ in range(6):
        room.ended(MODEL, "a", 1.0, served=True, replica_id="r1")

    # a wake for one freed slot is no probe: its request taken, nobody else is woken
    room.started(MODEL, "x")
    freed = [Waiter("b", 1.0, next(_arrivals)) for _ in range(2)]
    waits = [asyncio.create_task(room.wait(MODEL, w, 60)) for w in freed]
    await settle()
    room.ended(MODEL, "x", 1.0, served=True, replica_id="r1")
    await settle()
    assert waits[0].done() and not waits[1].done()
    room.started(MODEL, "b")
    room.accepted(MODEL, freed[0])
    await settle()
    assert not waits[1].done()
    waits[1].cancel()
    await asyncio.gather(*waits, return_exceptions=True)
    room.ended(MODEL, "b", 1.0, served=True, replica_id="r1")
    assert room.waiting == 0 and len(room) == 0


async def test_a_flood_on_one_model_cannot_lock_a_quiet_tenant_of_another_out():
    room = rooms(max_waiting=3)
    room.started("big", "flood")
    room.started("small", "x")
    flood = [asyncio.create_task(room.wait("big", Waiter("flood", 1.0, next(_arrivals)), 60)) for _ in range(3)]
    await settle()
    quiet = asyncio.create_task(room.wait("small", Waiter("quiet", 1.0, next(_arrivals)), 60))
    await settle()
    with pytest.raises(RoomFull):
        await flood[2]  # pushed out of the other model's room
    assert room.waiting == 3 and room.queued("small", "quiet") == 1 and room.queued("big", "flood") == 2
    room.ended("small", "x", 1.0, served=True, replica_id="r2")
    assert await asyncio.wait_for(quiet, 5)
    for task in flood[:2]:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    room.ended("big", "flood", 1.0, served=True, replica_id="r1")
    assert room.waiting == 0 and len(room) == 0
