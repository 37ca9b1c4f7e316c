"""The transformers engine in a process of its own, behind the same Engine interface.

In one process, the engine's scheduler thread (much of a transformers forward pass is
Python) and the worker's event loop (gRPC, TLS, protobuf: per token) take turns on one
GIL, so neither gets a core of its own: profiled under 32 streams, the worker's loop
stalled while the engine held the GIL and the engine waited for it in between its torch
calls. `ProcessEngine` runs `HFEngine` in a child process (`python -m` this module: a fresh
interpreter, so no gRPC or asyncio state crosses a fork) and talks to it over one
socket pair, with multiprocessing's pickling `Connection`:

    worker -> engine   ("load", ModelSpec)                                   first
                       ("generate", key, GenerationRequest) | ("cancel", key) | ("close",)
    engine -> worker   ("ready", context_length) | ("failed", error)       while loading
                       ("out", [(key, Delta | error), ...])                 one per engine step
                       ("status", EngineStats, metric families)             every STATUS_INTERVAL
                       ("closed",)

A step's output for every sequence is one message, so the cost of crossing the pipe is
paid per step, not per token. Errors cross as the same MaasError types (they pickle with
their fields). The child tokenizes prompts; the worker keeps a tokenizer only to render
chats. If the child dies (killed, out of memory), every open stream and every later
request gets EngineDead, which marks the replica failed as an engine failure in process
would. The child ignores SIGINT (Ctrl-C at `maas up` reaches the whole process group: the
worker drains first, then closes its engines) and exits when its pipe closes, so it
never outlives its worker.

Prometheus series of the child reach the worker's /metrics through
`metrics.MERGED`; `stats()` answers from the latest status message (at most
STATUS_INTERVAL old).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

from maas.mesh.errors import EngineDead, FailedPrecondition, MaasError, Unavailable
from maas.mesh.kvblocks import KvEvents
from maas.services.worker.engines import metrics
from maas.services.worker.engines.base import (
    WEIGHTS_LOCK,
    Delta,
    EngineStats,
    GenerationRequest,
    ModelSpec,
    Pacer,
    TemplateChats,
)

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.5  # seconds between the child's stats and metrics messages
CLOSE_TIMEOUT = 30.0   # seconds a closing engine process gets before it is killed
LARGE_PROMPT_CHARS = 8192  # a prompt this long is handed to the child from a thread

Item = Delta | BaseException


def engine_python(spec: ModelSpec) -> str:
    """The interpreter of `spec`'s engine process: the worker's own, or for a vLLM engine
    MAAS_VLLM_PYTHON when set (vLLM in an environment of its own, whose pins need not agree
    with the worker's)."""
    from maas.services.worker.engines import engine_kind

    if engine_kind(spec) == "vllm":
        python = os.environ.get("MAAS_VLLM_PYTHON")
        if python and not os.access(python, os.X_OK):
            raise FailedPrecondition(f"MAAS_VLLM_PYTHON is {python!r}, which is not an executable python: point it "
                                     "at the python of an environment with vLLM and maas-mesh (`make vllm` makes "
                                     ".venv-vllm; elsewhere `pip install vllm` and `pip install --no-deps maas-mesh`)")
        return python or sys.executable
    return sys.executable


def engine_env(spec: ModelSpec) -> dict[str, str]:
    """The engine process's environment: the worker's, and for vLLM:

    - on CUDA, the replica's GPUs made visible, in its order (`cuda:0`, `cuda:3` ->
      CUDA_VISIBLE_DEVICES=0,3, read through the worker's own CUDA_VISIBLE_DEVICES if it has
      one): vLLM serves on the first devices it sees, tensor-parallel rank r on the r-th;
    - on CPU devices (`maas worker --cpu-devices N`: cpu:0, cpu:1, ... share the cores), a
      replica on several of them gets VLLM_CPU_OMP_THREADS_BIND (`cpu_threads_bind`) unless
      the worker's environment sets it.
    """
    from maas.services.worker.engines import engine_kind

    env = dict(os.environ)
    if engine_kind(spec) != "vllm":
        return env
    gpus = [d.partition(":")[2] or "0" for d in spec.devices if d.startswith("cuda")]
    if gpus and all(g.isdigit() for g in gpus):
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[int(g)] if int(g) < len(visible) else g for g in gpus)
    elif len(spec.devices) > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(len(spec.devices)))
    return env


