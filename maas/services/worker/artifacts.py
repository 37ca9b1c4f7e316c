"""Model artifacts on a worker: fetched from the registry over gRPC, checked, unpacked.

An artifact is a tar of a model (or adapter) directory, named by its sha256. The worker
streams it into a temporary file while hashing, refuses it if the digest differs (nothing
is unpacked or loaded), unpacks it safely and renames the directory into the cache, so a
half-fetched artifact is never used. Later loads of the same digest use the cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from maas.mesh.artifacts import ARTIFACT, check_digest, unpack
from maas.mesh.clients import RegistryClient
from maas.mesh.errors import FailedPrecondition

log = logging.getLogger(__name__)

class ArtifactCache:
    def __init__(self, root: Path, registry: RegistryClient) -> None:
        self.root = root
        self.registry = registry
        self._locks: dict[str, asyncio.Lock] = {}

    async def resolve(self, source: str) -> str:
        """`source` itself, or for "artifact:<sha256>" the local directory it unpacks to."""
        if not source.startswith(ARTIFACT):
            return source
        return str(await self.fetch(check_digest(source.removeprefix(ARTIFACT))))

    async def fetch(self, sha: str) -> Path:
        dest = self.root / sha
        async with self._locks.setdefault(sha, asyncio.Lock()):
            if dest.is_dir():
                return dest
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
            await self.fetch_into(sha, dest)
            return dest

    async def fetch_into(self, sha: str, dest: Path) -> None:
        """Download artifact `sha` and unpack it as the directory `dest` (replacing one that
        is there), never half there: refused, with nothing unpacked, if the bytes do not hash
        to `sha`."""
        tmp = dest.with_name(f".{dest.name}-{sha[:12]}.tar")
        try:
            size = await self.download(sha, tmp)
            await asyncio.to_thread(_unpack, tmp, dest)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        log.info("fetched artifact %s (%d bytes) into %s", sha[:12], size, dest)

    async def download(self, sha: str, dest: Path) -> int:
        """Artifact `sha`'s bytes into the file `dest`, as they are (no unpacking); its size.
        Nothing is left at `dest` if the bytes do not hash to `sha`."""
        fd, tmp_name = tempfile.mkstemp(prefix=f".{sha[:12]}-", dir=dest.parent)
        tmp = Path(tmp_name)
        digest, size = hashlib.sha256(), 0
        try:
            with open(fd, "wb") as f:  # noqa: ASYNC230 - an fd from mkstemp: no blocking open
                async for chunk in self.registry.download(sha):
                    digest.update(chunk.data)
                    size += len(chunk.data)
                    await asyncio.to_thread(f.write, chunk.data)
            if digest.hexdigest() != sha:
                raise FailedPrecondition(f"artifact {sha} arrived with sha256 {digest.hexdigest()}; refusing it")
            await asyncio.to_thread(tmp.replace, dest)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        return size


def _unpack(archive: Path, dest: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name[:12]}-", dir=dest.parent))
    try:
        unpack(archive, work)
        shutil.rmtree(dest, ignore_errors=True)
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
