"""Pipelines in the router: which model names are pipelines, and the services their steps call.

A registered version of `format: pipeline` is run here, by the executor
(`maas.pipelines.executor`), when a client asks for its name. Its steps call models through
this router's Forwarder as the client (the client's key must allow the models the steps
call; their tokens are metered to the client's tenant), so retries, stream migration and
limits apply to every step as to a direct call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from maas.mesh.aio import stop_task
from maas.mesh.artifacts import ARTIFACT
from maas.mesh.captures import CaptureStore
from maas.mesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    PermissionDenied,
)
from maas.mesh.events import EventBus
from maas.pipelines import package, slo
from maas.pipelines.executor import PipelineInput, Run, StepContext
from maas.pipelines.index import Index
from maas.pipelines.plugins import PluginHost
from maas.pipelines.spec import PipelineSpec, parse
from maas.services.router import replay
from maas.v1 import common_pb2, inference_pb2, mesh_pb2, registry_pb2

if TYPE_CHECKING:
    from maas.services.router.forward import Forwarder
    from maas.services.router.tenants import Caller

log = logging.getLogger(__name__)

RESOLVE_TTL = 2.0  # seconds a name's version is reused before the registry is asked again
MAX_CACHED = 1024  # names whose version is kept (least recently used first out)
DEFAULT_MAX_TOKENS = 256  # a generate step that sets no max_tokens


STEP_SECONDS = Histogram(
    "maas_pipeline_step_seconds", "Time from a pipeline step's start to its value (a stream: its first chunk).",
    ["pipeline", "version", "step", "kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
STEPS = Counter("maas_pipeline_steps_total", "Pipeline steps that ran, by outcome (ok, skipped, fallback, failed).",
                ["pipeline", "version", "step", "kind", "status"])
TTFT_SHARE = Histogram(
    "maas_pipeline_step_ttft_share", "The share of a pipeline answer's time to first chunk spent in one step "
    "(steps done before the first chunk).", ["pipeline", "version", "step"],
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0))
REQUESTS = Counter("maas_pipeline_requests_total", "Pipeline requests by outcome (a gRPC status name; CANCELLED: "
                   "the client went away).", ["pipeline", "version", "code"])
TTFT = Histogram("maas_pipeline_ttft_seconds", "Time from a pipeline request's start to its answer's first chunk.",
                 ["pipeline", "version"],
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
DEADLINE_SLACK = 0.05  # seconds: a cancellation this close to the run's deadline is the deadline's
REPORT_SECONDS = 1.0  # how often a router reports its deployed pipelines' outcomes (for canary judging)


@dataclass(frozen=True)
class Found:
    """The pipeline a request names: its version, its spec, and the deployment it came
    through ("" when asked for by its registered name)."""

    version: registry_pb2.ModelVersion
    spec: PipelineSpec
    deployment: str = ""
    package: Path | None = None  # where its package's files are (None: it is its YAML alone)

    @property
    def ref(self) -> str:
        return f"{self.version.name}@{self.version.version}"


PLUGIN_POLICIES = ("off", "platform", "all")


class PipelineCatalog:
    def __init__(self, forwarder: Forwarder, plugins: str = "platform") -> None:
        """`plugins`: whose pipelines may run plugin code (in a process of its own,
        `maas.pipelines.plugins`): nobody's, the platform's (the default), or every tenant's."""
        if plugins not in PLUGIN_POLICIES:
            raise ValueError(f"plugins must be one of {', '.join(PLUGIN_POLICIES)}, not {plugins!r}")
        self.plugin_policy = plugins
        self.plugins = PluginHost()
        self._packages: dict[str, Path] = {}  # by sha256: where a package's files were written
        self.pool = forwarder.pool
        self._versions: collections.OrderedDict[str, tuple[float, registry_pb2.ModelVersion | None]] = \
            collections.OrderedDict()
        self._specs: collections.OrderedDict[str, PipelineSpec] = collections.OrderedDict()  # by sha256
        self._indexes: collections.OrderedDict[str, Index] = collections.OrderedDict()  # by sha256
        self._loading: dict[str, asyncio.Future[Index]] = {}
        # outcomes of deployed pipelines with an SLO since the last report: (deployment, version) -> step -> counts
        self._tally: dict[tuple[str, str], dict[str, slo.Counts]] = {}
        self._reporter: asyncio.Task[None] | None = None
        self.captures: CaptureStore | None = None  # set once NATS is up (`start_reporting`)

    def maybe(self, model: str) -> bool:
        """Could `model` name a pipeline? True for a deployment of a pipeline; False (and
        nothing asked) for a model's deployment, a model with ready replicas, or a name the
        registry does not have."""
        name, _, version = model.partition("@")
        dep = self.pool.deployments.items.get(name)
        if not version and dep is not None:
            return dep.format == "pipeline"
        return name in self.pool.models.items and not self.pool.ready(model)

    async def find(self, model: str) -> Found | None:
        """The pipeline `model` names ("name", "name@version", or a pipeline deployment's name,
        whose canary gets its weight's share of requests), or None for anything else. Call
        it for an authenticated caller only. Costs nothing for a model's deployment, a model
        with ready replicas or an unknown name; a registered model that is not deployed
        costs a registry lookup every RESOLVE_TTL (a registry that does not answer makes it
        "not a pipeline": the request then fails as it would have)."""
        if not self.maybe(model):
            return None
        dep = self.pool.deployments.items.get(model)
        if dep is not None:  # a pipeline deployment: its version, or its canary's
            ref = dep.resolved_version
            if dep.traffic and random.uniform(0, 100) < dep.traffic[0].weight:
                ref = dep.traffic[0].model
            found = await self.lookup(ref)
            if found is None:
                raise FailedPrecondition(f"deployment {model!r} runs pipeline {ref}, which cannot be read now")
            return Found(found.version, found.spec, deployment=model, package=found.package)
        return await self.lookup(model)

    async def lookup(self, model: str) -> Found | None:
        """The registered pipeline `model` names ("name", "name@version"), or None."""
        now = time.monotonic()
        cached = self._versions.get(model)
        if cached is not None and cached[0] > now:
            self._versions.move_to_end(model)
            found = cached[1]
        else:
            try:
                found = await self.pool.registry.resolve(model, timeout=5.0)
            except NotFound:
                found = None
            except MaasError as e:
                log.warning("cannot ask the registry whether %s is a pipeline: %s", model, e.message)
                return None
            self._versions[model] = (now + RESOLVE_TTL, found)
            while len(self._versions) > MAX_CACHED:
                self._versions.popitem(last=False)
        if found is None or found.format != "pipeline":
            return None
        sha = found.source.removeprefix(ARTIFACT)
        spec = self._specs.get(sha)
        if spec is None:
            data = b"".join([chunk.data async for chunk in self.pool.registry.download(sha, timeout=30.0)])
            spec = await asyncio.to_thread(self._load, sha, data, f"{found.name}@{found.version}")
            self._specs[sha] = spec
            while len(self._specs) > MAX_CACHED:
                self._specs.popitem(last=False)
        return Found(found, spec, package=self._packages.get(sha))

    def _load(self, sha: str, data: bytes, source: str) -> PipelineSpec:
        """Parse a pushed pipeline; a package's files go to a directory of their own (its
        plugins are loaded from there, by the plugin process)."""
        pack = package.read(data)
        spec = parse(pack.spec, source=source, files=pack.files if pack.files else None)
        if pack.files and sha not in self._packages:
            where = Path(self.plugins.home) / "packages" / sha
            package.extract(pack, where)
            self._packages[sha] = where
        return spec

    # ---- what runs did: metrics, and reports for canary judging ----------------------------

    def record(self, found: Found, run: Run, error: BaseException | None) -> None:
        """Per-step metrics of a finished run; for a deployed pipeline with an SLO, its
        outcome per objective too (reported to the scheduler)."""
        name, version = found.version.name, str(found.version.version)
        code = "OK" if error is None else (
            "CANCELLED" if isinstance(error, asyncio.CancelledError | GeneratorExit) else
            error.code.name if isinstance(error, MaasError) else "INTERNAL")
        if code == "CANCELLED" and run.deadline is not None and \
                asyncio.get_running_loop().time() >= run.deadline - DEADLINE_SLACK:
            # the caller's deadline cancelled it (the HTTP API's, gRPC's): it overran, it did not go away
            code = "DEADLINE_EXCEEDED"
            error = DeadlineExceeded(f"pipeline {found.ref} overran its request's deadline")
        REQUESTS.labels(name, version, code).inc()
        ttft = run.first_chunk_ms
        if ttft is not None:
            TTFT.labels(name, version).observe(ttft / 1000)
        timings = run.timings()
        for t in timings:
            if t.status in ("running", "cancelled"):  # ended with the request, undecided
                continue
            STEPS.labels(name, version, t.step, t.kind, t.status).inc()
            STEP_SECONDS.labels(name, version, t.step, t.kind).observe(t.ms / 1000)
            if ttft and t.start_ms + t.ms <= ttft:
                TTFT_SHARE.labels(name, version, t.step).observe(min(1.0, t.ms / ttft))
        if run.record and self.captures is not None and code != "CANCELLED":
            value = run.outputs.get(found.spec.output)
            answer = value if isinstance(value, str) or value is None else str(value)
            self.captures.save(run.tenant, name, replay.record(run, found, run.request_id, answer, error))
        objectives = found.spec.slo
        if not found.deployment or objectives is None or code == "CANCELLED":
            return  # a client that went away says nothing about the version
        tally = self._tally.setdefault((found.deployment, found.ref), {})
        slo.count(objectives, slo.WHOLE, error is not None, ttft if ttft is not None else run.elapsed_ms(),
                  tally.setdefault(slo.WHOLE, slo.Counts()))
        for t in timings:
            if t.status not in ("running", "cancelled") and objectives.objective(t.step) is not None:
                slo.count(objectives, t.step, t.status != "ok", t.ms, tally.setdefault(t.step, slo.Counts()))

    def start_reporting(self, events: EventBus, router: str) -> None:
        """Report deployed pipelines' outcomes (canary judging) and store captures, on NATS."""
        self.captures = CaptureStore(events)
        self._reporter = asyncio.create_task(self._report(events, router), name="pipeline-reports")

    async def close(self) -> None:
        await stop_task(self._reporter)
        if self.captures is not None:
            await self.captures.close()
        await self.plugins.close()

    async def _report(self, events: EventBus, router: str) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            tally, self._tally = self._tally, {}
            if not tally:
                continue
            report = mesh_pb2.PipelineReport(router=router)
            for (deployment, version), steps in tally.items():
                report.versions.add(deployment=deployment, version=version, objectives=[
                    mesh_pb2.ObjectiveStats(step=step, requests=c.requests, errors=c.errors, slow=c.slow,
                                            max_ms=c.max_ms) for step, c in steps.items()])
            await events.publish_pipeline(report)


    async def index(self, ref: str) -> Index:
        """The vector index `ref` names ("name", "name@version"), loaded once per version."""
        now = time.monotonic()
        cached = self._versions.get(f"index:{ref}")
        if cached is not None and cached[0] > now and cached[1] is not None:
            version = cached[1]
        else:
            version = await self.pool.registry.resolve(ref, timeout=5.0)
            self._versions[f"index:{ref}"] = (now + RESOLVE_TTL, version)
        if version.format != "index":
            raise FailedPrecondition(f"{ref!r} is not a vector index (it is a {version.format} model)")
        sha = version.source.removeprefix(ARTIFACT)
        index = self._indexes.get(sha)
        if index is not None:
            return index
        loading = self._loading.get(sha)
        if loading is None:  # one download per version, however many requests wait for it
            loading = self._loading[sha] = asyncio.ensure_future(self._load_index(sha))
        try:
            return await asyncio.shield(loading)
        finally:
            if loading.done():
                self._loading.pop(sha, None)

    async def _load_index(self, sha: str) -> Index:
        data = b"".join([chunk.data async for chunk in self.pool.registry.download(sha, timeout=300.0)])
        index = await asyncio.to_thread(Index.from_archive, data)
        self._indexes[sha] = index
        while len(self._indexes) > 16:  # the least recently loaded go first
            self._indexes.popitem(last=False)
        return index


