"""The pipeline executor on a virtual clock, with fake steps: joins, budgets, skip and
fallback, cancellation, retries of idempotent steps only, deadlines, and the guard under
random chunking of a fake model's stream. Times are checked exactly, in virtual seconds.

The executor reads time only from the running event loop (`loop.time()`, and
`asyncio.timeout_at` for budgets), so these tests run it on `VirtualClock`, an event loop
whose clock jumps to the next timer whenever nothing is ready: a fake retrieval that
sleeps 10 s is cut by its 200 ms budget at exactly t=0.2, in no real time. Written here
rather than taken from a package (looptime) so that how it treats worker threads is plain
to see, and so that no pytest-asyncio hook is needed: each test runs on its own
`asyncio.Runner` (see `on_virtual_clock`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import random
import selectors
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, TypeVarTuple

import grpc
import pytest

from maas.mesh.errors import Unavailable
from maas.pipelines.executor import PipelineInput, Run, StepFailed
from maas.pipelines.guard import PhraseGuard
from maas.pipelines.spec import SpecErrors, parse

# ---- the virtual clock ---------------------------------------------------------------------

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
P = ParamSpec("P")


class _JumpingSelector(selectors.DefaultSelector):
    """The loop's selector: where a loop would sleep until its next timer, it moves the
    virtual clock to that timer instead (unless a worker thread is busy)."""

    def __init__(self, loop: VirtualClock) -> None:
        super().__init__()
        self._clock = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if self._clock.threads_busy():
            # A thread's result wakes the loop (call_soon_threadsafe writes to its self-pipe):
            # wait for it in real time and leave the virtual clock where it is.
            return super().select(None)
        if timeout is None:  # only another thread could still wake the loop (e.g. its shutdown)
            ready = super().select(self._clock.stuck_after_s)
            if not ready:
                raise RuntimeError("virtual clock: nothing to run, no timer set and no worker thread busy")
            return ready
        self._clock.advance(timeout)
        return []


class VirtualClock(asyncio.SelectorEventLoop):
    """An event loop whose time() is virtual: it starts at 0 and, when nothing is ready to
    run, jumps to the next timer at once. asyncio.sleep, call_later and asyncio.timeout_at
    all fire at exact virtual times.

    Worker threads (run_in_executor, so asyncio.to_thread: the executor's template steps and
    plain-function plugins): while one is busy the clock does not jump; the loop waits for
    the thread in real time. Virtual time stands still while a thread works, so its real
    duration can never fire a virtual budget (nor shift a figure): a thread step takes 0
    virtual ms, even while other steps' timers are pending. (A thread that waited for the
    loop to move on would deadlock with it; no step here does.)"""

    stuck_after_s = 2.0  # real seconds with nothing to run, no timer and no thread: the test is stuck

    def __init__(self) -> None:
        self._now = 0.0
        self._threads: set[asyncio.Future[Any]] = set()
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def threads_busy(self) -> bool:
        self._threads = {f for f in self._threads if not f.done()}
        return bool(self._threads)

    def run_in_executor(self, executor: concurrent.futures.Executor | None, func: Callable[[*Ts], T],
                        *args: *Ts) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self._threads.add(future)
        return future


def on_virtual_clock(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """An async test, run on a fresh VirtualClock loop (a plain test to pytest)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        with asyncio.Runner(loop_factory=VirtualClock) as runner:
            runner.run(test(*args, **kwargs))

    return run


def now() -> float:
    return asyncio.get_running_loop().time()


def at(seconds: float) -> Any:
    """A virtual time (or duration), exact to a nanosecond (sums of decimal fractions
    are not exact in binary)."""
    return pytest.approx(seconds, abs=1e-9)


def ms(milliseconds: float) -> Any:
    return pytest.approx(milliseconds, abs=1e-6)


# ---- fake services -------------------------------------------------------------------------

Script = list[tuple[float, "str | Exception"]]  # (seconds before it, a chunk or a failure)


