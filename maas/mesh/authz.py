"""Who is calling, and may they: identity on every RPC, checked in one place.

Every credential is a key (`maas/mesh/auth.py`) whose sha256 names a record under
`tenants/keys/` in etcd. The record says whose it is:

- a tenant's key with a role: `inference` (call models) or `developer` (also manage the
  tenant's models, deployments, jobs and inference keys);
- the platform administrator (`admin`): the admin token the registry installs at start,
  and admin keys made with `maas keys create --admin`;
- a service of the mesh (`service: router|worker|scheduler|registry`), whose key the
  operator (or `maas up`) makes and hands to that service alone.

The rule for each RPC is written beside it in protos/ (`option (maas.v1.access)`, see
access.proto) and read here from the descriptors, so the table cannot drift from the
services: an RPC without a rule is denied. `Authorizer.check` runs in the runtime's
interceptor for every call of every service; what a tenant may touch inside an allowed RPC
(its own resources and the platform catalog) the service checks against `caller()`.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from maas.mesh.auth import key_from_metadata, key_hash
from maas.mesh.discovery import PrefixMirror
from maas.mesh.errors import NotFound, PermissionDenied, Unauthenticated
from maas.mesh.etcd import EtcdSession
from maas.v1 import (
    access_pb2,
    batches_pb2,
    inference_pb2,
    pipelines_pb2,
    registry_pb2,
    scheduler_pb2,
    tokenize_pb2,
)

log = logging.getLogger(__name__)

PUBLIC = "public"
TENANT_ROLES = ("inference", "developer", "admin")  # each includes the ones before it
SERVICES = ("router", "worker", "scheduler", "registry")
ROLES = (PUBLIC, *TENANT_ROLES, *SERVICES)

# The standard services every server carries: anyone may ask after health (probes,
# load balancers) and read the schema (grpcurl); neither reveals a tenant's data.
STANDARD_RULES = {
    "/grpc.health.v1.Health/Check": (PUBLIC,),
    "/grpc.health.v1.Health/Watch": (PUBLIC,),
    "/grpc.health.v1.Health/List": (PUBLIC,),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (PUBLIC,),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": (PUBLIC,),
}
SERVICE_DESCRIPTORS = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    registry_pb2.DESCRIPTOR.services_by_name["Registry"],
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"],
    pipelines_pb2.DESCRIPTOR.services_by_name["Pipelines"],
    batches_pb2.DESCRIPTOR.services_by_name["Files"],
    batches_pb2.DESCRIPTOR.services_by_name["Batches"],
    tokenize_pb2.DESCRIPTOR.services_by_name["Tokenizer"],
    tokenize_pb2.DESCRIPTOR.services_by_name["TokenizerFiles"],
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call comes from. `tenant` is empty for the admin, services and anonymous callers."""

    kind: str                    # "anonymous", "tenant", "admin" or "service"
    name: str = ""               # the tenant, the service kind, "admin"; "" when anonymous
    role: str = ""               # "inference", "developer", "admin" or the service kind
    key_id: str = ""             # the key's public id (audit, usage)
    key: registry_pb2.ApiKey | None = field(default=None, compare=False, repr=False)
    digest: str = field(default="", compare=False, repr=False)  # the sha256 of the key it proved
    roles: frozenset[str] = field(init=False, compare=False, repr=False)
    """What the rules may name it by: a service its kind; a tenant role and the roles below it."""

    def __post_init__(self) -> None:
        if self.kind == "service":
            roles: frozenset[str] = frozenset((self.role,))
        elif self.role in TENANT_ROLES:
            roles = frozenset(TENANT_ROLES[:TENANT_ROLES.index(self.role) + 1])
        else:
            roles = frozenset()
        object.__setattr__(self, "roles", roles)

    @property
    def tenant(self) -> str:
        return self.name if self.kind == "tenant" else ""

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def trusted(self) -> bool:
        """The admin and the mesh's own services act for any tenant."""
        return self.kind in ("admin", "service")

    def may_see(self, owner: str) -> bool:
        """A tenant sees its own resources and the platform's (owner "")."""
        return self.trusted or owner in ("", self.tenant)

    def may_change(self, owner: str) -> bool:
        """A tenant changes only its own resources; the platform catalog is the admin's."""
        return self.trusted or (bool(owner) and owner == self.tenant)

    def describe(self) -> str:
        if self.kind == "tenant":
            return f"tenant {self.name} ({self.role} key {self.key_id})"
        if self.kind == "service":
            return f"service {self.name}"
        return "admin" if self.kind == "admin" else "an anonymous caller"

    def audit(self) -> str:
        """How events name the principal: tenant:NAME/KEY, admin[/KEY], service:KIND, insecure."""
        if self.kind == "tenant":
            return f"tenant:{self.name}/{self.key_id}"
        if self.kind == "service":
            return f"service:{self.name}"
        if self.kind == "admin":
            return "admin" + (f"/{self.key_id}" if self.key_id else "") if self.name == "admin" else self.name
        return "anonymous"


