"""Judging pipeline canaries: promoted or rolled back on the SLO their pipeline declares.

Routers report what each run of a deployed pipeline did, per objective of its SLO, about
every second (`mesh_pb2.PipelineReport` on core NATS). The leader sums the canary's reports
over the SLO's window and, once an objective has its `min_requests`, rolls the canary back
when one is broken, or promotes it when it met them all over `promote_after` requests
(`maas.pipelines.slo.judge`). Either way the deployment's `rollout_note` and an event
(`deployment.rolled_back` / `deployment.promoted`) say which step and figure decided it.

A canary is held to the SLO its own version declares (a version without one is left to
`maas deploy promote|rollback`). Reports are lossy: a lost one delays a verdict, never
makes a wrong one. Only the leader judges and acts, and it checks that it still leads
right before it writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from maas.mesh.artifacts import ARTIFACT
from maas.mesh.clients import RegistryClient
from maas.mesh.errors import MaasError
from maas.mesh.events import EventBus
from maas.pipelines import package, slo
from maas.pipelines.spec import parse
from maas.services.scheduler.deployments import DeploymentStore
from maas.services.scheduler.state import ClusterState
from maas.v1 import mesh_pb2, scheduler_pb2

log = logging.getLogger(__name__)


class CanaryJudge:
    def __init__(self, state: ClusterState, store: DeploymentStore, registry: RegistryClient, events: EventBus,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state, self.store, self.registry, self.events = state, store, registry, events
        self.clock = clock
        self.windows: dict[tuple[str, str], slo.Window] = {}  # (deployment, canary version)
        self._slos: dict[str, slo.Slo | None] = {}  # by version ("name@N"); versions never change

    def observe(self, report: mesh_pb2.PipelineReport) -> None:
        """Add a router's report (only a current canary's figures are kept)."""
        for v in report.versions:
            dep = self.state.deployments.items.get(v.deployment)
            if dep is None or not dep.traffic or dep.traffic[0].model != v.version:
                continue
            window = self.windows.get((v.deployment, v.version))
            if window is None:
                window = self.windows[(v.deployment, v.version)] = slo.Window(clock=self.clock)
            for o in v.objectives:
                window.add(o.step, slo.Counts(o.requests, o.errors, o.slow, o.max_ms))

    async def judge(self, still_leading: Callable[[], Awaitable[bool]]) -> None:
        """Decide every pipeline canary that has enough requests; act on the verdicts."""
        canaries = {(name, dep.traffic[0].model) for name, dep in self.state.deployments.items.items()
                    if dep.format == "pipeline" and dep.traffic}
        for key in list(self.windows):
            if key not in canaries:  # promoted, rolled back, replaced or deleted
                del self.windows[key]
        for name, version in sorted(canaries):
            window = self.windows.get((name, version))
            if window is None:
                continue
            objectives = await self._slo(version)
            if objectives is None:
                continue
            verdict = slo.judge(objectives, window.totals(objectives.window_s), window.total_requests)
            if verdict.action and await still_leading():
                await self._act(name, version, verdict)

    async def _slo(self, version: str) -> slo.Slo | None:
        if version in self._slos:
            return self._slos[version]
        try:
            found = await self.registry.resolve(version)
            sha = found.source.removeprefix(ARTIFACT)
            data = b"".join([chunk.data async for chunk in self.registry.download(sha, timeout=30.0)])
        except MaasError as e:  # the registry: try again on the next pass
            log.warning("cannot read the SLO of %s: %s", version, e.message)
            return None
        try:
            pack = package.read(data)
            objectives = parse(pack.spec, source=version, files=pack.files if pack.files else None).slo
        except Exception as e:  # it was checked at registration; whatever it is, it will not change
            log.warning("cannot read the SLO of %s (%s: %s); its canary is left to maas deploy", version,
                        type(e).__name__, e)
            objectives = None
        self._slos[version] = objectives
        return objectives

    async def _act(self, name: str, version: str, verdict: slo.Verdict) -> None:
        note = f"canary {version} {'rolled back' if verdict.action == 'rollback' else 'promoted'}: {verdict.reason}"

        def change(dep: scheduler_pb2.Deployment) -> bool:
            if not dep.traffic or dep.traffic[0].model != version:
                return False  # changed meanwhile (by hand): that decision stands
            if verdict.action == "promote":
                dep.model = version
            del dep.traffic[:]
            dep.rollout_note = note
            return True

        try:
            updated = await self.store.modify(name, change)
        except MaasError as e:
            log.warning("cannot act on canary %s of %s (%s): %s", version, name, verdict.action, e.message)
            return
        if updated.rollout_note != note:
            return
        self.windows.pop((name, version), None)
        what = "rolled_back" if verdict.action == "rollback" else "promoted"
        log.warning("%s: %s", name, note) if what == "rolled_back" else log.info("%s: %s", name, note)
        self.events.publish("deployment", what, name, f"{name}: {note}", canary=version,
                            model=updated.resolved_version)


__all__ = ["CanaryJudge"]