class Fake:
    """Services whose calls take virtual time and log what happened, and when.

    A retrieval, per call, sleeps then fails or answers (`retrievals`, the last repeated);
    a model, per call, plays a script of (seconds, chunk or failure) (`streams[model]`, the
    last repeated)."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str]] = []
        self.retrievals: list[tuple[float, Exception | None]] = [(0.05, None)]
        self.streams: dict[str, list[Script]] = {}
        self.calls: dict[str, int] = {}
        self.deadlines: dict[str, float | None] = {}  # what each service was told
        self.prompts: dict[str, str] = {}
        self.plugins: dict[str, Any] = {"p:Sleep": Sleep(self), "p:Thread": Thread()}

    def note(self, what: str) -> None:
        self.log.append((now(), what))

    def when(self, what: str) -> list[float]:
        return [t for t, w in self.log if w == what]

    def _call(self, what: str, deadline: float | None) -> int:
        self.deadlines[what] = deadline
        self.calls[what] = self.calls.get(what, 0) + 1
        self.note(f"{what} start")
        return self.calls[what] - 1

    async def generate(self, model: str, messages: list[dict[str, str]], params: dict[str, Any], *,
                       deadline: float | None) -> AsyncIterator[str]:
        what = f"generate {model}"
        scripts = self.streams[model]
        script = scripts[min(self._call(what, deadline), len(scripts) - 1)]
        self.prompts[model] = messages[-1]["content"]
        try:
            for seconds, chunk in script:
                await asyncio.sleep(seconds)
                if isinstance(chunk, Exception):
                    self.note(f"{what} failed")
                    raise chunk
                self.note(f"{what} yields {chunk!r}")
                yield chunk
            self.note(f"{what} end")
        except asyncio.CancelledError:
            self.note(f"{what} cancelled")
            raise
        finally:
            self.note(f"{what} closed")

    async def embed(self, model: str, texts: list[str], *, deadline: float | None) -> list[list[float]]:
        return [[float(len(t))] for t in texts]

    async def retrieve(self, index: str, query: Any, k: int, *, deadline: float | None) -> list[dict[str, Any]]:
        what = f"retrieve {index}"
        seconds, error = self.retrievals[min(self._call(what, deadline), len(self.retrievals) - 1)]
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.note(f"{what} cancelled")
            raise
        if error is not None:
            self.note(f"{what} failed")
            raise error
        self.note(f"{what} end")
        return [{"text": f"doc about {query}"}][:k]

    def plugin(self, ref: str) -> Any:
        return self.plugins[ref]


class Sleep:
    """An async plugin (it runs on the loop): sleeps `config.s` seconds, then fails with
    `config.fail` if set, else returns `step(value)`."""

    def __init__(self, fake: Fake) -> None:
        self.fake = fake

    async def run(self, ctx: Any, value: Any) -> str:
        self.fake.deadlines[ctx.step] = ctx.deadline
        self.fake.note(f"{ctx.step} start")
        try:
            await asyncio.sleep(float(ctx.config.get("s", 0)))
        except asyncio.CancelledError:
            self.fake.note(f"{ctx.step} cancelled")
            raise
        if "fail" in ctx.config:
            raise ConnectionError(ctx.config["fail"])
        self.fake.note(f"{ctx.step} end")
        return f"{ctx.step}({value})"


class Thread:
    """A plain-function plugin (it runs in a worker thread): works a few real ms."""

    def run(self, ctx: Any, value: Any) -> str:
        time.sleep(0.003)
        return f"{ctx.step}({value})"


def question(text: str = "why?") -> PipelineInput:
    return PipelineInput([{"role": "user", "content": text}])


async def read(answer: AsyncIterator[str]) -> list[tuple[float, str]]:
    """The answer's chunks, each with the virtual time it arrived."""
    return [(now(), chunk) async for chunk in answer]


def timeline(run: Run) -> dict[str, tuple[str, float, float, int]]:
    return {t.step: (t.status, t.start_ms, t.ms, t.attempts) for t in run.timings()}


