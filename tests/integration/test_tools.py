"""Tool calling and structured outputs through the official `openai` client, on the forged
demo model (the hf engine): forced calls parse and match their schema however small the
model, streamed call deltas assemble into the same, a conversation carries calls and
results, and json_schema output validates."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jsonschema
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from .conftest import MeshHarness

# One stack serves every test that only sends requests (`served`): starting one costs about
# 10 s on two cores, and these tests change nothing in it. So they share the module's loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "unit": {"enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@dataclass
class Served:
    base_url: str
    key: str
    client: AsyncOpenAI


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(etcd_url: str, nats_url: str, demo_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    mesh = MeshHarness(etcd=etcd_url, nats=nats_url, prefix=f"/t{uuid.uuid4().hex[:10]}/",
                       tmp=tmp_path_factory.mktemp("tools"))
    await mesh.install_credentials()
    try:
        router = await mesh.serving_hf(demo_model_dir)
        key = await mesh.key("acme")
        base_url = f"http://{router.info.http_endpoint}/v1"
        client = AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
        yield Served(base_url, key, client)
        await client.close()
    finally:
        await mesh.close()


def _check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


async def test_a_required_call_parses_and_matches_its_schema(served: Served) -> None:
    for seed in range(3):
        reply = await served.client.chat.completions.create(
            model="demo", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=seed,
            temperature=1.0)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in SCHEMAS
        _check_call(call.function.name, call.function.arguments)


async def test_a_named_call_is_that_function(served: Served) -> None:
    reply = await served.client.chat.completions.create(
        model="demo", messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    _check_call("get_time", call.function.arguments)


async def test_streamed_call_deltas_assemble_into_the_call(served: Served) -> None:
    params = dict(model="demo", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200, seed=4,
                  temperature=0.9)
    whole = (await served.client.chat.completions.create(**params)).choices[0].message.tool_calls[0]
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    stream = await served.client.chat.completions.create(stream=True, **params)
    async for chunk in stream:
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    assert reasons[-1] == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == whole.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)  # same seed, same call
    _check_call(calls[0]["name"], calls[0]["arguments"])


async def test_a_conversation_with_a_tool_result_goes_on(served: Served) -> None:
    first = await served.client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS,
                                                        tool_choice="required", max_tokens=200, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny", "high": 21})}]
    reply = await served.client.chat.completions.create(model="demo", messages=history, tools=TOOLS,
                                                        max_tokens=12, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the result reached the model: a longer prompt than the call alone
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens


async def test_json_schema_output_validates(served: Served) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                               "year": {"type": "integer"},
                                               "genres": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                          "maxItems": 3}},
              "required": ["title", "year", "genres"], "additionalProperties": False}
    for temperature in (0.0, 1.0):
        reply = await served.client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "A film as JSON"}], max_tokens=200,
            temperature=temperature, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": schema, "strict": True}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    # any object: nothing bounds its strings, so the tiny model mostly runs out of tokens inside
    # one (finish_reason length, as OpenAI's would: about 1 seed in 8 ends here); every output
    # that ended is an object, and seeds are tried until one has
    ended = 0
    for seed in range(32):
        reply = await served.client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "JSON please"}], max_tokens=80,
            temperature=0.7, seed=seed, response_format={"type": "json_object"})
        content = reply.choices[0].message.content
        assert content.startswith("{")
        if reply.choices[0].finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(content), dict)
            if ended == 2:
                break
    assert ended, "no json_object output ended within 80 tokens in 32 seeds"


BAD = [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "letters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not one of the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"response_format": {"type": "xml"}}, "response_format", "text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "guide.json_schema", "cannot be used"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": {}}}]}]},
     "messages[0].tool_calls[0].function.arguments", "string of JSON"),
]


async def test_bad_tools_and_formats_are_400s_naming_the_field(served: Served) -> None:
    async with aiohttp.ClientSession() as http:
        for body, param, says in BAD:
            async with http.post(f"{served.base_url}/chat/completions",
                                 json={"model": "demo", "messages": ASK, "max_tokens": 5, **body},
                                 headers={"Authorization": f"Bearer {served.key}"}) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 400, (body, error)
            assert error["param"] == param and says in error["message"], (body, error)


async def test_n_choices_each_reproducible_and_streamed_with_their_index(served: Served) -> None:
    params = dict(model="demo", messages=ASK, max_tokens=8, temperature=1.0, seed=7, n=3,
                  extra_body={"ignore_eos": True})
    reply = await served.client.chat.completions.create(**params)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) > 1  # seed + i: the choices differ
    one = await served.client.chat.completions.create(**{**params, "n": 1})
    assert one.choices[0].message.content == texts[0]  # choice 0 is the request with its own seed
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert reply.usage.completion_tokens == 3 * 8
    streamed: dict[int, str] = {}
    usage = None
    async for chunk in await served.client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                                   **params):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(3)] == texts
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens


async def test_a_list_of_prompts_gets_a_choice_each(served: Served) -> None:
    prompts = ["def add(a, b):", "import os\n", "class Point:"]
    reply = await served.client.completions.create(model="demo", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in reply.choices] == list(range(6))
    for j, prompt in enumerate(prompts):
        alone = await served.client.completions.create(model="demo", prompt=prompt, max_tokens=5, temperature=0)
        assert reply.choices[2 * j].text == reply.choices[2 * j + 1].text == alone.choices[0].text


async def test_responses_plain_streamed_and_with_a_function_tool(served: Served) -> None:
    plain = await served.client.responses.create(model="demo", input="def add(a, b):", max_output_tokens=8,
                                                 temperature=0, instructions="Write Python.")
    assert plain.status == "incomplete" and plain.incomplete_details.reason == "max_output_tokens"
    assert plain.output_text and plain.usage.output_tokens == 8
    chat = await served.client.chat.completions.create(
        model="demo", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "Write Python."}, {"role": "user", "content": "def add(a, b):"}])
    assert plain.output_text == chat.choices[0].message.content  # the same request underneath

    deltas, kinds = [], []
    async with await served.client.responses.create(model="demo", input="def add(a, b):", max_output_tokens=8,
                                                    temperature=0, instructions="Write Python.",
                                                    stream=True) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert "".join(deltas) == plain.output_text == final.output_text

    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"]} for t in TOOLS]
    called = await served.client.responses.create(model="demo", input=ASK[0]["content"], tools=tools,
                                                  tool_choice="required", max_output_tokens=200, temperature=0)
    [call] = [item for item in called.output if item.type == "function_call"]
    _check_call(call.name, call.arguments)
    # the call and its output sent back as items: the conversation goes on
    after = await served.client.responses.create(
        model="demo", tools=tools, max_output_tokens=5, temperature=0,
        input=[{"role": "user", "content": ASK[0]["content"]},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert after.usage.input_tokens > called.usage.input_tokens
    with pytest.raises(Exception) as refused:
        await served.client.responses.create(model="demo", input="hi", previous_response_id="resp_1")
    assert "not stored" in str(refused.value)


async def test_echo_with_logprobs_gives_the_prompts_tokens_as_strings(served: Served) -> None:
    prompt = "def add(a, b):\n    return a + b"
    reply = await served.client.completions.create(model="demo", prompt=prompt, max_tokens=1, temperature=0,
                                                   logprobs=1, echo=True)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt)
    assert lp.tokens[0] == "<s>"  # the model's BOS, by name, as vLLM shows it
    assert "".join(lp.tokens[1:]) == choice.text  # strings, not ids, that join to the text
    assert lp.token_logprobs[0] is None and all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [0] + [sum(len(t) for t in lp.tokens[1:i]) for i in range(1, len(lp.tokens))]
    assert len(lp.tokens) == reply.usage.prompt_tokens + 1
    # streamed: the same, the prompt in the first chunk
    text, tokens, values = "", [], []
    async for chunk in await served.client.completions.create(model="demo", prompt=prompt, max_tokens=1,
                                                              temperature=0, logprobs=1, echo=True, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
    assert text == choice.text and tokens == lp.tokens and values == lp.token_logprobs
    # a list of prompts, as lm-evaluation-harness sends them
    both = await served.client.completions.create(model="demo", prompt=[prompt, "import os"], max_tokens=1,
                                                  temperature=0, logprobs=1, echo=True)
    # the same values, to float32's precision: the two prompts may share one forward pass
    # (padded to the longer), which moves the last bits (seen: -3.1084936 against -3.1084931)
    listed = both.choices[0].logprobs.token_logprobs
    assert listed[0] is None and listed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert both.choices[1].text.startswith("import os")
