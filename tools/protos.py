"""Generate maas/v1 from protos/, or check that the checked-in code is up to date.

    python tools/protos.py          # regenerate maas/v1/*_pb2*.py and .pyi stubs
    python tools/protos.py --check  # exit 1 with "Protos changed" if regenerating would differ

The generated code is checked in (never edited by hand) so that `pip install .` needs no
code generator; grpcio-tools is pinned in the dev extra so the output is reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "maas" / "v1"
INIT = '"""Generated from protos/maas/v1 by tools/protos.py. Do not edit."""\n'


def generate(dest_root: Path) -> Path:
    from grpc_tools import protoc  # dev dependency only

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "maas" / "v1").glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={dest_root}",
        f"--pyi_out={dest_root}",
        f"--grpc_python_out={dest_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out = dest_root / "maas" / "v1"
    (out / "__init__.py").write_text(INIT)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if maas/v1 is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        if args.check:
            current = sorted(p.name for p in OUT.iterdir() if p.is_file()) if OUT.exists() else []
            _, mismatch, errors = filecmp.cmpfiles(fresh, OUT, names, shallow=False)
            if mismatch or errors or current != names:
                print(f"Protos changed: maas/v1 is stale ({', '.join(mismatch + errors) or 'file set differs'}); "
                      "run `make protos` and commit the result", file=sys.stderr)
                return 1
            print("protos: maas/v1 is up to date")
            return 0
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(fresh, OUT)
        print(f"protos: generated {len(names)} files in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