RAG = """
steps:
  - {{name: docs, kind: retrieve, index: kb, input: input.text{docs}}}
  - name: prompt
    kind: template
    template: "Context: {{% for d in steps.docs or [] %}}{{{{ d.text }}}}{{% endfor %}} Q: {{{{ input.text }}}}"
  - {{name: answer, kind: generate, model: m, input: steps.prompt{answer}}}
  - {{name: safe, kind: guard, input: steps.answer, block: [password]}}
"""


def rag(docs: str = "", answer: str = "") -> Any:
    """Retrieve, template (a worker thread), generate, guard; extra fields for two steps."""
    return parse(RAG.format(docs=docs and ", " + docs, answer=answer and ", " + answer))


HELLO: Script = [(0.3, "Hello there, "), (0.2, "general "), (0.2, "Kenobi.")]


# ---- timelines and streaming ---------------------------------------------------------------

@on_virtual_clock
async def test_the_timeline_and_the_stream_are_in_virtual_time() -> None:
    """The retrieval takes 50 ms, the template (a worker thread) none, the model its first
    chunk 300 ms later and a chunk every 200 ms after. The first chunk of the answer arrives
    when the model makes it, long before the generation ends; the guard holds back only the
    7 characters a match of "password" could still need."""
    fake = Fake()
    fake.streams["m"] = [HELLO]
    run = Run(rag(), fake, question())
    got = await read(run.answer())
    assert got == [(at(0.35), "Hello "), (at(0.55), "there, g"), (at(0.75), "eneral "), (at(0.75), "Kenobi.")]
    assert fake.when("generate m end") == [at(0.75)]
    assert timeline(run) == {"docs": ("ok", 0, ms(50), 1), "prompt": ("ok", ms(50), 0, 1),
                             "answer": ("ok", ms(50), ms(300), 1), "safe": ("ok", ms(350), 0, 1)}
    assert fake.prompts["m"] == "Context: doc about why? Q: why?"
    assert not run.filtered


@on_virtual_clock
async def test_independent_steps_run_together_and_a_join_waits_for_the_last() -> None:
    """a (1 s) and b (2 s) start together; c, after a, takes 0.5 s: the join is ready at
    t=2, not at 3.5 as it would be run one after another. a, read twice, runs once."""
    spec = parse("""
steps:
  - {name: a, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 1}}
  - {name: b, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 2}}
  - {name: c, kind: plugin, plugin: "p:Sleep", input: steps.a, config: {s: 0.5}}
  - {name: all, kind: parallel, steps: [a, b, c]}
""")
    fake = Fake()
    run = Run(spec, fake, question("q"))
    got = await read(run.answer())
    assert got == [(2.0, str({"a": "a(q)", "b": "b(q)", "c": "c(a(q))"}))]
    assert timeline(run) == {"a": ("ok", 0, 1000, 1), "b": ("ok", 0, 2000, 1), "c": ("ok", 1000, 500, 1),
                             "all": ("ok", 2000, 0, 1)}
    assert fake.when("a start") == [0] and fake.when("c start") == [1.0]


@on_virtual_clock
async def test_a_thread_step_holds_the_clock_and_keeps_its_budget() -> None:
    """A plain-function plugin works in a thread (a few real ms) while another step sleeps
    1 virtual second: the clock waits for the thread, so its 100 ms budget is not spent by
    the other step's second (on a clock that jumped meanwhile it would be)."""
    spec = parse("""
steps:
  - {name: t, kind: plugin, plugin: "p:Thread", input: input.text, timeout_ms: 100}
  - {name: s, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 1}}
  - {name: both, kind: parallel, steps: [t, s]}
""")
    run = Run(spec, Fake(), question("q"))
    assert await read(run.answer()) == [(1.0, str({"t": "t(q)", "s": "s(q)"}))]
    assert timeline(run) == {"t": ("ok", 0, 0, 1), "s": ("ok", 0, 1000, 1), "both": ("ok", 1000, 0, 1)}


