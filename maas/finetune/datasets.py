"""Fine-tuning datasets: JSONL in the chat or the prompt/completion format, validated up front.

Two formats, one record a line (UTF-8; a leading BOM and blank lines are tolerated):

    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello."}]}
    {"prompt": "2 + 2 =", "completion": " 4"}

The first record decides the format; a file mixing the two is refused. Chat roles are
system, user and assistant (tool use is not supported), and the last message must be the
assistant's: it is the completion the model learns. Keys other than these are refused by
name, so a typo such as "complettion" cannot silently drop a field.

`load_dataset` reads the whole file before anything is queued and reports every malformed
line it finds (up to `max_errors`, then "... and K more") in one `InvalidDataset`, an
`InvalidArgument` on the field "data", so the gRPC layer answers INVALID_ARGUMENT with the
line numbers. `training_examples` turns a loaded dataset into (prompt, completion) text
pairs with the serving engine's chat rendering.

No torch here: the CLI imports this module to check a file before uploading it.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from maas.mesh.errors import InvalidArgument
from maas.services.worker.engines.base import ChatMessage

__all__ = [
    "MAX_ERRORS",
    "MAX_FILE_BYTES",
    "MAX_LINE_BYTES",
    "MAX_RECORDS",
    "Dataset",
    "DatasetError",
    "DatasetFormat",
    "DatasetStats",
    "InvalidDataset",
    "Record",
    "load_dataset",
    "training_examples",
]

MAX_RECORDS = 100_000
MAX_LINE_BYTES = 1 << 20     # 1 MiB, newline excluded
MAX_FILE_BYTES = 256 << 20   # 256 MiB
MAX_ERRORS = 20              # problems listed in an InvalidDataset; the rest are counted

DatasetFormat = Literal["chat", "prompt_completion"]

TRAINING_ROLES = ("system", "user", "assistant")
CHAT_KEYS = ("messages",)
PROMPT_COMPLETION_KEYS = ("prompt", "completion")
MESSAGE_KEYS = ("role", "content")
# Keys of the OpenAI tool-calling format, refused with a message saying why rather than
# as a mere unknown key.
TOOL_KEYS = frozenset({"tools", "functions", "tool_calls", "function_call", "tool_call_id",
                       "parallel_tool_calls"})
TOOL_ROLES = frozenset({"tool", "function", "ipython"})

_FORMAT_NAMES: dict[DatasetFormat, str] = {"chat": "chat", "prompt_completion": "prompt/completion"}
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class DatasetError:
    """One problem in a dataset: the 1-based line it is on (None for the file as a whole)."""

    line: int | None
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


class InvalidDataset(InvalidArgument):
    """A dataset was refused. `errors` holds the first problems found (at most `max_errors`),
    `omitted` how many more there were; the message lists them all, one a line."""

    def __init__(self, errors: Sequence[DatasetError], omitted: int = 0, *, source: str | None = None) -> None:
        self.errors = tuple(errors)
        self.omitted = omitted
        total = len(self.errors) + omitted
        where = f" {source}" if source else ""
        lines = [f"invalid dataset{where} ({total} problem{'s' if total != 1 else ''}):"]
        lines += [f"  {e}" for e in self.errors]
        if omitted:
            lines.append(f"  ... and {omitted} more")
        super().__init__("\n".join(lines), field="data")


@dataclass(frozen=True)
class Record:
    """One training conversation, whatever format it came in: a prompt/completion record is
    [user: prompt, assistant: completion]. The last message is always the assistant's."""

    line: int
    messages: tuple[ChatMessage, ...]

    @property
    def characters(self) -> int:
        return sum(len(m.content) for m in self.messages)


@dataclass(frozen=True)
class DatasetStats:
    records: int
    characters: int             # all message contents
    completion_characters: int  # the last assistant messages: what the loss is taken on


@dataclass(frozen=True)
class Dataset:
    """A validated dataset. `format` says which format the records came in; `sha256` is the
    digest of the file's bytes (what the adapter's metadata records as its dataset)."""

    format: DatasetFormat
    records: tuple[Record, ...]
    sha256: str
    size_bytes: int

    def __len__(self) -> int:
        return len(self.records)

    @property
    def stats(self) -> DatasetStats:
        return DatasetStats(records=len(self.records),
                            characters=sum(r.characters for r in self.records),
                            completion_characters=sum(len(r.messages[-1].content) for r in self.records))