ANONYMOUS = Principal("anonymous")
ADMIN = Principal("admin", "admin", "admin", "admin")  # the admin token (its key id is "admin")
INSECURE = Principal("admin", "insecure", "admin")  # everyone, on a mesh started with --insecure

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANONYMOUS)


def caller() -> Principal:
    """The principal of the RPC being served (set by the runtime's interceptor)."""
    return _principal.get()


def acting_as(principal: Principal) -> contextvars.Token[Principal]:
    """Make `principal` the caller of the code that follows (the interceptor; the HTTP API)."""
    return _principal.set(principal)


def restore(token: contextvars.Token[Principal]) -> None:
    _principal.reset(token)


def principal_of(info: registry_pb2.ApiKey, digest: str = "") -> Principal:
    if info.service:
        return Principal("service", info.service, info.service, info.id, info, digest)
    if info.admin or info.role == "admin":
        return Principal("admin", "admin", "admin", info.id, info, digest)
    return Principal("tenant", info.tenant, info.role or "inference", info.id, info, digest)


def hidden(owner: str, not_found: str) -> None:
    """Refuse to show another tenant's resource with the very NOT_FOUND (`not_found`, the
    message a missing one gets), so that names do not leak across tenants."""
    if not caller().may_see(owner):
        raise NotFound(not_found)


def require_owner(owner: str, not_found: str, what: str) -> None:
    """A change to `what`: NOT_FOUND if the caller cannot see it, PERMISSION_DENIED if it
    can but it is not the caller's (the platform catalog, for a tenant)."""
    hidden(owner, not_found)
    if not caller().may_change(owner):
        raise PermissionDenied(f"{what} belongs to the platform catalog; only the admin may change it")


def owner_for_new(requested: str) -> str:
    """The owner of a resource the caller creates: a tenant's own; the admin's or a
    service's choice (empty: the platform catalog)."""
    p = caller()
    if p.kind == "tenant":
        if requested and requested != p.tenant:
            raise PermissionDenied(f"{p.describe()} cannot create resources for tenant {requested!r}", field="owner")
        return p.tenant
    return requested


@dataclass(frozen=True, slots=True)
class Rule:
    method: str                  # "/maas.v1.Registry/RegisterModel"
    allow: frozenset[str]

    def admits(self, principal: Principal) -> bool:
        return PUBLIC in self.allow or not self.allow.isdisjoint(principal.roles)


def _check_roles(method: str, roles: Iterable[str]) -> frozenset[str]:
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"access rule of {method} names unknown roles {unknown}; known: {', '.join(ROLES)}")
    return frozenset(roles)


def rule_table(kind: str) -> dict[str, Rule]:
    """Every RPC a `kind` of service may serve -> its rule (from the protos' options and
    STANDARD_RULES). Methods whose proto carries no rule are absent: denied."""
    table = {m: Rule(m, _check_roles(m, allow)) for m, allow in STANDARD_RULES.items()}
    for service in SERVICE_DESCRIPTORS:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            options = method.GetOptions()
            if not options.HasExtension(access_pb2.access):
                continue
            rule = options.Extensions[access_pb2.access]
            allow = rule.on_worker if kind == "worker" and rule.on_worker else rule.allow
            table[path] = Rule(path, _check_roles(path, allow))
    return table


