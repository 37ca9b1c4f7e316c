"""Running one request through a pipeline.

Evaluation is pulled from the output: a step starts when something needs its value, after
the values it reads (started together, so independent steps run concurrently), and at
most once. A switch starts only the case it chooses; steps nothing needs never run.

Each step gets a budget: its `timeout_ms` from when it starts, never past the caller's
deadline. For a streaming generate step the budget covers its first chunk (its time to
first token); the rest of its stream is bounded by the caller's deadline only. A step
that fails or overruns is handled by its `on_error`: `fail` ends the request with an
error naming the step (the failure's own status code; DEADLINE_EXCEEDED for a budget), `skip`
gives it the value None (a template renders it as empty), `fallback` gives its `fallback`
value. A step declared `idempotent` is tried again (up to `retries` more times, within
its budget); a stream is retried only before its first chunk.

What the steps call (models, embeddings, indexes, plugins) comes from a `Services`
object, so the executor runs the same against the mesh (the router's services) and
against fakes in tests. Plain-function plugins run in a worker thread, so a CPU-heavy
one cannot stall the event loop; async plugins run on the loop and must not block it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import inspect
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from jinja2.sandbox import SandboxedEnvironment
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from maas.mesh.errors import DeadlineExceeded, InvalidArgument, MaasError
from maas.mesh.tracing import TRACER
from maas.pipelines.guard import PhraseGuard
from maas.pipelines.spec import PipelineSpec, Step

log = logging.getLogger(__name__)

class Services(Protocol):
    """What pipeline steps call. `deadline` is in event-loop time (None: none)."""

    def generate(self, model: str, messages: list[dict[str, str]], params: dict[str, Any], *,
                 deadline: float | None) -> AsyncIterator[str]: ...

    async def embed(self, model: str, texts: list[str], *, deadline: float | None) -> list[list[float]]: ...

    async def retrieve(self, index: str, query: Any, k: int, *, deadline: float | None) -> list[dict[str, Any]]: ...

    def plugin(self, ref: str) -> Any: ...


class StepFailed(MaasError):
    """A step failed and its on_error is fail. Carries the failure's status code."""

    def __init__(self, step: Step, cause: BaseException) -> None:
        what = cause.message if isinstance(cause, MaasError) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"pipeline step {step.name!r} ({step.kind}) failed: {what}", field=f"steps.{step.name}")
        self.code = cause.code if isinstance(cause, MaasError) else grpc.StatusCode.INTERNAL
        self.step = step.name
        # the message may reach the client even as INTERNAL: it is a plugin's (its author's
        # code) or a domain error's own words, never the router's internals
        self.public = step.kind == "plugin" or isinstance(cause, MaasError)
        self.retry_after = getattr(cause, "retry_after", None)  # a step's 429 keeps its hint


@dataclass
class StepTiming:
    """What happened to one step of one request (returned with `x-maas-trace: 1`)."""

    step: str
    kind: str
    status: str = "running"  # ok, skipped, fallback, failed
    start_ms: float = 0.0    # from the request's start
    ms: float = 0.0          # to its value (a stream: to its first chunk)
    attempts: int = 0
    error: str = ""


