"""Tool calling through clients that need a stack of their own: LangChain's ChatOpenAI, and
the prefix cache's counters with the engine in this process.

Apart from test_tools.py on purpose: its tests share one stack on a module-scoped event loop,
and a test here runs on a loop of its own; while it runs, the shared stack's loop is not
running, its 2 s etcd leases lapse, and a shared test run after it can find no replica."""

from __future__ import annotations

from pathlib import Path

from openai import AsyncOpenAI

from .conftest import MeshHarness


async def test_langchain_chat_openai_binds_a_tool(mesh: MeshHarness, demo_model_dir: Path) -> None:
    """A real third-party client, unmodified: LangChain's ChatOpenAI with a bound tool. (The
    city is bounded in length: the demo model, greedy, repeats itself inside an unbounded
    string until max_tokens, and a call cut there does not parse.) On a fresh stack of its
    own: it failed once in seven runs on the stack test_tools.py shares (its error was not
    kept; one guess is that what the prefix cache holds from the other tests changed the
    greedy path of its 200 tokens)."""
    router = await mesh.serving_hf(demo_model_dir)
    base_url, key = f"http://{router.info.http_endpoint}/v1", await mesh.key("acme")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        city: str = Field(max_length=20, description="the city")
        days: int = Field(ge=1, le=7, description="how many days")

    @tool(args_schema=Forecast)
    def get_weather(city: str, days: int) -> str:
        """Weather forecast for a city, for a number of days."""
        return f"sunny in {city} for {days} days"

    llm = ChatOpenAI(model="demo", base_url=base_url, api_key=key, temperature=0, max_tokens=200,
                     max_retries=0)
    message = await llm.bind_tools([get_weather], tool_choice="get_weather").ainvoke(
        "What is the weather in Paris for 3 days?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "days"}
    Forecast.model_validate(call["args"])
    assert get_weather.invoke(call["args"]).startswith("sunny")  # the arguments fit the tool itself


async def test_n_choices_prefill_their_prompt_once(mesh: MeshHarness, demo_model_dir: Path) -> None:
    """The prompt of n choices is computed once: the others find it in the prefix cache.
    The engine runs in this process here, so its counters say how much. (This checks the
    outcome, not the router's wait for the first choice's first token: on this machine the
    three requests reach the engine far enough apart that they hit the cache without it;
    the wait matters where they would share one prefill pass.)"""
    from maas.services.worker.engines import create_engine, metrics

    router = await mesh.serving_hf(demo_model_dir, engine_factory=lambda spec: create_engine(spec, own_process=False))
    client = AsyncOpenAI(base_url=f"http://{router.info.http_endpoint}/v1", api_key=await mesh.key("acme"),
                         max_retries=0)

    def counted(counter: object) -> float:
        return sum(s.value for m in counter.collect() for s in m.samples  # type: ignore[attr-defined]
                   if s.name.endswith("_total") and s.labels.get("model") == "demo@1")

    prompt = "def parse(text):\n    " + "fields = text.split(',')\n    " * 12
    before = counted(metrics.CACHED_TOKENS), counted(metrics.PROMPT_TOKENS)
    reply = await client.completions.create(model="demo", prompt=prompt, max_tokens=4, n=3, seed=3, temperature=1.0)
    await client.close()
    cached = counted(metrics.CACHED_TOKENS) - before[0]
    prompts = counted(metrics.PROMPT_TOKENS) - before[1]
    assert prompts == 3 * reply.usage.prompt_tokens  # three requests, each with the whole prompt
    assert cached >= 2 * (reply.usage.prompt_tokens - 16)  # two of them found (nearly) all of it cached
