"""The pipeline executor with fake services: streaming, joins, budgets, skip and fallback,
failures naming the step, retries of idempotent steps only, cancellation, switches, and
plugins that cannot stall the loop. Orders of events are checked, never durations."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from maas.mesh.errors import NotFound
from maas.pipelines.executor import PipelineInput, Run, StepFailed
from maas.pipelines.spec import parse


class Fake:
    """Services that record what happened, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.gate = asyncio.Event()  # a fake model streams its second half once this is set
        self.retrieve_failures = 0
        self.retrieve_hang = False
        self.generate_cancelled = False
        self.plugins: dict[str, Any] = {}
        self.params: list[dict[str, Any]] = []

    async def generate(self, model: str, messages: list[dict[str, str]], params: dict[str, Any], *,
                       deadline: float | None) -> AsyncIterator[str]:
        if model == "missing":
            raise NotFound("model 'missing' does not exist")
        self.events.append(f"generate {model} start: {messages[-1]['content']}")
        self.params.append(params)
        try:
            for word in ("alpha ", "bravo "):
                yield f"{model}:{word}"
            await self.gate.wait()
            for word in ("charlie ", "password ", "delta"):
                yield word
            self.events.append(f"generate {model} end")
        except asyncio.CancelledError:
            self.generate_cancelled = True
            raise
        except GeneratorExit:
            self.generate_cancelled = True
            raise

    async def embed(self, model: str, texts: list[str], *, deadline: float | None) -> list[list[float]]:
        return [[float(len(t))] for t in texts]

    async def retrieve(self, index: str, query: Any, k: int, *, deadline: float | None) -> list[dict[str, Any]]:
        self.events.append(f"retrieve {index} start")
        if self.retrieve_hang:
            await asyncio.Event().wait()
        if self.retrieve_failures:
            self.retrieve_failures -= 1
            raise ConnectionError("index shard unreachable")
        await asyncio.sleep(0)
        self.events.append(f"retrieve {index} end")
        return [{"text": f"doc about {query}", "score": 1.0}][:k]

    def plugin(self, ref: str) -> Any:
        return self.plugins[ref]


RAG = """
steps:
  - name: docs
    kind: retrieve
    index: kb
    input: input.text
    {retrieve_extra}
  - name: prompt
    kind: template
    template: "Context: {{% for d in steps.docs or [] %}}{{{{ d.text }}}}{{% endfor %}} Q: {{{{ input.text }}}}"
  - name: answer
    kind: generate
    model: m
    input: steps.prompt
  - name: safe
    kind: guard
    input: steps.answer
    block: [password]
"""


def rag(extra: str = "") -> Any:
    return parse(RAG.format(retrieve_extra=extra.replace("\n", "\n    ")))


def question(text: str = "what is up?") -> PipelineInput:
    return PipelineInput([{"role": "user", "content": text}])


async def test_streams_through_template_generate_and_guard_as_tokens_are_made() -> None:
    """The fake model sends its second half only after the client has seen text from the
    first: a pipeline that held the stream back until the model finished would never end
    (the wait_for turns that into a failure). The guard holds back only the 7 characters
    a match of "password" could still need."""
    fake = Fake()
    run = Run(rag(), fake, question())
    got: list[str] = []

    async def read() -> None:
        async for chunk in run.answer():
            got.append(chunk)
            if "".join(got).startswith("m:alpha"):
                fake.gate.set()

    await asyncio.wait_for(read(), 10)
    text = "".join(got)
    assert text.startswith("m:alpha m:bravo charlie ") and "password" not in text and "delta" not in text
    assert run.filtered  # the guard stopped the stream at the blocked word
    assert fake.events[0] == "retrieve kb start"
    assert "Context: doc about what is up? Q: what is up?" in fake.events[2]
    assert [t.status for t in run.timeline.values()] == ["ok", "ok", "ok", "ok"]


