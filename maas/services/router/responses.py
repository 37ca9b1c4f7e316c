"""OpenAI's Responses API (`POST /v1/responses`) as a translation of chat completions.

A Responses request becomes a chat completion body (`chat_body`), runs through the same
path as `/v1/chat/completions` (keys, limits, routing, tools, structured outputs), and its
reply comes back as a Response object (`response`) or, streamed, as Responses events
(`ResponseEvents`, fed the chat chunks). Pure functions and one small state machine; no I/O.

What is not kept: responses are not stored (`store` is accepted and ignored), so
`previous_response_id` and retrieving a response later are refused; a conversation is
sent whole as `input` items, function calls and their outputs included.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from maas.mesh.errors import InvalidArgument
from maas.services.router.openai_api import Field, _f, checked

RESPONSE_FIELDS: dict[str, Field] = {
    "model": _f("string", required=True, doc="Deployment to serve the request."),
    "input": _f("string", "array", required=True,
                doc="A string, or items: messages (`role`, `content` as a string or input_text parts), "
                    "`function_call` and `function_call_output`."),
    "instructions": _f("string", doc="A system message put first."),
    "max_output_tokens": _f("integer", doc="Most tokens to generate."),
    "temperature": _f("number", doc=">= 0; 0 is greedy."),
    "top_p": _f("number", doc="In (0, 1]."),
    "stream": _f("boolean", doc="Stream Responses events as server-sent events."),
    "tools": _f("array", doc="Function tools: `{\"type\": \"function\", \"name\", \"description\", \"parameters\"}`."),
    "tool_choice": _f("string", "object", doc="auto, none, required, or `{\"type\": \"function\", \"name\"}`."),
    "parallel_tool_calls": _f("boolean", doc="Accepted; a forced call is one call."),
    "text": _f("object", doc="`{\"format\": {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}}`."),
    "store": _f("boolean", doc="Accepted and ignored: responses are not stored."),
    "metadata": _f("object", doc="Echoed in the response."),
    "user": _f("string", doc="Accepted and ignored."),
    "service_tier": _f("string", doc="As on chat completions."),
    "previous_response_id": _f("string", doc="Not supported: responses are not stored; send the whole input."),
    "seed": _f("integer", doc="Extension: same seed and input, same output."),
    "truncation": _f("string", doc="Only \"disabled\"."),
}


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def chat_body(body: object, ignored: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the chat completion body, what the reply must echo) of a Responses request."""
    b = checked(body, RESPONSE_FIELDS, ignored)
    if "previous_response_id" in b:
        raise InvalidArgument("previous_response_id is not supported: responses are not stored; send the "
                              "conversation as input items", field="previous_response_id")
    if b.get("truncation", "disabled") != "disabled":
        raise InvalidArgument("truncation must be \"disabled\"", field="truncation")
    messages: list[dict[str, Any]] = []
    if b.get("instructions"):
        messages.append({"role": "system", "content": b["instructions"]})
    raw = b["input"]
    messages += [{"role": "user", "content": raw}] if isinstance(raw, str) else _items(raw)
    chat: dict[str, Any] = {"model": b["model"], "messages": messages}
    for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("stream", "stream"), ("seed", "seed"),
                         ("service_tier", "service_tier"), ("parallel_tool_calls", "parallel_tool_calls")):
        if ours in b:
            chat[theirs] = b[ours]
    if b.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    if "tools" in b:
        chat["tools"] = [_tool(t, i) for i, t in enumerate(b["tools"])]
    if "tool_choice" in b:
        choice = b["tool_choice"]
        chat["tool_choice"] = ({"type": "function", "function": {"name": choice.get("name")}}
                               if isinstance(choice, dict) else choice)
    fmt = (b.get("text") or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise InvalidArgument("text.format must be an object", field="text.format")
        if fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "output"), "schema": fmt.get("schema", {}), "strict": fmt.get("strict")}}
        else:
            chat["response_format"] = {"type": fmt.get("type")}
    echo = {"model": b["model"], "metadata": b.get("metadata") or {}, "instructions": b.get("instructions"),
            "temperature": b.get("temperature"), "top_p": b.get("top_p"),
            "max_output_tokens": b.get("max_output_tokens"), "tools": b.get("tools") or [],
            "tool_choice": b.get("tool_choice", "auto"), "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "text": {"format": fmt or {"type": "text"}}}
    return chat, echo


def _tool(t: object, i: int) -> dict[str, Any]:
    if not isinstance(t, dict) or t.get("type") != "function":
        raise InvalidArgument(f"tools[{i}]: only function tools are supported", field=f"tools[{i}]")
    return {"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                             if k in t}}


def _items(items: list[Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where} must be an object", field=where)
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
            messages.append({"role": item.get("role"), "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # calls made together, and the text before them, are one assistant turn
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise InvalidArgument(f"{where}.output must be a string", field=f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id") or "", "content": output})
        else:
            raise InvalidArgument(f"{where}: items of type {kind!r} are not supported (message, function_call, "
                                  "function_call_output)", field=where)
    return messages


def _part(part: object, where: str) -> dict[str, Any]:
    if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
        kind = part.get("type") if isinstance(part, dict) else part
        raise InvalidArgument(f"{where}: only text parts are supported, got {kind!r}", field=where)
    return {"type": "text", "text": part.get("text")}


def _usage(u: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if u is None:
        return None
    return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"],
            "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _message(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _function_call(call: Mapping[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


def _shell(rid: str, created: int, echo: Mapping[str, Any], status: str) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": echo["model"],
            "output": [], "error": None, "incomplete_details": None, "usage": None, **echo}


def response(completion: Mapping[str, Any], echo: Mapping[str, Any], rid: str, created: int) -> dict[str, Any]:
    """A chat completion's reply as a Response."""
    choice = completion["choices"][0]
    msg = choice["message"]
    output = []
    if msg.get("content"):
        output.append(_message(_id("msg"), msg["content"]))
    output += [_function_call(c) for c in msg.get("tool_calls") or []]
    cut = choice["finish_reason"] == "length"
    return {**_shell(rid, created, echo, "incomplete" if cut else "completed"), "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": _usage(completion.get("usage"))}


class ResponseEvents:
    """Chat completion chunks in, Responses streaming events out: `start()`, `chunk(c)`
    for each chat chunk, and the last events come with the chunk that carries the usage."""

    def __init__(self, echo: Mapping[str, Any], rid: str, created: int) -> None:
        self.echo, self.rid, self.created = echo, rid, created
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.text: str | None = None     # the message being written, if one is open
        self.msg_id = ""
        self.reason: str | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        shell = _shell(self.rid, self.created, self.echo, "in_progress")
        return [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]

    def _open_message(self) -> list[dict[str, Any]]:
        self.text, self.msg_id = "", _id("msg")
        at = len(self.output)
        item = _message(self.msg_id, "", "in_progress")
        item["content"] = []
        return [self._event("response.output_item.added", output_index=at, item=item),
                self._event("response.content_part.added", item_id=self.msg_id, output_index=at, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def _close_message(self) -> list[dict[str, Any]]:
        if self.text is None:
            return []
        at, text = len(self.output), self.text
        item = _message(self.msg_id, text)
        self.output.append(item)
        self.text = None
        return [self._event("response.output_text.done", item_id=self.msg_id, output_index=at, content_index=0,
                            text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=self.msg_id, output_index=at, content_index=0,
                            part=item["content"][0]),
                self._event("response.output_item.done", output_index=at, item=item)]

    def chunk(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.text is None:
                    events += self._open_message()
                self.text = (self.text or "") + delta["content"]
                events.append(self._event("response.output_text.delta", item_id=self.msg_id,
                                          output_index=len(self.output), content_index=0, delta=delta["content"],
                                          logprobs=[]))
            for call in delta.get("tool_calls") or []:
                if call.get("id"):  # a call begins (its arguments follow in the next delta)
                    events += self._close_message()
                    item = _function_call({"id": call["id"], "function": {"name": call["function"]["name"],
                                                                          "arguments": ""}}, "in_progress")
                    self.output.append(item)
                    events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                              item=dict(item)))
                elif call.get("function", {}).get("arguments"):
                    item, at = self.output[-1], len(self.output) - 1
                    item["arguments"] += call["function"]["arguments"]
                    item["status"] = "completed"
                    events += [self._event("response.function_call_arguments.delta", item_id=item["id"],
                                           output_index=at, delta=call["function"]["arguments"]),
                               self._event("response.function_call_arguments.done", item_id=item["id"],
                                           output_index=at, arguments=item["arguments"]),
                               self._event("response.output_item.done", output_index=at, item=dict(item))]
            if choice.get("finish_reason"):
                self.reason = choice["finish_reason"]
        if chunk.get("usage"):  # the last chunk: the response is complete
            events += self._close_message()
            cut = self.reason == "length"
            final = {**_shell(self.rid, self.created, self.echo, "incomplete" if cut else "completed"),
                     "output": self.output, "usage": _usage(chunk["usage"]),
                     "incomplete_details": {"reason": "max_output_tokens"} if cut else None}
            events.append(self._event("response.incomplete" if cut else "response.completed", response=final))
        return events
