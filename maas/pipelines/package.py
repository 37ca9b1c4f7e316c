"""A pipeline's package: its YAML alone, or a tar of a directory holding `pipeline.yaml` and
the Python modules its `plugin` steps name (`maas pipeline push NAME DIR` packs one).

    bot/
      pipeline.yaml        # steps: ... - {name: tidy, kind: plugin, plugin: "tidy:Tidy"}
      tidy.py              # class Tidy: def run(self, ctx, value): ...
      helpers/__init__.py  # a package a plugin may import relatively (from .helpers import x)

A plugin `MODULE:CLASS` names `MODULE.py` (or `MODULE/__init__.py`) at the package's root,
dots for subdirectories.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SPEC_FILE = "pipeline.yaml"
MAX_PACKAGE_BYTES = 8 << 20  # a pipeline with its plugins
MAX_SPEC_BYTES = 1 << 20


class PackageError(ValueError):
    pass


@dataclass
class Package:
    spec: str                                    # the YAML text
    files: dict[str, bytes] = field(default_factory=dict)  # path -> content (a tar's files; none for plain YAML)

    def has_module(self, module: str) -> bool:
        path = module.replace(".", "/")
        return f"{path}.py" in self.files or f"{path}/__init__.py" in self.files


def read(data: bytes) -> Package:
    """A pushed pipeline's artifact: a tar with `pipeline.yaml` at its root, or the YAML."""
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageError(f"a pipeline package is at most {MAX_PACKAGE_BYTES} bytes, not {len(data)}")
    if not _is_tar(data):
        if len(data) > MAX_SPEC_BYTES:
            raise PackageError(f"a pipeline's YAML is at most {MAX_SPEC_BYTES} bytes")
        return Package(_text(data, "the pipeline's YAML"))
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        total = 0
        for member in members:
            if member.isdir():
                continue
            # plain files only: a sparse member reads out as far more than it stores
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
                raise PackageError(f"the package holds {member.name!r}, which is not a plain file")
            total += member.size
            if total > MAX_PACKAGE_BYTES:
                raise PackageError(f"a pipeline package's files are at most {MAX_PACKAGE_BYTES} bytes in all")
        for member in members:
            if member.isdir():
                continue
            name = member.name.removeprefix("./")
            if name.startswith("/") or ".." in Path(name).parts:
                raise PackageError(f"the package holds a file outside itself: {member.name!r}")
            extracted = tar.extractfile(member)
            files[name] = extracted.read(member.size + 1) if extracted is not None else b""
    if SPEC_FILE not in files:
        raise PackageError(f"the package has no {SPEC_FILE} at its root (it has {', '.join(sorted(files)[:5])})")
    return Package(_text(files[SPEC_FILE], SPEC_FILE), files)


def extract(package: Package, dest: Path) -> None:
    """Write the package's files under `dest` (checked by `read`: none outside it), whole
    or not at all: into a directory beside it, renamed into place (a concurrent extraction
    of the same package loses the race harmlessly). The files are left read-only."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        for name, content in package.files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o444)
        try:
            staging.rename(dest)
        except OSError:
            if not dest.exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _is_tar(data: bytes) -> bool:
    return len(data) >= 262 and data[257:262] == b"ustar"


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PackageError(f"{what} must be UTF-8 text") from None


__all__ = ["MAX_PACKAGE_BYTES", "SPEC_FILE", "Package", "PackageError", "extract", "read"]
