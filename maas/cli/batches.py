"""`maas batch create|list|show|cancel|results`: batches (docs/batches.md).

`create` checks the requests file here first (the first bad line is named, and nothing is
uploaded), uploads it as a file of the caller's tenant, creates the batch and prints its id
alone on the last line. With `--wait` (and `show --wait`) it follows the batch with a
progress bar and exits 0 only if it completed. `results` writes the output file (or, with
`--errors`, the error file) to a path or to stdout.

The caller's API key (`--api-key`, MAAS_API_KEY, or the development key of `maas up`)
names the tenant; the batch's lines run as that key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from maas.cli.main import mesh_client
from maas.mesh.batches import ENDPOINTS, MAX_INPUT_BYTES, TERMINAL, parse_input, status_name, upload_chunks
from maas.mesh.errors import InvalidArgument
from maas.v1 import batches_pb2, batches_pb2_grpc

ClientArgs = Callable[[argparse.ArgumentParser], None]
POLL_SECONDS = 1.0
CHUNK = 1024 * 1024


def add_parser(sub: argparse._SubParsersAction, client_args: ClientArgs) -> None:
    bt = sub.add_parser("batch", help="batches: run a file of requests on idle capacity (create, list, show, "
                                      "cancel, results)")
    bsub = bt.add_subparsers(dest="batch_command", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        p = bsub.add_parser(name, help=help)
        client_args(p)
        return p

    create = action("create", "upload a JSONL file of requests and run it; prints the batch id alone on the last line")
    create.add_argument("file", type=Path, metavar="FILE.jsonl",
                        help='one request per line: {"custom_id", "method": "POST", "url", "body"}')
    create.add_argument("--endpoint", default="/v1/chat/completions", choices=ENDPOINTS,
                        help="every line's url (default /v1/chat/completions)")
    create.add_argument("--window", default="24h", help="completion window: 24h (default), or Nh / Nm")
    create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--wait", action="store_true", help="follow the batch; exit 0 only if it completed")
    lst = action("list", "batches, newest first")
    lst.add_argument("--limit", type=int, default=20)
    show = action("show", "one batch")
    show.add_argument("id")
    show.add_argument("--wait", action="store_true", help="follow it to its end with a progress bar")
    cancel = action("cancel", "stop a batch; what was answered is kept")
    cancel.add_argument("id")
    results = action("results", "a finished batch's answers (JSONL)")
    results.add_argument("id")
    results.add_argument("--errors", action="store_true", help="the error file instead of the output file")
    results.add_argument("--output", "-o", type=Path, default=None, help="write here (default: stdout)")


def _row(b: batches_pb2.Batch) -> list[str]:
    created = datetime.fromtimestamp(b.created_ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if b.created_ms else "-"
    return [b.id, status_name(b.status), b.endpoint, f"{b.counts.completed}/{b.counts.total}",
            str(b.counts.failed), b.tenant or "-", created]


def _describe(b: batches_pb2.Batch) -> str:
    lines = [f"{b.id}: {status_name(b.status)}", f"  endpoint     {b.endpoint}",
             f"  input        {b.input_file_id}",
             f"  requests     {b.counts.total} ({b.counts.completed} answered, {b.counts.failed} failed)",
             f"  window       {b.completion_window} (expires {datetime.fromtimestamp(b.expires_ms / 1000):%Y-%m-%d %H:%M})",
             f"  tenant       {b.tenant or '-'} (key {b.key_id or '-'})"]
    if b.output_file_id:
        lines.append(f"  output       {b.output_file_id}")
    if b.error_file_id:
        lines.append(f"  errors       {b.error_file_id}")
    if b.runner:
        lines.append(f"  run by       {b.runner}" + (f" (taken over {b.claims - 1} times)" if b.claims > 1 else ""))
    if b.message:
        lines.append(f"  message      {b.message}")
    if b.metadata:
        lines.append("  metadata     " + ", ".join(f"{k}={v}" for k, v in sorted(b.metadata.items())))
    return "\n".join(lines)


def _check(ns: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """A problem with `create`'s arguments or file ("" if none), and the metadata."""
    metadata = {}
    for pair in ns.metadata:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            return f"--metadata {pair!r} is not KEY=VALUE", {}
        metadata[key] = value
    if not ns.file.is_file():
        return f"{ns.file} is not a file", {}
    if ns.file.stat().st_size > MAX_INPUT_BYTES:
        return f"{ns.file} is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MiB, a batch's limit", {}
    try:
        lines = parse_input(ns.file.read_bytes(), ns.endpoint)
    except InvalidArgument as e:
        return f"{ns.file}: {e.message.removeprefix('input file ')}", {}
    print(f"{ns.file}: {len(lines)} requests to {ns.endpoint}, valid", file=sys.stderr)
    return "", metadata


