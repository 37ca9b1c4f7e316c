"""The artifact format every service agrees on.

An artifact is a deterministic tar of a model (or adapter) directory, named by the
sha256 of its bytes. A model version whose source is `artifact:<sha256>` is fetched from
the registry (`Registry.DownloadArtifact`), checked against that digest, and unpacked.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path

from maas.mesh.errors import InvalidArgument

ARTIFACT = "artifact:"  # source prefix of an uploaded model version
CHUNK = 1024 * 1024     # bytes per streamed chunk
_SHA = re.compile(r"^[0-9a-f]{64}$")


def check_digest(sha: str) -> str:
    if not _SHA.match(sha):
        raise InvalidArgument(f"{sha!r} is not a sha256 digest (64 lowercase hex characters)", field="sha256")
    return sha


def pack_directory(directory: Path, archive: Path) -> tuple[str, int]:
    """Write `directory`'s files into a deterministic tar; return its (sha256, size)."""
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            tar.add(path, arcname=str(path.relative_to(directory)), filter=clean)
    return file_digest(archive)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file: what names it as an artifact."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def unpack(archive: Path, dest: Path) -> None:
    """Extract safely (no absolute paths, no links out of `dest`, no devices)."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
