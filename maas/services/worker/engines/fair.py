"""Priority classes and weighted fair sharing of an engine's batch slots and KV cache (issue 14).

Every request has a class (`priority`: 0 interactive, 1 standard, 2 batch) and a tenant with
a weight. An engine has two resources a request holds while it runs: a batch slot, and
its KV reservation (prompt plus max_tokens) out of the KV budget. A tenant's use of the
engine is its dominant share, the larger of its part of the slots and its part of the
budget (dominant resource fairness), so a tenant of few long requests is charged for the
cache they hold. A free slot goes to the highest class that has a request waiting; within
a class, to the waiting tenant with the least use for its weight (ties: whoever waited
longest), first come first served within a tenant. Under contention each active tenant of
a class holds about its weight's share of what higher classes leave, and so of the tokens
made (every running sequence makes one token a step); a tenant or class with nothing
waiting leaves its share to the others (work-conserving).

The scheduler pre-empts (`victim`) when the batch is full, or the KV budget cannot hold
the request a free slot would go to next, and
- a request waits while a sequence of a lower class runs: one of the lowest class's
  sequences leaves (batch work yields at once to online traffic), or else
- a tenant waits that would still be within its share of the rows (the batch's slots, or
  as many as the KV budget holds now) with its next request admitted, while another
  tenant of that class holds more than its own: one of the latter's sequences. When the
  KV budget is what ran out, sequences are pre-empted only if that makes room for the
  request (`HFEngine._preempt`).
The one chosen has not been pre-empted before if possible, then has the fewest tokens to
prefill again (so no sequence is pushed back over and over). With a TTFT objective
(the engine option `ttft_objective_ms`), a lower class is pre-empted only once the waiting
request would otherwise miss it: while a slot will free up (a running sequence reaching its
max_tokens, at the measured step time) before the oldest waiting request of the higher
class has waited that long, it waits instead, and no work is thrown away.
A pre-empted sequence leaves the batch and its KV is released; it goes back to the front of
its queue with the tokens it made, to be prefilled again and continue exactly where it was
(sampling depends only on the seed and the position), as a stream moved to another worker
does.

A full queue refuses a newcomer only when nothing can make room for it (`push_out`): the
newest waiting request of a lower class goes first; within its class, the newest request of
the tenant most over its share, if the newcomer's tenant is under its own. A pre-empted
sequence is never refused (its client has tokens already). A flood cannot
fill the queue and lock a quiet tenant, or online traffic, out.

Provisioned throughput (`Reservation`): a tenant with a reserved rate on the replica has a
token bucket here, filled at that rate and charged what its promoted requests make (up to a
second of the rate when promoted, the rest settled when they end). While it holds tokens, the tenant's
waiting `standard` requests are promoted a class up, first come first served (`promote`),
so they are admitted, and pre-empt, as interactive ones do. Decided at scheduling time, not
when a request arrived: a request that queued while the bucket was empty is promoted once
it refills, so a tenant with a few streams in flight gets its rate, not only its newcomers.

The queue is the scheduler's own structure: every method is called with the engine's lock
held. Sequences need `tenant` (str), `weight` (> 0) and `priority` (int) attributes.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class Fair(Protocol):
    tenant: str
    weight: float
    priority: int


S = TypeVar("S", bound=Fair)


class FairQueue(Generic[S]):
    def __init__(self) -> None:
        self._queues: dict[tuple[int, str], collections.deque[S]] = {}  # (priority, tenant)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[S]:
        for q in self._queues.values():
            yield from q

    def __contains__(self, seq: object) -> bool:
        return any(seq in q for q in self._queues.values())

    def append(self, seq: S) -> None:
        self._queues.setdefault((seq.priority, seq.tenant), collections.deque()).append(seq)
        self._size += 1

    def appendleft(self, seq: S) -> None:
        """A pre-empted sequence: first of its tenant's again."""
        self._queues.setdefault((seq.priority, seq.tenant), collections.deque()).appendleft(seq)
        self._size += 1

    def remove(self, seq: S) -> None:
        key = (seq.priority, seq.tenant)
        q = self._queues.get(key)
        if q is None:
            raise ValueError("not queued")
        q.remove(seq)
        self._size -= 1
        if not q:
            del self._queues[key]

    def clear(self) -> None:
        self._queues.clear()
        self._size = 0

    def top(self) -> int | None:
        """The highest class (lowest number) with a request waiting."""
        return min((p for p, _ in self._queues), default=None)

    def oldest(self, priority: int) -> float | None:
        """When the longest-waiting request of class `priority` was queued (`queued_at`), or None."""
        times = [float(getattr(q[0], "queued_at", 0.0)) for (p, _), q in self._queues.items() if p == priority]
        return min(times, default=None)

    def waiting(self, tenant: str, priority: int | None = None) -> int:
        return sum(len(q) for (p, t), q in self._queues.items() if t == tenant and priority in (None, p))

    def tenants(self, priority: int) -> list[str]:
        return [t for p, t in self._queues if p == priority]

    def weight_of(self, tenant: str, priority: int) -> float:
        """The weight of a waiting tenant (its first request's)."""
        return self._queues[(priority, tenant)][0].weight

    def next(self, running: Mapping[tuple[int, str], float]) -> S | None:
        """The sequence a free slot goes to (not removed): in the highest class waiting, the
        first of the tenant holding the least of the engine for its weight (`running`: what
        each (priority, tenant) holds, in slots or as a dominant share: `HFEngine._usage`);
        ties go to the one that waited longest."""
        top = self.top()
        if top is None:
            return None
        best: S | None = None
        best_key: tuple[float, float] | None = None
        for (priority, tenant), q in self._queues.items():
            if priority != top:
                continue
            head = q[0]
            key = (running.get((priority, tenant), 0) / head.weight, float(getattr(head, "arrived", 0.0)))
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def promote(self, tenant: str, charge: Callable[[S], bool]) -> int:
        """Move `tenant`'s waiting standard requests to the interactive class, first come
        first served, while `charge(seq)` takes them (it charges the tenant's reservation
        and says whether there was anything left in it). Returns how many moved."""
        q = self._queues.get((1, tenant))
        moved = 0
        while q and charge(q[0]):
            seq = q.popleft()
            self._size -= 1
            seq.priority = 0
            self.append(seq)  # after the tenant's interactive requests
            moved += 1
        if q is not None and not q:
            del self._queues[(1, tenant)]
        return moved

    def pop(self, seq: S) -> S:
        """Take `seq` (what `next` chose) out of the queue."""
        self.remove(seq)
        return seq

    def push_out(self, newcomer: S, capacity: int) -> S | None:
        """The queue is full (`capacity` places) and `newcomer` arrives: the request refused
        in its place, or None when the newcomer itself should be refused. The newest
        request of the lowest class below the newcomer's goes first; else, within the
        newcomer's class, the newest of the tenant most over its share of the queue, if the
        newcomer's tenant is under its own."""
        for worst in sorted({p for p, _ in self._queues if p > newcomer.priority}, reverse=True):
            candidates = [s for (p, _), q in self._queues.items() if p == worst for s in q if _refusable(s)]
            if candidates:
                chosen = max(candidates, key=lambda s: float(getattr(s, "arrived", 0.0)))
                self.remove(chosen)
                return chosen
        cls = newcomer.priority
        weights = {t: self.weight_of(t, cls) for t in self.tenants(cls)}
        weights[newcomer.tenant] = newcomer.weight
        total = sum(weights.values())
        if self.waiting(newcomer.tenant, cls) + 1 > capacity * newcomer.weight / total:
            return None  # it has its share already
        over = max((t for t in self.tenants(cls) if t != newcomer.tenant),
                   key=lambda t: self.waiting(t, cls) / weights[t], default=None)
        if over is None or self.waiting(over, cls) <= capacity * weights[over] / total:
            return None
        refusable = [s for s in self._queues[(cls, over)] if _refusable(s)]
        if not refusable:
            return None
        self.remove(refusable[-1])
        return refusable[-1]


