"""A stream filter that never lets a blocked phrase out, however the stream is chunked.

A phrase can straddle chunks, so the guard holds back the last `longest phrase - 1`
characters it has seen (the only ones that could begin a match still to be completed) and
releases everything before them. A match is acted on once no other phrase could still
complete starting before it or at it (so every chunking of a stream gives the output the
whole text would): `stop` releases the text before it and ends the stream; `redact`
releases a replacement in its place and goes on. Matching ignores case unless told
otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class PhraseGuard:
    def __init__(self, phrases: Sequence[str], *, action: str = "stop", case_sensitive: bool = False,
                 replacement: str = "[redacted]") -> None:
        if not phrases or any(not p for p in phrases):
            raise ValueError("a guard needs non-empty phrases")
        if action not in ("stop", "redact"):
            raise ValueError(f"action must be stop or redact, not {action!r}")
        flags = 0 if case_sensitive else re.IGNORECASE
        # longest first, so that of two phrases starting at one place the longer is taken
        self._pattern = re.compile("|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)), flags)
        if action == "redact" and self._overlaps(replacement, phrases, case_sensitive):
            raise ValueError("the replacement contains a blocked phrase, or could make one with the text beside it")
        self._hold = max(len(p) for p in phrases) - 1
        self.action = action
        self.replacement = replacement
        self._pending = ""
        self.blocked = False  # a phrase was found (with stop: the stream has ended)
        self.matches = 0

    @staticmethod
    def _overlaps(replacement: str, phrases: Sequence[str], case_sensitive: bool) -> bool:
        fold = (lambda t: t) if case_sensitive else str.lower
        r = fold(replacement)
        for phrase in map(fold, phrases):
            if phrase in r:
                return True
            for k in range(1, len(phrase)):  # its head ends the replacement, or its tail starts it
                if r.endswith(phrase[:k]) or r.startswith(phrase[k:]):
                    return True
        return False

    def feed(self, chunk: str) -> str:
        """The text that is safe to pass on now (possibly empty)."""
        if self.blocked and self.action == "stop":
            return ""
        self._pending += chunk
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the stream: whatever is still held back, checked."""
        if self.blocked and self.action == "stop":
            return ""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        out = []
        while True:
            match = self._pattern.search(self._pending)
            if match is None:
                break
            if not final and match.start() >= len(self._pending) - self._hold:
                # a longer phrase, or one starting earlier, may still complete: decide later
                # (what is before the held window is released below; the match is inside it)
                break
            self.blocked = True
            self.matches += 1
            out.append(self._pending[:match.start()])
            if self.action == "stop":
                self._pending = ""
                return "".join(out)
            out.append(self.replacement)
            self._pending = self._pending[match.end():]
        keep = 0 if final else min(self._hold, len(self._pending))
        cut = len(self._pending) - keep
        out.append(self._pending[:cut])
        self._pending = self._pending[cut:]
        return "".join(out)


__all__ = ["PhraseGuard"]
