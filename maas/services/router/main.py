"""`maas router`: the front door: gRPC Inference on 127.0.0.1:50051 and the
OpenAI-compatible HTTP API on 127.0.0.1:8000 (base URL http://127.0.0.1:8000/v1) by default."""

from __future__ import annotations

import argparse

from maas.mesh.config import MeshConfig
from maas.mesh.errors import StartupError
from maas.mesh.logs import setup_logging
from maas.mesh.server import ServiceRuntime, run_service
from maas.mesh.usage import UsageMeter
from maas.services.router import batches
from maas.services.router.batches import DEFAULT_CONCURRENCY, DEFAULT_YIELD, BatchesServicer, BatchService
from maas.services.router.forward import FAILOVER_SECONDS, QUEUE_SECONDS, Forwarder
from maas.services.router.http import DEFAULT_TIMEOUT, TIMEOUT_HEADER, HttpApi, error_of
from maas.services.router.kvroute import KvRouter
from maas.services.router.pipelines import PLUGIN_POLICIES, PipelineCatalog
from maas.services.router.pool import COLD_START_SECONDS, ReplicaPool
from maas.services.router.replay import PipelinesServicer
from maas.services.router.service import (
    SERVICE,
    TOKENIZER_SERVICE,
    RouterInferenceServicer,
    RouterTokenizerServicer,
    add_to_server,
)
from maas.services.router.tenants import Gate
from maas.services.router.tokenize import Tokenization
from maas.v1 import batches_pb2_grpc, pipelines_pb2_grpc, tokenize_pb2_grpc

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    MeshConfig.add_arguments(parser, default_port=DEFAULT_PORT)
    parser.add_argument("--cold-start-timeout", type=float, default=COLD_START_SECONDS,
                        help="seconds a request waits for a model scaled to zero to load")
    parser.add_argument("--failover-timeout", type=float, default=FAILOVER_SECONDS,
                        help="seconds a request whose worker failed waits for another ready replica "
                             "(never past its deadline) before it fails")
    parser.add_argument("--no-prefix-affinity", dest="prefix_affinity", action="store_false",
                        help="route by load only (sessions still stick): for comparisons and A/B tests")
    parser.add_argument("--queue-timeout", type=float, default=QUEUE_SECONDS,
                        help="seconds a request waits for room when every replica of its model is full, before "
                             "it is refused with RESOURCE_EXHAUSTED / 429 and a retry hint (default 0: at once)")
    parser.add_argument("--http-host", default=None, help="address the HTTP API binds (default: --host)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="port of the OpenAI-compatible HTTP API (0: any free port, -1: off)")
    parser.add_argument("--http-timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds an HTTP API request may take unless its {TIMEOUT_HEADER} header says "
                             "otherwise (then 504)")
    parser.add_argument("--strict-fields", action="store_true",
                        help="refuse HTTP API bodies with fields the API does not know (400), instead of dropping "
                             "them and naming them in the x-maas-ignored-fields header")
    parser.add_argument("--grpc-timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds a gRPC call that sets no deadline may take (then DEADLINE_EXCEEDED)")
    parser.add_argument("--batch-concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="batch lines this router sends at once, over every batch it runs (0: run no batches "
                             "here; docs/batches.md)")
    parser.add_argument("--batch-yield", type=int, default=DEFAULT_YIELD,
                        help="batch lines this router keeps in flight for a model while requests of other classes "
                             "run on it (0: none, the batch pauses; docs/batches.md)")
    parser.add_argument("--pipeline-plugins", choices=PLUGIN_POLICIES, default="platform",
                        help="whose pipelines may run their plugin code (in a process of its own; not a "
                             "security sandbox): nobody's, the platform's (default) or every tenant's")


async def build(rt: ServiceRuntime, *, cold_start_timeout: float = COLD_START_SECONDS,
                http_host: str | None = None, http_port: int = -1,
                prefix_affinity: bool = True, failover_timeout: float = FAILOVER_SECONDS,
                http_timeout: float = DEFAULT_TIMEOUT, grpc_timeout: float = DEFAULT_TIMEOUT,
                queue_timeout: float = QUEUE_SECONDS, pipeline_plugins: str = "platform",
                batch_concurrency: int = DEFAULT_CONCURRENCY, batch_yield: int = DEFAULT_YIELD,
                strict_fields: bool = False) -> ReplicaPool:
    """Wire a router into a runtime (also used by in-process tests). `http_port` -1 serves
    no HTTP API; the endpoint it serves is published as the router's `http_endpoint`."""
    if not -1 <= http_port <= 65535:
        raise StartupError(f"HTTP port {http_port} is out of range (-1 turns the HTTP API off)")
    if not 0 <= failover_timeout <= 3600:
        raise StartupError(f"--failover-timeout {failover_timeout:g} must be between 0 and 3600 seconds")
    if not 0 <= queue_timeout <= 600:
        raise StartupError(f"--queue-timeout {queue_timeout:g} must be between 0 and 600 seconds")
    pool = ReplicaPool(rt.etcd, cold_start_timeout=cold_start_timeout)

    def replicas() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for name, dep in list(pool.deployments.items.items()):
            if dep.format != "pipeline":  # (the routers run pipelines: no replicas)
                out[(name, "ready")] = float(len(pool.ready(name)))
                out[(name, "desired")] = float(dep.replicas)
        return out

    rt.gauge("maas_deployment_replicas", "A deployment's replicas as this router sees them: ready ones, and the "
             "desired count (an autoscaled one's current target; 0 when scaled to zero)", ["deployment", "state"],
             replicas)
    gate = Gate(rt.etcd, rt.authorizer, owner=pool.owner, not_found=pool.not_found)
    usage = UsageMeter(rt.config)  # its closer is added first, so it runs last: it stores every request's record
    rt.add_closer(usage.close)
    forwarder = Forwarder(pool, gate, prefix_affinity=prefix_affinity, failover_timeout=failover_timeout,
                          credential=rt.config.credential, usage=usage, queue_timeout=queue_timeout)
    if not 0 < grpc_timeout <= 86400:
        raise StartupError(f"--grpc-timeout {grpc_timeout:g} must be more than 0 and at most 86400 seconds")
    catalog = PipelineCatalog(forwarder, plugins=pipeline_plugins)  # the registered pipelines this router runs (docs/pipelines.md)
    rt.add_closer(catalog.close)  # before the HTTP API's: closers run newest first, requests end before it
    rt.add_service(SERVICE, add_to_server, RouterInferenceServicer(forwarder, grpc_timeout, catalog))
    rt.add_service("maas.v1.Pipelines", pipelines_pb2_grpc.add_PipelinesServicer_to_server,
                   PipelinesServicer(forwarder, catalog))
    tokenization = Tokenization(forwarder)  # the models' tokenizers: the Tokenizer service, POST /tokenize
    rt.add_service(TOKENIZER_SERVICE, tokenize_pb2_grpc.add_TokenizerServicer_to_server,
                   RouterTokenizerServicer(tokenization, grpc_timeout))
    rt.add_closer(tokenization.close)  # after the HTTP API's: closers run newest first
    rt.add_closer(pool.close)
    rt.add_closer(gate.close)
    if not 0 <= batch_concurrency <= 4096:
        raise StartupError(f"--batch-concurrency {batch_concurrency} must be between 0 and 4096")
    if not 0 <= batch_yield <= 4096:
        raise StartupError(f"--batch-yield {batch_yield} must be between 0 and 4096")
    http = HttpApi(forwarder, http_host or rt.config.host, max(http_port, 0), grace=rt.config.grace,
                   timeout=http_timeout, tls=rt.config.tls, catalog=catalog, strict_fields=strict_fields)
    batch_service = BatchService(rt.etcd, pool.registry, rt.authorizer, rt.events, http.answer, error_of=error_of,
                           instance=rt.config.instance, concurrency=batch_concurrency, online=pool.online,
                           yield_to=batch_yield)
    http.batches = batch_service
    http.tokenization = tokenization
    rt.add_service(batches.SERVICE, batches_pb2_grpc.add_BatchesServicer_to_server, BatchesServicer(batch_service))
    rt.add_closer(batch_service.close)  # before the pool's: closers run newest first
    info: dict[str, str] = {}
    if http_port >= 0:
        rt.before_stop(http.stop_accepting)  # no new requests once shutdown begins
        rt.add_closer(http.close)            # closers run newest first: requests in flight end first
        info["http_endpoint"] = await http.start()
    await rt.start(**info)
    await usage.start()
    await pool.start()
    await gate.start()
    await rt.events.subscribe_load(pool.observe)
    if prefix_affinity:  # route by the blocks replicas hold (router/kvroute.py)
        pool.kv = KvRouter(tls=rt.config.tls, credential=forwarder.credential,
                           known=lambda replica_id: replica_id in pool.replicas.items)
        rt.add_closer(pool.kv.close)
        await rt.events.subscribe_kv(pool.kv.observe)
    catalog.start_reporting(rt.events, rt.config.instance)  # deployed pipelines' outcomes, for canary judging
    batch_service.start()
    return pool


def main(ns: argparse.Namespace) -> int:
    config = MeshConfig.from_args("router", ns)
    setup_logging(config.log_level, json_output=config.log_json, name="router", instance=config.instance)

    async def serve() -> None:
        async with ServiceRuntime(config) as rt:
            await build(rt, cold_start_timeout=ns.cold_start_timeout, http_host=ns.http_host,
                        prefix_affinity=ns.prefix_affinity, failover_timeout=ns.failover_timeout,
                        http_port=ns.http_port, http_timeout=ns.http_timeout, grpc_timeout=ns.grpc_timeout,
                        queue_timeout=ns.queue_timeout, pipeline_plugins=ns.pipeline_plugins,
                        batch_concurrency=ns.batch_concurrency, batch_yield=ns.batch_yield,
                        strict_fields=ns.strict_fields)
            await rt.wait()

    return run_service(serve)