RESERVED_BURST = 1.0  # seconds of its reserved rate a tenant may save up on one engine


@dataclass
class Reservation:
    """A tenant's provisioned throughput on one engine: a token bucket filled at `rate`
    completion tokens a second, up to RESERVED_BURST seconds of it. Empty at first: a
    full one would let a tenant that can use more than its rate take every slot until it
    drained (seconds, at a rate near what the tenant uses), starving the others."""

    rate: float
    level: float = 0.0
    stamp: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)  # when a request last carried the rate

    @property
    def capacity(self) -> float:
        return self.rate * RESERVED_BURST

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def charge(self, left: int) -> int:
        """What a request that may still make `left` tokens takes to be promoted: at most
        the bucket's capacity (a request of a huge max_tokens that stops early must not
        empty it for many seconds), at least one token; 0, taking nothing, when the
        bucket is empty. The level may go below zero."""
        if self.level <= 0:
            return 0
        taken = max(1, min(left, int(self.capacity)))
        self.level -= taken
        return taken

    def settle(self, taken: int, made: int) -> None:
        """A promoted request ended having made `made` tokens: charge the difference from
        what it took (a refund when it made fewer)."""
        self.level -= made - taken


def _refusable(seq: Any) -> bool:
    """A queued request that may be refused to make room: not one that was pre-empted (its
    client has its first tokens already; it only waits to go on)."""
    return not getattr(seq, "preempted", 0)


