"""Backup and restore of a mesh's durable state (docs/operations.md#backup-and-restore).

A backup is a logical, point-in-time snapshot: every durable key under the mesh's etcd
prefix, read with one range read (so at one revision), minus the keys the running
processes re-create on their own (leased membership: services/, workers/, replicas/,
election/; and the scheduler's placement: assignments/). Keys are stored relative to the
prefix, so a backup restores under any prefix, into a running etcd. Next to the keys it
holds a manifest of the artifacts the model versions reference (digest, size, versions);
the artifact bytes themselves stay in the blob store and are verified by a restore.

The file is gzip-compressed JSON (format "maas-backup/1"):

    {"format": "maas-backup/1", "created_ms": ..., "etcd_revision": ..., "prefix": "/maas/",
     "keys": [{"key": "registry/models/demo", "value": "<base64>"}, ...],
     "artifacts": [{"digest": "<sha256>", "size": 123, "used_by": ["demo@1"]}, ...],
     "sha256": "<hex>"}

`sha256` is the digest of the canonical JSON of every other field (sorted keys, no
whitespace, ASCII), so a file that was cut short or changed is refused before anything
is written.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gzip
import hashlib
import io
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from maas.mesh.artifacts import ARTIFACT, check_digest
from maas.mesh.errors import FailedPrecondition, InvalidArgument, MaasError, NotFound
from maas.mesh.etcd import EtcdSession
from maas.mesh.keys import Keys
from maas.services.registry.apikeys import ADMIN_TOKEN_ID
from maas.services.registry.blobs import BlobStore, DataLoss
from maas.v1 import registry_pb2

FORMAT = "maas-backup/1"
MAX_BACKUP_BYTES = 1 << 30  # uncompressed; etcd itself holds 2 GiB by default
TXN_OPS = 100               # etcd's default limit is 128 operations per transaction
TXN_BYTES = 1 << 20         # etcd's default request limit is 1.5 MiB

_REL = Keys(prefix="")
KEYS = _REL.api_keys().decode()  # tenants/keys/
# Re-created by the running processes: leased membership and the scheduler's placement.
SKIPPED = tuple(k.decode() for k in (_REL.services(), _REL.workers(), _REL.replicas(), _REL.election(""),
                                     _REL.assignments()))
MODELS = _REL.models().decode()         # registry/models/
VERSIONS = "registry/versions/"         # registry/versions/{name}/{version:08d}
REGISTRY = "registry/"
DEPLOYMENTS = _REL.deployments().decode()  # deployments/


@dataclass
class ArtifactEntry:
    digest: str
    size: int | None  # None: not in the blob store when the backup was taken
    used_by: list[str] = field(default_factory=list)


@dataclass
class Backup:
    created_ms: int
    etcd_revision: int
    prefix: str
    keys: list[tuple[str, bytes]]  # (key relative to the prefix, value), sorted by key
    artifacts: list[ArtifactEntry]

    def counts(self) -> registry_pb2.BackupCounts:
        counts = registry_pb2.BackupCounts(keys=len(self.keys), artifacts=len(self.artifacts),
                                           artifact_bytes=sum(a.size or 0 for a in self.artifacts))
        for rel, value in self.keys:
            if rel.startswith(MODELS):
                counts.models += 1
                counts.aliases += len(_parse(registry_pb2.Model, value).aliases)
            elif rel.startswith(VERSIONS):
                counts.versions += 1
                counts.adapters += int(bool(_parse(registry_pb2.ModelVersion, value).base))
            elif rel.startswith(DEPLOYMENTS):
                counts.deployments += 1
        return counts

    def _document(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "created_ms": self.created_ms,
            "etcd_revision": self.etcd_revision,
            "prefix": self.prefix,
            "keys": [{"key": k, "value": base64.b64encode(v).decode()} for k, v in self.keys],
            "artifacts": [{"digest": a.digest, "size": a.size, "used_by": a.used_by} for a in self.artifacts],
        }

    def encode(self) -> bytes:
        doc = self._document()
        doc["sha256"] = hashlib.sha256(_canonical(doc)).hexdigest()
        return gzip.compress(_canonical(doc), mtime=0)

    @classmethod
    def decode(cls, data: bytes) -> Backup:
        """Parse and check a backup file; InvalidArgument or DataLoss naming what is wrong."""
        if not data:
            raise InvalidArgument("the backup file is empty")
        if data[:2] != b"\x1f\x8b":
            raise InvalidArgument("not a maas backup file: it is not gzip-compressed "
                                  "(write one with `maas admin backup FILE`)")
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                raw = f.read(MAX_BACKUP_BYTES + 1)
        except EOFError:
            raise DataLoss(f"the backup file is truncated: its gzip stream ends early after {len(data)} bytes; "
                           "nothing was restored") from None
        except (OSError, zlib.error) as e:
            raise DataLoss(f"the backup file is corrupt ({e}); nothing was restored") from None
        if len(raw) > MAX_BACKUP_BYTES:
            raise InvalidArgument(f"the backup file holds more than {MAX_BACKUP_BYTES} bytes uncompressed")
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise DataLoss(f"the backup file is corrupt: its content is not JSON ({e}); nothing was restored") from None
        if not isinstance(doc, dict) or "format" not in doc:
            raise InvalidArgument("not a maas backup file: it has no \"format\" field")
        fmt = doc["format"]
        if fmt != FORMAT:
            if isinstance(fmt, str) and fmt.startswith("maas-backup/"):
                raise InvalidArgument(f"backup format {fmt!r} is not supported: this registry reads {FORMAT!r}")
            raise InvalidArgument(f"not a maas backup file: format {fmt!r}")
        claimed = doc.pop("sha256", None)
        if not isinstance(claimed, str):
            raise DataLoss("the backup file has no sha256 of its content; nothing was restored")
        actual = hashlib.sha256(_canonical(doc)).hexdigest()
        if actual != claimed:
            raise DataLoss(f"the backup file's content hashes to sha256 {actual}, not the {claimed} it was "
                           "written with: it was modified or corrupted; nothing was restored")
        try:
            keys = sorted((_key_str(e["key"]), base64.b64decode(e["value"], validate=True)) for e in doc["keys"])
            artifacts = [ArtifactEntry(check_digest(a["digest"]), None if a["size"] is None else int(a["size"]),
                                       [str(u) for u in a["used_by"]]) for a in doc["artifacts"]]
            return cls(created_ms=int(doc["created_ms"]), etcd_revision=int(doc["etcd_revision"]),
                       prefix=str(doc["prefix"]), keys=keys, artifacts=artifacts)
        except (KeyError, TypeError, ValueError, binascii.Error, InvalidArgument) as e:
            detail = e.message if isinstance(e, MaasError) else f"{type(e).__name__}: {e}"
            raise InvalidArgument(f"the backup file is malformed ({detail})") from None


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _key_text(key: bytes) -> str:
    # etcd keys are bytes; ours are UTF-8, and surrogateescape keeps any other byte lossless
    return key.decode("utf-8", "surrogateescape")


def _key_str(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"key {text!r} is not a string")
    return text


def _parse(cls: Any, value: bytes) -> Any:
    try:
        return cls.FromString(value)
    except DecodeError:
        return cls()


def _digest(version: registry_pb2.ModelVersion) -> str:
    """The artifact a version is made from, or ""."""
    sha = version.artifact_digest or (version.source.removeprefix(ARTIFACT) if version.source.startswith(ARTIFACT)
                                      else "")
    try:
        return check_digest(sha) if sha else ""
    except InvalidArgument:
        return ""


def artifact_users(keys: list[tuple[str, bytes]]) -> dict[str, list[str]]:
    """digest -> the versions ("name@version") whose source it is."""
    users: dict[str, list[str]] = {}
    for rel, value in keys:
        if rel.startswith(VERSIONS):
            version = _parse(registry_pb2.ModelVersion, value)
            if sha := _digest(version):
                users.setdefault(sha, []).append(f"{version.name}@{version.version}")
    return users


def _size(blobs: BlobStore, sha: str) -> int | None:
    try:
        return blobs.size(sha)
    except NotFound:
        return None


async def take(session: EtcdSession, blobs: BlobStore) -> Backup:
    """Snapshot the durable keys under the session's prefix (one range read) and the manifest."""
    prefix = session.keys.prefix
    start = prefix.encode()
    rng = await session.client.get_prefix(start)
    revision = rng.header.revision if rng.header else 0
    keys = []
    for kv in rng:
        rel = _key_text(kv.key[len(start):])
        if kv.lease or rel.startswith(SKIPPED):
            continue  # membership and placement: the running processes re-create them
        keys.append((rel, kv.value))
    keys.sort()
    artifacts = [ArtifactEntry(sha, await asyncio.to_thread(_size, blobs, sha), sorted(used))
                 for sha, used in sorted(artifact_users(keys).items())]
    return Backup(created_ms=int(time.time() * 1000), etcd_revision=revision, prefix=prefix, keys=keys,
                  artifacts=artifacts)


