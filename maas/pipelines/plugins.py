"""Running the plugins of pushed pipelines in a process of their own.

A router does not run a pipeline's plugin code in its own process: a plugin that loops, burns
CPU (holding the GIL) or crashes would stall or kill every request the router serves, and
the router holds credentials a plugin has no business reading. `PluginHost` starts one child
(`python -m maas.pipelines.plugins`) with an environment stripped of the mesh's credentials
and a working directory of its own, and sends it calls as JSON lines over pipes:

    -> {"id": 7, "dir": "/tmp/.../<sha>", "sha": "<sha>", "plugin": "tidy:Tidy",
        "step": "tidy", "tenant": "acme", "config": {...}, "timeout": 0.5, "value": ...}
    <- {"id": 7, "value": ...}        or   {"id": 7, "error": "ZeroDivisionError: division by zero"}

JSON both ways: the router never unpickles what plugin code made. Each package is imported
as a package of its own (`_maas_pipeline_<sha>`), so two versions of a plugin (a canary and
its stable version) run side by side. Calls run concurrently in the child's threads; an
`async def run` runs in its thread's own event loop. A call that overruns its step's budget
is abandoned by the router (the step fails, skips or falls back) while the child's thread
finishes it; a child that dies fails its calls in flight with UNAVAILABLE and is started
again for the next call.

A call that overruns its step's budget keeps its thread until it returns; once as many
such calls pile up as the child has threads, the child is restarted (its calls in flight
fail with UNAVAILABLE), so looping plugins cannot stall the others for good.

This is process isolation, not a security sandbox: the child runs as the router's user, so
code in it can read what that user can (the router's own environment through /proc
included) and every package's files, and it shares the child with every other
pipeline's plugins. On a shared fleet, let plugins run only for pipelines the platform
owns (the router's `--pipeline-plugins platform`, the default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import importlib
import inspect
import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from opentelemetry import trace

from maas.mesh.errors import FailedPrecondition, InvalidArgument, MaasError, Unavailable

log = logging.getLogger(__name__)

MAX_LINE = 16 << 20  # one call or answer
THREADS = 8          # plugin calls a child runs at once
# what a plugin's process keeps of the router's environment (no MAAS_*, no keys or tokens)
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "SYSTEMROOT")


class PluginError(MaasError):
    """A plugin raised, returned something that is not JSON, or could not be loaded (INTERNAL)."""


class PluginHost:
    """The router's side: one child process, started on first use."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._abandoned: set[int] = set()  # calls whose step gave up while the child still runs them
        # per call in flight: what answers its plugin's own calls (services, deadline, trace context)
        self._services: dict[int, tuple[Any, float | None, contextvars.Context]] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._outputs: dict[int, asyncio.Queue[tuple[str, Any]]] = {}  # a stream call's chunks, as they come
        self._next = 0
        self._lock = asyncio.Lock()
        self.home = tempfile.mkdtemp(prefix="maas-plugins-")  # the child's HOME and working directory

    async def call(self, package_dir: Path, sha: str, plugin: str, *, step: str, tenant: str,
                   config: dict[str, Any], timeout: float | None, value: Any,
                   services: Any = None, deadline: float | None = None) -> Any:
        """Run `plugin` on `value` in the child. `services` (the pipeline's: generate, embed,
        retrieve, as the caller) answer the plugin's own calls through `ctx`, within
        `deadline` (event-loop time), in the trace context of this call."""
        try:
            line = json.dumps({"dir": str(package_dir), "sha": sha, "plugin": plugin, "step": step,
                               "tenant": tenant, "config": config, "timeout": timeout, "value": value})
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"the value passed to plugin {plugin} is not JSON: {e}") from None
        proc = await self._started()
        pending = self._pending  # this process's calls (a restarted process gets a fresh dict)
        self._next += 1
        call_id = self._next
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending[call_id] = future
        self._services[call_id] = (services, deadline, contextvars.copy_context())
        try:
            assert proc.stdin is not None
            proc.stdin.write(b'{"id": %d, ' % call_id + line[1:].encode() + b"\n")
            await proc.stdin.drain()
            return await future
        except (ConnectionError, BrokenPipeError):
            raise Unavailable("the pipeline plugin process went away; the next call starts it again") from None
        except asyncio.CancelledError:
            # its step gave up (a budget); the child's thread still runs it. Once as many are
            # stuck as the child has threads, no call would ever run again: start afresh.
            self._abandoned.add(call_id)
            if len(self._abandoned) >= THREADS and proc is self._proc:
                log.warning("%d pipeline plugin calls overran their budgets and still run; restarting the "
                            "plugin process", len(self._abandoned))
                self._proc = None  # the next call starts another
                self._abandoned.clear()
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            raise
        finally:
            pending.pop(call_id, None)
            self._services.pop(call_id, None)

    async def _started(self) -> asyncio.subprocess.Process:
        async with self._lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            env = {k: v for k, v in os.environ.items() if k in KEPT_ENV}
            env["HOME"] = self.home
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "maas.pipelines.plugins", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=env, cwd=self.home, limit=MAX_LINE)
            self._pending, self._abandoned = {}, set()
            reader = asyncio.create_task(self._read(self._proc, self._pending), name="plugin-host-reader")
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
            log.info("started the pipeline plugin process (pid %d)", self._proc.pid)
            return self._proc

    async def _read(self, proc: asyncio.subprocess.Process, pending: dict[int, asyncio.Future[Any]]) -> None:
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                reply = json.loads(line)
                if not isinstance(reply, dict) or not isinstance(reply.get("id"), int):
                    raise ValueError(f"not a reply: {line[:80]!r}")
                if "service" in reply:  # a plugin's own call (ctx.generate, ...): answered beside
                    self._serve(proc, reply)
                    continue
                if "out" in reply:  # a chunk a streaming plugin yielded
                    out = self._outputs.get(reply["id"])
                    if out is not None:
                        out.put_nowait(("out", str(reply["out"])))
                    continue
                self._abandoned.discard(reply["id"])
                future = pending.get(reply["id"])
                if future is None or future.done():
                    continue  # abandoned (its step gave up)
                if "error" in reply:
                    future.set_exception(PluginError(str(reply["error"])))
                else:
                    future.set_result(reply.get("value"))
        except Exception as e:
            log.error("the pipeline plugin process answered garbage (%s); restarting it", e)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        finally:
            code = await proc.wait()
            if proc is self._proc:
                self._proc = None
            for future in pending.values():
                if not future.done():
                    future.set_exception(Unavailable(f"the pipeline plugin process exited ({code}) during the call; "
                                                     "the next call starts it again"))

    async def stream(self, package_dir: Path, sha: str, plugin: str, chunks: AsyncIterator[str], *, step: str,
                     tenant: str, config: dict[str, Any], timeout: float | None, services: Any = None,
                     deadline: float | None = None) -> AsyncIterator[str]:
        """`plugin`'s `stream(ctx, chunks)` in the child: `chunks` are sent as they come, and
        what it yields comes back as it is made."""
        line = json.dumps({"dir": str(package_dir), "sha": sha, "plugin": plugin, "step": step, "tenant": tenant,
                           "config": config, "timeout": timeout, "stream": True})
        proc = await self._started()
        pending = self._pending
        self._next += 1
        call_id = self._next
        out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending[call_id] = done
        self._outputs[call_id] = out
        self._services[call_id] = (services, deadline, contextvars.copy_context())
        assert proc.stdin is not None
        stdin = proc.stdin

        async def feed() -> None:
            try:
                async for chunk in chunks:
                    stdin.write(json.dumps({"feed": call_id, "chunk": chunk}).encode() + b"\n")
                    await stdin.drain()
            finally:  # its input ends (also when the reader of the output went away)
                with contextlib.suppress(ConnectionError, BrokenPipeError, RuntimeError):
                    stdin.write(json.dumps({"feed": call_id, "end": True}).encode() + b"\n")
                    await stdin.drain()

        feeding: asyncio.Task[None] | None = None
        try:
            stdin.write(b'{"id": %d, ' % call_id + line[1:].encode() + b"\n")
            await stdin.drain()
            feeding = asyncio.create_task(feed(), name=f"plugin-feed-{call_id}")
            waiting_done = asyncio.ensure_future(asyncio.shield(done))
            try:
                while True:
                    getting = asyncio.ensure_future(out.get())
                    await asyncio.wait({getting, waiting_done}, return_when=asyncio.FIRST_COMPLETED)
                    if getting.done():
                        yield getting.result()[1]
                        continue
                    getting.cancel()
                    while not out.empty():  # what it sent before it ended
                        yield out.get_nowait()[1]
                    done.result()  # its error, if it failed
                    return
            finally:
                waiting_done.cancel()
        except (ConnectionError, BrokenPipeError):
            raise Unavailable("the pipeline plugin process went away; the next call starts it again") from None
        finally:
            if feeding is not None:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            pending.pop(call_id, None)
            self._outputs.pop(call_id, None)
            self._services.pop(call_id, None)

    def _serve(self, proc: asyncio.subprocess.Process, request: dict[str, Any]) -> None:
        found = self._services.get(request["id"])
        if found is None:  # its call is over (abandoned): nobody waits for the answer that matters
            return
        services, deadline, context = found
        task = asyncio.get_running_loop().create_task(self._answer(proc, request, services, deadline),
                                                      context=context.copy())
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _answer(self, proc: asyncio.subprocess.Process, request: dict[str, Any], services: Any,
                      deadline: float | None) -> None:
        reply: dict[str, Any] = {"reply_to": request["id"], "sub": request.get("sub")}
        name, args = request.get("service"), request.get("args") or {}
        try:
            if services is None:
                raise FailedPrecondition("this plugin call has no services to call")
            async with asyncio.timeout_at(deadline):
                reply["value"] = await _service(services, str(name), args, deadline)
        except TimeoutError:
            reply["error"] = "DEADLINE_EXCEEDED: the step's budget ran out"
        except MaasError as e:
            reply["error"] = f"{e.code.name}: {e.message}"
        except Exception as e:
            reply["error"] = f"{type(e).__name__}: {e}"
        if proc.stdin is not None and proc.returncode is None:
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                proc.stdin.write(json.dumps(reply, default=str).encode() + b"\n")
                await proc.stdin.drain()

    async def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._serving:
            task.cancel()
        await asyncio.gather(*self._readers, *self._serving, return_exceptions=True)
        shutil.rmtree(self.home, ignore_errors=True)