def cpu_threads_bind(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` tensor-parallel ranks on this machine's CPU: the
    cores this process may run on, split into `ranks` contiguous groups ("0|1" on two cores;
    fewer cores than ranks: ranks share them round robin). vLLM's default, `auto`, binds one
    rank per NUMA node and refuses more ranks than nodes ("Not enough allowed NUMA nodes to
    bind threads of 2 local CPUWorkers"); `nobind` lets every rank start a thread per core,
    which made 200 tokens on 2 cores take 62 s instead of 0.4 s."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < ranks:
        return "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    size, extra = divmod(len(cores), ranks)
    groups, start = [], 0
    for r in range(ranks):
        end = start + size + (r < extra)
        groups.append(",".join(map(str, cores[start:end])))
        start = end
    return "|".join(groups)


def _load_tokenizer(source: str) -> Any:
    with WEIGHTS_LOCK:  # one thread at a time imports transformers (see jobs._render_pairs)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source)


class ProcessEngine(TemplateChats):
    """`HFEngine` (or `VLLMEngine`, by `engines.engine_kind`) for `spec`, run in a child process."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.context_length = 0
        self._label = f"{spec.name}@{spec.version}"
        self._pacer = Pacer(spec)
        self._lock = asyncio.Lock()
        self._send_lock = threading.Lock()
        self._conn: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokenizer: Any = None
        self._streams: dict[int, asyncio.Queue[Item]] = {}
        self._keys = itertools.count()
        self._stats = EngineStats()
        self._dead: MaasError | None = FailedPrecondition(f"model {spec.name} is not loaded")
        # the child engine's prefix-cache blocks (kvblocks.py), from its status messages
        self.kv_events: KvEvents | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def load(self) -> None:
        async with self._lock:
            if self._process is not None:
                return
            self._loop = asyncio.get_running_loop()
            mine, theirs = socket.socketpair()
            # a fresh interpreter (exec'd, not forked: no gRPC threads or asyncio state copied)
            # in a process group of its own, so whatever it starts (vLLM's engine core) goes with it
            process = await asyncio.to_thread(
                subprocess.Popen, [engine_python(self.spec), "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True,
                env=engine_env(self.spec))
            theirs.close()  # the child holds its end; ours sees EOF when the child is gone
            ours = Connection(mine.detach())
            try:
                try:
                    ours.send(("load", self.spec))
                    first = await asyncio.to_thread(ours.recv)
                except (EOFError, OSError):
                    code = await asyncio.to_thread(process.wait, CLOSE_TIMEOUT)
                    raise EngineDead(f"the engine process of {self._label} exited while loading "
                                     f"(exit code {code})") from None
                if first[0] != "ready":
                    await asyncio.to_thread(process.wait, CLOSE_TIMEOUT)
                    raise first[1]
                # importing transformers takes seconds on a busy machine: off the loop, which
                # keeps this worker's etcd lease alive (a lapse reschedules its replicas)
                self._tokenizer = await asyncio.to_thread(_load_tokenizer, self.spec.source)
            except BaseException:  # failed or cancelled (unassigned while loading): no orphan left
                ours.close()
                if process.poll() is None:
                    process.kill()
                    await asyncio.shield(asyncio.to_thread(process.wait, CLOSE_TIMEOUT))
                _kill_group(process.pid)  # and nothing it started (vLLM's core, mid-load)
                raise
            self.context_length = int(first[1])
            self._conn, self._process, self._dead = ours, process, None
            self._reader = threading.Thread(target=self._read, args=(ours,), daemon=True,
                                            name=f"engine pipe {self._label}")
            self._reader.start()
            log.info("%s serves from engine process %d", self._label, process.pid)

    async def close(self) -> None:
        async with self._lock:
            process, conn, reader = self._process, self._conn, self._reader
            if process is None or conn is None:
                return
            self._dead = Unavailable(f"{self._label} is shutting down on this worker; retry")
            try:
                self._send(("close",))
            except (OSError, ValueError):
                pass  # already gone
            try:
                await asyncio.to_thread(process.wait, CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("engine process of %s did not close in %.0fs; killing it", self._label, CLOSE_TIMEOUT)
                process.kill()
                await asyncio.to_thread(process.wait, CLOSE_TIMEOUT)
            if reader is not None:
                await asyncio.to_thread(reader.join, CLOSE_TIMEOUT)
            conn.close()
            self._process = self._conn = self._reader = None
            self._tokenizer = None

    def stats(self) -> EngineStats:
        return self._stats if self._dead is None else EngineStats()

    # ---- requests ----------------------------------------------------------------------



    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._dead is not None:
            raise self._dead
        key = next(self._keys)
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._streams[key] = queue
        finished = False
        try:
            try:
                if len(request.prompt) > LARGE_PROMPT_CHARS:  # a large write may wait for the child: not on the loop
                    await asyncio.to_thread(self._send, ("generate", key, request))
                else:
                    self._send(("generate", key, request))
            except (OSError, ValueError):  # the process is gone; the reader will say so to the others
                raise EngineDead(f"the engine process of {self._label} is gone") from None
            waiting: BaseException | None = None  # an error behind deltas merged into one
            sent_at: float | None = None
            while True:
                item = waiting if waiting is not None else await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine is done with it
                    raise item
                item, waiting = await self._pacer.collect(queue, item, sent_at)
                yield item
                sent_at = time.monotonic()
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            self._streams.pop(key, None)
            if not finished and self._dead is None:
                try:
                    self._send(("cancel", key))
                except (OSError, ValueError):
                    pass  # the reader reports the process's end

    def _send(self, message: tuple[object, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise self._dead or Unavailable(f"{self._label} is not loaded")
        with self._send_lock:
            conn.send(message)

    # ---- the pipe's reader thread --------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: the engine cannot be trusted any more
                log.exception("engine process of %s sent a message the worker cannot read; stopping it", self._label)
                if self._process is not None:
                    self._process.kill()
                break
            if message[0] == "status":
                self._stats = message[1]
                metrics.MERGED.update(self, message[2])
                if message[3] is not None:  # the engine's prefix-cache changes, mirrored here for the relay
                    block_size, ops = message[3]
                    if self.kv_events is None:
                        self.kv_events = KvEvents(block_size)
                    self.kv_events.apply(ops)
            elif message[0] == "closed":
                break
            else:
                try:
                    loop.call_soon_threadsafe(self._deliver, message[1])
                except RuntimeError:  # the worker's loop is closed: nobody is listening any more
                    break
        metrics.MERGED.forget(self)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._ended)

    def _deliver(self, items: list[tuple[int, Item]]) -> None:
        for key, item in items:
            queue = self._streams.get(key)
            if queue is not None:
                queue.put_nowait(item)

    def _ended(self) -> None:
        """The child is gone: whoever still waits hears why, and what it started goes too (a
        killed engine process would leave vLLM's engine core running, holding its memory)."""
        process = self._process
        code = process.poll() if process is not None else None
        if process is not None:
            _kill_group(process.pid)
        if self._dead is None:
            self._dead = EngineDead(f"the engine process of {self._label} exited (exit code {code})")
            log.error("engine process of %s exited (exit code %s) with %d streams open", self._label, code,
                      len(self._streams))
        for queue in self._streams.values():
            queue.put_nowait(self._dead)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer as the child loaded it, from the same files (the worker's
        Tokenizer service, worker/tokenize.py); None until loaded."""
        return self._tokenizer


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of an engine process's group (nothing, after a clean close)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ---- the child process ---------------------------------------------------------------------


class _PipeSink:
    """The engine's sink in the child: one pipe message per step, naming each sequence by the
    key its worker gave it (the sequence's tag)."""

    def __init__(self, conn: Connection, lock: threading.Lock, open_keys: dict[int, object]) -> None:
        self.conn, self.lock, self.open = conn, lock, open_keys

    def deliver(self, items: list[tuple[Any, Item]]) -> None:
        out = []
        for seq, item in items:
            out.append((seq.tag, item))
            if isinstance(item, BaseException) or item.finish_reason is not None:
                self.open.pop(seq.tag, None)
        try:
            with self.lock:
                self.conn.send(("out", out))
        except OSError:
            pass  # the worker is gone; the main thread sees the socket close and ends the process


def serve_engine(conn: Connection) -> None:
    """The engine process: load the spec its worker sends first, then serve the worker's
    requests until the pipe closes or the worker says close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from maas.mesh.logs import setup_logging

    setup_logging("INFO", name="worker")
    try:
        _, spec = conn.recv()
    except (EOFError, OSError):
        return
    from maas.services.worker.engines import engine_kind

    if engine_kind(spec) == "vllm":
        asyncio.run(_serve_async_engine(conn, spec))
        return
    from maas.services.worker.engines.hf import HFEngine

    loop = asyncio.new_event_loop()
    try:
        engine = HFEngine(spec)  # a bad option is an InvalidArgument the worker must see, not a crash
        loop.run_until_complete(engine.load())  # loads the weights and starts the scheduler thread
    except BaseException as exc:
        conn.send(("failed", exc if isinstance(exc, MaasError) else EngineDead(f"{type(exc).__name__}: {exc}")))
        return
    lock = threading.Lock()
    open_keys: dict[int, Any] = {}  # key -> sequence, until its last delta or error is sent
    sink = _PipeSink(conn, lock, open_keys)
    stop = threading.Event()
    with lock:
        conn.send(("ready", engine.context_length))
    threading.Thread(target=_report_status, args=(engine, conn, lock, stop), daemon=True,
                     name="engine status").start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the worker is gone
            kind = message[0]
            if kind == "generate":
                key, request = message[1], message[2]
                try:
                    seq = engine.prepare(request, sink, tag=key)
                    open_keys[key] = seq  # before it can finish: the sink forgets it then
                    engine.enqueue(seq)
                except Exception as exc:
                    open_keys.pop(key, None)
                    refused = exc if isinstance(exc, MaasError) else EngineDead(f"{type(exc).__name__}: {exc}")
                    with lock:
                        conn.send(("out", [(key, refused)]))
            elif kind == "cancel":
                seq = open_keys.pop(message[1], None)
                if seq is not None:
                    engine.cancel(seq)
            elif kind == "close":
                break
    finally:
        stop.set()
        loop.run_until_complete(engine.close())  # those still running hear Unavailable through the sink
        loop.close()
        _say_closed(conn, lock)


async def _serve_async_engine(conn: Connection, spec: ModelSpec) -> None:
    """The engine process for an engine that lives on an event loop (vLLM's `AsyncLLM` is
    bound to the loop it was made on): this loop runs it; a thread reads the pipe and hands
    each message to the loop; each request is a task, and the deltas the tasks make in one
    turn of the loop (one engine step's, as vLLM hands them out) go to the worker as one
    message."""
    from maas.services.worker.engines.vllm import VLLMEngine

    loop = asyncio.get_running_loop()
    try:
        engine = VLLMEngine(spec)
        await engine.load()
    except BaseException as exc:
        conn.send(("failed", exc if isinstance(exc, MaasError) else EngineDead(f"{type(exc).__name__}: {exc}")))
        return
    lock = threading.Lock()
    outbox: list[tuple[int, Item]] = []
    tasks: dict[int, asyncio.Task[None]] = {}
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def flush() -> None:
        items = outbox.copy()
        outbox.clear()
        try:
            with lock:
                conn.send(("out", items))
        except OSError:
            pass  # the worker is gone; the reader sees the socket close

    def put(key: int, item: Item) -> None:
        if not outbox:
            loop.call_soon(flush)  # after every task this turn woke has added its delta
        outbox.append((key, item))

    async def run(key: int, request: GenerationRequest) -> None:
        try:
            async for delta in engine.generate(request):
                put(key, delta)
        except asyncio.CancelledError:
            pass  # the worker cancelled it: nobody waits for an answer
        except Exception as exc:  # a bug of ours for this request, unless the engine died under it
            log.exception("request %s failed in the engine", request.request_id)
            put(key, exc if isinstance(exc, MaasError) else
                EngineDead(f"{type(exc).__name__}: {exc}") if engine.dead() else
                Unavailable(f"the engine failed this request ({type(exc).__name__}); retry"))
        finally:
            tasks.pop(key, None)

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("close",)  # the worker is gone
            except Exception:  # a message this side cannot read (the two environments' versions differ?)
                log.exception("the engine process cannot read its worker's message; stopping")
                message = ("close",)
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message[0] == "close":
                return

    stop = threading.Event()
    with lock:
        conn.send(("ready", engine.context_length))
    threading.Thread(target=read, daemon=True, name="engine pipe").start()
    threading.Thread(target=_report_status, args=(engine, conn, lock, stop), daemon=True,
                     name="engine status").start()
    async def watch() -> None:
        """An engine that dies with no request open (vLLM's core killed, out of memory) ends
        this process, so the worker hears it at once rather than from the next request."""
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            if engine.dead():
                break
        log.error("the engine of %s died; its process ends", spec.name)
        inbox.put_nowait(("close",))

    watcher = asyncio.create_task(watch())
    try:
        while True:
            message = await inbox.get()
            if message[0] == "generate":
                tasks[message[1]] = asyncio.create_task(run(message[1], message[2]))
            elif message[0] == "cancel":
                task = tasks.pop(message[1], None)
                if task is not None:
                    task.cancel()
            elif message[0] == "close":
                break
    finally:
        stop.set()
        watcher.cancel()
        for task in list(tasks.values()):
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await engine.close()
        if outbox:
            flush()  # what the tasks said last goes out before "closed"
        _say_closed(conn, lock)


def _say_closed(conn: Connection, lock: threading.Lock) -> None:
    """The engine process's last word to its worker, then its end of the pipe closed."""
    try:
        with lock:
            conn.send(("closed",))
    except OSError:
        pass  # the worker is gone already
    conn.close()


def _report_status(engine: Any, conn: Connection, lock: threading.Lock, stop: threading.Event) -> None:
    while not stop.wait(STATUS_INTERVAL):
        try:
            events = getattr(engine, "kv_events", None)
            kv = (events.block_size, events.take()) if events is not None else None
            message = ("status", engine.stats(), metrics.snapshot(), kv)
            with lock:
                conn.send(message)
        except OSError:
            return


__all__ = ["ProcessEngine", "serve_engine"]

if __name__ == "__main__":
    serve_engine(Connection(int(sys.argv[1])))
