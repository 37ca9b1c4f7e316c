"""Constrained decoding: each token a request may take is one its grammar allows.

A `GuideSpec` (JSON schema, any JSON object, regex or Lark grammar) is compiled by
llguidance against the model's tokenizer into a matcher per sequence. Before each
sampling step the matcher writes the set of allowed tokens as a bitmask (one bit per
vocabulary entry, 32 to an int32); the sampler sets every other logit to -inf, so greedy
and seeded sampling both pick among allowed tokens only, and the draw for a position
still depends only on (seed, position). After sampling, the token is fed back to the
matcher. When the grammar is complete the matcher allows only end-of-sequence, and the
sequence finishes with "stop".

Why llguidance: it has no dependencies beyond its own wheel (xgrammar pulls a CUDA triton
that breaks on a CPU box), compiles a schema in milliseconds (no per-schema
precomputation over the vocabulary), takes Lark grammars with JSON schemas embedded
(`%json{...}`: how tool calls are constrained, `maas.mesh.tools`), and computes a mask in
microseconds per row (bench/structured.py measures both on the engine's batch).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import torch

from maas.mesh.errors import InvalidArgument
from maas.mesh.tools import JSON_OPTIONS
from maas.services.worker.engines.base import GuideSpec

__all__ = ["Guide", "Guides", "apply_masks", "grammar_of"]

# Compile options (maas.mesh.tools.JSON_OPTIONS): compact JSON ("," and ":", no whitespace),
# oneOf as anyOf, unimplemented keywords ignored; schemas' property order is kept.
_JSON_OPTIONS: Any = JSON_OPTIONS


def grammar_of(spec: GuideSpec) -> str:
    """llguidance's grammar text for `spec`; raises InvalidArgument for text that is not
    what its kind says (a schema that is not JSON, ...)."""
    import llguidance

    if spec.kind == "json_object":
        return str(llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS))
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except ValueError as exc:
            raise InvalidArgument(f"the JSON schema is not JSON: {exc}", field="guide.json_schema") from None
        if schema is True:
            schema = {}  # a schema of true: anything
        if not isinstance(schema, dict):
            raise InvalidArgument("the JSON schema must be an object", field="guide.json_schema")
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS))
    if spec.kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(spec.value))
    return str(llguidance.LLMatcher.grammar_from_lark(spec.value))


class Guide:
    """One sequence's matcher. Used by the engine's scheduler thread only."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (int32, CPU)."""
        view = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())

    def consume(self, token: int) -> bool:
        """Advance past `token`; False if the grammar did not allow it (the matcher is then
        in error and the sequence must end)."""
        return bool(self._matcher.consume_token(token))

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more (end-of-sequence included)."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self._matcher.get_error()) if self._matcher.is_error() else ""


class Guides:
    """Compiles guides for one model: its tokenizer is converted once, on first use."""

    def __init__(self, hf_tokenizer: Any, vocab: int, eos_ids: Sequence[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab = vocab
        self._eos_ids = list(eos_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def ll_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer, converted once on first use (also the table
        of tokens' bytes that logprobs name tokens by, `hf._token_bytes`)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self._vocab, eos_token=self._eos_ids or None)
                except ValueError as exc:  # a slow (non-Rust) tokenizer
                    raise InvalidArgument(f"constrained decoding needs a fast tokenizer: {exc}",
                                          field="guide") from None
            return self._tokenizer

    def start(self, spec: GuideSpec, resumed: Sequence[int] = ()) -> Guide:
        """A matcher for `spec`, advanced past `resumed` (tokens made elsewhere, for a
        request moved or pre-empted mid-way). Thread-safe; raises InvalidArgument for a
        grammar that does not compile, naming llguidance's reason."""
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer(), grammar_of(spec), log_level=0)
        if matcher.is_error():
            raise InvalidArgument(f"the {spec.kind.replace('_', ' ')} cannot be used: {_reason(matcher.get_error())}",
                                  field=f"guide.{spec.kind}")
        guide = Guide(matcher)
        for token in resumed:
            if not guide.consume(token):
                raise InvalidArgument("resume_token_ids do not follow the request's grammar",
                                      field="resume_token_ids")
        return guide

    def bitmask(self, rows: int) -> torch.Tensor:
        return torch.full((rows, (self._vocab + 31) // 32), -1, dtype=torch.int32)


def _reason(error: str) -> str:
    return error.strip().splitlines()[0][:500] if error.strip() else "llguidance refused it"


_BITS = torch.arange(32, dtype=torch.int32)


def apply_masks(logits: torch.Tensor, rows: Sequence[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, every logit of `logits[rows[i]]` whose bit in `bitmask[i]` is 0."""
    vocab = logits.shape[-1]
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).bool().reshape(len(rows), -1)[:, :vocab]
    index = torch.tensor(list(rows))
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
