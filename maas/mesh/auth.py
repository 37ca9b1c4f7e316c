"""API keys: their format, their hash, and how a caller presents one.

A key is `maas_<id>_<secret>`: `id` is a public handle (for listing and revoking), the
secret makes it unguessable. Only the key's sha256 is stored (in etcd, under
`tenants/keys/`), so a leaked etcd snapshot does not leak usable keys. Callers send it as
`authorization: Bearer <key>` (HTTP header or gRPC metadata) or `x-api-key: <key>`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

KEY_PREFIX = "maas_"
ADMIN_TOKEN_ENV = "MAAS_ADMIN_TOKEN"  # the registry's admin credential (see docs/operations.md)
API_KEY_ENV = "MAAS_API_KEY"          # what the CLI sends to the router


def new_key() -> tuple[str, str]:
    """(key, id) of a fresh key."""
    key_id = secrets.token_hex(4)
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}", key_id


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def bearer(value: str) -> str:
    """The credential in an `authorization` value ("Bearer <key>"), or ""."""
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def key_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The API key in gRPC invocation metadata, or ""."""
    for name, value in metadata or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if name == "authorization" and (token := bearer(text)):
            return token
        if name == "x-api-key":
            return text.strip()
    return ""