def _installed(value: bytes) -> bool:
    """A credential the mesh's operator installs at start (`maas up`, the registry's admin
    token), not a tenant's key. The same one already in the target is no clash."""
    with contextlib.suppress(DecodeError):
        info = registry_pb2.ApiKey.FromString(value)
        return bool(info.service) or info.id == ADMIN_TOKEN_ID
    return False


def _verify_blob(blobs: BlobStore, sha: str) -> str:
    """"" when the blob is present and hashes to its digest, else "missing" or "corrupt"."""
    try:
        for _ in blobs.read(sha):
            pass
    except NotFound:
        return "missing"
    except DataLoss:
        return "corrupt"
    return ""


async def verify_artifacts(blobs: BlobStore, needed: dict[str, list[str]]) -> list[registry_pb2.MissingArtifact]:
    """Hash every needed artifact in the blob store (a few at a time); the ones that fail."""
    limit = asyncio.Semaphore(4)

    async def one(sha: str) -> str:
        async with limit:
            return await asyncio.to_thread(_verify_blob, blobs, sha)

    problems = await asyncio.gather(*(one(sha) for sha in needed))
    return [registry_pb2.MissingArtifact(sha256=sha, problem=problem, used_by=needed[sha])
            for sha, problem in zip(needed, problems, strict=True) if problem]


