"""vLLM behind the worker's Engine interface: paged KV cache, chunked prefill, CUDA graphs,
quantization and tensor parallelism for GPU fleets, with the platform's contracts.

Chosen per model version with the option `engine=vllm` (`maas models register ...
--option engine=vllm`) or for a whole worker (`maas worker --engine vllm`). In a worker it
runs inside the engine process (`process.ProcessEngine`, which can start it with another
interpreter: `MAAS_VLLM_PYTHON`), on that process's event loop: vLLM's `AsyncLLM` is bound
to the loop it was made on, and its own engine core runs in a further process.

What maps to what:

- **sampling**: by default (`sampler=maas`) the built-in engine's sampler runs inside vLLM
  (`vllm_sampler.PositionSampler`): a token is a pure function of (seed, position), so a
  stream moved to another vLLM worker continues exactly. `sampler=vllm` uses vLLM's own
  sampler (faster on a GPU: no copy of the logits to the CPU), and then only greedy streams
  move exactly (vLLM's seeded generator restarts on the new worker).
- **stop strings, stop_token_ids, min_tokens, ignore_eos, logprobs and prompt logprobs**:
  vLLM's own. Logprobs are the model's raw ones (before penalties and temperature), as in
  the built-in engine.
- **constrained output** (`guide`): vLLM's structured outputs with its `guidance` backend,
  which is llguidance, the built-in engine's library, given the same JSON options (compact
  JSON) and the same Lark grammars (tool calls). A resumed request's grammar starts after
  the resumed tokens, so a guided stream is not moved exactly.
- **LoRA adapters**: loaded with `add_lora` before the first request that names them (a
  bad adapter is that request's error; handed to vLLM inside a request it would kill the
  engine core), at most `max_adapters` kept, the least recently used idle one removed.
- **classes**: vLLM's priority scheduling (`scheduling_policy=priority`) with the request's
  class as its priority; tenants' weights are not applied (vLLM has no per-tenant queue).
- **load**: running, waiting, KV-cache use and prefix-cache hits from vLLM's scheduler
  statistics.

Spec options (strings), besides `engine=vllm`: `dtype` (default float32 on CPU, the
model's on CUDA), `context_length`, `max_batch` (max_num_seqs, default 64), `kv_cache_mb`
(default 256 on CPU; on CUDA, `gpu_memory_utilization`, default 0.85, applies),
`max_adapters` (default 8; 0 turns LoRA off), `max_lora_rank` (default 64),
`prefix_cache` (on|off, default on), `enforce_eager` (on|off, default off),
`sampler` (maas|vllm).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from maas.mesh.errors import (
    EngineDead,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    ResourceExhausted,
    Unavailable,
)
from maas.mesh.kvblocks import KvEvents
from maas.services.worker.engines import metrics
from maas.services.worker.engines.base import (
    AdapterRef,
    Delta,
    EngineStats,
    FinishReason,
    GenerationRequest,
    ModelSpec,
    TemplateChats,
    TokenLogprob,
    check_context,
    option_int,
)
from maas.services.worker.engines.sampling import request_seed
from maas.services.worker.engines.text import DeltaAssembler, IncrementalDetokenizer, TokenStrings

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled", "repetition": "stop"}


def prefix_cache_on(spec: ModelSpec) -> bool:
    """Whether the model version keeps vLLM's prefix cache on (option prefix_cache, default on)."""
    return _option(spec, "prefix_cache", "on", ("on", "off")) == "on"


def _option(spec: ModelSpec, name: str, default: str, choices: Sequence[str]) -> str:
    value = spec.options.get(name, default)
    if value not in choices:
        raise InvalidArgument(f"option {name} must be one of {', '.join(choices)}, got {value!r}", field=name)
    return value




def _option_float(spec: ModelSpec, name: str, default: float) -> float:
    raw = spec.options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise InvalidArgument(f"option {name} must be a number in (0, 1], got {raw!r}", field=name)
    return value


