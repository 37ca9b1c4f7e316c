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
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence

from maas.mesh.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from maas.services.worker.engines.base import (
    ChatMessage,
    Delta,
    EngineStats,
    GenerationRequest,
    ModelSpec,
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
        prompt_tokens = len(request.prompt.split())
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
        prompt_key = hashlib.blake2b(f"{adapter}|{request.prompt}".encode(), digest_size=16).hexdigest()

        out = DeltaAssembler(params.stop, prompt_tokens=prompt_tokens, completion_tokens=len(resumed))
        if len(resumed) >= params.max_tokens:
            yield out.finish("length")
            return
        if self.max_running and self._running >= self.max_running:
            raise ResourceExhausted(f"model {self.spec.name} is running {self._running} requests, its limit",
                                    retry_after=1.0)
        self._running += 1
        try:
            async for delta in self._decode(out, prompt_key, seed, prompt_tokens, params.max_tokens):
                yield delta
        finally:
            self._running -= 1

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return plain_chat(messages)

    async def _decode(self, out: DeltaAssembler, prompt_key: str, seed: int, prompt_tokens: int,
                      max_tokens: int) -> AsyncIterator[Delta]:
        while True:
            await asyncio.sleep(self.token_delay)
            position = prompt_tokens + out.completion_tokens
            token = self._token(prompt_key, seed, position)
            out.add(token, " " + WORDS[token])
            if out.stopped:
                yield out.finish("stop")
                return
            if out.completion_tokens >= max_tokens or position + 1 >= self.context_length:
                yield out.finish("length")
                return
            delta = out.take()
            if delta is not None:
                yield delta

    @staticmethod
    def _token(prompt_key: str, seed: int, position: int) -> int:
        digest = hashlib.blake2b(f"{prompt_key}:{seed}:{position}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % len(WORDS)
