"""Requests that wait in the router for room on a full model, shared fairly between tenants.

With `maas router --queue-timeout S`, a request that finds every replica of its model full
(each refused it, for its tenant, with a retry hint) waits here instead of being shed at
once. The policy (docs/fairness.md#the-routers-waiting-room):

- **One room per model** (as the request names it), and in it one first-come-first-served
  queue per class and tenant. A request whose tenant already has requests of its class
  waiting joins the end of that queue rather than trying the replicas ahead of them.
- **Classes first**, as in the engine's queue (fair.py): a waiter of the highest class
  waiting (`interactive`, then `standard`, then `batch`; a request inside its tenant's
  reservation counts a class up) is woken before any of a lower class; the fair order
  below holds within a class.
- **When room may have appeared**, waiting requests are woken in weighted-fair order, and
  each tries the replicas again:
  - one of this router's requests on a replica the room's model uses ended after the
    replica took it (`ended(served=True)`): one waiter, for the one slot that freed;
  - after `poll` seconds with requests waiting and none of the above (a fallback: a
    replica's "full" mark expired, another router's request ended, a replica joined): the
    head of each queue, so nothing waits forever. (Not sooner: a fallback wake racing the
    waiter just woken for a freed slot could take the slot out of turn.) Such a wake is a
    *probe*: room may have appeared in bulk (a new replica's whole batch), so a probe a
    replica took (`accepted`) wakes two more probes, and the room fills in a few round
    trips rather than at one request per queue and `poll`. A wake for one freed slot is
    no probe and starts no chain, so it costs the busy replica no extra refusals.
- **Weighted-fair order** within a class: first the tenant with the fewest of this
  router's requests of that class in flight on the model for its weight; then the tenant that has been
  served least for its weight (start-time fair queuing: each request a replica took
  advances its tenant's virtual time by 1 / weight, and a tenant that was idle starts
  again at the room's current virtual time, so idling banks no credit); then whoever
  waited longest. So a quiet tenant's one waiting request goes before a flooding tenant's
  many earlier ones, equal tenants alternate, and weights give proportional turns. A
  tenant with nothing waiting takes no turn: the room is work-conserving.
- **A woken request refused again** (the room it was woken for was taken first) goes
  back to the head of its tenant's queue, not the end, and keeps its arrival time.
- **Bounded**: at most `max_waiting` requests wait in the router, over all its rooms.
  When that many wait, a newcomer takes the place of the newest waiter of the lowest class
  below its own, in any room; else, in its own class, of the tenant that holds the most
  waiting places for its weight, router-wide (that one is refused, `RoomFull`), or is
  refused itself if its tenant holds the most already: a flood, on one model or many,
  cannot fill the room and lock a quiet tenant or a higher class out.
- A waiter that leaves (its time is up, its client went away) leaves its queue at once; a
  turn it was given and did not use goes to the next. A room that holds no waiter and no
  request in flight is forgotten.

Pure asyncio, no I/O: the router's `_Attempts` (forward.py) decides when a request waits,
checks the replicas after each wake, and sheds what this refuses.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

POLL_SECONDS = 0.1
MAX_WAITING = 1024


class RoomFull(Exception):
    """The router's waiting room is full and this request's tenant holds the most of it."""


@dataclass(eq=False)
class Waiter:
    """One request's place in a room, kept from its first wait to its last."""

    tenant: str
    weight: float
    since: float  # when it first waited (time.monotonic()): who waited longest goes first on a tie
    priority: int = 1  # its class: 0 interactive, 1 standard, 2 batch (service_classes.priority)
    turns: int = 0  # times it was woken
    probe: bool = False  # its last wake was the fallback's (see `accepted`)
    woken: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def queue(self) -> tuple[int, str]:
        return self.priority, self.tenant


Queue = tuple[int, str]  # (priority, tenant): one queue of a room, and what it has in flight


