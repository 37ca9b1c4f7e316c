"""A deterministic fake engine for mesh tests: words instead of a model, no threads.

Options (all strings, from the model spec): `token_delay_ms` (default 5) is the
pause before each token, `context_length` (default 2048) the context size in words,
`load_delay_ms` (default 0) how long loading takes, `max_running` (default 0: no limit)
how many requests it serves at once before refusing more (RESOURCE_EXHAUSTED, like a
full queue in the real engine).
Prompt "tokens" are the prompt's whitespace-separated words. Each generated token is
a word picked by hashing (prompt, seed, absolute position), so a request resumed
with its already-produced tokens continues exactly as it would have. Temperature 0
ignores the seed (greedy is always the same); an unseeded sampled request derives
its seed from its request id. Stop strings, max_tokens, the context limit and the
finish reasons behave as in the real engines. A chat is rendered with the plain
`Role: content` format (`base.plain_chat`).

Its "model" is a fixed distribution at each position: the word greedy decoding picks there
has probability 1/2, each of the other 31 words 1/62. Logprobs report it (the top-N are
that word, then the others by id; a token's text is " word"); `min_p` above 1/31 keeps
only that word, so a sampled request decodes greedily. `min_tokens` and `stop_token_ids`
behave as in the real engines: a stop token drawn before min_tokens is replaced by the next
word id that is not one. Prompt logprobs: the prompt's k-th word is token
`WORDS.index(word)` (a hash of the word for one not in WORDS), its text the word with the
whitespace before it; its distribution is the one the sim decodes first after the
prompt's text up to the previous word (so the word a greedy request for that text makes
first scores 1/2).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import AsyncIterator, Sequence

from maas.mesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from maas.services.worker.engines.base import (
    ChatMessage,
    Delta,
    EngineStats,
    GenerationRequest,
    ModelSpec,
    SamplingParams,
    TokenLogprob,
    check_context,
    plain_chat,
)
from maas.services.worker.engines.text import DeltaAssembler

WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "one", "two", "three", "four", "five", "six",
)  # fmt: skip
FAVOURITE = math.log(1 / 2)  # the logprob of the word greedy decoding picks at a position
OTHER = math.log(1 / 62)     # and of each of the other 31
MIN_P_KEEPS_ONE = 1 / 31     # min_p above the others' share of the favourite's probability


def _prompt_key(adapter: str, prompt: str) -> str:
    return hashlib.blake2b(f"{adapter}|{prompt}".encode(), digest_size=16).hexdigest()


def _word_id(word: str) -> int:
    if word in WORDS:
        return WORDS.index(word)
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % len(WORDS)


def _logprob(token: int, favourite: int, top_n: int, text: str) -> TokenLogprob:
    """`token` under the distribution whose favourite word is `favourite`, with the top-N."""
    top = [favourite, *(t for t in range(len(WORDS)) if t != favourite)][:top_n]
    return TokenLogprob(token, FAVOURITE if token == favourite else OTHER,
                        tuple((t, FAVOURITE if t == favourite else OTHER) for t in top),
                        token=text, top_tokens=tuple(" " + WORDS[t] for t in top))


def _option(spec: ModelSpec, name: str, default: float, *, minimum: float) -> float:
    raw = spec.options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"sim option {name}={raw!r} is not a number", field=name) from None
    if not value >= minimum:
        raise InvalidArgument(f"sim option {name} must be >= {minimum}, got {raw}", field=name)
    return value


class SimEngine:
    """Engine that "generates" hash-chosen words with a fixed delay per token."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.token_delay = _option(spec, "token_delay_ms", 5.0, minimum=0) / 1000
        self.context_length = int(_option(spec, "context_length", 2048, minimum=2))
        self.load_delay = _option(spec, "load_delay_ms", 0.0, minimum=0) / 1000
        self.max_running = int(_option(spec, "max_running", 0, minimum=0))  # 0: unlimited
        self._loaded = False
        self._running = 0

    async def load(self) -> None:
        await asyncio.sleep(self.load_delay)  # stands in for reading weights (cold-start tests)
        self._loaded = True

    async def close(self) -> None:
        self._loaded = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if not self._loaded:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        params = request.params
        if params.guide is not None:  # its words are not a tokenizer a grammar can be compiled against
            raise InvalidArgument(f"model {self.spec.name} runs on the sim engine, which has no constrained "
                                  "decoding (structured outputs, required tool calls): use the hf engine",
                                  field="guide")
        resumed = list(request.resume_token_ids)
        if any(not 0 <= t < len(WORDS) for t in resumed):
            raise InvalidArgument(
                "resume_token_ids holds ids outside the vocabulary", field="resume_token_ids"
            )
        outside = [t for t in params.stop_token_ids if t >= len(WORDS)]
        if outside:
            raise InvalidArgument(f"stop_token_ids holds {outside[0]}, outside the vocabulary of {self.spec.name} "
                                  f"(ids 0 to {len(WORDS) - 1})", field="stop_token_ids")
        if any(not 0 <= t < len(WORDS) for t in request.prompt_token_ids):
            raise InvalidArgument(f"prompt_token_ids holds ids outside the vocabulary of {self.spec.name} "
                                  f"(ids 0 to {len(WORDS) - 1})", field="prompt_token_ids")
        # token ids are the sim's words
        prompt = request.prompt or " ".join(WORDS[t] for t in request.prompt_token_ids)
        prompt_tokens = len(prompt.split())
        if prompt_tokens + len(resumed) >= self.context_length:
            raise InvalidArgument(
                f"prompt is {prompt_tokens + len(resumed)} tokens but the context is {self.context_length}",
                field="prompt",
            )
        check_context(params, prompt_tokens, self.context_length)
        # Greedy ignores the seed; an unseeded sampled request takes one from its id.
        seed = 0 if params.temperature == 0 else params.seed
        if seed is None:
            seed = int.from_bytes(
                hashlib.blake2b(request.request_id.encode(), digest_size=8).digest(), "little"
            )
        adapter = request.adapter.key if request.adapter else ""
        prompt_key = _prompt_key(adapter, prompt)

        out = DeltaAssembler(params.stop, prompt_tokens=prompt_tokens, completion_tokens=len(resumed),
                             min_tokens=params.min_tokens)
        if params.prompt_logprobs is not None and not resumed:  # (a resumed request's first chunk had them)
            out.set_prompt(*self._score_prompt(prompt, adapter, params.prompt_logprobs))
        if len(resumed) >= params.max_tokens:
            yield out.finish("length")
            return
        if self.max_running and self._running >= self.max_running:
            raise ResourceExhausted(f"model {self.spec.name} is running {self._running} requests, its limit",
                                    retry_after=1.0)
        self._running += 1
        try:
            async for delta in self._decode(out, prompt_key, seed, prompt_tokens, params):
                yield delta
        finally:
            self._running -= 1

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return plain_chat(messages)

    async def _decode(self, out: DeltaAssembler, prompt_key: str, seed: int, prompt_tokens: int,
                      params: SamplingParams) -> AsyncIterator[Delta]:
        ends = set(params.stop_token_ids)
        while True:
            await asyncio.sleep(self.token_delay)
            position = prompt_tokens + out.completion_tokens
            favourite = self._token(prompt_key, 0, position)  # what greedy decoding picks here
            token = favourite if params.min_p > MIN_P_KEEPS_ONE else self._token(prompt_key, seed, position)
            if token in ends and out.completion_tokens < params.min_tokens:  # masked until min_tokens
                token = next((t % len(WORDS) for t in range(token + 1, token + len(WORDS))
                              if t % len(WORDS) not in ends), token)
            logprob = None if params.logprobs is None else _logprob(token, favourite, params.logprobs,
                                                                    " " + WORDS[token])
            if token in ends:  # an end token: in token_ids, not in the text
                out.add(token, "", logprob)
                yield out.finish("stop")
                return
            out.add(token, " " + WORDS[token], logprob)
            if out.stopped:
                yield out.finish("stop")
                return
            if out.completion_tokens >= params.max_tokens or position + 1 >= self.context_length:
                yield out.finish("length")
                return
            delta = out.take()
            if delta is not None:
                yield delta

    @classmethod
    def _score_prompt(cls, prompt: str, adapter: str, top_n: int) -> tuple[list[int], list[TokenLogprob]]:
        """The prompt's tokens (words) and each one's logprob under the distribution the sim
        decodes after the prompt's text up to the word before it (the first has none)."""
        words = [m.span() for m in re.finditer(r"\S+", prompt)]
        ids: list[int] = []
        entries: list[TokenLogprob] = []
        for k, (start, end) in enumerate(words):
            token = _word_id(prompt[start:end])
            text = prompt[words[k - 1][1] if k else 0:end]  # the word and the whitespace before it
            if k == 0:
                entries.append(TokenLogprob(token, 0.0, token=text))
            else:
                favourite = cls._token(_prompt_key(adapter, prompt[:words[k - 1][1]]), 0, k)
                entries.append(_logprob(token, favourite, top_n, text))
            ids.append(token)
        return ids, entries

    @staticmethod
    def _token(prompt_key: str, seed: int, position: int) -> int:
        digest = hashlib.blake2b(f"{prompt_key}:{seed}:{position}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % len(WORDS)