def start(forwarder: Forwarder, caller: Caller, request: inference_pb2.GenerateRequest, found: Found,
          timeout: float | None, catalog: PipelineCatalog | None = None,
          observe: bool = True) -> tuple[Run, MeshServices]:
    """A run of `spec` for `request` (its chat, or its prompt as one user message). The
    caller must see the pipeline (its tenant's or the platform's) and its key must allow
    its name; each step's model call is then admitted as the caller's own request (the
    key's limits and model list apply per step; the pipeline takes no slot of its own)."""
    gate = forwarder.gate
    principal = gate.identify(caller) if gate is not None else None
    if gate is not None and principal is not None:
        if not gate.visible(principal, request.model):
            raise NotFound(gate.not_found(request.model), field="model")
        if not gate.may_use(principal, request.model):
            raise PermissionDenied(f"this key may not use model {request.model!r}", field="model")
    messages = [{"role": m.role, "content": m.content} for m in request.messages] or \
        [{"role": "user", "content": request.prompt}]
    services = MeshServices(forwarder, caller, request.request_id, catalog, found)
    services.service_class = request.service_class  # each step's model call runs at the request's class
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    run = Run(found.spec, services, PipelineInput(messages), deadline=deadline,
              tenant=principal.tenant if principal is not None else "", name=found.ref)
    run.request_id = request.request_id
    if catalog is not None and observe:  # (a replay's rerun is neither measured nor captured)
        run.on_done.append(functools.partial(catalog.record, found))
        run.record = catalog.captures is not None and replay.should_capture(found, run.tenant)
    return run, services


