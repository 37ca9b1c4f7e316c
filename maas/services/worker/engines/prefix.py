"""Prefix cache: KV tensors of prompt prefixes, reused by later prompts that share them.

Prefixes are stored at block boundaries (`block` tokens). One entry holds the longest
block-aligned prefix of one prompt; every block boundary of every entry is indexed, so a
later prompt that shares only the first blocks (a system prompt, few-shot examples)
still finds them. Entries are namespaced by adapter (a LoRA adapter changes the keys and
values), bounded by a token budget, and evicted least recently used first.

With `events` (a `kvblocks.KvEvents`), every block boundary the index gains or loses is
reported under its chained block name, for routers that route by cached prefix.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from maas.mesh.kvblocks import KvEvents, block_hashes

PREFIX_BLOCK = 16  # tokens per block
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, tokens, head_dim]


@dataclass
class _Entry:
    namespace: str
    tokens: tuple[int, ...]
    kv: KV
    names: list[int]  # kvblocks names of its blocks (empty without events)


class PrefixCache:
    def __init__(self, budget_tokens: int, block: int = PREFIX_BLOCK, events: KvEvents | None = None) -> None:
        self.budget_tokens = budget_tokens
        self.block = block
        self.events = events
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._index: dict[tuple[str, int, int], int] = {}  # (namespace, length, hash of prefix) -> entry
        self._next = 0
        self.tokens = 0
        self.hit_tokens = 0
        self.lookup_tokens = 0

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens that came from the cache."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def _key(self, namespace: str, prefix: Sequence[int]) -> tuple[str, int, int]:
        return namespace, len(prefix), hash(tuple(prefix))

    def lookup(self, namespace: str, prompt: Sequence[int]) -> tuple[int, KV] | None:
        """The longest cached block-aligned prefix of `prompt` that leaves at least one token
        to compute: (its length, its KV tensors sliced to that length)."""
        self.lookup_tokens += len(prompt)
        if not self.budget_tokens:
            return None
        for length in range((len(prompt) - 1) // self.block * self.block, 0, -self.block):
            entry_id = self._index.get(self._key(namespace, prompt[:length]))
            if entry_id is None:
                continue
            entry = self._entries[entry_id]
            if entry.namespace != namespace or entry.tokens[:length] != tuple(prompt[:length]):
                continue  # a hash collision
            self._entries.move_to_end(entry_id)
            self.hit_tokens += length
            return length, [(k[:, :, :length], v[:, :, :length]) for k, v in entry.kv]
        return None

    def insert(self, namespace: str, prompt: Sequence[int], kv: KV) -> None:
        """Store the longest block-aligned prefix of `prompt` (kv covers at least that many
        tokens, batch dimension 1) unless the cache already holds it."""
        length = (len(prompt) - 1) // self.block * self.block
        if length < self.block or length > self.budget_tokens:
            return
        if self._key(namespace, prompt[:length]) in self._index:
            return
        entry_id, self._next = self._next, self._next + 1
        tokens = tuple(prompt[:length])
        names = block_hashes(tokens, self.block, namespace) if self.events is not None else []
        self._entries[entry_id] = _Entry(namespace, tokens,
                                         [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in kv], names)
        for boundary in range(self.block, length + 1, self.block):
            self._index.setdefault(self._key(namespace, tokens[:boundary]), entry_id)
        if self.events is not None:
            self.events.stored(names)
        self.tokens += length
        while self.tokens > self.budget_tokens:
            self._evict()

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.tokens -= len(entry.tokens)
        gone: list[int] = []
        for boundary in range(self.block, len(entry.tokens) + 1, self.block):
            key = self._key(entry.namespace, entry.tokens[:boundary])
            if self._index.get(key) == entry_id:
                del self._index[key]
                # another entry may share this prefix: let it answer for it
                for other_id, other in self._entries.items():
                    if other.namespace == entry.namespace and other.tokens[:boundary] == entry.tokens[:boundary]:
                        self._index[key] = other_id
                        break
                else:
                    if entry.names:
                        gone.append(entry.names[boundary // self.block - 1])
        if self.events is not None and gone:
            self.events.removed(gone)