def load_dataset(source: str | os.PathLike[str] | bytes, *,
                 max_records: int = MAX_RECORDS,
                 max_line_bytes: int = MAX_LINE_BYTES,
                 max_file_bytes: int = MAX_FILE_BYTES,
                 max_errors: int = MAX_ERRORS) -> Dataset:
    """Read and validate a JSONL dataset from a path or from its bytes.

    Raises InvalidDataset listing every malformed line (up to `max_errors`, then a count),
    or the limit that was exceeded; nothing is returned unless the whole file is valid.
    """
    if isinstance(source, bytes):
        size, name = len(source), None
    else:
        size, name = os.stat(source).st_size, os.fspath(source)
    if size > max_file_bytes:
        raise InvalidDataset([DatasetError(None, f"the file is {_mib(size)}, over the limit of "
                                                 f"{_mib(max_file_bytes)}")], source=name)
    loader = _Loader(max_records=max_records, max_errors=max_errors)
    if isinstance(source, bytes):
        loader.read(io.BytesIO(source), max_line_bytes)
    else:
        with open(source, "rb") as f:
            loader.read(f, max_line_bytes)
    return loader.result(name)


def training_examples(dataset: Dataset, render_chat: Callable[[Sequence[ChatMessage]], str], *,
                      max_chars: int | None = None) -> list[tuple[str, str]]:
    """(prompt text, completion text) pairs to train on, one per record.

    For a chat record the prompt is the conversation up to, not including, its last
    assistant message, rendered with `render_chat` (the serving engine's, e.g.
    `Engine.render_chat` or `plain_chat`: it ends where the assistant's reply begins, so
    training sees the exact prompt that inference will build). Earlier assistant turns are
    part of the prompt. The completion is the last assistant message. A prompt/completion
    record's prompt is used as it is, not rendered.

    The training text is `prompt + completion` (the trainer appends the end-of-sequence
    token); the loss is taken on the completion only: the trainer masks the prompt's tokens.

    With `max_chars`, a record whose prompt and completion together are longer is an error
    (never truncated silently); a chat the template rejects is one too. Both raise
    InvalidDataset naming the lines.
    """
    examples: list[tuple[str, str]] = []
    errors = _Errors(MAX_ERRORS)
    for record in dataset.records:
        *context, reply = record.messages
        if dataset.format == "prompt_completion":
            prompt = context[0].content
        else:
            try:
                prompt = render_chat(context)
            except InvalidArgument as exc:
                errors.add(record.line, exc.message)
                continue
        if max_chars is not None and len(prompt) + len(reply.content) > max_chars:
            errors.add(record.line, f"the example is {len(prompt) + len(reply.content)} characters "
                                    f"(prompt and completion), over the limit of {max_chars}")
            continue
        examples.append((prompt, reply.content))
    errors.raise_if_any(None)
    return examples


# ---- validation ------------------------------------------------------------------------


class _Bad(Exception):
    """A line's first problem; the loader records it and moves on to the next line."""


class _Errors:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.listed: list[DatasetError] = []
        self.omitted = 0

    def add(self, line: int | None, message: str) -> None:
        if len(self.listed) < self.limit:
            self.listed.append(DatasetError(line, message))
        else:
            self.omitted += 1

    def raise_if_any(self, source: str | None) -> None:
        if self.listed or self.omitted:
            raise InvalidDataset(self.listed, self.omitted, source=source)