def finish(run: Run) -> common_pb2.FinishReason:
    """The finish reason of a pipeline's answer."""
    return common_pb2.FINISH_REASON_CONTENT_FILTER if run.filtered else common_pb2.FINISH_REASON_STOP


class MeshServices:
    """What the steps of one request call: models through the router's Forwarder, as the
    client. Counts the tokens of every generate step (the answer's usage; the prompt tokens
    of a stream a guard stopped are not known, as its last chunk never came)."""

    def __init__(self, forwarder: Forwarder, caller: Caller, request_id: str,
                 catalog: PipelineCatalog | None = None, found: Found | None = None) -> None:
        self.forwarder, self.caller, self.request_id = forwarder, caller, request_id
        self.catalog, self.found = catalog, found
        self.usage = common_pb2.Usage()
        self.service_class = ""  # the class every generate step asks for ("": the key's own)
        self._calls = 0

    def _timeout(self, deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())

    async def generate(self, model: str, messages: list[dict[str, str]], params: dict[str, Any], *,
                       deadline: float | None) -> AsyncIterator[str]:
        self._calls += 1
        sampling = common_pb2.SamplingParams(max_tokens=int(params.get("max_tokens", DEFAULT_MAX_TOKENS)))
        for key in ("temperature", "top_p"):
            if key in params:
                setattr(sampling, key, float(params[key]))
        if "seed" in params:
            sampling.seed = int(params["seed"])
        stop = params.get("stop")
        if stop:
            sampling.stop.extend([stop] if isinstance(stop, str) else [str(s) for s in stop])
        request = inference_pb2.GenerateRequest(
            request_id=f"{self.request_id}.{self._calls}", model=model, params=sampling,
            service_class=self.service_class,
            messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
        # a prompt made from retrieved documents goes where the same documents went before
        # (prefix-cache affinity on them, as a session would), else by its own prefix
        stream = self.forwarder.stream(request, self._timeout(deadline), self.caller,
                                       session=str(params.get("affinity", "")))
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for chunk, _ in stream:
                # counted as they come: a guard may stop the stream before its last chunk
                self.usage.completion_tokens += len(chunk.token_ids)
                if chunk.finish_reason:
                    self.usage.prompt_tokens += chunk.usage.prompt_tokens
                if chunk.text:
                    yield chunk.text

    async def embed(self, model: str, texts: list[str], *, deadline: float | None) -> list[list[float]]:
        reply = await self.forwarder.embed(inference_pb2.EmbedRequest(model=model, inputs=texts),
                                           self._timeout(deadline), self.caller)
        return [list(e.values) for e in reply.data]

    async def retrieve(self, index: str, query: Any, k: int, *, deadline: float | None) -> list[dict[str, Any]]:
        """The `k` documents of `index` nearest `query` (text, embedded by the model version
        that built the index; or a vector)."""
        if self.catalog is None:
            raise FailedPrecondition("this router reads no vector indexes")
        found = await self.catalog.index(index)
        if isinstance(query, str):
            query = (await self.embed(found.embed_model, [query], deadline=deadline))[0]
        if not isinstance(query, list) or not all(isinstance(x, int | float) for x in query):
            raise InvalidArgument(f"a retrieve step's input is text or a vector, not {type(query).__name__}")
        return found.search(query, k)

    def plugin(self, ref: str) -> Any:
        """`ref` of this pipeline's package, run in the plugin process, if this router lets
        the pipeline's owner run plugins."""
        found, catalog = self.found, self.catalog
        if found is None or catalog is None or found.package is None:
            raise FailedPrecondition(f"plugin {ref}: the pipeline was pushed without its package (push the "
                                     "directory holding pipeline.yaml and the plugin's module)")
        policy = catalog.plugin_policy
        if policy == "off":
            raise FailedPrecondition(f"plugin {ref}: this router runs no plugins (--pipeline-plugins off)")
        if policy == "platform" and found.version.owner:
            raise FailedPrecondition(f"plugin {ref}: {found.ref} belongs to tenant {found.version.owner!r}, and this "
                                     "router runs the plugins of the platform's pipelines only "
                                     "(--pipeline-plugins platform)")
        return _RemotePlugin(catalog.plugins, found, ref)


class _RemotePlugin:
    """A plugin of a pushed pipeline, called in the plugin process (`maas.pipelines.plugins`)."""

    def __init__(self, host: PluginHost, found: Found, ref: str) -> None:
        self.host, self.found, self.ref = host, found, ref

    async def run(self, ctx: StepContext, value: Any) -> Any:
        assert self.found.package is not None
        return await self.host.call(self.found.package, self.found.version.source.removeprefix(ARTIFACT), self.ref,
                                    step=ctx.step, tenant=ctx.tenant, config=ctx.config, timeout=ctx.remaining(),
                                    value=value, services=ctx.services, deadline=ctx.deadline)

    async def stream(self, ctx: StepContext, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        assert self.found.package is not None
        async for chunk in self.host.stream(self.found.package, self.found.version.source.removeprefix(ARTIFACT),
                                            self.ref, chunks, step=ctx.step, tenant=ctx.tenant, config=ctx.config,
                                            timeout=ctx.remaining(), services=ctx.services, deadline=ctx.deadline):
            yield chunk


__all__ = ["Found", "MeshServices", "PipelineCatalog", "finish", "start"]
