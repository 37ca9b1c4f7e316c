"""Streaming output helpers shared by engines: stop strings, detokenizing, deltas.

Pure Python (no torch), so light engines such as the simulator can use them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from maas.services.worker.engines.base import Delta, FinishReason, TokenLogprob


class StopMatcher:
    """Find stop strings in streamed text, even when they straddle token boundaries.

    `feed` takes the next piece of text and returns what is safe to emit now: text that
    can no longer turn out to be part of a stop string. A suffix that could still grow
    into a stop string is held back until the next piece decides it. Once a stop string
    is found, the text before it is returned and it, and everything after, never is.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)], True
        keep = self._partial_suffix_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Release held text at the end of generation (no stop string can complete now)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _partial_suffix_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self._stops), default=1) - 1
        for length in range(min(longest, len(buffer)), 0, -1):
            tail = buffer[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0


class TokenDecoder(Protocol):
    """The part of a Hugging Face tokenizer the detokenizer needs."""

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text, one token at a time.

    Decoding a token on its own is wrong for byte-level BPE (a character may span
    several tokens) and for SentencePiece-style tokenizers (leading spaces depend on
    the left context). So each step decodes a short window of recent tokens and emits
    what the newest ones added, and text ending in an incomplete character (U+FFFD)
    is held back until the next token completes it.
    """

    def __init__(self, tokenizer: TokenDecoder, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids)
        # ids[prefix:read] is already-emitted context; ids[read:] is not yet emitted.
        self._prefix = max(0, len(self._ids) - 4)
        self._read = len(self._ids)

    @property
    def pending(self) -> bool:
        """Whether some pushed tokens have not produced their text yet."""
        return self._read < len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever text is still pending (end of generation), complete or not."""
        if not self.pending:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class DeltaAssembler:
    """Collect generated tokens and their text into `Delta`s, applying stop strings.

    A delta is released only at a clean point, where no text is held back (neither an
    incomplete character nor a possible stop-string prefix). So for every delta but
    the last, the text of all tokens sent so far is exactly the text sent so far, and
    a request resumed elsewhere from the sent tokens loses and repeats nothing.
    """

    def __init__(self, stop: Iterable[str], *, prompt_tokens: int, completion_tokens: int = 0) -> None:
        self._matcher = StopMatcher(stop)
        self._text: list[str] = []
        self._ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_prompt_tokens = 0

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been hit (the caller should finish with "stop")."""
        return self._matcher.stopped

    def add(self, token_id: int, text: str, logprob: TokenLogprob | None = None) -> None:
        """Record one generated token and the text it completed (possibly empty)."""
        self._ids.append(token_id)
        if logprob is not None:
            self._logprobs.append(logprob)
        self.completion_tokens += 1
        safe, _ = self._matcher.feed(text)
        self._text.append(safe)

    def take(self, *, text_complete: bool = True) -> Delta | None:
        """The delta to send now, if at a clean point and there is something to send.

        Pass `text_complete=False` while the detokenizer still holds partial text.
        """
        if not text_complete or self._matcher.held or self.stopped or not self._ids:
            return None
        text, ids, logprobs = "".join(self._text), tuple(self._ids), tuple(self._logprobs)
        self._text, self._ids, self._logprobs = [], [], []
        return Delta(text=text, token_ids=ids, logprobs=logprobs)

    def finish(self, reason: FinishReason, tail: str = "") -> Delta:
        """The final delta: everything pending plus `tail` (the detokenizer's rest).

        A stop string found in `tail` or already hit makes the reason "stop".
        """
        if not self.stopped:
            safe, _ = self._matcher.feed(tail)
            self._text.append(safe + self._matcher.flush())
        if self.stopped:
            reason = "stop"
        return Delta(
            text="".join(self._text),
            token_ids=tuple(self._ids),
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            logprobs=tuple(self._logprobs),
            cached_prompt_tokens=self.cached_prompt_tokens,
        )
