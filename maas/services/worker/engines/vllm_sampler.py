"""The built-in engine's sampler inside vLLM, so a vLLM stream can move between workers exactly.

vLLM seeds one random generator per request and advances it with every token drawn, so a
request resumed elsewhere as prompt + the tokens already made starts that generator from
the beginning again and draws different tokens from then on. The built-in engine draws
each token from noise that is a pure function of (seed, position) (`sampling.sample_batch`),
so a resumed request continues exactly as the uninterrupted one would have.

`PositionSampler` is a vLLM logits processor that runs that same sampler over each step's
logits (after vLLM's grammar mask and min_tokens mask, before its own sampling), penalties
included, and leaves only the chosen token finite; the request itself asks vLLM for greedy
decoding without penalties, so vLLM's argmax takes exactly that token. The request's own
parameters travel in `SamplingParams.extra_args["maas"]` (`extra_args`), since the
processor runs in vLLM's engine-core process. Logprobs stay the model's: vLLM computes them
from the raw logits, before any processor, as the built-in engine does.

With the same logits, the same seed gives the same tokens as the built-in engine; logits
of two engines differ in the last bits (kernels, batch shapes), which can flip a sampled
token where two are nearly tied, so the guarantee is within one engine kind: a stream
moved between two vLLM workers, or between two built-in ones, continues identically.

This module is imported in vLLM's engine-core process (by its path, from the engine
arguments), so it must import without the worker's other modules.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from maas.services.worker.engines.base import SamplingParams
from maas.services.worker.engines.sampling import GREEDY_BELOW, Row, sample_batch

KEY = "maas"  # SamplingParams.extra_args[KEY] holds what `extra_args` made

# the built-in SamplingParams fields the sampler reads (the rest are vLLM's business)
_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "min_tokens")


def extra_args(params: SamplingParams, seed: int, *, resumed: int, end_ids: tuple[int, ...]) -> dict[str, Any]:
    """What the processor needs about one request, as plain values vLLM can send to its core:
    its sampling fields, seed, how many of its prompt's last tokens are output resumed from
    elsewhere (penalties count them as output), and the tokens min_tokens keeps back."""
    fields = {name: getattr(params, name) for name in _FIELDS}
    return {KEY: {**fields, "seed": seed, "resumed": resumed, "end_ids": list(end_ids)}}


def _plain_greedy(cfg: dict[str, Any]) -> bool:
    """Greedy without penalties or min_tokens: vLLM's own argmax (the request asks it for
    greedy decoding) picks what the sampler would, so the row costs nothing here."""
    return (cfg["temperature"] < GREEDY_BELOW and cfg["repetition_penalty"] == 1.0 and not cfg["presence_penalty"]
            and not cfg["frequency_penalty"] and not cfg["min_tokens"])


class _Request:
    __slots__ = ("params", "seed", "resumed", "end_ids", "prompt_ids", "output_ids")

    def __init__(self, cfg: dict[str, Any], prompt_ids: list[int], output_ids: list[int]) -> None:
        fields = {name: cfg[name] for name in _FIELDS}
        self.params = SamplingParams(max_tokens=max(1, fields["min_tokens"]), **fields)
        self.seed = int(cfg["seed"])
        self.resumed = int(cfg["resumed"])
        self.end_ids = tuple(cfg["end_ids"])
        self.prompt_ids = prompt_ids
        self.output_ids = output_ids  # vLLM's own list, which grows as tokens are made

    def row(self) -> Row:
        cut = len(self.prompt_ids) - self.resumed
        prompt, output = self.prompt_ids[:cut], [*self.prompt_ids[cut:], *self.output_ids]
        # output counts the resumed tokens, so min_tokens holds as it did where they were made
        return Row(self.params, self.seed, prompt, output, end_ids=self.end_ids)


class PositionSampler(LogitsProcessor):
    """Samples every request that carries `extra_args` with the built-in engine's sampler."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.requests: dict[int, _Request] = {}  # by the row of vLLM's persistent batch

    def is_argmax_invariant(self) -> bool:
        return False  # it decides greedy requests' tokens too (penalties, min_tokens)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            cfg = (getattr(params, "extra_args", None) or {}).get(KEY) if params is not None else None
            if cfg is not None and prompt_ids is not None and not _plain_greedy(cfg):
                self.requests[index] = _Request(cfg, prompt_ids, output_ids)
            else:
                self.requests.pop(index, None)
        for a, b, direction in batch_update.moved:
            first, second = self.requests.pop(a, None), self.requests.pop(b, None)
            if first is not None:
                self.requests[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.requests[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        rows = sorted(self.requests)
        index = torch.tensor(rows, device=logits.device)
        chosen = sample_batch(logits[index], [self.requests[i].row() for i in rows])
        logits[index] = float("-inf")
        logits[index, torch.tensor(chosen, device=logits.device)] = 0.0
        return logits