class VLLMEngine(TemplateChats):
    """A vLLM `AsyncLLM` for `spec`, used from the event loop that loaded it."""

    def __init__(self, spec: ModelSpec) -> None:
        if spec.task != "generate":
            raise InvalidArgument(f"engine=vllm serves generative models only here; {spec.name} has task "
                                  f"{spec.task!r} (embedding models use the built-in engine)", field="options")
        self.spec = spec
        self.context_length = 0
        self.max_batch = option_int(spec, "max_batch", 64)
        self.max_adapters = option_int(spec, "max_adapters", 8, minimum=0)
        self.sampler = _option(spec, "sampler", "maas", ("maas", "vllm"))
        self._label = f"{spec.name}@{spec.version}"
        self._local = os.path.isdir(spec.source)  # a directory (from the registry), not a hub id
        self._engine: Any = None
        self._tokenizer: Any = None
        self._strings: TokenStrings | None = None  # tokens' texts for logprobs, once loaded
        self._eos_ids: tuple[int, ...] = ()
        self._vocab = 0
        self._load_lock = asyncio.Lock()
        self._dead: MaasError | None = FailedPrecondition(f"model {spec.name} is not loaded")
        # adapters: name@version -> vLLM's int id, least recently used first; requests using each
        self._adapters: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._adapter_users: collections.Counter[str] = collections.Counter()
        self._adapter_lock = asyncio.Lock()
        self._adapter_ids = itertools.count(1)
        self._request_ids = itertools.count()
        self._stats = EngineStats()
        self._tokens = 0
        self._tokens_since = time.monotonic()
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._m_tokens = metrics.TOKENS.labels(self._label)
        self._m_ttft = metrics.TTFT.labels(self._label)
        self._m_itl = metrics.ITL.labels(self._label)
        self._kv: Any = None  # a vllm_kv.VLLMKvFollower while loaded with the prefix cache on
        self.kv_events: KvEvents | None = None  # its blocks, for the worker's relay (kvblocks.py)

    # ---- lifecycle -------------------------------------------------------------------

    def _engine_args(self) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        spec = self.spec
        cuda = spec.device.startswith("cuda")
        kwargs: dict[str, Any] = dict(
            model=spec.source, tokenizer=spec.source, max_num_seqs=self.max_batch, seed=0,
            dtype=spec.options.get("dtype", "auto" if cuda else "float32"),
            enable_prefix_caching=prefix_cache_on(spec),
            enforce_eager=_option(spec, "enforce_eager", "off", ("on", "off")) == "on",
            scheduling_policy="priority", disable_log_stats=False,
            structured_outputs_config=StructuredOutputsConfig(backend="guidance"),
        )
        if len(spec.devices) > 1:  # tensor parallel: a rank per device, each in a vLLM worker process
            kwargs.update(tensor_parallel_size=len(spec.devices), distributed_executor_backend="mp")
        if "context_length" in spec.options:
            kwargs["max_model_len"] = option_int(spec, "context_length", 0, minimum=2)
        if cuda:
            kwargs["gpu_memory_utilization"] = _option_float(spec, "gpu_memory_utilization", 0.85)
        else:
            kwargs["kv_cache_memory_bytes"] = option_int(spec, "kv_cache_mb", 256) * MiB
        if self.max_adapters:
            # one slot more than adapters ever loaded: vLLM's CPU LoRA kernels (0.32) index the
            # slot of a row without adapter as -1, which picks the last slot's weights once every
            # slot is taken (a base request batched with adapters came out as the last adapter's)
            slots = self.max_adapters + 1
            kwargs.update(enable_lora=True, max_loras=slots, max_cpu_loras=slots,
                          max_lora_rank=option_int(spec, "max_lora_rank", 64))
        if self._kv is not None:
            kwargs["kv_events_config"] = self._kv.config()
        if self.sampler == "maas":
            kwargs["logits_processors"] = ["maas.services.worker.engines.vllm_sampler:PositionSampler"]
        return AsyncEngineArgs(**kwargs)

    async def load(self) -> None:
        async with self._load_lock:
            if self._engine is not None:
                return
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")  # one machine's engine: never look for a NIC
            if self._local:  # a model from the registry: never ask a hub about it
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            if len(self.spec.devices) == 1:
                # one device: the model runs in vLLM's engine-core process, not in a further one
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            elif not self.spec.device.startswith("cuda"):  # ranks on shared CPU cores (process.engine_env)
                from maas.services.worker.engines.process import cpu_threads_bind

                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(len(self.spec.devices)))
            from transformers import AutoTokenizer

            try:
                from vllm.v1.engine.async_llm import AsyncLLM
            except ImportError as exc:
                raise FailedPrecondition(
                    f"{self._label} asks for engine=vllm, but {sys.executable} cannot import vLLM ({exc}): install "
                    "it there (`make vllm` makes .venv-vllm; on GPUs `pip install vllm`) and point "
                    "MAAS_VLLM_PYTHON at that environment's python") from None

            log.info("loading %s from %s with vLLM on %s", self._label, self.spec.source, ", ".join(self.spec.devices))
            if prefix_cache_on(self.spec):  # its blocks, reported for routing by cached prefix
                from maas.services.worker.engines.vllm_kv import VLLMKvFollower

                self._kv = VLLMKvFollower()
                self._kv.start()
            try:
                args = self._engine_args()
                tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.spec.source)
                # made on this loop (it starts its output task here); loading takes seconds, but
                # nothing else runs on an engine process's loop before the engine is ready
                engine = AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger()])
            except BaseException as exc:
                if self._kv is not None:
                    self._kv.close()
                    self._kv = None
                if isinstance(exc, MaasError) or not isinstance(exc, Exception):
                    raise
                raise EngineDead(f"vLLM cannot load model {self.spec.name} from {self.spec.source}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            if self._kv is not None and self._kv.events is not None:
                self._kv.events.block_size = int(engine.vllm_config.cache_config.block_size)
                self.kv_events = self._kv.events
            self.context_length = int(engine.model_config.max_model_len)
            self._vocab = int(engine.model_config.get_vocab_size())
            eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
            generation = getattr(engine.model_config, "hf_config", None)
            extra = getattr(generation, "eos_token_id", None)
            eos.update([extra] if isinstance(extra, int) else extra or ())
            self._eos_ids = tuple(sorted(eos))
            from maas.services.worker.engines.guide import Guides
            from maas.services.worker.engines.hf import _token_bytes

            guides = Guides(tokenizer, self._vocab, list(self._eos_ids))
            self._strings = TokenStrings(lambda: _token_bytes(tokenizer, guides))
            self._engine, self._tokenizer, self._dead = engine, tokenizer, None
            log.info("%s ready on vLLM: context %d, max batch %d, LoRA %s, sampler %s", self._label,
                     self.context_length, self.max_batch, self.max_adapters or "off", self.sampler)

    def _stat_logger(self) -> type:
        """vLLM's statistics go to `_record`. The class stands in for vLLM's own Prometheus
        logger (vLLM adds that one unless a logger of its kind is given): the engine's series
        are the platform's (`metrics`), with vLLM's names as copies made at scrape time, for
        every engine alike."""
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        owner = self

        class Stats(PrometheusStatLogger):
            def __init__(self, vllm_config: Any, engine_indexes: Any = None) -> None:
                self.engine_indexes = engine_indexes or [0]

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                owner._record(scheduler_stats, iteration_stats)

            def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
                pass

            def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
                pass

            def log_engine_initialized(self) -> None:
                pass

            def log(self) -> None:
                pass

        return Stats

    def _record(self, scheduler: Any, iteration: Any) -> None:
        if iteration is not None:
            self._tokens += int(getattr(iteration, "num_generation_tokens", 0))
        if scheduler is None:
            return
        cache = getattr(scheduler, "prefix_cache_stats", None)
        if cache is not None:
            self._prefix_queries += int(cache.queries)
            self._prefix_hits += int(cache.hits)
        now = time.monotonic()
        elapsed = now - self._tokens_since
        rate = self._stats.tokens_per_second
        if elapsed >= 1.0:
            rate, self._tokens, self._tokens_since = self._tokens / elapsed, 0, now
        running, waiting = int(scheduler.num_running_reqs), int(scheduler.num_waiting_reqs)
        self._stats = EngineStats(
            running=running, waiting=waiting, kv_cache_used=float(scheduler.kv_cache_usage),
            tokens_per_second=rate if running else 0.0,
            prefix_hit_rate=self._prefix_hits / self._prefix_queries if self._prefix_queries else 0.0)
        metrics.RUNNING.labels(self._label).set(running)
        metrics.WAITING.labels(self._label).set(waiting)
        metrics.KV_USAGE.labels(self._label).set(float(scheduler.kv_cache_usage))

    async def close(self) -> None:
        async with self._load_lock:
            engine, self._engine = self._engine, None
            if engine is None:
                return
            self._dead = Unavailable(f"{self._label} is shutting down on this worker; retry")
            # synchronous, and on this loop on purpose: ends the engine core process and cancels
            # the output task, which, were the loop free meanwhile, would log the core's end as
            # a failure (an engine process's loop serves nothing else once it closes)
            engine.shutdown()
            if self._kv is not None:
                self._kv.close()
                self._kv, self.kv_events = None, None
            self._adapters.clear()
            del engine
            gc.collect()  # now, not at interpreter exit, where AsyncLLM.__del__ trips over torn-down modules

    def stats(self) -> EngineStats:
        return self._stats if self._dead is None else EngineStats()

    def dead(self) -> bool:
        """Whether vLLM's engine core has failed (it can die with no request open)."""
        engine = self._engine
        if engine is not None and self._dead is None and getattr(engine, "errored", False):
            self._dead = EngineDead(f"vLLM's engine core of {self._label} failed")
        return self._dead is not None and engine is not None

    # ---- chats ----------------------------------------------------------------------------



    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    # ---- requests -------------------------------------------------------------------------

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
            if any(not 0 <= t < self._vocab for t in ids):
                raise InvalidArgument(f"prompt_token_ids holds ids outside the vocabulary of {self.spec.name} "
                                      f"(ids 0 to {self._vocab - 1})", field="prompt_token_ids")
            return ids
        return list(self._tokenizer(request.prompt)["input_ids"])

    def _sampling(self, request: GenerationRequest, prompt_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params, resumed = request.params, len(request.resume_token_ids)
        outside = [t for t in params.stop_token_ids if t >= self._vocab]
        if outside:
            raise InvalidArgument(f"stop_token_ids holds {outside[0]}, outside the vocabulary of {self.spec.name} "
                                  f"(ids 0 to {self._vocab - 1})", field="stop_token_ids")
        kwargs: dict[str, Any] = dict(
            max_tokens=params.max_tokens - resumed, min_tokens=max(0, params.min_tokens - resumed),
            # stop strings and text are the built-in engine's (`generate`): vLLM gives token ids
            detokenize=False, stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs if params.prompt_logprobs is not None and not resumed else None,
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY)
        if params.guide is not None:
            kwargs["structured_outputs"] = _structured(params.guide)
        if self.sampler == "maas":
            from maas.services.worker.engines.vllm_sampler import extra_args

            end_ids = params.end_ids(self._eos_ids) if params.min_tokens else ()
            kwargs.update(temperature=0.0, extra_args=extra_args(params, request_seed(params), resumed=resumed,
                                                                 end_ids=end_ids))
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0,
                          min_p=params.min_p, seed=params.seed, repetition_penalty=params.repetition_penalty,
                          presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty)
        return SamplingParams(**kwargs)

    async def _lora(self, adapter: AdapterRef | None) -> Any:
        """The LoRARequest for `adapter`, loaded into vLLM first (so a bad adapter fails this
        request, not the engine), evicting the least recently used idle one past max_adapters;
        counted as in use until the caller gives it back."""
        if adapter is None:
            return None
        if not self.max_adapters:
            raise FailedPrecondition(f"{self._label} runs on vLLM with max_adapters=0: it serves no adapters",
                                     field="adapter")
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.exceptions import EngineDeadError

        async with self._adapter_lock:
            lora_id = self._adapters.get(adapter.key)
            if lora_id is None:
                if len(self._adapters) >= self.max_adapters:  # make room: the least recently used idle one goes
                    idle = [k for k in self._adapters if not self._adapter_users[k]]
                    if not idle:
                        raise ResourceExhausted(f"all {self.max_adapters} adapter places of {self._label} are in use "
                                                "by running requests; retry", retry_after=1.0)
                    await self._engine.remove_lora(self._adapters.pop(idle[0]))
                lora_id = next(self._adapter_ids)  # never reused: vLLM caches adapters by id
                try:
                    await self._engine.add_lora(LoRARequest(adapter.key, lora_id, adapter.source))
                except EngineDeadError as exc:
                    self._dead = EngineDead(f"vLLM's engine core of {self._label} failed: {exc}")
                    raise self._dead from None
                except Exception as exc:
                    raise InvalidArgument(f"adapter {adapter.key} cannot be loaded by vLLM: {exc}",
                                          field="adapter") from None
                self._adapters[adapter.key] = lora_id
            self._adapters.move_to_end(adapter.key)
            self._adapter_users[adapter.key] += 1  # the caller gives it back when its request ends
            return LoRARequest(adapter.key, lora_id, adapter.source)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the request's deltas; closing the iterator aborts it in vLLM.

        vLLM gives token ids only (`detokenize=False`); text, stop strings and the points
        where a delta may be cut are the built-in engine's (`text.DeltaAssembler`): every
        delta but the last ends where the text of the tokens sent is exactly the text sent,
        so a stream moved elsewhere loses and repeats nothing (vLLM's own text holds back
        the characters that could begin a stop string, which a moved stream would lose)."""
        if self._dead is not None:
            raise self._dead
        from vllm.v1.engine.exceptions import EngineDeadError

        arrived = time.perf_counter()
        params = request.params
        prompt_ids = self._prompt_ids(request)
        resumed = list(request.resume_token_ids)
        if any(not 0 <= t < self._vocab for t in resumed):
            raise InvalidArgument("resume_token_ids holds ids outside the vocabulary", field="resume_token_ids")
        total = len(prompt_ids) + len(resumed)
        if total >= self.context_length:
            raise InvalidArgument(f"prompt is {total} tokens but the context of {self.spec.name} is "
                                  f"{self.context_length}", field="prompt")
        check_context(params, len(prompt_ids), self.context_length)
        if len(resumed) >= params.max_tokens:  # resumed with nothing left to make
            yield Delta("", finish_reason="length", prompt_tokens=len(prompt_ids), completion_tokens=len(resumed))
            return
        sampling = self._sampling(request, len(prompt_ids))
        if (params.logprobs is not None or params.prompt_logprobs is not None) and self._strings is not None:
            await asyncio.to_thread(self._strings.ready)  # the vocabulary's texts, once, off the loop
        out = DeltaAssembler(params.stop, prompt_tokens=len(prompt_ids), completion_tokens=len(resumed),
                             min_tokens=params.min_tokens)
        detok = IncrementalDetokenizer(self._tokenizer, context_ids=prompt_ids + resumed)
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self._eos_ids))
        adapter = request.adapter.key if request.adapter is not None else None
        lora = await self._lora(request.adapter)
        # vLLM's id for it: the request's own can come again (a retry, a stream moved back)
        vllm_id = f"{request.request_id}#{next(self._request_ids)}"
        stream = self._engine.generate({"prompt_token_ids": prompt_ids + resumed}, sampling, vllm_id,
                                       lora_request=lora, priority=request.marked_priority)
        made = 0
        last = arrived
        finish: FinishReason | None = None
        try:
            async for output in stream:
                choice = output.outputs[0]
                now = time.perf_counter()
                if choice.token_ids:
                    (self._m_ttft if made == 0 else self._m_itl).observe(now - last)
                    self._m_tokens.inc(len(choice.token_ids))
                    last = now
                if output.prompt_logprobs and made == 0:
                    entries = _prompt_logprobs(prompt_ids, output.prompt_logprobs, params.prompt_logprobs or 0)
                    if self._strings is not None:
                        entries = tuple(self._strings.name(e) for e in entries)
                    out.set_prompt(prompt_ids, entries)
                entries = _logprobs(tuple(choice.token_ids), choice.logprobs or (), params.logprobs or 0)
                for i, token in enumerate(choice.token_ids):
                    made += 1
                    logprob = entries[i] if i < len(entries) else None
                    if logprob is not None and self._strings is not None:
                        logprob = self._strings.name(logprob)
                    if token in ends:  # (vLLM holds them back until min_tokens)
                        if params.guide is None:  # a grammar's end is not a token of the answer
                            out.add(token, "", logprob)  # an end token: in token_ids, not in the text
                        finish = "stop"
                        break
                    out.add(token, detok.push(token), logprob)
                    if out.stopped:
                        finish = "stop"
                        break
                if finish is None and output.finished:
                    reason = choice.finish_reason or "stop"
                    if reason == "error":  # vLLM: retryable
                        raise Unavailable(f"vLLM ended the request with an error on {self._label}; retry")
                    finish = _FINISH.get(reason, "stop")
                if finish is not None:
                    out.cached_prompt_tokens = int(output.num_cached_tokens or 0)
                    final = out.finish(finish, detok.flush())
                    self._finished(final, arrived, total)
                    yield final
                    return
                if request.stream:
                    delta = out.take(text_complete=not detok.pending)
                    if delta is not None:
                        yield delta
        except EngineDeadError as exc:
            self._dead = EngineDead(f"vLLM's engine core of {self._label} failed: {exc}")
            raise self._dead from None
        except MaasError:
            raise
        except Exception as exc:
            raise _request_error(exc, self._label) from None
        finally:
            await stream.aclose()  # aborts the request in vLLM if it still runs
            if adapter is not None:
                self._adapter_users[adapter] -= 1

    def _finished(self, final: Delta, arrived: float, prompt_tokens: int) -> None:
        assert final.finish_reason is not None
        metrics.FINISHED.labels(self._label, final.finish_reason).inc()
        metrics.E2E.labels(self._label).observe(time.perf_counter() - arrived)
        metrics.PROMPT_TOKENS.labels(self._label).inc(prompt_tokens)
        metrics.CACHED_TOKENS.labels(self._label).inc(final.cached_prompt_tokens)


def _request_error(exc: Exception, label: str) -> MaasError:
    """What a vLLM exception from one request means for that request (not for the engine)."""
    name = type(exc).__name__
    kinds = {k.__name__ for k in type(exc).__mro__}
    if "VLLMClientError" in kinds or "VLLMValidationError" in kinds or isinstance(exc, ValueError):
        return InvalidArgument(f"vLLM refused the request: {exc}", field=getattr(exc, "parameter", None) or None)
    if name == "GracefulHTTPError" or "GracefulHTTPError" in kinds:
        return ResourceExhausted(f"{label} is overloaded: {exc}", retry_after=1.0)
    return Unavailable(f"vLLM failed the request on {label} ({name}: {exc}); retry")


def _structured(guide: Any) -> Any:
    """The guide as vLLM's structured-output parameters, for its guidance backend (llguidance,
    the built-in engine's library), with the built-in engine's JSON options: compact JSON,
    oneOf read as anyOf, unknown formats allowed (`tools.JSON_OPTIONS`)."""
    import json

    from vllm.sampling_params import StructuredOutputsParams

    from maas.mesh.tools import JSON_OPTIONS

    if guide.kind in ("json_schema", "json_object"):
        schema = json.loads(guide.value) if guide.kind == "json_schema" else {"type": "object"}
        return StructuredOutputsParams(json={**schema, "x-guidance": JSON_OPTIONS})
    if guide.kind == "regex":
        return StructuredOutputsParams(regex=guide.value)
    return StructuredOutputsParams(grammar=guide.value)


def _entry(token: int, alternatives: dict[int, Any] | None, n: int) -> TokenLogprob:
    """One position's logprob from vLLM's {token id: Logprob} (the chosen token, whatever its
    rank, plus the top n by rank), as the built-in engine gives it."""
    alternatives = alternatives or {}
    chosen = alternatives.get(token)
    top = sorted(((t, lp) for t, lp in alternatives.items() if lp.rank is not None and 1 <= lp.rank <= n),
                 key=lambda item: item[1].rank)
    return TokenLogprob(token, float(chosen.logprob) if chosen is not None else float("-inf"),
                        tuple((t, float(lp.logprob)) for t, lp in top))


def _logprobs(ids: tuple[int, ...], entries: Sequence[dict[int, Any]], n: int) -> tuple[TokenLogprob, ...]:
    return tuple(_entry(token, alternatives, n) for token, alternatives in zip(ids, entries, strict=False))


def _prompt_logprobs(prompt_ids: list[int], entries: Sequence[dict[int, Any] | None], n: int
                     ) -> tuple[TokenLogprob, ...]:
    """The first prompt token has no logprob (nothing precedes it): its entry holds only its id."""
    return (TokenLogprob(prompt_ids[0], 0.0),
            *(_entry(token, alternatives, n) for token, alternatives in zip(prompt_ids[1:], entries[1:], strict=False)))
