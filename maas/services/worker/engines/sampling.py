"""One decode step's sampling: penalties, temperature, top-k, top-p and the draw.

The random draw for a position depends only on the request's seed and that absolute
position in the sequence, never on other requests in a batch or on how many steps
this process ran. A request resumed elsewhere (prompt plus the tokens already
produced) therefore continues exactly as it would have.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import torch

from maas.services.worker.engines.base import SamplingParams
from maas.services.worker.engines.text import StopMatcher

__all__ = [
    "StopMatcher",
    "apply_penalties",
    "filter_logits",
    "position_generator",
    "request_seed",
    "sample_next_token",
]

_SEED_MASK = (1 << 63) - 1


def request_seed(params: SamplingParams) -> int:
    """The request's seed, or a fresh random one (picked once per request) if unset."""
    return params.seed if params.seed is not None else secrets.randbits(63)


def position_generator(seed: int, position: int) -> torch.Generator:
    """A CPU generator whose state is a function of (seed, position) only."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & _SEED_MASK)


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
) -> torch.Tensor:
    """Return `logits` (1-D, vocab) with the request's penalties applied.

    The repetition penalty (CTRL-style: positive logits divided, negative multiplied)
    covers prompt and output tokens; presence and frequency penalties (OpenAI-style:
    subtracted once per distinct token / once per occurrence) cover output tokens only.
    """
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted({*prompt_ids, *output_ids}), dtype=torch.long, device=logits.device)
        seen = seen[seen < vocab]
        chosen = logits[seen]
        penalty = params.repetition_penalty
        logits = logits.clone()
        logits[seen] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids[ids < vocab], minlength=vocab).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scale by temperature (> 0) and mask everything outside top-k and top-p with -inf."""
    # Shift so the maximum is 0 first: tiny temperatures then give -large, never inf - inf.
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    seed: int,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
) -> int:
    """Pick the next token from one position's logits (1-D, vocab).

    Temperature 0 is greedy (argmax after penalties). Otherwise the draw uses
    exponential races (argmax of p / E with E ~ Exp(1) per token, equivalent to
    sampling from p) with noise from `position_generator(seed, position)`, where the
    position is `len(prompt_ids) + len(output_ids)`. Work happens on the CPU in
    float32, so a request draws the same tokens on any device.
    """
    logits = logits.detach().to(device="cpu", dtype=torch.float32)
    logits = apply_penalties(logits, params, prompt_ids=prompt_ids, output_ids=output_ids)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    generator = position_generator(seed, len(prompt_ids) + len(output_ids))
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise.clamp_min(1e-20)))