async def run(ns: argparse.Namespace, etcd: str) -> int:
    metadata: dict[str, str] = {}
    if ns.batch_command == "create":
        problem, metadata = _check(ns)
        if problem:
            print(f"error: {problem}\nnothing was uploaded", file=sys.stderr)
            return 2
    async with mesh_client(ns, etcd, as_tenant=True) as mesh:
        batches = batches_pb2_grpc.BatchesStub(await mesh.channel("router"))
        command = ns.batch_command
        if command == "create":
            files = batches_pb2_grpc.FilesStub(await mesh.channel("registry"))
            uploaded = await _upload(files, ns.file)
            batch = await batches.CreateBatch(batches_pb2.CreateBatchRequest(
                input_file_id=uploaded.id, endpoint=ns.endpoint, completion_window=ns.window, metadata=metadata),
                timeout=120)
            print(f"batch {batch.id}: {batch.counts.total} requests to {batch.endpoint} from {uploaded.id}, "
                  f"window {batch.completion_window}", file=sys.stderr)
            code = 0
            if ns.wait:
                batch = await _follow(batches, batch.id)
                code = 0 if batch.status == batches_pb2.BATCH_STATUS_COMPLETED else 1
            if ns.json:
                print(json.dumps(MessageToDict(batch)))
            print(batch.id)
            return code
        if command == "list":
            reply = await batches.ListBatches(batches_pb2.ListBatchesRequest(limit=ns.limit), timeout=10)
            if ns.json:
                print(json.dumps([MessageToDict(b) for b in reply.batches], indent=2))
            else:
                from maas.cli.commands import _table

                print(_table([_row(b) for b in reply.batches],
                             ["id", "status", "endpoint", "answered", "failed", "tenant", "created"]))
            return 0
        if command == "show":
            batch = await batches.GetBatch(batches_pb2.BatchRequest(id=ns.id), timeout=10)
            if ns.wait:
                batch = await _follow(batches, batch.id)
            print(json.dumps(MessageToDict(batch), indent=2) if ns.json else _describe(batch))
            return 0 if not ns.wait or batch.status == batches_pb2.BATCH_STATUS_COMPLETED else 1
        if command == "cancel":
            batch = await batches.CancelBatch(batches_pb2.BatchRequest(id=ns.id), timeout=10)
            print(json.dumps(MessageToDict(batch)) if ns.json else f"{batch.id}: {status_name(batch.status)}")
            return 0
        batch = await batches.GetBatch(batches_pb2.BatchRequest(id=ns.id), timeout=10)
        file_id = batch.error_file_id if ns.errors else batch.output_file_id
        if not file_id:
            what = "error" if ns.errors else "output"
            why = "it has none" if batch.status in TERMINAL else f"it is {status_name(batch.status)}"
            print(f"error: batch {batch.id} has no {what} file yet: {why}", file=sys.stderr)
            return 1
        files = batches_pb2_grpc.FilesStub(await mesh.channel("registry"))
        out = ns.output.open("wb") if ns.output is not None else sys.stdout.buffer
        try:
            async for chunk in files.DownloadFile(batches_pb2.FileRequest(id=file_id), timeout=600):
                out.write(chunk.data)
        finally:
            if ns.output is not None:
                out.close()
        return 0


async def _upload(files: batches_pb2_grpc.FilesStub, path: Path) -> batches_pb2.File:
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"uploading {path.name}",
              file=sys.stderr) as bar, path.open("rb") as f:
        async def blocks() -> AsyncIterator[bytes]:
            while data := await asyncio.to_thread(f.read, CHUNK):
                bar.update(len(data))
                yield data

        header = batches_pb2.FileChunk(purpose="batch", filename=path.name)
        return await files.UploadFile(upload_chunks(header, blocks()), timeout=3600)


async def _follow(stub: batches_pb2_grpc.BatchesStub, batch_id: str) -> batches_pb2.Batch:
    """A progress bar kept current from the batch's record until it ends; the ended batch."""
    with tqdm(total=0, unit="req", desc=batch_id, file=sys.stderr, dynamic_ncols=True) as bar:
        while True:
            batch = await stub.GetBatch(batches_pb2.BatchRequest(id=batch_id), timeout=10)
            bar.total = batch.counts.total
            bar.n = batch.counts.completed + batch.counts.failed
            bar.set_postfix_str(f"{status_name(batch.status)}, {batch.counts.failed} failed", refresh=False)
            bar.refresh()
            if batch.status in TERMINAL:
                return batch
            await asyncio.sleep(POLL_SECONDS)