async def test_a_retrieval_over_its_budget_is_skipped_and_the_answer_still_streams() -> None:
    fake = Fake()
    fake.retrieve_hang = True
    fake.gate.set()
    run = Run(rag("timeout_ms: 30\non_error: skip"), fake, question())
    text = "".join([c async for c in run.answer()])
    assert text.startswith("m:alpha")
    assert run.timeline["docs"].status == "skipped" and "budget" in run.timeline["docs"].error
    assert "Context:  Q: what is up?" in fake.events[1]  # rendered without context


async def test_fallback_value_and_failure_naming_the_step() -> None:
    fake = Fake()
    fake.retrieve_failures = 1
    fake.gate.set()
    run = Run(rag("on_error: fallback\nfallback: [{text: 'nothing found'}]"), fake, question())
    assert "".join([c async for c in run.answer()])
    assert run.timeline["docs"].status == "fallback" and "Context: nothing found" in fake.events[1]

    fake.retrieve_failures = 1
    with pytest.raises(StepFailed) as failed:
        [c async for c in Run(rag(), fake, question()).answer()]
    assert failed.value.step == "docs" and "pipeline step 'docs' (retrieve) failed" in failed.value.message
    assert "index shard unreachable" in failed.value.message and failed.value.code == grpc.StatusCode.INTERNAL

    missing = parse(RAG.format(retrieve_extra="").replace("model: m", "model: missing"))
    with pytest.raises(StepFailed) as failed:
        [c async for c in Run(missing, fake, question()).answer()]
    assert failed.value.code == grpc.StatusCode.NOT_FOUND and failed.value.step == "answer"


async def test_only_an_idempotent_step_is_retried() -> None:
    fake = Fake()
    fake.gate.set()
    fake.retrieve_failures = 2
    run = Run(rag("idempotent: true\nretries: 2"), fake, question())
    assert "".join([c async for c in run.answer()])
    assert run.timeline["docs"].attempts == 3 and run.timeline["docs"].status == "ok"

    fake.retrieve_failures = 1
    run = Run(rag("on_error: skip"), fake, question())  # not idempotent: one attempt
    assert "".join([c async for c in run.answer()])
    assert run.timeline["docs"].attempts == 1 and run.timeline["docs"].status == "skipped"


async def test_independent_steps_run_together_and_a_join_waits_for_both() -> None:
    fake = Fake()
    both_started = asyncio.Event()
    started: list[str] = []

    class Slow:
        def __init__(self, name: str) -> None:
            self.name = name

        async def run(self, ctx: Any, value: Any) -> str:
            started.append(self.name)
            if len(started) == 2:
                both_started.set()
            await asyncio.wait_for(both_started.wait(), 5)  # only returns if the other one started too
            return f"{self.name}({value})"

    fake.plugins = {"p:A": Slow("a"), "p:B": Slow("b")}
    spec = parse("""
steps:
  - {name: a, kind: plugin, plugin: "p:A", input: input.text}
  - {name: b, kind: plugin, plugin: "p:B", input: input.text}
  - {name: both, kind: parallel, steps: [a, b]}
""")
    run = Run(spec, fake, question("q"))
    assert "".join([c async for c in run.answer()]) == str({"a": "a(q)", "b": "b(q)"})


async def test_a_switch_runs_only_the_chosen_case() -> None:
    fake = Fake()
    fake.gate.set()
    spec = parse("""
steps:
  - {name: kind, kind: template, template: "{{ 'billing' if 'invoice' in input.text else 'other' }}"}
  - {name: route, kind: switch, input: steps.kind, cases: {billing: billing_answer}, default: general_answer}
  - {name: billing_answer, kind: generate, model: billing, input: input.text}
  - {name: general_answer, kind: generate, model: general, input: input.text}
output: route
""")
    text = "".join([c async for c in Run(spec, fake, question("my invoice")).answer()])
    assert text.startswith("billing:alpha") and not any("general" in e for e in fake.events)