class Authorizer:
    """Authenticates a call's credential against the mesh's keys (a live mirror of
    `tenants/keys/`, so a revoked key stops working as soon as the watch sees it) and
    authorizes it against the rule table of this service kind."""

    NEGATIVE_TTL = 2.0       # seconds an unknown credential is remembered (no etcd read per retry)
    NEGATIVE_MAX = 4096

    def __init__(self, session: EtcdSession, kind: str, *, enforce: bool = True) -> None:
        self.session = session
        self.enforce = enforce
        self.rules = rule_table(kind)
        self.keys = PrefixMirror(session, session.keys.api_keys(), registry_pb2.ApiKey)
        self._unknown: dict[str, float] = {}
        self._local: dict[str, Principal] = {}  # key hash -> principal, known without etcd
        self._principals: dict[str, tuple[registry_pb2.ApiKey, Principal]] = {}  # per key record, reused
        self.keys.add_listener(self._mirrored)
        self._fetched: dict[str, tuple[registry_pb2.ApiKey, float]] = {}  # read past the mirror, until when

    def _mirrored(self, digest: str, old: registry_pb2.ApiKey | None, new: registry_pb2.ApiKey | None) -> None:
        """The mirror has this key now (or its revocation): what was read past it is stale."""
        self._fetched.pop(digest, None)

    def trust(self, credential: str, principal: Principal) -> None:
        """Know `credential` without etcd: the registry holds the admin token it was given, so
        the admin can still restore a backup into an emptied etcd."""
        self._local[key_hash(credential)] = principal

    async def start(self) -> None:
        await self.keys.start()

    async def close(self) -> None:
        await self.keys.close()

    async def identify(self, credential: str) -> Principal:
        """The principal a credential proves; ANONYMOUS without one (INSECURE when not
        enforcing). Unauthenticated for a credential the mesh does not know."""
        if not credential:
            return ANONYMOUS if self.enforce else INSECURE
        digest = key_hash(credential)
        info = self.keys.items.get(digest)
        if info is None and digest in self._local:
            return self._local[digest]
        if info is None:
            info = await self._lookup(digest)
        if info is None:
            if not self.enforce:
                return INSECURE
            raise Unauthenticated("the credential is not valid (an unknown or revoked key)")
        return self.principal(digest, info)

    def principal(self, digest: str, info: registry_pb2.ApiKey) -> Principal:
        """The principal of a key record, made once per record (a request's hot path asks)."""
        cached = self._principals.get(digest)
        if cached is not None and cached[0] is info:  # the same record: the same principal
            return cached[1]
        principal = principal_of(info, digest)
        if len(self._principals) >= self.NEGATIVE_MAX:
            self._principals.clear()
        self._principals[digest] = (info, principal)
        return principal

    async def by_digest(self, digest: str) -> Principal | None:
        """The principal of the live key whose sha256 is `digest` (a batch runs its lines as
        the key that created it); None once it is revoked."""
        info = self.known(digest) or await self._lookup(digest)
        return None if info is None else self.principal(digest, info)

    def known(self, digest: str) -> registry_pb2.ApiKey | None:
        """A key's record without a round trip: the mirror's, or one read past it a moment ago."""
        info = self.keys.items.get(digest)
        if info is None and (fetched := self._fetched.get(digest)) is not None and fetched[1] > time.monotonic():
            return fetched[0]
        return info

    async def _lookup(self, digest: str) -> registry_pb2.ApiKey | None:
        """A key the mirror has not shown yet (made a moment ago) is read from etcd once; it
        is remembered for a few seconds, until the mirror has it (or its revocation)."""
        now = time.monotonic()
        if self._unknown.get(digest, 0.0) > now:
            return None
        raw = await self.session.get(self.session.keys.api_key(digest))
        if raw is not None:
            info = registry_pb2.ApiKey.FromString(raw)
            if len(self._fetched) >= self.NEGATIVE_MAX:
                self._fetched.clear()
            self._fetched[digest] = (info, now + self.NEGATIVE_TTL)
            return info
        if len(self._unknown) >= self.NEGATIVE_MAX:
            self._unknown = {k: t for k, t in self._unknown.items() if t > now}
            if len(self._unknown) >= self.NEGATIVE_MAX:
                self._unknown.clear()
        self._unknown[digest] = now + self.NEGATIVE_TTL
        return None

    async def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The caller of `method`, if the rule admits it. PERMISSION_DENIED for an RPC with no
        rule; UNAUTHENTICATED for no or a bad credential where one is needed."""
        rule = self.rules.get(method)
        principal = await self.identify(key_from_metadata(metadata))
        if not self.enforce:
            return principal
        if rule is None:
            raise PermissionDenied(f"{method} has no access rule, so nobody may call it")
        if rule.admits(principal):
            return principal
        if principal.kind == "anonymous":
            raise Unauthenticated(f"{method} needs a credential: send `authorization: Bearer <key>` "
                                  "(create a key with `maas keys create`)")
        raise PermissionDenied(f"{principal.describe()} may not call {method} "
                               f"(allowed: {', '.join(sorted(rule.allow))})")