class _Room:
    """One model's waiting requests, and this router's requests in flight on it."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.queues: dict[Queue, deque[Waiter]] = {}  # (priority, tenant) -> its waiters, oldest first
        self.running: dict[Queue, int] = {}           # (priority, tenant) -> requests in flight on the model
        self.served: dict[str, float] = {}          # tenant -> virtual time after its last request served
        self.clock = 0.0                            # the virtual time of the last request served
        self.timer: asyncio.TimerHandle | None = None

    def idle(self) -> bool:
        return not self.queues and not self.running

    def tag(self, tenant: str) -> float:
        """The tenant's virtual time: how much it has been served for its weight, never
        behind the room's clock (an idle tenant banks no credit)."""
        return max(self.served.get(tenant, 0.0), self.clock)

    def charge(self, tenant: str, weight: float) -> None:
        """A request of `tenant` was served (a replica took it)."""
        start = self.tag(tenant)
        self.clock = start
        self.served[tenant] = start + 1.0 / weight
        if len(self.served) > 64:  # a tenant at or behind the clock is as if never served
            self.served = {t: v for t, v in self.served.items() if v > start}

    def first(self, extra: dict[Queue, int], exclude: Collection[Queue] = ()) -> Queue | None:
        """The queue whose waiter goes next (None: none): of the highest class waiting, the
        fairest tenant's; leaving out `exclude` (`extra`: turns given in this same wake,
        counted as in flight already)."""
        def rank(key: Queue) -> tuple[int, float, float, float]:
            head = self.queues[key][0]
            weight = _positive(head.weight)
            more = extra.get(key, 0)
            return (key[0], (self.running.get(key, 0) + more) / weight, self.tag(key[1]) + more / weight,
                    head.since)
        return min((k for k in self.queues if k not in exclude), key=rank, default=None)

    def pop(self, key: Queue, *, newest: bool = False) -> Waiter:
        queue = self.queues[key]
        waiter = queue.pop() if newest else queue.popleft()
        if not queue:
            del self.queues[key]
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        queue = self.queues.get(waiter.queue)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        if not queue:
            del self.queues[waiter.queue]
        return True


