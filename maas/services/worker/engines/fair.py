"""Weighted fair sharing of an engine's batch slots across tenants (issue 14).

Requests wait per tenant, first come first served within a tenant. A free slot goes to the
waiting tenant that holds the fewest slots for its weight (running / weight), so under
contention each active tenant holds about its weight's share of the slots, and so of the
tokens made (every running sequence makes one token a step); a tenant with nothing waiting
leaves its share to the others (work-conserving).

When a tenant waits while another holds more than its share, the scheduler pre-empts the
other's most recently admitted sequence (`over_share`): it leaves the batch and its KV is
released, and it goes back to the front of its tenant's queue with the tokens it made, to
be prefilled again and continue exactly where it was (sampling depends only on the seed and
the position), as a stream moved to another worker does.

A full queue refuses a newcomer only if its tenant already has its share of the queue;
otherwise the newest request of the tenant most over its share is refused instead
(`push_out`), so a flood cannot fill the queue and lock a quiet tenant out.

The queue is the scheduler's own structure: every method is called with the engine's lock
held. Sequences need `tenant` (str) and `weight` (> 0) attributes.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar


class Fair(Protocol):
    tenant: str
    weight: float


S = TypeVar("S", bound=Fair)


class FairQueue(Generic[S]):
    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[S]] = {}
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
        self._queues.setdefault(seq.tenant, collections.deque()).append(seq)
        self._size += 1

    def appendleft(self, seq: S) -> None:
        """A pre-empted sequence: first of its tenant's again."""
        self._queues.setdefault(seq.tenant, collections.deque()).appendleft(seq)
        self._size += 1

    def remove(self, seq: S) -> None:
        q = self._queues.get(seq.tenant)
        if q is None:
            raise ValueError("not queued")
        q.remove(seq)
        self._size -= 1
        if not q:
            del self._queues[seq.tenant]

    def clear(self) -> None:
        self._queues.clear()
        self._size = 0

    def waiting(self, tenant: str) -> int:
        q = self._queues.get(tenant)
        return len(q) if q is not None else 0

    def tenants(self) -> list[str]:
        return list(self._queues)

    def weight_of(self, tenant: str) -> float:
        """The weight of a waiting tenant (its first request's)."""
        return self._queues[tenant][0].weight

    def next(self, running: dict[str, int]) -> S | None:
        """The sequence a free slot goes to (not removed): the first of the waiting tenant
        holding the fewest slots for its weight (`running`: slots per tenant); ties go to
        the one that waited longest."""
        best: S | None = None
        best_key: tuple[float, float] | None = None
        for tenant, q in self._queues.items():
            head = q[0]
            key = (running.get(tenant, 0) / head.weight, float(getattr(head, "arrived", 0.0)))
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def pop(self, seq: S) -> S:
        """Take `seq` (what `next` chose) out of the queue."""
        self.remove(seq)
        return seq

    def push_out(self, newcomer: S, capacity: int) -> S | None:
        """The queue is full (`capacity` places) and `newcomer` arrives: the newest request
        of the tenant most over its share of the queue, if the newcomer's tenant is under
        its own share (that request is refused in the newcomer's place); None when the
        newcomer itself should be refused."""
        weights = {t: q[0].weight for t, q in self._queues.items()}
        weights[newcomer.tenant] = newcomer.weight
        total = sum(weights.values())
        if self.waiting(newcomer.tenant) + 1 > capacity * newcomer.weight / total:
            return None  # it has its share already
        over = max((t for t in self._queues if t != newcomer.tenant),
                   key=lambda t: self.waiting(t) / weights[t], default=None)
        if over is None or self.waiting(over) <= capacity * weights[over] / total:
            return None
        victim = self._queues[over][-1]
        self.remove(victim)
        return victim


def fair_shares(slots: int, weights: dict[str, float]) -> dict[str, float]:
    """Each tenant's share of `slots` by weight."""
    total = sum(weights.values())
    return {t: slots * w / total for t, w in weights.items()} if total else {}


def over_share(running: list[Any], waiting: FairQueue[Any], slots: int) -> Any | None:
    """A running sequence to pre-empt so that a waiting tenant gets its share, or None.

    Only when some tenant waits while holding less than its share, and another holds more
    than its own: then that other tenant's most recently admitted sequence (the one with
    the least work to redo)."""
    if not waiting or not running:
        return None
    held: dict[str, list[Any]] = {}
    weights: dict[str, float] = {}
    for seq in running:
        held.setdefault(seq.tenant, []).append(seq)
        weights[seq.tenant] = seq.weight
    for tenant in waiting.tenants():
        weights.setdefault(tenant, waiting.weight_of(tenant))
    shares = fair_shares(slots, weights)
    starved = [t for t in waiting.tenants() if len(held.get(t, ())) + 1 <= shares[t] + 1e-9]
    if not starved:
        return None
    over = [t for t, seqs in held.items() if len(seqs) - 1 >= shares[t] - 1e-9 and t not in starved]
    if not over:
        return None
    greediest = max(over, key=lambda t: len(held[t]) / weights[t])
    return held[greediest][-1]


__all__ = ["FairQueue", "fair_shares", "over_share"]
