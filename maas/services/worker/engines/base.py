"""What every engine offers the worker: domain types and the Engine protocol.

The worker's gRPC servicer converts protobuf to these types, awaits the engine and
converts back; engines never see protobuf or gRPC.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from maas.mesh.errors import FailedPrecondition, InvalidArgument

# transformers' from_pretrained changes process-wide torch state while it builds a model
# (meta-device initialisation), so two loads in parallel threads can break each other
# ("Cannot copy out of meta tensor"; seen when a worker got two replicas at once). Every
# weight load in a worker process holds this lock.
WEIGHTS_LOCK = threading.Lock()

FinishReason = Literal["stop", "length", "cancelled", "error"]


GuideKind = Literal["json_schema", "json_object", "regex", "lark"]


@dataclass(frozen=True)
class GuideSpec:
    """What a constrained output must be (`engines.guide` compiles it): a JSON schema, any
    JSON object, a regular expression or a Lark grammar, as text."""

    kind: GuideKind
    value: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling parameters (protobuf defaults resolved)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    ignore_eos: bool = False
    guide: GuideSpec | None = None
    # end-of-sequence and stop_token_ids are masked, and stop strings do not count, until
    # this many tokens are made (vLLM's min_tokens)
    min_tokens: int = 0
    min_p: float = 0.0  # after temperature: drop tokens below min_p x the top token's probability
    stop_token_ids: tuple[int, ...] = ()  # end the output (finish "stop"), not part of its text
    prompt_logprobs: int | None = None    # each prompt token's logprob, and the top-N, once

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidArgument("max_tokens must be > 0", field="max_tokens")
        if not self.temperature >= 0:  # also rejects NaN
            raise InvalidArgument("temperature must be >= 0", field="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument("top_p must be in (0, 1]", field="top_p")
        if self.top_k < 0:
            raise InvalidArgument("top_k must be >= 0", field="top_k")
        if not self.repetition_penalty > 0:
            raise InvalidArgument("repetition_penalty must be > 0", field="repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidArgument(f"{name} must be in [-2, 2]", field=name)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidArgument("logprobs must be in [0, 20]", field="logprobs")
        if any(s == "" for s in self.stop):
            raise InvalidArgument("stop strings must not be empty", field="stop")
        if self.min_tokens < 0:
            raise InvalidArgument(f"min_tokens must be >= 0, not {self.min_tokens}", field="min_tokens")
        if self.min_tokens > self.max_tokens:
            raise InvalidArgument(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                  field="min_tokens")
        if not 0 <= self.min_p <= 1:  # also rejects NaN
            raise InvalidArgument(f"min_p must be in [0, 1], not {self.min_p}", field="min_p")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidArgument("stop_token_ids must not be negative", field="stop_token_ids")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidArgument(f"prompt_logprobs must be in [0, 20], not {self.prompt_logprobs}",
                                  field="prompt_logprobs")

    def end_ids(self, eos_ids: Collection[int]) -> tuple[int, ...]:
        """The tokens that end the output: `eos_ids` (unless ignore_eos) and stop_token_ids."""
        return tuple(sorted({*(() if self.ignore_eos else eos_ids), *self.stop_token_ids}))


def check_context(params: SamplingParams, prompt_tokens: int, context_length: int) -> None:
    """Refuse a request the model's context cannot hold: its prompt plus max_tokens (tokens
    resumed from elsewhere count within max_tokens) over `context_length`. Checked before
    anything is reserved, so a huge max_tokens is a clear INVALID_ARGUMENT, not a request
    that silently stops at the context."""
    if prompt_tokens + params.max_tokens > context_length:
        raise InvalidArgument(f"max_tokens {params.max_tokens} plus the prompt's {prompt_tokens} tokens exceeds "
                              f"the model's context of {context_length} tokens", field="max_tokens")


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter: a registered version whose base is the replica's model."""

    key: str     # "name@version", unique per adapter version
    source: str  # directory with adapter_config.json and the adapter weights


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    # Tokens already produced for this request elsewhere; the engine continues after them.
    resume_token_ids: tuple[int, ...] = ()
    adapter: AdapterRef | None = None
    # whose request, and that tenant's weight: engines with a queue share their slots
    # fairly by them (`engines.fair`)
    tenant: str = ""
    weight: float = 1.0
    priority: int = 1  # its class: 0 interactive, 1 standard, 2 batch (`engines.fair`)
    # False: the engine may send one delta at the end instead of one per step (a unary call
    # reads them all anyway; every message it saves is work for each hop)
    stream: bool = True
    # the prompt as the tokenizer's ids, used as given (no BOS added), instead of `prompt`
    prompt_token_ids: tuple[int, ...] = ()
    # the tenant's provisioned throughput on this replica, completion tokens a second (0:
    # none); engines with a queue rank its requests a class up within it (`engines.fair`)
    reserved_rate: float = 0.0
    # the router found it within its share of the tenant's reservation: engines without
    # buckets of their own (vLLM) rank it a class up (`marked_priority`)
    reserved: bool = False

    def __post_init__(self) -> None:
        if self.prompt and self.prompt_token_ids:
            raise InvalidArgument("give either prompt or prompt_token_ids, not both", field="prompt_token_ids")
        if not self.prompt and not self.prompt_token_ids:
            raise InvalidArgument("prompt must not be empty", field="prompt")
        if not self.weight > 0:  # NaN fails too
            raise InvalidArgument(f"a tenant's weight must be > 0, not {self.weight}", field="tenant_weight")
        if self.priority not in (0, 1, 2):
            raise InvalidArgument(f"priority must be 0, 1 or 2, not {self.priority}", field="service_class")
        if not 0 <= self.reserved_rate < float("inf"):  # NaN fails too
            raise InvalidArgument(f"a reserved rate must be >= 0 tokens/s, not {self.reserved_rate}",
                                  field="reserved_tokens_per_s")

    @property
    def marked_priority(self) -> int:
        """Its class, a class up if the router marked it `reserved`: for engines that keep no
        per-tenant buckets (the built-in engine goes by `reserved_rate` when it has one)."""
        return max(0, self.priority - self.reserved)


CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat; engines render a list of them into a prompt (`render_chat`)."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in CHAT_ROLES:
            raise InvalidArgument(f"message role must be one of {', '.join(CHAT_ROLES)}, got {self.role!r}",
                                  field="messages")


def plain_chat(messages: Sequence[ChatMessage]) -> str:
    """The chat format for models without a chat template: one `Role: content` paragraph
    per message, then `Assistant:` for the model to continue.

        System: You are terse.

        User: Hi!

        Assistant:
    """
    turns = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


class TemplateChats:
    """`render_chat` and `render_tool_chat` through the model's own tokenizer (`_tokenizer`,
    None until loaded), for the engines that hold one (`hf.render_chat`)."""

    spec: ModelSpec
    _tokenizer: Any

    def _loaded_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        return self._tokenizer

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The tokenizer's chat template (with the generation prompt), or `plain_chat` for a
        tokenizer without one."""
        from maas.services.worker.engines.chat import render_chat

        return render_chat(self._loaded_tokenizer(), messages, self.spec.name)

    def render_tool_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                         add_generation_prompt: bool = True) -> str | None:
        """A chat with tools through the template itself, if it renders them (`hf.render_tool_chat`)."""
        from maas.services.worker.engines.chat import render_tool_chat

        return render_tool_chat(self._loaded_tokenizer(), messages, tools, self.spec.name,
                                add_generation_prompt=add_generation_prompt)


def option_int(spec: ModelSpec, name: str, default: int, minimum: int = 1) -> int:
    """The model version's option `name` as a whole number >= `minimum`, or `default` if unset."""
    raw = spec.options.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or int(raw) < minimum:
        raise InvalidArgument(f"option {name} must be an integer >= {minimum}, got {raw!r}", field=name)
    return int(raw)


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a token under the model, and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first
    # the token's own text (`text.token_string`), and each alternative's (as `top`); "" if unknown
    token: str = ""
    top_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output since the previous delta. The last one has finish_reason set."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them
    cached_prompt_tokens: int = 0            # on the last delta: prompt tokens served from the prefix cache
    # with params.prompt_logprobs, on the first delta only: the prompt's tokens and one entry
    # per prompt token; the first entry has no logprob (nothing precedes it: logprob 0, no top)
    prompt_token_ids: tuple[int, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


def merge(a: Delta, b: Delta) -> Delta:
    """`a` then `b` as one delta (b is the later one: its finish and counts win)."""
    return Delta(text=a.text + b.text, token_ids=a.token_ids + b.token_ids, finish_reason=b.finish_reason,
                 prompt_tokens=b.prompt_tokens or a.prompt_tokens,
                 completion_tokens=b.completion_tokens or a.completion_tokens,
                 logprobs=a.logprobs + b.logprobs,
                 cached_prompt_tokens=b.cached_prompt_tokens or a.cached_prompt_tokens,
                 prompt_token_ids=a.prompt_token_ids or b.prompt_token_ids,
                 prompt_logprobs=a.prompt_logprobs or b.prompt_logprobs)


def drain(queue: asyncio.Queue[Delta | BaseException], first: Delta) -> tuple[Delta, BaseException | None]:
    """`first` merged with the deltas already waiting behind it in `queue`, and an error
    that waits behind them, if one does. A reader that keeps up gets each step's delta as
    it is made; one that lags (a busy event loop, a slow client) gets what piled up as one
    message instead of one per token, so every hop after it does less work per token."""
    out = first
    while out.finish_reason is None:
        try:
            nxt = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        if isinstance(nxt, BaseException):
            return out, nxt
        out = merge(out, nxt)
    return out, None


class Pacer:
    """The engine option `stream_interval_ms`: a stream's deltas after its first go out at
    most once per interval, each carrying every token made since the last (merged by
    `drain`). The first token and the last delta are never held back, so a time to first
    token is what it was; a stream's other tokens arrive in bursts of about interval x
    tokens per second. Fewer messages per token through every hop (worker, router,
    client) is what relieves event loops busy relaying many streams; 0 (the default) sends
    each step's delta as it is made."""

    def __init__(self, spec: ModelSpec) -> None:
        self.interval = option_int(spec, "stream_interval_ms", 0, minimum=0) / 1000

    async def collect(self, queue: asyncio.Queue[Delta | BaseException], first: Delta,
                      sent_at: float | None) -> tuple[Delta, BaseException | None]:
        """What to send next, as `drain` gives it: `first` merged with what follows it
        until the interval since the last send (`sent_at`; None: nothing sent yet) is over,
        sent early when the stream's last delta or an error comes."""
        out, error = drain(queue, first)
        if not self.interval or sent_at is None:
            return out, error
        deadline = sent_at + self.interval
        while error is None and out.finish_reason is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                item = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                break
            if isinstance(item, BaseException):
                return out, item
            out, error = drain(queue, merge(out, item))
        return out, error


@dataclass(frozen=True)
class ModelSpec:
    """What an engine needs to load one model version (from the scheduler's assignment)."""

    name: str
    version: int
    format: str  # "hf" or "sim"
    source: str  # directory or hub id; ignored by sim
    task: str = "generate"
    options: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"  # the first of `devices`: where the built-in engine loads the model
    # every device of the replica (tensor parallelism: engine=vllm); empty means (device,)
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.devices:
            object.__setattr__(self, "devices", (self.device,))
        elif self.device != self.devices[0]:
            object.__setattr__(self, "device", self.devices[0])


@dataclass(frozen=True)
class EngineStats:
    """Load of one engine, for load reports and routing."""

    running: int = 0
    waiting: int = 0
    kv_cache_used: float = 0.0       # reserved share of the KV-cache budget
    tokens_per_second: float = 0.0
    prefix_hit_rate: float = 0.0


class Engine(Protocol):
    """A loaded model. `load` and `close` are idempotent; `generate` never blocks the loop."""

    context_length: int

    async def load(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Yield deltas until one carries finish_reason. Cancelling the consumer
        (closing the iterator) stops the sequence at the next step."""
        ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for a chat: the model's chat template applied, ending where the
        assistant's reply begins. Raises InvalidArgument if the template rejects the chat."""
        ...

    async def close(self) -> None: ...

    def stats(self) -> EngineStats: ...