class WaitingRooms:
    """The router's waiting rooms, one per model (see the module's docstring for the policy).

    `serves(model, replica_id)` says whether a replica serves a model: a request ending on
    it frees room for that model's waiters."""

    def __init__(self, serves: Callable[[str, str], bool], *, max_waiting: int = MAX_WAITING,
                 poll: float = POLL_SECONDS) -> None:
        self.serves = serves
        self.max_waiting = max_waiting
        self.poll = poll
        self.waiting = 0  # requests in a queue, over every room
        self._rooms: dict[str, _Room] = {}

    def __len__(self) -> int:
        """Rooms held: models with requests waiting or in flight."""
        return len(self._rooms)

    def queued(self, model: str, tenant: str, priority: int = 1) -> int:
        """Requests of `tenant` of class `priority` waiting for `model`."""
        room = self._rooms.get(model)
        queue = room.queues.get((priority, tenant)) if room is not None else None
        return len(queue) if queue is not None else 0

    # -- requests in flight ----------------------------------------------------------------

    def started(self, model: str, tenant: str, priority: int = 1) -> None:
        """A call of `tenant`'s request of class `priority` went to a replica of `model`."""
        room = self._room(model)
        room.running[priority, tenant] = room.running.get((priority, tenant), 0) + 1

    def ended(self, model: str, tenant: str, weight: float, *, served: bool, replica_id: str,
              priority: int = 1) -> None:
        """That call ended. `served`: the replica had taken the request (not refused it), so
        its slot is free now: one waiter of each room the replica serves is woken."""
        room = self._rooms.get(model)
        if room is not None:
            left = room.running.get((priority, tenant), 0) - 1
            if left > 0:
                room.running[priority, tenant] = left
            else:
                room.running.pop((priority, tenant), None)
            if served:
                room.charge(tenant, _positive(weight))
        if served:
            for other in list(self._rooms.values()):
                if other.queues and (other is room or self.serves(other.model, replica_id)):
                    self._wake(other, 1)
                    self._arm(other, again=True)  # the fallback only after `poll` s without one
        if room is not None:
            self._tidy(room)

    def accepted(self, model: str, waiter: Waiter) -> None:
        """A replica took the request `waiter` stood for, after a wake. If that wake was a
        probe (the fallback's), room appeared without a request ending, maybe much of it:
        two more waiters of the model are woken, as probes too."""
        if not waiter.probe:
            return
        waiter.probe = False
        room = self._rooms.get(model)
        if room is not None and room.queues:
            self._wake(room, 2, probe=True)

    # -- waiting ---------------------------------------------------------------------------

    async def wait(self, model: str, waiter: Waiter, timeout: float) -> bool:
        """Queue `waiter` for `model` (at its queue's tail the first time, at the head after
        a turn) and wait for a turn: True when woken (try the replicas), False once
        `timeout` seconds passed. Raises RoomFull when the router's room is full and this
        tenant holds the most of it, at once or later (pushed out by another tenant's
        newcomer)."""
        room = self._room(model)
        try:
            self._make_room(room, waiter)
        except RoomFull:
            self._tidy(room)
            raise
        loop = asyncio.get_running_loop()
        woken = waiter.woken = loop.create_future()
        queue = room.queues.setdefault(waiter.queue, deque())
        if waiter.turns:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        self.waiting += 1
        self._arm(room)
        try:
            await asyncio.wait((woken,), timeout=max(0.0, timeout))
            if woken.done():
                woken.result()  # RoomFull if it was pushed out
                return True
            return False
        except BaseException:
            if woken.done() and not woken.cancelled() and woken.exception() is None:
                self._wake(room, 1, probe=waiter.probe)  # woken, but leaving: its turn goes to the next
            raise
        finally:
            if not woken.done():
                woken.cancel()
                if room.remove(waiter):
                    self.waiting -= 1
            waiter.woken = None
            self._tidy(room)

    def _make_room(self, room: _Room, waiter: Waiter) -> None:
        """With the router's room full, push out a waiter for `waiter` (see the module's
        docstring), or raise RoomFull. Counted router-wide: a flood on one model must not
        lock out a quiet tenant of another."""
        if self.waiting < self.max_waiting:
            return
        held: dict[Queue, float] = {}  # (priority, tenant) -> waiting places over every room, for its weight
        for r in self._rooms.values():
            for key, q in r.queues.items():
                held[key] = held.get(key, 0.0) + len(q) / _positive(q[0].weight)
        lower = [key for key in held if key[0] > waiter.priority]
        if lower:  # the lowest class below the newcomer's, the tenant holding most of it
            worst = max(key[0] for key in lower)
            victim = max((held[k], k) for k in lower if k[0] == worst)[1]
        else:  # its own class: the tenant most over its share, if that is not the newcomer's
            own = held.get(waiter.queue, 0.0) + 1 / _positive(waiter.weight)
            shares = [(v, k) for k, v in held.items() if k[0] == waiter.priority and k != waiter.queue]
            if not shares or max(shares)[0] <= own:
                raise RoomFull(f"{self.waiting} requests wait in this router already, its limit")
            victim = max(shares)[1]
        # its newest waiter, from the room where it waits most
        where = max((r for r in self._rooms.values() if victim in r.queues), key=lambda r: len(r.queues[victim]))
        pushed = where.pop(victim, newest=True)
        self.waiting -= 1
        if pushed.woken is not None and not pushed.woken.done():
            pushed.woken.set_exception(RoomFull(f"{self.max_waiting} requests wait in this router, its limit; "
                                                "another tenant's request took this one's place"))

    def _wake(self, room: _Room, n: int, *, per_tenant: bool = False, probe: bool = False) -> None:
        """Wake up to `n` waiters of `room`, classes first and in weighted-fair order within
        one (`per_tenant`: at most one of each queue; `probe`: the fallback's wake)."""
        extra: dict[Queue, int] = {}
        while n > 0 and room.queues:
            key = room.first(extra, exclude=extra if per_tenant else ())
            if key is None:
                break
            waiter = room.pop(key)
            self.waiting -= 1
            extra[key] = extra.get(key, 0) + 1
            if waiter.woken is not None and not waiter.woken.done():
                waiter.turns += 1
                waiter.probe = probe
                waiter.woken.set_result(None)
                n -= 1

    def _arm(self, room: _Room, *, again: bool = False) -> None:
        """Start the fallback's timer while the room holds waiters (`again`: restart it)."""
        if room.timer is not None and again:
            room.timer.cancel()
            room.timer = None
        if room.timer is None and room.queues:
            room.timer = asyncio.get_running_loop().call_later(self.poll, self._poll, room)

    def _poll(self, room: _Room) -> None:
        """The fallback: wake the head of each queue, classes first, in weighted-fair order."""
        room.timer = None
        if room.queues:
            self._wake(room, len(room.queues), per_tenant=True, probe=True)
        self._arm(room)
        self._tidy(room)

    def _room(self, model: str) -> _Room:
        room = self._rooms.get(model)
        if room is None:
            room = self._rooms[model] = _Room(model)
        return room

    def _tidy(self, room: _Room) -> None:
        """Forget a room with no waiter and nothing in flight (its history included)."""
        if not room.queues and room.timer is not None:
            room.timer.cancel()
            room.timer = None
        if room.idle() and self._rooms.get(room.model) is room:
            del self._rooms[room.model]


def _positive(weight: float) -> float:
    return weight if weight > 0 else 1.0
