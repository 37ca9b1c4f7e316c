"""KV-aware routing: send a prompt to the replica that already holds the most of its prefix.

Workers report the prefix-cache blocks their engines store and drop (`mesh_pb2.KvEvents` on
core NATS; names from maas/mesh/kvblocks.py); `KvRouter.observe` keeps them in a
`KvIndex`. To route a request, the router tokenizes its prompt as the engine will (the
model version's own tokenizer, fetched once from a worker that serves it through the
worker-only TokenizerFiles service and loaded with transformers), names the prompt's
blocks, and picks, among replicas not loaded above the bound the rest of routing uses
(`ReplicaPool.choose`), the one holding the longest run of them.

It gives no answer (and `ReplicaPool.choose`'s rendezvous hash on the prompt's first
characters decides) when: no candidate has reported blocks; the version's tokenizer is not
loaded yet (it is being fetched) or cannot be (no transformers in this router's
environment: the slim control image); the request is an adapter's (adapters' blocks are
named by "name@version", which the router does not resolve), a chat with tools, or a
prompt no candidate holds a block of.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from maas.mesh.clients import REPLICA_HEADER, dial
from maas.mesh.kvblocks import CLEARED, REMOVED, STORED, KvIndex, chain, root
from maas.v1 import inference_pb2, mesh_pb2, tokenize_pb2, tokenize_pb2_grpc

log = logging.getLogger(__name__)

INLINE_CHARS = 8192        # longer prompts are tokenized off the event loop
RETRY_SECONDS = 30.0       # after a failed tokenizer fetch
FETCH_TIMEOUT = 30.0
MAX_TOKENIZERS = 32        # model versions whose tokenizer a router keeps
PERMANENT = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)
_KINDS = {mesh_pb2.KvEvent.STORED: STORED, mesh_pb2.KvEvent.REMOVED: REMOVED, mesh_pb2.KvEvent.CLEARED: CLEARED}


class KvRouter:
    def __init__(self, *, tls: Any = None, credential: tuple[tuple[str, str], ...] = (),
                 known: Callable[[str], bool] = lambda replica_id: True) -> None:
        self.index = KvIndex()
        self.known = known  # whether a replica is in etcd: reports of others (gone, or another mesh's) are dropped
        self.tls = tls
        self.credential = credential
        self._tokenizers: dict[str, Any] = {}       # "name@version" -> a loaded tokenizer
        self._fetching: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, float] = {}          # "name@version" -> when its fetch failed
        self._refused: set[str] = set()              # versions whose worker said it has no tokenizer to give
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.enabled = _has_transformers()
        if not self.enabled:
            log.info("KV-aware routing is off: this router's environment has no transformers to tokenize prompts "
                     "(install the worker extra); requests go by the prompt's first characters")

    def observe(self, report: mesh_pb2.KvEvents) -> None:
        if not self.known(report.replica_id):
            return
        self.index.apply(report.replica_id, report.block_size, report.seq,
                         [(_KINDS[e.kind], e.block_hashes) for e in report.events if e.kind in _KINDS])

    def forget(self, replica_id: str) -> None:
        self.index.forget(replica_id)

    async def close(self) -> None:
        for task in self._fetching.values():
            task.cancel()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def choose(self, candidates: list[mesh_pb2.ReplicaInfo], request: inference_pb2.GenerateRequest,
                     load: Callable[[str], int], bound: float) -> tuple[mesh_pb2.ReplicaInfo, int] | None:
        """The candidate under `bound` holding the longest run of the prompt's leading
        blocks (fewer requests in flight breaks a tie), and that run's length in blocks;
        None when no candidate holds any (see the module's docstring for when it cannot tell)."""
        if not self.enabled or request.adapter:
            return None
        groups: dict[tuple[str, int], list[mesh_pb2.ReplicaInfo]] = {}
        for r in candidates:
            size = self.index.block_size(r.replica_id)
            if size and load(r.replica_id) + 1 <= bound:
                groups.setdefault((f"{r.model_name}@{r.model_version}", size), []).append(r)
        best: tuple[int, int, mesh_pb2.ReplicaInfo] | None = None  # (blocks, -load, replica)
        for (ref, size), replicas in groups.items():
            ids = await self._prompt_ids(ref, replicas[0], request)
            if not ids:
                continue
            for replica, matched in self._matches(ids, size, replicas):
                score = (matched, -load(replica.replica_id))
                if matched and (best is None or score > best[:2]):
                    best = (*score, replica)
        return (best[2], best[0]) if best is not None else None

    def _matches(self, ids: list[int], size: int, replicas: list[mesh_pb2.ReplicaInfo]
                 ) -> list[tuple[mesh_pb2.ReplicaInfo, int]]:
        """How many of the prompt's leading blocks each replica holds. Names are made one
        block at a time and no further than some replica holds (a long prompt costs a few
        hashes, not one per block); the last token is never in a cached block (an engine
        computes at least one), so neither is a block that ends with it."""
        matched = {r.replica_id: 0 for r in replicas}
        alive = list(replicas)
        name = root()
        usable = (len(ids) - 1) // size * size
        for start in range(0, usable, size):
            name = chain(name, ids[start:start + size])
            alive = [r for r in alive if self.index.holds(r.replica_id, name)]
            if not alive:
                break
            for r in alive:
                matched[r.replica_id] += 1
        return [(r, matched[r.replica_id]) for r in replicas]

    async def _prompt_ids(self, ref: str, replica: mesh_pb2.ReplicaInfo,
                          request: inference_pb2.GenerateRequest) -> list[int] | None:
        if request.prompt_token_ids:
            return list(request.prompt_token_ids)
        tokenizer = self._tokenizer(ref, replica)
        if tokenizer is None:
            return None
        if request.messages:
            if request.tools or any(m.tool_calls or m.role == "tool" for m in request.messages):
                return None  # rendered with tools by the worker's own rules: not reproduced here
            text = _render(tokenizer, request, ref)
            if text is None:
                return None
        else:
            text = request.prompt
        if not text:
            return None
        if len(text) > INLINE_CHARS:
            return await asyncio.to_thread(_encode, tokenizer, text)
        return _encode(tokenizer, text)

    def _tokenizer(self, ref: str, replica: mesh_pb2.ReplicaInfo) -> Any:
        """The loaded tokenizer of model version `ref`, or None (and a fetch started)."""
        found = self._tokenizers.get(ref)
        if found is not None:
            return found
        if ref in self._refused:
            return None
        if ref not in self._fetching and time.monotonic() - self._failed.get(ref, -RETRY_SECONDS) >= RETRY_SECONDS:
            self._fetching[ref] = asyncio.create_task(self._fetch(ref, replica), name=f"tokenizer {ref}")
        return None

    async def _fetch(self, ref: str, replica: mesh_pb2.ReplicaInfo) -> None:
        try:
            channel = self._channels.get(replica.endpoint)
            if channel is None:
                channel = self._channels[replica.endpoint] = dial(replica.endpoint, tls=self.tls)
            reply = await tokenize_pb2_grpc.TokenizerFilesStub(channel).GetTokenizerFiles(
                tokenize_pb2.GetTokenizerFilesRequest(model=ref), timeout=FETCH_TIMEOUT,
                metadata=(*self.credential, (REPLICA_HEADER, replica.replica_id)))
            tokenizer = await asyncio.to_thread(_load, reply.files)
            while len(self._tokenizers) >= MAX_TOKENIZERS:  # the oldest fetched goes (insertion order)
                self._tokenizers.pop(next(iter(self._tokenizers)))
            self._tokenizers[ref] = tokenizer
            log.info("KV-aware routing: loaded the tokenizer of %s (%d files)", ref, len(reply.files))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed[ref] = time.monotonic()
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in PERMANENT:
                self._refused.add(ref)  # (a sim model has no tokenizer; one too large stays too large)
                log.info("KV-aware routing is off for %s: %s", ref, exc.details())
                return
            why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else f"{type(exc).__name__}: {exc}"
            log.warning("KV-aware routing: cannot fetch the tokenizer of %s from %s (%s); retrying in %.0fs",
                        ref, replica.worker_id, why, RETRY_SECONDS)
        finally:
            self._fetching.pop(ref, None)


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _load(files: Any) -> Any:
    from maas.services.worker.engines.base import WEIGHTS_LOCK

    tmp = Path(tempfile.mkdtemp(prefix="maas-router-tokenizer-"))
    try:
        for f in files:
            name = Path(f.name).name  # a file name, never a path
            if name in ("", ".", ".."):
                continue
            (tmp / name).write_bytes(f.data)
        with WEIGHTS_LOCK:  # one thread at a time imports transformers
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text)["input_ids"]]


def _render(tokenizer: Any, request: inference_pb2.GenerateRequest, ref: str) -> str | None:
    from maas.services.worker.engines.base import ChatMessage
    from maas.services.worker.engines.chat import render_chat

    try:
        return render_chat(tokenizer, [ChatMessage(m.role, m.content) for m in request.messages], ref)
    except Exception:  # the worker will say what is wrong with the chat
        return None
