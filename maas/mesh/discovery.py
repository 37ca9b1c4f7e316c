"""Get-then-watch mirrors of etcd prefixes.

A `PrefixMirror` lists a prefix, then watches it from the listed revision + 1, so no
change between the two is lost. If the watch breaks (etcd restarted, revision compacted)
it lists again and reports the difference as ordinary changes. Readers see a dict of
decoded values and can wait for a condition on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Generic, TypeVar

from google.protobuf.message import Message

from maas.mesh.aio import wait_event
from maas.mesh.etcd import EtcdSession

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Listener = Callable[[str, "M | None", "M | None"], None]


class PrefixMirror(Generic[M]):
    """A live, decoded copy of every key under `prefix` (keyed by the part after it)."""

    def __init__(self, session: EtcdSession, prefix: bytes, message_type: type[M]) -> None:
        self.session = session
        self.prefix = prefix
        self.message_type = message_type
        self.items: dict[str, M] = {}
        self._listeners: list[Listener[M]] = []
        self._changed = asyncio.Condition()
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: Listener[M]) -> None:
        """Called as listener(key, old, new) for every change; old/new None for create/delete."""
        self._listeners.append(listener)

    async def caught_up(self, expected: dict[str, M | None], timeout: float) -> bool:
        """Wait until the mirror holds `expected` (key -> value; None: absent), e.g. after our
        own write, so that the next decision is not made from a copy that predates it.
        False on time-out."""
        missing = {k for k, v in expected.items() if self.items.get(k) != v}
        if not missing:
            return True
        done = asyncio.Event()

        def listener(key: str, old: M | None, new: M | None) -> None:
            if key in missing and new == expected[key]:
                missing.discard(key)
                if not missing:
                    done.set()

        self._listeners.append(listener)
        try:
            return await wait_event(done, timeout)
        finally:
            self._listeners.remove(listener)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mirror {self.prefix.decode()}")
        await self._synced.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> PrefixMirror[M]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _decode(self, raw: bytes) -> M | None:
        msg = self.message_type()
        try:
            msg.ParseFromString(raw)
        except Exception:
            log.warning("ignoring undecodable value under %s", self.prefix.decode())
            return None
        return msg

    def _apply(self, key: str, new: M | None) -> None:
        old = self.items.get(key)
        if new is None:
            if key not in self.items:
                return
            del self.items[key]
        else:
            if old is not None and old == new:
                return
            self.items[key] = new
        for listener in self._listeners:
            try:
                listener(key, old, new)
            except Exception:
                log.exception("mirror listener failed")

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        delay = 0.2
        client = self.session.client
        while True:
            try:
                pairs, revision = await self.session.get_prefix(self.prefix)
                fresh: dict[str, M] = {}
                for raw_key, raw in pairs:
                    value = self._decode(raw)
                    if value is not None:
                        fresh[raw_key[len(self.prefix):].decode()] = value
                for gone in set(self.items) - set(fresh):
                    self._apply(gone, None)
                for name, value in fresh.items():
                    self._apply(name, value)
                self._synced.set()
                await self._notify()
                watch = await client.watch_prefix(self.prefix, start_revision=revision + 1)
                delay = 0.2
                try:
                    async for event in watch:
                        name = event.kv.key[len(self.prefix):].decode()
                        self._apply(name, None if event.kind == "DELETE" else self._decode(event.kv.value))
                        await self._notify()
                finally:
                    with contextlib.suppress(Exception):
                        await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("watch on %s broke (%s); re-listing", self.prefix.decode(), type(e).__name__)
            await asyncio.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 2.0)

    async def wait_for(self, predicate: Callable[[dict[str, M]], bool], timeout: float | None = None) -> bool:
        """Wait until predicate(items) holds; False on timeout."""
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.items))
        try:
            await asyncio.wait_for(_wait(), timeout)
            return True
        except TimeoutError:
            return False
