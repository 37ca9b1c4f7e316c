"""vLLM's KV-cache events, renamed into the platform's block names (maas/mesh/kvblocks.py).

vLLM publishes what its prefix cache stores and evicts (BlockStored / BlockRemoved /
AllBlocksCleared, `--kv-events-config`) on a ZMQ PUB socket. Its block hashes depend on a
per-process seed and on vLLM's hash settings, so a router could not compute them; each
BlockStored also carries its blocks' tokens and the hash of the block before them, so
`VLLMKvFollower` names each block again with `kvblocks.chain` (the name the router
computes from the prompt's tokens), remembers vLLM's hash -> our name, and reports the
stores and removals into the engine's `KvEvents`.

The socket is an ipc:// endpoint in a private directory; the follower is a thread of the
engine process reading it until `stop`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

from maas.mesh.kvblocks import KvEvents, chain, root

log = logging.getLogger(__name__)


def translate(events: Iterable[Any], names: dict[Any, int], out: KvEvents) -> None:
    """Apply vLLM events (objects of vLLM's BlockStored, BlockRemoved and AllBlocksCleared
    classes, told apart by their fields) to `out`; `names` maps vLLM's block hashes to ours
    and is kept up to date."""
    for event in events:
        hashes = getattr(event, "block_hashes", None)
        if getattr(event, "group_idx", None) not in (None, 0):
            continue  # a second KV-cache group (hybrid models): the first names every prefix
        if hashes is None:  # AllBlocksCleared
            names.clear()
            out.cleared()
        elif hasattr(event, "token_ids"):  # BlockStored
            parent_hash = event.parent_block_hash
            parent = root(event.lora_name or "") if parent_hash is None else names.get(parent_hash)
            if parent is None:
                continue  # its parent was never reported to us: these blocks cannot be named
            size = int(event.block_size)
            if out.block_size and size != out.block_size:
                continue  # not the engine's block size (a partial block, another group's kernel size)
            stored = []
            for i, vllm_hash in enumerate(hashes):
                block = event.token_ids[i * size:(i + 1) * size]
                if len(block) < size:
                    break  # a partial block: prompts are matched in full blocks only
                parent = chain(parent, block)
                names[vllm_hash] = parent
                stored.append(parent)
            out.stored(stored)
        else:  # BlockRemoved
            gone = [name for h in hashes if (name := names.pop(h, None)) is not None]
            out.removed(gone)


class VLLMKvFollower:
    """Subscribes to an engine's KV events and keeps `events` up to date."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="maas-kv-")
        self.endpoint = f"ipc://{self._dir}/events"
        self.events: KvEvents | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def config(self) -> Any:
        """The `kv_events_config` that makes vLLM publish to this follower."""
        from vllm.config import KVEventsConfig

        return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=self.endpoint)

    def start(self) -> None:
        """Listen before the engine starts (its first events are not missed); the engine
        sets `events.block_size` once it knows it."""
        self.events = KvEvents(0)
        self._thread = threading.Thread(target=self._follow, args=(self.events,), daemon=True, name="vllm kv events")
        self._thread.start()

    def _follow(self, events: KvEvents) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        names: dict[Any, int] = {}
        last = -1
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                frames = sock.recv_multipart()
                seq = int.from_bytes(frames[1], "big", signed=True) if len(frames) == 3 else last + 1
                try:
                    batch = decoder.decode(frames[-1])
                except msgspec.DecodeError:
                    seq = last + 2  # as if lost
                    batch = None
                if seq != last + 1:  # batches were dropped (ZMQ's high-water mark): what we hold may be stale
                    log.warning("lost KV event batches from vLLM (%d then %d); reporting this replica's blocks "
                                "afresh", last, seq)
                    names.clear()
                    events.cleared()
                last = seq
                if batch is not None:
                    translate(batch.events, names, events)
        except Exception:  # never take the engine down with it: routing only loses a hint
            log.exception("following vLLM's KV events failed; this replica's cached prefixes go unreported")
            events.cleared()  # not stale blocks for ever: none
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        shutil.rmtree(self._dir, ignore_errors=True)
