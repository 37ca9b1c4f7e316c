"""Prefix-cache blocks, named alike by every engine and by the router (KV-aware routing).

An engine's prefix cache holds the KV of prompt prefixes in blocks of `block_size` tokens.
A block is named by a chained hash: the hash of its tokens keyed by the hash of the block
before it (the first block's key comes from the namespace: "" for the base model), so one
name stands for the whole prefix up to the block's end, as vLLM's block hashes do. Engines
report the blocks they store and drop (`KvEvents`); workers relay the reports on core NATS
(`mesh_pb2.KvEvents` on `maas.kv.<mesh>.<worker>`); the router keeps the set of blocks each
replica holds (`KvIndex`) and sends a prompt where the longest run of its blocks already is.

Engines name blocks here, not with their own hashes: the built-in engine's prefix cache
calls `KvEvents.stored` and `removed` itself, and the vLLM engine translates vLLM's
BlockStored / BlockRemoved events (whose hashes depend on a per-process seed) into these
names, so the router needs one hash function for every engine.

Everything here is lossy by design: a lost report costs a cache hit, never a request. A
router that joins late, or misses reports, is brought up to date by the snapshot each
worker sends every `SNAPSHOT_SECONDS`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from array import array
from collections.abc import Iterable, Sequence

SNAPSHOT_SECONDS = 30.0  # a full list of a replica's blocks this often (late routers, lost reports)
MAX_PENDING = 200_000    # block names buffered between two reports before a snapshot replaces them

STORED, REMOVED, CLEARED = "stored", "removed", "cleared"
Op = tuple[str, list[int]]


def root(namespace: str = "") -> int:
    """The key of a prompt's first block: different adapters never share blocks."""
    return int.from_bytes(hashlib.blake2b(namespace.encode(), digest_size=8, person=b"maas-kv-root").digest(),
                          "little")


def chain(parent: int, block: Sequence[int]) -> int:
    """The name of a block of tokens that follows the block named `parent`."""
    data = array("I", block).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=parent.to_bytes(8, "little")).digest(), "little")


def block_hashes(tokens: Sequence[int], block_size: int, namespace: str = "") -> list[int]:
    """The names of the full blocks of `tokens`, in order (a partial last block has none)."""
    out: list[int] = []
    name = root(namespace)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        name = chain(name, tokens[start:start + block_size])
        out.append(name)
    return out


class KvEvents:
    """What one engine's prefix cache gained and lost since the last report, in order, and
    the blocks it holds now. Written by the engine (any thread), read by the worker's relay.

    `take` hands over the changes since the last call; `snapshot` the whole set as a
    CLEARED then a STORED op. A relay that falls MAX_PENDING names behind gets a snapshot
    instead of the changes it missed.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._pending: list[Op] = []
        self._pending_names = 0
        self._behind = False

    def _add(self, kind: str, names: list[int]) -> None:
        if self._behind:
            return
        self._pending_names += len(names) or 1
        if self._pending_names > MAX_PENDING:
            self._pending.clear()
            self._behind = True
            return
        if self._pending and self._pending[-1][0] == kind and kind != CLEARED:
            self._pending[-1][1].extend(names)
        else:
            self._pending.append((kind, names))

    def stored(self, names: Iterable[int]) -> None:
        with self._lock:
            new = [n for n in names if n not in self._held]
            if new:
                self._held.update(new)
                self._add(STORED, new)

    def removed(self, names: Iterable[int]) -> None:
        with self._lock:
            gone = [n for n in names if n in self._held]
            if gone:
                self._held.difference_update(gone)
                self._add(REMOVED, gone)

    def cleared(self) -> None:
        with self._lock:
            self._held.clear()
            self._pending.clear()
            self._pending_names = 0
            self._behind = False
            self._add(CLEARED, [])

    def apply(self, ops: Iterable[Op]) -> None:
        """Replay another `KvEvents`' ops here (a worker mirroring its engine process's)."""
        for kind, names in ops:
            if kind == STORED:
                self.stored(names)
            elif kind == REMOVED:
                self.removed(names)
            elif kind == CLEARED:
                self.cleared()

    def take(self) -> list[Op]:
        with self._lock:
            if self._behind:
                return self._snapshot()
            ops, self._pending, self._pending_names = self._pending, [], 0
            return ops

    def snapshot(self) -> list[Op]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> list[Op]:
        self._pending, self._pending_names, self._behind = [], 0, False
        return [(CLEARED, []), (STORED, list(self._held))]

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, name: object) -> bool:
        return name in self._held


class KvIndex:
    """The router's view: which blocks each replica holds, from its worker's reports."""

    def __init__(self) -> None:
        self._blocks: dict[str, set[int]] = {}
        self._block_size: dict[str, int] = {}
        self._seq: dict[str, int] = {}
        self.updated: dict[str, float] = {}
        self.lost = 0  # reports missed (sequence gaps); a snapshot repairs what they said

    def apply(self, replica_id: str, block_size: int, seq: int, ops: Iterable[tuple[str, Sequence[int]]]) -> None:
        last = self._seq.get(replica_id)
        if last is not None and seq > last + 1:
            self.lost += seq - last - 1
        if last is not None and seq <= last:  # a replica restarted its count (worker restart): start over
            self._blocks.pop(replica_id, None)
        self._seq[replica_id] = seq
        self._block_size[replica_id] = block_size
        held = self._blocks.setdefault(replica_id, set())
        for kind, names in ops:
            if kind == STORED:
                held.update(names)
            elif kind == REMOVED:
                held.difference_update(names)
            elif kind == CLEARED:
                held.clear()
        self.updated[replica_id] = time.monotonic()

    def forget(self, replica_id: str) -> None:
        for table in (self._blocks, self._block_size, self._seq, self.updated):
            table.pop(replica_id, None)

    def block_size(self, replica_id: str) -> int | None:
        """The replica's block size, or None while it has reported nothing it holds."""
        return self._block_size.get(replica_id) if self._blocks.get(replica_id) else None

    def matched(self, replica_id: str, names: Sequence[int]) -> int:
        """How many of a prompt's leading blocks (`names`, from `block_hashes`) the replica holds."""
        held = self._blocks.get(replica_id)
        if not held:
            return 0
        n = 0
        for name in names:
            if name not in held:
                break
            n += 1
        return n

    def holds(self, replica_id: str, name: int) -> bool:
        return name in self._blocks.get(replica_id, ())

    def held(self, replica_id: str) -> int:
        return len(self._blocks.get(replica_id, ()))

    def replicas(self) -> list[str]:
        return list(self._blocks)
