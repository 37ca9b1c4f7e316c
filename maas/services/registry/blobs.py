"""Artifact bytes, content-addressed by sha256.

`BlobStore` is the interface an object store can implement; `LocalBlobStore` keeps blobs
in a directory (`<root>/<sha[:2]>/<sha>`). Digests are checked on write (an upload that
does not hash to what the client said is refused and nothing is kept) and on read (a
blob whose bytes no longer match its name raises `DataLoss` at the end of the stream, so
a reader never trusts silently corrupted bytes).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import grpc

from maas.mesh.artifacts import CHUNK, check_digest
from maas.mesh.errors import InvalidArgument, MaasError, NotFound


class DataLoss(MaasError):
    code = grpc.StatusCode.DATA_LOSS


class BlobWriter(Protocol):
    def write(self, data: bytes) -> None: ...
    def commit(self, expected_sha: str = "") -> tuple[str, int]: ...
    def abort(self) -> None: ...


class BlobStore(Protocol):
    def writer(self) -> BlobWriter: ...
    def size(self, sha: str) -> int: ...
    def read(self, sha: str) -> Iterator[bytes]: ...
    def delete(self, sha: str) -> int: ...


class _LocalWriter:
    def __init__(self, root: Path) -> None:
        self.root = root
        fd, name = tempfile.mkstemp(prefix=".upload-", dir=root)
        self._file = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def commit(self, expected_sha: str = "") -> tuple[str, int]:
        self._file.close()
        sha = self._hash.hexdigest()
        if expected_sha and expected_sha != sha:
            self._path.unlink(missing_ok=True)
            raise InvalidArgument(f"upload hashes to sha256 {sha}, not the {expected_sha} the client sent; "
                                  "nothing was stored", field="sha256")
        dest = self.root / sha[:2] / sha
        dest.parent.mkdir(exist_ok=True)
        os.replace(self._path, dest)
        return sha, self._size

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._path.unlink(missing_ok=True)


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha: str) -> Path:
        path = self.root / check_digest(sha)[:2] / sha
        if not path.is_file():
            raise NotFound(f"artifact {sha} does not exist")
        return path

    def writer(self) -> BlobWriter:
        return _LocalWriter(self.root)

    def size(self, sha: str) -> int:
        return self._path(sha).stat().st_size

    def delete(self, sha: str) -> int:
        """Remove a blob; the bytes freed. NotFound if there is none."""
        path = self._path(sha)
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        return size

    def read(self, sha: str) -> Iterator[bytes]:
        digest = hashlib.sha256()
        with open(self._path(sha), "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                yield chunk
        if digest.hexdigest() != sha:
            raise DataLoss(f"artifact {sha} is corrupted in the registry's store (its bytes hash to "
                           f"{digest.hexdigest()}); re-upload it")
