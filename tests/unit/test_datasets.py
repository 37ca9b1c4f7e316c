"""Fine-tuning datasets: both formats load, every malformed line is reported by number."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from maas.finetune.datasets import (
    Dataset,
    DatasetError,
    InvalidDataset,
    load_dataset,
    training_examples,
)
from maas.mesh.errors import InvalidArgument
from maas.services.worker.engines.base import ChatMessage, plain_chat

CHAT = {"messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Hi!"},
                     {"role": "assistant", "content": "Hello."}]}
PC = {"prompt": "2 + 2 =", "completion": " 4"}


def jsonl(*records: Any) -> bytes:
    """One line a record; a str is written as it is (for lines that are not valid JSON)."""
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records)


def refused(data: bytes, **limits: int) -> InvalidDataset:
    with pytest.raises(InvalidDataset) as err:
        load_dataset(data, **limits)
    return err.value


def only_error(data: bytes) -> DatasetError:
    errors = refused(data).errors
    assert len(errors) == 1, errors
    return errors[0]


def test_chat_dataset_loads() -> None:
    multi_turn = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    ds = load_dataset(jsonl(CHAT, multi_turn))
    assert ds.format == "chat" and len(ds) == 2
    assert ds.records[0].line == 1
    assert ds.records[0].messages == (ChatMessage("system", "You are terse."), ChatMessage("user", "Hi!"),
                                      ChatMessage("assistant", "Hello."))
    assert ds.stats.records == 2
    assert ds.stats.characters == len("You are terse.Hi!Hello.abcd")
    assert ds.stats.completion_characters == len("Hello.") + 1


def test_prompt_completion_dataset_loads_as_user_and_assistant_turns(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(PC, {"completion": "b", "prompt": "a"}))
    ds = load_dataset(path)
    assert ds.format == "prompt_completion" and len(ds) == 2
    assert ds.records[0].messages == (ChatMessage("user", "2 + 2 ="), ChatMessage("assistant", " 4"))
    assert ds.records[1].messages == (ChatMessage("user", "a"), ChatMessage("assistant", "b"))
    assert load_dataset(str(path)).sha256 == ds.sha256


def test_blank_lines_crlf_and_a_bom_are_tolerated() -> None:
    data = b"\xef\xbb\xbf" + json.dumps(PC).encode() + b"\r\n\r\n   \n" + json.dumps(PC).encode()  # no final \n
    ds = load_dataset(data)
    assert len(ds) == 2
    assert [r.line for r in ds.records] == [1, 4]
    assert ds.size_bytes == len(data)


def test_non_ascii_text_loads() -> None:
    ds = load_dataset(jsonl({"prompt": "¿Qué tal? 你好", "completion": "bien 👍"}))
    assert ds.records[0].messages[1].content == "bien 👍"


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "a", "completion": ', "invalid JSON"),
    ("[1, 2]", "a record must be a JSON object, got a list"),
    ('"text"', "a record must be a JSON object, got a string"),
    ({}, "missing 'prompt' and 'completion'"),
    ({"prompt": "a"}, "missing 'completion'"),
    ({"prompt": "a", "completion": 3}, "'completion' must be a string, got a number"),
    ({"prompt": None, "completion": "b"}, "'prompt' must be a string, got null"),
    ({"prompt": "", "completion": "b"}, "'prompt' must not be empty"),
    ({"prompt": "a", "completion": "  \n"}, "'completion' must not be empty"),
    ({"prompt": "a", "complettion": "b"}, "unknown key 'complettion' (did you mean 'completion'?)"),
    ({"prompt": "a", "completion": "b", "weight": 1}, "unknown key 'weight'"),
    ('{"prompt": "a", "prompt": "b", "completion": "c"}', "duplicate key 'prompt'"),
    (CHAT, "a chat record in a prompt/completion dataset (set by line 1); use one format per file"),
    ({"prompt": "a", "completion": "b", "messages": []}, "either 'messages' (chat) or 'prompt'"),
])
def test_bad_prompt_completion_lines_are_reported_with_their_number(line: Any, message: str) -> None:
    error = only_error(jsonl(PC, line, PC))
    assert error.line == 2
    assert message in error.message
    assert str(error).startswith("line 2: ")


def user(content: Any = "q") -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any = "a") -> dict[str, Any]:
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize(("messages", "message"), [
    ("hello", "'messages' must be a list of {role, content} objects, got a string"),
    ([], "'messages' must not be empty"),
    (["hi", assistant()], "messages[0] must be a {role, content} object, got a string"),
    ([{"role": "user"}, assistant()], "messages[0]: missing 'content'"),
    ([user(), {"content": "a"}], "messages[1]: missing 'role'"),
    ([user(), {"role": "robot", "content": "a"}],
     "messages[1].role must be one of system, user, assistant, got 'robot'"),
    ([user(), {"role": 1, "content": "a"}], "messages[1].role must be a string, got a number"),
    ([user(), {"role": "tool", "content": "42"}, assistant()], "messages[1]: 'tool' messages are not supported"),
    ([user(), {"role": "assistant", "content": None, "tool_calls": []}],
     "'tool_calls' in messages[1]: tool use is not supported"),
    ([user(), assistant(["part"])], "messages[1].content must be a string, got a list (content parts"),
    ([user(""), assistant()], "messages[0].content must not be empty"),
    ([user(), {"role": "assistant", "content": "a", "contnet": "b"}],
     "unknown key 'contnet' in messages[1] (did you mean 'content'?)"),
    ([user()], "the last message must be from the assistant"),
    ([assistant(), user()], "the last message must be from the assistant (its reply is what the model "
                            "learns), got 'user'"),
    ([{"role": "system", "content": "s"}], "the last message must be from the assistant"),
])
def test_bad_chat_lines_are_reported_with_their_number(messages: Any, message: str) -> None:
    error = only_error(jsonl(CHAT, "", {"messages": messages}))
    assert error.line == 3
    assert message in error.message


def test_other_bad_chat_records() -> None:
    assert "unknown key 'mesages' (did you mean 'messages'?)" in only_error(jsonl(CHAT, {"mesages": []})).message
    assert "'tools': tool use is not supported" in only_error(jsonl({**CHAT, "tools": []})).message
    mixed = only_error(jsonl(CHAT, PC))
    assert (mixed.line, mixed.message) == (2, "a prompt/completion record in a chat dataset (set by line 1); "
                                              "use one format per file")


def test_the_first_valid_looking_record_sets_the_format() -> None:
    err = refused(jsonl("not json", PC, CHAT))
    assert [e.line for e in err.errors] == [1, 3]
    assert "set by line 2" in err.errors[1].message


def test_a_record_of_unknown_shape_names_its_keys() -> None:
    error = only_error(jsonl({"text": "hello"}))
    assert error.line == 1 and "unknown key 'text'" in error.message


def test_invalid_utf8_is_reported_with_its_line() -> None:
    error = only_error(jsonl(PC) + b'{"prompt": "\xff", "completion": "b"}\n')
    assert error.line == 2 and "not valid UTF-8 (byte 0xff, byte 13 of the line)" in error.message


def test_all_problems_are_listed_in_one_invalid_argument_on_data() -> None:
    err = refused(jsonl(PC, "{", PC, {"prompt": "a"}, [1]))
    assert isinstance(err, InvalidArgument)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "data"
    assert [e.line for e in err.errors] == [2, 4, 5]
    assert err.omitted == 0
    lines = err.message.splitlines()
    assert lines[0] == "invalid dataset (3 problems):"
    assert lines[1] == "  line 2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"
    assert lines[2:] == ["  line 4: missing 'completion'", "  line 5: a record must be a JSON object, got a list"]


def test_the_error_list_is_truncated_with_a_count() -> None:
    err = refused(jsonl(*["{"] * 30))
    assert len(err.errors) == 20 and err.omitted == 10
    assert [e.line for e in err.errors] == list(range(1, 21))
    assert err.message.splitlines()[-1] == "  ... and 10 more"
    assert err.message.startswith("invalid dataset (30 problems):")
    small = refused(jsonl(*["{"] * 5), max_errors=2)
    assert small.message.splitlines()[-1] == "  ... and 3 more"


def test_a_path_is_named_in_the_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl("{"))
    with pytest.raises(InvalidDataset, match=r"^invalid dataset .*bad\.jsonl \(1 problem\):\n  line 1: "):
        load_dataset(path)


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n"])
def test_an_empty_dataset_is_refused(data: bytes) -> None:
    err = refused(data)
    assert err.errors == (DatasetError(None, "the dataset is empty: no records"),)
    assert err.message == "invalid dataset (1 problem):\n  the dataset is empty: no records"


def test_a_too_long_line_is_reported_and_the_rest_still_checked() -> None:
    long = {"prompt": "x" * 200, "completion": "y"}
    err = refused(jsonl(PC, long, "{", PC), max_line_bytes=100)
    assert [e.line for e in err.errors] == [2, 3]
    assert err.errors[0].message == "the line is longer than the limit of 100 bytes"
    exact = json.dumps({"prompt": "x" * 10, "completion": "y"}).encode()
    assert len(load_dataset(exact + b"\n", max_line_bytes=len(exact))) == 1
    assert len(load_dataset(exact, max_line_bytes=len(exact))) == 1
    assert refused(exact, max_line_bytes=len(exact) - 1).errors[0].line == 1


def test_the_default_line_limit_is_one_mib() -> None:
    huge = {"prompt": "x" * (1 << 20), "completion": "y"}
    err = refused(jsonl(PC, huge, PC))
    assert [str(e) for e in err.errors] == ["line 2: the line is longer than the limit of 1.0 MiB"]


def test_record_and_file_size_limits() -> None:
    err = refused(jsonl(*[PC] * 4), max_records=3)
    assert [str(e) for e in err.errors] == ["line 4: more than 3 records (the limit); split the dataset"]
    assert len(load_dataset(jsonl(PC, "", PC, PC), max_records=3)) == 3
    data = jsonl(*[PC] * 10)
    err = refused(data, max_file_bytes=len(data) - 1)
    assert err.errors == (DatasetError(None, f"the file is {len(data)} bytes, over the limit of "
                                             f"{len(data) - 1} bytes"),)


def test_the_digest_is_the_sha256_of_the_file_bytes_and_stable(tmp_path: Path) -> None:
    data = b"\xef\xbb\xbf" + jsonl(CHAT, "", CHAT)
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    digests = {load_dataset(data).sha256, load_dataset(data).sha256, load_dataset(path).sha256}
    assert digests == {hashlib.sha256(data).hexdigest()}
    assert load_dataset(data + b"\n").sha256 != hashlib.sha256(data).hexdigest()  # bytes, not records


def test_the_digest_covers_long_lines_read_in_pieces() -> None:
    data = jsonl({"prompt": "x" * 5000, "completion": "y"})
    assert load_dataset(data, max_line_bytes=len(data)).sha256 == hashlib.sha256(data).hexdigest()


def test_training_examples_for_chat_render_the_context_and_learn_the_last_reply() -> None:
    multi_turn = {"messages": [user("a"), assistant("b"), user("c"), assistant("d")]}
    ds = load_dataset(jsonl(CHAT, multi_turn))
    assert training_examples(ds, plain_chat) == [
        ("System: You are terse.\n\nUser: Hi!\n\nAssistant:", "Hello."),
        ("User: a\n\nAssistant: b\n\nUser: c\n\nAssistant:", "d"),
    ]


def test_training_examples_for_prompt_completion_use_the_prompt_as_is() -> None:
    ds = load_dataset(jsonl(PC))
    calls: list[Sequence[ChatMessage]] = []

    def render(messages: Sequence[ChatMessage]) -> str:
        calls.append(messages)
        return "rendered"

    assert training_examples(ds, render) == [("2 + 2 =", " 4")]
    assert calls == []


def test_training_examples_refuse_long_examples_and_rejected_chats() -> None:
    ds = load_dataset(jsonl(PC, {"prompt": "a" * 10, "completion": "b"}, PC))
    with pytest.raises(InvalidDataset) as err:
        training_examples(ds, plain_chat, max_chars=10)
    assert [str(e) for e in err.value.errors] == [
        "line 2: the example is 11 characters (prompt and completion), over the limit of 10"]
    assert len(training_examples(ds, plain_chat, max_chars=11)) == 3

    def strict(messages: Sequence[ChatMessage]) -> str:
        if messages[0].role == "system":
            raise InvalidArgument("the chat template rejected the messages: no system role", field="messages")
        return plain_chat(messages)

    chats = load_dataset(jsonl({"messages": [user(), assistant()]}, CHAT))
    with pytest.raises(InvalidDataset, match="line 2: the chat template rejected"):
        training_examples(chats, strict)


def test_a_dataset_is_an_immutable_value() -> None:
    ds = load_dataset(jsonl(PC))
    assert isinstance(ds, Dataset)
    with pytest.raises(AttributeError):
        ds.format = "chat"  # type: ignore[misc]


def test_the_module_does_not_import_torch() -> None:
    code = "import sys, maas.finetune.datasets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