async def _service(services: Any, name: str, args: dict[str, Any], deadline: float | None) -> Any:
    """One of a plugin's own calls, made with the pipeline's services (as the caller)."""
    if name == "generate":
        messages = args.get("messages")
        if isinstance(messages, str) or messages is None:
            messages = [{"role": "user", "content": str(messages or "")}]
        params = {k: args[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop") if k in args}
        return "".join([chunk async for chunk in services.generate(str(args.get("model", "")), list(messages),
                                                                   params, deadline=deadline)])
    if name == "embed":
        texts = args.get("texts")
        return await services.embed(str(args.get("model", "")), texts if isinstance(texts, list) else [str(texts)],
                                    deadline=deadline)
    if name == "retrieve":
        return await services.retrieve(str(args.get("index", "")), args.get("query"), int(args.get("k", 4)),
                                       deadline=deadline)
    if name == "event":  # the step's span (a tracer for plugins)
        attributes = {str(k): v for k, v in (args.get("attributes") or {}).items()
                      if isinstance(v, str | int | float | bool)}
        trace.get_current_span().add_event(str(args.get("name", "plugin event")), attributes)
        return None
    raise InvalidArgument(f"a plugin may call generate, embed, retrieve or event, not {name!r}")


# ---- the child -------------------------------------------------------------------------------


class PluginServiceError(Exception):
    """A call a plugin made through `ctx` failed (its message: the status and why)."""


class Context:
    """What a plugin's `run(ctx, value)` gets in its process: the step's name, the caller's
    tenant, the step's `config`, the seconds left in its budget when the call was sent
    (`timeout`, None: none), and calls made through the router as the caller, traced
    under the step and bounded by its budget. They block (call them from a thread; an
    `async def run` can use `await asyncio.to_thread(ctx.generate, ...)`)."""

    def __init__(self, call_id: int, step: str, tenant: str, config: dict[str, Any], timeout: float | None) -> None:
        self.step, self.tenant, self.config = step, tenant, config
        self.timeout = timeout
        self._id = call_id
        self._started = time.monotonic()

    def generate(self, model: str, messages: str | list[dict[str, str]], **params: Any) -> str:
        """A model's whole answer to a prompt (a user message) or a chat; params: max_tokens,
        temperature, top_p, seed, stop."""
        return str(self._call("generate", {"model": model, "messages": messages, **params}))

    def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        return list(self._call("embed", {"model": model, "texts": texts}))

    def retrieve(self, index: str, query: str | list[float], k: int = 4) -> list[dict[str, Any]]:
        return list(self._call("retrieve", {"index": index, "query": query, "k": k}))

    def event(self, name: str, **attributes: str | int | float | bool) -> None:
        """An event on the step's span (what the plugin decided, say)."""
        self._call("event", {"name": name, "attributes": attributes})

    def _call(self, service: str, args: dict[str, Any]) -> Any:
        with _state:
            global _subs
            _subs += 1
            sub = _subs
            done, slot = threading.Event(), dict[str, Any]()
            _waiting[(self._id, sub)] = (done, slot)
        _send({"id": self._id, "sub": sub, "service": service, "args": args})
        left = None if self.timeout is None else max(0.0, self.timeout - (time.monotonic() - self._started))
        try:
            if not done.wait(left if left is not None else 3600.0):
                raise TimeoutError(f"ctx.{service}: the step's budget ran out")
        finally:
            with _state:
                _waiting.pop((self._id, sub), None)
        if "error" in slot:
            raise PluginServiceError(f"ctx.{service}: {slot['error']}")
        return slot.get("value")


_state = threading.Lock()
_subs = 0
_waiting: dict[tuple[int, Any], tuple[threading.Event, dict[str, Any]]] = {}
_out: Any = None
_write = threading.Lock()


def _send(message: dict[str, Any]) -> None:
    line = json.dumps(message, default=str).encode() + b"\n"
    with _write:
        _out.write(line)
        _out.flush()


_instances: dict[tuple[str, str], Any] = {}
_loading = threading.Lock()


def _plugin(package_dir: str, sha: str, ref: str) -> Any:
    """The instance of `ref` ("module:Class") from the package at `package_dir`, made once."""
    key = (sha, ref)
    with _loading:
        if key not in _instances:
            root = f"_maas_pipeline_{sha[:16]}"
            if root not in sys.modules:  # the package's own namespace: versions never mix
                pkg = types.ModuleType(root)
                pkg.__path__ = [package_dir]
                sys.modules[root] = pkg
            module_name, _, class_name = ref.partition(":")
            module = importlib.import_module(f"{root}.{module_name}")
            cls = getattr(module, class_name, None)
            if cls is None:
                raise AttributeError(f"module {module_name!r} has no {class_name!r}")
            _instances[key] = cls() if isinstance(cls, type) else cls
        return _instances[key]


_feeds: dict[int, queue.SimpleQueue[Any]] = {}  # a stream call's input chunks (None: the end)
_END = None


def _input(call_id: int) -> Iterator[str]:
    feed = _feeds[call_id]
    while (chunk := feed.get()) is not _END:
        yield str(chunk)


async def _ainput(call_id: int) -> AsyncIterator[str]:
    feed = _feeds[call_id]
    while (chunk := await asyncio.to_thread(feed.get)) is not _END:
        yield str(chunk)


def _stream(request: dict[str, Any], plugin: Any, ctx: Context) -> None:
    """Run `stream(ctx, chunks)`, sending each chunk it yields as it comes."""
    stream = getattr(plugin, "stream", None)
    if stream is None:
        raise AttributeError(f"{request['plugin']} has no stream(ctx, chunks)")
    call_id = request["id"]

    def out(chunk: Any) -> None:
        if not isinstance(chunk, str):
            raise TypeError(f"stream() yielded a {type(chunk).__name__}, not text")
        _send({"id": call_id, "out": chunk})

    if inspect.isasyncgenfunction(stream):
        async def drive() -> None:
            async for chunk in stream(ctx, _ainput(call_id)):
                out(chunk)
        asyncio.run(drive())
    else:
        for chunk in stream(ctx, _input(call_id)):
            out(chunk)


def _call(request: dict[str, Any]) -> dict[str, Any]:
    reply: dict[str, Any] = {"id": request["id"]}
    try:
        plugin = _plugin(request["dir"], request["sha"], request["plugin"])
        if request.get("stream"):
            ctx = Context(request["id"], request["step"], request["tenant"], request.get("config") or {},
                          request.get("timeout"))
            _stream(request, plugin, ctx)
            reply["value"] = None  # the end of its stream
            return reply
        run = getattr(plugin, "run", None)
        if run is None:
            raise AttributeError(f"{request['plugin']} has no run(ctx, value)")
        ctx = Context(request["id"], request["step"], request["tenant"], request.get("config") or {},
                      request.get("timeout"))
        value = asyncio.run(run(ctx, request.get("value"))) if inspect.iscoroutinefunction(run) else \
            run(ctx, request.get("value"))
        json.dumps(value)  # a value that is not JSON is the plugin's error, said here
        reply["value"] = value
    except BaseException as e:  # anything a plugin does is its own error, reported to the router
        reply["error"] = f"{type(e).__name__}: {e}"
    finally:
        _feeds.pop(request["id"], None)
    return reply


def main() -> None:
    # the protocol gets a descriptor of its own; fd 1 (print, os.write(1), subprocesses)
    # becomes stderr, so a plugin's output cannot corrupt it by accident
    global _out
    _out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(future: concurrent.futures.Future[dict[str, Any]]) -> None:
        _send(future.result())

    with concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="plugin") as pool:
        for line in sys.stdin.buffer:
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if "reply_to" in request:  # the router's answer to a plugin's ctx call
                with _state:
                    waiting = _waiting.get((request["reply_to"], request.get("sub")))
                if waiting is not None:
                    waiting[1].update(request)
                    waiting[0].set()
                continue
            if "feed" in request:  # a stream call's next input chunk, or its end
                feed = _feeds.get(request["feed"])
                if feed is not None:
                    feed.put(_END if request.get("end") else request.get("chunk", ""))
                continue
            if request.get("stream"):
                _feeds[request["id"]] = queue.SimpleQueue()
            pool.submit(_call, request).add_done_callback(answer)


if __name__ == "__main__":
    main()