def _cheapest(seqs: list[Any]) -> Any:
    """Of `seqs`, the one to pre-empt: not pre-empted before if possible (no sequence is
    pushed back over and over), then the fewest tokens to prefill again."""
    return min(reversed(seqs), key=lambda s: (getattr(s, "preempted", 0), getattr(s, "context", 0)))


def fair_shares(slots: float, weights: dict[str, float]) -> dict[str, float]:
    """Each tenant's share of `slots` by weight."""
    total = sum(weights.values())
    return {t: slots * w / total for t, w in weights.items()} if total else {}


def victim(running: list[Any], waiting: FairQueue[Any], capacity: int, *, classes: bool = True) -> Any | None:
    """A running sequence to pre-empt for a waiting one, or None (see the module's text).
    `capacity`: the rows shared, the batch's slots or as many as the KV budget holds.
    `classes` false: a lower class is not pre-empted for a higher one now (the higher one's
    request can still get a slot within its objective: `HFEngine._preempt`)."""
    top = waiting.top()
    if top is None or not running:
        return None
    lower = [s for s in running if s.priority > top]
    if lower and not classes:
        return None
    if lower:
        worst = max(s.priority for s in lower)
        candidates = [s for s in running if s.priority == worst]
        # not a sequence of a tenant waiting at that class, where another will do: a tenant's
        # own promoted request (provisioned throughput) taking its own standard sequence's
        # slot would gain it nothing and cost a prefill
        waiters = set(waiting.tenants(top))
        return _cheapest([s for s in candidates if s.tenant not in waiters] or candidates)
    # within the class: its share is what higher classes leave
    mine = [s for s in running if s.priority == top]
    return over_share(mine, waiting, capacity - (len(running) - len(mine)), top)


def over_share(running: list[Any], waiting: FairQueue[Any], capacity: float, priority: int = 1) -> Any | None:
    """Within one class: a running sequence to pre-empt so that a waiting tenant gets its
    share of `capacity` rows, or None. Only when some tenant waits that would still be
    within its share with one more row, and another holds more than its own: then the
    latter's sequence with the least work to redo. The two cannot swap roles next time (no
    ping-pong): the one pre-empted held more than its share, so with that row back it would
    not be within it; the one admitted is within its share, so not over it."""
    tenants = waiting.tenants(priority)
    if not tenants or not running:
        return None
    held: dict[str, list[Any]] = {}
    weights: dict[str, float] = {}
    for seq in running:
        held.setdefault(seq.tenant, []).append(seq)
        weights[seq.tenant] = seq.weight
    for tenant in tenants:
        weights.setdefault(tenant, waiting.weight_of(tenant, priority))
    shares = fair_shares(capacity, weights)
    holds = {t: len(seqs) for t, seqs in held.items()}
    starved = [t for t in tenants if holds.get(t, 0) + 1 <= shares[t] + 1e-9]
    if not starved:
        return None
    over = [t for t in held if holds[t] > shares[t] + 1e-9 and t not in starved]
    if not over:
        return None
    greediest = max(over, key=lambda t: holds[t] / weights[t])
    return _cheapest(held[greediest])


__all__ = ["FairQueue", "fair_shares", "over_share", "victim"]