@on_virtual_clock
async def test_a_switch_starts_only_the_chosen_case_once_its_input_is_ready() -> None:
    spec = parse("""
steps:
  - {name: kind, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 0.1}}
  - {name: route, kind: switch, input: steps.kind, cases: {"kind(invoice)": billing}, default: general}
  - {name: billing, kind: generate, model: billing, input: input.text}
  - {name: general, kind: generate, model: general, input: input.text}
output: route
""")
    fake = Fake()
    fake.streams = {"billing": [[(0.2, "Paid.")]], "general": [[(0.2, "Hi.")]]}
    run = Run(spec, fake, question("invoice"))
    assert await read(run.answer()) == [(at(0.3), "Paid.")]
    assert fake.when("generate billing start") == [at(0.1)] and "generate general" not in fake.calls
    assert timeline(run) == {"kind": ("ok", 0, ms(100), 1), "route": ("ok", ms(100), ms(200), 1),
                             "billing": ("ok", ms(100), ms(200), 1)}


# ---- budgets, skip and fallback ------------------------------------------------------------

@on_virtual_clock
async def test_a_retrieval_over_its_budget_is_skipped_at_exactly_its_budget() -> None:
    """The index would take 10 s; the step's 200 ms budget cuts it at t=0.2 (the index is
    told that deadline, and cancelled then), and the answer goes on without context."""
    fake = Fake()
    fake.retrievals = [(10, None)]
    fake.streams["m"] = [HELLO]
    run = Run(rag("timeout_ms: 200, on_error: skip"), fake, question())
    got = await read(run.answer())
    assert fake.when("retrieve kb cancelled") == [at(0.2)] and fake.deadlines["retrieve kb"] == at(0.2)
    assert fake.prompts["m"] == "Context:  Q: why?"  # the skipped step rendered as empty
    assert got[0] == (at(0.5), "Hello ") and "".join(c for _, c in got) == "Hello there, general Kenobi."
    assert timeline(run) == {"docs": ("skipped", 0, ms(200), 1), "prompt": ("ok", ms(200), 0, 1),
                             "answer": ("ok", ms(200), ms(300), 1), "safe": ("ok", ms(500), 0, 1)}
    assert run.timeline["docs"].error == "it overran its budget of 0.200s (timeout_ms)"


@pytest.mark.parametrize(("seconds", "status", "took_ms"), [(0.199, "ok", 199), (0.201, "skipped", 200)])
@on_virtual_clock
async def test_a_budget_is_exact(seconds: float, status: str, took_ms: float) -> None:
    fake = Fake()
    fake.retrievals = [(seconds, None)]
    fake.streams["m"] = [HELLO]
    run = Run(rag("timeout_ms: 200, on_error: skip"), fake, question())
    await read(run.answer())
    assert timeline(run)["docs"] == (status, 0, ms(took_ms), 1)


@on_virtual_clock
async def test_a_step_over_its_budget_with_on_error_fail_ends_the_request_then() -> None:
    fake = Fake()
    fake.retrievals = [(10, None)]
    fake.streams["m"] = [HELLO]
    with pytest.raises(StepFailed) as failed:
        await read(Run(rag("timeout_ms: 200"), fake, question()).answer())
    assert now() == at(0.2) and failed.value.step == "docs"
    assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "budget of 0.200s" in failed.value.message
    assert "generate m" not in fake.calls


