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
        device = self.device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)   # [rows, columns]
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # next position per row
        self.last = torch.zeros(0, dtype=torch.long, device=device)       # token to feed next per row

    def __len__(self) -> int:
        return int(self.last.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    def prefill(self, model: Any, prompts: Sequence[Sequence[int]], extra: dict[str, Any]) -> torch.Tensor:
        """Run the prompts as one left-padded forward pass; return their last logits [n, vocab].

        The new rows join this batch (their first sampled tokens are set with `set_last`)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True, **extra)
        self._merge(cache, mask, mask.sum(-1))
        return out.logits[:, -1, :]

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
        self.last[torch.tensor(rows, device=self.device)] = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def step(self, model: Any, extra: dict[str, Any]) -> torch.Tensor:
        """Feed every row its last token; return the next-token logits [rows, vocab]."""
        assert self.cache is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                    past_key_values=self.cache, use_cache=True, **extra)
        self.positions = self.positions + 1
        return out.logits[:, -1, :]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in this order) and trim columns no row uses any more."""
        if len(rows) == len(self):
            return
        if not rows:
            self.reset()
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