@dataclass
class PipelineInput:
    messages: list[dict[str, str]]

    @property
    def text(self) -> str:
        """The last user message (what a question-answering pipeline answers)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return str(m.get("content", ""))
        return ""


@dataclass
class StepContext:
    """What a plugin sees."""

    step: str
    deadline: float | None  # event-loop time
    tenant: str
    config: dict[str, Any]
    services: Services

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - asyncio.get_running_loop().time()


class Stream:
    """A generate step's text chunks, its first already received. One reader. `on_close`
    callbacks run once, when the stream is closed (read to its end or abandoned)."""

    def __init__(self, first: str, rest: AsyncIterator[str]) -> None:
        self.first, self.rest = first, rest
        self.on_close: list[Callable[[], None]] = []

    async def chunks(self) -> AsyncGenerator[str, None]:
        try:
            yield self.first
            async for chunk in self.rest:
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        try:
            aclose = getattr(self.rest, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            callbacks, self.on_close = self.on_close, []
            for callback in callbacks:
                callback()


MAX_TEMPLATE_CHARS = 1 << 20  # what one template step may produce
MAX_TEMPLATE_RANGE = 10_000   # range() in a template


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox (no attribute access to internals), also bounding what a template can
    make: `*` and `**` on sizes, range(), and (in `render`) the output's length."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise InvalidArgument("a template's ** is limited to exponents of at most 64")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_CHARS:
                    raise InvalidArgument(f"a template may not make more than {MAX_TEMPLATE_CHARS} items")
        return super().call_binop(context, operator, left, right)


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_TEMPLATE_RANGE:
        raise InvalidArgument(f"range() in a template is limited to {MAX_TEMPLATE_RANGE} items")
    return r


_TEMPLATES = _Sandbox(autoescape=False, finalize=lambda v: "" if v is None else v)
_TEMPLATES.globals["range"] = _range


@functools.lru_cache(maxsize=256)
def compile_template(text: str) -> Any:
    """A template step's text, compiled (raises jinja's TemplateSyntaxError)."""
    return _TEMPLATES.from_string(text)


def _render(text: str, **values: Any) -> str:
    out: list[str] = []
    size = 0
    for piece in compile_template(text).generate(**values):
        size += len(piece)
        if size > MAX_TEMPLATE_CHARS:
            raise InvalidArgument(f"the template made more than {MAX_TEMPLATE_CHARS} characters")
        out.append(piece)
    return "".join(out)


@dataclass
class Run:
    """One request through `spec`.

    Traced as a span `pipeline NAME` (a child of the span current when the run is made: the
    router's request) with one child span per step that runs; a streaming step's span lasts
    until its stream closes, with an event at its first chunk. `on_done` callbacks get the
    run and its error (None: answered) once it is over."""

    spec: PipelineSpec
    services: Services
    input: PipelineInput
    deadline: float | None = None  # event-loop time
    tenant: str = ""
    name: str = "pipeline"  # "name@version", for traces and metrics
    timeline: dict[str, StepTiming] = field(default_factory=dict)
    filtered: bool = False  # a guard stopped the answer (OpenAI's finish_reason "content_filter")
    first_chunk_ms: float | None = None  # when the answer's first text left, from the start
    on_done: list[Callable[[Run, BaseException | None], None]] = field(default_factory=list)
    # for capture and replay: each step's output (a stream's whole text) is kept in
    # `outputs`, and generate steps that sample without a seed get one, kept in `seeds`
    # (a replay passes them back, so sampling repeats)
    record: bool = False
    request_id: str = ""
    seeds: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    _started: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    _span: trace.Span = field(init=False)
    _context: otel_context.Context = field(init=False)
    _error: BaseException | None = None
    _over: bool = False

    def __post_init__(self) -> None:
        self._span = TRACER.start_span(f"pipeline {self.name}", attributes={"maas.pipeline": self.name})
        self._context = trace.set_span_in_context(self._span)

    async def answer(self) -> AsyncGenerator[str, None]:
        """The output step's text: chunk by chunk if it streams, else in one piece."""
        try:
            value = await self.value(self.spec.output)
            if isinstance(value, Stream):
                async with contextlib.aclosing(value.chunks()) as chunks:
                    async for chunk in chunks:
                        if chunk:
                            self._first_chunk()
                            yield chunk
            elif value is not None:
                self._first_chunk()
                yield value if isinstance(value, str) else str(value)
        except BaseException as e:
            self._error = e
            raise
        finally:
            await self.close()

    def elapsed_ms(self) -> float:
        return (asyncio.get_running_loop().time() - self._started) * 1000

    def _first_chunk(self) -> None:
        if self.first_chunk_ms is None:
            self.first_chunk_ms = (asyncio.get_running_loop().time() - self._started) * 1000
            self._span.add_event("first chunk")

    def timings(self) -> list[StepTiming]:
        """What happened to each step that ran, in the file's order."""
        return [self.timeline[name] for name in self.spec.steps if name in self.timeline]

    async def close(self) -> None:
        """Cancel what is still running (the client went away, or the answer is complete)."""
        for task in self._tasks.values():
            if not task.done():
                task.cancel()
        try:
            # their outcomes are theirs (gathered, not raised); a cancellation of close() itself propagates
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            for task in self._tasks.values():  # streams made but never read to their end: close them now
                if not task.cancelled() and task.exception() is None and isinstance(task.result(), Stream):
                    with contextlib.suppress(Exception):
                        await task.result().aclose()
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._over:
            return
        self._over = True
        error = self._error
        if error is not None:
            code = error.code.name if isinstance(error, MaasError) else type(error).__name__
            self._span.set_status(Status(StatusCode.ERROR, error.message if isinstance(error, MaasError) else code))
        self._span.end()
        for callback in self.on_done:
            try:
                callback(self, error)
            except Exception:
                log.exception("a pipeline's on_done callback failed")

    def value(self, name: str) -> asyncio.Task[Any]:
        """The task computing step `name` (started on first use, its span a child of the run's)."""
        task = self._tasks.get(name)
        if task is None:
            context = contextvars.copy_context()
            context.run(otel_context.attach, self._context)
            task = asyncio.get_running_loop().create_task(self._run(self.spec.steps[name]), context=context)
            self._tasks[name] = task
        return task

    # ---- one step ----------------------------------------------------------------------

    async def _run(self, step: Step) -> Any:
        reads = step.reads()
        # shielded: a step that gives up (its budget) must not cancel a step others share
        values = dict(zip(reads, await asyncio.gather(*(asyncio.shield(self.value(n)) for n in reads)),
                          strict=True))
        timing = self.timeline[step.name] = StepTiming(step.name, step.kind)  # it starts (its inputs are in)
        loop = asyncio.get_running_loop()
        started = loop.time()
        timing.start_ms = (started - self._started) * 1000
        budget = started + step.timeout_ms / 1000 if step.timeout_ms else None
        if self.deadline is not None:
            budget = self.deadline if budget is None else min(budget, self.deadline)
        span = TRACER.start_span(f"step {step.name}", attributes={
            "maas.pipeline": self.name, "maas.step": step.name, "maas.step.kind": step.kind})
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                value = await self._attempts(step, values, timing, started, budget)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                timing.status = "cancelled"
            _end_span(span, timing, e)
            raise
        if isinstance(value, Stream):  # its span lasts as long as its stream
            span.add_event("first chunk")
            value = _failing_as(step, timing, value, self.outputs if self.record else None)
            value.on_close.append(functools.partial(_end_span, span, timing, None))
        else:
            _end_span(span, timing, None)
            if self.record:
                self.outputs[step.name] = value
        return value

    async def _attempts(self, step: Step, values: dict[str, Any], timing: StepTiming, started: float,
                        budget: float | None) -> Any:
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        for attempt in range(1 + (step.retries if step.idempotent else 0)):
            timing.attempts = attempt + 1
            limit = asyncio.timeout_at(budget)
            try:
                async with limit:
                    value = await self._compute(step, values, budget)
                timing.status, timing.ms = "ok", (loop.time() - started) * 1000
                return value
            except TimeoutError as exc:
                if not limit.expired():  # the step's own time-out (a plugin's call): an ordinary failure
                    error = exc
                    continue
                by_deadline = budget == self.deadline and (
                    not step.timeout_ms or self.deadline is None or self.deadline < started + step.timeout_ms / 1000)
                error = DeadlineExceeded(f"it overran its budget of {(budget or started) - started:.3f}s "
                                         f"({'the request deadline' if by_deadline else 'timeout_ms'})")
                break  # the budget is spent: no time left to retry
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # its on_error decides
                error = exc
        timing.ms = (loop.time() - started) * 1000
        assert error is not None
        timing.error = error.message if isinstance(error, MaasError) else f"{type(error).__name__}: {error}"
        if step.on_error == "skip":
            timing.status = "skipped"
            return None
        if step.on_error == "fallback":
            timing.status = "fallback"
            return step.fallback
        timing.status = "failed"
        raise StepFailed(step, error) from None

    async def _compute(self, step: Step, values: dict[str, Any], deadline: float | None) -> Any:
        source = values.get(step.input.removeprefix("steps.")) if step.input.startswith("steps.") else None
        here = self._input_value(step.input) if step.input in ("input.text", "input.messages") else source
        o = step.options
        if step.kind == "template":
            try:  # off the event loop: a template can loop for a while within its limits
                return await asyncio.to_thread(_render, str(o["template"]), input=self.input, steps=values)
            except InvalidArgument:
                raise
            except Exception as exc:
                raise InvalidArgument(f"the template failed: {exc}") from None
        if step.kind == "generate":
            return await self._generate(step, here, deadline)
        if step.kind == "embed":
            texts = here if isinstance(here, list) and all(isinstance(t, str) for t in here) else [_text(here)]
            vectors = await self.services.embed(str(o["model"]), texts, deadline=deadline)
            return vectors if isinstance(here, list) else vectors[0]
        if step.kind == "retrieve":
            return await self.services.retrieve(str(o["index"]), here, int(o.get("k", 4)), deadline=deadline)
        if step.kind == "plugin":
            return await self._plugin(step, here, deadline)
        if step.kind == "switch":
            key = _text(here).strip()
            cases = {str(k): str(v) for k, v in dict(o["cases"]).items()}
            chosen = cases.get(key) or o.get("default")
            if not chosen:
                raise InvalidArgument(f"no case for {key[:80]!r} and no default")
            return await asyncio.shield(self.value(str(chosen)))
        if step.kind == "parallel":
            return {name: values[name] for name in o["steps"]}
        if step.kind == "guard":
            guard = PhraseGuard(list(o["block"]), action=str(o.get("action", "stop")),
                                case_sensitive=bool(o.get("case_sensitive", False)),
                                replacement=str(o.get("replacement", "[redacted]")))
            if isinstance(here, Stream):
                return _guarded(here, guard, self)
            text = guard.feed(_text(here)) + guard.finish()
            self.filtered = self.filtered or (guard.blocked and guard.action == "stop")
            return text
        raise InvalidArgument(f"unknown step kind {step.kind!r}")

    def _input_value(self, ref: str) -> Any:
        return self.input.messages if ref == "input.messages" else self.input.text

    async def _generate(self, step: Step, here: Any, deadline: float | None) -> Any:
        o = step.options
        if isinstance(here, list):
            messages = [dict(m) for m in here]
        else:
            messages = [{"role": "user", "content": _text(here)}]
        if o.get("system"):
            messages = [{"role": "system", "content": str(o["system"])}, *messages]
        params: dict[str, Any] = {k: o[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop") if k in o}
        if affinity := self._retrieved_key(step):
            params["affinity"] = affinity
        if self.record and "seed" not in params and params.get("temperature", 1.0) != 0:
            params["seed"] = self.seeds.setdefault(step.name, random.getrandbits(31))
        chunks = self.services.generate(str(o["model"]), messages, params, deadline=self.deadline)
        if not step.streams:
            return "".join([c async for c in chunks])
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = ""
        except BaseException:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
            raise
        return Stream(first, chunks)

    def _retrieved_key(self, step: Step) -> str:
        """For a generate step whose prompt is made from retrieved documents: a key naming
        those documents, in order ("" for any other), so that requests that retrieved the
        same ones go to the replica whose prefix cache likely holds them (when the template
        puts them first)."""
        seen: set[str] = set()
        todo, docs = list(step.reads()), list[str]()
        while todo:
            name = todo.pop(0)
            if name in seen:
                continue
            seen.add(name)
            source = self.spec.steps[name]
            task = self._tasks.get(name)
            if source.kind == "retrieve" and task is not None and task.done() and not task.cancelled() \
                    and task.exception() is None and isinstance(task.result(), list):
                docs.extend(str(d.get("text", "")) if isinstance(d, dict) else str(d) for d in task.result())
            todo.extend(source.reads())
        if not docs:
            return ""
        return "retrieved:" + hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:32]

    async def _plugin(self, step: Step, here: Any, deadline: float | None) -> Any:
        plugin = self.services.plugin(str(step.options["plugin"]))
        ctx = StepContext(step.name, deadline, self.tenant, dict(step.options.get("config") or {}), self.services)
        if step.streams:  # stream(ctx, chunks): the input's chunks in, its own out, as they come
            stream = getattr(plugin, "stream", None)
            if stream is None:
                raise InvalidArgument(f"plugin {step.options['plugin']} has no stream(ctx, chunks) "
                                      "(its step says stream: true)")
            chunks = stream(ctx, _chunks_of(here))
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = ""
            except BaseException:
                with contextlib.suppress(Exception):
                    await chunks.aclose()
                raise
            return Stream(str(first), chunks)
        run = getattr(plugin, "run", None)
        if run is None:
            raise InvalidArgument(f"plugin {step.options['plugin']} has no run(ctx, value)")
        if inspect.iscoroutinefunction(run):
            return await run(ctx, here)
        return await asyncio.to_thread(run, ctx, here)  # off the loop: it may be CPU-heavy


async def _chunks_of(value: Any) -> AsyncGenerator[str, None]:
    """A streaming plugin's input: a stream's chunks as they come, or a value as one chunk."""
    if isinstance(value, Stream):
        async with contextlib.aclosing(value.chunks()) as chunks:
            async for chunk in chunks:
                yield chunk
    elif value is not None:
        yield _text(value)


def _failing_as(step: Step, timing: StepTiming, stream: Stream, outputs: dict[str, Any] | None) -> Stream:
    """`stream`, whose failure after its first chunk (every replica tried, say) fails the
    request naming the step: a stream that has sent text can be neither skipped nor
    replaced by a fallback. With `outputs`, the text that passed is kept there."""
    if outputs is not None:
        outputs[step.name] = stream.first

    async def rest() -> AsyncGenerator[str, None]:
        try:
            async for chunk in stream.rest:
                if outputs is not None:
                    outputs[step.name] += chunk
                yield chunk
        except (asyncio.CancelledError, GeneratorExit, StepFailed):  # (a step before it already said)
            raise
        except Exception as exc:
            timing.status = "failed"
            timing.error = exc.message if isinstance(exc, MaasError) else f"{type(exc).__name__}: {exc}"
            raise StepFailed(step, exc) from None
        finally:
            aclose = getattr(stream.rest, "aclose", None)
            if aclose is not None:
                await aclose()

    out = Stream(stream.first, rest())
    out.on_close = stream.on_close
    return out


def _end_span(span: trace.Span, timing: StepTiming, error: BaseException | None) -> None:
    span.set_attributes({"maas.step.status": timing.status, "maas.step.attempts": timing.attempts,
                         "maas.step.ms": round(timing.ms, 3)})
    if timing.status in ("skipped", "fallback"):
        span.add_event(timing.status, {"maas.step.error": timing.error})
    if timing.status == "failed" or (error is not None and not isinstance(error, asyncio.CancelledError)):
        span.set_status(Status(StatusCode.ERROR, timing.error or type(error).__name__))
    elif isinstance(error, asyncio.CancelledError):
        span.set_attribute("maas.step.cancelled", True)
    span.end()


def _guarded(stream: Stream, guard: PhraseGuard, run: Run) -> Stream:
    async def rest() -> AsyncGenerator[str, None]:
        async with contextlib.aclosing(stream.chunks()) as chunks:
            async for chunk in chunks:
                out = guard.feed(chunk)
                if out:
                    yield out
                if guard.blocked and guard.action == "stop":
                    run.filtered = True
                    trace.get_current_span().add_event("guard stopped the answer")
                    return  # the stream ends here; the generate step is cancelled with it
            tail = guard.finish()
            if guard.blocked and guard.action == "stop":  # decided only at the end (a longer phrase could still have come)
                run.filtered = True
                trace.get_current_span().add_event("guard stopped the answer")
            if tail:
                yield tail

    return Stream("", rest())


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict) and "content" in value[0]:
        return str(value[-1].get("content", ""))
    return str(value)


__all__ = ["PipelineInput", "Run", "Services", "StepContext", "StepFailed", "StepTiming", "Stream"]