class _Loader:
    def __init__(self, *, max_records: int, max_errors: int) -> None:
        self.max_records = max_records
        self.errors = _Errors(max_errors)
        self.records: list[Record] = []
        self.format: DatasetFormat | None = None
        self.format_line = 0
        self.digest = hashlib.sha256()
        self.size = 0
        self.seen = 0  # non-blank lines, valid or not

    def read(self, f: IO[bytes], max_line_bytes: int) -> None:
        number = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            self._consume(raw)
            if not raw.endswith(b"\n") and len(raw) > max_line_bytes:
                while raw and not raw.endswith(b"\n"):  # skip to the end of the long line
                    raw = f.readline(1 << 20)
                    self._consume(raw)
                self.errors.add(number, f"the line is longer than the limit of {_mib(max_line_bytes)}")
                continue
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            self.seen += 1
            if self.seen > self.max_records:
                self.errors.add(number, f"more than {self.max_records} records (the limit); split the dataset")
                return
            try:
                self.records.append(Record(number, self._parse(raw, number)))
            except _Bad as exc:
                self.errors.add(number, str(exc))

    def result(self, source: str | None) -> Dataset:
        self.errors.raise_if_any(source)
        if self.format is None or not self.records:
            raise InvalidDataset([DatasetError(None, "the dataset is empty: no records")], source=source)
        return Dataset(format=self.format, records=tuple(self.records), sha256=self.digest.hexdigest(),
                       size_bytes=self.size)

    def _consume(self, raw: bytes) -> None:
        self.digest.update(raw)
        self.size += len(raw)

    def _parse(self, raw: bytes, number: int) -> tuple[ChatMessage, ...]:
        try:
            text = raw.decode("utf-8").rstrip("\r\n")  # so a JSON error's column is on this line
        except UnicodeDecodeError as exc:
            raise _Bad(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}, byte {exc.start + 1} of the line)") from None
        try:
            obj = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise _Bad(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise _Bad(f"a record must be a JSON object, got {_kind(obj)}")
        kind = self._kind_of(obj, number)
        if kind == "chat":
            return _chat(obj)
        return _prompt_completion(obj)

    def _kind_of(self, obj: dict[str, Any], number: int) -> DatasetFormat:
        """The record's format; the first record that shows one sets the file's."""
        is_chat = "messages" in obj
        is_pc = any(k in obj for k in PROMPT_COMPLETION_KEYS)
        if is_chat and is_pc:
            raise _Bad("a record has either 'messages' (chat) or 'prompt' and 'completion', not both")
        kind: DatasetFormat | None = "chat" if is_chat else "prompt_completion" if is_pc else None
        if kind is None:
            if self.format is not None:  # judge the record against the file's format
                _check_keys(obj, CHAT_KEYS if self.format == "chat" else PROMPT_COMPLETION_KEYS)
                raise _Bad(_missing(obj, CHAT_KEYS if self.format == "chat" else PROMPT_COMPLETION_KEYS))
            _check_keys(obj, CHAT_KEYS + PROMPT_COMPLETION_KEYS)
            raise _Bad('expected a chat record {"messages": [...]} or a prompt/completion record '
                       '{"prompt": "...", "completion": "..."}, got an empty object')
        if self.format is None:
            self.format, self.format_line = kind, number
        elif kind != self.format:
            raise _Bad(f"a {_FORMAT_NAMES[kind]} record in a {_FORMAT_NAMES[self.format]} dataset "
                       f"(set by line {self.format_line}); use one format per file")
        return kind


def _chat(obj: dict[str, Any]) -> tuple[ChatMessage, ...]:
    _check_keys(obj, CHAT_KEYS)
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise _Bad(f"'messages' must be a list of {{role, content}} objects, got {_kind(messages)}")
    if not messages:
        raise _Bad("'messages' must not be empty")
    turns: list[ChatMessage] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _Bad(f"{where} must be a {{role, content}} object, got {_kind(m)}")
        _check_keys(m, MESSAGE_KEYS, where=f" in {where}")
        if "role" not in m or "content" not in m:
            raise _Bad(f"{where}: {_missing(m, MESSAGE_KEYS)}")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise _Bad(f"{where}.role must be a string, got {_kind(role)}")
        if role in TOOL_ROLES:
            raise _Bad(f"{where}: {role!r} messages are not supported (tool use is not); "
                       f"roles are {', '.join(TRAINING_ROLES)}")
        if role not in TRAINING_ROLES:
            raise _Bad(f"{where}.role must be one of {', '.join(TRAINING_ROLES)}, got {role!r}")
        _check_text(content, f"{where}.content")
        turns.append(ChatMessage(role, content))
    if turns[-1].role != "assistant":
        raise _Bad(f"the last message must be from the assistant (its reply is what the model learns), "
                   f"got {turns[-1].role!r}")
    return tuple(turns)


def _prompt_completion(obj: dict[str, Any]) -> tuple[ChatMessage, ...]:
    _check_keys(obj, PROMPT_COMPLETION_KEYS)
    if any(k not in obj for k in PROMPT_COMPLETION_KEYS):
        raise _Bad(_missing(obj, PROMPT_COMPLETION_KEYS))
    _check_text(obj["prompt"], "'prompt'")
    _check_text(obj["completion"], "'completion'")
    return (ChatMessage("user", obj["prompt"]), ChatMessage("assistant", obj["completion"]))


def _check_keys(obj: dict[str, Any], allowed: tuple[str, ...], where: str = "") -> None:
    for key in obj:
        if key in allowed:
            continue
        if key in TOOL_KEYS:
            raise _Bad(f"{key!r}{where}: tool use is not supported in fine-tuning data")
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Bad(f"unknown key {key!r}{where}{hint}; expected {', '.join(repr(k) for k in allowed)}")


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        parts = " (content parts are not supported)" if isinstance(value, list) else ""
        raise _Bad(f"{what} must be a string, got {_kind(value)}{parts}")
    if not value.strip():
        raise _Bad(f"{what} must not be empty")


def _missing(obj: dict[str, Any], required: tuple[str, ...]) -> str:
    absent = [k for k in required if k not in obj]
    return f"missing {' and '.join(repr(k) for k in absent)}"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Bad(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"
