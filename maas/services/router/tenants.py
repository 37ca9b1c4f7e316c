"""Tenants at the front door: API keys checked against a local mirror of `tenants/keys/`
(no round trip per request), and per-tenant limits (requests per minute, tokens per
minute, requests in flight).

With several routers, each enforces its share of a limit (limit / live routers, from the
`services/router/` mirror), so the fleet-wide limit holds without coordination per
request. Buckets refill continuously: a tenant at 60 requests per minute may send one
more each second, and a burst of up to a minute's worth.

Keys come from the runtime's `Authorizer` (one mirror of `tenants/keys/` per process), so
the HTTP API and gRPC admit the same callers: a key whose role may call models (a tenant's
`inference` or `developer` key, or the admin), for a deployment its tenant may see (its
own or the platform's; another tenant's is NOT_FOUND, as if it did not exist). A mesh
started with `--insecure` admits everyone, unlimited.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from maas.mesh.auth import key_hash
from maas.mesh.authz import Authorizer, Principal
from maas.mesh.discovery import PrefixMirror
from maas.mesh.errors import NotFound, PermissionDenied, ResourceExhausted, Unauthenticated
from maas.mesh.etcd import EtcdSession
from maas.v1 import mesh_pb2, registry_pb2

log = logging.getLogger(__name__)

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
        self.tenant = (key.tenant or "-") if key is not None else "-"  # "-": no tenant (the admin)
        self.tokens = 0
        self.state = state  # the tenant's counters, while the request holds a place in them


Caller = str | Principal  # the key as an HTTP request sent it, or who the gRPC interceptor found


def _everyone(model: str) -> str:
    return ""


def _missing(model: str) -> str:
    return f"model {model!r} is not registered"


class Gate:
    """`owner(model)` names the tenant a model or deployment belongs to ("" for the platform)."""

    def __init__(self, session: EtcdSession, authorizer: Authorizer,
                 owner: Callable[[str], str] = _everyone, not_found: Callable[[str], str] = _missing) -> None:
        self.authorizer = authorizer
        self.owner = owner
        self.not_found = not_found  # the message a missing model gets: another tenant's gets the same
        self.routers = PrefixMirror(session, session.keys.services("router"), mesh_pb2.ServiceInfo)
        self.tenants: dict[str, _Tenant] = {}

    async def start(self) -> None:
        await self.routers.start()

    async def close(self) -> None:
        await self.routers.close()

    def identify(self, who: Caller) -> Principal | None:
        """Who calls: the principal the gRPC interceptor authenticated, or the one an HTTP
        request's key proves; None on an --insecure mesh. Unauthenticated for no key or one the
        mesh does not know, PermissionDenied for a key that may not call models."""
        if not self.authorizer.enforce:
            return None
        if isinstance(who, Principal):
            principal = who
        elif not who:
            REJECTED.labels("-", "no_key").inc()
            raise Unauthenticated("an API key is required: send `Authorization: Bearer <key>` "
                                  "(create one with `maas keys create --tenant NAME`)")
        else:
            digest = key_hash(who)
            info = self.authorizer.known(digest)
            if info is None:
                REJECTED.labels("-", "bad_key").inc()
                raise Unauthenticated("the API key is not valid (unknown or revoked)")
            principal = self.authorizer.principal(digest, info)
        if "inference" not in principal.roles:
            REJECTED.labels("-", "role").inc()
            raise PermissionDenied(f"{principal.describe()} may not call models")
        return principal

    def visible(self, who: Principal | None, model: str) -> bool:
        """Whether the caller's tenant may see `model` at all (its own or the platform's)."""
        return who is None or who.may_see(self.owner(model))

    def may_use(self, who: Principal | None, model: str) -> bool:
        key = who.key if who is not None else None
        return who is None or (self.visible(who, model) and (
            key is None or not key.models or model.partition("@")[0] in key.models))

    def admit(self, who: Caller, model: str, adapter: str = "") -> Ticket:
        """Admit one request for `model` (with `adapter`, if any) or raise; `release` the
        ticket when it ends."""
        principal = self.identify(who)
        if principal is None or principal.key is None:  # --insecure, or the admin token itself
            return Ticket(None)
        info = principal.key
        for name, field_name in ((model, "model"), (adapter, "adapter")):
            if name and not self.visible(principal, name):
                REJECTED.labels(info.tenant, "model").inc()
                raise NotFound(self.not_found(name), field=field_name)
        if not self.may_use(principal, model):
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