def _order(rel: str) -> tuple[int, str]:
    """Versions before the models that count them, deployments last: a watcher (the scheduler)
    never sees a deployment whose version is not there yet."""
    if rel.startswith(VERSIONS):
        return 0, rel
    if rel.startswith(REGISTRY):
        return 1, rel
    if rel.startswith(DEPLOYMENTS):
        return 3, rel
    return 2, rel


def _version_number(rel: str) -> tuple[str, int] | None:
    name, _, number = rel.removeprefix(VERSIONS).rpartition("/")
    return (name, int(number)) if name and number.isdigit() else None


async def restore(session: EtcdSession, blobs: BlobStore, backup: Backup, *, force: bool = False,
                  allow_missing_artifacts: bool = False) -> registry_pb2.RestoreResponse:
    """Write a backup's keys under the session's prefix. Checks first (nothing written when a
    check fails): no key of a kind a backup never holds; the prefix holds no registry or
    deployment key (unless force); every artifact is present and verifies (unless
    allow_missing_artifacts). Then writes in transactions of at most TXN_OPS keys."""
    prefix = session.keys.prefix
    for rel, _ in backup.keys:
        if not rel or rel.startswith("/") or rel.startswith(SKIPPED):
            raise InvalidArgument(f"the backup holds key {rel!r}, which no backup holds (membership and placement "
                                  "are re-created by the running services); refusing it, nothing was restored")

    start = prefix.encode()
    existing = {_key_text(kv.key[len(start):]) for kv in await session.client.get_prefix(start, keys_only=True)}
    keys = [(rel, value) for rel, value in backup.keys
            if not (rel in existing and rel.startswith(KEYS) and _installed(value))]
    occupied = sorted(k for k in existing if k.startswith((REGISTRY, DEPLOYMENTS)))
    clashes = sorted(existing.intersection(rel for rel, _ in keys))
    if (occupied or clashes) and not force:
        n_reg = sum(k.startswith(REGISTRY) for k in occupied)
        held = (f"{n_reg} registry and {len(occupied) - n_reg} deployment keys" if occupied
                else f"{len(clashes)} of the backup's keys")
        raise FailedPrecondition(
            f"prefix {prefix} already holds {held} (e.g. {(occupied or clashes)[0]}); restore into an empty "
            "prefix, or pass --force to overwrite the keys the backup holds; nothing was restored")

    needed = artifact_users(backup.keys)
    for entry in backup.artifacts:  # the manifest, too (a version may be absent from a hand-edited file)
        needed.setdefault(entry.digest, list(entry.used_by))
    missing = await verify_artifacts(blobs, needed)
    if missing and not allow_missing_artifacts:
        listed = "; ".join(f"{m.sha256} ({m.problem}, used by {', '.join(m.used_by) or 'no version'})"
                           for m in missing)
        raise FailedPrecondition(
            f"{len(missing)} of the {len(needed)} artifacts the backup needs are not usable in this registry's "
            f"blob store: {listed}. Copy them into the blob store (or upload them again) and retry, or pass "
            "--allow-missing-artifacts; nothing was restored")

    values = dict(keys)
    latest_kept = []
    if force:
        # a version number must never name two versions: keep latest_version at or above the
        # highest version this prefix still holds for a model the backup restores
        highest: dict[str, int] = {}
        for rel in existing:
            if rel.startswith(VERSIONS) and (got := _version_number(rel)):
                highest[got[0]] = max(highest.get(got[0], 0), got[1])
        for rel, value in keys:
            if rel.startswith(MODELS):
                model = _parse(registry_pb2.Model, value)
                if highest.get(model.name, 0) > model.latest_version:
                    model.latest_version = highest[model.name]
                    values[rel] = model.SerializeToString()
                    latest_kept.append(model.name)

    tx = session.client.transactions
    ordered = sorted(values, key=_order)
    written = 0
    while written < len(ordered):
        batch: list[str] = []
        size = 0
        for rel in ordered[written:written + TXN_OPS]:
            if batch and size + len(rel) + len(values[rel]) > TXN_BYTES:
                break
            batch.append(rel)
            size += len(rel) + len(values[rel])
        full = [(prefix + rel).encode("utf-8", "surrogateescape") for rel in batch]
        ok, _ = await session.client.transaction(
            compare=[] if force else [tx.create(k) == 0 for k in full],
            success=[tx.put(k, values[rel]) for k, rel in zip(full, batch, strict=True)], failure=[])
        if not ok:
            raise FailedPrecondition(
                f"a key of the backup was created under {prefix} while restoring (a registration or deployment "
                f"ran concurrently); {written} of {len(ordered)} keys were written. Run the restore again with "
                "--force to overwrite")
        written += len(batch)

    return registry_pb2.RestoreResponse(
        counts=backup.counts(), artifacts_verified=len(needed) - len(missing), missing_artifacts=missing,
        overwritten=sum(rel in existing for rel in values), backup_revision=backup.etcd_revision,
        backup_prefix=backup.prefix, backup_created_ms=backup.created_ms, prefix=prefix,
        latest_kept=sorted(latest_kept))
