"""OpenAI request bodies to `maas.v1` requests, and `maas.v1` replies to OpenAI bodies.

Pure functions, no I/O: `http.py` reads the body, calls these, and hands the protobuf
request to the router's `Forwarder`. Every refusal is an `InvalidArgument` naming the
parameter (it becomes a 400 with `param` set), so a client learns exactly what to change.

Each endpoint's accepted fields are a table (`CHAT_FIELDS`, ...): the validator rejects
any other top-level field, and `openapi.py` builds the OpenAPI schemas from the same
tables, so the description cannot drift from what is accepted.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import grpc

from maas.mesh.errors import InvalidArgument, MaasError
from maas.mesh.service_classes import CLASSES, OPENAI_TIERS
from maas.mesh.tools import NAME as TOOL_NAME
from maas.mesh.tools import CallParser, call_grammar, closed, split_calls
from maas.v1 import common_pb2, inference_pb2

DEFAULT_CHAT_MAX_TOKENS = 1024
"""max_tokens of a chat completion that does not set it (OpenAI: the rest of the context),
at most half the model's context where the router knows it (`chat_max_tokens`). Bounded
because an engine reserves KV cache for prompt + max_tokens, and refuses a prompt plus
max_tokens beyond the model's context. /v1/completions keeps OpenAI's default of 16."""

MAX_TOKENS = 1 << 20
"""The most max_tokens (or max_completion_tokens) any request may ask for: a cheap bound at
the door. The worker refuses a prompt plus max_tokens beyond the model's own context (a
400 naming that context)."""

MAX_STOP = 16
MAX_TOOLS = 128
MAX_N = 16
MAX_PROMPTS = 64
MAX_SCHEMA_CHARS = 64 * 1024
RESPONSE_FORMAT_DOC = ("`{\"type\": \"text\"}` (default), `{\"type\": \"json_object\"}` or `{\"type\": "
                       "\"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}`: the output "
                       "follows it by constrained decoding (engines with a tokenizer: hf).")
INT32 = 2**31
OWNER = "maas-mesh"

JsonType = Literal["string", "integer", "number", "boolean", "array", "object"]


@dataclass(frozen=True)
class Field:
    """One accepted top-level field: its JSON types (null always means "not given")."""

    types: tuple[JsonType, ...]
    doc: str
    required: bool = False


def _f(*types: JsonType, doc: str, required: bool = False) -> Field:
    return Field(types, doc, required)


_SAMPLING: dict[str, Field] = {
    "model": _f("string", required=True, doc="Deployment to serve the request: `name` (or `name@version`)."),
    "max_tokens": _f("integer", doc=f"Most tokens to generate, 1 to {MAX_TOKENS}; the prompt plus these must fit "
                                    "the model's context (`context_length`)."),
    "temperature": _f("number", doc=">= 0; 0 is greedy. Default 1."),
    "top_p": _f("number", doc="Nucleus sampling, in (0, 1]. Default 1."),
    "stop": _f("string", "array", doc=f"A stop string or up to {MAX_STOP}; never part of the output."),
    "seed": _f("integer", doc="Same seed and input, same output."),
    "presence_penalty": _f("number", doc="In [-2, 2]."),
    "frequency_penalty": _f("number", doc="In [-2, 2]."),
    "n": _f("integer", doc="Choices to return, 1 to 16 (the prompt is prefilled once: the other choices find it "
                           "in the prefix cache). With a seed, choice i samples with seed + i."),
    "stream": _f("boolean", doc="Stream the output as server-sent events."),
    "stream_options": _f("object", doc="`{\"include_usage\": true}` adds a final chunk with the usage."),
    "user": _f("string", doc="Accepted and ignored."),
    "logit_bias": _f("object", doc="Only an empty object is supported."),
    "top_k": _f("integer", doc="Extension: sample from the k most likely tokens (0: off)."),
    "repetition_penalty": _f("number", doc="Extension: > 0; 1 is off."),
    "ignore_eos": _f("boolean", doc="Extension: keep generating past end-of-sequence (benchmarks)."),
    "adapter": _f("string", doc="Extension: a LoRA adapter registered against the model."),
    "min_tokens": _f("integer", doc="Extension: end-of-sequence and stop_token_ids cannot end the output before "
                                    "this many tokens (0 to max_tokens)."),
    "min_p": _f("number", doc="Extension: drop tokens less likely than min_p times the most likely one, in [0, 1]."),
    "stop_token_ids": _f("array", doc="Extension: token ids that end the output (not part of its text)."),
}

CHAT_FIELDS: dict[str, Field] = {
    **_SAMPLING,
    "messages": _f("array", required=True,
                   doc="The chat: objects with `role` (system, developer, user, assistant, tool) and "
                       "`content` (a string or text parts)."),
    "max_completion_tokens": _f("integer", doc=f"Most tokens to generate, 1 to {MAX_TOKENS}; wins over "
                                               f"max_tokens. Default {DEFAULT_CHAT_MAX_TOKENS}, at most half "
                                               "the model's context."),
    "logprobs": _f("boolean", doc="Return the log probability of each output token."),
    "top_logprobs": _f("integer", doc="With logprobs: also the N most likely tokens at each position (0-20)."),
    "store": _f("boolean", doc="Accepted and ignored."),
    "metadata": _f("object", doc="Accepted and ignored."),
    "service_tier": _f("string", doc="The request's class: \"priority\" (interactive), \"flex\" (batch), "
                                     "\"auto\" or \"default\" (the key's own), or one of interactive, standard, "
                                     "batch; at most the key's class."),
    "prompt_cache_key": _f("string", doc="Accepted and ignored (the prefix cache needs no key)."),
    "safety_identifier": _f("string", doc="Accepted and ignored."),
    "parallel_tool_calls": _f("boolean", doc="Accepted; a forced call (`tool_choice` required or named) is "
                                             "one call."),
    "tools": _f("array", doc=f"Functions the model may call (at most {MAX_TOOLS}): "
                             "`{\"type\": \"function\", \"function\": {name, description, parameters}}`."),
    "tool_choice": _f("string", "object", doc="\"auto\" (default with tools), \"none\", \"required\" or "
                                              "`{\"type\": \"function\", \"function\": {\"name\": ...}}`; "
                                              "required and named calls are produced under constrained decoding, "
                                              "so their arguments always match the schema."),
    "functions": _f("array", doc="Deprecated function calling: not supported, use tools."),
    "function_call": _f("string", "object", doc="Deprecated: only \"none\" or \"auto\"; use tool_choice."),
    "response_format": _f("object", doc=RESPONSE_FORMAT_DOC),
    "modalities": _f("array", doc="Only `[\"text\"]`."),
}

COMPLETION_FIELDS: dict[str, Field] = {
    **_SAMPLING,
    "prompt": _f("string", "array", required=True, doc="The prompt: a string (or an array of one string)."),
    "max_tokens": _f("integer", doc=f"Most tokens to generate, 1 to {MAX_TOKENS}; the prompt plus these must fit "
                                    "the model's context (`context_length`). Default 16."),
    "logprobs": _f("integer", doc="Return log probabilities of the output tokens and the N most likely (0-20)."),
    "echo": _f("boolean", doc="Put the prompt before the output; with logprobs, the prompt's tokens and their "
                              "log probabilities come first (the first token's is null)."),
    "suffix": _f("string", doc="Not supported: only null or empty."),
    "best_of": _f("integer", doc="Only 1."),
    "response_format": _f("object", doc=RESPONSE_FORMAT_DOC + " Extension: OpenAI's completions have none."),
}

EMBEDDING_FIELDS: dict[str, Field] = {
    "model": _SAMPLING["model"],
    "input": _f("string", "array", required=True, doc="A string or an array of strings."),
    "encoding_format": _f("string", doc="\"float\" (default) or \"base64\" (little-endian float32)."),
    "dimensions": _f("integer", doc="Not supported: leave it out."),
    "user": _SAMPLING["user"],
}

BATCH_FIELDS: dict[str, Field] = {
    "input_file_id": _f("string", required=True, doc="A file uploaded with purpose `batch`: one request per line."),
    "endpoint": _f("string", required=True,
                   doc="`/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`: every line's `url`."),
    "completion_window": _f("string", doc="`24h` (default), or any `Nh` / `Nm` from 1m to 168h."),
    "metadata": _f("object", doc="Up to 16 string pairs, kept with the batch."),
    "output_expires_after": _f("object", doc="Accepted and ignored: result files are kept until deleted."),
}

MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_call_id", "tool_calls", "refusal"})
STREAM_OPTION_KEYS = frozenset({"include_usage", "include_obfuscation"})


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__


def _is(value: object, types: tuple[JsonType, ...]) -> bool:
    kind = _json_type(value)
    return kind in types or (kind == "integer" and "number" in types)


def checked(body: object, fields: Mapping[str, Field], ignored: list[str] | None = None) -> dict[str, Any]:
    """The body's given fields (nulls dropped), after checking names and JSON types. Fields
    it does not know are refused, or, given an `ignored` list, dropped and named there (as
    vLLM does: gateways and newer clients send fields of their own)."""
    if not isinstance(body, dict):
        raise InvalidArgument(f"the request body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - set(fields))
    if unknown and ignored is None:
        raise InvalidArgument(f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                              field=unknown[0])
    if unknown and ignored is not None:
        ignored.extend(unknown)
    out: dict[str, Any] = {}
    for name, value in body.items():
        if value is None or name not in fields:
            continue
        types = fields[name].types
        if not _is(value, types):
            raise InvalidArgument(f"{name} must be {' or '.join(_article(t) for t in types)}, "
                                  f"got {_json_type(value)}", field=name)
        out[name] = value
    for name, spec in fields.items():
        if spec.required and name not in out:
            raise InvalidArgument(f"{name} is required", field=name)
    return out


def _article(t: str) -> str:
    return f"an {t}" if t[0] in "aeiou" else f"a {t}"


def _int(body: Mapping[str, Any], name: str, lo: int = -INT32, hi: int = INT32 - 1) -> int | None:
    value = body.get(name)
    if value is not None and not lo <= value <= hi:
        raise InvalidArgument(f"{name} must be in [{lo}, {hi}], got {value}", field=name)
    return value


def _only(body: Mapping[str, Any], name: str, allowed: Sequence[object], what: str) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise InvalidArgument(f"{name} {what}", field=name)


@dataclass(frozen=True)
class Options:
    """What shapes the reply, apart from the protobuf request itself."""

    kind: Literal["chat", "text"]
    model: str            # as the client asked for it (echoed in every reply)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    max_tokens_given: bool = True  # False: a chat's max_tokens is the default (`chat_max_tokens`)
    tools: tuple[str, ...] = ()    # functions the output may call: calls are read out of it
    n: int = 1                     # choices per prompt
    # a completion's prompts (text or token ids), when it sent several or echoes (choices: prompt x n)
    prompts: tuple[str | tuple[int, ...], ...] = ()
    echo: bool = False             # a completion's text (and logprobs) begin with its prompt('s)


def _common(body: Mapping[str, Any], request: inference_pb2.GenerateRequest) -> None:
    """Sampling parameters and the refusals both generate endpoints share."""
    p = request.params
    if not body["model"]:
        raise InvalidArgument("model must not be empty", field="model")
    request.model = body["model"]
    request.adapter = body.get("adapter", "")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if name in body:
            setattr(p, name, body[name])
    if (top_k := _int(body, "top_k")) is not None:
        p.top_k = top_k
    if (seed := _int(body, "seed", -(2**63), 2**64 - 1)) is not None:
        p.seed = seed % 2**64  # OpenAI's seeds are signed 64-bit; ours unsigned
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP:
        raise InvalidArgument(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", field="stop")
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise InvalidArgument(f"stop[{i}] must be a string, got {_json_type(s)}", field="stop")
    p.stop.extend(stops)
    p.ignore_eos = body.get("ignore_eos", False)
    if (min_tokens := _int(body, "min_tokens", 0, MAX_TOKENS)) is not None:
        p.min_tokens = min_tokens
    if "min_p" in body:
        p.min_p = body["min_p"]
    for i, t in enumerate(body.get("stop_token_ids") or []):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < INT32:
            raise InvalidArgument(f"stop_token_ids[{i}] must be a token id (an integer >= 0), got {t!r}",
                                  field="stop_token_ids")
        p.stop_token_ids.append(t)
    if body.get("logit_bias"):
        raise InvalidArgument("logit_bias is not supported (only an empty object)", field="logit_bias")
    options = body.get("stream_options") or {}
    unknown = sorted(set(options) - STREAM_OPTION_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown stream_options field: {', '.join(unknown)}", field="stream_options")
    for key in STREAM_OPTION_KEYS & set(options):
        if not isinstance(options[key], bool):
            raise InvalidArgument(f"stream_options.{key} must be a boolean", field="stream_options")


def _max_tokens(p: common_pb2.SamplingParams, value: int | None, default: int | None) -> None:
    if value is not None:
        p.max_tokens = value
    elif default is not None:
        p.max_tokens = default


def chat_max_tokens(context_length: int) -> int:
    """max_tokens of a chat that does not set it, for a model of `context_length` tokens (0:
    not known): DEFAULT_CHAT_MAX_TOKENS, at most half the context, so that a prompt of up to
    the other half fits (the engine refuses a prompt plus max_tokens beyond the context)."""
    return min(DEFAULT_CHAT_MAX_TOKENS, context_length // 2) if context_length > 0 else DEFAULT_CHAT_MAX_TOKENS


def chat_request(body: object, ignored: list[str] | None = None) -> tuple[inference_pb2.GenerateRequest, Options]:
    b = checked(body, CHAT_FIELDS, ignored)
    request = inference_pb2.GenerateRequest()
    _common(b, request)
    request.messages.extend(chat_messages(b["messages"]))
    max_tokens = _int(b, "max_completion_tokens", 1, MAX_TOKENS)
    if max_tokens is None:
        max_tokens = _int(b, "max_tokens", 1, MAX_TOKENS)
    _max_tokens(request.params, max_tokens, DEFAULT_CHAT_MAX_TOKENS)
    top = _int(b, "top_logprobs")
    if b.get("logprobs"):
        request.params.logprobs = top or 0
    elif top is not None:
        raise InvalidArgument("top_logprobs needs logprobs: true", field="top_logprobs")
    if b.get("functions"):
        raise InvalidArgument("functions (deprecated) is not supported: send tools", field="functions")
    _only(b, "function_call", ["none", "auto"], "is not supported (only \"none\" or \"auto\"): use tool_choice")
    _response_format(b, request.params)
    tools = _tools(b.get("tools") or [])
    choice = _tool_choice(b.get("tool_choice"), tools)
    if choice != "none":
        request.tools.extend(tools)
    if choice not in ("none", "auto"):
        if request.params.HasField("guide"):
            raise InvalidArgument("response_format cannot be combined with a required tool call",
                                  field="response_format")
        request.params.guide.lark = call_grammar(tools, "" if choice == "required" else choice)
    _only(b, "modalities", [["text"]], "is not supported: only [\"text\"]")
    tier = b.get("service_tier")
    if tier is not None:
        if tier not in OPENAI_TIERS and tier not in CLASSES:
            raise InvalidArgument(f"service_tier must be one of {', '.join([*OPENAI_TIERS, *CLASSES])}, not {tier!r}",
                                  field="service_tier")
        request.service_class = OPENAI_TIERS.get(tier, tier)
    opts = _options("chat", b, max_tokens_given=max_tokens is not None)
    if choice != "none" and tools:
        opts = replace(opts, tools=tuple(t.name for t in tools))
    return request, opts


def _response_format(b: Mapping[str, Any], p: common_pb2.SamplingParams) -> None:
    fmt = b.get("response_format")
    if fmt is None:
        return
    kind = fmt.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        p.guide.json_object = True
        return
    if kind != "json_schema":
        raise InvalidArgument(f"response_format.type must be text, json_object or json_schema, not {kind!r}",
                              field="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
        raise InvalidArgument("response_format.json_schema must be an object whose schema is an object",
                              field="response_format")
    # strict (OpenAI's structured outputs): objects take only the properties they list
    schema = json.dumps(closed(spec.get("schema", {})) if spec.get("strict") else spec.get("schema", {}))
    if len(schema) > MAX_SCHEMA_CHARS:
        raise InvalidArgument(f"response_format's schema is {len(schema)} characters; at most {MAX_SCHEMA_CHARS}",
                              field="response_format")
    p.guide.json_schema = schema


def _tools(raw: list[Any]) -> list[inference_pb2.Tool]:
    if len(raw) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools, got {len(raw)}", field="tools")
    out, names = [], set()
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise InvalidArgument(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", field=where)
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidArgument(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}",
                                  field=f"{where}.function.name")
        if name in names:
            raise InvalidArgument(f"{where}: two tools are named {name!r}", field=f"{where}.function.name")
        names.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidArgument(f"{where}.function.parameters must be a JSON schema object",
                                  field=f"{where}.function.parameters")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise InvalidArgument(f"{where}.function.description must be a string", field=f"{where}.function.description")
        schema = json.dumps(params) if params is not None else ""
        if len(schema) > MAX_SCHEMA_CHARS:
            raise InvalidArgument(f"{where}.function.parameters is {len(schema)} characters; at most "
                                  f"{MAX_SCHEMA_CHARS}", field=f"{where}.function.parameters")
        out.append(inference_pb2.Tool(name=name, description=description, parameters=schema))
    return out


def _tool_choice(choice: object, tools: Sequence[inference_pb2.Tool]) -> str:
    """"none", "auto", "required" or the name of the function that must be called."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidArgument("tool_choice must be none, auto, required or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}", field="tool_choice")
        if name not in {t.name for t in tools}:
            raise InvalidArgument(f"tool_choice names {name!r}, which is not one of the tools", field="tool_choice")
        return name
    if choice not in ("none", "auto", "required"):
        raise InvalidArgument(f"tool_choice must be none, auto, required or a function, not {choice!r}",
                              field="tool_choice")
    if choice == "required" and not tools:
        raise InvalidArgument("tool_choice required needs tools", field="tool_choice")
    return str(choice)


