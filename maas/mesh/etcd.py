"""One etcd session per process: a lease, its keepalive, and the keys hung off it.

Every key a process owns (its service record, a worker's devices and replicas) is put
through `put_owned`, which remembers it. If the lease is lost (etcd was down longer than
the TTL, or the process was paused), the keepalive loop grants a new lease and puts every
owned key again, so the process re-appears in the mesh without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import aetcd
import aetcd.exceptions

from maas.mesh.aio import within
from maas.mesh.config import MeshConfig, parse_host_port, redact, url_credentials
from maas.mesh.errors import NotFound, StartupError, Unavailable
from maas.mesh.keys import Keys

log = logging.getLogger(__name__)

EtcdError = aetcd.exceptions.ClientError


class EtcdSession:
    def __init__(self, config: MeshConfig, *, call_timeout: float = 5.0) -> None:
        self.config = config
        self.keys = Keys(config.prefix)
        host, port = parse_host_port(config.etcd, 2379)
        user, password = url_credentials(config.etcd)
        self.client = aetcd.Client(host=host, port=port, username=user, password=password, timeout=call_timeout)
        self.lease_id: int | None = None
        self._owned: dict[bytes, bytes] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._closed = False
        self.reachable = True  # the last lease keepalive (or grant) succeeded: `maas_etcd_up`
        # run after the lease was lost and a new one granted, before the owned keys are put
        # again: what was true when they were put may not be any more (see `forget_owned`)
        self.before_reregister: list[Callable[[], Awaitable[None]]] = []

    async def __aenter__(self) -> EtcdSession:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and grant the lease, or raise StartupError within startup_timeout."""
        deadline = asyncio.get_running_loop().time() + self.config.startup_timeout
        delay = 0.1
        while True:
            try:
                await self._grant()
                break
            except (TimeoutError, EtcdError, OSError) as e:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise StartupError(
                        f"cannot reach etcd at {redact(self.config.etcd)} after {self.config.startup_timeout:.0f}s "
                        f"({type(e).__name__}); start etcd or pass --etcd / MAAS_ETCD") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name="etcd-keepalive")

    async def _grant(self) -> None:
        lease = await within(self.client.lease(self.config.lease_ttl), self.config.lease_ttl)
        self.lease_id = lease.id
        log.debug("etcd lease %x granted (ttl %ss)", lease.id, self.config.lease_ttl)

    async def _keepalive_loop(self) -> None:
        interval = self.config.lease_ttl / 3
        registered = True  # every owned key is held under the current lease
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                if registered:
                    reply = await within(self.client.refresh_lease(self.lease_id), interval * 2)
                    self.reachable = True
                    if reply is not None and reply.TTL > 0:
                        continue
                    log.warning("etcd lease %x expired; re-registering", self.lease_id or 0)
                    registered = False
                # a new lease, then every owned key again; only a complete pass counts
                await self._grant()
                for hook in self.before_reregister:
                    await hook()
                for key, value in list(self._owned.items()):
                    await self.client.put(key, value, lease=self.lease_id)
                registered = True
                log.info("re-registered %d keys under lease %x", len(self._owned), self.lease_id or 0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd down: keep trying; the lease may still be alive when it returns
                self.reachable = False
                log.warning("etcd keepalive failed: %s", type(e).__name__)
                await asyncio.sleep(random.uniform(0, interval))

    async def put_owned(self, key: bytes, value: bytes) -> None:
        """Put a key that lives and dies with this process."""
        self._owned[key] = value
        await self.client.put(key, value, lease=self.lease_id)

    def forget_owned(self, key: bytes) -> None:
        """Stop holding `key` without a write: it went with the lease, and must not come back."""
        self._owned.pop(key, None)

    async def delete_owned(self, key: bytes) -> None:
        self._owned.pop(key, None)
        await self.client.delete(key)

    async def get_prefix(self, prefix: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
        """(key, value) pairs under prefix, and the revision they were read at."""
        rng = await self.client.get_prefix(prefix)
        return [(kv.key, kv.value) for kv in rng], rng.header.revision if rng.header else 0

    async def get(self, key: bytes) -> bytes | None:
        got = await self.client.get(key)
        return got.value if got is not None else None

    async def close(self) -> None:
        """Revoke the lease (every owned key disappears at once) and disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if self.lease_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.revoke_lease(self.lease_id), 2)
        with contextlib.suppress(Exception):
            await self.client.close()


class Record(Protocol):
    """A protobuf message stored as one etcd value, stamped with the time of each write."""

    updated_ms: int

    def SerializeToString(self) -> bytes: ...  # noqa: N802 - protobuf's name
    def CopyFrom(self, other: Any) -> None: ...  # noqa: N802


R = TypeVar("R", bound=Record)
MAX_TRIES = 20


async def update_record(session: EtcdSession, key: bytes, parse: Callable[[bytes], R], mutate: Callable[[R], R | None],
                        *, what: str, now_ms: Callable[[], int],
                        fenced: Callable[[list[Any], list[Any]], Awaitable[bool]] | None = None,
                        compare: Callable[[Any], list[Any]] | None = None) -> R | None:
    """Apply `mutate` (the current record in, the new one or None out) to the record at `key`
    until the write wins the compare on its revision, so concurrent writers never lose each
    other's changes: the loser reads again and re-applies its change to the new value.

    Returns the record as written (the current one when `mutate` changed nothing), or None
    when `mutate` declined or the write was refused: by `fenced` (a leader's fenced
    transaction: the caller no longer leads) or by the extra `compare` conditions (built from
    the transaction helper, and checked even when there is nothing to write). NotFound
    (naming `what`) if the record is gone."""
    client = session.client
    tx = client.transactions
    for _ in range(MAX_TRIES):
        got = await client.get(key)
        if got is None:
            raise NotFound(f"{what} does not exist")
        current = parse(got.value)
        new = mutate(parse(got.value))
        if new is None:
            return None
        if new == current:  # nothing to write; still None when a condition no longer holds
            if compare is not None:
                held, _ = await client.transaction(compare=compare(tx), success=[], failure=[])
                if not held:
                    return None
            return current
        new.updated_ms = now_ms()
        conditions = [tx.mod(key) == got.mod_revision, *(compare(tx) if compare is not None else [])]
        ops = [tx.put(key, new.SerializeToString())]
        if fenced is not None:
            if await fenced(ops, conditions):
                return new
        else:
            ok, _ = await client.transaction(compare=conditions, success=ops, failure=[])
            if ok:
                return new
        got_again = await client.get(key)
        if (fenced is not None or compare is not None) and got_again is not None \
                and got_again.mod_revision == got.mod_revision:
            return None  # the record did not change, so the fence or a condition refused
    raise Unavailable(f"{what} keeps changing; try again")


class LeaderElection:
    """Leader election on one key held under the session's lease.

    `campaign()` returns once this process is the leader. Leader-only writes go through
    `fenced_txn`, which compares the election key's create revision, so a process that
    lost leadership (lease expired while it was paused) cannot write.
    """

    def __init__(self, session: EtcdSession, name: str, value: bytes) -> None:
        self.session = session
        self.key = session.keys.election(name)
        self.value = value
        self.revision = 0  # create revision of our election key while we lead

    async def campaign(self) -> None:
        client, tx = self.session.client, self.session.client.transactions
        while True:
            try:
                await client.transaction(
                    compare=[tx.create(self.key) == 0],
                    success=[tx.put(self.key, self.value, lease=self.session.lease_id)],
                    failure=[])
                # Whether or not our put won just now, the key tells who leads: if it hangs
                # off our lease we lead (also after a retry whose first attempt did win).
                got = await client.get(self.key)
                if got is not None and got.lease == self.session.lease_id:
                    self.revision = got.create_revision
                    return
                if got is not None:
                    await self._wait_for_vacancy(got.mod_revision)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("election on %s failed: %s", self.key.decode(), type(e).__name__)
            await asyncio.sleep(random.uniform(0.2, 0.6))

    async def _wait_for_vacancy(self, revision: int) -> None:
        """Return when the leader's key is deleted (or after a while, to look again)."""
        watch = await self.session.client.watch(self.key, start_revision=revision + 1)
        try:
            async with asyncio.timeout(self.session.config.lease_ttl * 2):
                async for event in watch:
                    if event.kind == "DELETE":
                        return
        except TimeoutError:
            return
        finally:
            await watch.cancel()

    async def resign(self) -> None:
        """Give up leadership (best effort): delete our key if it is still ours."""
        tx = self.session.client.transactions
        with contextlib.suppress(Exception):
            await self.session.client.transaction(compare=[tx.create(self.key) == self.revision],
                                                  success=[tx.delete(self.key)], failure=[])

    async def is_leader(self) -> bool:
        got = await self.session.client.get(self.key)
        return got is not None and got.create_revision == self.revision

    async def fenced_txn(self, success: list[Any], compare: list[Any] | None = None) -> bool:
        """Run `success` ops only while we still hold leadership (and `compare` holds)."""
        tx = self.session.client.transactions
        ok, _ = await self.session.client.transaction(
            compare=[tx.create(self.key) == self.revision, *(compare or [])],
            success=success, failure=[])
        return bool(ok)