@on_virtual_clock
async def test_skip_and_fallback_give_their_values_when_the_step_gives_up() -> None:
    """s overruns its 100 ms (None), f fails at 50 ms (its fallback), g overruns its 250 ms
    (a structured fallback): the join has all three at t=0.25."""
    spec = parse("""
steps:
  - {name: s, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 10}, timeout_ms: 100, on_error: skip}
  - name: f
    kind: plugin
    plugin: "p:Sleep"
    input: input.text
    config: {s: 0.05, fail: shard down}
    on_error: fallback
    fallback: offline
  - {name: g, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 10}, timeout_ms: 250,
     on_error: fallback, fallback: {x: [1, 2]}}
  - {name: all, kind: parallel, steps: [s, f, g]}
""")
    fake = Fake()
    run = Run(spec, fake, question())
    assert await read(run.answer()) == [(at(0.25), str({"s": None, "f": "offline", "g": {"x": [1, 2]}}))]
    assert timeline(run) == {"s": ("skipped", 0, ms(100), 1), "f": ("fallback", 0, ms(50), 1),
                             "g": ("fallback", 0, ms(250), 1), "all": ("ok", ms(250), 0, 1)}
    assert run.timeline["f"].error == "ConnectionError: shard down"
    assert fake.when("s cancelled") == [at(0.1)] and fake.when("g cancelled") == [at(0.25)]


@on_virtual_clock
async def test_a_failing_step_ends_the_request_at_once_and_cancels_the_rest() -> None:
    spec = parse("""
steps:
  - {name: a, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 0.3, fail: boom}}
  - {name: b, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 10}}
  - {name: both, kind: parallel, steps: [a, b]}
""")
    fake = Fake()
    run = Run(spec, fake, question())
    with pytest.raises(StepFailed, match=r"pipeline step 'a' \(plugin\) failed: ConnectionError: boom") as failed:
        await read(run.answer())
    assert failed.value.code == grpc.StatusCode.INTERNAL
    assert now() == at(0.3) and fake.when("b cancelled") == [at(0.3)]
    assert timeline(run)["a"] == ("failed", 0, ms(300), 1)


# ---- deadlines -----------------------------------------------------------------------------

@on_virtual_clock
async def test_the_request_deadline_caps_a_steps_budget() -> None:
    """b starts at 0.3 with 400 ms of budget, but the request's deadline is at 0.5: it is
    cut at 0.5 (after 200 ms), and both steps are told the request's deadline."""
    spec = parse("""
steps:
  - {name: a, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 0.3}}
  - {name: b, kind: plugin, plugin: "p:Sleep", input: steps.a, config: {s: 10}, timeout_ms: 400,
     on_error: fallback, fallback: late}
""")
    fake = Fake()
    run = Run(spec, fake, question(), deadline=now() + 0.5)
    assert await read(run.answer()) == [(at(0.5), "late")]
    assert timeline(run) == {"a": ("ok", 0, ms(300), 1), "b": ("fallback", ms(300), ms(200), 1)}
    assert fake.deadlines == {"a": at(0.5), "b": at(0.5)}
    assert "budget of 0.200s" in run.timeline["b"].error


@on_virtual_clock
async def test_a_step_without_timeout_ms_is_bounded_by_the_request_deadline() -> None:
    fake = Fake()
    fake.retrievals = [(10, None)]
    fake.streams["m"] = [HELLO]
    with pytest.raises(StepFailed) as failed:
        await read(Run(rag(), fake, question(), deadline=now() + 0.5).answer())
    assert now() == at(0.5) and fake.when("retrieve kb cancelled") == [at(0.5)]
    assert failed.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "overran its budget of 0.500s (the request deadline)" in failed.value.message


@on_virtual_clock
async def test_a_streams_budget_covers_only_its_first_chunk() -> None:
    """A 400 ms budget: the first chunk comes after 100 ms, the rest over two more seconds,
    all of it delivered; the model is told the request's deadline, not the step's budget
    (which would cut its stream at 0.45)."""
    fake = Fake()
    fake.streams["m"] = [[(0.1, "Hello there, "), (1.0, "general "), (1.0, "Kenobi.")]]
    run = Run(rag(answer="timeout_ms: 400"), fake, question(), deadline=now() + 5)
    got = await read(run.answer())
    assert [t for t, _ in got] == [at(0.15), at(1.15), at(2.15), at(2.15)]
    assert fake.deadlines["generate m"] == at(5) and timeline(run)["answer"] == ("ok", ms(50), ms(100), 1)


