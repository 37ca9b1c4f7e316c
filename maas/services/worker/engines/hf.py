"""Continuous-batching engine for `transformers` causal LMs.

One scheduler thread owns the model. Between two decode steps it admits waiting
requests (while they fit the batch size and the KV-cache budget), prefills them as one
group and merges them into the running batch (`batch.DecodeBatch`); then one forward
pass decodes a token for every running sequence; sequences that finished or were
cancelled leave before the next step. The asyncio side only enqueues requests and
receives deltas, so the event loop never blocks.

Spec options (strings): `dtype` (`float32`, `bfloat16`, `float16`; default float32 on
CPU and bfloat16 or float16 on CUDA), `context_length` (lowers the model's own limit),
`max_batch` (default 64), `max_queue` (requests waiting for a batch slot, default
max_batch: beyond that a request is refused at once with a retry hint, so the time to
first token of those admitted stays bounded under overload), `kv_cache_mb`
(KV-cache budget; default 512 on CPU, 40% of free device memory on CUDA),
`prefill_tokens` (prompt tokens prefilled in one step, default 4096), `ttft_objective_ms`
(how long a higher class's request may wait for a slot to free before a lower class is
pre-empted; default 0, at once: `fair`; `interactive_ttft_objective_ms` and
`standard_ttft_objective_ms` set one class's), `max_adapters`
(LoRA adapters kept loaded, default 8), `stream_interval_ms` (`base.Pacer`; default 0)
and `prefix_cache_mb` (KV of shared prompt
prefixes kept for reuse, `prefix.PrefixCache`; default a quarter of the KV budget, 0 off).

LoRA adapters (peft) load on first use, between steps, and the least recently used idle
one is evicted past `max_adapters`. Requests for different adapters, and for none, share
one batch: each row names its adapter (peft's mixed-batch `adapter_names`).

A request for prompt logprobs skips the prefix cache (every prompt position's logits are
needed) and is prefilled in a forward pass of its own that keeps them, so the other rows
of its admission group do not pay for them.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maas.mesh.errors import (
    EngineDead,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    ResourceExhausted,
    Unavailable,
)
from maas.mesh.kvblocks import KvEvents
from maas.mesh.service_classes import CLASSES
from maas.services.worker.engines import metrics
from maas.services.worker.engines.base import (
    WEIGHTS_LOCK,
    AdapterRef,
    Delta,
    EngineStats,
    FinishReason,
    GenerationRequest,
    ModelSpec,
    Pacer,
    TemplateChats,
    TokenLogprob,
    check_context,
    option_int,
)
from maas.services.worker.engines.batch import DecodeBatch
from maas.services.worker.engines.chat import render_chat, render_tool_chat  # noqa: F401 - re-exported (jobs.py)
from maas.services.worker.engines.fair import FairQueue, Reservation, victim
from maas.services.worker.engines.guide import Guides
from maas.services.worker.engines.prefix import KV, PREFIX_BLOCK, PrefixCache
from maas.services.worker.engines.sampling import (
    Row,
    prompt_logprobs,
    request_seed,
    sample_batch,
    token_logprobs,
)
from maas.services.worker.engines.text import DeltaAssembler, IncrementalDetokenizer, TokenStrings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_CONTEXT = 2048     # tokens, for a model that states no context length
_MAX_STATED_CONTEXT = 1 << 24  # a tokenizer's model_max_length above this means "not set" (transformers: 1e30)
MiB = 1024 * 1024
RESERVATION_IDLE = 10.0  # seconds without a request carrying a tenant's rate before its reservation here goes


class Sink(Protocol):
    """Where the scheduler thread hands a step's output: deltas (or the error that ended a
    sequence), many sequences at once. Called on the scheduler thread; must not block."""

    def deliver(self, items: list[tuple[_Sequence, Delta | BaseException]]) -> None: ...


@dataclass(frozen=True)
class LoopSink:
    """Deliver into the sequences' asyncio queues on `loop`: one wake-up of the loop per step
    (sinks of one loop are equal, so a step groups their sequences)."""

    loop: asyncio.AbstractEventLoop

    def deliver(self, items: list[tuple[_Sequence, Delta | BaseException]]) -> None:
        self.loop.call_soon_threadsafe(_put_all, items)


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine. Written by the scheduler thread, except `cancelled`."""

    request_id: str
    row: Row
    adapter: AdapterRef | None
    sink: Sink
    queue: asyncio.Queue[Delta | BaseException] | None  # LoopSink's: where generate() reads
    tag: object  # the sink's name for this sequence (ProcessEngine: the worker's key)
    detok: IncrementalDetokenizer
    out: DeltaAssembler
    reserved_tokens: int
    tenant: str = ""      # whose request, its weight and its class: slots are shared fairly (`fair`)
    weight: float = 1.0
    priority: int = 1
    arrived: float = field(default_factory=time.perf_counter)
    queued_at: float = field(default_factory=time.perf_counter)  # its latest wait for a slot began
    last_token_at: float = 0.0
    cancelled: bool = False
    done: bool = False
    preempted: int = 0    # times it left the batch for another tenant's share
    reserved_rate: float = 0.0  # its tenant's provisioned throughput here (tokens/s; `fair.Reservation`)
    promoted: int = -1    # its output's length when its reservation promoted it a class up (-1: not)
    charged: int = 0      # what the promotion took from the reservation (refunded less what it made)
    stream: bool = True   # a delta per step; False: one at the end
    prompt_logprobs_due: bool = False  # asked for prompt logprobs, not computed yet (once: not at a re-prefill)

    @property
    def context(self) -> int:
        """Tokens a re-prefill would compute (what pre-empting it costs)."""
        return len(self.row.prompt_ids) + len(self.row.output_ids)

    @property
    def output(self) -> list[int]:
        return self.row.output_ids  # type: ignore[return-value]


