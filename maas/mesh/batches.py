"""Batches (docs/batches.md): the record in etcd and the answers in JetStream, the contract
the routers share.

A batch lives at `batches/{id}` as one `maas.v1.Batch`. Its writers are the router API
that creates or cancels it and the router running it (progress, the outcome); every write
compares the key's revision (`update_batch`), and the runner's writes also compare its
claim (`batch-runs/{id}`, held under its lease), so a runner that lost its claim (paused
past its lease, taken over) writes nothing more.

Each answered line is one message on `maas.batch.<mesh>.<id>` in the stream MAAS_BATCHES,
published with the message id `<mesh>:<batch>:<line>`: a runner that resumes the batch reads
what is there and skips those lines, and the output is assembled from it, one answer per
line (the first stored, should two runners ever have answered the same line). `<mesh>` is
`maas.mesh.events.mesh_token`: a batch id is random, but a backup restored under another
prefix (`maas admin restore`) holds the same open batches, and its routers must neither
skip lines the first mesh answered nor purge its answers.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js
import nats.js.api as js_api

from maas.mesh.errors import InvalidArgument, NotFound, Unavailable
from maas.mesh.etcd import EtcdSession, update_record
from maas.mesh.events import EventBus, OwnStream, mesh_token, stored
from maas.v1 import batches_pb2

Status = batches_pb2.BatchStatus
TERMINAL = frozenset({Status.BATCH_STATUS_COMPLETED, Status.BATCH_STATUS_FAILED, Status.BATCH_STATUS_EXPIRED,
                      Status.BATCH_STATUS_CANCELLED})
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
STREAM = "MAAS_BATCHES"
MAX_AGE = 8 * 24 * 3600.0  # longer than the longest completion window
MAX_FILE_BYTES = 512 * 1024 * 1024  # one uploaded file (the registry's limit)
MAX_OUTPUT_BYTES = 16 * 1024 * 1024 * 1024  # one result file a router writes
PURPOSES = ("batch", "batch_output", "fine-tune", "user_data", "evals")
SERVICE_PURPOSES = ("batch_output",)  # written by the platform, not uploaded
MAX_ANSWER_BYTES = 1000 * 1024  # NATS takes at most 1 MiB a message by default
_WINDOW = re.compile(r"([1-9][0-9]{0,5})([mh])")
MIN_WINDOW, MAX_WINDOW = 60, 168 * 3600
MAX_LINES = 50_000
MAX_LINE_BYTES = 4 * 1024 * 1024  # one request (the HTTP API's body limit)
MAX_INPUT_BYTES = 200 * 1024 * 1024


def now_ms() -> int:
    return int(time.time() * 1000)


def status_name(status: int) -> str:
    """OpenAI's name of a status: "in_progress", "completed", ..."""
    return Status.Name(status).removeprefix("BATCH_STATUS_").lower()


def window_seconds(window: str) -> int:
    """Seconds of a completion window: "24h" (OpenAI's only value), or "Nh" / "Nm"."""
    m = _WINDOW.fullmatch(window)
    seconds = int(m.group(1)) * (3600 if m.group(2) == "h" else 60) if m else 0
    if not MIN_WINDOW <= seconds <= MAX_WINDOW:
        raise InvalidArgument(f"completion_window must be like \"24h\" or \"30m\", from 1m to 168h, not "
                              f"{window[:40]!r}", field="completion_window")
    return seconds


@dataclass(frozen=True, slots=True)
class Line:
    """One request of an input file: where it is, not its body (a runner parses a body when
    it sends the line, so a large file is held once, as bytes)."""

    index: int          # among the input's requests, from 0
    number: int         # line number in the file, from 1 (for messages)
    custom_id: str
    start: int          # its bytes in the file: data[start:end]
    end: int

    def body(self, data: bytes) -> dict[str, Any]:
        return json.loads(data[self.start:self.end])["body"]