@on_virtual_clock
async def test_a_stream_whose_first_chunk_is_late_is_cut_at_its_budget() -> None:
    fake = Fake()
    fake.streams["m"] = [[(0.5, "too late")]]
    run = Run(rag(answer="timeout_ms: 300, on_error: fallback, fallback: no answer"), fake, question())
    assert await read(run.answer()) == [(at(0.35), "no answer")]
    assert fake.when("generate m cancelled") == fake.when("generate m closed") == [at(0.35)]
    assert timeline(run)["answer"] == ("fallback", ms(50), ms(300), 1)


# ---- retries -------------------------------------------------------------------------------

@on_virtual_clock
async def test_an_idempotent_step_is_retried_at_once() -> None:
    fake = Fake()
    fake.retrievals = [(0.05, Unavailable("shard down")), (0.05, Unavailable("shard down")), (0.05, None)]
    fake.streams["m"] = [HELLO]
    run = Run(rag("idempotent: true, retries: 2"), fake, question())
    await read(run.answer())
    assert fake.when("retrieve kb start") == [0, at(0.05), at(0.1)]
    assert timeline(run)["docs"] == ("ok", 0, ms(150), 3) and fake.when("generate m start") == [at(0.15)]


@on_virtual_clock
async def test_retries_stay_within_the_steps_budget() -> None:
    """Each attempt fails after 50 ms; five retries are allowed, but the 120 ms budget
    covers them all: the third attempt is cut at t=0.12 and there is no fourth."""
    fake = Fake()
    fake.retrievals = [(0.05, ConnectionError("reset"))]
    fake.streams["m"] = [HELLO]
    run = Run(rag("idempotent: true, retries: 5, timeout_ms: 120, on_error: skip"), fake, question())
    await read(run.answer())
    assert fake.when("retrieve kb start") == [0, at(0.05), at(0.1)]
    assert fake.when("retrieve kb cancelled") == [at(0.12)] and fake.deadlines["retrieve kb"] == at(0.12)
    assert timeline(run)["docs"] == ("skipped", 0, ms(120), 3)


@on_virtual_clock
async def test_an_overrun_is_not_retried() -> None:
    fake = Fake()
    fake.retrievals = [(10, None)]
    fake.streams["m"] = [HELLO]
    run = Run(rag("idempotent: true, retries: 3, timeout_ms: 100, on_error: skip"), fake, question())
    await read(run.answer())
    assert fake.calls["retrieve kb"] == 1 and timeline(run)["docs"] == ("skipped", 0, ms(100), 1)


@on_virtual_clock
async def test_a_step_that_is_not_idempotent_is_never_retried() -> None:
    """The parser refuses retries without `idempotent: true`; a step made by hand with
    retries but not idempotent is still tried once."""
    with pytest.raises(SpecErrors, match="idempotent"):
        rag("retries: 2")
    spec = rag("on_error: skip")
    spec = dataclasses.replace(spec, steps={**spec.steps, "docs": dataclasses.replace(spec.steps["docs"], retries=2)})
    fake = Fake()
    fake.retrievals = [(0.05, ConnectionError("reset")), (0.05, None)]
    fake.streams["m"] = [HELLO]
    run = Run(spec, fake, question())
    await read(run.answer())
    assert fake.when("retrieve kb start") == [0] and timeline(run)["docs"] == ("skipped", 0, ms(50), 1)
    assert run.timeline["docs"].error == "ConnectionError: reset"


@on_virtual_clock
async def test_a_stream_is_retried_only_before_its_first_chunk() -> None:
    """The first call fails before any text (retried at once); the second sends a chunk,
    then fails: that failure reaches the reader as the step's, and the model is not called
    again."""
    fake = Fake()
    fake.streams["m"] = [[(0.1, Unavailable("busy"))], [(0.2, "Hello there, "), (0.1, ConnectionError("reset"))]]
    run = Run(rag(answer="idempotent: true, retries: 2"), fake, question())
    got: list[tuple[float, str]] = []
    with pytest.raises(StepFailed, match="pipeline step 'answer' \\(generate\\) failed: ConnectionError: reset"):
        async for chunk in run.answer():
            got.append((now(), chunk))
    assert got == [(at(0.35), "Hello ")] and now() == at(0.45)
    assert fake.when("generate m start") == [at(0.05), at(0.15)]
    assert timeline(run)["answer"] == ("failed", ms(50), ms(300), 2)


