"""Tool calling: how a request's tools reach the model, and how its calls come back out.

One text format on both sides, the one many open models are trained on (Hermes, Qwen):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- The worker renders a chat with tools (`chat_turns`): the tools as JSON in a system
  message that asks for that format, the assistant's earlier calls in it, and tool results
  as `tool` turns.
- With `tool_choice` "required" or a named function the router asks the engine for a
  grammar (`call_grammar`): the output is exactly one call, its arguments valid against the
  function's JSON schema, whatever the model would have written.
- The router reads calls out of the text (`CallParser`), streamed or not; text that only
  looks like a call (bad JSON, an unknown function) stays content, as it was written.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from maas.v1 import inference_pb2

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# How constrained JSON is compiled (llguidance's options; the engine's `guide` uses them too):
# compact, with no whitespace (flexible whitespace lets a small model pad forever),
# `oneOf` taken as `anyOf`, and keywords llguidance does not implement (formats such as
# "uri") ignored rather than refused.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "coerce_one_of": True, "lenient": True}

SYSTEM = """You may call functions to help answer. The functions, as JSON schemas:
<tools>
{tools}
</tools>
To call one, reply with a JSON object naming it and giving its arguments, between tags:
<tool_call>
{{"name": <function name>, "arguments": <arguments object>}}
</tool_call>"""


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _schema(tool: inference_pb2.Tool) -> dict[str, Any]:
    return json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}


def _describe(tool: inference_pb2.Tool) -> str:
    return json.dumps({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                        "parameters": _schema(tool)}})


def render_call(name: str, arguments: str) -> str:
    """An assistant's call as the model would have written it."""
    try:
        args: Any = json.loads(arguments) if arguments else {}
    except ValueError:
        args = arguments  # kept as given: the model sees what was sent
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args})}\n{CLOSE}"


def chat_turns(messages: Iterable[inference_pb2.ChatMessage],
               tools: Sequence[inference_pb2.Tool]) -> list[tuple[str, str]]:
    """(role, content) turns of a chat with tools, for a template that knows no tools: the
    tools in a system message (before the chat's own system text, if any), calls written
    out in their assistant turns, results in `tool` turns wrapped as the format says."""
    turns: list[tuple[str, str]] = []
    for m in messages:
        content = m.content
        if m.tool_calls:
            calls = "\n".join(render_call(c.name, c.arguments) for c in m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        turns.append((m.role, content))  # a result as a `tool` turn: templates that know the role wrap it
    if tools:
        system = SYSTEM.format(tools="\n".join(_describe(t) for t in tools))
        if turns and turns[0][0] == "system":
            turns[0] = ("system", f"{turns[0][1]}\n\n{system}")
        else:
            turns.insert(0, ("system", system))
    return turns


def closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties and says nothing of others
    closed to others (additionalProperties false, as OpenAI's strict mode asks): a forced
    call's arguments are the ones the function declares, never ones a model made up."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("const", "enum", "default", "examples", "properties", "allOf") else closed(v)
           for k, v in schema.items()}  # (allOf's parts stay open: closed, they would exclude each other)
    if isinstance(out.get("properties"), dict):  # a map of names to schemas, not a schema
        out["properties"] = {n: closed(v) for n, v in out["properties"].items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def native(template: object) -> bool:
    """Whether a chat template renders tools itself in this module's format: it takes
    `tools` and writes calls as `<tool_call>` (Hermes, Qwen 2.5 and 3). Such a template
    gets the tools, calls and results as they are (`openai_messages`); any other gets
    `chat_turns`, whose calls the router could not otherwise read back."""
    if isinstance(template, dict):  # a tokenizer with named templates: the one for tools
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and OPEN in template


def openai_messages(messages: Iterable[inference_pb2.ChatMessage]) -> list[dict[str, Any]]:
    """A chat in the shape chat templates take (OpenAI's, with arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                  for c in m.tool_calls]
        if m.role == "tool":
            turn.update(tool_call_id=m.tool_call_id, **({"name": m.name} if m.name else {}))
        out.append(turn)
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text


def openai_tools(tools: Sequence[inference_pb2.Tool]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": _schema(t)}} for t in tools]


def call_grammar(tools: Sequence[inference_pb2.Tool], name: str = "") -> str:
    """A Lark grammar (llguidance's dialect) for exactly one call in the format, of `name`
    or of any of `tools`, its arguments valid against the function's schema (`closed`)."""
    chosen = [t for t in tools if not name or t.name == name]
    rules = []
    for i, t in enumerate(chosen):
        # each function's arguments are the root of their own %json, so the schema's
        # "#/$defs/..." references resolve as written
        schema = {**closed(_schema(t)), "x-guidance": JSON_OPTIONS}
        rules.append(f'call{i}: "{{\\"name\\":\\"{t.name}\\",\\"arguments\\":" %json{json.dumps(schema)} "}}"')
    calls = " | ".join(f"call{i}" for i in range(len(chosen)))
    return "\n".join([f'start: "{OPEN}\\n" ({calls}) "\\n{CLOSE}"', *rules])


@dataclass(frozen=True)
class Call:
    index: int
    id: str
    name: str
    arguments: str  # JSON text

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_call(body: str, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call's body, or None if it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return str(obj["name"]), json.dumps(args)


class CallParser:
    """Splits a model's text, as it streams, into content and calls.

    `feed` returns what can be said now: content (holding back only a tail that may be the
    start of `<tool_call>`) and every call whose closing tag has arrived. `end` returns the
    rest: an unclosed call (cut by max_tokens) if it parses, else its text as content."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.calls: list[Call] = []
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> tuple[str, list[Call]]:
        self._buffer += text
        content, calls = [], []
        while True:
            if not self._in_call:
                at = self._buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buffer, OPEN)
                    content.append(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                content.append(self._buffer[:at])
                self._buffer = self._buffer[at:]
                self._in_call = True
            end = self._buffer.find(CLOSE)
            if end < 0:
                break
            block, self._buffer = self._buffer[:end + len(CLOSE)], self._buffer[end + len(CLOSE):]
            self._in_call = False
            call = self._call(block[len(OPEN):-len(CLOSE)])
            if call is None:
                content.append(block)
            else:
                calls.append(call)
        return "".join(content), calls

    def end(self) -> tuple[str, list[Call]]:
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            call = self._call(rest[len(OPEN):])
            if call is not None:
                return "", [call]
        return rest, []

    def _call(self, body: str) -> Call | None:
        parsed = parse_call(body.strip(), self.names)
        if parsed is None:
            return None
        call = Call(len(self.calls), new_call_id(), *parsed)
        self.calls.append(call)
        return call


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def split_calls(text: str, names: Iterable[str]) -> tuple[str, list[Call]]:
    """A whole output's content and calls."""
    parser = CallParser(names)
    content, calls = parser.feed(text)
    rest, last = parser.end()
    return (content + rest).strip(), calls + last
