"""`maas worker`: register this machine's devices and serve the replicas assigned to it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from maas.mesh import kvblocks
from maas.mesh.config import MeshConfig
from maas.mesh.errors import StartupError
from maas.mesh.logs import setup_logging
from maas.mesh.server import ServiceRuntime, run_service
from maas.services.worker.devices import detect_devices
from maas.services.worker.engines import ENGINES, create_engine
from maas.services.worker.engines.base import Engine, ModelSpec
from maas.services.worker.extra import has_worker_extra, require_worker_extra, worker_extra_hint
from maas.services.worker.jobs import JobRunner
from maas.services.worker.replicas import DEFAULT_CACHE, EngineFactory, ReplicaManager
from maas.services.worker.service import WorkerInferenceServicer
from maas.services.worker.tokenize import WorkerTokenizerFilesServicer, WorkerTokenizerServicer
from maas.v1 import inference_pb2, inference_pb2_grpc, mesh_pb2, tokenize_pb2, tokenize_pb2_grpc

log = logging.getLogger(__name__)

LOAD_REPORT_INTERVAL = 0.5
KV_EVENTS_INTERVAL = 0.05  # prefix-cache changes reach routers this often (kvblocks.py)
KV_EVENTS_PER_MESSAGE = 50_000  # block names per NATS message (8 bytes each)
TORCH_THREADS_ENV = "MAAS_TORCH_THREADS"
ENGINE_PROCESS_ENV = "MAAS_ENGINE_PROCESS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    MeshConfig.add_arguments(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA GPUs when torch sees them, else the CPU")
    parser.add_argument("--cpu-memory-gib", type=float, default=0.0,
                        help="memory budget of the CPU device (default: half the available memory, <= 16)")
    parser.add_argument("--cpu-devices", type=int, default=1, metavar="N",
                        help="offer the CPU as N devices (cpu:0..cpu:N-1), each with 1/N of its memory budget, "
                             "for jobs on several devices (FSDP on gloo) without a GPU")
    parser.add_argument("--cache-dir", default=os.environ.get("MAAS_CACHE_DIR", str(DEFAULT_CACHE)),
                        help="where artifacts fetched from the registry are unpacked (env MAAS_CACHE_DIR)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="worker label used by deployment selectors (repeatable)")
    parser.add_argument("--torch-threads", type=int, default=os.environ.get(TORCH_THREADS_ENV, "0"),
                        help=f"torch's intra-op threads (env {TORCH_THREADS_ENV}); 0: torch's default, every "
                             "core. `maas up` gives each of its workers the host's cores divided among them")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                        default=os.environ.get(ENGINE_PROCESS_ENV, "1") not in ("0", "false", "no"),
                        help="run each transformers model's engine in a process of its own, off the GIL the "
                             f"worker's gRPC loop needs (default; env {ENGINE_PROCESS_ENV}=0 turns it off)")
    parser.add_argument("--engine", choices=ENGINES, default=os.environ.get("MAAS_ENGINE", "hf"),
                        help="the engine of generative transformers models whose version names none with "
                             "the option engine= (env MAAS_ENGINE): hf, the built-in one, or vllm "
                             "(docs/engine.md; its Python: env MAAS_VLLM_PYTHON)")


def limit_torch_threads(threads: int) -> None:
    """At most `threads` CPU threads per torch operation (0: leave torch's default). Two
    workers on one host each using every core run far slower than with the cores split.
    Set before torch is imported where possible (OMP_NUM_THREADS also reaches OpenMP)."""
    if threads < 0:
        raise StartupError(f"--torch-threads must be 0 (torch's default) or more, got {threads}")
    if threads == 0:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "torch" in sys.modules:  # already imported: its pool exists, resize it
        sys.modules["torch"].set_num_threads(threads)


def served_formats() -> list[str]:
    """The model formats this worker offers the scheduler: sim only without the worker extra
    (so no transformers model or fine-tuning job is placed here), else hf and sim."""
    return ["hf", "sim"] if has_worker_extra() else ["sim"]


def engine_factory(*, own_process: bool, default_engine: str = "hf") -> EngineFactory:
    """`create_engine`, refusing an HF model with the command that installs the worker extra
    where it is missing (instead of an ImportError from deep inside an engine); generative
    versions that name no engine get `default_engine`."""

    def create(spec: ModelSpec) -> Engine:
        if spec.format == "hf":
            require_worker_extra(f"{spec.name}@{spec.version} (format hf)")
            if spec.task == "generate" and "engine" not in spec.options and default_engine != "hf":
                spec = dataclasses.replace(spec, options={**spec.options, "engine": default_engine})
        return create_engine(spec, own_process=own_process)

    return create


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StartupError(f"label {item!r} must look like KEY=VALUE")
        labels[key] = value
    return labels


async def build(rt: ServiceRuntime, *, devices: list[mesh_pb2.Device], labels: dict[str, str] | None = None,
                engine_factory: EngineFactory = create_engine, cache_dir: Path = DEFAULT_CACHE) -> ReplicaManager:
    """Wire a worker into a runtime (also used by in-process tests)."""
    worker_id = rt.config.instance
    replicas = ReplicaManager(rt, worker_id, engine_factory=engine_factory, unload_grace=rt.config.grace,
                              cache_dir=cache_dir)
    rt.add_service(inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                   inference_pb2_grpc.add_InferenceServicer_to_server, WorkerInferenceServicer(replicas))
    rt.add_service(tokenize_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name,
                   tokenize_pb2_grpc.add_TokenizerServicer_to_server, WorkerTokenizerServicer(replicas))
    rt.add_service(tokenize_pb2.DESCRIPTOR.services_by_name["TokenizerFiles"].full_name,
                   tokenize_pb2_grpc.add_TokenizerFilesServicer_to_server, WorkerTokenizerFilesServicer(replicas))
    # fine-tuning work directories live beside the artifacts (the one place a worker must be able to write)
    jobs = JobRunner(rt, worker_id, replicas.artifacts, cache_dir / "jobs" / worker_id)
    rt.before_stop(replicas.drain)
    rt.before_stop(jobs.drain)  # trainers checkpoint and their jobs queue again, while etcd is still ours
    rt.add_closer(jobs.close)
    rt.add_closer(replicas.close)
    await rt.start()
    info = mesh_pb2.WorkerInfo(worker_id=worker_id, endpoint=rt.endpoint, devices=devices, labels=labels or {},
                               formats=served_formats(), started_ms=int(time.time() * 1000))
    await rt.etcd.put_owned(rt.etcd.keys.worker(worker_id), info.SerializeToString())
    rt.events.publish("worker", "joined", worker_id,
                      f"worker {worker_id} joined with {', '.join(d.id for d in devices)}", endpoint=rt.endpoint)
    await replicas.start()
    await jobs.start()
    reporter = asyncio.create_task(_report_load(rt, replicas), name="load-report")
    relay = asyncio.create_task(_relay_kv_events(rt, replicas), name="kv-events")

    async def stop_reporter() -> None:
        for task in (reporter, relay):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    rt.before_stop(stop_reporter)
    return replicas


async def _report_load(rt: ServiceRuntime, replicas: ReplicaManager) -> None:
    """Publish this worker's load on core NATS a few times a second (lossy by design)."""
    while True:
        ready = [r for r in replicas.replicas.values()
                 if r.engine is not None and r.info.state == mesh_pb2.REPLICA_STATE_READY]
        stats = [r.engine.stats() for r in ready if r.engine is not None]
        await rt.events.publish_load(mesh_pb2.LoadReport(
            worker_id=replicas.worker_id, in_flight=replicas.in_flight,
            queue_depth=sum(s.waiting for s in stats), running=sum(s.running for s in stats),
            kv_cache_used=max((s.kv_cache_used for s in stats), default=0.0),
            tokens_per_second=sum(s.tokens_per_second for s in stats),
            prefix_hit_rate=max((s.prefix_hit_rate for s in stats), default=0.0),
            time_ms=int(time.time() * 1000), replicas=[r.load() for r in ready]))
        await asyncio.sleep(LOAD_REPORT_INTERVAL)


async def _relay_kv_events(rt: ServiceRuntime, replicas: ReplicaManager) -> None:
    """Relay each ready replica's prefix-cache changes (`Engine.kv_events`, kvblocks.py) on
    core NATS every KV_EVENTS_INTERVAL, and the whole set every kvblocks.SNAPSHOT_SECONDS,
    for routers that route by cached prefix (lossy by design, as load reports are)."""
    seqs: dict[str, int] = {}
    snapshot_at: dict[str, float] = {}
    while True:
        await asyncio.sleep(KV_EVENTS_INTERVAL)
        now = time.monotonic()
        for rid in [r for r in seqs if r not in replicas.replicas]:
            seqs.pop(rid, None)
            snapshot_at.pop(rid, None)
        try:
            await _relay_once(rt, replicas, seqs, snapshot_at, now)
        except Exception:  # a report lost is a hint lost; the relay goes on
            log.exception("relaying KV events failed")


async def _relay_once(rt: ServiceRuntime, replicas: ReplicaManager, seqs: dict[str, int],
                      snapshot_at: dict[str, float], now: float) -> None:
    for replica in list(replicas.replicas.values()):
        events = getattr(replica.engine, "kv_events", None)
        if events is None or replica.info.state != mesh_pb2.REPLICA_STATE_READY:
            continue
        rid = replica.info.replica_id
        due = now - snapshot_at.get(rid, float("-inf")) >= kvblocks.SNAPSHOT_SECONDS
        ops = events.snapshot() if due else events.take()
        if due:
            snapshot_at[rid] = now
        if not ops:
            continue
        for batch in _kv_messages(ops):
            seqs[rid] = seqs.get(rid, 0) + 1
            await rt.events.publish_kv(mesh_pb2.KvEvents(
                worker_id=replicas.worker_id, replica_id=rid, model=replica.ref, block_size=events.block_size,
                seq=seqs[rid], events=batch))


def _kv_messages(ops: list[kvblocks.Op]) -> list[list[mesh_pb2.KvEvent]]:
    """`ops` as KvEvent lists of at most KV_EVENTS_PER_MESSAGE names each (NATS caps a message
    at 1 MiB by default; a snapshot of a large GPU cache is bigger)."""
    kinds = {kvblocks.STORED: mesh_pb2.KvEvent.STORED, kvblocks.REMOVED: mesh_pb2.KvEvent.REMOVED,
             kvblocks.CLEARED: mesh_pb2.KvEvent.CLEARED}
    out: list[list[mesh_pb2.KvEvent]] = [[]]
    room = KV_EVENTS_PER_MESSAGE
    for kind, names in ops:
        if not names:
            out[-1].append(mesh_pb2.KvEvent(kind=kinds[kind]))
            continue
        for start in range(0, len(names), KV_EVENTS_PER_MESSAGE):
            part = names[start:start + KV_EVENTS_PER_MESSAGE]
            if len(part) > room:
                out.append([])
                room = KV_EVENTS_PER_MESSAGE
            out[-1].append(mesh_pb2.KvEvent(kind=kinds[kind], block_hashes=part))
            room -= len(part)
    return [batch for batch in out if batch]


def main(ns: argparse.Namespace) -> int:
    config = MeshConfig.from_args("worker", ns)
    setup_logging(config.log_level, json_output=config.log_json, name="worker", instance=config.instance)

    async def serve() -> None:
        limit_torch_threads(ns.torch_threads)  # before detect_devices, which may import torch
        labels = parse_labels(ns.label)
        if ns.engine not in ENGINES:  # argparse checks a flag's value, not a default from the environment
            raise StartupError(f"MAAS_ENGINE must be one of {', '.join(ENGINES)}, not {ns.engine!r}")
        devices = detect_devices(ns.device, int(ns.cpu_memory_gib * 1024**3), ns.cpu_devices)
        if not has_worker_extra():
            log.warning("%s; this worker serves sim models only", worker_extra_hint("serving transformers models"))
        async with ServiceRuntime(config) as rt:
            await build(rt, devices=devices, labels=labels, cache_dir=Path(ns.cache_dir),
                        engine_factory=engine_factory(own_process=ns.engine_process,
                                                       default_engine=ns.engine))
            await rt.wait()

    return run_service(serve)
