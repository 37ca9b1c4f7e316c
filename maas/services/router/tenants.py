"""Tenants at the front door: API keys checked against a local mirror of `tenants/keys/`
(no round trip per request), and per-tenant limits (requests per minute, tokens per
minute, requests in flight).

With several routers, each enforces its share of a limit (limit / live routers, from the
`services/router/` mirror), so the fleet-wide limit holds without coordination per
request. Buckets refill continuously: a tenant at 60 requests per minute may send one
more each second, and a burst of up to a minute's worth.

Auth modes: `required` refuses requests without a valid key; `off` admits everyone;
`auto` (the default) is open while the mesh has no key at all and required as soon as
one exists, so a fresh development mesh works without keys and `maas keys create` locks it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from prometheus_client import Counter

from maas.mesh.auth import key_hash
from maas.mesh.discovery import PrefixMirror
from maas.mesh.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from maas.mesh.etcd import EtcdSession
from maas.v1 import mesh_pb2, registry_pb2

log = logging.getLogger(__name__)

AUTH_MODES = ("auto", "required", "off")

REJECTED = Counter("maas_router_rejected_requests_total", "Requests refused at the front door.",
                   ["tenant", "reason"])


@dataclass
class Bucket:
    """A token bucket: `capacity` at most, refilled at `capacity` per `period` seconds."""

    capacity: float
    period: float = 60.0
    level: float | None = None  # None: full on first use (a debit may take it below zero)
    stamp: float = field(default_factory=time.monotonic)

    def resize(self, capacity: float) -> None:
        if self.level is None:
            self.level = capacity
        self.capacity = capacity

    @property
    def amount(self) -> float:
        return self.capacity if self.level is None else self.level

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.amount + (now - self.stamp) * self.capacity / self.period)
        self.stamp = now

    def take(self, amount: float) -> None:
        self.level = self.amount - amount

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0: now)."""
        have = self.amount
        return 0.0 if have >= amount else (amount - have) * self.period / max(self.capacity, 1e-9)


@dataclass
class _Tenant:
    requests: Bucket = field(default_factory=lambda: Bucket(0))
    tokens: Bucket = field(default_factory=lambda: Bucket(0))
    in_flight: int = 0


class Ticket:
    """An admitted request: who sent it, and the tokens it used (set when known)."""

    __slots__ = ("key", "tenant", "tokens", "state")

    def __init__(self, key: registry_pb2.ApiKey | None, state: _Tenant | None = None) -> None:
        self.key = key
        self.tenant = key.tenant if key is not None else "-"
        self.tokens = 0
        self.state = state  # the tenant's counters, while the request holds a place in them


class Gate:
    def __init__(self, session: EtcdSession, mode: str = "auto") -> None:
        if mode not in AUTH_MODES:
            raise ValueError(f"auth mode must be one of {', '.join(AUTH_MODES)}")
        self.mode = mode
        self.keys = PrefixMirror(session, session.keys.api_keys(), registry_pb2.ApiKey)
        self.routers = PrefixMirror(session, session.keys.services("router"), mesh_pb2.ServiceInfo)
        self.tenants: dict[str, _Tenant] = {}

    async def start(self) -> None:
        await self.keys.start()
        await self.routers.start()

    async def close(self) -> None:
        await self.keys.close()
        await self.routers.close()

    def identify(self, api_key: str) -> registry_pb2.ApiKey | None:
        """The key's record; None when the mesh is open. Unauthenticated otherwise."""
        if self.mode == "off" or (self.mode == "auto" and not self.keys.items):
            return None
        if not api_key:
            REJECTED.labels("-", "no_key").inc()
            raise Unauthenticated("an API key is required: send `Authorization: Bearer <key>` "
                                  "(create one with `maas keys create --tenant NAME`)")
        info = self.keys.items.get(key_hash(api_key))
        if info is None:
            REJECTED.labels("-", "bad_key").inc()
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        return info

    @staticmethod
    def may_use(info: registry_pb2.ApiKey | None, model: str) -> bool:
        return info is None or not info.models or model.partition("@")[0] in info.models

    def admit(self, api_key: str, model: str) -> Ticket:
        """Admit one request for `model` (or raise); `release` the ticket when it ends."""
        info = self.identify(api_key)
        if info is None:
            return Ticket(None)
        if not self.may_use(info, model):
            REJECTED.labels(info.tenant, "model").inc()
            raise PermissionDenied(f"tenant {info.tenant!r} may not use model {model!r} "
                                   f"(its key allows: {', '.join(info.models)})", field="model")
        state = self.tenants.setdefault(info.tenant, _Tenant())
        share = 1 / max(1, len(self.routers.items))
        now = time.monotonic()
        if info.max_concurrent:
            limit = max(1, math.floor(info.max_concurrent * share))
            if state.in_flight >= limit:
                REJECTED.labels(info.tenant, "concurrency").inc()
                raise ResourceExhausted(f"tenant {info.tenant!r} has {state.in_flight} requests in flight, its "
                                        f"limit here ({info.max_concurrent} across the routers)", retry_after=1)
        for bucket, limit, need, what in ((state.requests, info.rpm, 1.0, "requests"),
                                          (state.tokens, info.tpm, 1.0, "tokens")):
            if not limit:
                continue
            bucket.resize(limit * share)
            bucket.refill(now)
            if wait := bucket.wait_for(need):
                REJECTED.labels(info.tenant, f"{what}_per_minute").inc()
                raise ResourceExhausted(f"tenant {info.tenant!r} is over its limit of {limit} {what} per minute; "
                                        f"retry in {math.ceil(wait)}s", retry_after=wait)
        if info.rpm:
            state.requests.take(1)
        state.in_flight += 1
        return Ticket(info, state)

    @staticmethod
    def release(ticket: Ticket) -> None:
        """The request ended: its place and its tokens are accounted for (once)."""
        state, ticket.state = ticket.state, None
        if state is None or ticket.key is None:
            return
        state.in_flight -= 1
        if ticket.key.tpm:  # tokens are known at the end: the bucket may go below zero, then refills
            state.tokens.refill(time.monotonic())
            state.tokens.take(ticket.tokens)
