"""Streaming output helpers shared by engines: stop strings, detokenizing, deltas.

Pure Python (no torch), so light engines such as the simulator can use them too.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from maas.services.worker.engines.base import Delta, FinishReason, TokenLogprob


class StopMatcher:
    """Find stop strings in streamed text, even when they straddle token boundaries.

    `feed` takes the next piece of text and returns what is safe to emit now: text that
    can no longer turn out to be part of a stop string. A suffix that could still grow
    into a stop string is held back until the next piece decides it. Once a stop string
    is found, the text before it is returned and it, and everything after, never is.

    Text fed with `check=False` (made before a request's min_tokens) cannot stop the
    output: a stop string counts only if it ends in text fed with `check=True`, though it
    may begin earlier (vLLM's rule for min_tokens).
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._unchecked = 0  # leading characters of _held fed with check=False
        self.stopped = False

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._held

    def feed(self, text: str, *, check: bool = True) -> tuple[str, bool]:
        """Add `text`; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        unchecked = self._unchecked if check else len(buffer)
        # a match must end past the unchecked text: start looking len(stop) - 1 before its end
        hits = [i for i in (buffer.find(s, max(0, unchecked - len(s) + 1)) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held, self._unchecked = "", 0
            return buffer[: min(hits)], True
        keep = self._partial_suffix_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        self._unchecked = max(0, unchecked - (len(buffer) - keep))
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Release held text at the end of generation (no stop string can complete now)."""
        text, self._held, self._unchecked = self._held, "", 0
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


def token_string(raw: bytes) -> str:
    """A token's own text, for logprobs: its bytes as UTF-8 or, for a piece of a character
    (byte-level BPE splits some characters over tokens), its bytes as OpenAI writes them,
    `bytes:\\xe2\\x82` (vLLM decodes such a piece alone to U+FFFD, losing its bytes)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TokenStrings:
    """Each token's own text (`token_string` of its bytes), cached by id, for logprobs.

    `build` returns the function from a token id to its bytes; it runs on first use, or at
    `ready` (converting a large vocabulary takes a moment: a caller can pay for it before
    a scheduler thread needs it). Thread-safe."""

    def __init__(self, build: Callable[[], Callable[[int], bytes]]) -> None:
        self._build = build
        self._bytes: Callable[[int], bytes] | None = None
        self._cache: dict[int, str] = {}  # at most one entry per vocabulary entry
        self._lock = threading.Lock()

    def ready(self) -> Callable[[int], bytes]:
        with self._lock:
            if self._bytes is None:
                self._bytes = self._build()
            return self._bytes

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = token_string(self.ready()(token_id))
        return text

    def name(self, logprob: TokenLogprob) -> TokenLogprob:
        """`logprob` with its token's text and its alternatives' filled in."""
        return dataclasses.replace(logprob, token=self(logprob.token_id),
                                   top_tokens=tuple(self(t) for t, _ in logprob.top))


class DeltaAssembler:
    """Collect generated tokens and their text into `Delta`s, applying stop strings.

    A delta is released only at a clean point, where no text is held back (neither an
    incomplete character nor a possible stop-string prefix). So for every delta but
    the last, the text of all tokens sent so far is exactly the text sent so far, and
    a request resumed elsewhere from the sent tokens loses and repeats nothing.

    Stop strings count only in the text of tokens after the first `min_tokens` (`StopMatcher`).
    The prompt's logprobs (`set_prompt`) go out once, with the first delta released after.
    """

    def __init__(self, stop: Iterable[str], *, prompt_tokens: int, completion_tokens: int = 0,
                 min_tokens: int = 0) -> None:
        self._matcher = StopMatcher(stop)
        self._min_tokens = min_tokens
        self._text: list[str] = []
        self._ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._prompt: tuple[tuple[int, ...], tuple[TokenLogprob, ...]] = ((), ())
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
        safe, _ = self._matcher.feed(text, check=self.completion_tokens > self._min_tokens)
        self._text.append(safe)

    def set_prompt(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> None:
        """The prompt's tokens and their logprobs, for the next delta released."""
        self._prompt = (tuple(token_ids), tuple(logprobs))

    def _pop_prompt(self) -> tuple[tuple[int, ...], tuple[TokenLogprob, ...]]:
        prompt, self._prompt = self._prompt, ((), ())
        return prompt

    def take(self, *, text_complete: bool = True) -> Delta | None:
        """The delta to send now, if at a clean point and there is something to send.

        Pass `text_complete=False` while the detokenizer still holds partial text.
        """
        if not text_complete or self._matcher.held or self.stopped or not self._ids:
            return None
        text, ids, logprobs = "".join(self._text), tuple(self._ids), tuple(self._logprobs)
        self._text, self._ids, self._logprobs = [], [], []
        prompt_ids, prompt_logprobs = self._pop_prompt()
        return Delta(text=text, token_ids=ids, logprobs=logprobs, prompt_token_ids=prompt_ids,
                     prompt_logprobs=prompt_logprobs)

    def finish(self, reason: FinishReason, tail: str = "") -> Delta:
        """The final delta: everything pending plus `tail` (the detokenizer's rest).

        A stop string found in `tail` or already hit makes the reason "stop".
        """
        if not self.stopped:
            safe, _ = self._matcher.feed(tail, check=self.completion_tokens > self._min_tokens)
            self._text.append(safe + self._matcher.flush())
        if self.stopped:
            reason = "stop"
        prompt_ids, prompt_logprobs = self._pop_prompt()
        return Delta(
            text="".join(self._text),
            token_ids=tuple(self._ids),
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            logprobs=tuple(self._logprobs),
            cached_prompt_tokens=self.cached_prompt_tokens,
            prompt_token_ids=prompt_ids,
            prompt_logprobs=prompt_logprobs,
        )
