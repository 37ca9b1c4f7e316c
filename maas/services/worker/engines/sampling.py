"""One decode step's sampling: min_tokens, penalties, temperature, min-p, top-k, top-p and the draw.

The random draw for a position depends only on the request's seed and that absolute
position in the sequence, never on other requests in a batch or on how many steps
this process ran. A request resumed elsewhere (prompt plus the tokens already
produced) therefore continues exactly as it would have.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from maas.services.worker.engines.base import SamplingParams, TokenLogprob
from maas.services.worker.engines.guide import Guide, apply_masks
from maas.services.worker.engines.text import StopMatcher

__all__ = [
    "StopMatcher",
    "apply_penalties",
    "filter_logits",
    "Row",
    "position_noise",
    "prompt_logprobs",
    "request_seed",
    "sample_batch",
    "sample_next_token",
]

_SEED_MASK = (1 << 63) - 1


def request_seed(params: SamplingParams) -> int:
    """The request's seed, or a fresh random one (picked once per request) if unset."""
    return params.seed if params.seed is not None else secrets.randbits(63)


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
    """Scale by temperature (> 0) and mask everything outside min-p, top-k and top-p with -inf
    (in that order, as vLLM)."""
    # Shift so the maximum is 0 first: tiny temperatures then give -large, never inf - inf.
    logits = (logits - logits.max()) / params.temperature
    if params.min_p > 0:  # p < min_p * p_max  <=>  logit - max_logit < log(min_p), and max_logit is 0 here
        logits = logits.masked_fill(logits < math.log(params.min_p), float("-inf"))
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


GREEDY_BELOW = 1e-4  # smaller temperatures underflow in float32: treat them as greedy


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic; logical shifts by masking)."""
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def position_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise of shape [rows, vocab], each row a pure function of (seed, position).

    A counter-based generator (SplitMix64 of seed, position and token index), so a whole
    batch draws its noise in a few vectorised ops and no row depends on another.
    """
    base = _mix64(_mix64(seeds.to(torch.int64)) ^ (positions.to(torch.int64) * -7046029254386353131))
    counters = base[:, None] + torch.arange(vocab, dtype=torch.int64) * -7046029254386353131
    bits = (_mix64(counters) >> 40) & 0xFFFFFF  # 24 uniform bits
    uniform = (bits.to(torch.float32) + 0.5) / float(1 << 24)
    return -torch.log(uniform)


