"""The stream guard over many random texts, phrase sets and chunkings: the output never
contains a blocked phrase, and it is the same however the stream was cut."""

from __future__ import annotations

import random
import re

import pytest

from maas.pipelines.guard import PhraseGuard

ALPHABET = "abcAB "  # small, so phrases (and overlaps between them) occur often


def run(guard: PhraseGuard, chunks: list[str]) -> str:
    return "".join(guard.feed(c) for c in chunks) + guard.finish()


def cut(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.choice((0, 1, 1, 2, 3, 5, 8))
        chunks.append(text[i:i + n])
        i += n
    return chunks


@pytest.mark.parametrize("action", ["stop", "redact"])
def test_no_chunking_lets_a_blocked_phrase_out_or_changes_the_output(action: str) -> None:
    rng = random.Random(20261202)
    for _ in range(400):
        phrases = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        whole = run(PhraseGuard(phrases, action=action, replacement="#"), [text])
        blocked = re.compile("|".join(map(re.escape, phrases)), re.IGNORECASE)
        if action == "stop":
            assert not blocked.search(whole)
            first = blocked.search(text)
            assert whole == (text[:first.start()] if first else text)
        for _ in range(10):
            chunked = run(PhraseGuard(phrases, action=action, replacement="#"), cut(text, rng))
            assert chunked == whole, (phrases, text)
            if action == "redact":
                assert not blocked.search(chunked.replace("#", " "))


def test_it_holds_back_only_what_a_match_could_still_need() -> None:
    guard = PhraseGuard(["password"])
    assert guard.feed("my pass") == ""          # 7 characters: all could start "password"
    assert guard.feed("port is") == "my pass"   # 14 seen, the last 7 held back
    assert guard.feed(" x") == "po"
    assert guard.finish() == "rt is x"
    stop = PhraseGuard(["PassWord"])
    assert stop.feed("the password is hunter2") == "the " and stop.blocked
    assert stop.feed(" more") == "" and stop.finish() == ""


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError):
        PhraseGuard([])
    with pytest.raises(ValueError):
        PhraseGuard(["x"], action="warn")
    with pytest.raises(ValueError, match="replacement"):
        PhraseGuard(["secret"], action="redact", replacement="[secret]")


def test_a_replacement_that_could_make_a_phrase_is_refused() -> None:
    with pytest.raises(ValueError, match="text beside it"):
        PhraseGuard(["d]pass"], action="redact")  # "[redacted]" + "pass..." would make it
    with pytest.raises(ValueError, match="text beside it"):
        PhraseGuard(["xx[re"], action="redact")   # "...xx" + "[redacted]" would make it
    guard = PhraseGuard(["password"], action="redact")
    assert guard.feed("a password here") + guard.finish() == "a [redacted] here"
