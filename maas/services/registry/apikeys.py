"""API keys of tenants in etcd: created (the key shown once), listed, revoked.

Routers mirror `tenants/keys/` and admit requests from it without a round trip; a
revoked key stops working as soon as their watch sees the delete.
"""

from __future__ import annotations

import time

from maas.mesh.auth import key_hash, new_key, same_secret
from maas.mesh.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from maas.mesh.etcd import EtcdSession
from maas.mesh.names import validate_name
from maas.v1 import registry_pb2


class KeyStore:
    def __init__(self, session: EtcdSession, admin_token: str = "") -> None:
        self.session = session
        self.admin_token = admin_token

    async def _all(self) -> list[registry_pb2.ApiKey]:
        pairs, _ = await self.session.get_prefix(self.session.keys.api_keys())
        return [registry_pb2.ApiKey.FromString(v) for _, v in pairs]

    async def require_admin(self, credential: str) -> None:
        """Key management needs the registry's admin token or an admin key. A mesh with
        neither (a fresh one) is open, so that the first admin key can be made."""
        if credential and self.admin_token and same_secret(credential, self.admin_token):
            return
        if credential:
            raw = await self.session.get(self.session.keys.api_key(key_hash(credential)))
            if raw is not None:
                if registry_pb2.ApiKey.FromString(raw).admin:
                    return
                raise PermissionDenied("this key may not manage keys (it is not an admin key)")
        if not self.admin_token and not any(k.admin for k in await self._all()):
            return
        raise Unauthenticated("managing keys needs an admin credential: pass --admin-token or set "
                              "MAAS_ADMIN_TOKEN (or use an admin key)" if not credential
                              else "the admin credential is not valid")

    async def create(self, request: registry_pb2.CreateKeyRequest) -> registry_pb2.CreateKeyResponse:
        validate_name(request.tenant, "tenant")
        for model in request.models:
            validate_name(model, "model")
        key, key_id = new_key()
        info = registry_pb2.ApiKey(id=key_id, tenant=request.tenant, rpm=request.rpm, tpm=request.tpm,
                                   max_concurrent=request.max_concurrent, models=sorted(set(request.models)),
                                   admin=request.admin, created_ms=int(time.time() * 1000))
        await self.session.client.put(self.session.keys.api_key(key_hash(key)), info.SerializeToString())
        return registry_pb2.CreateKeyResponse(key=key, info=info)

    async def list(self, tenant: str = "") -> list[registry_pb2.ApiKey]:
        return sorted((k for k in await self._all() if not tenant or k.tenant == tenant),
                      key=lambda k: (k.tenant, k.created_ms))

    async def revoke(self, key_id: str) -> registry_pb2.ApiKey:
        if not key_id:
            raise InvalidArgument("give the id of the key to revoke (see `maas keys list`)", field="id")
        pairs, _ = await self.session.get_prefix(self.session.keys.api_keys())
        for raw_key, raw in pairs:
            info = registry_pb2.ApiKey.FromString(raw)
            if info.id == key_id:
                await self.session.client.delete(raw_key)
                return info
        raise NotFound(f"no key with id {key_id!r} (see `maas keys list`)")
