"""Sampling (penalties, filters, position-keyed draws) and streaming text helpers."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from maas.services.worker.engines.base import SamplingParams
from maas.services.worker.engines.sampling import (
    Row,
    StopMatcher,
    apply_penalties,
    filter_logits,
    position_noise,
    sample_batch,
    sample_next_token,
)
from maas.services.worker.engines.text import DeltaAssembler, IncrementalDetokenizer


def _logits(seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(logits: torch.Tensor, params: SamplingParams, *, seed: int = 7, position: int = 5) -> int:
    return sample_next_token(logits, params, seed=seed, prompt_ids=[0] * position, output_ids=[])


def test_greedy_is_argmax() -> None:
    for s in range(5):
        logits = _logits(s)
        assert _sample(logits, SamplingParams(temperature=0)) == int(torch.argmax(logits))


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    for s in range(5):
        logits = _logits(s)
        best = int(torch.argmax(logits))
        for position in range(10):
            assert _sample(logits, SamplingParams(temperature=1.5, top_k=1), position=position) == best
            assert _sample(logits, SamplingParams(temperature=1.5, top_p=1e-6), position=position) == best


def test_filters_keep_the_right_tokens() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_k=2)))
    assert kept.tolist() == [True, True, False, False, False]
    # Probabilities are ~0.64, 0.24, 0.09, ...: 0.8 needs the first two tokens.
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.8)))
    assert kept.tolist() == [True, True, False, False, False]


def test_draw_depends_only_on_seed_and_position() -> None:
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1000)  # uniform: every draw is decided by the noise alone
    a = sample_next_token(logits, params, seed=3, prompt_ids=[1, 2, 3], output_ids=[4, 5])
    b = sample_next_token(logits, params, seed=3, prompt_ids=[9, 9], output_ids=[8, 7, 6])
    assert a == b  # same position (5), different history
    noise = position_noise(torch.tensor([3, 3, 4]), torch.tensor([5, 5, 5]), 64)
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert (noise > 0).all() and 0.8 < noise.mean() < 1.2  # Exp(1)
    by_position = {_sample(logits, params, seed=3, position=p) for p in range(20)}
    by_seed = {_sample(logits, params, seed=s, position=5) for s in range(20)}
    assert len(by_position) > 10 and len(by_seed) > 10


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    params = SamplingParams(temperature=1.0)
    draws = [_sample(probs.log(), params, position=p) for p in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)


def test_penalties_move_logits_the_right_way() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1])
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.5]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    pen = apply_penalties(logits, params, prompt_ids=[3], output_ids=[2, 2, 0])
    assert pen.tolist() == pytest.approx([2.0 - 0.75, -2.0, 1.0 - 1.0, 0.5])
    # Negative penalties encourage repetition instead.
    enc = apply_penalties(logits, SamplingParams(presence_penalty=-1.0), prompt_ids=[], output_ids=[1])
    assert enc[1] == -1.0
    assert torch.equal(apply_penalties(logits, SamplingParams(), prompt_ids=[0], output_ids=[1]), logits)


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([3.0, 2.9, 0.0])
    params = SamplingParams(temperature=0, frequency_penalty=0.5)
    assert sample_next_token(logits, params, seed=0, prompt_ids=[], output_ids=[]) == 0
    assert sample_next_token(logits, params, seed=0, prompt_ids=[], output_ids=[0]) == 1


def _feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out, hit = [], False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            break
    return out, hit


def test_stop_matcher_across_token_boundaries() -> None:
    matcher = StopMatcher(["STOP"])
    out, hit = _feed_all(matcher, ["hello S", "T", "O", "P and more"])
    assert hit and out == ["hello ", "", "", ""]
    assert matcher.flush() == ""


def test_stop_matcher_releases_false_alarms() -> None:
    matcher = StopMatcher(["\n\n", "END"])
    out, hit = _feed_all(matcher, ["a\n", "b E", "N", "x"])
    assert not hit and out == ["a", "\nb ", "", "ENx"]
    held, hit = matcher.feed("EN")
    assert (held, hit) == ("", False) and matcher.flush() == "EN"


def test_stop_matcher_earliest_stop_wins_and_nothing_after_it() -> None:
    matcher = StopMatcher(["bc", "abcd"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("cd tail") == ("", True)  # "abcd" starts before "bc"
    assert matcher.feed("more") == ("", True)


def _byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: every byte is one token, the worst case."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class _Decoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def test_incremental_detokenizer_never_splits_characters() -> None:
    tokenizer = _byte_tokenizer()
    text = "naïve café → 世界 🎉 ok"
    ids = tokenizer.encode(text).ids
    assert len(ids) == len(text.encode())
    detok = IncrementalDetokenizer(_Decoder(tokenizer))
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text
    assert "" in pieces  # some bytes had to wait for the rest of their character


def test_incremental_detokenizer_continues_after_context() -> None:
    tokenizer = _byte_tokenizer()
    ids = tokenizer.encode("héllo wörld").ids
    detok = IncrementalDetokenizer(_Decoder(tokenizer), context_ids=ids[:7])
    rest = "".join(detok.push(i) for i in ids[7:]) + detok.flush()
    assert tokenizer.decode(ids[:7]) + rest == "héllo wörld"


def test_delta_assembler_sends_only_at_clean_points() -> None:
    out = DeltaAssembler(["STOP"], prompt_tokens=3)
    out.add(1, "ab")
    first = out.take()
    assert first is not None and (first.text, first.token_ids) == ("ab", (1,))
    out.add(2, "cS")  # "S" might start STOP: hold text and token together
    assert out.take() is None
    out.add(3, "x")
    second = out.take()
    assert second is not None and (second.text, second.token_ids) == ("cSx", (2, 3))
    out.add(4, "yST")
    out.add(5, "OPz")
    assert out.stopped
    last = out.finish("length")
    assert (last.text, last.token_ids, last.finish_reason) == ("y", (4, 5), "stop")
    assert (last.prompt_tokens, last.completion_tokens) == (3, 5)


def test_a_row_draws_the_same_token_alone_and_in_any_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    rows = [Row(SamplingParams(temperature=0.9, top_p=0.95 if i % 2 else 1.0, top_k=50 if i == 3 else 0),
                seed=100 + i, prompt_ids=[1] * (i + 2), output_ids=[2] * i) for i in range(5)]
    rows.append(Row(SamplingParams(temperature=0), seed=0, prompt_ids=[1], output_ids=[]))
    together = sample_batch(logits, rows)
    alone = [sample_batch(logits[i:i + 1], [row])[0] for i, row in enumerate(rows)]
    reversed_batch = sample_batch(logits.flip(0), rows[::-1])[::-1]
    assert together == alone == reversed_batch
    assert together[-1] == int(torch.argmax(logits[-1]))