# ---- cancellation --------------------------------------------------------------------------

@on_virtual_clock
async def test_closing_the_answer_mid_stream_closes_the_generation() -> None:
    fake = Fake()
    fake.streams["m"] = [HELLO]
    run = Run(rag(), fake, question())
    answer = run.answer()
    assert await anext(answer) == "Hello " and now() == at(0.35)
    await answer.aclose()
    assert now() == at(0.35) and fake.when("generate m closed") == [at(0.35)]
    assert [w for _, w in fake.log if w.startswith("generate m yields")] == ["generate m yields 'Hello there, '"]
    assert not fake.when("generate m end")


@on_virtual_clock
async def test_a_client_that_goes_away_mid_stream_cancels_the_generation() -> None:
    """The reader is cancelled at t=0.45, while the model works on its second chunk: the
    model sees the CancelledError then, and makes nothing more."""
    fake = Fake()
    fake.streams["m"] = [HELLO]
    reader = asyncio.create_task(read(Run(rag(), fake, question()).answer()))
    await asyncio.sleep(0.45)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert fake.when("generate m cancelled") == fake.when("generate m closed") == [at(0.45)]
    assert not fake.when("generate m end")


@on_virtual_clock
async def test_closing_a_run_cancels_its_running_steps() -> None:
    """Run.close() at t=0.5, during a 10 s retrieval: the retrieval is cancelled then, the
    answer's reader ends, and the model is never called."""
    fake = Fake()
    fake.retrievals = [(10, None)]
    fake.streams["m"] = [HELLO]
    run = Run(rag(), fake, question())
    reader = asyncio.create_task(read(run.answer()))
    await asyncio.sleep(0.5)
    await run.close()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert now() == at(0.5) and fake.when("retrieve kb cancelled") == [at(0.5)] and "generate m" not in fake.calls


# ---- the guard under random chunking -------------------------------------------------------

def cut(text: str, rng: random.Random) -> Script:
    """`text` in random chunks (some empty), each after a random wait (some none)."""
    script: Script = []
    i = 0
    while i < len(text):
        n = rng.choice((0, 1, 1, 2, 3, 5, 8))
        script.append((rng.choice((0, 0.001, 0.01, 0.05, 0.2)), text[i:i + n]))
        i += n
    return script


def guarded(phrases: list[str], action: str, script: Script,
            start: float) -> tuple[list[tuple[Any, str]], float | None]:
    """What a guard passes on, and when, for a model playing `script` from `start`; and when
    a stopping guard closes the model (None: it does not)."""
    guard = PhraseGuard(phrases, action=action, replacement="#")
    out: list[tuple[Any, str]] = []
    t = start
    for seconds, chunk in script:
        t += seconds
        released = guard.feed(str(chunk))
        if released:
            out.append((at(t), released))
        if guard.blocked and action == "stop":
            return out, t
    tail = guard.finish()
    return out + ([(at(t), tail)] if tail else []), None


