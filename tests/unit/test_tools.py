"""Reading tool calls out of a model's text (maas.mesh.tools), however the text is split."""

from __future__ import annotations

import json

from maas.mesh.tools import CallParser, call_grammar, chat_turns, closed, split_calls
from maas.v1 import inference_pb2

NAMES = ["get_weather", "get_time"]
TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name":"get_time","arguments":{"zone":"CET"}}</tool_call>')


def _stream(text: str, size: int) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    parser = CallParser(NAMES)
    content, calls = "", []
    for i in range(0, len(text), size):
        piece, got = parser.feed(text[i:i + size])
        content += piece
        calls += got
    rest, last = parser.end()
    return content + rest, [(c.name, json.loads(c.arguments)) for c in calls + last]


def test_calls_are_found_however_the_text_is_split() -> None:
    want = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    for size in (1, 2, 3, 7, 11, len(TEXT)):
        content, calls = _stream(TEXT, size)
        assert calls == want, size
        assert content.strip() == "Let me check."


def test_content_is_held_back_only_while_it_may_start_a_call() -> None:
    parser = CallParser(NAMES)
    assert parser.feed("a < b and <tool") == ("a < b and ", [])
    assert parser.feed("box>") == ("<toolbox>", [])


def test_what_only_looks_like_a_call_stays_content() -> None:
    for body in ('{"name": "rm_rf", "arguments": {}}', "not json", '{"name": "get_time", "arguments": 3}'):
        text = f"x <tool_call>{body}</tool_call> y"
        assert split_calls(text, NAMES) == (text, [])


def test_an_unclosed_call_cut_by_max_tokens() -> None:
    content, calls = split_calls('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}', NAMES)
    assert content == "" and [c.name for c in calls] == ["get_time"]
    content, calls = split_calls('<tool_call>{"name": "get_time", "argu', NAMES)
    assert content == '<tool_call>{"name": "get_time", "argu' and calls == []


def test_arguments_as_a_json_string_and_ids_are_unique() -> None:
    _, calls = split_calls('<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}</tool_call>'
                           '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', NAMES)
    assert json.loads(calls[0].arguments) == {"zone": "CET"}
    assert [c.index for c in calls] == [0, 1] and calls[0].id != calls[1].id


def test_a_chat_with_tools_writes_them_calls_and_results_into_turns() -> None:
    tool = inference_pb2.Tool(name="get_time", description="the time", parameters='{"type": "object"}')
    messages = [inference_pb2.ChatMessage(role="system", content="be brief"),
                inference_pb2.ChatMessage(role="user", content="time?"),
                inference_pb2.ChatMessage(role="assistant", tool_calls=[
                    inference_pb2.ToolCall(id="c1", name="get_time", arguments='{"zone": "CET"}')]),
                inference_pb2.ChatMessage(role="tool", tool_call_id="c1", content="12:00")]
    turns = chat_turns(messages, [tool])
    assert [r for r, _ in turns] == ["system", "user", "assistant", "tool"]
    assert turns[0][1].startswith("be brief") and '"name": "get_time"' in turns[0][1]
    assert split_calls(turns[2][1], ["get_time"])[1][0].arguments == '{"zone": "CET"}'
    assert "12:00" in turns[3][1]
    assert chat_turns(messages[:2], []) == [("system", "be brief"), ("user", "time?")]


def test_the_call_grammar_names_only_the_chosen_function() -> None:
    tools = [inference_pb2.Tool(name=n) for n in NAMES]
    assert 'get_time' in call_grammar(tools, "get_time") and 'get_weather' not in call_grammar(tools, "get_time")
    assert "call0 | call1" in call_grammar(tools)  # one rule per function: its schema is its own root


def test_a_model_writing_a_non_string_name_is_content_not_a_crash() -> None:
    text = '<tool_call>{"name": ["get_time"], "arguments": {}}</tool_call>'
    assert split_calls(text, NAMES) == (text, [])


def test_a_forced_calls_objects_are_closed_unless_they_say_otherwise() -> None:
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                               "open": {"type": "object", "properties": {},
                                                        "additionalProperties": True}},
              "required": ["properties"]}
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert set(out["properties"]) == {"properties", "open"}  # a property named "properties" stays one
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert out["properties"]["open"]["additionalProperties"] is True