@dataclass(frozen=True)
class Row:
    """What the sampler needs to know about one sequence of the batch."""

    params: SamplingParams
    seed: int
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    guide: Guide | None = None  # constrained decoding: only the tokens it allows are drawn
    end_ids: tuple[int, ...] = ()  # tokens that end the output: masked while it is shorter than min_tokens

    @property
    def position(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def too_short(self) -> bool:
        """The output may not end yet (min_tokens): its end tokens are masked."""
        return bool(self.end_ids) and len(self.output_ids) < self.params.min_tokens


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], rows: Sequence[Row]) -> list[TokenLogprob | None]:
    """For rows that asked (`logprobs` set): the chosen token's log-probability under the
    model (raw logits, before penalties and temperature) and the top-N alternatives."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return out
    logp = torch.log_softmax(logits[torch.tensor(wanted)].detach().to("cpu", torch.float32), dim=-1)
    top_n = max(rows[i].params.logprobs or 0 for i in wanted)
    top = torch.topk(logp, top_n, dim=-1) if top_n else None
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs or 0
        alternatives = tuple(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist(), strict=True)) if top else ()
        out[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), alternatives)
    return out


def _mask_end(logits: torch.Tensor, end_ids: Sequence[int]) -> None:
    """Set the end tokens' logits (1-D) to -inf in place, unless nothing else is allowed (a
    grammar that only allows end-of-sequence wins over min_tokens)."""
    index = torch.tensor([t for t in end_ids if t < logits.shape[-1]], dtype=torch.long)
    kept = logits[index].clone()
    logits[index] = float("-inf")
    if not torch.isfinite(logits).any():
        logits[index] = kept


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top_n: int,
                    chunk: int = 512) -> list[TokenLogprob]:
    """Each prompt token's logprob given the tokens before it, from `logits` [positions, vocab]
    (a forward pass's raw logits at the prompt's positions: row j predicts token j + 1, so
    the first len(prompt_ids) - 1 rows are used), with the top-N alternatives. The first token has no logprob: its entry holds only its id
    (logprob 0, no top). Log-softmax in float32, `chunk` positions at a time (a long
    prompt's logits over a large vocabulary are big already)."""
    out = [TokenLogprob(prompt_ids[0], 0.0)]
    targets = torch.tensor(list(prompt_ids[1:]), dtype=torch.long, device=logits.device)
    for start in range(0, len(targets), chunk):
        part = targets[start:start + chunk]
        logp = torch.log_softmax(logits[start:start + len(part)].to(torch.float32), dim=-1)
        chosen = logp.gather(1, part[:, None])[:, 0].tolist()
        top = torch.topk(logp, top_n, dim=-1) if top_n else None
        ids, values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
        for j, token in enumerate(part.tolist()):
            alternatives = tuple(zip(ids[j], values[j], strict=True)) if top is not None else ()
            out.append(TokenLogprob(token, chosen[j], alternatives))
    return out


def sample_batch(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """Pick the next token of every row from logits [rows, vocab].

    A row shorter than its min_tokens has its end tokens masked (with a grammar's mask,
    before penalties). Greedy rows (temperature 0) take the argmax after penalties. Sampled rows use
    exponential races (argmax of p / E, E ~ Exp(1), equivalent to drawing from p) with
    noise from `position_noise(seed, position)`. Work happens on the CPU in float32, so a
    request draws the same tokens on any device and in any batch.
    """
    penalised = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0
                 or row.params.presence_penalty or row.params.frequency_penalty]
    guided = [i for i, row in enumerate(rows) if row.guide is not None]
    short = [i for i, row in enumerate(rows) if row.too_short]
    # written in place below: a copy, so the caller's logits stay the model's (for logprobs)
    logits = logits.detach().to(device="cpu", dtype=torch.float32, copy=bool(penalised or guided or short))
    if guided:  # before penalties and temperature: a disallowed token stays -inf through both
        bitmask = torch.full((len(guided), (logits.shape[-1] + 31) // 32), -1, dtype=torch.int32)
        for j, i in enumerate(guided):
            rows[i].guide.fill(bitmask, j)  # type: ignore[union-attr]
        apply_masks(logits, guided, bitmask)
    for i in short:
        _mask_end(logits[i], rows[i].end_ids)
    for i in penalised:  # rare: only rows that ask for penalties pay per-row work
        row = rows[i]
        logits[i] = apply_penalties(logits[i], row.params, prompt_ids=row.prompt_ids, output_ids=row.output_ids)
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.params.temperature >= GREEDY_BELOW]
    if sampled:
        index = torch.tensor(sampled)
        part = torch.stack([filter_logits(logits[i], rows[i].params) for i in sampled]) \
            if any(rows[i].params.top_k or rows[i].params.top_p < 1 or rows[i].params.min_p for i in sampled) \
            else (logits[index] - logits[index].max(-1, keepdim=True).values) / torch.tensor(
                [rows[i].params.temperature for i in sampled])[:, None]
        probs = torch.softmax(part, dim=-1)
        noise = position_noise(torch.tensor([rows[i].seed for i in sampled]),
                               torch.tensor([rows[i].position for i in sampled]), logits.shape[-1])
        chosen[index] = torch.argmax(probs / noise, dim=-1)
    return chosen.tolist()


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    seed: int,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
) -> int:
    """Pick the next token from one position's logits (1-D, vocab): `sample_batch` of one row,
    where the position is `len(prompt_ids) + len(output_ids)`."""
    return sample_batch(logits[None], [Row(params, seed, prompt_ids, output_ids)])[0]
