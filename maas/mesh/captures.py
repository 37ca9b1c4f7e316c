"""Pipeline captures in JetStream, for `maas pipeline replay` (docs/pipelines.md).

A capture is one request of a pipeline as a JSON object (what `maas.services.router.replay`
records). They are messages on `maas.capture.<mesh>.<tenant>.<pipeline>` in the stream
MAAS_CAPTURES (`<mesh>`: `maas.mesh.events.mesh_token`, so meshes sharing a NATS server
replay only their own): the newest 1,000 per pipeline and tenant, for at most 7 days,
512 MiB in all (the oldest go first, whoever's they are, whichever mesh's); a capture over
900 KiB keeps no step outputs. Storing is lossy by design: a capture that cannot be stored
is dropped and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import nats.js.api as js_api

from maas.mesh.events import EventBus, OwnStream, mesh_token, stored

log = logging.getLogger(__name__)

STREAM = "MAAS_CAPTURES"
PER_PIPELINE = 1000  # captures kept per (tenant, pipeline)
MAX_AGE = 7 * 24 * 3600.0
MAX_CAPTURE_BYTES = 900 * 1024  # one capture (NATS takes at most 1 MiB a message by default)


def subject(prefix: str, tenant: str, pipeline: str) -> str:
    """The subject of a tenant's captures of a pipeline in the mesh under etcd `prefix`.
    Names may hold dots, which separate subject tokens, so each name is escaped ("." ->
    "%2E", "%" -> "%25"): "acme"/"eu.bot" and "acme.eu"/"bot" must not share a subject."""
    def token(name: str) -> str:
        return name.replace("%", "%25").replace(".", "%2E")

    return f"maas.capture.{mesh_token(prefix)}.{token(tenant) if tenant else '_platform'}.{token(pipeline)}"


class CaptureStore:
    """Captures in JetStream (lossy by design: a capture that cannot be stored is dropped)."""

    def __init__(self, events: EventBus) -> None:
        self.events = events
        self.stream = OwnStream(events, js_api.StreamConfig(
            name=STREAM, subjects=["maas.capture.>"], max_age=MAX_AGE, max_msgs_per_subject=PER_PIPELINE,
            max_bytes=512 * 1024 * 1024, discard=js_api.DiscardPolicy.OLD, storage=js_api.StorageType.FILE),
            "captures are unavailable")
        self._saving: set[asyncio.Task[None]] = set()

    def save(self, tenant: str, pipeline: str, capture: dict[str, Any]) -> None:
        data = json.dumps(capture, ensure_ascii=False).encode()
        if len(data) > MAX_CAPTURE_BYTES:  # a long chat with big step outputs: keep the input and answer
            for step in capture["steps"]:
                step["output"] = "[cut: the capture was too large]"
            data = json.dumps(capture, ensure_ascii=False).encode()
        if len(data) > MAX_CAPTURE_BYTES:
            log.warning("a capture of %s was dropped: %d bytes, more than %d", pipeline, len(data), MAX_CAPTURE_BYTES)
            return
        task = asyncio.ensure_future(self._save(subject(self.events.config.prefix, tenant, pipeline), data))
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    async def _save(self, where: str, data: bytes) -> None:
        try:
            await (await self.stream.js()).publish(where, data)
        except Exception as e:
            log.warning("a pipeline capture was dropped: %s", e)

    async def read(self, tenant: str, pipeline: str, version: str, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` captures of `version`, newest first."""
        found: list[dict[str, Any]] = []
        where = subject(self.events.config.prefix, tenant, pipeline)
        async for msg in stored(await self.stream.js(), STREAM, where):
            with contextlib.suppress(ValueError):
                capture = json.loads(msg.data)
                if capture.get("version") == version:
                    found.append(capture)
        return found[::-1][:limit]

    async def close(self) -> None:
        if self._saving:
            await asyncio.gather(*self._saving, return_exceptions=True)


__all__ = ["CaptureStore", "subject"]
