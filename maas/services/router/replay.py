"""Capture and replay of pipeline requests.

A pipeline that declares `capture: {rate: R}` has that share of its owner's own requests
captured by the router that runs them (opt-in by the owner, and never another tenant's
requests): the input, each step's output (a stream's whole text), its status and time, the
answer, and the seeds its sampling steps used (each message, output and answer cut at
64 KiB). They are stored by the mesh runtime's `maas.mesh.captures.CaptureStore`.

`Pipelines.Replay` (`maas pipeline replay NAME@NEW --against NAME@OLD`) reruns the caller's
captures of OLD through NEW with the same inputs and seeds, and says per request and step
what changed: status, time and output. Same seeds make sampling repeat, so a step whose
inputs did not change gives the same output, and what differs is what the new version
changed (or a model that changed under it).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from maas.mesh.authz import caller
from maas.mesh.errors import InvalidArgument, MaasError, NotFound, Unavailable
from maas.mesh.logs import new_request_id
from maas.pipelines.executor import PipelineInput, Run
from maas.v1 import inference_pb2, pipelines_pb2, pipelines_pb2_grpc

if TYPE_CHECKING:
    from maas.services.router.forward import Forwarder
    from maas.services.router.pipelines import Found, PipelineCatalog


MAX_OUTPUT_CHARS = 64 * 1024  # of one step's output, one message, the answer in a capture
PREVIEW = 200
DEFAULT_LIMIT, MAX_LIMIT = 20, 500
RERUN_SECONDS = 120.0         # one replayed request's deadline


def should_capture(found: Found, tenant: str) -> bool:
    """Whether to record this request: the pipeline asks for captures, the caller is its
    owner (the platform's pipelines: the admin's requests), and the sample says so."""
    return found.spec.capture > 0 and tenant == found.version.owner and random.random() < found.spec.capture


def _json(value: Any) -> Any:
    """A step's output as JSON (what is not JSON as its text), cut to MAX_OUTPUT_CHARS."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    if len(text) <= MAX_OUTPUT_CHARS:
        return json.loads(text)
    return text[:MAX_OUTPUT_CHARS] + " [cut]"


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_OUTPUT_CHARS else text[:MAX_OUTPUT_CHARS] + " [cut]"


def record(run: Run, found: Found, request_id: str, answer: str | None, error: BaseException | None) -> dict[str, Any]:
    return {
        "request_id": request_id, "time_ms": int(time.time() * 1000), "version": found.ref,
        "messages": [{**m, "content": _cut(str(m.get("content", "")))} for m in run.input.messages],
        "answer": _cut(answer),
        "error": None if error is None else (error.message if isinstance(error, MaasError) else type(error).__name__),
        "seeds": run.seeds,
        "steps": [{"step": t.step, "kind": t.kind, "status": t.status, "ms": round(t.ms, 3),
                   "output": _json(run.outputs.get(t.step))} for t in run.timings()],
    }


def _preview(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= PREVIEW else text[:PREVIEW] + "..."


class PipelinesServicer(pipelines_pb2_grpc.PipelinesServicer):
    def __init__(self, forwarder: Forwarder, catalog: PipelineCatalog) -> None:
        self.forwarder, self.catalog = forwarder, catalog

    async def _pipeline(self, ref: str, what: str) -> Found:
        if not ref:
            raise InvalidArgument(f"{what} must name a pipeline version (name@N)", field=what)
        found = await self.catalog.lookup(ref)
        who = caller()
        gate = self.forwarder.gate
        if found is None or (gate is not None and not gate.visible(who, ref)):
            raise NotFound(f"{ref!r} is not a pipeline you may use", field=what)
        return found

    async def Replay(self, request: pipelines_pb2.ReplayRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pipelines_pb2.ReplayResult]:
        from maas.services.router import pipelines

        new = await self._pipeline(request.pipeline, "pipeline")
        old = await self._pipeline(request.against, "against")
        limit = request.limit or DEFAULT_LIMIT
        if limit > MAX_LIMIT:
            raise InvalidArgument(f"limit must be at most {MAX_LIMIT}, not {limit}", field="limit")
        who = caller()
        if self.catalog.captures is None:
            raise Unavailable("this router stores no captures (it is not connected to NATS yet)")
        for capture in await self.catalog.captures.read(who.tenant, old.version.name, old.ref, limit):
            messages = capture.get("messages") or []
            req = inference_pb2.GenerateRequest(
                request_id=f"replay-{new_request_id()}", model=new.ref,
                messages=[inference_pb2.ChatMessage(role=str(m.get("role", "user")), content=str(m.get("content", "")))
                          for m in messages])
            run, _ = pipelines.start(self.forwarder, who, req, new, RERUN_SECONDS, self.catalog, observe=False)
            run.record, run.seeds = True, {k: int(v) for k, v in (capture.get("seeds") or {}).items()}
            answer, error = None, ""
            try:
                answer = "".join([chunk async for chunk in run.answer()])
            except MaasError as e:
                error = e.message
            yield _compare(capture, run, old, new, answer, error)


def _compare(capture: dict[str, Any], run: Run, old: Found, new: Found, answer: str | None,
             error: str) -> pipelines_pb2.ReplayResult:
    before = {s["step"]: s for s in capture.get("steps", [])}
    after = {t.step: t for t in run.timings()}
    result = pipelines_pb2.ReplayResult(
        request_id=str(capture.get("request_id", "")), captured_ms=int(capture.get("time_ms", 0)),
        question=_preview(PipelineInput(capture.get("messages") or []).text), error=error,
        old_version=old.ref, new_version=new.ref)
    old_answer = capture.get("answer")
    result.same_answer = answer == old_answer and not error
    if not result.same_answer:
        result.old_answer, result.new_answer = _preview(old_answer or ""), _preview(answer or "")
    order = [*[s for s in new.spec.steps if s in after or s in before], *[s for s in before if s not in new.spec.steps]]
    for name in order:
        b, a = before.get(name), after.get(name)
        change = result.steps.add(step=name, old_status=b["status"] if b else "", new_status=a.status if a else "",
                                  old_ms=float(b["ms"]) if b else 0.0, new_ms=a.ms if a else 0.0)
        old_output = b["output"] if b else None
        new_output = _json(run.outputs.get(name)) if a else None
        change.same_output = b is not None and a is not None and old_output == new_output
        if not change.same_output:
            change.old_output, change.new_output = _preview(old_output), _preview(new_output)
    return result


__all__ = ["PipelinesServicer", "record", "should_capture"]