def completion_request(body: object,
                       ignored: list[str] | None = None) -> tuple[inference_pb2.GenerateRequest, Options]:
    b = checked(body, COMPLETION_FIELDS, ignored)
    request = inference_pb2.GenerateRequest()
    _common(b, request)
    prompts = _prompts(b["prompt"])
    _set_prompt(request, prompts[0])
    _max_tokens(request.params, _int(b, "max_tokens", 1, MAX_TOKENS), None)
    if (logprobs := _int(b, "logprobs")) is not None:
        request.params.logprobs = logprobs
    if b.get("echo") and "logprobs" in b:
        request.params.prompt_logprobs = request.params.logprobs
    _only(b, "suffix", [""], "is not supported (only null)")
    _only(b, "best_of", [1], "must be 1")
    _response_format(b, request.params)
    opts = replace(_options("text", b), echo=bool(b.get("echo")))
    if opts.echo and any(isinstance(p, tuple) for p in prompts) and "logprobs" not in b:
        raise InvalidArgument("echo of a token-id prompt needs logprobs (its text is the tokens' text)",
                              field="echo")
    return request, replace(opts, prompts=tuple(prompts)) if len(prompts) > 1 or opts.echo else opts


Prompt = str | tuple[int, ...]


def _prompts(raw: Any) -> list[Prompt]:
    """A completion's prompts: a string, a list of strings, a list of token ids, or a list of
    lists of token ids."""
    if isinstance(raw, str):
        return [raw]
    if raw and all(_is_id(x) for x in raw):
        return [tuple(raw)]
    if not 1 <= len(raw) <= MAX_PROMPTS:
        raise InvalidArgument(f"prompt takes 1 to {MAX_PROMPTS} prompts, got {len(raw)}", field="prompt")
    out: list[Prompt] = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, list) and p and all(_is_id(x) for x in p):
            out.append(tuple(p))
        else:
            raise InvalidArgument(f"prompt[{i}] must be a string or a non-empty list of token ids (integers >= 0)",
                                  field="prompt")
    return out