@pytest.mark.parametrize("action", ["stop", "redact"])
@on_virtual_clock
async def test_the_guard_under_random_chunking_through_a_whole_pipeline(action: str) -> None:
    """A template (in a worker thread), a model streaming a random text in random chunks at
    random times, and a guard: every piece of the answer arrives at the virtual time the
    model made the text that completed it, the whole is what the guard makes of the whole
    text, and a guard that stops closes the model then."""
    rng = random.Random(20261202)
    for _ in range(150):
        phrases = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abcAB ") for _ in range(rng.randint(0, 40)))
        script = cut(text, rng)
        spec = parse(f"""
steps:
  - {{name: prompt, kind: template, template: "{{{{ input.text }}}}"}}
  - {{name: answer, kind: generate, model: m, input: steps.prompt}}
  - {{name: safe, kind: guard, input: steps.answer, block: {phrases}, action: {action}, replacement: "#"}}
""")
        fake = Fake()
        fake.streams["m"] = [script]
        run = Run(spec, fake, question("q"))  # each run starts when the last one ended
        expected, closed_at = guarded(phrases, action, script, start=now())
        got = await read(run.answer())
        whole = PhraseGuard(phrases, action=action, replacement="#")
        assert got == expected, (phrases, script)
        assert "".join(c for _, c in got) == whole.feed(text) + whole.finish()
        assert fake.prompts["m"] == "q" and timeline(run)["answer"][2] == ms(1000 * script[0][0] if script else 0)
        if closed_at is not None:
            assert run.filtered and fake.when("generate m closed") == [at(closed_at)]
            assert not fake.when("generate m end")
        else:
            assert fake.when("generate m end") == fake.when("generate m closed")
            if not whole.blocked:  # (one found only at the stream's end: see the xfail below)
                assert not run.filtered


# ---- the clock itself ----------------------------------------------------------------------

def test_the_clock_reports_a_stuck_test_instead_of_hanging() -> None:
    async def stuck() -> None:
        await asyncio.Event().wait()

    def impatient() -> VirtualClock:
        loop = VirtualClock()
        loop.stuck_after_s = 0.01
        return loop

    with asyncio.Runner(loop_factory=impatient) as runner, pytest.raises(RuntimeError, match="nothing to run"):
        runner.run(stuck())


# ---- executor bugs these tests found (fixed) ------------------------------------------------

@on_virtual_clock
async def test_a_timeout_of_the_steps_own_is_an_ordinary_failure() -> None:
    """An async plugin whose own call times out (asyncio.timeout, aiohttp...) raises
    TimeoutError with no budget or deadline set; the executor's `except TimeoutError`
    treats it as its budget running out: no retry, and "budget of 0.000s"."""

    class TimesOutOnce:
        calls = 0

        async def run(self, ctx: Any, value: Any) -> str:
            self.calls += 1
            await asyncio.sleep(0.01)
            if self.calls == 1:
                raise TimeoutError("the upstream call timed out")
            return "ok"

    fake = Fake()
    fake.plugins["p:Once"] = TimesOutOnce()
    spec = parse("""
steps:
  - {name: a, kind: plugin, plugin: "p:Once", input: input.text, idempotent: true, retries: 1, on_error: skip}
""")
    run = Run(spec, fake, question())
    assert await read(run.answer()) == [(at(0.02), "ok")]
    assert timeline(run)["a"] == ("ok", 0, ms(20), 2)


@on_virtual_clock
async def test_a_budget_cut_by_the_deadline_says_so() -> None:
    spec = parse("""
steps:
  - {name: a, kind: plugin, plugin: "p:Sleep", input: input.text, config: {s: 10}, timeout_ms: 400, on_error: skip}
""")
    run = Run(spec, Fake(), question(), deadline=now() + 0.2)
    await read(run.answer())
    assert run.timeline["a"].error == "it overran its budget of 0.200s (the request deadline)"


@on_virtual_clock
async def test_a_guard_stopping_at_the_end_of_a_stream_marks_the_answer_filtered() -> None:
    """With phrases "c" and "abc", a "c" in the last 2 characters might still be the end of
    "abc", so the guard decides only at finish(): it stops the answer there ("A b", not
    "A bcc"), but the streaming path sets `filtered` only for a stop found by feed()."""
    spec = parse("""
steps:
  - {name: answer, kind: generate, model: m, input: input.text}
  - {name: safe, kind: guard, input: steps.answer, block: [c, abc]}
""")
    fake = Fake()
    fake.streams["m"] = [[(0.1, "A bcc")]]
    run = Run(spec, fake, question())
    assert await read(run.answer()) == [(at(0.1), "A b")]
    assert run.filtered