async def test_closing_the_answer_cancels_the_generation() -> None:
    fake = Fake()
    answer = Run(rag(), fake, question()).answer()
    assert (await anext(answer)) == "m"  # "m:alpha " less the 7 characters the guard holds back
    await answer.aclose()  # type: ignore[attr-defined]
    assert fake.generate_cancelled and "generate m end" not in fake.events


async def test_a_blocking_plugin_runs_off_the_event_loop() -> None:
    fake = Fake()
    loop_ran = threading.Event()

    class Heavy:
        def run(self, ctx: Any, value: Any) -> str:  # a plain function: may block
            # only returns if the event loop kept running meanwhile (it sets the event)
            if not loop_ran.wait(5):
                raise RuntimeError("the event loop was stalled")
            return f"heavy({value}) in {ctx.step}"

    async def ticker() -> None:
        await asyncio.sleep(0.01)
        loop_ran.set()

    fake.plugins = {"p:Heavy": Heavy()}
    spec = parse("steps:\n  - {name: h, kind: plugin, plugin: 'p:Heavy', input: input.text}\n")
    tick = asyncio.create_task(ticker())
    assert "".join([c async for c in Run(spec, fake, question("x")).answer()]) == "heavy(x) in h"
    await tick


async def test_a_failing_plugin_names_its_step() -> None:
    fake = Fake()

    class Broken:
        async def run(self, ctx: Any, value: Any) -> str:
            raise KeyError("customer_id")

    fake.plugins = {"p:Broken": Broken()}
    spec = parse("steps:\n  - {name: enrich, kind: plugin, plugin: 'p:Broken', input: input.text}\n")
    with pytest.raises(StepFailed, match=r"pipeline step 'enrich' \(plugin\) failed: KeyError: 'customer_id'"):
        [c async for c in Run(spec, fake, question()).answer()]


async def test_a_template_cannot_blow_up_the_router() -> None:
    fake = Fake()
    for template in ("{{ 'a' * 100000000 }}", "{% for i in range(100000) %}x{% endfor %}",
                     "{{ 10 ** 100000 }}"):
        spec = parse(f"steps:\n  - {{name: t, kind: template, template: \"{template}\"}}\n")
        with pytest.raises(StepFailed, match="pipeline step 't' \\(template\\) failed"):
            [c async for c in Run(spec, fake, question()).answer()]


async def test_a_prompt_made_from_retrieved_documents_asks_for_affinity_on_them() -> None:
    """The generate step after a retrieval names the documents it was given (in order), so
    the router sends requests that retrieved the same documents to the same replica."""
    fake = Fake()
    fake.gate.set()
    for text in ("same question", "same question", "other question"):
        assert "".join([c async for c in Run(rag(), fake, question(text)).answer()])
    same, again, other = (p["affinity"] for p in fake.params)
    assert same == again and same != other and same.startswith("retrieved:")
    plain = parse("steps:\n  - {name: answer, kind: generate, model: m, input: input.text}\n")
    assert "".join([c async for c in Run(plain, fake, question()).answer()])
    assert "affinity" not in fake.params[-1]  # no retrieval: the prompt's own prefix decides


async def test_a_streaming_plugin_filters_a_generate_steps_chunks_as_they_come() -> None:
    class Upper:
        async def stream(self, ctx: Any, chunks: Any) -> Any:
            async for chunk in chunks:
                yield chunk.upper()

    fake = Fake()
    fake.plugins["f:Upper"] = Upper()
    spec = parse("steps:\n  - {name: answer, kind: generate, model: m, input: input.text}\n"
                 "  - {name: upper, kind: plugin, plugin: 'f:Upper', input: steps.answer, stream: true}\n")
    assert spec.streams
    answer = Run(spec, fake, question()).answer()
    first = await asyncio.wait_for(anext(answer), 5)  # before the model's second half (the gate) exists
    assert first == "M:ALPHA " and not fake.gate.is_set()
    fake.gate.set()
    assert first + "".join([c async for c in answer]) == "M:ALPHA M:BRAVO CHARLIE PASSWORD DELTA"