def _is_id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32


def _set_prompt(request: inference_pb2.GenerateRequest, prompt: Prompt) -> None:
    if isinstance(prompt, str):
        request.prompt = prompt
        del request.prompt_token_ids[:]
    else:
        request.prompt = ""
        request.prompt_token_ids[:] = prompt


def _options(kind: Literal["chat", "text"], b: Mapping[str, Any], *, max_tokens_given: bool = True) -> Options:
    stream = b.get("stream", False)
    return Options(kind=kind, model=b["model"], stream=stream, n=_int(b, "n", 1, MAX_N) or 1,
                   include_usage=stream and (b.get("stream_options") or {}).get("include_usage", False),
                   logprobs=b.get("logprobs") is True if kind == "chat" else "logprobs" in b,
                   max_tokens_given=max_tokens_given)


def chat_messages(messages: list[Any]) -> list[inference_pb2.ChatMessage]:
    """OpenAI messages to ChatMessage: text parts joined, "developer" is "system". The
    worker checks the roles (it renders the chat with the model's template)."""
    if not messages:
        raise InvalidArgument("messages must not be empty", field="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidArgument(f"{where} must be an object, got {_json_type(m)}", field=where)
        unknown = sorted(set(m) - MESSAGE_KEYS)
        if unknown:
            raise InvalidArgument(f"unknown field in {where}: {', '.join(unknown)}", field=f"{where}.{unknown[0]}")
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidArgument(f"{where}.role must be a string, got {_json_type(role)}", field=f"{where}.role")
        for key in ("name", "tool_call_id", "refusal"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise InvalidArgument(f"{where}.{key} must be a string", field=f"{where}.{key}")
        calls = _calls(m.get("tool_calls"), where) if role == "assistant" else []
        if m.get("tool_calls") and role != "assistant":
            raise InvalidArgument(f"{where}.tool_calls: only an assistant message makes calls",
                                  field=f"{where}.tool_calls")
        content = _content(m.get("content"), where, role)
        out.append(inference_pb2.ChatMessage(role="system" if role == "developer" else role, content=content,
                                             tool_calls=calls, tool_call_id=m.get("tool_call_id") or "",
                                             name=m.get("name") or "" if role == "tool" else ""))
    return out


def _calls(raw: object, where: str) -> list[inference_pb2.ToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidArgument(f"{where}.tool_calls must be an array", field=f"{where}.tool_calls")
    out = []
    for j, c in enumerate(raw):
        at = f"{where}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidArgument(f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                  f"\"arguments\"}}}}", field=at)
        arguments = fn.get("arguments", "")
        if not isinstance(arguments, str):
            raise InvalidArgument(f"{at}.function.arguments must be a string of JSON", field=f"{at}.function.arguments")
        out.append(inference_pb2.ToolCall(id=str(c.get("id") or ""), name=fn["name"], arguments=arguments))
    return out


def _content(content: object, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":  # one that only made calls
            return ""
        raise InvalidArgument(f"{where}.content is required", field=f"{where}.content")
    if not isinstance(content, list):
        raise InvalidArgument(f"{where}.content must be a string or an array of text parts, "
                              f"got {_json_type(content)}", field=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise InvalidArgument(f"{at} must be an object, got {_json_type(part)}", field=at)
        if part.get("type") != "text":
            raise InvalidArgument(f"{at}: only text parts are supported, got type {part.get('type')!r}", field=at)
        if not isinstance(part.get("text"), str):
            raise InvalidArgument(f"{at}.text must be a string", field=at)
        texts.append(part["text"])
    return "\n".join(texts)


@dataclass(frozen=True)
class EmbedOptions:
    model: str
    base64: bool


def embedding_request(body: object, ignored: list[str] | None = None) -> tuple[inference_pb2.EmbedRequest, EmbedOptions]:
    b = checked(body, EMBEDDING_FIELDS, ignored)
    if not b["model"]:
        raise InvalidArgument("model must not be empty", field="model")
    inputs = b["input"]
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise InvalidArgument("input must not be empty", field="input")
    for i, x in enumerate(inputs):
        if not isinstance(x, str):
            raise InvalidArgument(f"input[{i}] must be a string (token-id inputs are not supported), "
                                  f"got {_json_type(x)}", field="input")
    _only(b, "encoding_format", ["float", "base64"], "must be \"float\" or \"base64\"")
    if "dimensions" in b:
        raise InvalidArgument("dimensions is not supported: the model's own size is returned", field="dimensions")
    return (inference_pb2.EmbedRequest(model=b["model"], inputs=inputs),
            EmbedOptions(model=b["model"], base64=b.get("encoding_format") == "base64"))


# ---- replies ------------------------------------------------------------------------------


def finish_reason(code: int) -> str:
    """OpenAI's finish_reason; a cancelled or failed sequence is an error, not a reply."""
    if code == common_pb2.FINISH_REASON_STOP:
        return "stop"
    if code == common_pb2.FINISH_REASON_LENGTH:
        return "length"
    if code == common_pb2.FINISH_REASON_CONTENT_FILTER:
        return "content_filter"
    err = MaasError("the request was cancelled before it finished" if code == common_pb2.FINISH_REASON_CANCELLED
                    else "the engine failed while producing this completion")
    err.code = grpc.StatusCode.CANCELLED if code == common_pb2.FINISH_REASON_CANCELLED else grpc.StatusCode.INTERNAL
    raise err


def usage(u: common_pb2.Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def _token(lp: common_pb2.TokenLogprob | common_pb2.TopLogprob) -> str:
    # the worker sends ids; without the text, name the id the way vLLM does
    return lp.token or f"token_id:{lp.token_id}"


def chat_logprobs(lps: Sequence[common_pb2.TokenLogprob]) -> dict[str, Any]:
    return {"content": [{"token": _token(lp), "logprob": lp.logprob, "bytes": _bytes(_token(lp)),
                         "top_logprobs": [{"token": _token(t), "logprob": t.logprob, "bytes": _bytes(_token(t))}
                                          for t in lp.top]} for lp in lps],
            "refusal": None}


def text_logprobs(lps: Sequence[common_pb2.TokenLogprob], offset: int = 0,
                  prompt: Sequence[common_pb2.TokenLogprob] = (), text: str = "") -> dict[str, Any]:
    """Completions' logprobs: with `prompt` (echo), the prompt's tokens first, the first of
    them with null (nothing precedes it). `text_offset`: where each token begins in the
    choice's text, `text` being the part these tokens make and `offset` where it begins; a
    token not written there as itself (a special token such as `<s>`, a piece of a
    character `bytes:...`) takes no characters."""
    tokens = [_token(lp) for lp in [*prompt, *lps]]
    offsets, at, pending = [], 0, b""
    for token in tokens:
        offsets.append(offset + at)
        if token.startswith("bytes:"):  # a piece of a character: it counts once the character is whole
            pending += bytes(_bytes(token) or b"")
            try:
                token, pending = pending.decode(), b""
            except UnicodeDecodeError:
                continue
        if token and text.startswith(token, at):
            at += len(token)
        elif token.strip() and text.startswith(token.lstrip(), at):  # SentencePiece's "▁"-space at the start
            at += len(token.lstrip())
    values: list[float | None] = [lp.logprob for lp in [*prompt, *lps]]
    tops: list[dict[str, float] | None] = [{_token(t): t.logprob for t in lp.top} for lp in [*prompt, *lps]]
    if prompt:
        values[0] = tops[0] = None
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _echo(prompt: str | tuple[int, ...], lps: Sequence[common_pb2.TokenLogprob]) -> str:
    """The text an echo puts first: the prompt, or a token-id prompt's tokens' text."""
    if isinstance(prompt, str):
        return prompt
    return b"".join(bytes(_bytes(lp.token) or b"") for lp in lps).decode(errors="replace")


def _bytes(token: str) -> list[int] | None:
    if token.startswith("token_id:"):  # no text known
        return None
    if token.startswith("bytes:"):
        return list(token[6:].encode("latin-1").decode("unicode_escape").encode("latin-1"))
    return list(token.encode())


def completion_id(kind: Literal["chat", "text"], request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def choices(request: inference_pb2.GenerateRequest, opts: Options) -> list[inference_pb2.GenerateRequest]:
    """The requests of every choice, in the order of their index: each prompt (a completion
    may send several) n times; with a seed, the i-th of a prompt's choices samples with
    seed + i, so they differ and each is reproducible."""
    out = []
    for prompt in opts.prompts or ("",):
        for i in range(opts.n):
            r = inference_pb2.GenerateRequest()
            r.CopyFrom(request)
            if opts.prompts:
                _set_prompt(r, prompt)
            if i and r.params.HasField("seed"):
                r.params.seed = (r.params.seed + i) % 2**64
            out.append(r)
    return out


def total_usage(replies: Sequence[common_pb2.Usage], n: int) -> common_pb2.Usage:
    """The usage of all choices: each prompt counted once (its n choices share it), every
    completion token."""
    firsts = replies[::n]
    return common_pb2.Usage(prompt_tokens=sum(u.prompt_tokens for u in firsts),
                            cached_prompt_tokens=sum(u.cached_prompt_tokens for u in firsts),
                            completion_tokens=sum(u.completion_tokens for u in replies))


def completion(reply: inference_pb2.GenerateResponse, opts: Options, request_id: str,
               created: int) -> dict[str, Any]:
    """The non-streamed reply of /v1/chat/completions or /v1/completions (one choice)."""
    return completions([reply], opts, request_id, created)


def completions(replies: Sequence[inference_pb2.GenerateResponse], opts: Options, request_id: str,
                created: int) -> dict[str, Any]:
    """The non-streamed reply with a choice per reply, in order."""
    return {"id": completion_id(opts.kind, request_id),
            "object": "chat.completion" if opts.kind == "chat" else "text_completion", "created": created,
            "model": opts.model, "system_fingerprint": None,
            "choices": [_choice(r, opts, i) for i, r in enumerate(replies)],
            "usage": usage(total_usage([r.usage for r in replies], opts.n))}


def _choice(reply: inference_pb2.GenerateResponse, opts: Options, index: int) -> dict[str, Any]:
    reason = finish_reason(reply.finish_reason)
    choice: dict[str, Any] = {"index": index, "finish_reason": reason}
    if opts.kind == "chat":
        choice["message"] = {"role": "assistant", "content": reply.text, "refusal": None}
        if opts.tools:
            content, calls = split_calls(reply.text, opts.tools)
            if calls:
                choice["message"].update(content=content or None, tool_calls=[c.openai() for c in calls])
                choice["finish_reason"] = "tool_calls"
        choice["logprobs"] = chat_logprobs(reply.logprobs) if opts.logprobs else None
    else:
        prompt = _echo(opts.prompts[index // opts.n], reply.prompt_logprobs) if opts.echo else ""
        choice["text"] = prompt + reply.text
        choice["logprobs"] = text_logprobs(reply.logprobs, 0, reply.prompt_logprobs if opts.echo else (),
                                           choice["text"]) if opts.logprobs else None
    return choice


class StreamEncoder:
    """The server-sent events of one streamed completion, as JSON objects: `start()`, then
    `chunk()` for each GenerateChunk, then `end()` (the usage chunk, if asked for)."""

    def __init__(self, opts: Options, request_id: str, created: int, index: int = 0) -> None:
        self.opts = opts
        self.index = index  # the choice it streams
        self.head = {"id": completion_id(opts.kind, request_id),
                     "object": "chat.completion.chunk" if opts.kind == "chat" else "text_completion",
                     "created": created, "model": opts.model, "system_fingerprint": None}
        self.usage: dict[str, Any] | None = None
        self.calls = CallParser(opts.tools) if opts.kind == "chat" and opts.tools else None
        self.echo = opts.prompts[index // opts.n] if opts.echo else None  # sent with the first chunk
        self.chars = 0  # characters of text sent (a completion's text_offset)

    def _event(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        event = {**self.head, "choices": choices}
        if self.opts.include_usage:
            event["usage"] = None
        return event

    def start(self) -> list[dict[str, Any]]:
        if self.opts.kind != "chat":
            return []
        return [self._event([{"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def chunk(self, chunk: inference_pb2.GenerateChunk) -> list[dict[str, Any]]:
        reason = finish_reason(chunk.finish_reason) if chunk.finish_reason else None
        if reason is not None:
            self.usage = usage(chunk.usage)
        text, prompt_lps = chunk.text, ()
        if self.echo is not None:
            text, prompt_lps, self.echo = _echo(self.echo, chunk.prompt_logprobs) + text, chunk.prompt_logprobs, None
        if not text and reason is None and not (self.opts.logprobs and chunk.logprobs):
            return []
        logprobs = None
        if self.opts.logprobs:
            logprobs = chat_logprobs(chunk.logprobs) if self.opts.kind == "chat" else \
                text_logprobs(chunk.logprobs, self.chars, prompt_lps, text)
        self.chars += len(text)
        choice: dict[str, Any] = {"index": self.index, "logprobs": logprobs, "finish_reason": reason}
        if self.calls is not None:
            return self._with_calls(chunk.text, choice)
        if self.opts.kind == "chat":
            choice["delta"] = {"content": chunk.text} if chunk.text or reason is None else {}
        else:
            choice["text"] = text
        return [self._event([choice])]

    def _with_calls(self, text: str, choice: dict[str, Any]) -> list[dict[str, Any]]:
        """Content as it comes, each call once whole: a delta naming it, then one with its
        arguments (the shape OpenAI streams, in two pieces)."""
        assert self.calls is not None
        content, calls = self.calls.feed(text)
        if choice["finish_reason"] is not None:
            rest, last = self.calls.end()
            content, calls = content + rest, calls + last
            if self.calls.calls:
                choice["finish_reason"] = "tool_calls"
        events = []
        for call in calls:
            head = {"index": call.index, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}}
            for delta in ({"tool_calls": [head]},
                          {"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]}):
                events.append(self._event([{"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}]))
        if content or choice["logprobs"]:
            events.insert(0, self._event([{**choice, "delta": {"content": content}, "finish_reason": None}]))
        if choice["finish_reason"] is not None:
            events.append(self._event([{**choice, "delta": {}, "logprobs": None}]))
        return events

    def end(self) -> list[dict[str, Any]]:
        if not self.opts.include_usage or self.usage is None:
            return []
        return [{**self.head, "choices": [], "usage": self.usage}]


def embedding_list(reply: inference_pb2.EmbedResponse, opts: EmbedOptions) -> dict[str, Any]:
    data = []
    for i, e in enumerate(reply.data):
        values: Any = list(e.values)
        if opts.base64:
            values = base64.b64encode(struct.pack(f"<{len(e.values)}f", *e.values)).decode()
        data.append({"object": "embedding", "index": i, "embedding": values})
    tokens = reply.usage.prompt_tokens
    return {"object": "list", "data": data, "model": opts.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def model_object(m: inference_pb2.ServedModel) -> dict[str, Any]:
    """OpenAI's Model, plus what the mesh knows (extension fields)."""
    return {"id": m.name, "object": "model", "created": 0, "owned_by": OWNER, "version": m.version,
            "task": m.task or "generate", "context_length": m.context_length, "ready_replicas": m.ready_replicas,
            "ready": m.ready, "parent": m.parent or None}


def model_list(reply: inference_pb2.ListModelsResponse) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in reply.models]}