def parse_input(data: bytes, endpoint: str) -> list[Line]:
    """The requests of a batch's input file, or InvalidArgument naming the first bad line.
    Lines end at "\n" only (JSON strings may hold U+2028 and the like); a UTF-8 byte order
    mark is skipped; blank lines are too."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"the input file is not UTF-8 (byte {e.start + start})", field="input_file_id") from None
    lines: list[Line] = []
    seen: dict[str, int] = {}
    number = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        number += 1
        raw, at = data[start:end], start
        start = end + 1
        if not raw.strip():
            continue

        def bad(problem: str, number: int = number) -> InvalidArgument:
            return InvalidArgument(f"input file line {number}: {problem}", field="input_file_id")

        if len(raw) > MAX_LINE_BYTES:
            raise bad(f"{len(raw)} bytes; a request may be at most {MAX_LINE_BYTES // (1024 * 1024)} MiB")
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            raise bad(f"not JSON ({e.msg if isinstance(e, json.JSONDecodeError) else 'nested too deeply'})") from None
        if not isinstance(item, dict):
            raise bad("not a JSON object")
        custom_id, method, url, body = item.get("custom_id"), item.get("method"), item.get("url"), item.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            raise bad("custom_id must be a non-empty string")
        if custom_id in seen:
            raise bad(f"custom_id {custom_id[:64]!r} is used by line {seen[custom_id]} too; each must be unique")
        if method != "POST":
            raise bad(f"method must be \"POST\", not {str(method)[:40]!r}")
        if url != endpoint:
            raise bad(f"url {str(url)[:80]!r} is not the batch's endpoint {endpoint!r}")
        if not isinstance(body, dict):
            raise bad("body must be a JSON object (the request)")
        seen[custom_id] = number
        lines.append(Line(len(lines), number, custom_id, at, end))
        if len(lines) > MAX_LINES:
            raise bad(f"a batch holds at most {MAX_LINES} requests")
    if not lines:
        raise InvalidArgument("the input file holds no request", field="input_file_id")
    return lines


async def get_batch(session: EtcdSession, batch_id: str) -> batches_pb2.Batch:
    raw = await session.get(session.keys.batch(batch_id))
    if raw is None:
        raise NotFound(f"batch {batch_id!r} does not exist", field="batch_id")
    return batches_pb2.Batch.FromString(raw)


async def update_batch(session: EtcdSession, batch_id: str, mutate: Any, *,
                       runner: str = "") -> batches_pb2.Batch | None:
    """Apply `mutate` to the stored batch (see `update_record`); with `runner`, only while
    that router still holds the batch's claim."""
    claim = session.keys.batch_run(batch_id)
    return await update_record(
        session, session.keys.batch(batch_id), batches_pb2.Batch.FromString, mutate, what=f"batch {batch_id!r}",
        now_ms=now_ms, compare=(lambda tx: [tx.value(claim) == runner.encode()]) if runner else None)


@dataclass(frozen=True, slots=True)
class Answer:
    index: int        # the line's place among the input's requests (0-based)
    ok: bool          # answered with status 200 (the output file), else the error file
    line: bytes       # the output line, JSON without its newline


def subject(prefix: str, batch_id: str) -> str:
    """Where the answers of batch `batch_id` of the mesh under etcd `prefix` are stored."""
    return f"maas.batch.{mesh_token(prefix)}.{batch_id}"


class Answers:
    """Batches' answered lines in JetStream, over the runtime's NATS connection."""

    def __init__(self, events: EventBus) -> None:
        self.prefix = events.config.prefix
        self.stream = OwnStream(events, js_api.StreamConfig(
            name=STREAM, subjects=["maas.batch.>"], max_age=MAX_AGE, duplicate_window=120.0,
            storage=js_api.StorageType.FILE), "batch answers cannot be stored")

    async def put(self, batch_id: str, answer: Answer) -> None:
        """Store one answer (at most once per line within the duplicate window)."""
        js = await self.stream.js()
        data = json.dumps({"i": answer.index, "ok": answer.ok}).encode() + b"\n" + answer.line
        # the stream's duplicate window spans every mesh's subjects: the id names the mesh too
        msg_id = f"{mesh_token(self.prefix)}:{batch_id}:{answer.index}"
        await js.publish(subject(self.prefix, batch_id), data, headers={"Nats-Msg-Id": msg_id})

    async def scan(self, batch_id: str) -> AsyncIterator[Answer]:
        """Every stored answer of the batch, the first of each line, in the order stored.
        Unavailable if fewer came than the stream held when the scan began (a partial read
        must never become a batch's output)."""
        js = await self.stream.js()
        try:
            info = await js.stream_info(STREAM, subjects_filter=subject(self.prefix, batch_id))
            expected = sum((info.state.subjects or {}).values())
        except nats.js.errors.NotFoundError:
            expected = 0
        seen: set[int] = set()
        got = 0
        async for msg in stored(js, STREAM, subject(self.prefix, batch_id)):
            got += 1
            head, _, line = msg.data.partition(b"\n")
            meta = json.loads(head)
            if meta["i"] not in seen:
                seen.add(meta["i"])
                yield Answer(meta["i"], meta["ok"], line)
        if got < expected:
            raise Unavailable(f"read {got} of the {expected} stored answers of batch {batch_id}; try again")

    async def outcomes(self, batch_id: str) -> dict[int, bool]:
        """line -> answered with status 200, for every answered line."""
        return {a.index: a.ok async for a in self.scan(batch_id)}

    async def purge(self, batch_id: str) -> None:
        js = await self.stream.js()
        try:
            await js.purge_stream(STREAM, subject=subject(self.prefix, batch_id))
        except (nats.errors.Error, nats.js.errors.Error):
            pass  # they age out


async def upload_chunks(header: batches_pb2.FileChunk, blocks: AsyncIterable[bytes]) -> AsyncIterator[batches_pb2.FileChunk]:
    """A file upload's messages: the header (purpose, filename, ...), then the bytes."""
    yield header
    async for block in blocks:
        if block:
            yield batches_pb2.FileChunk(data=block)
