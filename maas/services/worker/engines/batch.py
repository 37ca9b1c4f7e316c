"""The running batch of a continuous-batching engine: one KV cache for many sequences.

Sequences are kept right-aligned (left-padded): every row's newest token sits in the
last cache column, so one forward pass decodes one token for every row, whatever their
lengths. New sequences are prefilled as a group and merged in (the shorter side is
padded on the left); finished ones are dropped between steps and the columns that no
longer hold any real token are trimmed. The attention mask hides the padding and
explicit position ids keep each row's positions its own, so a row's output does not
depend on what else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from maas.services.worker.engines.prefix import KV


def _pad_left(t: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    if columns == 0:
        return t
    shape = list(t.shape)
    shape[dim] = columns
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's per-layer K/V holders (full attention only: sliding-window caches trim
    themselves and would break the column alignment this batch relies on)."""
    layers = cache.layers
    if not all(type(layer) is DynamicLayer for layer in layers):
        raise NotImplementedError("continuous batching supports full-attention models only")
    return cast(list[DynamicLayer], layers)


class DecodeBatch:
    """Tensor state of the running rows: KV cache, attention mask, next positions, last tokens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        # prefilled rows not joined yet (`merge_pending`): (cache, mask, next positions)
        self._pending: list[tuple[DynamicCache, torch.Tensor, torch.Tensor]] = []
        self._keep: list[int] | None = None  # rows to keep, applied first by `merge_pending`
        self._empty()

    def _empty(self) -> None:
        device = self.device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)   # [rows, columns]
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # next position per row
        self.last = torch.zeros(0, dtype=torch.long, device=device)       # token to feed next per row

    def __len__(self) -> int:
        return len(self._keep) if self._keep is not None else int(self.last.shape[0])

    @property
    def columns(self) -> int:
        """The cache's width (before a `keep_later` trims it: an upper bound)."""
        return int(self.mask.shape[1])

    def prefill(self, model: Any, rows: Sequence[tuple[KV | None, Sequence[int]]], extra: dict[str, Any],
                *, every_position: bool = False) -> tuple[torch.Tensor, list[KV]]:
        """Prefill new rows in one forward pass and add them to the batch.

        Each row is (prefix, tokens): `prefix` is the KV of the row's first tokens when the
        prefix cache had them (or None), `tokens` the rest of the prompt, to compute now.
        Rows are laid out as [pad][prefix][pad][tokens]; the mask hides both pads and the
        position ids continue each row's own prefix. Returns the last logits [rows, vocab]
        and each row's own KV over its whole prompt (for the prefix cache). The rows join
        the batch at `merge_pending` (or `set_last`, which sets their first sampled tokens).

        With `every_position` (`extra` must then let the model keep every position's logits)
        the logits are [rows, width, vocab] instead: row i's tokens are its last
        len(tokens) columns, right-aligned (prompt logprobs)."""
        n = len(rows)
        cached = [0 if kv is None else int(kv[0][0].shape[2]) for kv, _ in rows]
        known, width = max(cached), max(len(tokens) for _, tokens in rows)
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, known + width, dtype=torch.long)
        for i, (_, tokens) in enumerate(rows):
            ids[i, width - len(tokens):] = torch.tensor(list(tokens), dtype=torch.long)
            mask[i, known - cached[i]:known] = 1
            mask[i, known + width - len(tokens):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = torch.tensor(cached, device=self.device)[:, None] + (mask[:, known:].cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(ddp_cache_data=self._stack_prefixes(rows, cached, known)) if known else DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, **extra)
        own = []
        for i, (_, tokens) in enumerate(rows):
            keep = [slice(known - cached[i], known), slice(known + width - len(tokens), known + width)]
            own.append([(torch.cat([cast(torch.Tensor, layer.keys)[i:i + 1, :, k] for k in keep], dim=2),
                         torch.cat([cast(torch.Tensor, layer.values)[i:i + 1, :, k] for k in keep], dim=2))
                        for layer in _layers(cache)])
        lengths = torch.tensor([c + len(t) for c, (_, t) in zip(cached, rows, strict=True)], device=self.device)
        self._pending.append((cache, mask, lengths))
        return (out.logits if every_position else out.logits[:, -1, :]), own

    def merge_pending(self) -> None:
        """Join the rows prefilled since the last call to the batch, in their order. Kept
        apart from `prefill` so that their first tokens can go out before this copy of the
        whole batch's cache (a time to first token then does not grow with the batch)."""
        if self._keep is not None:
            rows, self._keep = self._keep, None
            self._gather(rows)
        pending, self._pending = self._pending, []
        for cache, mask, lengths in pending:
            self._merge(cache, mask, lengths)

    def _stack_prefixes(self, rows: Sequence[tuple[KV | None, Sequence[int]]], cached: list[int], known: int
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the rows' cached prefixes stacked into [rows, heads, known, head_dim],
        each padded on the left with zeros (masked) to the longest."""
        template = next(kv for kv, _ in rows if kv is not None)
        stacked = []
        for layer, (k0, v0) in enumerate(template):
            keys, values = [], []
            for (kv, _), length in zip(rows, cached, strict=True):
                if kv is None:
                    keys.append(k0.new_zeros(1, k0.shape[1], known, k0.shape[3]))
                    values.append(v0.new_zeros(1, v0.shape[1], known, v0.shape[3]))
                else:
                    keys.append(_pad_left(kv[layer][0].to(self.device), known - length, 2))
                    values.append(_pad_left(kv[layer][1].to(self.device), known - length, 2))
            stacked.append((torch.cat(keys), torch.cat(values)))
        return stacked

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        new_last = torch.zeros(mask.shape[0], dtype=torch.long, device=self.device)
        if self.cache is None or len(self) == 0:
            self.cache, self.mask, self.positions, self.last = cache, mask, positions, new_last
            return
        width = max(self.columns, mask.shape[1])
        mine, theirs = width - self.columns, width - mask.shape[1]
        for old, new in zip(_layers(self.cache), _layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(cast(torch.Tensor, old.keys), mine, 2),
                                  _pad_left(cast(torch.Tensor, new.keys), theirs, 2)], dim=0)
            old.values = torch.cat([_pad_left(cast(torch.Tensor, old.values), mine, 2),
                                    _pad_left(cast(torch.Tensor, new.values), theirs, 2)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, mine, 1), _pad_left(mask, theirs, 1)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, new_last])

    def set_last(self, rows: Sequence[int], tokens: Sequence[int]) -> None:
        self.merge_pending()
        self.last[torch.tensor(rows, device=self.device)] = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def step(self, model: Any, extra: dict[str, Any]) -> torch.Tensor:
        """Feed every row its last token; return the next-token logits [rows, vocab]."""
        self.merge_pending()
        assert self.cache is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                    past_key_values=self.cache, use_cache=True, **extra)
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def columns_of(self, rows: Sequence[int]) -> int:
        """The columns the batch would have after `keep(rows)`."""
        self.merge_pending()
        if not rows:
            return 0
        used = self.mask[torch.tensor(rows, dtype=torch.long, device=self.device)].sum(0).nonzero()
        return self.columns - int(used[0]) if len(used) else 0

    def keep_later(self, rows: Sequence[int]) -> None:
        """`keep(rows)`, done when the batch is next used (`merge_pending`, `step`, ...): the
        copy of the cache that drops rows pre-empted for a new request then comes after the
        new request's first token went out, not before its prefill."""
        assert self._keep is None and not self._pending
        self._keep = list(rows)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in this order) and trim columns no row uses any more."""
        self.merge_pending()
        self._gather(rows)

    def _gather(self, rows: Sequence[int]) -> None:
        if len(rows) == int(self.last.shape[0]):
            return
        if not rows:
            self._empty()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        used = self.mask.sum(0).nonzero()
        first = int(used[0]) if len(used) else self.columns
        self.mask = self.mask[:, first:]
        assert self.cache is not None
        for layer in _layers(self.cache):
            layer.keys = cast(torch.Tensor, layer.keys)[index, :, first:, :]
            layer.values = cast(torch.Tensor, layer.values)[index, :, first:, :]
