"""`maas pipeline validate FILE` checks a pipeline's YAML offline, every problem with its
line; `maas pipeline push NAME FILE` uploads it and registers it as a version of NAME
(`format: pipeline`), which clients then call as `model=NAME` (docs/pipelines.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from maas.pipelines.package import SPEC_FILE

ClientArgs = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: argparse._SubParsersAction, client_args: ClientArgs) -> None:
    p = sub.add_parser("pipeline", help="pipelines: check a pipeline's YAML (validate), register it (push)")
    psub = p.add_subparsers(dest="pipeline_command", required=True)
    validate = psub.add_parser("validate", help="check a pipeline file; errors name their line")
    validate.add_argument("file", type=Path)
    push = psub.add_parser("push", help="upload a pipeline (its YAML, or a directory holding pipeline.yaml and "
                                        "its plugins' modules) and register it as the next version of NAME")
    client_args(push)
    push.add_argument("name")
    push.add_argument("file", type=Path, metavar="FILE|DIR")


async def push(ns: argparse.Namespace, etcd: str) -> int:
    from maas.cli.main import mesh_client
    from maas.mesh.artifacts import pack_directory
    from maas.mesh.clients import upload_file
    from maas.v1 import registry_pb2, registry_pb2_grpc

    if validate(ns) != 0:  # the registry checks it too; this says so before uploading anything
        return 2
    upload = ns.file
    with tempfile.TemporaryDirectory() as tmp:
        if ns.file.is_dir():  # a package: the directory's files in one deterministic tar
            upload = Path(tmp) / "pipeline.tar"
            pack_directory(ns.file, upload)
        async with mesh_client(ns, etcd) as mesh:
            stub = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
            artifact = await upload_file(stub, upload, timeout=60)
            v = await stub.RegisterModel(registry_pb2.RegisterModelRequest(
                name=ns.name, format="pipeline", source=f"artifact:{artifact.sha256}"), timeout=30)
    print(f"registered {v.name}@{v.version} (pipeline {artifact.sha256[:12]}); clients call it as model {v.name!r}")
    return 0


def validate(ns: argparse.Namespace) -> int:
    from maas.pipelines.spec import SpecErrors, parse

    path = ns.file / SPEC_FILE if ns.file.is_dir() else ns.file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cannot read {ns.file}: {exc}", file=sys.stderr)
        return 2
    try:
        spec = parse(text, source=str(path))
    except SpecErrors as e:
        print(e.message, file=sys.stderr)
        print(f"{len(e.problems)} problem{'s' if len(e.problems) != 1 else ''} in {ns.file}", file=sys.stderr)
        return 2
    kinds = ", ".join(f"{s.name} ({s.kind})" for s in spec.steps.values())
    print(f"{ns.file}: {len(spec.steps)} steps: {kinds}; output {spec.output}"
          f"{' (streams)' if spec.streams else ''}")
    return 0