TOKENIZE_INLINE_CHARS = 8192


def _put_all(items: list[tuple[_Sequence, Delta | BaseException]]) -> None:
    for seq, item in items:
        assert seq.queue is not None
        seq.queue.put_nowait(item)




def _context_length(config: Any, tokenizer: Any) -> int:
    """The model's context in tokens: its config's `max_position_embeddings` (transformers maps
    other names, such as GPT-2's n_positions, onto it), else its tokenizer's `model_max_length`
    when that is a real limit, else _DEFAULT_CONTEXT."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        return positions
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated <= _MAX_STATED_CONTEXT:
        return stated
    return _DEFAULT_CONTEXT


def _token_bytes(tokenizer: Any, guides: Guides) -> Callable[[int], bytes]:
    """Each token's bytes (`TokenStrings`): llguidance's table of the vocabulary, the one
    constrained decoding uses (exact for byte-level BPE pieces and for SentencePiece's byte
    pieces and word-start spaces), or for a tokenizer it cannot convert (a slow one) the
    token decoded alone, as vLLM does."""
    try:
        table = guides.ll_tokenizer()
    except Exception as exc:  # any tokenizer llguidance cannot read falls back
        log.info("token strings decode each token alone (llguidance cannot read the tokenizer: %s)", exc)
        return lambda token: str(tokenizer.decode([token])).encode()
    return lambda token: bytes(table.decode_bytes([token]))


class HFEngine(TemplateChats):
    """A `transformers` causal LM loaded from `spec.source` with `from_pretrained`."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.context_length = 0
        self.max_batch = option_int(spec, "max_batch", 64)
        self.max_queue = option_int(spec, "max_queue", self.max_batch, minimum=0)
        self.prefill_tokens = option_int(spec, "prefill_tokens", 4096)
        self.max_adapters = option_int(spec, "max_adapters", 8)
        self._pacer = Pacer(spec)  # stream_interval_ms
        # a higher class's request may wait this long for a slot before a lower class is pre-empted (0: at once):
        # `ttft_objective_ms` for every class, `<class>_ttft_objective_ms` for one (by priority)
        everyone = option_int(spec, "ttft_objective_ms", 0, minimum=0)
        self.ttft_objectives = tuple(option_int(spec, f"{name}_ttft_objective_ms", everyone, minimum=0) / 1000
                                     for name in CLASSES)
        self._adapters: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU, scheduler thread
        self._device = self._parse_device(spec.device)
        self._model: Any = None  # a PreTrainedModel, wrapped in a PeftModel once adapters load
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._guides: Guides | None = None  # constrained decoding (`guide`), once loaded
        self._strings: TokenStrings | None = None  # tokens' texts for logprobs, once loaded
        self._extra: dict[str, Any] = {}
        self._kv_budget_tokens = 0
        self._label = f"{spec.name}@{spec.version}"
        self._m_tokens = metrics.TOKENS.labels(self._label)
        self._m_ttft = metrics.TTFT.labels(self._label)
        self._m_itl = metrics.ITL.labels(self._label)
        self._load_lock = asyncio.Lock()
        # shared between the event loop and the scheduler thread, guarded by _cv
        self._cv = threading.Condition()
        self._waiting: FairQueue[_Sequence] = FairQueue()  # per tenant, fairly (`fair`)
        self._closing = False
        self._dead: MaasError | None = None  # why the engine stopped serving (died or closed)
        # scheduler thread only
        self._running: list[_Sequence] = []
        self._batch = DecodeBatch(self._device)
        self._reserved = 0
        self._reservations: dict[str, Reservation] = {}  # tenant -> its provisioned throughput here (under _cv)
        self._thread: threading.Thread | None = None
        self._prefix = PrefixCache(0)
        self.kv_events: KvEvents | None = None
        self._tokens_per_second = 0.0
        self._step_seconds = 0.0  # decode step time, moving average

    # ---- lifecycle -------------------------------------------------------------------

    @staticmethod
    def _parse_device(device: str) -> torch.device:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise InvalidArgument(f"unknown device {device!r}", field="device") from None
        if parsed.type not in ("cpu", "cuda"):
            raise InvalidArgument(f"unsupported device {device!r}: use cpu or cuda:N", field="device")
        return parsed

    def _dtype(self) -> torch.dtype:
        name = self.spec.options.get("dtype")
        if name is not None:
            if name not in _DTYPES:
                raise InvalidArgument(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}", field="dtype")
            return _DTYPES[name]
        if self._device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    async def load(self) -> None:
        async with self._load_lock:
            if self._model is None:
                await asyncio.to_thread(self._load_sync)
                with self._cv:
                    self._closing, self._dead = False, None
                self._thread = threading.Thread(target=self._run, name=f"engine {self._label}", daemon=True)
                self._thread.start()

    def _load_sync(self) -> None:
        spec, dtype = self.spec, self._dtype()
        log.info("loading %s from %s on %s (%s)", self._label, spec.source, self._device, dtype)
        try:
            with WEIGHTS_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(spec.source)
                model = AutoModelForCausalLM.from_pretrained(spec.source, dtype=dtype)
                model.to(self._device).eval()  # type: ignore[arg-type]
        except Exception as exc:
            raise EngineDead(f"cannot load model {spec.name} from {spec.source}: {exc}") from exc
        config = model.config
        context = _context_length(config, tokenizer)
        if "context_length" in spec.options:
            context = min(context, option_int(spec, "context_length", context, minimum=2))
        eos: set[int] = set()
        for ids in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            eos.update([ids] if isinstance(ids, int) else ids or ())
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        bytes_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        if self._device.type == "cuda":
            default_mb = int(torch.cuda.mem_get_info(self._device)[0] * 0.4 // MiB)
        else:
            default_mb = 512
        budget = option_int(self.spec, "kv_cache_mb", default_mb) * MiB
        self._kv_budget_tokens = budget // bytes_per_token
        prefix_mb = option_int(self.spec, "prefix_cache_mb", budget // MiB // 4, minimum=0)
        # what the prefix cache holds, reported for routers that route by cached prefix (kvblocks.py)
        self.kv_events = KvEvents(PREFIX_BLOCK) if prefix_mb else None
        self._prefix = PrefixCache(prefix_mb * MiB // bytes_per_token, PREFIX_BLOCK, self.kv_events)
        self._eos_ids = frozenset(eos)
        vocab = model.get_output_embeddings()
        vocab_size = int(getattr(vocab, "out_features", 0) or config.vocab_size)
        self._guides = guides = Guides(tokenizer, vocab_size, sorted(eos))
        self._strings = TokenStrings(lambda: _token_bytes(tokenizer, guides))
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self._tokenizer, self._model, self.context_length = tokenizer, model, int(context)
        log.info("%s ready: context %d, KV budget %d tokens (%d MiB), max batch %d", self._label, context,
                 self._kv_budget_tokens, budget // MiB, self.max_batch)

    async def close(self) -> None:
        async with self._load_lock:
            if self._model is None:
                return
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join)
            self._model = self._tokenizer = None
            self._adapters.clear()
            if self._device.type == "cuda":
                torch.cuda.empty_cache()

    def stats(self) -> EngineStats:
        with self._cv:
            waiting = len(self._waiting)
        return EngineStats(running=len(self._running), waiting=waiting, kv_cache_used=self._kv_used(),
                           tokens_per_second=self._tokens_per_second if self._running else 0.0,
                           prefix_hit_rate=self._prefix.hit_rate)

    # ---- the asyncio side --------------------------------------------------------------



    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the request's deltas. Closing the iterator (or cancelling its consumer)
        removes the sequence from the batch at the next step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        # long prompts tokenize off the loop, and grammars compile there (up to a second for a big one)
        if len(request.prompt) > TOKENIZE_INLINE_CHARS or request.params.guide is not None:
            seq = await asyncio.to_thread(self.prepare, request, LoopSink(loop), queue)
        else:
            seq = self.prepare(request, LoopSink(loop), queue)
        self.enqueue(seq)
        waiting: BaseException | None = None  # an error behind deltas merged into one
        sent_at: float | None = None
        try:
            while True:
                if waiting is not None:
                    raise waiting
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                item, waiting = await self._pacer.collect(queue, item, sent_at)
                yield item
                sent_at = time.monotonic()
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel(seq)

    def prepare(self, request: GenerationRequest, sink: Sink,
                queue: asyncio.Queue[Delta | BaseException] | None = None, tag: object = None) -> _Sequence:
        """Tokenize and check `request`; its deltas will go to `sink` (`tag`: the sink's
        name for it). Raises InvalidArgument or ResourceExhausted for a request the engine
        cannot take. Thread-safe."""
        if self._model is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        params = request.params
        vocab = int(self._model.get_input_embeddings().num_embeddings)
        if request.prompt_token_ids:
            prompt_ids = list(request.prompt_token_ids)
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise InvalidArgument(f"prompt_token_ids holds ids outside the vocabulary of {self.spec.name} "
                                      f"(ids 0 to {vocab - 1})", field="prompt_token_ids")
        else:
            prompt_ids = list(self._tokenizer(request.prompt)["input_ids"])
        resumed = list(request.resume_token_ids)
        if any(not 0 <= t < vocab for t in resumed):
            raise InvalidArgument("resume_token_ids holds ids outside the vocabulary", field="resume_token_ids")
        outside = [t for t in params.stop_token_ids if t >= vocab]
        if outside:
            raise InvalidArgument(f"stop_token_ids holds {outside[0]}, outside the vocabulary of {self.spec.name} "
                                  f"(ids 0 to {vocab - 1})", field="stop_token_ids")
        total = len(prompt_ids) + len(resumed)
        if total >= self.context_length:
            raise InvalidArgument(f"prompt is {total} tokens but the context of {self.spec.name} is "
                                  f"{self.context_length}", field="prompt")
        check_context(params, len(prompt_ids), self.context_length)
        reserved = len(prompt_ids) + params.max_tokens
        if reserved > self._kv_budget_tokens:
            raise ResourceExhausted(f"prompt plus max_tokens ({reserved} tokens) exceeds the KV-cache budget of "
                                    f"{self._label} ({self._kv_budget_tokens} tokens); lower max_tokens")
        guide = self._guides.start(params.guide, resumed) if params.guide is not None and self._guides else None
        if (params.logprobs is not None or params.prompt_logprobs is not None) and self._strings is not None:
            self._strings.ready()  # reads the vocabulary once, here rather than on the scheduler thread
        return _Sequence(
            request_id=request.request_id, sink=sink, queue=queue, tag=tag,
            tenant=request.tenant, weight=request.weight, stream=request.stream,
            # with its tenant's rate, this engine's own bucket decides (`_promote`)
            priority=request.priority if request.reserved_rate else request.marked_priority,
            reserved_rate=request.reserved_rate,
            reserved_tokens=reserved, adapter=request.adapter,
            row=Row(params, request_seed(params), prompt_ids, resumed, guide,
                    end_ids=params.end_ids(self._eos_ids) if params.min_tokens else ()),
            detok=IncrementalDetokenizer(self._tokenizer, context_ids=prompt_ids + resumed),
            out=DeltaAssembler(params.stop, prompt_tokens=len(prompt_ids), completion_tokens=len(resumed),
                               min_tokens=params.min_tokens),
            # a resumed request's first chunk, which carried them, went out before
            prompt_logprobs_due=params.prompt_logprobs is not None and not resumed)

    def enqueue(self, seq: _Sequence) -> None:
        """Queue a prepared sequence for admission. Raises (and queues nothing) if the queue
        is full or the engine is not serving. Thread-safe."""
        if len(seq.output) >= seq.row.params.max_tokens:  # resumed with nothing left to produce
            seq.done = True
            seq.sink.deliver([(seq, seq.out.finish("length"))])
            return
        pushed: _Sequence | None = None
        refusal: ResourceExhausted | None = None
        with self._cv:
            if self._dead is not None or self._closing:
                raise self._dead if self._dead is not None else Unavailable(
                    f"{self._label} is shutting down on this worker; retry")
            self._note_reservation(seq)
            held = self._reservations.get(seq.tenant)
            if held is not None and seq.priority == 1:  # promoted now, so a full queue ranks it so
                held.refill(time.monotonic())
                if self._try_promote(seq, held):
                    seq.priority = 0
            # requests that free batch slots will take at once do not count as queued
            queued = len(self._waiting) - max(0, self.max_batch - len(self._running))
            if queued >= self.max_queue:
                metrics.REJECTED.labels(self._label).inc()
                wait = self._time_to_free(queued)
                refusal = ResourceExhausted(f"{self._label} is overloaded: {len(self._waiting)} requests already "
                                            f"queued; retry in about {wait:.1f}s", retry_after=wait)
                # a tenant under its share of the queue takes the place of the newest request
                # of the tenant most over its own: a flood cannot lock a quiet tenant out
                pushed = self._waiting.push_out(seq, self.max_queue) if self.max_queue else None
                if pushed is None:
                    self._settle(seq)  # promoted above, refused after all: nothing made, all given back
                    raise refusal
                pushed.done = True
                self._settle(pushed)
                self._finish_metrics(pushed, "refused")
            self._waiting.append(seq)
            metrics.WAITING.labels(self._label).set(len(self._waiting))
            self._cv.notify()
        if pushed is not None and refusal is not None:  # (told outside the lock: a sink may block)
            pushed.sink.deliver([(pushed, refusal)])

    def _note_reservation(self, seq: _Sequence) -> None:
        """Keep the tenant's provisioned throughput here as its newest request that carries
        one says (the router sends it with every request of a reserved tenant but a batch's
        lines). A reservation no request has carried for RESERVATION_IDLE seconds is
        dropped in `_promote` (removed, or the tenant went quiet): not at the first request
        without one, which may come from a router that has not seen the reservation yet.
        Holds _cv."""
        if not seq.reserved_rate:
            return
        now = time.monotonic()
        held = self._reservations.get(seq.tenant)
        if held is None:
            self._reservations[seq.tenant] = Reservation(seq.reserved_rate)
            return
        if held.rate != seq.reserved_rate:  # replicas came or went
            held.refill(now)
            held.rate = seq.reserved_rate
        held.seen = now

    def _try_promote(self, seq: _Sequence, held: Reservation) -> bool:
        """Promote `seq`, a waiting standard request, a class up if its tenant's reservation
        holds tokens, charging it (`Reservation.charge`). Holds _cv."""
        taken = held.charge(seq.row.params.max_tokens - len(seq.output))
        if not taken:
            return False
        seq.promoted, seq.charged = len(seq.output), taken
        return True

    def _promote(self) -> None:
        """Provisioned throughput: while a tenant's reservation here holds tokens, its waiting
        standard requests go a class up (`fair`). At scheduling time, so requests that
        queued while it was empty rise once it refills. Holds _cv."""
        now = time.monotonic()
        for tenant, held in list(self._reservations.items()):
            if now - held.seen > RESERVATION_IDLE:
                del self._reservations[tenant]
                continue
            held.refill(now)
            self._waiting.promote(tenant, lambda seq, held=held: self._try_promote(seq, held))  # type: ignore[misc]

    def _settle(self, seq: _Sequence) -> None:
        """A promoted sequence ended (finished, cancelled, refused or failed): charge its
        reservation what it made, less what it took when promoted."""
        if seq.promoted >= 0:
            with self._cv:  # (an RLock: some callers hold it already)
                held = self._reservations.get(seq.tenant)
                if held is not None:
                    held.settle(seq.charged, len(seq.output) - seq.promoted)
            seq.promoted = -1

    def _time_to_free(self, queued: int) -> float:
        """Seconds until `queued + 1` batch slots free up, if the running sequences run to
        their max_tokens at the current step time (an upper bound: some stop sooner)."""
        left = sorted(s.row.params.max_tokens - len(s.output) for s in self._running)
        if not left or not self._step_seconds:
            return 1.0
        return max(0.1, left[min(queued, len(left) - 1)] * self._step_seconds)

    def cancel(self, seq: _Sequence) -> None:
        """Stop `seq`: it leaves the batch at the next step (a no-op if it finished)."""
        seq.cancelled = True
        with self._cv:
            if seq in self._waiting:  # not admitted yet: free its queue place now
                self._waiting.remove(seq)
                self._settle(seq)
                self._finish_metrics(seq, "cancelled")

    # ---- the scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        ending: MaasError = Unavailable(f"{self._label} is shutting down on this worker; retry")
        try:
            with torch.inference_mode():
                while True:
                    with self._cv:
                        while not self._waiting and not self._running and not self._closing:
                            self._cv.wait()
                        if self._closing:
                            break
                        if self._reservations:
                            self._promote()
                        keep = self._preempt()
                    if keep is not None:  # gathered when the batch is next used, outside the lock
                        self._batch.keep_later(keep)
                    with self._cv:
                        admitted = self._admit()
                    if admitted:
                        self._prefill(admitted)
                    self._drop_finished()
                    if self._running:
                        self._decode()
                        self._drop_finished()
        except Exception as exc:
            log.exception("engine %s died", self._label)
            ending = EngineDead(f"model {self.spec.name} failed during generation: {exc}")
        finally:
            # nobody is left waiting for a token that will never come
            with self._cv:
                self._dead = ending
                everyone = [s for s in (*self._running, *self._waiting) if not s.done]
                self._waiting.clear()
            self._send([(seq, ending) for seq in everyone])
            self._running.clear()
            self._batch.reset()
            self._reserved = 0
            self._publish_gauges()

    def _preempt(self) -> list[int] | None:
        """While the batch is full, or the KV budget cannot hold the request a free slot
        would go to next, and a waiting request is owed room (a lower class runs, or a
        tenant of its class holds more than its share of what ran out: `fair.victim`), move
        the sequence that owes it back to the front of its queue: its KV is released, and
        it is prefilled again with the tokens it made when it is admitted again. Holds _cv.
        Returns the rows of the batch to keep (the caller drops the others' KV, outside the
        lock), or None when nothing was pre-empted. Cancelled sequences do not count as
        holding room (they leave at the next step anyway), nor are they chosen."""
        live = [s for s in self._running if not s.cancelled and not s.done]
        gone: list[_Sequence] = []
        classes = self._class_preemption_due(live)
        while len(live) >= self.max_batch:
            chosen = victim(live, self._waiting, self.max_batch, classes=classes)
            if chosen is None:
                break
            live.remove(chosen)
            gone.append(chosen)
        if len(live) < self.max_batch:
            # A free slot, but maybe not the KV cache for the request it would go to: the
            # rows the budget holds now are the capacity shared. Pre-empt only if that makes
            # room for it; otherwise it waits, and no work is thrown away.
            capacity, trial = len(live), list(live)
            freeing: list[_Sequence] = []
            nxt = self._waiting.next(self._usage(trial))
            while nxt is not None and not self._fits(trial, nxt):
                chosen = victim(trial, self._waiting, capacity, classes=classes)
                if chosen is None:
                    freeing = []
                    break
                trial.remove(chosen)
                freeing.append(chosen)
            live = [s for s in live if s not in freeing]
            gone.extend(freeing)
        if not gone:
            return None
        for chosen in reversed(gone):  # the first chosen ends up first in its queue
            self._reserved -= chosen.reserved_tokens
            chosen.preempted += 1
            chosen.queued_at = time.perf_counter()  # its queue time counts afresh
            self._waiting.appendleft(chosen)
            metrics.PREEMPTIONS.labels(self._label).inc()
        keep = [i for i, s in enumerate(self._running) if s not in gone]
        self._running = [self._running[i] for i in keep]
        self._publish_gauges()
        return keep

    def _usage(self, seqs: list[_Sequence]) -> dict[tuple[int, str], float]:
        """Each (class, tenant)'s dominant share of the engine in `seqs`: the larger of its
        part of the batch slots and its part of the KV budget (reserved tokens). A free slot
        goes to the tenant lowest in this for its weight, so a tenant of long requests that
        holds few slots but much of the KV cache waits behind one that holds less."""
        slots: dict[tuple[int, str], int] = {}
        tokens: dict[tuple[int, str], int] = {}
        for s in seqs:
            key = (s.priority, s.tenant)
            slots[key] = slots.get(key, 0) + 1
            tokens[key] = tokens.get(key, 0) + s.reserved_tokens
        budget = max(self._kv_budget_tokens, 1)
        return {k: max(n / self.max_batch, tokens[k] / budget) for k, n in slots.items()}

    def _fits(self, live: list[_Sequence], seq: _Sequence) -> bool:
        """Whether `seq` could join a batch of just the `live` running sequences within the
        KV budget, counted as `_admit` counts it (padded: every row as wide as the widest
        plus the longest remaining generation)."""
        if not live:
            return True
        ids = {id(s) for s in live}
        rows = [i for i, s in enumerate(self._running) if id(s) in ids]
        width = self._batch.columns_of(rows)
        remaining = max(s.row.params.max_tokens - len(s.output) for s in live)
        size = len(seq.row.prompt_ids) + len(seq.output)
        need = seq.row.params.max_tokens - len(seq.output)
        grown = (len(live) + 1) * min(max(width, size) + max(remaining, need), self.context_length)
        reserved = sum(s.reserved_tokens for s in live) + seq.reserved_tokens
        return grown <= self._kv_budget_tokens and reserved <= self._kv_budget_tokens

    def _class_preemption_due(self, live: list[_Sequence]) -> bool:
        """Whether a lower class should be pre-empted for the highest class waiting now: at
        once without a TTFT objective; with one, only when no running sequence will reach
        its max_tokens (freeing a slot, at the measured step time) before the oldest
        waiting request of that class has waited its class's objective out."""
        top = self._waiting.top()
        objective = self.ttft_objectives[min(top, len(CLASSES) - 1)] if top is not None else 0.0
        if not objective or not live or not self._step_seconds:
            return True
        oldest = self._waiting.oldest(top) if top is not None else None
        if oldest is None:
            return True
        left = objective - (time.perf_counter() - oldest)
        soonest = min(s.row.params.max_tokens - len(s.output) for s in live) * self._step_seconds
        return soonest >= left

    def _admit(self) -> list[_Sequence]:
        """Pop waiting requests that fit, the next one chosen fairly across tenants
        (`fair.FairQueue.next`), in arrival order within a tenant. Holds _cv.

        One class per prefill pass (the first admitted's), so a lower class never lengthens
        a higher class's time to first token. Three limits: batch slots; the KV budget, counted as the cache really grows (every
        row as wide as the widest: rows x (widest prompt + longest remaining generation),
        so padding is paid for); and the prefill pass, also counted padded (rows x longest
        prompt), so one long prompt does not make a group of short ones expensive."""
        admitted: list[_Sequence] = []
        rows = len(self._running)
        width = self._batch.columns
        remaining = max((s.row.params.max_tokens - len(s.output) for s in self._running), default=0)
        longest = 0
        while self._waiting and rows + len(admitted) < self.max_batch:
            seq = self._waiting.next(self._usage([*self._running, *admitted]))
            assert seq is not None
            if seq.cancelled:
                self._waiting.pop(seq)
                self._settle(seq)
                self._finish_metrics(seq, "cancelled")
                continue
            if admitted and seq.priority != admitted[0].priority:
                break  # a lower class waits for the next pass: it would lengthen a higher class's prefill
            size = len(seq.row.prompt_ids) + len(seq.output)
            need = seq.row.params.max_tokens - len(seq.output)
            grown = (rows + len(admitted) + 1) * min(max(width, longest, size) + max(remaining, need),
                                                     self.context_length)
            if admitted or rows:
                if grown > self._kv_budget_tokens or self._reserved + seq.reserved_tokens > self._kv_budget_tokens:
                    break
                if admitted and (len(admitted) + 1) * max(longest, size) > self.prefill_tokens:
                    break
            self._waiting.pop(seq)
            self._reserved += seq.reserved_tokens
            longest, remaining = max(longest, size), max(remaining, need)
            admitted.append(seq)
        self._publish_gauges()
        return admitted

    def _load_adapters(self, seqs: list[_Sequence]) -> list[_Sequence]:
        """Make sure every admitted sequence's adapter is loaded; fail those whose adapter cannot be."""
        ready = []
        group = {s.adapter.key for s in seqs if s.adapter is not None}
        for seq in seqs:
            try:
                if seq.adapter is not None:
                    self._ensure_adapter(seq.adapter, keep=group)
                ready.append(seq)
            except Exception as exc:
                log.warning("adapter %s failed to load: %s", seq.adapter.key if seq.adapter else "", exc)
                self._reserved -= seq.reserved_tokens
                self._settle(seq)
                self._finish_metrics(seq, "error")
                self._send([(seq, FailedPrecondition(
                    f"cannot load adapter {seq.adapter.key if seq.adapter else ''}: {exc}"))])
        return ready

    def _ensure_adapter(self, adapter: AdapterRef, keep: set[str]) -> None:
        if adapter.key in self._adapters:
            self._adapters.move_to_end(adapter.key)
            return
        from peft import PeftModel

        started = time.perf_counter()
        try:
            with WEIGHTS_LOCK:
                if isinstance(self._model, PeftModel):
                    self._model.load_adapter(adapter.source, adapter_name=adapter.key)
                else:
                    self._model = PeftModel.from_pretrained(self._model, adapter.source, adapter_name=adapter.key)
        except Exception:
            self._undo_adapter(adapter.key)
            raise
        self._model.eval()
        self._adapters[adapter.key] = None
        log.info("loaded adapter %s in %.2fs", adapter.key, time.perf_counter() - started)
        busy = {s.adapter.key for s in self._running if s.adapter is not None} | keep | {adapter.key}
        for key in [k for k in self._adapters if k not in busy][:max(0, len(self._adapters) - self.max_adapters)]:
            self._model.delete_adapter(key)
            del self._adapters[key]
            log.info("evicted adapter %s (least recently used)", key)

    def _undo_adapter(self, key: str) -> None:
        """A failed load can leave LoRA layers injected into the model: take them out again so
        the base model (and the other adapters) answer exactly as before."""
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(self._model, PeftModel):
            if key in self._model.peft_config:
                self._model.delete_adapter(key)
            return
        for name, module in list(self._model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = name.rpartition(".")
                setattr(self._model.get_submodule(parent) if parent else self._model, child, module.get_base_layer())

    def _extra_for(self, seqs: list[_Sequence]) -> dict[str, Any]:
        if not self._adapters:
            return self._extra
        return {**self._extra, "adapter_names": [s.adapter.key if s.adapter else "__base__" for s in seqs]}

    def _prefill(self, seqs: list[_Sequence]) -> None:
        seqs = self._load_adapters(seqs)
        if not seqs:
            return
        now = time.perf_counter()
        for seq in seqs:
            metrics.QUEUE.labels(self._label).observe(now - seq.queued_at)
            metrics.TENANT_QUEUE.labels(self._label, seq.tenant or "-").observe(now - seq.queued_at)
        # rows that score their prompt (prompt logprobs) go last, in a pass of their own that
        # keeps every position's logits: the others do not pay for those
        scoring = [s for s in seqs if s.prompt_logprobs_due]
        seqs = [s for s in seqs if not s.prompt_logprobs_due] + scoring
        plain = len(seqs) - len(scoring)
        first = len(self._running)
        # prompts whose prefix is cached compute only the rest, except those scoring theirs
        rows: list[tuple[KV | None, list[int]]] = []
        prompts = []
        for seq in seqs:
            ids = [*seq.row.prompt_ids, *seq.output]
            found = None if seq.prompt_logprobs_due else self._prefix.lookup(self._namespace(seq), ids)
            cached, kv = found if found is not None else (0, None)
            if not seq.preempted:  # a re-prefill is the engine's cost, not the request's prompt
                seq.out.cached_prompt_tokens = cached
            rows.append((kv, ids[cached:]))
            prompts.append(ids)
        self._running.extend(seqs)  # before the forward pass: if it fails, they hear about it
        self._publish_gauges()
        fresh = [s for s in seqs if not s.preempted]
        metrics.PROMPT_TOKENS.labels(self._label).inc(sum(len(s.row.prompt_ids) for s in fresh))
        metrics.CACHED_TOKENS.labels(self._label).inc(sum(s.out.cached_prompt_tokens for s in fresh))
        logits, own = self._forward(seqs, rows, plain)
        # first tokens out before the rows join the batch (a copy of its whole cache) and
        # before the prefix cache takes their prompts
        self._accept(seqs, logits, rows=range(first, first + len(seqs)))
        for seq, ids, kv in zip(seqs, prompts, own, strict=True):
            if not seq.preempted:  # (its prompt went in at its first prefill; output would crowd shared prefixes)
                self._prefix.insert(self._namespace(seq), ids, kv)

    def _forward(self, seqs: list[_Sequence], rows: list[tuple[KV | None, list[int]]], plain: int
                 ) -> tuple[torch.Tensor, list[KV]]:
        """Prefill `rows` into the batch: the first `plain` in one pass, the rest (scoring their
        prompts) in a second that keeps every position's logits. Returns every row's last
        logits [rows, vocab] and its own KV."""
        parts: list[torch.Tensor] = []
        own: list[KV] = []
        if plain:
            logits, kvs = self._batch.prefill(self._model, rows[:plain], self._extra_for(seqs[:plain]))
            parts.append(logits)
            own.extend(kvs)
        if plain < len(seqs):
            extra = self._extra_for(seqs[plain:])
            if "logits_to_keep" in extra:
                extra = {**extra, "logits_to_keep": 0}  # every position
            logits, kvs = self._batch.prefill(self._model, rows[plain:], extra, every_position=True)
            self._score_prompts(seqs[plain:], logits)
            parts.append(logits[:, -1, :])
            own.extend(kvs)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), own

    def _score_prompts(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Give each sequence its prompt's logprobs, from its prefill's logits at every
        position ([rows, width, vocab], right-aligned), for its first delta."""
        width = logits.shape[1]
        for i, seq in enumerate(seqs):
            ids = seq.row.prompt_ids
            entries = prompt_logprobs(logits[i, width - len(ids):], ids, seq.row.params.prompt_logprobs or 0)
            if self._strings is not None:
                entries = [self._strings.name(e) for e in entries]
            seq.out.set_prompt(ids, entries)
            seq.prompt_logprobs_due = False

    @staticmethod
    def _namespace(seq: _Sequence) -> str:
        return seq.adapter.key if seq.adapter is not None else ""

    def _decode(self) -> None:
        started = time.perf_counter()
        logits = self._batch.step(self._model, self._extra_for(self._running))
        metrics.BATCH.labels(self._label).observe(len(self._running))
        self._accept(self._running, logits, rows=range(len(self._running)))
        elapsed = time.perf_counter() - started
        rate = len(self._running) / elapsed if elapsed > 0 else 0.0
        self._tokens_per_second = 0.9 * self._tokens_per_second + 0.1 * rate
        self._step_seconds = 0.9 * self._step_seconds + 0.1 * elapsed if self._step_seconds else elapsed

    def _accept(self, seqs: list[_Sequence], logits: torch.Tensor, rows: range) -> None:
        """Sample each sequence's next token, deliver its delta, and feed it to the next step."""
        tokens = sample_batch(logits, [s.row for s in seqs])
        logprobs = token_logprobs(logits, tokens, [s.row for s in seqs])
        if self._strings is not None:
            logprobs = [None if lp is None else self._strings.name(lp) for lp in logprobs]
        now = time.perf_counter()
        self._m_tokens.inc(len(tokens))
        by_tenant: dict[str, int] = {}
        for seq in seqs:
            by_tenant[seq.tenant] = by_tenant.get(seq.tenant, 0) + 1
        for tenant, n in by_tenant.items():
            metrics.TENANT_TOKENS.labels(self._label, tenant or "-").inc(n)
        out: list[tuple[_Sequence, Delta | BaseException]] = []
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            if seq.last_token_at:
                self._m_itl.observe(now - seq.last_token_at)
            else:
                self._m_ttft.observe(now - seq.arrived)
            seq.last_token_at = now
            delta = self._advance(seq, token, logprob)
            if delta is not None:
                out.append((seq, delta))
        self._send(out)
        self._batch.set_last(list(rows), tokens)

    @staticmethod
    def _send(items: list[tuple[_Sequence, Delta | BaseException]]) -> None:
        """Hand deltas to their consumers: one delivery per sink per step, not one per token."""
        by_sink: dict[Sink, list[tuple[_Sequence, Delta | BaseException]]] = {}
        for seq, item in items:
            by_sink.setdefault(seq.sink, []).append((seq, item))
        for sink, batch in by_sink.items():
            sink.deliver(batch)

    def _advance(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> Delta | None:
        seq.output.append(token)
        params, guide = seq.row.params, seq.row.guide
        if guide is not None and not guide.consume(token):  # the mask allowed it: an engine bug
            log.error("%s: request %s drew token %d its grammar refuses: %s", self._label, seq.request_id,
                      token, guide.error)
            return self._finish(seq, "error")
        if (token in self._eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            seq.out.add(token, "", logprob)  # an end token: in token_ids, not in the text
            return self._finish(seq, "stop", seq.detok.flush())
        seq.out.add(token, seq.detok.push(token), logprob)
        if seq.out.stopped:
            return self._finish(seq, "stop")
        if guide is not None and guide.complete:  # the grammar allows nothing more
            return self._finish(seq, "stop", seq.detok.flush())
        if len(seq.output) >= params.max_tokens or seq.row.position >= self.context_length:
            return self._finish(seq, "length", seq.detok.flush())
        return seq.out.take(text_complete=not seq.detok.pending) if seq.stream else None

    def _finish(self, seq: _Sequence, reason: FinishReason, tail: str = "") -> Delta:
        seq.done = True
        self._finish_metrics(seq, reason)
        return seq.out.finish(reason, tail)

    def _finish_metrics(self, seq: _Sequence, reason: str) -> None:
        metrics.FINISHED.labels(self._label, reason).inc()
        metrics.E2E.labels(self._label).observe(time.perf_counter() - seq.arrived)

    def _drop_finished(self) -> None:
        keep = []
        for i, seq in enumerate(self._running):
            if seq.done:
                self._reserved -= seq.reserved_tokens
                self._settle(seq)
            elif seq.cancelled:
                self._reserved -= seq.reserved_tokens
                self._settle(seq)
                self._finish_metrics(seq, "cancelled")
            else:
                keep.append(i)
        if len(keep) != len(self._running):
            self._running = [self._running[i] for i in keep]
            self._batch.keep(keep)
            self._publish_gauges()

    def _kv_used(self) -> float:
        """Share of the KV budget in use: the padded cache, or what running requests reserved."""
        if not self._kv_budget_tokens:
            return 0.0
        return max(self._reserved, len(self._batch) * self._batch.columns) / self._kv_budget_tokens

    def _publish_gauges(self) -> None:
        metrics.RUNNING.labels(self._label).set(len(self._running))
        metrics.WAITING.labels(self._label).set(len(self._waiting))
        metrics.KV_USAGE.labels(self._label).set(self._kv_used())

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, the one that tokenizes its prompts (the worker's Tokenizer
        service, worker/tokenize.py); None until loaded."""
        return self._tokenizer


__all__ = ["HFEngine"]
