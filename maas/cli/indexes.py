"""`maas index build NAME --model EMBED_MODEL --data FILE.jsonl`: a vector index for
pipelines' `retrieve` steps, embedded through the router with a deployed embedding model
and registered as a version of NAME (`format: index`; docs/pipelines.md). `maas index
list`: the indexes the caller may use."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ClientArgs = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: argparse._SubParsersAction, client_args: ClientArgs) -> None:
    p = sub.add_parser("index", help="vector indexes for pipelines (build, list)")
    isub = p.add_subparsers(dest="index_command", required=True)
    build = isub.add_parser("build", help="embed a JSONL corpus ({\"text\": ...} per line) and register the index")
    client_args(build)
    build.add_argument("name")
    build.add_argument("--model", required=True, help="a deployed embedding model (its version is pinned)")
    build.add_argument("--data", required=True, type=Path, help="JSONL: one {\"text\": ...} object per line")
    listing = isub.add_parser("list", help="the vector indexes you may use: latest version, its embedding model")
    client_args(listing)


async def run(ns: argparse.Namespace, etcd: str) -> int:
    if ns.index_command == "list":
        return await list_indexes(ns, etcd)
    return await build_index(ns, etcd)


async def list_indexes(ns: argparse.Namespace, etcd: str) -> int:
    from maas.cli.commands import _table, _when
    from maas.cli.main import mesh_client
    from maas.v1 import registry_pb2, registry_pb2_grpc

    rows = []
    async with mesh_client(ns, etcd) as mesh:
        registry = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        for m in (await registry.ListModels(registry_pb2.ListRegisteredModelsRequest(), timeout=10)).models:
            if m.latest_format != "index":
                continue
            v = await registry.GetVersion(registry_pb2.GetVersionRequest(ref=f"{m.name}@{m.latest_version}"),
                                          timeout=10)
            rows.append([m.name, str(m.latest_version), v.options.get("embed_model", "?"), m.owner or "platform",
                         _when(v.created_ms)])
    print(_table(rows, ["index", "latest", "embedded by", "owner", "created"]) if rows else "no indexes")
    return 0


async def build_index(ns: argparse.Namespace, etcd: str) -> int:
    from tqdm import tqdm

    from maas.cli.main import mesh_client
    from maas.pipelines.index import build, read_corpus
    from maas.v1 import inference_pb2_grpc, registry_pb2_grpc

    docs = read_corpus(ns.data)
    async with mesh_client(ns, etcd) as mesh:
        router = inference_pb2_grpc.InferenceStub(await mesh.channel("router"))
        registry = registry_pb2_grpc.RegistryStub(await mesh.channel("registry"))
        with tqdm(total=len(docs), unit="doc", desc=f"embedding with {ns.model}", file=sys.stderr) as bar:
            v = await build(router, registry, ns.name, ns.model, docs, progress=bar.update)
    print(f"registered {v.name}@{v.version} (index of {len(docs)} documents, embedded by "
          f"{v.options['embed_model']}); pipelines read it with `kind: retrieve, index: {v.name}`")
    return 0
