"""Keys in etcd: created (the key shown once), listed, revoked.

Every service mirrors `tenants/keys/` and authenticates calls from it without a round trip
(`maas.mesh.authz`); a revoked key stops working as soon as the watches see the delete.
The admin manages every key (service credentials and admin keys included); a tenant's
developer key manages its own tenant's inference keys.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import aetcd

from maas.mesh.auth import key_hash, new_key
from maas.mesh.authz import SERVICES, TENANT_ROLES, caller
from maas.mesh.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from maas.mesh.etcd import EtcdSession
from maas.mesh.keys import Keys
from maas.mesh.names import validate_name
from maas.mesh.service_classes import DEFAULT_CLASS, priority
from maas.v1 import registry_pb2

ADMIN_TOKEN_ID = "admin"  # the id of the admin token's record (generated ids are 8 hex digits)
MAX_WEIGHT = 1000.0  # a key's weight in fair sharing (docs/fairness.md)


async def put_key(client: aetcd.Client, keys: Keys, key: str, info: registry_pb2.ApiKey) -> None:
    """Store a key's record under its hash (the key itself is never stored)."""
    await client.put(keys.api_key(key_hash(key)), info.SerializeToString())


async def install_admin_token(client: aetcd.Client, keys: Keys, token: str) -> None:
    """Make `token` the admin credential: its record replaces the previous admin token's, so
    changing the token (and restarting the registry) rotates it."""
    mine = keys.api_key(key_hash(token))
    for kv in await client.get_prefix(keys.api_keys()):
        if kv.key != mine and registry_pb2.ApiKey.FromString(kv.value).id == ADMIN_TOKEN_ID:
            await client.delete(kv.key)
    await put_key(client, keys, token, registry_pb2.ApiKey(
        id=ADMIN_TOKEN_ID, role="admin", admin=True, created_ms=int(time.time() * 1000)))


SERVICE_KEY_FILE = "{kind}.key"  # a service's key in a credentials directory


def write_secrets(directory: Path) -> list[str]:
    """Make the files a mesh needs in `directory` (owner-only), keeping any already there:
    `admin-token` and one `<kind>.key` per service kind. Returns the names it made."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    made = []
    for name in ("admin-token", *(SERVICE_KEY_FILE.format(kind=k) for k in SERVICES)):
        path = directory / name
        if path.exists():
            continue
        secret = new_key()[0] if name.endswith(".key") else secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        made.append(name)
    return made


async def install_service_keys(client: aetcd.Client, keys: Keys, directory: Path) -> list[str]:
    """Install the service keys found in `directory` (`<kind>.key`): each replaces the record
    of that kind's previous key (rotation). Returns the kinds installed."""
    installed = []
    current = {registry_pb2.ApiKey.FromString(kv.value).id: kv.key for kv in await client.get_prefix(keys.api_keys())}
    for kind in SERVICES:
        path = directory / SERVICE_KEY_FILE.format(kind=kind)
        if not path.is_file():
            continue
        key = path.read_text().strip()
        record_id = f"svc-{kind}"
        if (old := current.get(record_id)) is not None and old != keys.api_key(key_hash(key)):
            await client.delete(old)
        await put_key(client, keys, key, registry_pb2.ApiKey(id=record_id, service=kind,
                                                             created_ms=int(time.time() * 1000)))
        installed.append(kind)
    return installed


class KeyStore:
    def __init__(self, session: EtcdSession) -> None:
        self.session = session

    async def _all(self) -> list[registry_pb2.ApiKey]:
        pairs, _ = await self.session.get_prefix(self.session.keys.api_keys())
        return [registry_pb2.ApiKey.FromString(v) for _, v in pairs]

    async def create(self, request: registry_pb2.CreateKeyRequest) -> registry_pb2.CreateKeyResponse:
        role = "admin" if request.admin else (request.role or "inference")
        if role not in TENANT_ROLES:
            raise InvalidArgument(f"role {role!r} is not one of {', '.join(TENANT_ROLES)}", field="role")
        me = caller()
        if request.service:
            if request.service not in SERVICES:
                raise InvalidArgument(f"service {request.service!r} is not one of {', '.join(SERVICES)}",
                                      field="service")
            if request.tenant or role != "inference" or request.models:
                raise InvalidArgument("a service credential has no tenant, role or models", field="service")
            role = ""
        elif role == "admin":
            if request.tenant:
                raise InvalidArgument("an admin key belongs to no tenant; leave --tenant out", field="tenant")
        else:
            validate_name(request.tenant, "tenant")
        if not me.is_admin and (request.service or role != "inference" or request.tenant != me.tenant):
            raise PermissionDenied(f"{me.describe()} may create inference keys of tenant {me.tenant!r} only; "
                                   "other keys need the admin")
        for model in request.models:
            validate_name(model, "model")
        if not 0 <= request.weight <= MAX_WEIGHT:  # NaN fails too
            raise InvalidArgument(f"weight must be between 0 (the default, 1) and {MAX_WEIGHT:g}, "
                                  f"not {request.weight:g}", field="weight")
        cls = priority(request.service_class, "service_class")
        if cls < priority(DEFAULT_CLASS) and not me.is_admin:
            raise PermissionDenied(f"only the admin gives a key the class {request.service_class!r} (above "
                                   f"{DEFAULT_CLASS!r}: it pre-empts other tenants)", field="service_class")
        if request.weight and request.weight != 1 and not me.is_admin:
            raise PermissionDenied("only the admin sets a key's weight (its share against other tenants)",
                                   field="weight")
        key, key_id = new_key()
        info = registry_pb2.ApiKey(id=key_id, tenant=request.tenant, rpm=request.rpm, tpm=request.tpm,
                                   max_concurrent=request.max_concurrent, models=sorted(set(request.models)),
                                   admin=role == "admin", role=role, service=request.service,
                                   weight=request.weight, service_class=request.service_class,
                                   created_ms=int(time.time() * 1000))
        await put_key(self.session.client, self.session.keys, key, info)
        return registry_pb2.CreateKeyResponse(key=key, info=info)

    async def list(self, tenant: str = "") -> list[registry_pb2.ApiKey]:
        me = caller()
        if not me.is_admin:
            tenant = me.tenant  # a tenant lists its own keys, whatever it asked
        return sorted((k for k in await self._all() if not tenant or k.tenant == tenant),
                      key=lambda k: (k.tenant, k.created_ms))

    async def revoke(self, key_id: str) -> registry_pb2.ApiKey:
        if not key_id:
            raise InvalidArgument("give the id of the key to revoke (see `maas keys list`)", field="id")
        me = caller()
        pairs, _ = await self.session.get_prefix(self.session.keys.api_keys())
        for raw_key, raw in pairs:
            info = registry_pb2.ApiKey.FromString(raw)
            if info.id == key_id and (me.is_admin or (info.tenant == me.tenant and not info.service)):
                if info.id == ADMIN_TOKEN_ID:
                    raise FailedPrecondition("the admin token is not revoked but replaced: change the registry's "
                                             "--admin-token-file (or MAAS_ADMIN_TOKEN) and restart it",
                                             field="id")
                await self.session.client.delete(raw_key)
                return info
        raise NotFound(f"no key with id {key_id!r} (see `maas keys list`)")
